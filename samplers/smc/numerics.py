"""Log-space arithmetic shared by the SMC engine: weight updates that keep zero weights at
``-inf`` (never NaN), normalisation, tempering, and the small bookkeeping helpers of a step
(token draws are the decode engine's: :func:`tiltsample.token_laws.draw_tokens`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tiltsample.decoding import rows_to_seqs
from tiltsample.types import Cost, Seq

__all__ = [
    "add_log",
    "cost_delta",
    "log_mean",
    "log_normalise",
    "row_seqs",
    "safe_log_softmax",
    "tempered",
]


def add_log(log_w: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """``log_w + numerator - denominator`` with zero weights kept at ``-inf`` (never NaN).

    A finite weight over a ``-inf`` denominator can only arise for a conditional-SMC reference path
    the proposal cannot produce; it is given weight zero.
    """
    out = log_w + numerator - denominator
    dead = torch.isneginf(log_w) | torch.isneginf(numerator) | torch.isneginf(denominator)
    return torch.where(dead, torch.full_like(out, -math.inf), out)


def cost_delta(after: Cost, before: Cost) -> Cost:
    """``after - before`` for the monotone counters of one session."""
    return Cost(
        after.generated_tokens - before.generated_tokens,
        after.forward_tokens - before.forward_tokens,
        after.model_calls - before.model_calls,
        after.reward_calls - before.reward_calls,
    )


def log_mean(values: Tensor) -> Tensor:
    """``logsumexp(values) - log n`` (``-inf`` when every value is ``-inf``)."""
    return torch.logsumexp(values, 0) - math.log(values.numel())


def row_seqs(session_tokens: Tensor, rows: Tensor, eos: int) -> list[Seq]:
    """The responses held by ``session_tokens[rows]`` (cut after the first EOS)."""
    return rows_to_seqs(session_tokens[rows], eos)


def log_normalise(logits: Tensor) -> Tensor:
    """Row-wise ``logits - logsumexp(logits)`` (a log-softmax written with ``logsumexp``, which
    stays serial on small batches; rows must have a finite entry)."""
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def tempered(log_p: Tensor, temperature: float) -> Tensor:
    """``log softmax(log_p / tau)`` with ``-inf`` kept (same law as
    :func:`tiltsample.decoding.tempered_logprobs`)."""
    return log_p if temperature == 1.0 else log_normalise(log_p / temperature)


def safe_log_softmax(logits: Tensor, fallback: Tensor) -> Tensor:
    """Row-wise log-softmax; rows that are all ``-inf`` use ``fallback`` instead (never NaN)."""
    ok = torch.isfinite(logits).any(dim=1, keepdim=True)
    safe = torch.where(ok, logits, fallback)
    return log_normalise(safe)
