"""Shared state for samplers that produce independent draws in batches.

An i.i.d. sampler's state is how many draws remain plus the finished batches
(:class:`IIDState`); its ``step`` draws one batch. ``done`` and ``result`` are shared.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from tiltsample import validation
from tiltsample.results import SampleSet, Selection
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost


class IIDState(NamedTuple):
    """Draws still to make and the batches made so far."""

    target: TiltedTarget
    remaining: int
    batch_size: int
    parts: tuple[SampleSet, ...]


def init_iid(target: TiltedTarget, num_samples: int, batch_size: int | None) -> IIDState:
    """Validated initial state."""
    validation.positive_int("num_samples", num_samples)
    size = num_samples if batch_size is None else validation.positive_int("batch_size", batch_size)
    return IIDState(target, num_samples, min(size, num_samples), ())


def next_batch(state: IIDState) -> int:
    """Size of the next batch."""
    return min(state.batch_size, state.remaining)


def advance(state: IIDState, part: SampleSet) -> IIDState:
    """The state after one more batch."""
    return state._replace(remaining=state.remaining - len(part), parts=(*state.parts, part))


def done(state: IIDState) -> bool:
    """True when every draw is made."""
    return state.remaining <= 0


def num_steps(num_samples: int, batch_size: int | None) -> int:
    """How many batches a run takes."""
    return 1 if batch_size is None else math.ceil(num_samples / batch_size)


def concat(parts: Sequence[SampleSet], meta: dict[str, Any] | None = None) -> SampleSet:
    """Concatenate batches: costs add; evidence estimates combine as a pooled mean.

    Each batch's ``meta["num_proposals"]`` weighs its ``log_evidence`` (a batch with ``m`` proposals
    estimates ``Z`` by their mean weight, so the pooled estimate is the proposal-weighted mean).
    """
    if not parts:
        raise ValueError("no batches to concatenate")
    seqs = [x for p in parts for x in p.sequences]
    log_w = torch.cat([p.log_weights for p in parts])
    cost = Cost()
    for p in parts:
        cost = cost + p.cost
    rewards = (
        torch.cat([p.rewards for p in parts if p.rewards is not None])
        if all(p.rewards is not None for p in parts)
        else None
    )
    log_ref = (
        torch.cat([p.log_reference for p in parts if p.log_reference is not None])
        if all(p.log_reference is not None for p in parts)
        else None
    )
    log_z: float | None = None
    if all(p.log_evidence is not None for p in parts):
        counts = torch.tensor([float(p.meta.get("num_proposals", len(p))) for p in parts])
        values = torch.tensor([float(p.log_evidence) for p in parts], dtype=torch.float64)  # type: ignore[arg-type]
        log_z = float(torch.logsumexp(values + counts.log(), 0) - counts.sum().log())
    selections: list[Selection] | None = None
    if all(p.selections is not None for p in parts):
        selections = [s for p in parts for s in (p.selections or [])]
    out_meta = dict(parts[0].meta)
    out_meta.pop("num_proposals", None)
    if meta:
        out_meta.update(meta)
    out_meta["num_proposals"] = sum(int(p.meta.get("num_proposals", len(p))) for p in parts)
    return SampleSet(seqs, log_w, cost, rewards, log_ref, log_z, out_meta, selections)


def result(state: IIDState) -> SampleSet:
    """All batches as one :class:`SampleSet`."""
    return concat(state.parts)
