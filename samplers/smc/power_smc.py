r"""Power-SMC: SMC for the power distribution ``p_ref^alpha`` (Azizi et al., arXiv 2602.10273).

Target
    ``pi_alpha(x) ∝ p_ref(x)^alpha`` (:func:`tiltsample.power_target`), optionally times further
    tilt terms (``power_target(p, 4).tilt(verifier)``): the power part is handled by the twist and
    the proposal, the rest by the final weight.
Twist and proposal
    The power tilt factorises over tokens, ``G_t = p(x_t | x_<t)^{alpha - 1}``, so the prefix twist
    ``psi(s) = p_ref(s)^{alpha - 1}`` is exact for that factor, and the locally optimal proposal it
    induces is the low-temperature proposal ``q_tau(v | s) ∝ p(v | s)^alpha``, ``tau = 1/alpha``.
    (It is *not* a sampler of ``p^alpha`` on its own: low temperature drops the future factor
    ``zeta`` of ``specs/mcmc.md`` §1, which the weights restore.)
Weights
    The incremental weight ``p^alpha / q_tau = Z_t(x_<t) = sum_v p(v | x_<t)^alpha`` depends only
    on the prefix, so it is applied *before* the token is drawn and resampling precedes the draw
    (fully adapted). Azizi et al. prove ``tau = 1/alpha`` is the unique prefix-only proposal that
    minimises the incremental-weight variance.
Exponent bridging
    ``alpha_ramp = R > 0`` moves through ``gamma_t ∝ p(x_{1:t})^{alpha_t}`` with
    ``alpha_t = alpha_0 + (alpha - alpha_0) min(t/R, 1)`` (``alpha_0 = ramp_start``, default 1):
    the weight at token ``t`` becomes ``p(x_<t)^{alpha_t - alpha_{t-1}} Z_t(x_<t; alpha_t)``, the
    proposal uses ``tau_t = 1/alpha_t``, and a particle that completes during the ramp gets the
    full tilt ``G``: the final target is unchanged.
Exactness
    As SMC: ``E[Ẑ] = Z_alpha``, consistent with bias ``O(1/N)``.
Rollout level
    On a rollout-level session (a serving engine, :class:`~tiltsample.policy.RolloutSession`)
    each block is one decode request from ``q_tau``, ``tau = 1/alpha_{t+1}`` for a block starting
    at length ``t``, and the weight is computed *after* the draw from the tokens' ``log p`` and
    ``log q`` (``sum_block (log p - log q) + log psi_new - log psi_old``, which for the power
    factor is ``sum_block log Z_t``, the same value; resampling then follows the draw instead of
    preceding it). Exact as well (:mod:`~tiltsample.samplers.smc.rollout_block`);
    ``num_moves > 0`` is refused there.
Cost per token
    One batched model call (the twist is free: it reuses ``log p_ref``), no reward call for a pure
    power target; one per EOS child and tilt term otherwise. Paper: 1.4–3.3× the latency of base
    decoding versus 16–28× for MH power sampling (paper abstract).

The machinery (block steps, adaptive resampling, resample-move, evidence, EOS handling) is
:mod:`tiltsample.samplers.smc`; :func:`smc_params` gives its configuration, e.g. for
:func:`tiltsample.samplers.smc.bounds.log_z_lower`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.smc.algorithm import sampler as smc_sampler
from tiltsample.samplers.smc.twists.base import Twist, power_exponent
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["PowerRampTwist", "sampler", "smc_params"]


class PowerRampTwist(Twist):
    r"""``log psi(s) = (alpha_{|s|} - 1) log p_ref(s)``, with the exponent ramp of the module text.

    ``alpha`` is read from the target (``1 +`` the summed coefficient of ``log p_ref`` in its
    log-tilt). ``ramp_steps = 0`` is the constant prefix twist ``p_ref(s)^{alpha - 1}``.
    """

    name = "power"

    def __init__(self, ramp_steps: int = 0, ramp_start: float = 1.0) -> None:
        self.ramp_steps = validation.non_negative_int("alpha_ramp", ramp_steps)
        if (
            isinstance(ramp_start, bool)
            or not isinstance(ramp_start, int | float)
            or not math.isfinite(ramp_start)
        ):
            raise ValueError(f"ramp_start must be a finite number, got {ramp_start!r}")
        self.ramp_start = float(ramp_start)

    def exponent(self, target: TiltedTarget, length: int) -> float:
        """``alpha_t - 1`` at prefix length ``t``."""
        alpha = 1.0 + power_exponent(target)
        if self.ramp_steps == 0:
            return alpha - 1.0
        frac = min(length / self.ramp_steps, 1.0)
        return self.ramp_start + (alpha - self.ramp_start) * frac - 1.0

    def proposal_temperature(self, target: TiltedTarget, length: int) -> float:
        """``tau = 1 / alpha_t`` (``t = length``): the temperature of the locally optimal proposal
        ``q(v | s) ∝ p(v | s) psi(s + v) ∝ p(v | s)^{alpha_t}`` of the token that makes a prefix
        of length ``t`` (away from completion). The rollout level draws its blocks from it
        (:class:`~tiltsample.samplers.smc.rollout_block.TemperedProposalTwist`); ``ValueError``
        when ``alpha_t <= 0`` (no temperature expresses it)."""
        alpha_t = 1.0 + self.exponent(target, length)
        if not alpha_t > 0.0:
            raise ValueError(
                f"the power proposal p^alpha_t needs alpha_t > 0 to be a tempered law, got "
                f"alpha_t={alpha_t} at length {length} (alpha, ramp_start={self.ramp_start})"
            )
        return 1.0 / alpha_t

    def _apply(self, exponents: Tensor, log_reference: Tensor) -> Tensor:
        return torch.where(torch.isneginf(log_reference), log_reference, exponents * log_reference)

    def log_twist(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        exps = torch.tensor([self.exponent(target, len(s)) for s in prefixes], dtype=torch.float64)
        return self._apply(exps, log_reference.to(torch.float64)), Cost()

    def log_twist_children(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        next_logprobs: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        exps = torch.tensor(
            [self.exponent(target, len(s) + 1) for s in prefixes], dtype=torch.float64
        )
        child_ref = log_reference.to(torch.float64)[:, None] + next_logprobs.to(torch.float64)
        return self._apply(exps[:, None].expand_as(child_ref), child_ref), Cost()

    def __repr__(self) -> str:
        return f"PowerRampTwist(ramp_steps={self.ramp_steps}, ramp_start={self.ramp_start})"


def _check_power_target(target: TiltedTarget) -> float:
    """``alpha`` of the target (``1`` when it has no ``log p_ref`` term: every sampler accepts
    every target, and Power-SMC then reduces to SMC with the locally optimal proposal of the
    trivial prefix twist)."""
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    return 1.0 + power_exponent(target)


def smc_params(
    *,
    alpha_ramp: int = 0,
    ramp_start: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    num_moves: int = 0,
    move_temperature: float | None = None,
    convention: str = "reset",
    move_cut: str = "uniform",
    move_cut_power: float = 4.0,
) -> dict[str, Any]:
    """The :mod:`~tiltsample.samplers.smc` parameters that make an SMC run a Power-SMC run."""
    return {
        "twist": PowerRampTwist(alpha_ramp, ramp_start),
        "proposal": "optimal",
        "block_size": block_size,
        "ess_threshold": ess_threshold,
        "resampling": resampling,
        "num_moves": num_moves,
        "move_temperature": 1.0 if move_temperature is None else move_temperature,
        "convention": convention,
        "move_cut": move_cut,
        "move_cut_power": move_cut_power,
    }


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_particles: int | None = None,
    alpha_ramp: int = 0,
    ramp_start: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    num_moves: int = 0,
    move_temperature: float | None = None,
    convention: str = "reset",
    move_cut: str = "uniform",
    move_cut_power: float = 4.0,
) -> SamplingAlgorithm:
    """Power-SMC (see the module docstring).

    Parameters
    ----------
    target
        A power target (``power_target(policy, alpha)``, possibly with further tilt terms).
    num_samples, num_particles
        As in :func:`tiltsample.samplers.smc.sampler`.
    alpha_ramp, ramp_start
        Exponent bridging over the first ``alpha_ramp`` tokens from ``ramp_start`` to ``alpha``
        (``0``: no ramp).
    block_size, ess_threshold, resampling, num_moves, move_temperature, convention
        As in :func:`tiltsample.samplers.smc.sampler` (moves propose from ``p_ref`` at
        ``move_temperature``, default 1).
    move_cut, move_cut_power
        The moves' cut law (``"uniform"`` or ``"entropy_jump"``), as in
        :func:`tiltsample.samplers.smc.sampler`.
    """
    alpha = _check_power_target(target)
    params = smc_params(
        alpha_ramp=alpha_ramp,
        ramp_start=ramp_start,
        block_size=block_size,
        ess_threshold=ess_threshold,
        resampling=resampling,
        num_moves=num_moves,
        move_temperature=move_temperature,
        convention=convention,
        move_cut=move_cut,
        move_cut_power=move_cut_power,
    )
    inner = smc_sampler(target, num_samples=num_samples, num_particles=num_particles, **params)
    shown = {k: v for k, v in params.items() if k not in ("twist", "proposal")}
    return inner._replace(
        name="power-smc",
        params={
            "num_particles": inner.params["num_particles"],
            "alpha": alpha,
            "alpha_ramp": alpha_ramp,
            "ramp_start": ramp_start,
            **shown,
        },
    )
