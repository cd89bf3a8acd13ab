"""FK steering's model: parameters (:class:`FKConfig`), state (:class:`FKState`), ``init`` and
``done``, the intermediate log-reward estimators ``phi`` (greedy, one-shot, rollout or any
:class:`~tiltsample.diffusion.StatePotential`) and the result (module docstring of
:mod:`tiltsample.samplers.smc.fk_steering`)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.diffusion import StatePotential, initial_states, is_masked_diffusion, states_to_seqs
from tiltsample.resampling import SCHEMES
from tiltsample.results import SampleSet
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "ESTIMATORS",
    "POTENTIALS",
    "PROPOSALS",
    "FKConfig",
    "FKInfo",
    "FKState",
    "add_log_weight",
    "check_guided",
    "done",
    "estimate_log_reward",
    "final_log_tilt",
    "fk_config",
    "floored_log_reward",
    "init",
    "log_evidence_runs",
    "result",
    "sort_by_tilt",
]


POTENTIALS = ("difference", "max", "sum", "immediate", "none", "bon")
ESTIMATORS = ("greedy", "one-shot", "rollout")
PROPOSALS = ("base", "guided")


class FKConfig(NamedTuple):
    """Validated FK-steering parameters (:func:`fk_config`; meaning:
    :func:`~tiltsample.samplers.smc.fk_steering.sampler`)."""

    potential: str
    estimator: str | StatePotential
    num_samples_phi: int
    resample_every: int
    ess_threshold: float
    resampling: str
    floor: float
    proposal: str = "base"


class FKState(NamedTuple):
    """``num_groups`` runs of ``num_particles`` masked-diffusion particles (rows of ``states``)."""

    target: TiltedTarget
    num_particles: int
    num_groups: int
    states: Tensor
    step: int
    """Denoising steps done."""
    evaluations: int
    """Potential evaluations done (``k``)."""
    phi_prev: Tensor
    phi_max: Tensor
    phi_sum: Tensor
    log_psi: Tensor
    """``[M]`` ``sum_k log G_k`` so far (the twist)."""
    log_w: Tensor
    log_z: Tensor
    log_tilt: Tensor
    """``[M]`` final log-tilt (NaN until complete)."""
    reward: Tensor
    resample_count: Tensor
    cost: Cost


class FKInfo(NamedTuple):
    """What one interval reports: its cost, the ESS per run and which runs resampled."""

    cost: Cost
    ess: Tensor
    resampled: Tensor


def fk_config(
    potential: str,
    estimator: str | StatePotential,
    num_samples_phi: int,
    resample_every: int,
    ess_threshold: float,
    resampling: str,
    floor: float,
    proposal: str = "base",
) -> FKConfig:
    """Check the FK-steering parameters (errors name the parameter)."""
    potential = validation.one_of("potential", potential, POTENTIALS)
    proposal = validation.one_of("proposal", proposal, PROPOSALS)
    if proposal == "guided" and potential != "difference":
        raise ValueError(
            "proposal='guided' uses the twist psi = exp(phi) (the difference potential): "
            f"potential must be 'difference', got {potential!r}"
        )
    if isinstance(estimator, str):
        validation.one_of("estimator", estimator, ESTIMATORS)
    elif not callable(getattr(estimator, "log_potential_states", None)):
        raise TypeError(
            f"estimator must be one of {list(ESTIMATORS)} or a StatePotential, "
            f"got {type(estimator).__name__}"
        )
    k = validation.positive_int("num_samples_phi", num_samples_phi)
    every = validation.positive_int("resample_every", resample_every)
    kappa = validation.unit_interval("ess_threshold", ess_threshold)
    scheme = validation.one_of("resampling", resampling, SCHEMES)
    floor = validation.positive_float("floor", floor)
    return FKConfig(potential, estimator, k, every, kappa, scheme, floor, proposal)


def check_guided(target: TiltedTarget, config: FKConfig) -> None:
    """``TypeError`` unless the policy can enumerate a denoising step when the proposal is
    guided."""
    if config.proposal == "guided" and not callable(getattr(target.policy, "transitions", None)):
        raise TypeError(
            "proposal='guided' needs a policy that enumerates one denoising step "
            "(transitions(state, step), e.g. MaskedDiffusionToy)"
        )


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_particles: int,
    num_groups: int = 1,
) -> FKState:
    """Fully masked particles, equal weights, ``psi_0 = 1``."""
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    if not is_masked_diffusion(target.policy):
        raise TypeError(
            "fk-steering needs a masked-diffusion policy (MaskedDiffusionPolicy); for an "
            "autoregressive policy use tiltsample.samplers.smc"
        )
    validation.generator("generator", generator)
    n = validation.positive_int("num_particles", num_particles)
    g = validation.positive_int("num_groups", num_groups)
    m = n * g
    f64 = torch.float64
    zeros = torch.zeros(m, dtype=f64)
    return FKState(
        target,
        n,
        g,
        initial_states(target.policy, m),  # type: ignore[arg-type]
        0,
        0,
        zeros.clone(),
        torch.full((m,), -math.inf, dtype=f64),
        zeros.clone(),
        zeros.clone(),
        zeros.clone(),
        torch.zeros(g, dtype=f64),
        torch.full((m,), math.nan, dtype=f64),
        torch.full((m,), math.nan, dtype=f64),
        torch.zeros(g, dtype=torch.long),
        Cost(),
    )


def done(state: FKState) -> bool:
    """True once every particle is a complete response (after ``T`` denoising steps)."""
    return state.step >= int(state.target.policy.num_steps)  # type: ignore[attr-defined]


def final_log_tilt(target: TiltedTarget, seqs: list[Seq]) -> tuple[Tensor, Tensor | None, Cost]:
    """The final log-tilt of complete responses (``-inf`` for incomplete ones), the primary
    reward and the cost."""
    scores = target.evaluate_tilt(seqs)
    ok = torch.tensor([target.is_complete(x) for x in seqs], dtype=torch.bool)
    log_g = torch.where(ok, scores.log_tilt, torch.full_like(scores.log_tilt, -math.inf))
    return log_g, scores.reward, scores.cost


def estimate_log_reward(
    config: FKConfig,
    target: TiltedTarget,
    states: Tensor,
    step: int,
    generator: torch.Generator,
) -> tuple[Tensor, Cost]:
    """``phi`` of every (partially masked) state: an intermediate log-reward estimate."""
    policy: Any = target.policy
    mask = int(policy.mask_id)
    rows, length = states.shape
    estimator = config.estimator
    if not isinstance(estimator, str):
        values, cost = estimator.log_potential_states(target.prompt, states, step, generator)
        return values.to(torch.float64), cost
    if estimator == "rollout":
        from tiltsample.samplers.ets.potentials import DiffusionRolloutPotential

        pot = DiffusionRolloutPotential(target, config.num_samples_phi)
        values, cost = pot.log_potential_states(target.prompt, states, step, generator)
        return values.to(torch.float64), cost
    logp = policy.position_logprobs(target.prompt, states).to(torch.float64)  # [B, L, V]
    cost = Cost(forward_tokens=rows * (len(target.prompt) + length), model_calls=1)
    masked = states == mask
    if estimator == "greedy":
        filled = torch.where(masked, logp.argmax(dim=2), states)
        log_g, _, c = final_log_tilt(target, states_to_seqs(filled, target.eos_id, mask))
        return log_g, cost + c
    k = config.num_samples_phi
    probs = torch.exp(logp).reshape(rows * length, -1)
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)  # [B*L, K]
    draws = draws.view(rows, length, k).permute(0, 2, 1)  # [B, K, L]
    filled = torch.where(masked[:, None, :], draws, states[:, None, :]).reshape(rows * k, length)
    log_g, _, c = final_log_tilt(target, states_to_seqs(filled, target.eos_id, mask))
    values = torch.logsumexp(log_g.view(rows, k), dim=1) - math.log(k)
    generated = int(masked.sum()) * k
    return values, cost + c + Cost(generated_tokens=generated)


def add_log_weight(log_w: Tensor, inc: Tensor) -> Tensor:
    """``log_w + inc`` with ``-inf`` kept (never NaN)."""
    out = log_w + inc
    return torch.where(
        torch.isneginf(log_w) | torch.isneginf(inc), torch.full_like(out, -math.inf), out
    )


def floored_log_reward(
    config: FKConfig,
    target: TiltedTarget,
    states: Tensor,
    step: int,
    generator: torch.Generator,
) -> tuple[Tensor, Cost]:
    """:func:`estimate_log_reward` checked (``ValueError`` on NaN or ``+inf``) and with a zero
    estimate replaced by ``log(floor)``, so that no particle the target needs is killed."""
    phi, cost = estimate_log_reward(config, target, states, step, generator)
    if bool(torch.isnan(phi).any()) or bool((phi == math.inf).any()):
        raise ValueError("the intermediate reward estimate returned NaN or +inf")
    phi = torch.where(torch.isneginf(phi), torch.full_like(phi, math.log(config.floor)), phi)
    return phi, cost


def sort_by_tilt(state: FKState) -> FKState:
    """Order each run's particles by final log-tilt, best first (ties: lower index first).

    A permutation inside a run changes neither its weighted particle law nor its evidence; it
    makes particle 0 of each run the best-of-``N`` selection (FK steering's ``bon`` output).
    """
    n, groups, log_tilt = state.num_particles, state.num_groups, state.log_tilt
    key = torch.where(torch.isnan(log_tilt), torch.full_like(log_tilt, -math.inf), log_tilt)
    order = torch.sort(-key.view(groups, n), dim=1, stable=True).indices
    perm = (order + torch.arange(groups)[:, None] * n).flatten()
    return state._replace(
        states=state.states[perm],
        log_w=state.log_w[perm],
        log_psi=state.log_psi[perm],
        log_tilt=log_tilt[perm],
        reward=state.reward[perm],
    )


def log_evidence_runs(state: FKState) -> Tensor:
    """``[G]`` ``log Ẑ`` of every run (``-inf`` for a run whose weights all vanished)."""
    n, groups = state.num_particles, state.num_groups
    level = torch.logsumexp(state.log_w.view(groups, n), dim=1) - math.log(n)
    out = state.log_z + level
    return torch.where(torch.isnan(out), torch.full_like(out, -math.inf), out)


def result(state: FKState) -> SampleSet:
    """All particles (weights normalised per run when several runs share the state)."""
    target = state.target
    policy: Any = target.policy
    n, groups = state.num_particles, state.num_groups
    seqs = states_to_seqs(state.states, target.eos_id, int(policy.mask_id))
    runs = log_evidence_runs(state)
    log_w = state.log_w.clone()
    if groups > 1:
        for g in range(groups):
            sl = slice(g * n, (g + 1) * n)
            top = torch.logsumexp(log_w[sl], 0)
            if bool(torch.isfinite(top)):
                log_w[sl] = log_w[sl] - top
    pooled = float(torch.logsumexp(runs, 0) - math.log(groups)) if groups > 1 else float(runs[0])
    key = torch.where(
        torch.isnan(state.log_tilt), torch.full_like(state.log_tilt, -math.inf), state.log_tilt
    ).view(groups, n)
    best = torch.sort(-key, dim=1, stable=True).indices[:, 0] + torch.arange(groups) * n
    return SampleSet(
        seqs,
        log_w,
        state.cost,
        state.reward if target.reward is not None else None,
        None,
        pooled,
        {
            "num_particles": n,
            "num_runs": groups,
            "log_evidence_runs": runs.tolist(),
            "num_resampling": state.resample_count.tolist(),
            "potential_evaluations": state.evaluations,
            "best_of_n": [seqs[i] for i in best.tolist()],
        },
    )
