r"""TRI-TSMC as a sampler (``tri-tsmc``): learn a twist by TRI-TSMC, then run twisted SMC with it.

Target
    ``pi(x) ∝ p_ref(x) exp(log_tilt(x))`` on an **enumerable** toy for the default feature map,
    the saturated table of every incomplete prefix
    (:class:`~tiltsample.samplers.smc.twists.PrefixTable`).
Training (``init``, with the run's generator)
    :func:`~tiltsample.samplers.smc.twists.tri_tsmc` from ``psi = 1``: ``num_iterations`` rounds
    of ``num_paths`` paths of the current twist-induced proposal, tempered importance reweighting
    (``step_size``) and the weighted maximum-likelihood projection (``negative="exact"``:
    enumerated normalisers, the default; ``"smc"``: the sampled surrogate). A target with no
    incomplete prefix has nothing to learn (``psi = 1``).
Sampling
    :mod:`tiltsample.samplers.smc` with the learned twist and, by default, the twist-induced
    (locally optimal) proposal ``q ∝ p_ref psi_theta``; the other SMC parameters as in
    :func:`tiltsample.samplers.smc.sampler`.
Exactness
    That of SMC whatever the learned ``theta`` (the final twist is always ``G``): training only
    changes the variance. Its fixed point over the saturated family is the value function, with
    which the optimal proposal gives ``log Ẑ = log Z`` in every run.
Cost
    The training's (its SMC runs; also in ``meta["training_cost"]``) plus SMC's, both in the
    result's ``cost``.
Failure
    A target of zero total mass raises ``ValueError`` ("zero total mass"): there is nothing to
    learn from.

References
----------
Wang, Yang, Deng & Xu (TRI-TSMC), arXiv 2605.25123 (``specs/smc.md`` §10–§11); Zhao, Brekelmans,
Makhzani & Grosse, arXiv 2404.17546.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from tiltsample import validation
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.enumeration import enumerate_target
from tiltsample.results import SampleSet
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.smc.algorithm import particles_per_run
from tiltsample.samplers.smc.config import SMCConfig
from tiltsample.samplers.smc.evidence import result as smc_result
from tiltsample.samplers.smc.state import SMCInfo, SMCState
from tiltsample.samplers.smc.state import done as smc_done
from tiltsample.samplers.smc.state import init as smc_init
from tiltsample.samplers.smc.step import block_step
from tiltsample.samplers.smc.twists.learned import FeatureMap, LinearTwist, PrefixTable
from tiltsample.samplers.smc.twists.tri import NEGATIVE_PHASES, TRIResult, tri_parameters, tri_tsmc
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

__all__ = ["FEATURES", "TRITSMCState", "done", "learn", "result", "sampler"]

FEATURES = ("table",)
"""Feature maps accepted by name: ``"table"``, one parameter per incomplete prefix."""


class TRITSMCState(NamedTuple):
    """The SMC state of the sampling phase, its configuration (with the learned twist) and the
    training that produced it."""

    smc: SMCState
    config: SMCConfig
    training: TRIResult


def learn(
    target: TiltedTarget,
    features: FeatureMap | str,
    generator: torch.Generator,
    **tri: Any,
) -> TRIResult:
    """The learned twist (``features="table"``: the saturated prefix table of an enumerable
    target; ``ValueError`` for a target of zero total mass). ``tri``: the parameters of
    :func:`~tiltsample.samplers.smc.twists.tri_tsmc`."""
    if isinstance(features, str):
        validation.one_of("features", features, FEATURES)
        if not bool(torch.isfinite(enumerate_target(target).log_density).any()):
            raise ValueError("the target has zero total mass: there is no twist to learn")
        features = PrefixTable.from_target(target)
    start = LinearTwist(features)
    if start.theta.numel() == 0:  # no incomplete prefix: psi = 1 is the only twist
        return TRIResult(start, [], Cost())
    return tri_tsmc(target, start, generator=generator, **tri)


def done(state: TRITSMCState) -> bool:
    """True when every SMC particle is a complete response."""
    return smc_done(state.smc)


def result(state: TRITSMCState) -> SampleSet:
    """SMC's result with the training's diagnostics (``meta["training"]``: per-iteration
    ``ess_fraction``, ``log_z_hat``, ``objective``) and cost (``meta["training_cost"]``)."""
    out = smc_result(state.smc)
    out.meta["training"] = [step._asdict() for step in state.training.history]
    out.meta["training_cost"] = state.training.cost.as_dict()
    return out


def _step(generator: torch.Generator, state: TRITSMCState) -> tuple[TRITSMCState, SMCInfo]:
    smc, info = block_step(state.config, generator, state.smc)
    return state._replace(smc=smc), info


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_particles: int | None = None,
    features: FeatureMap | str = "table",
    num_iterations: int = 4,
    num_paths: int = 256,
    step_size: float = 0.5,
    l2: float = 1e-3,
    max_iter: int = 100,
    negative: str = "exact",
    num_negative: int | None = None,
    prox: float = 0.05,
    proposal: str = "optimal",
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    num_moves: int = 0,
    move_temperature: float | None = None,
    convention: str = "reset",
    move_cut: str = "uniform",
    move_cut_power: float = 4.0,
) -> SamplingAlgorithm:
    """TRI-TSMC then twisted SMC (see the module docstring).

    Parameters
    ----------
    target
        An enumerable tilted target (autoregressive policy) for ``features="table"``.
    num_samples, num_particles
        As in :func:`tiltsample.samplers.smc.sampler`.
    features
        ``"table"`` (one parameter per incomplete prefix) or a
        :data:`~tiltsample.samplers.smc.twists.FeatureMap` ``phi(prefixes, log p) -> [B, F]``.
    num_iterations, num_paths, step_size, l2, max_iter, negative, num_negative, prox
        The training (:func:`~tiltsample.samplers.smc.twists.tri_tsmc`; cheap defaults).
    proposal, block_size, ess_threshold, resampling, num_moves, move_temperature
        The sampling SMC (:func:`tiltsample.samplers.smc.sampler`; the twist is the learned one
        and the proposal the twist-induced one by default).
    convention, move_cut, move_cut_power
        As in :func:`tiltsample.samplers.smc.sampler`.
    """
    if is_masked_diffusion(getattr(target, "policy", None)):
        raise TypeError(
            "tri-tsmc learns prefix twists of an autoregressive policy; for a masked-diffusion "
            "policy use fk-steering (learned state twists: "
            "tiltsample.samplers.smc.twists.learn_state_twist)"
        )
    n = particles_per_run(num_samples, num_particles)
    groups = num_samples // n
    if isinstance(features, str):
        validation.one_of("features", features, FEATURES)
    tri_parameters(
        torch.Generator(), num_iterations, num_paths, step_size, l2, max_iter, num_negative, prox
    )
    validation.one_of("negative", negative, NEGATIVE_PHASES)
    tri = {
        "num_iterations": num_iterations,
        "num_paths": num_paths,
        "step_size": step_size,
        "l2": l2,
        "max_iter": max_iter,
        "negative": negative,
        "num_negative": num_negative,
        "prox": prox,
    }
    smc_params: dict[str, Any] = {
        "proposal": proposal,
        "block_size": block_size,
        "ess_threshold": ess_threshold,
        "resampling": resampling,
        "num_moves": num_moves,
        "move_temperature": move_temperature,
        "convention": convention,
        "move_cut": move_cut,
        "move_cut_power": move_cut_power,
    }
    base = SMCConfig(twist="none", **smc_params)  # checks the SMC parameters now

    def init(generator: torch.Generator) -> TRITSMCState:
        training = learn(target, features, generator, **tri)
        config = base.with_params(twist=training.twist)
        state = smc_init(target, generator=generator, num_particles=n, num_groups=groups)
        return TRITSMCState(state._replace(cost=training.cost), config, training)

    shown = "table" if isinstance(features, str) else repr(features)
    return SamplingAlgorithm(
        name="tri-tsmc",
        kind="iid",
        init=init,
        step=_step,
        done=done,
        result=result,
        params={"num_particles": n, "features": shown, **tri, **smc_params},
        total_steps=math.ceil(target.max_new_tokens / block_size),
    )
