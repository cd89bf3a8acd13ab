r"""TRI-TSMC (arXiv 2605.25123): learn a twist by tempered importance reweighting of the current
twisted path measure, then a weighted maximum-likelihood projection onto the family
(:func:`tri_tsmc`; the projection is :mod:`~tiltsample.samplers.smc.twists.tri_objective`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.samplers.smc.twists.learned import LinearTwist
from tiltsample.samplers.smc.twists.tri_objective import (
    negative_phase_samples,
    path_states,
    project_twist,
    state_tables,
)
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

__all__ = [
    "NEGATIVE_PHASES",
    "TRIParameters",
    "TRIResult",
    "TRIStep",
    "ess_fraction",
    "tempered_path_weights",
    "tri_parameters",
    "tri_tsmc",
]

NEGATIVE_PHASES = ("exact", "smc")


class TRIStep(NamedTuple):
    """One TRI-TSMC iteration (diagnostics of the path measure it reweighted)."""

    iteration: int
    ess_fraction: float
    """Kong ESS / M of the untempered importance weights ``pi/Q_theta`` of the sampled paths."""
    log_z_hat: float
    """Importance-sampling estimate of ``log Z`` from the sampled paths."""
    objective: float
    """Weighted negative log-likelihood after the projection."""


class TRIResult(NamedTuple):
    """What :func:`tri_tsmc` returns."""

    twist: LinearTwist
    history: list[TRIStep]
    cost: Cost


class TRIParameters(NamedTuple):
    """The checked numeric parameters of a TRI-TSMC iteration (:func:`tri_parameters`)."""

    iterations: int
    num_paths: int
    beta: float
    l2: float
    max_iter: int
    num_negative: int
    prox: float


def tri_parameters(
    generator: torch.Generator,
    num_iterations: int,
    num_paths: int,
    step_size: float,
    l2: float,
    max_iter: int,
    num_negative: int | None,
    prox: float,
) -> TRIParameters:
    """Check the parameters shared by :func:`tri_tsmc` and
    :func:`~tiltsample.samplers.smc.twists.diffusion.learn_state_twist` (errors name the parameter);
    ``num_negative`` defaults to ``num_paths``."""
    validation.generator("generator", generator)
    iterations = validation.positive_int("num_iterations", num_iterations)
    m = validation.positive_int("num_paths", num_paths)
    beta = validation.unit_interval("step_size", step_size)
    if beta == 0.0:
        raise ValueError("step_size must lie in (0, 1], got 0")
    if isinstance(l2, bool) or not isinstance(l2, int | float) or not l2 >= 0:
        raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
    max_iter = validation.positive_int("max_iter", max_iter)
    m_neg = m if num_negative is None else validation.positive_int("num_negative", num_negative)
    prox = validation.positive_float("prox", prox)
    return TRIParameters(iterations, m, beta, float(l2), max_iter, m_neg, prox)


def tempered_path_weights(log_w: Tensor, beta: float) -> Tensor:
    """``W ∝ w^beta``, normalised (the trust-region step of TRI-TSMC); zero-weight paths keep 0.

    Raises ``ValueError`` when every path has zero weight.
    """
    finite = torch.isfinite(log_w)
    if not bool(finite.any()):
        raise ValueError("every sampled path has zero weight: no projection possible")
    tempered = torch.where(finite, beta * log_w, torch.full_like(log_w, -math.inf))
    return torch.exp(tempered - torch.logsumexp(tempered, 0))


def ess_fraction(log_w: Tensor) -> float:
    """Kong's ``ESS / M = (sum w)^2 / (M sum w^2)`` of unnormalised log-weights ``[M]``."""
    ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))
    return ess / log_w.numel()


