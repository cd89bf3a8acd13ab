"""Reference-policy and decode-session protocols, the default session, and capability helpers.

A *reference policy* is the model ``p_ref(x | y)`` that every target tilts. Any object with the
attributes of :class:`ReferencePolicy` works (structural typing; no subclassing of project classes).
A policy that also has ``session(prompt, batch)`` supplies its own fast, stateful
:class:`DecodeSession` (the HF backend wraps a KV cache); otherwise :func:`open_session` builds a
:class:`PrefixSession` from ``next_logprobs`` so that a new policy works before it is fast.

Optional session capabilities, each with a helper that falls back for sessions lacking it:

* ragged rows (:class:`RaggedDecodeSession`): :func:`truncate_rows` cuts every row by its own
  amount, :func:`row_lengths` reads the lengths (fallback: the :class:`RaggedGroups` adapter);
* :func:`extend_and_score`: append ``[B, k]`` given tokens and return their log-probs ``[B, k]``
  in one model call (fallback: :func:`score_token_by_token`);
* several prompts in one session: :func:`open_session_multi` (``policy.session_multi``; fallback: a
  :class:`PrefixSession` with one prompt per row);
* :func:`append_rows`: move the rows of one session after those of another (fallback:
  :class:`RaggedGroups`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from tiltsample.types import Cost, Seq


@runtime_checkable
class ReferencePolicy(Protocol):
    """An autoregressive reference policy ``p_ref(x_t | y, x_<t)`` at temperature 1.

    Attributes
    ----------
    vocab_size
        Number of token ids, ``V``; ids lie in ``[0, V)``.
    eos_id
        The end-of-sequence id. It may have probability zero everywhere (log-prob ``-inf``).
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        """Log-probabilities ``[B, V]`` (float64 or float32) of the next token after each prefix.

        Prefixes never contain EOS (callers stop there). Rows must be normalised in probability
        space; entries may be ``-inf``.
        """
        ...

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        """``sum_t log p(x_t | y, x_<t)`` over the tokens present in each ``x`` (EOS included).

        With ``per_token=True`` return ``[B, L_max]``, zero beyond each sequence's length.
        """
        ...


