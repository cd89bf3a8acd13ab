r"""Feynman–Kac steering of masked-diffusion LMs (Singhal et al., arXiv 2501.06848).

``specs/smc.md`` §10.

Target
    ``pi(x) ∝ p_ref(x) G(x)``, ``G = exp(log_tilt)``, where ``p_ref`` is the output law of the
    masked-diffusion base sampler (the network **and** its unmasking rule).
Proposal
    ``proposal="base"``: the base sampler itself: each particle runs ``denoise_step``
    (``p/q = 1``), so the weights are made of the potentials alone. ``proposal="guided"``: the
    locally optimal proposal of the twisted model over the next denoising step,
    ``q(s'|s) ∝ p(s'|s) psi(s')`` with ``psi = exp(phi)`` (``G`` on complete states), for
    policies that enumerate a step (``transitions(state, step)``: the masked-diffusion toy); the
    weight gains ``log sum_{s'} p(s'|s) psi(s') - log psi(s)``, the difference potential's twist
    (required). With exact energies every increment is deterministic: ``log Ẑ = log Z`` in every
    run and the particles are exact draws of ``pi``.
Length conventions
    A response has the fixed length ``L`` and is cut after its first EOS. ``truncation="stop"``:
    every response counts; ``"condition"``: a response without EOS has ``G = 0`` (weight 0; the
    estimators' and the exact energies' ``G`` use the same convention), so the particles target
    ``pi(x) ∝ p_ref(x) G(x) 1{x ends with EOS}``.
Potentials
    Every ``resample_every`` denoising steps each particle gets an intermediate log-reward estimate
    ``phi_k`` of its partially masked state (below) and the potential ``G_k``:

    ============== ===================================================================
    ``difference`` ``log G_k = phi_k - phi_{k-1}`` (telescopes; the paper's default)
    ``max``        ``log G_k = max_{j <= k} phi_j``
    ``sum``        ``log G_k = sum_{j <= k} phi_j``
    ``immediate``  ``log G_k = phi_k`` (the paper's "r_t")
    ``none``       ``log G_k = 0``: importance sampling, reweighted at the end (no resampling)
    ``bon``        ``log G_k = 0`` (importance sampling: correct weights, i.i.d. particles) and
                   each run's particles returned best first (final log-tilt; ties: lower index):
                   particle 0 of a run is its best-of-``N`` selection, which is **not** a draw
                   of ``pi`` (its exact law: ``theory.smc_exact.best_of_n_law``). The reference
                   code's ``bon`` returns sorted particles likewise.
    ============== ===================================================================

    At the last step the potential is ``G(x) / prod_k G_k``, so the product of all potentials is
    ``G(x)`` and the final target is exact for every choice: the potentials are a twist
    ``psi_k = prod_{j<=k} G_j`` (:mod:`tiltsample.samplers.smc`). Weights accumulate over steps
    without resampling (the reference code discards them with adaptive resampling: the pitfall of
    §10) and live in log space (no clamp at 1e10).
Intermediate rewards ``phi``
    ``"greedy"``: ``log_tilt`` of the denoiser's most likely completion (the "expected x_0" of
    text diffusion); ``"one-shot"``: the log-mean-exp of ``log_tilt`` over ``num_samples_phi``
    completions that fill every masked position independently from the denoiser's marginals (FK
    steering's text setting; not the sampler's own completion law, so a biased log-energy);
    ``"rollout"``: ETS's unbiased estimate from ``num_samples_phi`` runs of the base sampler itself
    (:class:`~tiltsample.samplers.ets.potentials.DiffusionRolloutPotential`; lookahead twists); or
    any :class:`~tiltsample.diffusion.StatePotential`. A zero estimate becomes ``log(floor)`` so
    that no particle the target needs is killed (see
    :func:`tiltsample.samplers.smc.twists.apply_floor`). Estimates are drawn once per particle and
    step and stored.
Resampling
    ``ess_threshold`` (default 1: at every potential evaluation, as FK steering's fixed interval)
    with any scheme of :mod:`tiltsample.resampling` (default multinomial, as the reference code).
Evidence
    ``log Ẑ = sum_epochs (logsumexp(log w) - log N)``, unbiased for ``Z = E_{p_ref}[G]``.
Cost per interval
    ``resample_every`` denoiser passes per particle (the base sampler), plus the estimator's:
    one pass and one reward call per particle (greedy), one pass and ``K`` reward calls
    (one-shot), ``K`` full rollouts (rollout); one reward call per particle at the end.

Paper defaults for text (paper and reference code): 4 particles, ``lambda = 10`` (multiplying
the reward; here ``1/lam``), resampling every 20 denoising steps, difference potential,
multinomial resampling.

Modules: :mod:`~tiltsample.samplers.smc.fk_model` (parameters, state, estimators, result),
:mod:`~tiltsample.samplers.smc.fk_steps` (base and guided steps, resampling); this one holds
``build_kernel``, ``run`` and ``sampler``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tiltsample import validation
from tiltsample.diffusion import StatePotential, is_masked_diffusion
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.smc.fk_model import (
    ESTIMATORS,
    POTENTIALS,
    PROPOSALS,
    FKConfig,
    FKInfo,
    FKState,
    check_guided,
    done,
    fk_config,
    init,
    log_evidence_runs,
    result,
)
from tiltsample.samplers.smc.fk_steps import base_step, guided_step
from tiltsample.target import TiltedTarget

__all__ = [
    "ESTIMATORS",
    "POTENTIALS",
    "PROPOSALS",
    "FKConfig",
    "FKInfo",
    "FKState",
    "build_kernel",
    "done",
    "init",
    "kernel_from_config",
    "log_evidence_runs",
    "result",
    "run",
    "sampler",
]


def build_kernel(
    *,
    potential: str = "difference",
    estimator: str | StatePotential = "one-shot",
    num_samples_phi: int = 4,
    resample_every: int = 1,
    ess_threshold: float = 1.0,
    resampling: str = "multinomial",
    floor: float = 1.0,
    proposal: str = "base",
) -> Any:
    """One interval of ``resample_every`` denoising steps, a potential and a resampling decision."""
    config = fk_config(
        potential,
        estimator,
        num_samples_phi,
        resample_every,
        ess_threshold,
        resampling,
        floor,
        proposal,
    )
    return kernel_from_config(config)


def kernel_from_config(config: FKConfig) -> Any:
    """The step function of a validated :class:`~tiltsample.samplers.smc.fk_model.FKConfig`."""

    def step(generator: torch.Generator, state: FKState) -> tuple[FKState, FKInfo]:
        check_guided(state.target, config)
        if config.proposal == "guided":
            return guided_step(config, generator, state)
        return base_step(config, generator, state)

    return step


def run(
    target: TiltedTarget,
    *,
    num_particles: int,
    generator: torch.Generator,
    num_runs: int = 1,
    **params: Any,
) -> FKState:
    """``num_runs`` independent FK-steering runs to completion (parameters of :func:`sampler`)."""
    step = build_kernel(**params)
    state = init(target, generator=generator, num_particles=num_particles, num_groups=num_runs)
    while not done(state):
        state, _ = step(generator, state)
    return state


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_particles: int | None = None,
    potential: str = "difference",
    estimator: str | StatePotential = "one-shot",
    num_samples_phi: int = 4,
    resample_every: int = 1,
    ess_threshold: float = 1.0,
    resampling: str = "multinomial",
    floor: float = 1.0,
    proposal: str = "base",
) -> SamplingAlgorithm:
    """FK steering (see the module docstring).

    Parameters
    ----------
    target
        A tilted target over a masked-diffusion policy.
    num_samples, num_particles
        ``num_samples / num_particles`` independent runs of ``num_particles`` (default: one run).
    potential
        One of :data:`POTENTIALS`.
    estimator, num_samples_phi
        Intermediate reward: ``"greedy"``, ``"one-shot"`` (``K = num_samples_phi`` independent
        fills), ``"rollout"`` (``K`` base-sampler rollouts) or a ``StatePotential``.
    resample_every
        Denoising steps between potential evaluations / resampling decisions.
    ess_threshold, resampling
        Resample when ``ESS < ess_threshold · N`` (default 1: every evaluation).
    floor
        A zero estimate becomes ``log(floor)`` (keeps the potentials positive).
    proposal
        ``"base"`` (the base sampler) or ``"guided"`` (the twisted one-step proposal
        ``q(s'|s) ∝ p(s'|s) exp(phi(s'))`` over the enumerated next states; difference
        potential only).
    """
    if not is_masked_diffusion(getattr(target, "policy", None)):
        raise TypeError("fk-steering needs a target over a masked-diffusion policy")
    validation.positive_int("num_samples", num_samples)
    n = (
        num_samples
        if num_particles is None
        else validation.positive_int("num_particles", num_particles)
    )
    if num_samples % n:
        raise ValueError(f"num_particles={n} must divide num_samples={num_samples}")
    params: dict[str, Any] = {
        "potential": potential,
        "estimator": estimator,
        "num_samples_phi": num_samples_phi,
        "resample_every": resample_every,
        "ess_threshold": ess_threshold,
        "resampling": resampling,
        "floor": floor,
        "proposal": proposal,
    }
    config = fk_config(**params)
    check_guided(target, config)
    groups = num_samples // n
    total = int(target.policy.num_steps)  # type: ignore[attr-defined]
    return SamplingAlgorithm(
        name="fk-steering",
        kind="iid",
        init=lambda g: init(target, generator=g, num_particles=n, num_groups=groups),
        step=kernel_from_config(config),
        done=done,
        result=result,
        params={"num_particles": n, **params},
        total_steps=math.ceil(total / resample_every),
    )