def tri_tsmc(
    target: TiltedTarget,
    twist: LinearTwist,
    *,
    generator: torch.Generator,
    num_iterations: int = 5,
    num_paths: int = 512,
    step_size: float = 0.5,
    l2: float = 1e-3,
    max_iter: int = 200,
    negative: str = "exact",
    num_negative: int | None = None,
    prox: float = 0.05,
) -> TRIResult:
    r"""Learn a twist by the trust-region iteration of TRI-TSMC (arXiv 2605.25123).

    Each iteration, with the current twist ``psi_k = psi_{theta_k}``:

    1. **Sample the current twisted path measure.** ``M = num_paths`` complete paths from the
       twist-induced proposal ``Q_k(x) = prod_t p(x_t | x_<t) psi_k(x_{1:t}) / sum_v p(v | x_<t)
       psi_k(x_<t v)`` (SMC with ``proposal="optimal"`` and no resampling), with importance
       weights ``w = p G / Q_k``.
    2. **Tempered importance reweighting** (the closed form of the KL trust-region step
       ``min_Q KL(Q ‖ pi) + (1/beta - 1) KL(Q ‖ Q_k)``): ``Q_{k+1} ∝ Q_k^{1-beta} pi^beta``, i.e.
       the paths reweighted by ``W ∝ w^beta`` with ``beta = step_size``. The iterates follow the
       geometric (escort) path from ``Q_0`` to ``pi``.
    3. **Projection by weighted maximum likelihood** onto the family: ``theta_{k+1}`` maximises
       ``sum_i W_i sum_t log sigma_t^theta(x_i at t) - l2 |theta|^2``, where
       ``sigma_t^theta(s) ∝ p(s) psi_theta(s)`` (incomplete ``s`` of length ``t``) and
       ``∝ p(x) G(x)`` (complete ``x``, ``|x| <= t``) are the twisted intermediate marginals.
       Its maximiser over a family containing the value function is ``psi = V`` exactly (the
       complete states pin the scale at every ``t``), which makes twisted SMC zero-variance.

    The projection fits the *marginals* (the contrastive objective of Zhao et al. 2024) rather than
    the path likelihood of ``Q_theta``: the latter identifies ``psi`` only up to a factor per
    parent prefix, which leaves ``Q_theta`` unchanged but not the SMC weights (they depend on
    ``psi`` itself once particles are resampled). The twist parameterisation on masked states
    and the step-size schedule of the paper are unconfirmed (``specs/smc.md`` §10).

    **Negative phase.** The gradient of the objective is
    ``sum_t (E_{sigma_t^theta}[phi 1{incomplete}] - sum_i W_i phi(x_i at t)) + 2 l2 theta``.
    ``negative="exact"`` computes the normalisers ``Z_t(theta)`` by enumeration (enumerable toys
    only). ``negative="smc"`` scales: each iteration runs one SMC with the current twist
    (:func:`negative_phase_samples`, ``num_negative`` particles) whose weighted particles at every
    ``t`` target ``sigma_t^{theta_k}``, and replaces ``log Z_t(theta) - log Z_t(theta_k)`` by the
    self-normalised importance estimate ``log sum_i W_i^t exp((theta - theta_k) · phi_i^t)``:
    a deterministic surrogate (L-BFGS still applies) that is exact at ``theta_k`` to ``O(1/N)``
    and whose gradient is the importance-sampled negative phase. Far from ``theta_k`` the
    importance estimate fails (a feature no particle carries would get no negative phase at
    all, and its parameter would diverge), so the surrogate adds the proximal term
    ``prox |theta - theta_k|^2``; it vanishes at a fixed point, so the iteration's fixed points
    are those of the exact projection (up to Monte Carlo error).

    Parameters
    ----------
    target
        An enumerable target.
    twist
        The family and its starting point (``theta = 0``: ``psi = 1``).
    generator
        Randomness of the path samples.
    num_iterations, num_paths
        Outer iterations and paths per iteration.
    step_size
        ``beta`` in ``(0, 1]`` (``1``: plain weighted ML on importance-weighted paths).
    l2
        Ridge penalty (keeps ``psi > 0`` on prefixes the samples never visit).
    max_iter
        L-BFGS iterations per projection.
    negative, num_negative
        ``"exact"`` (enumeration) or ``"smc"`` (sampled normalisers; ``num_negative`` SMC
        particles per iteration, default ``num_paths``).
    prox
        Proximal weight of the sampled surrogate (``negative="smc"`` only; ``> 0``).

    Returns
    -------
    TRIResult
        The learned twist, per-iteration diagnostics and the sampling cost.
    """
    from tiltsample.samplers.smc.algorithm import run
    from tiltsample.samplers.smc.evidence import result

    if not isinstance(twist, LinearTwist):
        raise TypeError(f"twist must be a LinearTwist, got {type(twist).__name__}")
    iterations, m, beta, l2, max_iter, m_neg, prox = tri_parameters(
        generator, num_iterations, num_paths, step_size, l2, max_iter, num_negative, prox
    )
    negative = validation.one_of("negative", negative, NEGATIVE_PHASES)
    tables = state_tables(target, twist.features) if negative == "exact" else None
    history: list[TRIStep] = []
    cost = Cost()
    current = twist
    for k in range(iterations):
        state = run(
            target,
            num_particles=m,
            generator=generator,
            twist=current,
            proposal="optimal",
            ess_threshold=0.0,
        )
        cost = cost + state.cost
        out = result(state)
        log_w = out.log_weights
        weights = tempered_path_weights(log_w, beta)
        paths = out.sequences
        states = path_states(target, paths, current.features)
        negatives = None
        if negative == "smc":
            negatives, neg_cost = negative_phase_samples(target, current, m_neg, generator)
            cost = cost + neg_cost
        theta, value = project_twist(
            current.theta, states, tables, weights, float(l2), max_iter, negatives, prox
        )
        log_z_hat = float(torch.logsumexp(log_w, 0) - math.log(m))
        history.append(TRIStep(k, ess_fraction(log_w), log_z_hat, value))
        current = current.with_theta(theta)
    return TRIResult(current, history, cost)
