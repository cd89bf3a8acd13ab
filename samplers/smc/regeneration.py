r"""The moves' proposal (``specs/smc.md`` §8): the EOS-free law ``q'`` a resample-move
regenerates a suffix from (:func:`move_log_q`), and the regeneration itself
(:func:`regenerate`), decoded by the decode engine one position at a time
(:func:`~tiltsample.decode_engine.decode_step`, drawn with the caller's generator).
:mod:`~tiltsample.samplers.smc.moves` decides and applies the moves."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.decode_engine import Step, decode_step
from tiltsample.policy import DecodeSession
from tiltsample.samplers.smc.numerics import tempered
from tiltsample.token_laws import TokenLaw, entropy

__all__ = ["Suffix", "gather_move_log_q", "move_log_q", "regenerate"]


def move_log_q(logp_all: Tensor, temperature: float, eos: int) -> Tensor:
    """``log q'`` ``[B, V]`` of the moves' proposal: ``p_ref`` at ``temperature`` with EOS removed
    and the rest renormalised (rows where only EOS is possible are all ``-inf``).

    A move keeps an unfinished particle unfinished, so it regenerates from this law; the stored
    ``tok_log_q_move`` holds it for every token of an unfinished prefix (the reverse move).
    """
    log_q = tempered(logp_all, temperature).clone()
    log_q[:, eos] = -math.inf
    total = torch.logsumexp(log_q, dim=1, keepdim=True)
    return torch.where(torch.isfinite(total), log_q - total, torch.full_like(log_q, -math.inf))


def gather_move_log_q(logp_all: Tensor, tok: Tensor, temperature: float, eos: int) -> Tensor:
    """``log q'(tok)`` per row (0 for EOS, which a move never proposes)."""
    lq = move_log_q(logp_all, temperature, eos).gather(1, tok[:, None]).squeeze(1)
    return torch.where(tok == eos, torch.zeros_like(lq), lq)


class Suffix(NamedTuple):
    """Regenerated suffixes ``x'_{j:t}`` of a batch of rows (all cut at ``j``)."""

    twin: DecodeSession
    """A fork of the session holding the proposals (rows in batch order)."""
    tokens: Tensor
    """``[a, t - j]`` proposed tokens (never EOS)."""
    log_p: Tensor
    log_q: Tensor
    entropy: Tensor
    """``[a, t - j]`` per-token ``log p_ref``, ``log q'`` and entropy."""
    stuck: Tensor
    """``[a]`` bool: the proposal reached a prefix where only EOS is possible (rejected)."""
    generated: int
    """Tokens drawn (``a · (t - j)``)."""


def _move_law(logp_all: Tensor, temperature: float, eos: int) -> tuple[TokenLaw, Tensor]:
    """The law a move regenerates a token from (:func:`move_log_q`, with the entropy of
    ``p_ref`` for the entropy-jump cut law) and ``[R]`` bool ``ok``: the rows where a non-EOS
    token is possible. A row that is not ``ok`` draws a point mass on a non-EOS token
    (``log q = 0``; the proposal is rejected)."""
    law = move_log_q(logp_all, temperature, eos)
    ok = torch.isfinite(law).any(dim=1)
    fallback = torch.full_like(law, -math.inf)
    fallback[:, (eos + 1) % law.shape[1]] = 0.0  # any non-EOS token: the row is rejected
    log_q = torch.where(ok[:, None], law, fallback)
    return TokenLaw(log_q, logp_all, entropy(logp_all)), ok


def _move_tick(
    twin: DecodeSession,
    temperature: float,
    eos: int,
    position: int,
    cap: int,
    generator: torch.Generator,
) -> tuple[Step, Tensor]:
    """One position of every row of ``twin`` by the decode engine (:func:`decode_step`): drawn
    from :func:`_move_law` with ``generator`` (every row is live, none is forced), fed to the
    session; returns the step and the rows' ``ok`` (see :func:`_move_law`)."""
    logp_all = twin.logprobs().to(torch.float64)
    laws, ok = _move_law(logp_all, temperature, eos)
    rows = twin.batch_size
    out = decode_step(
        logp_all,
        lambda _lp: laws,
        eos_id=eos,
        live=torch.ones(rows, dtype=torch.bool),
        position=torch.full((rows,), position, dtype=torch.long),
        cap=torch.full((rows,), cap, dtype=torch.long),
        generator=generator,
        record_entropy=True,
    )
    twin.extend(out.fed)
    return out, ok


def regenerate(
    session: DecodeSession,
    active: Tensor,
    j: int,
    temperature: float,
    eos: int,
    generator: torch.Generator,
) -> Suffix:
    """Draw ``x'_{j:t}`` from the EOS-free proposal ``q'`` for the rows ``active`` in a fork of
    ``session`` cut back to ``j`` (the session itself is left as it is): one
    :func:`_move_tick` per position."""
    t = session.length
    a, width = active.numel(), t - j
    twin = session.fork()
    twin.select(active)
    twin.truncate(width)
    stuck = torch.zeros(a, dtype=torch.bool)
    steps: list[Step] = []
    for s in range(width):
        out, ok = _move_tick(twin, temperature, eos, j + s, t, generator)
        stuck |= ~ok
        steps.append(out)
    return Suffix(
        twin,
        torch.stack([out.tokens for out in steps], dim=1),
        torch.stack([out.log_p for out in steps], dim=1),
        torch.stack([out.log_q for out in steps], dim=1),
        torch.stack([out.entropy for out in steps if out.entropy is not None], dim=1),
        stuck,
        sum(int(out.generated.sum()) for out in steps),
    )
