r"""Particle Gibbs (``particle-gibbs``, a Markov sampler; ``specs/smc.md`` §9).

Iterate: run conditional SMC (:mod:`~tiltsample.samplers.smc.csmc`) with the current state as
the reference; draw the new state among the final particles with probability proportional to
their weights (every row already holds its whole path, so no ancestry is traced back). The kernel
leaves ``pi`` invariant and is uniformly ergodic (Andrieu, Doucet & Holenstein 2010); it mixes
better with more particles and degrades when ``N`` is much smaller than the number of steps
(Andrieu, Lee & Vihola 2018). Random twists are auxiliary variables: they are redrawn along the
reference path at every sweep, a valid Gibbs update of the extended state. All chains run in one
batched session.

Cost
    As CSMC, per sweep.

References
----------
Andrieu, Doucet & Holenstein (2010), *Particle Markov chain Monte Carlo methods*, JRSS B;
Andrieu, Lee & Vihola (2018), Bernoulli; Dang et al., arXiv 2507.08390.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import rows_to_seqs
from tiltsample.proposal import propose
from tiltsample.results import SampleSet
from tiltsample.reward import PrefixPotential
from tiltsample.sampler import ChainRecord, SamplingAlgorithm
from tiltsample.samplers.smc.algorithm import run
from tiltsample.samplers.smc.config import SMCConfig, conditional_config
from tiltsample.samplers.smc.evidence import log_evidence_runs
from tiltsample.samplers.smc.state import SMCState, done, init
from tiltsample.samplers.smc.step import kernel_from_config
from tiltsample.samplers.smc.twists.base import Twist
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "INITS",
    "PGInfo",
    "PGState",
    "particle_gibbs_init",
    "particle_gibbs_kernel",
    "particle_gibbs_sampler",
    "pg_done",
    "pg_result",
    "record",
]

INITS = ("proposal", "smc")


class PGState(NamedTuple):
    """The current state of every chain."""

    target: TiltedTarget
    sequences: list[Seq]
    log_reference: Tensor
    log_tilt: Tensor
    reward: Tensor
    log_evidence: Tensor
    """``[C]`` ``log Ẑ_CSMC`` of the last sweep (NaN before the first)."""
    changed: Tensor
    """``[C]`` bool: the last sweep moved the chain to a different sequence."""
    steps_done: int
    num_steps: int
    cost: Cost


class PGInfo(NamedTuple):
    cost: Cost
    changed: Tensor
    log_evidence: Tensor


def _pg_state(
    target: TiltedTarget,
    seqs: list[Seq],
    log_ref: Tensor,
    log_tilt: Tensor,
    reward: Tensor,
    num_steps: int,
    cost: Cost,
) -> PGState:
    c = len(seqs)
    return PGState(
        target,
        seqs,
        log_ref,
        log_tilt,
        reward,
        torch.full((c,), math.nan, dtype=torch.float64),
        torch.ones(c, dtype=torch.bool),
        0,
        num_steps,
        cost,
    )


def _no_reward(c: int) -> Tensor:
    return torch.full((c,), math.nan, dtype=torch.float64)


def particle_gibbs_init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    num_steps: int = 50,
    num_particles: int = 8,
    initial: str | Sequence[Seq] = "proposal",
    smc_params: dict[str, Any] | SMCConfig | None = None,
) -> PGState:
    """Initial chain states.

    ``initial="proposal"``: one draw of ``p_ref`` (overdispersed; may lie outside the support,
    which the first sweeps leave); ``"smc"``: one particle ∝ weight from an unconditional SMC run
    per chain (``smc_params`` without their ``resampling``: the default scheme); or explicit
    complete responses, one per chain.
    """
    c = validation.positive_int("num_samples", num_samples)
    validation.positive_int("num_steps", num_steps)
    if isinstance(smc_params, SMCConfig):
        smc_params = smc_params.as_params()
    params = dict(smc_params or {})
    if isinstance(initial, str):
        validation.one_of("initial", initial, INITS)
        if initial == "proposal":
            props = propose(target, generator, c, float(params.get("temperature", 1.0)))
            reward = props.reward if props.reward is not None else _no_reward(c)
            return _pg_state(
                target,
                props.sequences,
                props.log_reference,
                props.log_tilt,
                reward,
                num_steps,
                props.cost,
            )
        params.pop("resampling", None)
        state = run(target, num_particles=num_particles, generator=generator, num_runs=c, **params)
        picked = _pick(state, generator)
        return _state_from_rows(target, state, picked, num_steps, state.cost)
    seqs = target.check_sequences(list(initial), name="initial")
    if len(seqs) != c:
        raise ValueError(f"initial must hold one response per chain ({c}), got {len(seqs)}")
    log_ref = target.log_reference(seqs)
    scores = target.evaluate_tilt(seqs, log_reference=log_ref)
    reward = scores.reward if scores.reward is not None else _no_reward(c)
    return _pg_state(target, seqs, log_ref, scores.log_tilt, reward, num_steps, scores.cost)


def _pick(state: SMCState, generator: torch.Generator) -> Tensor:
    """One row per run, drawn ∝ the final weights (the reference row if every weight is 0)."""
    n, groups = state.num_particles, state.num_groups
    picked = torch.empty(groups, dtype=torch.long)
    for g in range(groups):
        lw = state.log_w[g * n : (g + 1) * n]
        if not bool(torch.isfinite(lw).any()):
            picked[g] = g * n
            continue
        k = torch.multinomial(torch.exp(lw - torch.logsumexp(lw, 0)), 1, generator=generator)
        picked[g] = g * n + int(k)
    return picked


def _state_from_rows(
    target: TiltedTarget, state: SMCState, picked: Tensor, num_steps: int, cost: Cost
) -> PGState:
    """The chain states of the rows ``picked`` of a finished SMC state."""
    seqs_all = rows_to_seqs(state.session.tokens()[picked], target.eos_id)
    return _pg_state(
        target,
        seqs_all,
        state.log_p[picked],
        state.log_psi[picked],
        state.reward[picked],
        num_steps,
        cost,
    )


def particle_gibbs_kernel(
    num_particles: int = 8, *, config: SMCConfig | None = None, **smc_params: Any
) -> Any:
    """One particle-Gibbs sweep (a full CSMC run per chain, then a draw ∝ final weights).

    The CSMC is configured by ``config`` or by ``smc_params`` (the parameters of
    :func:`tiltsample.samplers.smc.sampler`), under the conditional rules of
    :func:`~tiltsample.samplers.smc.config.conditional_config`.
    """
    n = validation.positive_int("num_particles", num_particles)
    if config is not None and smc_params:
        raise TypeError(f"pass config= or SMC parameters, not both (got {sorted(smc_params)})")
    step = kernel_from_config(conditional_config(smc_params if config is None else config))

    def pg_step(generator: torch.Generator, state: PGState) -> tuple[PGState, PGInfo]:
        c = len(state.sequences)
        inner = init(
            state.target,
            generator=generator,
            num_particles=n,
            num_groups=c,
            reference=state.sequences,
        )
        while not done(inner):
            inner, _ = step(generator, inner)
        picked = _pick(inner, generator)
        new = _state_from_rows(state.target, inner, picked, state.num_steps, inner.cost)
        changed = torch.tensor(
            [a != b for a, b in zip(new.sequences, state.sequences, strict=True)],
            dtype=torch.bool,
        )
        log_z = log_evidence_runs(inner)
        out = new._replace(
            log_evidence=log_z,
            changed=changed,
            steps_done=state.steps_done + 1,
            cost=state.cost + inner.cost,
        )
        return out, PGInfo(inner.cost, changed, log_z)

    return pg_step


def pg_done(state: PGState) -> bool:
    """True after ``num_steps`` sweeps."""
    return state.steps_done >= state.num_steps


def record(state: PGState) -> ChainRecord:
    """Current states with ``log_density``, ``reward``, ``changed`` and ``log_evidence``."""
    log_density = torch.where(
        torch.isneginf(state.log_tilt), state.log_tilt, state.log_reference + state.log_tilt
    )
    stats = {
        "log_density": log_density,
        "reward": state.reward,
        "changed": state.changed.to(torch.float64),
        "log_evidence": state.log_evidence,
    }
    if bool(torch.isnan(state.reward).all()):
        del stats["reward"]
    return ChainRecord(list(state.sequences), stats)


def pg_result(state: PGState) -> SampleSet:
    """The final state of every chain (equally weighted); a chain still in a state of zero
    target density (it never found the support) is a failed draw (log-weight ``-inf``)."""
    reward = None if state.target.reward is None else state.reward
    failed = torch.isneginf(state.log_tilt) | torch.isneginf(state.log_reference)
    return SampleSet(
        list(state.sequences),
        torch.where(failed, -math.inf, 0.0).to(torch.float64),
        state.cost,
        reward,
        state.log_reference,
        None,
        {"num_steps": state.steps_done},
    )


def particle_gibbs_sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_steps: int = 50,
    num_particles: int = 8,
    initial: str | Sequence[Seq] = "proposal",
    twist: str | Twist = "prefix",
    potential: PrefixPotential | None = None,
    proposal: str = "reference",
    temperature: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "multinomial",
) -> SamplingAlgorithm:
    """Particle Gibbs: ``num_samples`` chains of ``num_steps`` CSMC sweeps with ``num_particles``.

    ``sample("particle-gibbs", ...)`` returns the final states; ``run_chains`` keeps every sweep
    (statistics ``log_density``, ``reward``, ``changed``, ``log_evidence``). Other parameters as in
    :func:`tiltsample.samplers.smc.sampler`.
    """
    num_steps = validation.positive_int("num_steps", num_steps)
    validation.positive_int("num_samples", num_samples)
    smc_params: dict[str, Any] = {
        "twist": twist,
        "potential": potential,
        "proposal": proposal,
        "temperature": temperature,
        "block_size": block_size,
        "ess_threshold": ess_threshold,
        "resampling": resampling,
    }
    validation.positive_int("num_particles", num_particles)
    config = conditional_config(smc_params)
    step = particle_gibbs_kernel(num_particles, config=config)
    if not isinstance(initial, str):
        target.check_sequences(list(initial), name="initial")
    else:
        validation.one_of("initial", initial, INITS)
    return SamplingAlgorithm(
        name="particle-gibbs",
        kind="markov",
        init=lambda g: particle_gibbs_init(
            target,
            generator=g,
            num_samples=num_samples,
            num_steps=num_steps,
            num_particles=num_particles,
            initial=initial,
            smc_params=config,
        ),
        step=step,
        done=pg_done,
        result=pg_result,
        params={
            "num_steps": num_steps,
            "num_particles": num_particles,
            "initial": initial,
            **smc_params,
        },
        record=record,
        total_steps=num_steps,
    )
