"""Suffix proposals: regenerate the chains' suffixes from their cuts in the state's batching mode
(ragged, aligned or grouped), splice them onto the kept prefixes, and merge accepted rows into
the next state session."""

from __future__ import annotations

import torch
from torch import Tensor

from tiltsample.policy import DecodeSession, append_rows, row_lengths, truncate_rows
from tiltsample.samplers.mh.decode import Slot, Suffix, decode_ragged, decode_rows, empty_suffix
from tiltsample.samplers.mh.state import MHState
from tiltsample.types import Cost

__all__ = ["Regenerated", "merge_root", "regenerate", "splice", "suffix_sum"]


Regenerated = tuple[Suffix, tuple[tuple[Slot, int], ...] | None, int, Cost, DecodeSession | None]
"""New suffixes, their handles (grouped batching), the serial counter, the cost and (ragged
batching) the session holding the proposals."""


def regenerate(
    state: MHState,
    generator: torch.Generator,
    rows: Tensor,
    cuts: Tensor,
    caps: Tensor,
    force_eos: bool,
) -> Regenerated:
    """Decode new suffixes of ``rows`` from ``cuts`` to ``caps``; return them, their handles
    (grouped), the serial counter, the cost and (ragged) the session holding the proposals."""
    if int(rows.numel()) == 0:
        return empty_suffix(0), (), state.serial, Cost(), None
    if state.batching == "ragged":
        return _regenerate_ragged(state, generator, rows, cuts, caps, force_eos)
    if state.batching == "aligned":
        return _regenerate_aligned(state, generator, rows, cuts, caps, force_eos)
    return _regenerate_grouped(state, generator, rows, cuts, caps, force_eos)


def _regenerate_ragged(
    state: MHState,
    generator: torch.Generator,
    rows: Tensor,
    cuts: Tensor,
    caps: Tensor,
    force_eos: bool,
) -> Regenerated:
    """Every chain cut at its own position, all suffixes decoded in lock-step in one batch."""
    assert state.root is not None
    session = state.root.session.fork()
    session.select(rows)
    session = truncate_rows(session, row_lengths(session) - cuts)
    suf, session = decode_ragged(
        session,
        generator,
        start=cuts,
        caps=caps,
        eos_id=state.target.eos_id,
        config=state.config,
        force_eos=force_eos,
        hard_cap=state.target.max_new_tokens,
    )
    # the session's cost moves with its rows into the merged state session (merge_root)
    return suf, None, state.serial, Cost(generated_tokens=suf.generated), session


def _regenerate_aligned(
    state: MHState,
    generator: torch.Generator,
    rows: Tensor,
    cuts: Tensor,
    caps: Tensor,
    force_eos: bool,
) -> Regenerated:
    """All chains decoded in lock-step from the smallest cut, frozen tokens teacher-forced."""
    eos = state.target.eos_id
    assert state.root is not None
    session = state.root.session.fork()
    session.select(_root_rows(state, rows))
    j_min = int(cuts.min())
    if j_min > 0:
        session.extend(state.tokens[rows, :j_min])
    j_max = int(cuts.max())
    forced = state.tokens[rows, j_min : max(j_max, j_min + 1)]
    suf = decode_rows(
        session,
        generator,
        caps=caps,
        eos_id=eos,
        config=state.config,
        force_eos=force_eos,
        forced=forced,
        forced_until=cuts,
    )
    offset = cuts - j_min
    suf = Suffix(
        _shift_rows(suf.tokens, offset, eos),
        _shift_rows(suf.ell, offset, 0.0),
        _shift_rows(suf.g, offset, 0.0),
        _shift_rows(suf.entropy, offset, 0.0),
        suf.length - offset,
        suf.generated,
    )
    cost = Cost() + session.cost + Cost(generated_tokens=suf.generated)
    return suf, None, state.serial, cost, None


