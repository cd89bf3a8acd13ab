"""Optional session capabilities, each with a helper that falls back for sessions lacking it.

* ragged rows (:class:`~tiltsample.policy_protocols.RaggedDecodeSession`): :func:`truncate_rows`
  cuts every row by its own amount, :func:`row_lengths` reads the lengths (fallback: the
  :class:`RaggedGroups` adapter);
* :func:`extend_and_score`: append ``[B, k]`` given tokens and return their log-probs ``[B, k]``
  in one model call (fallback: :func:`score_token_by_token`);
* :func:`append_rows`: move the rows of one session after those of another (fallback:
  :class:`RaggedGroups`).

:class:`TokenLevelAccessError` is the error of a session or policy that works at the rollout
level only (a serving engine that cannot return full next-token laws) when it is asked for them:
every sampler that needs token-level access fails with it at its first ``logprobs()`` call.

Everything here is re-exported by :mod:`tiltsample.policy`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.policy_protocols import DecodeSession
from tiltsample.types import Cost

__all__ = [
    "RaggedGroups",
    "TokenLevelAccessError",
    "append_rows",
    "check_row_counts",
    "check_row_indices",
    "check_token_block",
    "extend_and_score",
    "row_lengths",
    "score_token_by_token",
    "supports_ragged",
    "truncate_rows",
]


class TokenLevelAccessError(RuntimeError):
    """A policy or session cannot give token-level access (full next-token laws ``[B, V]``).

    Raised by rollout-level backends (:class:`~tiltsample.policy.RolloutSession`) from
    ``logprobs()`` / ``next_logprobs`` and by their native decoding when a request needs the
    laws (per-token entropies, teacher forcing at a temperature other than 1). The message names
    what needed them and the ways out (a rollout-level sampler, another backend).
    """


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


def check_row_counts(n: Tensor | Sequence[int], lengths: Tensor) -> Tensor:
    """``n`` as a ``LongTensor[B]`` of per-row cuts after checking its shape against ``lengths``
    and that ``0 <= n[r] <= lengths[r]``; ragged sessions call it in ``truncate_rows``."""
    counts = torch.as_tensor(n, dtype=torch.long)
    if counts.shape != lengths.shape:
        raise ValueError(
            f"n must have shape [B] = {tuple(lengths.shape)}, got {tuple(counts.shape)}"
        )
    if counts.numel() and (bool((counts < 0).any()) or bool((counts > lengths).any())):
        raise ValueError("n[r] must lie in [0, row length] for every row r")
    return counts


def check_row_indices(indices: Tensor | Sequence[int], batch_size: int) -> Tensor:
    """``indices`` as a 1-D ``LongTensor`` after checking that every entry lies in
    ``[0, batch_size)``; sessions call it in ``select``."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= batch_size):
        raise ValueError(f"indices must lie in [0, batch_size={batch_size})")
    return idx


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
    counts = check_row_counts(n, row_lengths(session))
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
        counts = check_row_counts(n, self.row_lengths())
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
        idx = check_row_indices(indices, self._batch)
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
