"""The default decode session, built from ``policy.next_logprobs``: :class:`PrefixSession`.

Re-exported by :mod:`tiltsample.policy`, whose :func:`~tiltsample.policy.open_session` uses it
for a policy without a ``session`` method, so that a new policy works before it is fast.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from tiltsample.capabilities import check_row_counts, check_row_indices, check_token_block
from tiltsample.policy_protocols import ReferencePolicy
from tiltsample.types import Cost, Seq

__all__ = ["PrefixSession", "prompt_counts"]


def prompt_counts(
    prompts: Sequence[Seq], rows_per_prompt: int | Sequence[int]
) -> tuple[list[Seq], list[int]]:
    """The prompts as tuples and one row count per prompt (an int is repeated), checked;
    used by :meth:`PrefixSession.multi` and :func:`tiltsample.policy.open_session_multi`."""
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
        listed, counts = prompt_counts(prompts, rows_per_prompt)
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
        """:func:`~tiltsample.policy.extend_and_score` in one ``next_logprobs`` call per prompt
        (the ``k - 1`` inner prefixes of every live row at once; the law after the block stays
        lazy, as a policy need not define it past its cap)."""
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
        counts = check_row_counts(n, self._lens)
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
        idx = check_row_indices(indices, self.batch_size)
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