def _regenerate_grouped(
    state: MHState,
    generator: torch.Generator,
    rows: Tensor,
    cuts: Tensor,
    caps: Tensor,
    force_eos: bool,
) -> Regenerated:
    """One batch per (session, cut) group: forked, selected, truncated to the cut, decoded."""
    assert state.handles is not None
    n = int(rows.numel())
    serial = state.serial
    cost = Cost()
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (c, j) in enumerate(zip(rows.tolist(), cuts.tolist(), strict=True)):
        groups.setdefault((state.handles[c][0].serial, j), []).append(k)
    parts: list[tuple[list[int], Suffix]] = []
    new_handles: list[tuple[Slot, int] | None] = [None] * n
    for (_, j), members in sorted(groups.items()):
        chains = [int(rows[k]) for k in members]
        source = state.handles[chains[0]][0].session
        session = source.fork()
        session.select(torch.tensor([state.handles[c][1] for c in chains], dtype=torch.long))
        session.truncate(session.length - j)
        suf = decode_rows(
            session,
            generator,
            caps=caps[members],
            eos_id=state.target.eos_id,
            config=state.config,
            force_eos=force_eos,
        )
        serial += 1
        slot = Slot(session, serial)
        for i, k in enumerate(members):
            new_handles[k] = (slot, i)
        parts.append((members, suf))
        cost = cost + session.cost + Cost(generated_tokens=suf.generated)
    handles = tuple(h for h in new_handles if h is not None)
    return _pad_cat(parts, n, state.target.eos_id), handles, serial, cost, None


def _root_rows(state: MHState, rows: Tensor) -> Tensor:
    """Rows of the aligned root session (one per prompt) that the chains ``rows`` continue."""
    if state.owner is None:
        return torch.zeros(int(rows.numel()), dtype=torch.long)
    return state.owner[rows]


def _shift_rows(values: Tensor, offset: Tensor, fill: float | int) -> Tensor:
    """``out[r, i] = values[r, i + offset[r]]`` (``fill`` past the end)."""
    width = values.shape[1]
    if width == 0:
        return values
    idx = torch.arange(width)[None, :] + offset[:, None]
    inside = idx < width
    got = values.gather(1, idx.clamp(max=width - 1))
    return torch.where(inside, got, torch.full_like(got, fill))


def _pad_cat(parts: list[tuple[list[int], Suffix]], rows: int, eos_id: int) -> Suffix:
    """Scatter per-group suffixes back into ``[rows, m_max]`` arrays in row order."""
    width = max((s.tokens.shape[1] for _, s in parts), default=0)
    tokens = torch.full((rows, width), eos_id, dtype=torch.long)
    ell = torch.zeros((rows, width), dtype=torch.float64)
    g = torch.zeros((rows, width), dtype=torch.float64)
    ent = torch.zeros((rows, width), dtype=torch.float64)
    length = torch.zeros(rows, dtype=torch.long)
    generated = 0
    for idx, s in parts:
        w = s.tokens.shape[1]
        where = torch.tensor(idx, dtype=torch.long)
        tokens[where, :w] = s.tokens
        ell[where, :w] = s.ell
        g[where, :w] = s.g
        ent[where, :w] = s.entropy
        length[where] = s.length
        generated += s.generated
    return Suffix(tokens, ell, g, ent, length, generated)


def merge_root(
    state: MHState, rows: Tensor, take: Tensor, proposals: DecodeSession | None
) -> tuple[Slot | None, Cost]:
    """Ragged batching: the session of the new states (chain ``c`` = row ``c``): proposal rows
    for the chains ``rows[take]``, the old rows otherwise. Returns it and its cost (the
    proposals' decoding included)."""
    if proposals is None or state.root is None:
        return state.root, Cost()
    chains = state.tokens.shape[0]
    merged = append_rows(state.root.session.fork(), proposals)
    index = torch.arange(chains)
    index[rows[take]] = chains + take.nonzero().flatten()
    merged.select(index)
    return Slot(merged, state.root.serial + 1), merged.cost


def splice(prefix: Tensor, cuts: Tensor, suffix: Tensor, fill: float | int) -> Tensor:
    """Rows of ``prefix`` ``[R, L]`` up to ``cuts``, then ``suffix`` ``[R, m]``, then ``fill``."""
    width = prefix.shape[1]
    m = suffix.shape[1]
    rel = torch.arange(width)[None, :] - cuts[:, None]
    if m == 0:
        body = torch.full_like(prefix, fill)
    else:
        body = suffix.gather(1, rel.clamp(0, m - 1))
        body = torch.where(rel < m, body, torch.full_like(body, fill))
    return torch.where(rel >= 0, body, prefix)


def suffix_sum(values: Tensor, start: Tensor, stop: Tensor) -> Tensor:
    """``sum(values[r, start[r]:stop[r]])`` per row ``[R]``."""
    pos = torch.arange(values.shape[1])[None, :]
    mask = (pos >= start[:, None]) & (pos < stop[:, None])
    return torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)
