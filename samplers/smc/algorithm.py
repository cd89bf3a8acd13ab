"""The SMC sampler: ``build_kernel``, ``run`` (many independent runs to completion) and
``sampler`` (the registered ``smc``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tiltsample import validation
from tiltsample.reward import PrefixPotential
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.smc.config import SMCConfig, make_config
from tiltsample.samplers.smc.evidence import result
from tiltsample.samplers.smc.state import SMCState, done, init
from tiltsample.samplers.smc.step import kernel_from_config
from tiltsample.samplers.smc.twists.base import Twist
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = ["build_kernel", "particles_per_run", "run", "sampler"]


def build_kernel(**params: Any) -> Any:
    """One block step of SMC for every run (parameters as in :func:`sampler`, validated once into
    an :class:`~tiltsample.samplers.smc.config.SMCConfig`)."""
    return kernel_from_config(make_config(**params))


def run(
    target: TiltedTarget,
    *,
    num_particles: int,
    generator: torch.Generator,
    num_runs: int = 1,
    reference: Sequence[Seq] | None = None,
    config: SMCConfig | None = None,
    **params: Any,
) -> SMCState:
    """Run ``num_runs`` independent SMC runs (batched in one session) to completion.

    Returns the final :class:`~tiltsample.samplers.smc.state.SMCState`;
    :func:`~tiltsample.samplers.smc.evidence.result` and
    :func:`~tiltsample.samplers.smc.evidence.log_evidence_runs` read it. The configuration is
    ``config`` (already validated) or ``params`` (those of :func:`sampler`), not both.
    """
    if config is not None and params:
        raise TypeError(f"pass config= or SMC parameters, not both (got {sorted(params)})")
    step = kernel_from_config(make_config(**params) if config is None else config)
    state = init(
        target,
        generator=generator,
        num_particles=num_particles,
        num_groups=num_runs,
        reference=reference,
    )
    while not done(state):
        state, _ = step(generator, state)
    return state


def particles_per_run(num_samples: int, num_particles: int | None) -> int:
    """``N``: ``num_particles`` (default ``num_samples``, one run), checked to divide
    ``num_samples`` (runs of equal size)."""
    validation.positive_int("num_samples", num_samples)
    n = (
        num_samples
        if num_particles is None
        else validation.positive_int("num_particles", num_particles)
    )
    if num_samples % n:
        raise ValueError(
            f"num_particles={n} must divide num_samples={num_samples} (runs of equal size)"
        )
    return n


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_particles: int | None = None,
    twist: str | Twist = "prefix",
    potential: PrefixPotential | None = None,
    num_rollouts: int | None = None,
    rollout_temperature: float = 1.0,
    proposal: str = "reference",
    temperature: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    num_moves: int = 0,
    move_temperature: float | None = None,
    convention: str = "reset",
    move_cut: str = "uniform",
    move_cut_power: float = 4.0,
) -> SamplingAlgorithm:
    """SMC (see :mod:`tiltsample.samplers.smc`).

    Parameters
    ----------
    target
        The tilted target (autoregressive policy).
    num_samples
        Particles returned: ``num_samples / num_particles`` independent runs of ``num_particles``.
    num_particles
        ``N`` per run (default: ``num_samples``, one run); must divide ``num_samples``.
    twist, potential, num_rollouts, rollout_temperature
        ``"none"``, ``"prefix"`` (default; optional ``potential`` for the reward seen so far),
        ``"lookahead"`` with a ``potential`` (any :class:`~tiltsample.reward.PrefixPotential`) or
        ``num_rollouts = K`` (ETS's K-rollout estimate at ``rollout_temperature``, continued from
        the particles' own session), or a :class:`~tiltsample.samplers.smc.twists.Twist`.
    proposal, temperature
        ``"reference"`` (``p_ref`` at ``temperature``) or ``"optimal"`` (``p_ref · psi``).
    block_size
        Tokens per SMC step ``B`` (``B >= max_new_tokens``: importance sampling of completions).
    ess_threshold
        Resample when ``ESS < ess_threshold · N`` (``1``: every block; ``0``: never).
    resampling
        ``"systematic"`` (default), ``"stratified"``, ``"residual"`` or ``"multinomial"``.
    num_moves, move_temperature
        MH rejuvenation moves per unfinished particle after every block (resampled or not; see
        :mod:`tiltsample.samplers.smc`) and their proposal temperature (default: the proposal's
        temperature).
    move_cut, move_cut_power
        The moves' cut law: ``"uniform"`` (default) or ``"entropy_jump"``
        (``c_x(j) ∝ max(0, H_j - H_{j-1})^move_cut_power``, uniform when every jump vanishes; the
        law of :func:`tiltsample.samplers.mh.cut_log_probs`, corrected in the acceptance ratio).
    convention
        ``"reset"`` (A) or ``"mean"`` (B) evidence bookkeeping; identical results.
    """
    n = particles_per_run(num_samples, num_particles)
    config = SMCConfig(
        twist=twist,
        potential=potential,
        num_rollouts=num_rollouts,
        rollout_temperature=rollout_temperature,
        proposal=proposal,
        temperature=temperature,
        block_size=block_size,
        ess_threshold=ess_threshold,
        resampling=resampling,
        num_moves=num_moves,
        move_temperature=move_temperature,
        convention=convention,
        move_cut=move_cut,
        move_cut_power=move_cut_power,
    )
    groups = num_samples // n
    return SamplingAlgorithm(
        name="smc",
        kind="iid",
        init=lambda g: init(target, generator=g, num_particles=n, num_groups=groups),
        step=kernel_from_config(config),
        done=done,
        result=result,
        params={"num_particles": n, **config.as_params()},
        total_steps=math.ceil(target.max_new_tokens / block_size),
    )
