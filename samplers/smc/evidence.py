"""The evidence estimate and the result of an SMC state: ``log Ẑ`` of every run
(``sum_epochs (logsumexp(log w) - log N)``, ``-inf`` for a failed run, never NaN) and the pooled
:class:`~tiltsample.results.SampleSet` (weights normalised per run)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tiltsample.decoding import rows_to_seqs
from tiltsample.results import SampleSet
from tiltsample.samplers.smc.numerics import log_mean
from tiltsample.samplers.smc.state import SMCState

__all__ = ["log_evidence_runs", "result"]


def log_evidence_runs(state: SMCState) -> Tensor:
    """``[G]`` ``log Ẑ`` of every run (``-inf`` for a failed run, never NaN)."""
    n, groups = state.num_particles, state.num_groups
    level = torch.logsumexp(state.log_w.view(groups, n), dim=1) - math.log(n)
    out = state.log_z + level
    return torch.where(torch.isnan(out), torch.full_like(out, -math.inf), out)


def result(state: SMCState, tokens: Tensor | None = None) -> SampleSet:
    """All particles; weights normalised per run when several runs share the state.

    ``tokens`` (``[M, t]``): the particles' tokens, when they are not the session's (one
    target's rows of a state shared by several targets); default ``state.session.tokens()``.
    """
    target = state.target
    n, groups = state.num_particles, state.num_groups
    held = state.session.tokens() if tokens is None else tokens
    seqs = rows_to_seqs(held, target.eos_id)
    runs = log_evidence_runs(state)
    log_w = state.log_w.clone()
    if groups > 1:
        lw = log_w.view(groups, n)
        top = torch.logsumexp(lw, dim=1, keepdim=True)
        log_w = torch.where(torch.isfinite(top), lw - top, lw).reshape(-1)
    pooled = float(log_mean(runs)) if groups > 1 else float(runs[0])
    meta: dict[str, Any] = {
        "num_particles": n,
        "num_runs": groups,
        "log_evidence_runs": runs.tolist(),
        "num_resampling": state.resample_count.tolist(),
        "num_steps": state.steps,
    }
    if state.moves_proposed:
        meta["move_acceptance"] = state.moves_accepted / state.moves_proposed
    return SampleSet(
        seqs,
        log_w,
        state.cost,
        state.reward if target.reward is not None else None,
        state.log_p.clone(),
        pooled,
        meta,
    )
