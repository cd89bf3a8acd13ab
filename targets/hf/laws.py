"""The law a tempered, truncated (top-k / top-p) sampler actually draws from."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tiltsample.decoding import tempered_logprobs

__all__ = ["filtered_logprobs"]


def filtered_logprobs(
    log_p: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    r"""The law a tempered, truncated sampler actually draws from, as normalised log-probs.

    ``q(v) ∝ exp(log p(v) / tau)`` restricted to the ``top_k`` most likely tokens and then to the
    smallest set whose mass reaches ``top_p`` (nucleus), renormalised. Ties at the top-k boundary
    are broken by token id (``torch.topk`` order is not used), so the law is a deterministic
    function of ``log_p``. With ``top_k=None`` and ``top_p=None`` (the default) nothing is
    truncated: this is what every sampler of the library uses.
    """
    log_q = tempered_logprobs(log_p.to(torch.float64), temperature)
    vocab = log_q.shape[-1]
    if top_k is not None and top_k < vocab:
        # stable descending sort: equal values keep ascending token-id order
        order = torch.sort(log_q, dim=-1, descending=True, stable=True).indices
        drop = order[..., top_k:]
        log_q = log_q.scatter(-1, drop, -math.inf)
        log_q = torch.log_softmax(log_q, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_lq, order = torch.sort(log_q, dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_lq.exp(), dim=-1) - sorted_lq.exp()
        drop_sorted = mass_before >= top_p  # keep a token while the mass *before* it is < top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        log_q = torch.log_softmax(log_q.masked_fill(drop, -math.inf), dim=-1)
    return log_q
