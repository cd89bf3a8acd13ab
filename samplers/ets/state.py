"""ETS state and per-step info, the lock-step batch of chains in flight, and ``init``, ``done``
and ``result`` of the sampler shape; a finished batch becomes a :class:`SampleSet`."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import iid, validation
from tiltsample.diffusion import initial_states, is_masked_diffusion
from tiltsample.policy import DecodeSession, open_session
from tiltsample.results import SampleSet, Selection
from tiltsample.samplers.ets.config import ETSConfig, guidance_horizon, resolve_block_size
from tiltsample.samplers.ets.scoring import AnswerCache, Scorer
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "Batch",
    "ETSInfo",
    "ETSState",
    "cost_delta",
    "done",
    "finish_batch",
    "init",
    "result",
    "start_batch",
]


class Batch(NamedTuple):
    """The chains of one batch, in flight."""

    n: int
    live: list[int]
    """Batch-local indices of the running chains, in session-row / state-row order."""
    session: DecodeSession | None
    proposal_session: DecodeSession | None
    states: Tensor | None
    """Masked diffusion: ``[len(live), L]`` current states."""
    guidance_step: int
    log_reference: Tensor
    outputs: list[Seq | None]
    rewards: Tensor
    failed: Tensor
    failed_at: list[int | None]
    """Per chain: the 1-based guidance step of its first failure (all weights zero), or None."""
    selections: list[list[Selection]]
    caches: list[AnswerCache] | None
    first_log_weights: Tensor | None
    cost: Cost
    counters: dict[str, int]
    chain_counts: Tensor | None = None
    """Autoregressive lock step: ``[n, 3]`` long, per chain the candidate tokens, rollout tokens
    and rollouts so far (the per-chain split of ``counters``; None where not tracked)."""


class ETSState(NamedTuple):
    """Chains still to start, the batch in flight, and the finished batches."""

    target: TiltedTarget
    remaining: int
    batch_size: int
    batch: Batch | None
    parts: tuple[SampleSet, ...]
    engine: Any = None
    """``batching="continuous"``: the :class:`~tiltsample.samplers.ets.continuous.ContinuousETS`
    engine in flight (None otherwise)."""


class ETSInfo(NamedTuple):
    """What one guidance step (of every running chain of the batch) reports."""

    cost: Cost
    guidance_step: int
    """1-based index of the step just taken."""
    selection_probs: Tensor
    """``[n_live, M]`` the probabilities each chain's index was drawn from."""
    log_weights: Tensor
    """``[n_live, M]`` candidate log-weights ``log Ê + log p/q`` (``-inf`` = weight 0)."""
    chosen: Tensor
    """``[n_live]`` chosen candidate per chain."""
    complete: Tensor
    """``[n_live, M]`` which candidates were complete (scored exactly)."""
    clipped: int
    """Rollouts whose IS log-ratio was clipped at this step."""


def cost_delta(after: Cost, before: Cost) -> Cost:
    """The cost spent between two readings of a running total: ``after − before``."""
    return Cost(
        after.generated_tokens - before.generated_tokens,
        after.forward_tokens - before.forward_tokens,
        after.model_calls - before.model_calls,
        after.reward_calls - before.reward_calls,
    )


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    batch_size: int | None = None,
) -> ETSState:
    """No chain started yet (chains start batch by batch in ``step``)."""
    validation.generator("generator", generator)
    validation.positive_int("num_samples", num_samples)
    size = num_samples if batch_size is None else validation.positive_int("batch_size", batch_size)
    return ETSState(target, num_samples, min(size, num_samples), None, ())


