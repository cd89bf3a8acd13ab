r"""The decode session of a vLLM engine: :class:`VLLMSession`, rows as token lists.

A row is its context (the prompt as the model sees it) and its response tokens; nothing else is
kept on our side. There is no KV cache to manage: every engine call sends whole prompts
(context + response prefix + new tokens), and vLLM's automatic prefix caching finds the blocks it
computed before, so shared prefixes (a prompt under many rows, a chain's kept prefix, rows
selected many times) are computed once while they stay in its cache. ``extend``, ``truncate``,
``select`` and ``fork`` are therefore list operations and cost nothing.

Model calls: :meth:`VLLMSession.extend_and_score` (one call, ``prompt_logprobs``),
:meth:`VLLMSession.decode_rollouts` (the rollout level natively, one ``generate`` call plus at
most one scoring call: :func:`tiltsample.targets.vllm.rollouts.decode_rollouts`) and, only when
the engine returns full-vocabulary laws (``max_logprobs >= V``), :meth:`VLLMSession.logprobs`
(one call, ``logprobs=V``); otherwise ``logprobs`` raises
:class:`~tiltsample.policy.TokenLevelAccessError`.

Cost convention (:attr:`VLLMSession.cost`): ``model_calls`` counts engine calls (one
``generate`` call however many rows and positions it decodes); ``forward_tokens`` counts the
tokens of every prompt sent plus the generated tokens fed back (all but the last of each
request), i.e. what the engine would push through the model *without* prefix caching (how much
the cache saved is not observable from outside the engine): an upper bound on the actual
compute, comparable with a stateless recompute, not with a KV-cached session.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.capabilities import check_row_counts, check_row_indices, check_token_block
from tiltsample.targets.vllm.engine import Engine, token_level_error
from tiltsample.targets.vllm.rollouts import decode_rollouts
from tiltsample.types import Cost, Seq

__all__ = ["VLLMSession"]


class VLLMSession:
    """A :class:`~tiltsample.policy.RaggedDecodeSession` and
    :class:`~tiltsample.policy.RolloutSession` of a vLLM engine (see the module docstring).

    Parameters
    ----------
    engine
        The :class:`~tiltsample.targets.vllm.engine.Engine`.
    eos_id
        The end-of-sequence id: rows that received it are padded with it and report a point
        mass on it.
    contexts
        The context of every row (prompt ids as the model sees them, non-empty).
    """

    def __init__(self, engine: Engine, eos_id: int, contexts: Sequence[Seq]) -> None:
        self._engine = engine
        self._eos = eos_id
        self._vocab = engine.vocab_size
        self._ctx: list[Seq] = [tuple(c) for c in contexts]
        self._resp: list[list[int]] = [[] for _ in self._ctx]
        self._done: list[bool] = [False] * len(self._ctx)
        self._law: Tensor | None = None
        self._forward = 0
        self._calls = 0

    # ------------------------------------------------------------------ protocol
    @property
    def engine(self) -> Engine:
        """The engine every call of this session goes to."""
        return self._engine

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def batch_size(self) -> int:
        return len(self._ctx)

    @property
    def length(self) -> int:
        return max((len(r) for r in self._resp), default=0)

    @property
    def cost(self) -> Cost:
        return Cost(forward_tokens=self._forward, model_calls=self._calls)

    def row_lengths(self) -> Tensor:
        return torch.tensor([len(r) for r in self._resp], dtype=torch.long)

    def tokens(self) -> Tensor:
        out = torch.full((self.batch_size, self.length), self._eos, dtype=torch.long)
        for i, r in enumerate(self._resp):
            if r:
                out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def prompts(self) -> list[Seq]:
        """Every row as the engine sees it: context + response tokens."""
        return [c + tuple(r) for c, r in zip(self._ctx, self._resp, strict=True)]

    def ended(self) -> list[bool]:
        """Whether each row has received EOS."""
        return list(self._done)

    def charge(self, cost: Cost) -> None:
        """Add the forward tokens and model calls of engine calls made for this session."""
        self._forward += cost.forward_tokens
        self._calls += cost.model_calls

    def logprobs(self) -> Tensor:
        """``[B, V]`` float64 temperature-1 next-token laws (one engine call, ``logprobs=V``;
        ended rows: a point mass on EOS). Needs full-vocabulary laws from the engine:
        :class:`~tiltsample.policy.TokenLevelAccessError` otherwise."""
        if not self._engine.full_vocabulary:
            what = "reading next-token laws (DecodeSession.logprobs)"
            raise token_level_error(what, self._engine)
        if self._law is not None:
            return self._law
        law = torch.full((self.batch_size, self._vocab), -math.inf, dtype=torch.float64)
        law[:, self._eos] = 0.0
        open_rows = [i for i, d in enumerate(self._done) if not d]
        if open_rows:
            prompts = [self._ctx[i] + tuple(self._resp[i]) for i in open_rows]
            law[open_rows] = self._engine.next_laws(prompts)
            self.charge(Cost(forward_tokens=sum(len(p) for p in prompts), model_calls=1))
        self._law = law
        return law

    def extend(self, tokens: Tensor) -> None:
        block = check_token_block(tokens, self.batch_size, self._vocab)
        if block.shape[1]:
            self._append(block.tolist())

    def extend_and_score(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` ``[B, k]`` and return their temperature-1 log-probs ``[B, k]``
        float64 from one engine call (``prompt_logprobs`` on context + row + tokens; entries
        after a row's EOS are 0). See :func:`tiltsample.policy.extend_and_score`."""
        block = check_token_block(tokens, self.batch_size, self._vocab)
        out = torch.zeros(tuple(block.shape), dtype=torch.float64)
        before = self.prompts()
        done = list(self._done)
        held = self._append(block.tolist())
        rows = [i for i in range(self.batch_size) if not done[i] and held[i]]
        if rows:
            scored = [before[i] + tuple(held[i]) for i in rows]
            got = self._engine.prompt_scores(scored, [len(before[i]) for i in rows])
            for i, values in zip(rows, got, strict=True):
                out[i, : len(values)] = torch.tensor(values, dtype=torch.float64)
            self.charge(Cost(forward_tokens=sum(len(p) for p in scored), model_calls=1))
        return out

    def score_continuations(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Native :func:`tiltsample.decode_engine.score_continuations`: append ``tokens``
        ``[B, k]`` and return their log-probs (0 past ``lengths[r]`` and after EOS)."""
        lp = self.extend_and_score(tokens)
        real = torch.arange(lp.shape[1])[None, :] < torch.as_tensor(lengths)[:, None]
        return torch.where(real, lp, torch.zeros_like(lp))

    def decode_rollouts(self, generator: Any, request: Any) -> Any:
        """Native :func:`tiltsample.decode_engine.decode` (``DecodeRequest`` in, ``Decoded``
        out): :func:`tiltsample.targets.vllm.rollouts.decode_rollouts`."""
        return decode_rollouts(self, generator, request)

    def truncate(self, n: int) -> None:
        low = min((len(r) for r in self._resp), default=0)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= low:
            raise ValueError(f"n must be an int in [0, length={low}], got {n!r}")
        if n:
            self.truncate_rows(torch.full((self.batch_size,), n, dtype=torch.long))

    def truncate_rows(self, n: Tensor) -> None:
        counts = check_row_counts(n, self.row_lengths()).tolist()
        for i, c in enumerate(counts):
            if c:
                del self._resp[i][len(self._resp[i]) - c :]
                self._done[i] = self._eos in self._resp[i]
        if any(counts):
            self._law = None

    def select(self, indices: Tensor) -> None:
        idx = check_row_indices(indices, self.batch_size)
        order = idx.tolist()
        self._ctx = [self._ctx[i] for i in order]
        self._resp = [list(self._resp[i]) for i in order]
        self._done = [self._done[i] for i in order]
        self._law = None if self._law is None else self._law[idx]

    def append_rows(self, other: VLLMSession) -> None:
        """Move the rows of ``other`` (a session of the same engine; consumed, its cost moves
        with it) after these rows."""
        if not isinstance(other, VLLMSession) or other._engine is not self._engine:
            raise TypeError("append_rows needs a VLLMSession of the same engine")
        self._ctx += other._ctx
        self._resp += [list(r) for r in other._resp]
        self._done += other._done
        self._law = None
        self.charge(other.cost)

    def fork(self) -> VLLMSession:
        twin = copy.copy(self)
        twin._ctx = list(self._ctx)
        twin._resp = [list(r) for r in self._resp]
        twin._done = list(self._done)
        twin._forward = twin._calls = 0
        return twin

    # ------------------------------------------------------------------ internals
    def _append(self, block: list[list[int]]) -> list[list[int]]:
        """Append one row of ``block`` to every row (EOS after a row's EOS); return, per row,
        the tokens it held before its first EOS, that EOS included (the ones to score)."""
        fresh: list[list[int]] = []
        for i, row in enumerate(block):
            scored: list[int] = []
            for t in row:
                if self._done[i]:
                    self._resp[i].append(self._eos)
                    continue
                self._resp[i].append(t)
                scored.append(t)
                self._done[i] = t == self._eos
            fresh.append(scored)
        self._law = None
        return fresh


def check_contexts(prompts: Sequence[Seq], rows_per_prompt: Sequence[int]) -> list[Seq]:
    """The row contexts of a multi-prompt session (``ValueError`` on mismatched counts)."""
    if len(prompts) != len(rows_per_prompt):
        raise ValueError("rows_per_prompt must hold one count per prompt")
    out: list[Seq] = []
    for p, c in zip(prompts, rows_per_prompt, strict=True):
        out += [tuple(p)] * validation.non_negative_int("rows_per_prompt", c)
    return out
