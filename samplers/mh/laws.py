"""Per-token laws at one decoding position: the proposal ``q_tau``, the target's ``l`` and the
entropy ``H`` on the chosen support (``specs/mcmc.md`` §2.4), as a law of the decode engine
(:data:`tiltsample.token_laws.Law`)."""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.samplers.mh.config import MHConfig
from tiltsample.token_laws import Law

__all__ = ["TokenLaw", "proposal_law", "token_law"]


class TokenLaw(NamedTuple):
    """The laws at one decoding position, all ``[R, V]`` / ``[R]`` float64 (the fields of
    :class:`tiltsample.token_laws.TokenLaw`, with an entropy always)."""

    log_q: Tensor
    """``log q_tau``: the law tokens are drawn from (support-restricted, tempered)."""
    log_p: Tensor
    """``log p_ref`` at temperature 1 over the full vocabulary (the target's ``l``)."""
    entropy: Tensor
    """Shannon entropy of ``p_ref`` restricted and renormalised to the support (temperature 1)."""


def _log_normalise(x: Tensor) -> Tensor:
    """``x - logsumexp(x)`` over the last dimension (rows have a finite entry; ``-inf`` kept).

    Used instead of ``torch.log_softmax``, which costs ~10 ms per call on tiny tensors when the
    intra-op thread pool has to wake up on a loaded machine.
    """
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def token_law(log_p: Tensor, temperature: float, support: str, top_k: int) -> TokenLaw:
    """Proposal law, target log-probs and entropy from raw next-token log-probs ``[R, V]``.

    ``support="full"``: ``q = softmax(log p / tau)`` over the whole vocabulary (at ``tau = 1``
    exactly ``log p``, so the QAlign cancellation is exact; otherwise the same law as
    :func:`tiltsample.decoding.tempered_logprobs`). ``support="top_k"``: ``q`` is the
    tempered law renormalised on the ``top_k`` most likely tokens (``torch.topk``), ``l`` stays the
    full-softmax log-prob and ``H`` is the entropy of ``p`` renormalised on the same set.
    """
    log_p = log_p.to(torch.float64)
    if support == "full":
        log_q = log_p if temperature == 1.0 else _log_normalise(log_p / temperature)
        log_support = log_p
    else:
        k = min(top_k, log_p.shape[-1])
        keep = torch.zeros_like(log_p, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(log_p, k, dim=-1).indices, True)
        masked = torch.where(keep, log_p, torch.full_like(log_p, -math.inf))
        log_support = _log_normalise(masked)
        log_q = log_support if temperature == 1.0 else _log_normalise(masked / temperature)
    finite = torch.isfinite(log_support)
    plogp = torch.where(finite, torch.exp(log_support) * log_support, 0.0)
    entropy = -plogp.sum(dim=-1)
    return TokenLaw(log_q, log_p, entropy)


def proposal_law(config: MHConfig) -> Law:
    """The decode engine's law for ``config``: :func:`token_law` at its proposal temperature,
    support and ``top_k``."""
    return partial(
        token_law,
        temperature=config.proposal_temperature,
        support=config.support,
        top_k=config.top_k,
    )