def start_batch(state: ETSState, cfg: ETSConfig, session: DecodeSession | None = None) -> Batch:
    """The next batch of chains, nothing generated yet (its sessions or states opened).

    ``session`` (autoregressive): the batch's rows, already opened (e.g. a multi-prompt session
    of chains of several targets); default: a session of ``n`` rows after the target's prompt.
    """
    target = state.target
    n = min(state.batch_size, state.remaining)
    proposal_session = states = None
    if is_masked_diffusion(target.policy):
        states = initial_states(target.policy, n)  # type: ignore[arg-type]
    else:
        if session is None:
            session = open_session(target.policy, target.prompt, n)
        if cfg.proposal is not None and cfg.potential is None:
            proposal_session = open_session(cfg.proposal, target.prompt, n)
    sc = cfg.reward_mode == "self-consistency"
    return Batch(
        n=n,
        live=list(range(n)),
        session=session,
        proposal_session=proposal_session,
        states=states,
        guidance_step=0,
        log_reference=torch.zeros(n, dtype=torch.float64),
        outputs=[None] * n,
        rewards=torch.full((n,), math.nan, dtype=torch.float64),
        failed=torch.zeros(n, dtype=torch.bool),
        failed_at=[None] * n,
        selections=[[] for _ in range(n)],
        caches=[AnswerCache.empty() for _ in range(n)] if sc else None,
        first_log_weights=None,
        cost=Cost(),
        counters={
            "candidate_tokens": 0,
            "rollout_tokens": 0,
            "rollouts": 0,
            "clipped": 0,
            "denoiser_passes": 0,
        },
        chain_counts=None if session is None else torch.zeros((n, 3), dtype=torch.long),
    )


def finish_batch(cfg: ETSConfig, scorer: Scorer, target: TiltedTarget, batch: Batch) -> SampleSet:
    """The batch's draws as a SampleSet."""
    n, m = batch.n, cfg.num_candidates
    outputs: list[Seq] = [x for x in batch.outputs if x is not None]
    if len(outputs) != n:
        raise RuntimeError("ETS batch finished with a chain that has no complete output")
    rewards: Tensor | None = batch.rewards
    log_ref: Tensor | None = batch.log_reference
    diffusion = is_masked_diffusion(target.policy)
    cost = batch.cost
    if cfg.output == "vote":
        assert batch.caches is not None
        voted = []
        for x, cache in zip(outputs, batch.caches, strict=True):
            best, _ = cache.majority()
            voted.append(cache.first[best] if best is not None else x)
        outputs = voted
        log_ref = None
    if diffusion or log_ref is None:
        log_ref = (
            target.log_reference(outputs)
            if callable(getattr(target.policy, "sequence_logprob", None))
            else None
        )
    if cfg.reward_mode == "fixed" and target.reward is None:
        rewards = None
    log_w = torch.where(batch.failed, -math.inf, 0.0).to(torch.float64)
    log_z = None
    if cfg.reward_mode == "fixed" and batch.first_log_weights is not None:
        lw = batch.first_log_weights
        log_z = float(torch.logsumexp(lw.flatten(), 0) - math.log(lw.numel()))
    num_steps = math.ceil(guidance_horizon(target) / resolve_block_size(target, cfg.block_size))
    meta: dict[str, Any] = {
        "num_proposals": n * m,
        "failed": int(batch.failed.sum()),
        "failed_at": batch.failed_at,
        "num_guidance_steps": num_steps,
        "guidance_steps": [len(s) for s in batch.selections] if cfg.record_selections else None,
        **batch.counters,
    }
    if cfg.record_selections:
        meta["selections"] = batch.selections
    if batch.caches is not None:
        meta["answer_caches"] = [c.as_dict() for c in batch.caches]
    final = None
    if cfg.record_selections and num_steps == 1 and cfg.output == "chain":
        final = [s[-1] for s in batch.selections]
    return SampleSet(outputs, log_w, cost, rewards, log_ref, log_z, meta, final)


def done(state: ETSState) -> bool:
    """True when every chain has finished."""
    return state.remaining <= 0 and state.batch is None and state.engine is None


def result(state: ETSState) -> SampleSet:
    """All draws; per-draw lists in ``meta`` are concatenated and counters summed."""
    if not state.parts:
        raise ValueError("no chain has finished yet")
    out = iid.concat(state.parts)
    meta = dict(out.meta)
    for key in ("candidate_tokens", "rollout_tokens", "rollouts", "clipped", "denoiser_passes"):
        meta[key] = sum(int(p.meta.get(key, 0)) for p in state.parts)
    meta["failed"] = sum(int(p.meta.get("failed", 0)) for p in state.parts)
    for key in ("selections", "answer_caches", "guidance_steps", "failed_at"):
        if all(p.meta.get(key) is not None for p in state.parts):
            meta[key] = [v for p in state.parts for v in p.meta[key]]
    meta["clipped_fraction"] = meta["clipped"] / meta["rollouts"] if meta["rollouts"] else 0.0
    return SampleSet(
        out.sequences,
        out.log_weights,
        out.cost,
        out.rewards,
        out.log_reference,
        out.log_evidence,
        meta,
        out.selections,
    )
