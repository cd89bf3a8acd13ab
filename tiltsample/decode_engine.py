r"""The decode engine: the one loop that extends the rows of a decode session.

Contract (the *rollout level* of ``DESIGN.md``, "Beyond one machine"): a batch of requests in —
row ``r`` of a :class:`~tiltsample.policy.DecodeSession` (prompt + prefix) with a
:class:`DecodeRequest`: its start length and cap, the law to draw from, teacher-forced tokens,
the EOS rule at the cap — and continuations out (:class:`Decoded`): the new tokens with their
per-token ``log p`` (temperature 1), ``log q`` (the law actually drawn from, so ``log p - log q`` is
an exact importance log-weight), optionally entropies, the new lengths and the generated-token
count. :func:`score_continuations` is the other half of that contract: the per-token ``log p`` of
*given* continuations (teacher forcing in one model call where the session can). A serving
backend (vLLM) implements the same two calls natively for the laws it can express (plain
tempered laws: a :class:`~tiltsample.token_laws.TemperedLaw` without a custom ``proposal``) and
refuses the others; :func:`decode` and :func:`score_continuations` hand a request to such a
session (a :class:`~tiltsample.policy.RolloutSession`) unchanged. Here they run on any token-level
session, with any law given as a function of the temperature-1 log-probs.

Rules, per row ``r`` and position ``t`` (``start[r] <= t < cap[r]``, response-relative):

* the row is *live* until it has received EOS or reached its cap (or the ``max_new`` budget ran
  out); a row that is not live receives EOS padding and records zeros;
* below ``forced_until[r]`` the token is teacher-forced to ``forced[r, t - start[r]]`` (its
  ``log p`` and ``log q`` are recorded; it does not count as generated);
* with ``force_eos[r]`` (``truncation="condition"``) the token at ``cap[r] - 1`` is EOS, with
  ``log q = 0`` and ``log p = log p(EOS | x_<cap)`` (a teacher-forced EOS there counts the same);
* otherwise it is drawn from ``law(log p)``. The draw is one ``torch.multinomial`` over the rows of
  the batch (:func:`~tiltsample.token_laws.draw_tokens`), made only at positions where some live
  row needs one (a position where every live row is forced draws nothing), or, with per-row
  uniforms, an inverse-CDF draw per row (:func:`~tiltsample.token_laws.inverse_cdf`);
* with ``hard_cap``, a row reaching ``cap[r] == hard_cap`` is *fed* EOS instead of its last token
  (the recorded token is kept): the session never asks the policy for a law past the target's cap.

:func:`decode_step` applies these rules to one position of a batch of rows and is what the
continuous-batching engines call tick by tick; :func:`decode` loops it over a session, optionally
parking finished rows out of the batch (:class:`Parking`) so that forward calls push mostly new
tokens. :func:`tiltsample.decoding.decode_until_complete` is the uniform-rows front end.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.policy import DecodeSession, RolloutSession, append_rows, extend_and_score
from tiltsample.row_generators import RowGenerators
from tiltsample.token_laws import Law, draw_tokens, inverse_cdf

__all__ = [
    "DecodeRequest",
    "Decoded",
    "Parking",
    "Step",
    "decode",
    "decode_step",
    "score_continuations",
]


class Parking(NamedTuple):
    """Finished rows leave the decoding batch: when at most ``shrink_below`` of its rows are live
    (and it has at least ``min_rows`` rows), the finished ones are parked in a fork and come back,
    in the original row order, when decoding ends.

    ``same_draws``: the draws still run over every row of the request, a parked row's law being
    a point mass on EOS, so the generator's stream, and every row's tokens, are those of the
    same decode without parking (``torch.multinomial`` consumes the same randomness per row
    whatever the row's law); otherwise the draws run over the rows left in the batch.
    ``restore=False``: parked rows are dropped instead of kept and the returned session holds
    only the rows still in the batch at the end, its cost that of the whole decode (for callers
    that need only the continuations, e.g. rollouts on a throw-away fork)."""

    shrink_below: float = 0.5
    min_rows: int = 8
    same_draws: bool = False
    restore: bool = True


class DecodeRequest(NamedTuple):
    """What to decode for every row of a session (``R`` rows; an int or bool is every row's)."""

    law: Law
    """The law drawn from, as a function of the float64 temperature-1 log-probs ``[R, V]``."""
    eos_id: int
    start: Tensor | int
    """Row lengths at the start (response-relative positions)."""
    cap: Tensor | int
    """Per-row length caps (EOS included)."""
    force_eos: Tensor | bool = False
    """EOS at ``cap - 1`` (``truncation="condition"``)."""
    forced: Tensor | None = None
    """``[R, k]`` teacher-forced tokens: ``forced[r, i]`` at position ``start[r] + i``."""
    forced_until: Tensor | None = None
    """``[R]`` teacher forcing while the position is below it."""
    hard_cap: int | None = None
    """Feed EOS instead of the last token of a row whose cap is ``hard_cap``."""
    max_new: int | None = None
    """Stop after this many positions (block-wise decoding)."""
    record_entropy: bool = False
    """Record the law's entropy per token (the law must return one)."""
    live: Tensor | None = None
    """``[R]`` rows that may decode at all (default: every row below its cap)."""
    parking: Parking | None = None


class Decoded(NamedTuple):
    """Continuations of the rows of a session: what :func:`decode` returns."""

    tokens: Tensor
    """``LongTensor[B, n]``: the new tokens (EOS-padded after a row ended)."""
    token_log_p: Tensor
    """``[B, n]`` float64: ``log p(x_t | x_<t)`` at temperature 1 (0 on padding)."""
    token_log_q: Tensor
    """``[B, n]`` float64: log-prob under the law that produced the token (0 on padding and
    on a forced EOS)."""
    new_lengths: Tensor
    """``LongTensor[B]``: tokens each row actually received (EOS included)."""
    generated_tokens: int
    """Tokens emitted by the loop (sampled ones plus forced EOS), padding and teacher-forced
    tokens excluded."""
    token_entropy: Tensor | None = None
    """``[B, n]`` float64: the law's entropy at every new position (0 on padding), when asked
    for with ``record_entropy``; otherwise ``None``."""

    @property
    def log_p(self) -> Tensor:
        """``[B]``: summed temperature-1 log-prob of the new tokens."""
        return self.token_log_p.sum(dim=1)

    @property
    def log_q(self) -> Tensor:
        """``[B]``: summed proposal log-prob of the new tokens."""
        return self.token_log_q.sum(dim=1)


class Step(NamedTuple):
    """One position of a batch of rows (:func:`decode_step`), all ``[R]``."""

    tokens: Tensor
    """The row's token (EOS on rows that are not live)."""
    fed: Tensor
    """The token to feed the session (``tokens``, or EOS under the ``hard_cap`` rule)."""
    log_p: Tensor
    """``log p`` of the token at temperature 1 (0 on rows that are not live)."""
    log_q: Tensor
    """``log q`` of the token (0 on rows that are not live and on a forced EOS)."""
    entropy: Tensor | None
    """The law's entropy (0 on rows that are not live), with ``record_entropy``."""
    live: Tensor
    """Rows still live after this position (no EOS, below the cap)."""
    generated: Tensor
    """Rows whose token counts as generated (live and not teacher-forced)."""


def decode_step(
    log_p: Tensor,
    law: Law,
    *,
    eos_id: int,
    live: Tensor,
    position: Tensor,
    cap: Tensor,
    force_eos: Tensor | bool = False,
    forced: Tensor | None = None,
    is_forced: Tensor | None = None,
    hard_cap: int | None = None,
    generator: torch.Generator | RowGenerators | None = None,
    uniforms: Tensor | None = None,
    record_entropy: bool = False,
) -> Step:
    """One position of every row of a batch under the rules of the module docstring.

    ``log_p`` ``[R, V]``: the session's temperature-1 log-probs; ``position`` and ``cap`` ``[R]``;
    ``forced`` ``[R]`` the teacher-forced tokens of the rows ``is_forced``. Draws come from
    ``generator`` (one multinomial over the rows, only if a live row needs a draw; with
    :class:`~tiltsample.row_generators.RowGenerators`, that rule per group of rows with the
    group's generator) or from the per-row ``uniforms`` (inverse CDF; the caller decides which
    rows consume one).
    """
    rows = int(live.numel())
    laws = law(log_p if log_p.dtype == torch.float64 else log_p.to(torch.float64))
    # the rule sets that apply at this position (None: no row is concerned, nothing to compute)
    at_cap: Tensor | None = None
    if not (isinstance(force_eos, bool) and not force_eos):
        cand = torch.as_tensor(force_eos, dtype=torch.bool).expand(rows) & (position == cap - 1)
        if bool(cand.any()):
            at_cap = cand
    teacher = is_forced if is_forced is not None and bool(is_forced.any()) else None
    drawing = live
    if teacher is not None:
        drawing = drawing & ~teacher
    if at_cap is not None:
        drawing = drawing & ~at_cap
    if uniforms is not None:
        tok = inverse_cdf(laws.log_q, uniforms)
    elif isinstance(generator, RowGenerators):  # one stream per group of rows
        tok = generator.draw(laws.log_q, drawing, eos_id)
    elif bool(drawing.any()):
        if generator is None:
            raise ValueError("decode_step needs a generator or uniforms to draw from")
        tok = draw_tokens(generator, laws.log_q)
    else:
        tok = torch.full((rows,), eos_id, dtype=torch.long)
    if teacher is not None and forced is not None:
        tok = torch.where(teacher, forced, tok)
    if at_cap is not None:
        # the forced EOS is the length convention, not a draw (log q = 0 whatever the support)
        tok = torch.where(at_cap & ~teacher if teacher is not None else at_cap, eos_id, tok)
    g = laws.log_q.gather(1, tok[:, None]).squeeze(1)
    if at_cap is not None:
        g = torch.where(at_cap, 0.0, g)
    ell = laws.log_p.gather(1, tok[:, None]).squeeze(1)
    if record_entropy and laws.entropy is None:
        raise ValueError("record_entropy needs a law that returns an entropy")
    ent = laws.entropy if record_entropy else None
    if bool(live.all()):
        tokens = tok
    else:  # rows that are not live record EOS and zeros
        tokens = torch.where(live, tok, eos_id)
        ell = torch.where(live, ell, 0.0)
        g = torch.where(live, g, 0.0)
        if ent is not None:
            ent = torch.where(live, ent, 0.0)
    fed = tokens
    if hard_cap is not None:
        fed = torch.where(live & (position + 1 == cap) & (cap == hard_cap), eos_id, fed)
    return Step(
        tokens,
        fed,
        ell,
        g,
        ent,
        live & (tok != eos_id) & (position + 1 < cap),
        live & ~teacher if teacher is not None else live.clone(),
    )


def decode(
    session: DecodeSession, generator: torch.Generator | RowGenerators, request: DecodeRequest
) -> tuple[Decoded, DecodeSession]:
    """Extend every row of ``session`` as ``request`` says; return the continuations and the
    session holding the extended rows (``session`` itself unless rows were parked: then the
    rows are re-assembled, in the original order, into the returned session).

    A :class:`~tiltsample.policy.RolloutSession` (a serving engine) decodes the request natively
    (``session.decode_rollouts``: same rules, its own draws from ``generator``, no parking) and
    is returned itself; any other session runs the token-level loop below."""
    if isinstance(generator, RowGenerators) and generator.num_rows != session.batch_size:
        raise ValueError(
            f"generator: the row groups cover {generator.num_rows} rows, the session has "
            f"{session.batch_size}"
        )
    if isinstance(session, RolloutSession):
        native: Decoded = session.decode_rollouts(generator, request)
        return native, session
    rows = session.batch_size
    if rows == 0:
        return _empty(0, request.record_entropy), session
    start = _per_row(request.start, rows)
    cap = _per_row(request.cap, rows)
    force = torch.as_tensor(request.force_eos, dtype=torch.bool).expand(rows)
    live = cap > start
    if request.live is not None:
        live = live & request.live
    steps = max(int((cap - start).max()), 0)
    if request.max_new is not None:
        steps = min(steps, request.max_new)
    forced, until = request.forced, request.forced_until
    cols: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
    new_len = torch.zeros(rows, dtype=torch.long)
    generated = 0
    members: Tensor | None = None  # original indices of the decoding batch's rows (None: all)
    parked: list[tuple[DecodeSession, Tensor]] = []
    park = request.parking
    for step in range(steps):
        mine = live if members is None else live[members]
        if not bool(mine.any()):
            break
        if park is not None:
            idx = torch.arange(rows) if members is None else members
            if int(idx.numel()) >= park.min_rows:
                keep = parked if park.restore else None
                kept = _park(session, live, idx, keep, park.shrink_below)
                if kept is not idx:
                    members, mine = kept, live[kept]
        laws = session.logprobs()
        sub = members  # the rows the step runs over (None: all of the request's)
        if park is not None and park.same_draws and members is not None:
            laws, sub, mine = _spread(laws, members, rows, request.eos_id), None, live
        idx_or_all = slice(None) if sub is None else sub
        t = start[idx_or_all] + step
        is_forced = forced_tok = None
        if forced is not None and until is not None:
            is_forced = t < until[idx_or_all]
            forced_tok = forced[idx_or_all, min(step, forced.shape[1] - 1)]
        out = decode_step(
            laws,
            request.law,
            eos_id=request.eos_id,
            live=mine,
            position=t,
            cap=cap[idx_or_all],
            force_eos=force[idx_or_all],
            forced=forced_tok,
            is_forced=is_forced,
            hard_cap=request.hard_cap,
            generator=generator.subset(sub)
            if isinstance(generator, RowGenerators) and sub is not None
            else generator,
            record_entropy=request.record_entropy,
        )
        # the step ran over ``sub``; the session holds ``members`` (the same rows unless
        # same_draws spread the step over all rows)
        session.extend(out.fed if sub is members else out.fed[members])
        cols.append(_scatter(out, sub, rows, request.eos_id))
        new_len[idx_or_all] += mine.long()
        generated += int(out.generated.sum())
        live[idx_or_all] = out.live
    if members is not None and parked:
        session = _unpark(session, members, parked)
    if not cols:
        return _empty(rows, request.record_entropy), session
    entropies = [c[3] for c in cols if c[3] is not None]
    decoded = Decoded(
        torch.stack([c[0] for c in cols], 1),
        torch.stack([c[1] for c in cols], 1),
        torch.stack([c[2] for c in cols], 1),
        new_len,
        generated,
        torch.stack(entropies, 1) if request.record_entropy else None,
    )
    return decoded, session


def score_continuations(session: DecodeSession, tokens: Tensor, lengths: Tensor) -> Tensor:
    """Teacher forcing: append the continuations ``tokens`` ``[R, k]`` (row ``r`` has
    ``lengths[r]`` real tokens, then padding) to the rows of ``session`` and return their
    temperature-1 log-probs ``[R, k]`` float64 (0 on padding). One model call when the session
    has ``extend_and_score``, else one per position; a
    :class:`~tiltsample.policy.RolloutSession` scores them natively."""
    if isinstance(session, RolloutSession):
        scored: Tensor = session.score_continuations(tokens, lengths)
        return scored
    lp = extend_and_score(session, tokens).to(torch.float64)
    real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return torch.where(real, lp, torch.zeros_like(lp))


def _per_row(value: Tensor | int, rows: int) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(torch.long).expand(rows)
    return torch.full((rows,), int(value), dtype=torch.long)


def _empty(rows: int, with_entropy: bool) -> Decoded:
    f = torch.zeros((rows, 0), dtype=torch.float64)
    return Decoded(
        torch.zeros((rows, 0), dtype=torch.long),
        f,
        f,
        torch.zeros(rows, dtype=torch.long),
        0,
        f if with_entropy else None,
    )


def _scatter(
    out: Step, members: Tensor | None, rows: int, eos_id: int
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The step's columns over all ``rows`` (parked rows: EOS and zeros)."""
    if members is None:
        return out.tokens, out.log_p, out.log_q, out.entropy
    tok = torch.full((rows,), eos_id, dtype=torch.long)
    tok[members] = out.tokens
    f = torch.zeros((3, rows), dtype=torch.float64)
    f[0, members] = out.log_p
    f[1, members] = out.log_q
    if out.entropy is not None:
        f[2, members] = out.entropy
    return tok, f[0], f[1], None if out.entropy is None else f[2]


def _park(
    session: DecodeSession,
    live: Tensor,
    members: Tensor,
    parked: list[tuple[DecodeSession, Tensor]] | None,
    shrink_below: float,
) -> Tensor:
    """Park the finished rows of ``session`` in a fork (appended to ``parked`` with their
    original indices; dropped when ``parked`` is None) when at most ``shrink_below`` of its rows
    are live; return the original indices of the rows left in ``session``."""
    mine = live[members]
    n = int(members.numel())
    if int(mine.sum()) > shrink_below * n:
        return members
    if parked is not None:
        gone = (~mine).nonzero().flatten()
        piece = session.fork()
        piece.select(gone)
        parked.append((piece, members[gone]))
    session.select(mine.nonzero().flatten())
    return members[mine]


def _spread(laws: Tensor, members: Tensor, rows: int, eos_id: int) -> Tensor:
    """``laws`` of the batch's rows (``members``, original indices) placed among all ``rows``;
    the other rows get a point mass on EOS."""
    full = torch.full((rows, laws.shape[1]), -math.inf, dtype=laws.dtype)
    full[:, eos_id] = 0.0
    full[members] = laws
    return full


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
