"""Reference-policy and decode-session protocols, and the default session.

A *reference policy* is the model ``p_ref(x | y)`` that every target tilts. Any object with the
attributes of :class:`ReferencePolicy` works (structural typing; no subclassing of project classes).
A policy that also has ``session(prompt, batch)`` supplies its own fast, stateful
:class:`DecodeSession` (the HF backend wraps a KV cache); otherwise :func:`open_session` builds a
:class:`PrefixSession` from ``next_logprobs`` so that a new policy works before it is fast.
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


class PrefixSession:
    """Default :class:`DecodeSession` built from ``policy.next_logprobs``.

    Parameters
    ----------
    policy
        Any :class:`ReferencePolicy`.
    prompt
        The prompt shared by all rows.
    batch
        Number of rows.
    accounting
        ``"recompute"`` (default) counts what a stateless model would process: every call pushes
        ``len(prompt) + len(prefix)`` tokens per live row. ``"cached"`` counts what an ideal
        KV-cached model would process: the prompt once, then each appended token once per row (plus
        one re-fed token per row after a :meth:`truncate`). Table-backed toy policies use
        ``"cached"`` so that their costs are those of a perfect cache.
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
        self._policy = policy
        self._prompt = tuple(prompt)
        self._eos = int(policy.eos_id)
        self._vocab = int(policy.vocab_size)
        self._accounting = accounting
        self._tokens = torch.zeros((batch, 0), dtype=torch.long)
        self._done = torch.zeros(batch, dtype=torch.bool)
        self._cache: Tensor | None = None
        # cached accounting: tokens appended but not yet pushed through the model
        self._pending_shared = max(len(self._prompt), 1) if accounting == "cached" else 0
        self._pending_rows = torch.zeros(batch, dtype=torch.long)
        self._forward = 0
        self._calls = 0

    @property
    def batch_size(self) -> int:
        return int(self._tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self._tokens.shape[1])

    @property
    def cost(self) -> Cost:
        return Cost(forward_tokens=self._forward, model_calls=self._calls)

    def tokens(self) -> Tensor:
        return self._tokens.clone()

    def logprobs(self) -> Tensor:
        if self._cache is not None:
            return self._cache
        batch = self.batch_size
        out = torch.full((batch, self._vocab), -torch.inf, dtype=torch.float64)
        out[:, self._eos] = 0.0
        live = (~self._done).nonzero().flatten().tolist()
        if live:
            prefixes = [tuple(row) for row in self._tokens[live].tolist()]
            lp = self._policy.next_logprobs(self._prompt, prefixes)
            if tuple(lp.shape) != (len(live), self._vocab):
                raise ValueError(
                    f"policy.next_logprobs returned shape {tuple(lp.shape)}, "
                    f"expected ({len(live)}, vocab_size={self._vocab})"
                )
            out[live] = lp.to(torch.float64)
            self._calls += 1
            if self._accounting == "recompute":
                self._forward += len(live) * (len(self._prompt) + self.length)
        if self._accounting == "cached" and (
            self._pending_shared or bool(self._pending_rows.any())
        ):
            if not live:
                self._calls += 1
            self._forward += self._pending_shared + int(self._pending_rows.sum())
            self._pending_shared = 0
            self._pending_rows.zero_()
        self._cache = out
        return out

    def extend(self, tokens: Tensor) -> None:
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        if tokens.dim() != 2 or tokens.shape[0] != self.batch_size:
            raise ValueError(
                f"tokens must have shape [B] or [B, k] with B={self.batch_size}, "
                f"got {tuple(tokens.shape)}"
            )
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self._vocab):
            raise ValueError(f"tokens must lie in [0, vocab_size={self._vocab})")
        # rows that already ended keep EOS padding whatever the caller passes
        tokens = torch.where(self._done[:, None], torch.full_like(tokens, self._eos), tokens)
        self._tokens = torch.cat([self._tokens, tokens], dim=1)
        self._done = self._done | (tokens == self._eos).any(dim=1)
        self._pending_rows += tokens.shape[1]
        self._cache = None

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"n must lie in [0, length={self.length}], got {n}")
        if n == 0:
            return
        self._tokens = self._tokens[:, : self.length - n]
        self._done = (self._tokens == self._eos).any(dim=1)
        self._pending_rows = torch.clamp(self._pending_rows - n, min=1)
        self._cache = None

    def select(self, indices: Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
            raise ValueError(f"indices must lie in [0, batch_size={self.batch_size})")
        self._tokens = self._tokens[idx]
        self._done = self._done[idx]
        self._pending_rows = self._pending_rows[idx]
        self._cache = None if self._cache is None else self._cache[idx]

    def fork(self) -> PrefixSession:
        twin = copy.copy(self)
        twin._tokens = self._tokens.clone()
        twin._done = self._done.clone()
        twin._pending_rows = self._pending_rows.clone()
        twin._cache = None if self._cache is None else self._cache.clone()
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