@runtime_checkable
class DecodeSession(Protocol):
    """A batch of ``B`` response prefixes that continue one prompt, decoded step by step.

    All rows have the same number of tokens (``length``); rows that already ended with EOS are
    padded by further EOS tokens and report a point mass on EOS. Methods mutate the session in place
    (a sampler state *owns* its session: ``step`` consumes it; branching needs :meth:`fork`).

    Optional capabilities (use them through the module-level helpers, which fall back when a
    session lacks them): *ragged rows* (:class:`RaggedDecodeSession`: ``row_lengths`` and
    ``truncate_rows``) and *scoring given tokens* (``extend_and_score``).
    """

    @property
    def batch_size(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def cost(self) -> Cost:
        """Forward tokens and model calls spent by *this* session object (not by its forks)."""
        ...

    def tokens(self) -> Tensor:
        """The response tokens so far, ``LongTensor[B, length]``."""
        ...

    def logprobs(self) -> Tensor:
        """Next-token log-probabilities ``[B, V]`` (temperature 1) after every row."""
        ...

    def extend(self, tokens: Tensor) -> None:
        """Append ``tokens`` (``[B]`` or ``[B, k]``) to every row."""
        ...

    def truncate(self, n: int) -> None:
        """Drop the last ``n`` tokens of every row."""
        ...

    def select(self, indices: Tensor) -> None:
        """Replace the rows by ``rows[indices]`` (resampling, expansion); may change ``B``."""
        ...

    def fork(self) -> DecodeSession:
        """An independent copy sharing nothing mutable with this session."""
        ...


@runtime_checkable
class RaggedDecodeSession(DecodeSession, Protocol):
    """A :class:`DecodeSession` whose rows may have different lengths.

    ``row_lengths()[r]`` is the number of tokens of row ``r``; ``length`` is the largest of them
    and ``tokens()`` is ``[B, length]`` with EOS padding past each row's own length (read the
    lengths, not the padding). ``extend`` appends at each row's own position, ``truncate(n)``
    drops the last ``n`` tokens of every row (``n <= min(row_lengths())``) and ``select`` /
    ``fork`` keep each row's length. A session over rows of *different prompts*
    (:func:`open_session_multi`) is ragged too.
    """

    def row_lengths(self) -> Tensor:
        """``LongTensor[B]``: tokens of every row."""
        ...

    def truncate_rows(self, n: Tensor) -> None:
        """Drop the last ``n[r]`` tokens of row ``r`` (``LongTensor[B]``, ``0 <= n[r] <= len``)."""
        ...


def supports_ragged(session: DecodeSession) -> bool:
    """Whether ``session`` has the ragged-rows capability (:class:`RaggedDecodeSession`)."""
    return callable(getattr(session, "truncate_rows", None)) and callable(
        getattr(session, "row_lengths", None)
    )


def row_lengths(session: DecodeSession) -> Tensor:
    """``LongTensor[B]``: each row's length (``length`` for every row of a rectangular session)."""
    if supports_ragged(session):
        out: Tensor = session.row_lengths()  # type: ignore[attr-defined]
        return out
    return torch.full((session.batch_size,), session.length, dtype=torch.long)


def _check_row_counts(n: Tensor | Sequence[int], lengths: Tensor) -> Tensor:
    counts = torch.as_tensor(n, dtype=torch.long)
    if counts.shape != lengths.shape:
        raise ValueError(
            f"n must have shape [B] = {tuple(lengths.shape)}, got {tuple(counts.shape)}"
        )
    if counts.numel() and (bool((counts < 0).any()) or bool((counts > lengths).any())):
        raise ValueError("n[r] must lie in [0, row length] for every row r")
    return counts


def truncate_rows(session: DecodeSession, n: Tensor | Sequence[int]) -> DecodeSession:
    """Drop the last ``n[r]`` tokens of row ``r``; return the session to keep using.

    A ragged session is truncated in place and returned. A rectangular session is truncated in
    place when every ``n[r]`` is equal; otherwise it is wrapped in a :class:`RaggedGroups` adapter
    (rows of equal length share one fork of the session, so decoding costs one model call per
    distinct length), which is returned. Either way the caller must continue with the returned
    object.
    """
    if supports_ragged(session):
        session.truncate_rows(torch.as_tensor(n, dtype=torch.long))  # type: ignore[attr-defined]
        return session
    counts = _check_row_counts(n, row_lengths(session))
    if counts.numel() == 0 or bool((counts == counts[0]).all()):
        session.truncate(int(counts[0]) if counts.numel() else 0)
        return session
    adapter = RaggedGroups(session)
    adapter.truncate_rows(counts)
    return adapter


def extend_and_score(session: DecodeSession, tokens: Tensor) -> Tensor:
    """Append ``tokens`` ``[B, k]`` to every row and return their log-probabilities ``[B, k]``.

    ``out[r, i] = log p(tokens[r, i] | prompt, row r, tokens[r, :i])`` at temperature 1 (float64,
    ``-inf`` for an impossible token). Positions after a row's EOS (earlier or inside ``tokens``)
    hold the forced EOS padding, whose probability is 1: their entries are 0. The session ends in
    the same state as after ``extend(tokens)``.

    Sessions with an ``extend_and_score`` method do it in one model call (the HF session pushes the
    pending and the ``k`` new tokens through the model once and reads every position's logits);
    any other session is scored token by token (``k`` calls of ``logprobs``), with the same result.
    """
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[:, None]
    method = getattr(session, "extend_and_score", None)
    if callable(method):
        out: Tensor = method(tokens)
        return out
    return score_token_by_token(session, tokens)


def append_rows(session: DecodeSession, other: DecodeSession) -> DecodeSession:
    """Move the rows of ``other`` after the rows of ``session``; return the session to keep using.

    ``other`` is consumed (do not use it afterwards) and its cost so far moves with its rows, so
    the returned session's ``cost`` includes it. Rows keep their own prompts and lengths (the
    result is ragged). Sessions of the same type with an ``append_rows`` method merge natively
    (the HF session pads the shorter KV cache with masked columns and concatenates the batches);
    anything else is combined in a :class:`RaggedGroups` adapter (no copy, one model call per
    group and step).
    """
    method = getattr(session, "append_rows", None)
    if callable(method) and type(other) is type(session):
        method(other)
        return session
    adapter = session if isinstance(session, RaggedGroups) else RaggedGroups(session)
    adapter.add_rows(other)
    return adapter


def score_token_by_token(session: DecodeSession, tokens: Tensor) -> Tensor:
    """The reference form of :func:`extend_and_score`: ``logprobs`` / ``extend`` per column."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[:, None]
    if tokens.dim() != 2 or tokens.shape[0] != session.batch_size:
        raise ValueError(
            f"tokens must have shape [B] or [B, k] with B={session.batch_size}, "
            f"got {tuple(tokens.shape)}"
        )
    k = tokens.shape[1]
    out = torch.zeros((tokens.shape[0], k), dtype=torch.float64)
    for i in range(k):
        lp = session.logprobs().to(torch.float64)
        session.extend(tokens[:, i])
        # score the token the session holds (a finished row is padded with EOS whatever the
        # caller passed, and reports a point mass on EOS: its entry is log 1 = 0)
        last = (row_lengths(session) - 1).clamp(min=0)
        stored = session.tokens().gather(1, last[:, None])
        out[:, i] = lp.gather(1, stored).squeeze(1)
    return out


def check_token_block(tokens: Tensor, batch_size: int, vocab_size: int) -> Tensor:
    """``tokens`` as a ``LongTensor[B, k]`` (a ``[B]`` vector becomes ``[B, 1]``) after checking
    its shape against ``batch_size`` and its ids against ``[0, vocab_size)``; sessions call it in
    ``extend``."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[:, None]
    if tokens.dim() != 2 or tokens.shape[0] != batch_size:
        raise ValueError(
            f"tokens must have shape [B] or [B, k] with B={batch_size}, got {tuple(tokens.shape)}"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"tokens must lie in [0, vocab_size={vocab_size})")
    return tokens


def open_session(policy: ReferencePolicy, prompt: Seq, batch: int) -> DecodeSession:
    """A decode session of ``batch`` empty rows after ``prompt``.

    Uses ``policy.session`` when the policy provides one, else a recomputing
    :class:`PrefixSession` built from ``next_logprobs``.
    """
    factory = getattr(policy, "session", None)
    if callable(factory):
        session: DecodeSession = factory(prompt, batch)
        return session
    return PrefixSession(policy, prompt, batch, accounting="recompute")


def _prompt_counts(
    prompts: Sequence[Seq], rows_per_prompt: int | Sequence[int]
) -> tuple[list[Seq], list[int]]:
    listed = [tuple(int(t) for t in p) for p in prompts]
    if isinstance(rows_per_prompt, int) and not isinstance(rows_per_prompt, bool):
        counts = [rows_per_prompt] * len(listed)
    else:
        counts = [int(c) for c in rows_per_prompt]  # type: ignore[union-attr]
        if len(counts) != len(listed):
            raise ValueError(
                f"rows_per_prompt must be an int or hold one count per prompt "
                f"({len(listed)}), got {len(counts)}"
            )
    if any(c < 0 for c in counts):
        raise ValueError(f"rows_per_prompt must be >= 0, got {counts}")
    return listed, counts


def open_session_multi(
    policy: ReferencePolicy, prompts: Sequence[Seq], rows_per_prompt: int | Sequence[int]
) -> DecodeSession:
    """One session over several prompts: ``rows_per_prompt[i]`` empty rows after ``prompts[i]``.

    Rows are ordered by prompt (prompt 0's rows first). Every method then acts on all rows at
    once, so chains or particles of many prompts decode in one batch; the session is ragged
    (:class:`RaggedDecodeSession`) when it comes from ``policy.session_multi`` (the HF backend:
    the prompts are prefilled once each, side by side, with per-row positions) or from the
    fallback. Fallbacks: all prompts equal → :func:`open_session`; otherwise a recomputing
    :class:`PrefixSession` with one prompt per row (one ``next_logprobs`` call per prompt per step).
    """
    listed, counts = _prompt_counts(prompts, rows_per_prompt)
    factory = getattr(policy, "session_multi", None)
    if callable(factory):
        session: DecodeSession = factory(listed, counts)
        return session
    if len(set(listed)) <= 1:
        return open_session(policy, listed[0] if listed else (), sum(counts))
    return PrefixSession.multi(policy, listed, counts, accounting="recompute")


class RaggedGroups:
    """Ragged rows over any rectangular :class:`DecodeSession` (fallback of :func:`truncate_rows`).

    Rows of equal length live in one fork of the wrapped session; ``truncate_rows`` splits a group
    whose rows are cut by different amounts (fork + ``select`` + ``truncate``), so nothing is
    re-encoded, but every distinct length costs its own model call per step (groups never merge).
    ``cost`` includes the wrapped session's own cost. ``tokens()`` pads shorter rows with token 0
    (the wrapped sessions do not expose EOS): read :meth:`row_lengths`.
    """

    def __init__(self, session: DecodeSession) -> None:
        self._groups: list[tuple[DecodeSession, Tensor]] = [
            (session, torch.arange(session.batch_size, dtype=torch.long))
        ]
        self._batch = session.batch_size
        self._spent = Cost()

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def length(self) -> int:
        return max((s.length for s, rows in self._groups if rows.numel()), default=0)

    @property
    def cost(self) -> Cost:
        total = self._spent
        for s, _ in self._groups:
            total = total + s.cost
        return total

    def row_lengths(self) -> Tensor:
        out = torch.zeros(self._batch, dtype=torch.long)
        for s, rows in self._groups:
            out[rows] = s.length
        return out

    def tokens(self) -> Tensor:
        out = torch.zeros((self._batch, self.length), dtype=torch.long)
        for s, rows in self._groups:
            toks = s.tokens()
            out[rows, : toks.shape[1]] = toks
        return out

    def logprobs(self) -> Tensor:
        parts = [(s.logprobs(), rows) for s, rows in self._groups]
        vocab = parts[0][0].shape[1] if parts else 0
        out = torch.zeros((self._batch, vocab), dtype=torch.float64)
        for lp, rows in parts:
            out[rows] = lp.to(torch.float64)
        return out

    def extend(self, tokens: Tensor) -> None:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.shape[:1] != (self._batch,):
            raise ValueError(f"tokens must have shape [B] or [B, k] with B={self._batch}")
        for s, rows in self._groups:
            s.extend(tokens[rows])

    def extend_and_score(self, tokens: Tensor) -> Tensor:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() != 2 or tokens.shape[0] != self._batch:
            raise ValueError(f"tokens must have shape [B, k] with B={self._batch}")
        out = torch.zeros(tokens.shape, dtype=torch.float64)
        for s, rows in self._groups:
            out[rows] = extend_and_score(s, tokens[rows])
        return out

    def truncate(self, n: int) -> None:
        self.truncate_rows(torch.full((self._batch,), n, dtype=torch.long))

    def truncate_rows(self, n: Tensor) -> None:
        counts = _check_row_counts(n, self.row_lengths())
        groups: list[tuple[DecodeSession, Tensor]] = []
        for s, rows in self._groups:
            mine = counts[rows]
            values = sorted(set(mine.tolist()))
            if len(values) <= 1:
                s.truncate(values[0] if values else 0)
                groups.append((s, rows))
                continue
            for v in values:
                local = (mine == v).nonzero().flatten()
                twin = s.fork()
                twin.select(local)
                twin.truncate(v)
                groups.append((twin, rows[local]))
            self._spent = self._spent + s.cost
        self._groups = groups

    def select(self, indices: Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._batch):
            raise ValueError(f"indices must lie in [0, batch_size={self._batch})")
        group_of = torch.zeros(self._batch, dtype=torch.long)
        local_of = torch.zeros(self._batch, dtype=torch.long)
        for g, (_, rows) in enumerate(self._groups):
            group_of[rows] = g
            local_of[rows] = torch.arange(rows.numel())
        groups: list[tuple[DecodeSession, Tensor]] = []
        for g, (s, _) in enumerate(self._groups):
            positions = (group_of[idx] == g).nonzero().flatten()
            if positions.numel() == 0:
                self._spent = self._spent + s.cost
                continue
            s.select(local_of[idx[positions]])
            groups.append((s, positions))
        self._groups = groups
        self._batch = int(idx.numel())

    def add_rows(self, other: DecodeSession) -> None:
        """Append the rows of ``other`` (consumed; its cost moves with it) after these rows."""
        groups = (
            other._groups
            if isinstance(other, RaggedGroups)
            else [(other, torch.arange(other.batch_size, dtype=torch.long))]
        )
        if isinstance(other, RaggedGroups):
            self._spent = self._spent + other._spent
        self._groups = self._groups + [(s, rows + self._batch) for s, rows in groups]
        self._batch += other.batch_size

    def fork(self) -> RaggedGroups:
        twin = copy.copy(self)
        twin._groups = [(s.fork(), rows.clone()) for s, rows in self._groups]
        twin._spent = Cost()
        return twin


class PrefixSession:
    """Default :class:`DecodeSession` built from ``policy.next_logprobs`` (ragged rows supported).

    Parameters
    ----------
    policy
        Any :class:`ReferencePolicy`.
    prompt
        The prompt shared by all rows (:meth:`multi` builds a session with one prompt per row).
    batch
        Number of rows.
    accounting
        ``"recompute"`` (default) counts what a stateless model would process: every call pushes
        ``len(prompt) + len(prefix)`` tokens per live row. ``"cached"`` counts what an ideal
        KV-cached model would process: the prompt once, then each appended token once per row (plus
        one re-fed token per row after a :meth:`truncate`). Table-backed toy policies use
        ``"cached"`` so that their costs are those of a perfect cache.

    Notes
    -----
    The session is stateless apart from bookkeeping, so ragged rows
    (:meth:`truncate_rows`, :class:`RaggedDecodeSession`) and rows of different prompts cost
    nothing extra: ``logprobs`` recomputes the rows whose law is unknown, one ``next_logprobs``
    call per distinct prompt.
    """

    def __init__(
        self,
        policy: ReferencePolicy,
        prompt: Seq,
        batch: int,
        accounting: Literal["recompute", "cached"] = "recompute",
    ) -> None:
        if batch < 0:
            raise ValueError(f"batch must be >= 0, got {batch}")
        self._setup(policy, [tuple(prompt)], [batch], accounting)

    @classmethod
    def multi(
        cls,
        policy: ReferencePolicy,
        prompts: Sequence[Seq],
        rows_per_prompt: int | Sequence[int],
        accounting: Literal["recompute", "cached"] = "recompute",
    ) -> PrefixSession:
        """A session with ``rows_per_prompt[i]`` empty rows after ``prompts[i]`` (in that order)."""
        listed, counts = _prompt_counts(prompts, rows_per_prompt)
        self = cls.__new__(cls)
        self._setup(policy, listed, counts, accounting)
        return self

    def _setup(
        self,
        policy: ReferencePolicy,
        prompts: list[Seq],
        counts: list[int],
        accounting: Literal["recompute", "cached"],
    ) -> None:
        if accounting not in ("recompute", "cached"):
            raise ValueError(f"accounting must be 'recompute' or 'cached', got {accounting!r}")
        batch = sum(counts)
        self._policy = policy
        self._prompts = tuple(prompts)
        self._prompt = self._prompts[0] if self._prompts else ()
        self._row_prompt = torch.repeat_interleave(
            torch.arange(len(counts), dtype=torch.long), torch.tensor(counts, dtype=torch.long)
        )
        self._eos = int(policy.eos_id)
        self._vocab = int(policy.vocab_size)
        self._accounting = accounting
        self._tokens = torch.full((batch, 0), self._eos, dtype=torch.long)
        self._lens = torch.zeros(batch, dtype=torch.long)
        self._done = torch.zeros(batch, dtype=torch.bool)
        self._law = torch.zeros((batch, self._vocab), dtype=torch.float64)
        self._known = torch.zeros(batch, dtype=torch.bool)
        # cached accounting: tokens appended but not yet pushed through the model
        used = [p for p, c in zip(prompts, counts, strict=True) if c > 0] or prompts[:1]
        shared = sum(max(len(p), 1) for p in dict.fromkeys(used))
        self._pending_shared = shared if accounting == "cached" else 0
        self._pending_rows = torch.zeros(batch, dtype=torch.long)
        self._forward = 0
        self._calls = 0

    @property
    def batch_size(self) -> int:
        return int(self._tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self._lens.max()) if self._lens.numel() else 0

    @property
    def cost(self) -> Cost:
        return Cost(forward_tokens=self._forward, model_calls=self._calls)

    def row_lengths(self) -> Tensor:
        return self._lens.clone()

    def tokens(self) -> Tensor:
        return self._tokens[:, : self.length].clone()

    def logprobs(self) -> Tensor:
        if bool(self._known.all()):
            self._charge_pending(False)
            return self._law
        need = ~self._known
        finished = need & self._done
        self._law[finished] = -torch.inf
        self._law[finished, self._eos] = 0.0
        live = need & ~self._done
        called = False
        for p in sorted(set(self._row_prompt[live].tolist())):
            rows = (live & (self._row_prompt == p)).nonzero().flatten()
            prefixes = [
                tuple(row[:n])
                for row, n in zip(
                    self._tokens[rows].tolist(), self._lens[rows].tolist(), strict=True
                )
            ]
            prompt = self._prompts[p]
            lp = self._policy.next_logprobs(prompt, prefixes)
            if tuple(lp.shape) != (len(prefixes), self._vocab):
                raise ValueError(
                    f"policy.next_logprobs returned shape {tuple(lp.shape)}, "
                    f"expected ({len(prefixes)}, vocab_size={self._vocab})"
                )
            self._law[rows] = lp.to(torch.float64)
            self._calls += 1
            called = True
            if self._accounting == "recompute":
                self._forward += len(prefixes) * len(prompt) + int(self._lens[rows].sum())
        self._charge_pending(called)
        self._known[:] = True
        return self._law

    def _charge_pending(self, called: bool) -> None:
        if self._accounting == "cached" and (
            self._pending_shared or bool(self._pending_rows.any())
        ):
            if not called:
                self._calls += 1
            self._forward += self._pending_shared + int(self._pending_rows.sum())
            self._pending_shared = 0
            self._pending_rows.zero_()

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        return check_token_block(tokens, self.batch_size, self._vocab)

    def _append(self, tokens: Tensor) -> Tensor:
        """Write ``tokens`` at each row's position (EOS after a row's EOS); return what was held."""
        k = tokens.shape[1]
        # rows that already ended (or end inside the block) keep EOS padding whatever was passed
        is_eos = tokens == self._eos
        after = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
        held = torch.where(self._done[:, None] | after, torch.full_like(tokens, self._eos), tokens)
        need = int(self._lens.max()) + k if self._lens.numel() else k
        if need > self._tokens.shape[1]:
            pad = torch.full(
                (self.batch_size, need - self._tokens.shape[1]), self._eos, dtype=torch.long
            )
            self._tokens = torch.cat([self._tokens, pad], dim=1)
        cols = self._lens[:, None] + torch.arange(k)[None, :]
        self._tokens.scatter_(1, cols, held)
        self._lens = self._lens + k
        self._done = self._done | (held == self._eos).any(dim=1)
        self._pending_rows += k
        self._known[:] = False
        return held

    def extend(self, tokens: Tensor) -> None:
        self._append(self._check_tokens(tokens))

    def extend_and_score(self, tokens: Tensor) -> Tensor:
        """:func:`extend_and_score` in one ``next_logprobs`` call per prompt (the ``k - 1``
        inner prefixes of every live row at once; the law after the block stays lazy, as a
        policy need not define it past its cap)."""
        tokens = self._check_tokens(tokens)
        k = tokens.shape[1]
        if k == 0:
            return torch.zeros((self.batch_size, 0), dtype=torch.float64)
        before = self.logprobs()
        done_before = self._done.clone()
        start = self._lens.clone()
        held = self._append(tokens)
        out = torch.zeros((self.batch_size, k), dtype=torch.float64)
        out[:, 0] = before.gather(1, held[:, :1]).squeeze(1)
        # token i >= 1 needs the law after held[:, :i]; a row that holds EOS before i is finished
        # there (point mass, score 0)
        ended = torch.cumsum((held == self._eos).long(), dim=1) > 0  # EOS at or before column i
        called = False
        toks = self._tokens.tolist()
        for p in sorted(set(self._row_prompt.tolist())):
            rows = ((self._row_prompt == p) & ~done_before).nonzero().flatten().tolist()
            queries = [(r, i) for r in rows for i in range(1, k) if not bool(ended[r, i - 1])]
            if not queries:
                continue
            prefixes = [tuple(toks[r][: int(start[r]) + i]) for r, i in queries]
            prompt = self._prompts[p]
            lp = self._policy.next_logprobs(prompt, prefixes).to(torch.float64)
            if tuple(lp.shape) != (len(prefixes), self._vocab):
                raise ValueError(
                    f"policy.next_logprobs returned shape {tuple(lp.shape)}, "
                    f"expected ({len(prefixes)}, vocab_size={self._vocab})"
                )
            self._calls += 1
            called = True
            if self._accounting == "recompute":
                last: dict[int, int] = {}
                for r, i in queries:
                    last[r] = max(last.get(r, 0), i)
                self._forward += sum(len(prompt) + int(start[r]) + i for r, i in last.items())
            for q, (r, i) in enumerate(queries):
                out[r, i] = lp[q, held[r, i]]
        if self._accounting == "cached" and called:
            # the block went through the model except its last token, which stays pending (the
            # next logprobs pushes it, as after an ordinary extend)
            self._forward += self._pending_shared + int((self._pending_rows - 1).sum())
            self._pending_shared = 0
            self._pending_rows.fill_(1)
        return out

    def truncate(self, n: int) -> None:
        low = int(self._lens.min()) if self._lens.numel() else 0
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= low:
            raise ValueError(f"n must be an int in [0, length={low}], got {n!r}")
        if n == 0:
            return
        self.truncate_rows(torch.full((self.batch_size,), n, dtype=torch.long))

    def truncate_rows(self, n: Tensor) -> None:
        counts = _check_row_counts(n, self._lens)
        cut = counts > 0
        if not bool(cut.any()):
            return
        self._lens = self._lens - counts
        pos = torch.arange(self._tokens.shape[1])[None, :]
        inside = pos < self._lens[:, None]
        self._tokens = torch.where(inside, self._tokens, torch.full_like(self._tokens, self._eos))
        self._tokens = self._tokens[:, : self.length]
        self._done = ((self._tokens == self._eos) & inside[:, : self._tokens.shape[1]]).any(dim=1)
        self._pending_rows = torch.where(
            cut, torch.clamp(self._pending_rows - counts, min=1), self._pending_rows
        )
        self._known = self._known & ~cut

    def select(self, indices: Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
            raise ValueError(f"indices must lie in [0, batch_size={self.batch_size})")
        self._tokens = self._tokens[idx]
        self._lens = self._lens[idx]
        self._done = self._done[idx]
        self._row_prompt = self._row_prompt[idx]
        self._pending_rows = self._pending_rows[idx]
        self._law = self._law[idx]
        self._known = self._known[idx]
        self._tokens = self._tokens[:, : self.length]

    def append_rows(self, other: PrefixSession) -> None:
        """Move the rows of ``other`` (a session of the same policy; consumed, its cost and its
        not-yet-charged tokens move with it) after these rows."""
        if not isinstance(other, PrefixSession) or other._policy is not self._policy:
            raise TypeError("append_rows needs a PrefixSession of the same policy")
        # prompts are deduplicated (a state session merged every step must not grow)
        prompts = list(self._prompts)
        remap = []
        for p in other._prompts:
            if p not in prompts:
                prompts.append(p)
            remap.append(prompts.index(p))
        self._prompts = tuple(prompts)
        width = max(self._tokens.shape[1], other._tokens.shape[1])

        def pad(t: Tensor) -> Tensor:
            extra = torch.full((t.shape[0], width - t.shape[1]), self._eos, dtype=torch.long)
            return torch.cat([t, extra], dim=1)

        self._tokens = torch.cat([pad(self._tokens), pad(other._tokens)])
        self._lens = torch.cat([self._lens, other._lens])
        self._done = torch.cat([self._done, other._done])
        mapped = torch.tensor(remap, dtype=torch.long)[other._row_prompt]
        self._row_prompt = torch.cat([self._row_prompt, mapped])
        self._pending_rows = torch.cat([self._pending_rows, other._pending_rows])
        self._law = torch.cat([self._law, other._law])
        self._known = torch.cat([self._known, other._known])
        self._pending_shared += other._pending_shared
        self._forward += other._forward
        self._calls += other._calls

    def fork(self) -> PrefixSession:
        twin = copy.copy(self)
        twin._tokens = self._tokens.clone()
        twin._lens = self._lens.clone()
        twin._done = self._done.clone()
        twin._row_prompt = self._row_prompt.clone()
        twin._pending_rows = self._pending_rows.clone()
        twin._law = self._law.clone()
        twin._known = self._known.clone()
        twin._forward = 0
        twin._calls = 0
        return twin


def sequence_logprob_from_next(
    policy: ReferencePolicy, prompt: Seq, xs: Sequence[Seq], per_token: bool = False
) -> Tensor:
    """Reference implementation of ``sequence_logprob`` through batched ``next_logprobs`` calls.

    One call per position (rows still running at that position are batched), so a new policy gets a
    correct ``sequence_logprob`` for free.
    """
    xs = [tuple(x) for x in xs]
    length = max((len(x) for x in xs), default=0)
    per = torch.zeros((len(xs), length), dtype=torch.float64)
    for t in range(length):
        rows = [i for i, x in enumerate(xs) if len(x) > t]
        lp = policy.next_logprobs(prompt, [xs[i][:t] for i in rows]).to(torch.float64)
        toks = torch.tensor([xs[i][t] for i in rows], dtype=torch.long)
        per[rows, t] = lp.gather(1, toks[:, None]).squeeze(1)
    if per_token:
        return per
    return per.sum(dim=1)
