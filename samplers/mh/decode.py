"""Suffix decoding: extend the rows of a decode session from ``q_tau`` to EOS or each row's cap,
recording ``l``, ``g`` and ``H`` per token — in lock-step over equal-length rows (with teacher
forcing) or over ragged rows (finished rows parked out of the batch)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.policy import DecodeSession, append_rows
from tiltsample.samplers.mh.config import MHConfig
from tiltsample.samplers.mh.laws import TokenLaw, token_law

__all__ = ["Slot", "Suffix", "decode_ragged", "decode_rows", "empty_suffix"]


class Suffix(NamedTuple):
    """Suffixes decoded for ``R`` rows, with their per-token laws."""

    tokens: Tensor  # [R, m] long, EOS-padded
    ell: Tensor  # [R, m] float64, 0-padded
    g: Tensor
    entropy: Tensor
    length: Tensor  # [R] tokens each row received
    generated: int  # sampled (and forced-EOS) tokens, teacher-forced ones excluded


class Slot:
    """A decode session whose rows hold the current states of some chains (grouped batching)."""

    __slots__ = ("serial", "session")

    def __init__(self, session: DecodeSession, serial: int) -> None:
        self.session = session
        self.serial = serial


def empty_suffix(rows: int) -> Suffix:
    """``rows`` empty suffixes (nothing decoded)."""
    f = torch.zeros((rows, 0), dtype=torch.float64)
    return Suffix(
        torch.zeros((rows, 0), dtype=torch.long), f, f, f, torch.zeros(rows, dtype=torch.long), 0
    )


def decode_rows(
    session: DecodeSession,
    generator: torch.Generator,
    *,
    caps: Tensor,
    eos_id: int,
    config: MHConfig,
    force_eos: Tensor | bool,
    forced: Tensor | None = None,
    forced_until: Tensor | None = None,
    start: Tensor | None = None,
    hard_cap: int | None = None,
) -> Suffix:
    """Extend every row of ``session`` from its length to EOS or its own cap ``caps[r]``.

    ``start[r]`` is row ``r``'s length (ragged sessions; default: ``session.length`` for all).
    With ``hard_cap``, a row that reaches ``caps[r] == hard_cap`` without EOS while other rows
    still decode is fed EOS instead of its last token (the recorded suffix keeps the token): the
    session then never asks the policy for a law past the target's cap, which a policy need not
    define. That position of the session row is never read again (later cuts lie below it and a
    chain at the target's cap is never extended).

    Rows are teacher-forced with ``forced[r, t - start]`` while ``t < forced_until[r]`` (their
    stats are recorded, their tokens not counted as generated). A row with ``force_eos[r]`` (the
    ``truncation="condition"`` rule) reaching position ``cap - 1`` gets EOS with ``g = 0`` and
    ``l = log p(EOS | x_<cap)`` (a teacher-forced EOS there is treated the same way). A row that
    stops at its cap without EOS is padded with EOS in the session (its tokens past the cap are
    never read: the next use truncates below them).
    """
    rows = session.batch_size
    if rows == 0:
        return empty_suffix(0)
    if start is None:
        start = torch.full((rows,), session.length, dtype=torch.long)
    live = caps > start
    steps = int((caps - start).max())
    force_rows = torch.as_tensor(force_eos, dtype=torch.bool).expand(rows)
    toks: list[Tensor] = []
    ells: list[Tensor] = []
    gs: list[Tensor] = []
    hs: list[Tensor] = []
    new_len = torch.zeros(rows, dtype=torch.long)
    generated = 0
    eos = torch.full((rows,), eos_id, dtype=torch.long)
    for step in range(steps):
        if not bool(live.any()):
            break
        t = start + step
        law = token_law(
            session.logprobs(), config.proposal_temperature, config.support, config.top_k
        )
        tok, g, is_forced = _draw_forced(
            generator, law, t, step, caps, force_rows, forced, forced_until, eos
        )
        ell = law.log_p.gather(1, tok[:, None]).squeeze(1)
        zero = torch.zeros_like(ell)
        toks.append(torch.where(live, tok, eos))
        ells.append(torch.where(live, ell, zero))
        gs.append(torch.where(live, g, zero))
        hs.append(torch.where(live, law.entropy, zero))
        new_len += live.long()
        generated += int((live & ~is_forced).sum())
        fed = torch.where(live, tok, eos)
        if hard_cap is not None:
            fed = torch.where(live & (t + 1 == caps) & (caps == hard_cap), eos, fed)
        session.extend(fed)
        live = live & (tok != eos_id) & (t + 1 < caps)
    if not toks:
        return empty_suffix(rows)
    return Suffix(
        torch.stack(toks, 1),
        torch.stack(ells, 1),
        torch.stack(gs, 1),
        torch.stack(hs, 1),
        new_len,
        generated,
    )


def decode_ragged(
    session: DecodeSession,
    generator: torch.Generator,
    *,
    start: Tensor,
    caps: Tensor,
    eos_id: int,
    config: MHConfig,
    force_eos: bool,
    hard_cap: int,
    shrink_below: float = 0.5,
    min_rows: int = 8,
) -> tuple[Suffix, DecodeSession]:
    """Ragged batching: extend row ``r`` (of length ``start[r]``) to EOS or ``caps[r]``, all rows
    in lock-step, and return the suffixes and the session holding the extended rows.

    Same law as :func:`decode_rows` (one draw per live row and position from ``q_tau``; EOS
    forced at ``cap - 1`` with ``force_eos``). Finished rows leave the decoding batch: when at
    most ``shrink_below`` of its rows are live (and it has ``>= min_rows`` rows), the finished
    ones are parked in a fork (``select``) and come back at the end
    (:func:`~tiltsample.policy.append_rows`, then ``select`` to restore the row order), so forward
    calls push mostly new tokens instead of padding.
    """
    rows = session.batch_size
    if rows == 0:
        return empty_suffix(0), session
    live = caps > start
    steps = int((caps - start).max())
    width = max(steps, 0)
    toks = torch.full((rows, width), eos_id, dtype=torch.long)
    ells = torch.zeros((rows, width), dtype=torch.float64)
    gs = torch.zeros((rows, width), dtype=torch.float64)
    hs = torch.zeros((rows, width), dtype=torch.float64)
    new_len = torch.zeros(rows, dtype=torch.long)
    generated = 0
    members = torch.arange(rows)  # original index of every row of the decoding session
    parked: list[tuple[DecodeSession, Tensor]] = []
    for step in range(steps):
        if not bool(live[members].any()):
            break
        if int(members.numel()) >= min_rows:
            members = _park(session, live, members, parked, shrink_below)
        mine = live[members]
        t = start[members] + step
        cap = caps[members]
        law = token_law(
            session.logprobs(), config.proposal_temperature, config.support, config.top_k
        )
        tok = _sample(generator, law.log_q)
        g = law.log_q.gather(1, tok[:, None]).squeeze(1)
        if force_eos:
            at_cap = t == cap - 1
            tok = torch.where(at_cap, torch.full_like(tok, eos_id), tok)
            g = torch.where(at_cap, torch.zeros_like(g), g)
        ell = law.log_p.gather(1, tok[:, None]).squeeze(1)
        keep = mine
        idx = members[keep]
        toks[idx, step] = tok[keep]
        ells[idx, step] = ell[keep]
        gs[idx, step] = g[keep]
        hs[idx, step] = law.entropy[keep]
        new_len[idx] += 1
        generated += int(keep.sum())
        fed = torch.where(keep, tok, torch.full_like(tok, eos_id))
        # a row at the target's cap is fed EOS: the policy need not define a law past it (that
        # position of the session row is never read again)
        fed = torch.where(keep & (t + 1 == cap) & (cap == hard_cap), eos_id, fed)
        session.extend(fed)
        live[members] = keep & (tok != eos_id) & (t + 1 < cap)
    session = _unpark(session, members, parked)
    width = int(new_len.max()) if rows else 0
    suf = Suffix(toks[:, :width], ells[:, :width], gs[:, :width], hs[:, :width], new_len, generated)
    return suf, session


def _sample(generator: torch.Generator, log_q: Tensor) -> Tensor:
    """One draw per row of normalised log-probs ``[R, V]`` (``exp``, not ``softmax``: see
    :mod:`~tiltsample.samplers.mh.laws`)."""
    return torch.multinomial(torch.exp(log_q), 1, generator=generator).squeeze(1)


def _draw_forced(
    generator: torch.Generator,
    law: TokenLaw,
    t: Tensor,
    step: int,
    caps: Tensor,
    force_rows: Tensor,
    forced: Tensor | None,
    forced_until: Tensor | None,
    eos: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """One position of :func:`decode_rows`: the token of every row (drawn from ``q_tau``,
    teacher-forced below ``forced_until`` or EOS forced at ``cap - 1``), its ``g`` and whether
    it was teacher-forced."""
    rows = int(t.numel())
    tok = _sample(generator, law.log_q)
    g = law.log_q.gather(1, tok[:, None]).squeeze(1)
    is_forced = torch.zeros(rows, dtype=torch.bool)
    if forced is not None and forced_until is not None:
        is_forced = t < forced_until
        if bool(is_forced.any()):
            col = min(step, forced.shape[1] - 1)
            tok = torch.where(is_forced, forced[:, col], tok)
            g = law.log_q.gather(1, tok[:, None]).squeeze(1)
    at_cap = force_rows & (t == caps - 1)
    if bool(at_cap.any()):
        # the forced EOS is the length convention, not a draw: exempt from support="top_k"
        # (l from the full softmax; the documented law, docs/samplers/mcmc.md "Support")
        tok = torch.where(at_cap & ~is_forced, eos, tok)
        g = torch.where(at_cap, torch.zeros_like(g), law.log_q.gather(1, tok[:, None]).squeeze(1))
    return tok, g, is_forced


def _park(
    session: DecodeSession,
    live: Tensor,
    members: Tensor,
    parked: list[tuple[DecodeSession, Tensor]],
    shrink_below: float,
) -> Tensor:
    """Park the finished rows of ``session`` in a fork (appended to ``parked`` with their
    original indices) when at most ``shrink_below`` of its rows are live; return the original
    indices of the rows left in ``session``."""
    mine = live[members]
    n = int(members.numel())
    if int(mine.sum()) > shrink_below * n:
        return members
    gone = (~mine).nonzero().flatten()
    piece = session.fork()
    piece.select(gone)
    parked.append((piece, members[gone]))
    session.select(mine.nonzero().flatten())
    return members[mine]


def _unpark(
    session: DecodeSession, members: Tensor, parked: list[tuple[DecodeSession, Tensor]]
) -> DecodeSession:
    """``session`` with the parked rows back, in the original row order."""
    for piece, idx in parked:
        session = append_rows(session, piece)
        members = torch.cat([members, idx])
    if parked:
        session.select(torch.argsort(members))
    return session
