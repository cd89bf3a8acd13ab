r"""Explicit autoregressive tables: the exactly enumerable toy reference policy.

A :class:`TabularPolicy` stores ``p(. | x_<t)`` for every EOS-free prefix shorter than ``max_len``.
It ignores the prompt (a toy has one context). Its sessions use *cached* accounting
(:class:`~tiltsample.policy.PrefixSession`): a table lookup costs what an ideal KV cache would.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.policy import DecodeSession, PrefixSession, sequence_logprob_from_next
from tiltsample.types import Seq


class TabularPolicy:
    """A reference policy given by an explicit next-token table.

    Parameters
    ----------
    vocab_size
        ``V >= 2`` (EOS included).
    eos_id
        The EOS id.
    max_len
        Longest response the table covers; prefixes of length ``< max_len`` must be present.
    log_probs
        ``{prefix: Tensor[V]}`` of normalised next-token log-probabilities for every EOS-free
        prefix of length ``< max_len`` (entries may be ``-inf``; a prefix whose mass is all on
        tokens that never occur may be omitted only if it is unreachable).
    """

    def __init__(
        self, vocab_size: int, eos_id: int, max_len: int, log_probs: Mapping[Seq, Tensor]
    ) -> None:
        self._vocab = validation.positive_int("vocab_size", vocab_size)
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (EOS plus one token), got {vocab_size}")
        self._eos = validation.token_id("eos_id", eos_id, vocab_size)
        self.max_len = validation.positive_int("max_len", max_len)
        table: dict[Seq, Tensor] = {}
        for prefix, row in log_probs.items():
            row = torch.as_tensor(row, dtype=torch.float64)
            if row.shape != (vocab_size,):
                raise ValueError(f"log_probs[{prefix}] must have shape ({vocab_size},)")
            if bool(torch.isnan(row).any()):
                raise ValueError(f"log_probs[{prefix}] contains NaN")
            total = float(torch.logsumexp(row, 0))
            if not abs(total) < 1e-9:
                raise ValueError(f"log_probs[{prefix}] is not normalised (logsumexp={total:.3g})")
            if self._eos in prefix or len(prefix) >= max_len:
                raise ValueError(f"prefix {prefix} contains EOS or is not shorter than max_len")
            table[tuple(prefix)] = row
        self._table = table

    @classmethod
    def from_probs(
        cls,
        vocab_size: int,
        eos_id: int,
        max_len: int,
        probs: Mapping[Seq, Sequence[float]],
    ) -> TabularPolicy:
        """Build from probabilities (zeros become ``-inf`` log-probabilities)."""
        rows = {k: torch.log(torch.tensor(v, dtype=torch.float64)) for k, v in probs.items()}
        return cls(vocab_size, eos_id, max_len, rows)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def table(self) -> dict[Seq, Tensor]:
        """The next-token table (a copy of the mapping; rows are shared)."""
        return dict(self._table)

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        rows = []
        for prefix in prefixes:
            key = tuple(prefix)
            if key not in self._table:
                raise KeyError(
                    f"TabularPolicy has no row for prefix {key} (length {len(key)}, "
                    f"max_len={self.max_len}); prefixes must be EOS-free and shorter than max_len"
                )
            rows.append(self._table[key])
        if not rows:
            return torch.zeros((0, self._vocab), dtype=torch.float64)
        return torch.stack(rows)

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        return sequence_logprob_from_next(self, prompt, xs, per_token)

    def session(self, prompt: Seq, batch: int) -> DecodeSession:
        """A stateless session with ideal-KV-cache accounting."""
        return PrefixSession(self, prompt, batch, accounting="cached")

    def session_multi(
        self, prompts: Sequence[Seq], rows_per_prompt: Sequence[int]
    ) -> DecodeSession:
        """Rows of several prompts in one stateless session (the table ignores the prompt)."""
        return PrefixSession.multi(self, prompts, rows_per_prompt, accounting="cached")

    def __repr__(self) -> str:
        return f"TabularPolicy(V={self._vocab}, eos={self._eos}, max_len={self.max_len})"


def log_dirichlet(generator: torch.Generator, concentration: float, size: int) -> Tensor:
    """``log`` of a Dirichlet(concentration·1) draw, computed without underflow.

    Uses ``G_a = G_{a+1} · U^{1/a}`` (so ``log G_a = log G_{a+1} + log(U)/a``) with ``G_{a+1}`` by
    inverse-CDF sampling, all driven by the caller's generator.
    """
    from scipy.special import gammaincinv

    u1 = torch.rand(size, generator=generator, dtype=torch.float64)
    u2 = torch.rand(size, generator=generator, dtype=torch.float64)
    g = torch.as_tensor(gammaincinv(concentration + 1.0, u1.numpy()), dtype=torch.float64)
    log_g = torch.log(g) + torch.log(u2) / concentration
    return torch.log_softmax(log_g, dim=0)


def random_tabular(
    generator: torch.Generator,
    vocab_size: int,
    max_len: int,
    concentration: float = 1.0,
    eos_id: int = 0,
    eos_prob: float | None = None,
) -> TabularPolicy:
    """A random tabular policy: every next-token law an independent Dirichlet draw.

    Parameters
    ----------
    generator
        Source of randomness (same generator state ⇒ same policy).
    vocab_size, max_len, eos_id
        As in :class:`TabularPolicy`.
    concentration
        Dirichlet concentration ``a``: small ``a`` (e.g. 0.2) gives peaked, near-deterministic
        rows; large ``a`` gives near-uniform rows.
    eos_prob
        If given, EOS has exactly this probability at every position (``0`` makes EOS impossible:
        log-prob ``-inf``) and the other tokens share the rest by a Dirichlet draw. Default: EOS is
        one more Dirichlet component.
    """
    validation.generator("generator", generator)
    validation.positive_int("vocab_size", vocab_size)
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    validation.positive_int("max_len", max_len)
    concentration = validation.positive_float("concentration", concentration)
    validation.token_id("eos_id", eos_id, vocab_size)
    if eos_prob is not None:
        eos_prob = validation.unit_interval("eos_prob", eos_prob)
        if eos_prob == 1.0:
            raise ValueError("eos_prob must be < 1 (otherwise every response is empty)")
    others = [v for v in range(vocab_size) if v != eos_id]
    if (vocab_size - 1) ** max(max_len - 1, 0) > 2_000_000:
        raise ValueError("the table would exceed 2e6 prefixes; lower vocab_size or max_len")
    table: dict[Seq, Tensor] = {}
    for length in range(max_len):
        for prefix in itertools.product(others, repeat=length):
            if eos_prob is None:
                row = log_dirichlet(generator, concentration, vocab_size)
            else:
                row = torch.full((vocab_size,), -math.inf, dtype=torch.float64)
                body = log_dirichlet(generator, concentration, vocab_size - 1)
                row[others] = body + math.log1p(-eos_prob)
                row[eos_id] = math.log(eos_prob) if eos_prob > 0 else -math.inf
            table[prefix] = row
    return TabularPolicy(vocab_size, eos_id, max_len, table)
