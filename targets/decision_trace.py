r"""The decision-trace toy: a few consequential decisions separated by long runs of filler.

The stylized reasoning model of Zhou, Mehrotra & Liu (*Reasoning with Sampling: Cutting at Decision
Points*; ``specs/mcmc.md`` §3.5). A trace is ``num_decisions`` blocks of one decision token followed
by ``filler_len`` filler tokens, so its length is ``T = num_decisions · (filler_len + 1)``
(``T = 2L + 2`` for the paper's two decisions):

* decision 1 chooses branch ``A`` or ``B`` with probabilities ``first_probs`` (0.6 / 0.4);
* every later decision has ``branching`` equiprobable options on branch ``A`` (entropy
  ``log branching``) and is a deterministic filler on branch ``B``;
* a filler is the token ``F``, or with probability ``filler_noise`` the noise token ``N`` (small
  entropy, the "test variant" of the spec).

EOS has probability zero everywhere: traces end at the length cap (``truncation="stop"``,
``max_new_tokens = T``). With the defaults the support is ``A·o_1 .. A·o_4`` (0.15 each) and ``B``
(0.4), and ``p^4`` puts 0.927 on ``B`` while low-temperature sampling at 1/4 puts 0.165 there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.policy import DecodeSession, PrefixSession, sequence_logprob_from_next
from tiltsample.target import TiltedTarget, power_target
from tiltsample.types import Seq

EOS, A, B, FILLER, NOISE = 0, 1, 2, 3, 4
FIRST_OPTION = 5


class DecisionTracePolicy:
    """Reference policy of the decision-trace toy (see the module docstring)."""

    def __init__(
        self,
        filler_len: int,
        num_decisions: int = 2,
        first_probs: tuple[float, float] = (0.6, 0.4),
        branching: int = 4,
        filler_noise: float = 0.0,
    ) -> None:
        self.filler_len = validation.non_negative_int("filler_len", filler_len)
        self.num_decisions = validation.positive_int("num_decisions", num_decisions)
        self.branching = validation.positive_int("branching", branching)
        self.filler_noise = validation.unit_interval("filler_noise", filler_noise)
        if self.filler_noise == 1.0:
            raise ValueError("filler_noise must be < 1")
        pa, pb = (float(p) for p in first_probs)
        if pa < 0 or pb < 0 or abs(pa + pb - 1.0) > 1e-12:
            raise ValueError(
                f"first_probs must be two probabilities summing to 1, got {first_probs}"
            )
        self.first_probs = (pa, pb)
        self.max_len = self.num_decisions * (self.filler_len + 1)

    @property
    def vocab_size(self) -> int:
        return FIRST_OPTION + self.branching

    @property
    def eos_id(self) -> int:
        return EOS

    @property
    def length(self) -> int:
        """Trace length ``T``."""
        return self.max_len

    def _row(self, prefix: Seq) -> Tensor:
        t = len(prefix)
        if t >= self.max_len:
            raise KeyError(f"prefix of length {t} is past the trace length T={self.max_len}")
        row = torch.full((self.vocab_size,), -math.inf, dtype=torch.float64)
        offset = t % (self.filler_len + 1)
        if t == 0:
            row[A], row[B] = (math.log(p) if p > 0 else -math.inf for p in self.first_probs)
        elif offset == 0 and prefix[0] == A:
            row[FIRST_OPTION:] = -math.log(self.branching)
        elif self.filler_noise > 0:
            row[FILLER] = math.log1p(-self.filler_noise)
            row[NOISE] = math.log(self.filler_noise)
        else:
            row[FILLER] = 0.0
        return row

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        if not prefixes:
            return torch.zeros((0, self.vocab_size), dtype=torch.float64)
        return torch.stack([self._row(tuple(p)) for p in prefixes])

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        return sequence_logprob_from_next(self, prompt, xs, per_token)

    def session(self, prompt: Seq, batch: int) -> DecodeSession:
        return PrefixSession(self, prompt, batch, accounting="cached")

    def __repr__(self) -> str:
        return (
            f"DecisionTracePolicy(filler_len={self.filler_len}, num_decisions={self.num_decisions},"
            f" branching={self.branching}, filler_noise={self.filler_noise})"
        )


def decision_trace(
    filler_len: int,
    num_decisions: int = 2,
    alpha: float = 4.0,
    first_probs: tuple[float, float] = (0.6, 0.4),
    branching: int = 4,
    filler_noise: float = 0.0,
) -> TiltedTarget:
    """The decision-trace policy wrapped as the power target ``p^alpha`` at full trace length."""
    policy = DecisionTracePolicy(filler_len, num_decisions, first_probs, branching, filler_noise)
    return power_target(policy, alpha, max_new_tokens=policy.max_len)
