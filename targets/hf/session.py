"""The KV-cached decode session of a causal LM: :class:`HFSession`."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.policy import check_row_indices, check_token_block
from tiltsample.targets.hf.cache import (
    LogitsModel,
    concat_rows,
    fork_cache,
    prefill,
    select_rows,
    tidy_columns,
)
from tiltsample.targets.hf.devices import to_host
from tiltsample.types import Cost, Seq

__all__ = ["HFSession"]


class HFSession:
    """A batched, KV-cached :class:`~tiltsample.policy.RaggedDecodeSession` of an
    :class:`~tiltsample.targets.hf.HFPolicy`.

    Layout: one ``DynamicCache`` of ``T`` columns shared by the ``B`` rows, a boolean ``[B, T]``
    *live* mask, and per row its prompt, its response tokens and the cache column of each of them.
    A column holds a context or response token of a row; a row's new tokens attend only to its live
    columns (the mask is passed as the 2-D ``attention_mask``) and get explicit ``position_ids``
    ``len(context_r) + i``, so rows of different lengths, cut at different places or continuing
    different prompts share every forward call without re-encoding anything:

    * the prompt(s) are encoded **once** (one batch of the distinct prompts, right-padded), and
      the cache is expanded to the rows with ``batch_select_indices``;
    * ``extend`` only records tokens (at each row's own position); the next ``logprobs`` pushes
      every row's pending tokens through the model in one call (right-aligned in a ``[B, k]``
      block, padding slots masked), asking for the last position's logits only;
    * ``truncate_rows(n)`` marks the cut tokens' columns dead (the last kept token is re-fed, as
      no per-position law is stored); columns dead in every row at the end are cropped, and when
      holes exceed a fifth of the columns (and 8) the cache is compacted (each row's live columns
      gathered to the left; keys already carry their rotary positions, so moving them is exact);
    * ``extend_and_score(tokens)`` pushes the pending and the ``k`` given tokens in one call and
      reads the log-prob of every given token;
    * ``select(indices)`` gathers cache rows (``batch_select_indices``; repeats allowed);
    * ``fork()`` copies the cache *by reference*: ``DynamicLayer`` updates rebind their tensors
      (``torch.cat``, slicing, indexing, gathering) and never write in place, so two forks share
      the common prefix's memory until one of them changes it (copy-on-write). Cache layers of
      other types are deep-copied (and never compacted).

    Devices: the KV cache lives on the policy's device; the bookkeeping above (tokens, lengths,
    the live mask, laws) stays on the CPU. A forward call's ids, mask and positions are built on
    the CPU and moved by :meth:`~tiltsample.targets.hf.HFPolicy.forward_logits`; logits are
    normalised in float64 on the device and only the ``[B, V]`` law (or the gathered scores of
    ``extend_and_score``) is copied back, so :meth:`logprobs` is always float64 on the CPU.

    Rows that ended with EOS report a point mass on EOS; their EOS padding is recorded but never
    pushed through the model. Cost: the prefill counts the distinct contexts' tokens once; every
    later call counts ``B × k`` tokens for a ``[B, k]`` block (padding slots included: the model
    computes them).
    """

    def __init__(self, policy: LogitsModel, prompt: Seq, batch: int) -> None:
        validation.non_negative_int("batch", batch)
        self._setup(policy, [policy.context(prompt)], [batch])

    @classmethod
    def multi(
        cls, policy: LogitsModel, prompts: Sequence[Seq], rows_per_prompt: Sequence[int]
    ) -> HFSession:
        """``rows_per_prompt[i]`` empty rows after ``prompts[i]`` (rows ordered by prompt)."""
        if len(prompts) != len(rows_per_prompt):
            raise ValueError("rows_per_prompt must hold one count per prompt")
        for c in rows_per_prompt:
            validation.non_negative_int("rows_per_prompt", c)
        self = cls.__new__(cls)
        self._setup(policy, [policy.context(p) for p in prompts], list(rows_per_prompt))
        return self

    def _setup(self, policy: LogitsModel, contexts: list[Seq], counts: list[int]) -> None:
        self._policy = policy
        self._contexts = contexts
        batch = sum(counts)
        self._row_prompt = torch.repeat_interleave(
            torch.arange(len(counts), dtype=torch.long), torch.tensor(counts, dtype=torch.long)
        )
        ctx_len = torch.tensor([len(c) for c in contexts], dtype=torch.long)
        self._ctx_len = ctx_len[self._row_prompt] if batch else torch.zeros(0, dtype=torch.long)
        self._eos = policy.eos_id
        self._vocab = policy.vocab_size
        self._tokens = torch.full((batch, 0), self._eos, dtype=torch.long)
        self._lens = torch.zeros(batch, dtype=torch.long)
        self._done = torch.zeros(batch, dtype=torch.bool)
        self._cache: Any = None
        self._live = torch.zeros((batch, 0), dtype=torch.bool)
        self._col = torch.zeros((batch, 0), dtype=torch.long)
        self._cached = torch.zeros(batch, dtype=torch.long)
        self._prompt_laws: Tensor | None = None
        self._law = torch.zeros((batch, self._vocab), dtype=torch.float64)
        self._known = torch.zeros(batch, dtype=torch.bool)
        self._forward = 0
        self._calls = 0

    # ------------------------------------------------------------------ protocol
    @property
    def batch_size(self) -> int:
        return int(self._tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self._lens.max()) if self._lens.numel() else 0

    @property
    def cost(self) -> Cost:
        return Cost(forward_tokens=self._forward, model_calls=self._calls)

    @property
    def cached_length(self) -> int:
        """Response tokens held in the KV cache by every row (the rest are pending)."""
        if self._cache is None or not self._cached.numel():
            return 0
        return int(self._cached.min())

    @property
    def cache_columns(self) -> int:
        """Columns of the KV cache (context, live response tokens and holes)."""
        return int(self._live.shape[1]) if self._cache is not None else 0

    def row_lengths(self) -> Tensor:
        return self._lens.clone()

    def tokens(self) -> Tensor:
        return self._tokens[:, : self.length].clone()

    def logprobs(self) -> Tensor:
        if not bool(self._known.all()):
            self._compute()
        return self._law

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        return check_token_block(tokens, self.batch_size, self._vocab)

    def _append(self, tokens: Tensor) -> Tensor:
        k = tokens.shape[1]
        if k == 1:  # nothing can follow an EOS inside a one-token block
            held = torch.where(self._done[:, None], self._eos, tokens)
        else:
            is_eos = (tokens == self._eos).long()
            after = (torch.cumsum(is_eos, dim=1) - is_eos) > 0
            held = torch.where(self._done[:, None] | after, self._eos, tokens)
        need = self.length + k
        if need > self._tokens.shape[1]:
            grow = need - self._tokens.shape[1]
            self._tokens = torch.cat(
                [self._tokens, torch.full((self.batch_size, grow), self._eos, dtype=torch.long)], 1
            )
            self._col = torch.cat(
                [self._col, torch.zeros((self.batch_size, grow), dtype=torch.long)], 1
            )
        cols = self._lens[:, None] if k == 1 else self._lens[:, None] + torch.arange(k)[None, :]
        self._tokens.scatter_(1, cols, held)
        self._lens = self._lens + k
        self._done = self._done | (held == self._eos).any(dim=1)
        self._known[:] = False
        return held

    def extend(self, tokens: Tensor) -> None:
        tokens = self._check_tokens(tokens)
        if tokens.shape[1] == 0:
            return
        self._append(tokens)

    def extend_and_score(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` ``[B, k]`` and return their log-probs ``[B, k]`` from one forward call.

        See :func:`tiltsample.policy.extend_and_score` (temperature 1, float64; entries after a
        row's EOS are 0). The pending tokens and the ``k`` new ones go through the model together;
        the law after the block is kept, so the next :meth:`logprobs` is free.
        """
        tokens = self._check_tokens(tokens)
        batch, k = tokens.shape
        out = torch.zeros((batch, k), dtype=torch.float64)
        if k == 0 or batch == 0:
            if k:
                self._append(tokens)
            return out
        if self._cache is None:
            self._prefill()
        done_before = self._done.clone()
        pending_before = self._lens - self._cached
        first_law = self._law.clone()
        held = self._append(tokens)
        rows = ~done_before
        logits, width = self._forward_pending(rows, last_only=False)
        # slot of the token that precedes new token i of row r: width - k - 1 + i
        for i in range(k):
            slot = width - k - 1 + i
            tok = held[:, i]
            if i == 0:
                # the law before the block: stored, the prompt's, or the last pending slot
                assert self._prompt_laws is not None
                base = torch.where(
                    (self._lens - k == 0)[:, None],
                    self._prompt_laws[self._row_prompt],
                    first_law,
                )
                lp_known = base.gather(1, tok[:, None]).squeeze(1)
                use_slot = rows & (pending_before > 0)
                if bool(use_slot.any()):
                    lp_known = torch.where(use_slot, _token_logprob(logits[:, slot], tok), lp_known)
                got = lp_known
            else:
                got = _token_logprob(logits[:, slot], tok)
            ended_before = (held[:, :i] == self._eos).any(dim=1) if i else torch.zeros_like(rows)
            out[:, i] = torch.where(rows & ~ended_before, got, torch.zeros_like(got))
        law = to_host(torch.log_softmax(logits[:, width - 1].to(torch.float64), dim=-1))
        self._set_laws(law, rows)
        return out

    def truncate(self, n: int) -> None:
        low = int(self._lens.min()) if self._lens.numel() else 0
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= low:
            raise ValueError(f"n must be an int in [0, length={low}], got {n!r}")
        if n == 0:
            return
        self.truncate_rows(torch.full((self.batch_size,), n, dtype=torch.long))

    def truncate_rows(self, n: Tensor) -> None:
        counts = torch.as_tensor(n, dtype=torch.long)
        if counts.shape != self._lens.shape:
            raise ValueError(
                f"n must have shape [B] = {tuple(self._lens.shape)}, got {tuple(counts.shape)}"
            )
        if counts.numel() and (bool((counts < 0).any()) or bool((counts > self._lens).any())):
            raise ValueError("n[r] must lie in [0, row length] for every row r")
        cut = counts > 0
        if not bool(cut.any()):
            return
        self._lens = self._lens - counts
        pos = torch.arange(self._tokens.shape[1])[None, :]
        inside = pos < self._lens[:, None]
        self._tokens = torch.where(inside, self._tokens, torch.full_like(self._tokens, self._eos))
        self._done = ((self._tokens == self._eos) & inside).any(dim=1)
        self._known = self._known & ~cut
        if self._cache is not None:
            # keep at most len - 1 cached response tokens: the last token is re-fed (for an
            # emptied row the prompt's law is stored)
            keep = torch.where(cut, (self._lens - 1).clamp(min=0), self._cached)
            keep = torch.minimum(keep, self._cached)
            dead = (pos >= keep[:, None]) & (pos < self._cached[:, None])
            if bool(dead.any()):
                r, i = dead.nonzero(as_tuple=True)
                self._live[r, self._col[r, i]] = False
            self._cached = keep
            self._tidy()
        width = self.length
        self._tokens = self._tokens[:, :width]
        self._col = self._col[:, :width]

    def select(self, indices: Tensor) -> None:
        idx = check_row_indices(indices, self.batch_size)
        self._tokens = self._tokens[idx]
        self._lens = self._lens[idx]
        self._done = self._done[idx]
        self._row_prompt = self._row_prompt[idx]
        self._ctx_len = self._ctx_len[idx]
        self._law = self._law[idx]
        self._known = self._known[idx]
        self._cached = self._cached[idx]
        self._col = self._col[idx]
        self._live = self._live[idx]
        width = self.length
        self._tokens = self._tokens[:, :width]
        self._col = self._col[:, :width]
        if self._cache is not None:
            if idx.numel() == 0:
                self._cache = None
                self._live = torch.zeros((0, 0), dtype=torch.bool)
            else:
                select_rows(self._cache, idx)
                self._tidy()

    def append_rows(self, other: HFSession) -> None:
        """Move the rows of ``other`` (a session of the same policy; consumed, its cost moves
        with it) after these rows: the shorter KV cache is padded with masked columns and the
        batches are concatenated (``DynamicLayer`` caches only)."""
        if not isinstance(other, HFSession) or other._policy is not self._policy:
            raise TypeError("append_rows needs an HFSession of the same policy")
        for s in (self, other):
            if s.batch_size and s._cache is None:
                s._prefill()
        # contexts are deduplicated (a state session merged every step must not grow)
        contexts = list(self._contexts)
        remap: list[int] = []
        for c in other._contexts:
            if c not in contexts:
                contexts.append(c)
            remap.append(contexts.index(c))
        if self._prompt_laws is not None or other._prompt_laws is not None:
            laws = torch.full((len(contexts), self._vocab), -math.inf, dtype=torch.float64)
            if self._prompt_laws is not None:
                laws[: len(self._contexts)] = self._prompt_laws
            if other._prompt_laws is not None:
                for i, j in enumerate(remap):
                    if bool(torch.isfinite(other._prompt_laws[i]).any()):
                        laws[j] = other._prompt_laws[i]
            self._prompt_laws = laws
        self._contexts = contexts
        if other._cache is None:  # other has no rows
            pass
        elif self._cache is None:  # this session has no rows
            self._cache = other._cache
            self._live = other._live
        else:
            self._live = concat_rows(self._cache, self._live, other._cache, other._live)
        tok_width = max(self._tokens.shape[1], other._tokens.shape[1])

        def pad(t: Tensor, fill: int) -> Tensor:
            return torch.nn.functional.pad(t, (0, tok_width - t.shape[1]), value=fill)

        self._tokens = torch.cat([pad(self._tokens, self._eos), pad(other._tokens, self._eos)])
        self._col = torch.cat([pad(self._col, 0), pad(other._col, 0)])
        for name in ("_lens", "_done", "_ctx_len", "_law", "_known", "_cached"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        mapped = torch.tensor(remap, dtype=torch.long)[other._row_prompt]
        self._row_prompt = torch.cat([self._row_prompt, mapped])
        self._forward += other._forward
        self._calls += other._calls

    def fork(self) -> HFSession:
        twin = copy.copy(self)
        for name in (
            "_tokens",
            "_lens",
            "_done",
            "_row_prompt",
            "_ctx_len",
            "_law",
            "_known",
            "_cached",
            "_col",
            "_live",
        ):
            setattr(twin, name, getattr(self, name).clone())
        twin._cache = None if self._cache is None else fork_cache(self._cache)
        twin._forward = 0
        twin._calls = 0
        return twin

    # ------------------------------------------------------------------ internals
    def _prefill(self) -> None:
        """Encode the distinct contexts once (right-padded batch); expand the cache to the rows."""
        out = prefill(
            self._policy, self._contexts, self._row_prompt, self._eos, self._vocab, self.batch_size
        )
        self._forward += out.forward_tokens
        self._calls += 1
        self._prompt_laws = out.prompt_laws
        self._cache = out.cache
        self._live = out.live
        self._cached = torch.zeros(self.batch_size, dtype=torch.long)

    def _set_laws(self, law: Tensor, rows: Tensor) -> None:
        """Store ``law`` for ``rows``; prompt laws for empty rows; point masses for ended rows."""
        assert self._prompt_laws is not None
        new = law if bool(rows.all()) else torch.where(rows[:, None], law, self._law)
        empty = (self._lens == 0) & ~self._known
        if bool(empty.any()):
            new = torch.where(empty[:, None], self._prompt_laws[self._row_prompt], new)
        if bool(self._done.any()):
            new[self._done] = -math.inf
            new[self._done, self._eos] = 0.0
        self._law = new
        self._known[:] = True

    def _compute(self) -> None:
        if self.batch_size == 0:
            self._known[:] = True
            return
        if self._cache is None:
            self._prefill()
        rows = ~self._known & ~self._done & (self._lens > 0)
        law = self._law
        if bool(rows.any()):
            logits, _ = self._forward_pending(rows, last_only=True)  # [B, V]: last slot
            law = to_host(torch.log_softmax(logits.to(torch.float64), dim=-1))
        self._set_laws(law, rows)

    def _forward_pending(self, rows: Tensor, *, last_only: bool) -> tuple[Tensor, int]:
        """Push the pending tokens of ``rows`` (right-aligned) through the model in one call."""
        pending = torch.where(rows, self._lens - self._cached, torch.zeros_like(self._lens))
        if bool((rows & (pending <= 0)).any()):  # pragma: no cover - guarded by the invariant
            raise RuntimeError("HFSession lost its next-token law; this is a bug")
        width = int(pending.max())
        batch = self.batch_size
        slot = torch.arange(width)[None, :]
        if width == 1:  # one token per row (decoding): the rows' next tokens, no alignment
            real = rows[:, None]
            index = self._cached[:, None]
        else:
            start = width - pending  # first real slot of each row
            real = slot >= start[:, None]
            index = (self._cached[:, None] + slot - start[:, None]).clamp(min=0)
        index = index.clamp(max=max(self._tokens.shape[1] - 1, 0))
        ids = torch.where(real, self._tokens.gather(1, index), torch.full_like(index, self._eos))
        positions = torch.where(real, self._ctx_len[:, None] + index, torch.zeros_like(index))
        mask = torch.cat([self._live, real], dim=1)
        logits, _ = self._policy.forward_logits(  # moves ids, mask and positions to the device
            ids,
            cache=self._cache,
            attention_mask=mask,
            position_ids=positions,
            last_only=last_only,
        )
        self._forward += batch * width
        self._calls += 1
        columns = self._live.shape[1] + slot.expand(batch, -1)
        r_idx, s_idx = real.nonzero(as_tuple=True)
        self._col[r_idx, index[r_idx, s_idx]] = columns[r_idx, s_idx]
        self._live = mask
        self._cached = torch.where(rows, self._lens, self._cached)
        return logits, width

    def _tidy(self) -> None:
        """Crop columns dead in every row at the end; compact when holes dominate."""
        self._live, self._col = tidy_columns(self._cache, self._live, self._col, self._cached)


def _token_logprob(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)[r, tokens[r]]`` per row, in float64 on the logits' device; returned
    on the CPU (only ``[B]`` scores cross the bus)."""
    row = logits.to(torch.float64)
    tok = tokens.to(row.device)
    return to_host(row.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(row, dim=-1))
