"""A :class:`~tiltsample.targets.pyro_program.PyroProgram` read as a policy and as a reward.

:class:`PyroProgramPolicy` and :class:`PyroFactorReward` answer the
:class:`~tiltsample.policy.ReferencePolicy` and :class:`~tiltsample.reward.Reward` protocols by
*running the program* (conditioned with ``poutine.condition``, stopped with ``poutine.escape``, or
traced). Both are re-exported by :mod:`tiltsample.targets.pyro_program`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.runtime import NonlocalExit
from torch import Tensor

from tiltsample.policy import DecodeSession, PrefixSession, sequence_logprob_from_next
from tiltsample.types import Seq

__all__ = ["ProgramLike", "PyroFactorReward", "PyroProgramPolicy"]


class ProgramLike(Protocol):
    """What the views read of a :class:`~tiltsample.targets.pyro_program.PyroProgram`: its sizes
    and its Pyro model (sites ``x_0 .. x_{L-1}``, then the ``"tilt"`` factor)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    def model(self) -> None: ...


def _site_before(program: ProgramLike, t: int, data: dict[str, Tensor]) -> Any:
    """Run ``program.model`` conditioned on ``data`` and stop at site ``x_t`` (nothing is
    sampled)."""
    name = f"x_{t}"

    def escape_fn(msg: Any) -> bool:
        return bool(msg["type"] == "sample" and msg["name"] == name)

    stopped = poutine.escape(poutine.condition(program.model, data=data), escape_fn=escape_fn)
    try:
        with poutine.block():
            stopped()
    except NonlocalExit as stop:
        return stop.site
    raise RuntimeError(f"the program finished without reaching site {name!r}")


def _factor_sum(program: ProgramLike, padded: Tensor) -> Tensor:
    """Sum of the factor sites of the program conditioned on full token rows ``[B, L]``."""
    batch = padded.shape[0]
    data = {f"x_{t}": padded[:, t] for t in range(program.max_len)}
    with poutine.block():
        trace = poutine.trace(poutine.condition(program.model, data=data)).get_trace()
    total = torch.zeros(batch, dtype=torch.float64)
    for site in trace.nodes.values():
        if site["type"] == "sample" and isinstance(site["fn"], dist.Unit):
            log_factor = site["fn"].log_prob(site["value"]).to(torch.float64)
            total = total + log_factor.expand(batch)
    return total


class PyroProgramPolicy:
    """The :class:`~tiltsample.policy.ReferencePolicy` of a
    :class:`~tiltsample.targets.pyro_program.PyroProgram`.

    ``next_logprobs`` runs the program conditioned on the prefix (``poutine.condition`` on
    ``x_0 .. x_{t-1}``), stops at site ``x_t`` (``poutine.escape``) and returns
    ``fn.log_prob(v)`` for every ``v`` in the support of that site's distribution. One program run
    serves all prefixes of one length (conditioned values are batched). Nothing is sampled; the
    prompt is ignored (a toy has one context). Prefixes may contain EOS (the program then reports
    the absorbing point mass on EOS) but must be shorter than ``max_len``.
    """

    def __init__(self, program: ProgramLike) -> None:
        self._program = program

    @property
    def vocab_size(self) -> int:
        return self._program.vocab_size

    @property
    def eos_id(self) -> int:
        return self._program.eos_id

    @property
    def max_len(self) -> int:
        return self._program.max_len

    @property
    def program(self) -> ProgramLike:
        return self._program

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        """``[B, V]`` float64 log-probabilities of site ``x_t`` given ``x_{<t} = prefix``."""
        vocab, length = self.vocab_size, self.max_len
        rows = [tuple(int(v) for v in p) for p in prefixes]
        groups: dict[int, list[int]] = {}
        for i, prefix in enumerate(rows):
            if len(prefix) >= length:
                raise ValueError(
                    f"prefixes[{i}] has {len(prefix)} tokens; the program has sites x_0..x_"
                    f"{length - 1}, so prefixes must be shorter than max_len={length}"
                )
            if any(not 0 <= v < vocab for v in prefix):
                raise ValueError(f"prefixes[{i}] has token ids outside [0, vocab_size={vocab})")
            groups.setdefault(len(prefix), []).append(i)
        out = torch.empty((len(rows), vocab), dtype=torch.float64)
        for t, members in groups.items():
            data = {
                f"x_{s}": torch.tensor([rows[i][s] for i in members], dtype=torch.long)
                for s in range(t)
            }
            fn = _site_before(self._program, t, data)["fn"]
            support = fn.enumerate_support(expand=False)  # [V, 1, ...]
            lp = fn.log_prob(support).to(torch.float64)  # [V, *batch_shape]
            out[members] = lp.reshape(vocab, -1).T.expand(len(members), vocab)
        return out

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        """``Σ_t log p(x_t | x_<t)`` through :meth:`next_logprobs` (one program run per length)."""
        return sequence_logprob_from_next(self, prompt, xs, per_token)

    def session(self, prompt: Seq, batch: int) -> DecodeSession:
        """A stateless session with ideal-KV-cache accounting (the program is table-backed)."""
        return PrefixSession(self, prompt, batch, accounting="cached")

    def __repr__(self) -> str:
        return f"PyroProgramPolicy({self._program!r})"


class PyroFactorReward:
    """The :class:`~tiltsample.reward.Reward` of a
    :class:`~tiltsample.targets.pyro_program.PyroProgram`: its summed factors.

    For each complete response ``x`` (ending with EOS, or of ``max_len`` tokens) the program is
    conditioned on ``x`` padded with EOS to ``max_len`` tokens and traced; the reward is the sum of
    ``log_prob`` over the factor sites (``pyro.factor``, i.e. ``Unit`` sites), which is
    ``log G(x)`` — the log-tilt at ``lam = 1``. Returns ``[B]`` float64; nothing is sampled.
    """

    def __init__(self, program: ProgramLike) -> None:
        self._program = program

    @property
    def program(self) -> ProgramLike:
        return self._program

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        program = self._program
        vocab, eos, length = program.vocab_size, program.eos_id, program.max_len
        rows = [tuple(int(v) for v in x) for x in xs]
        if not rows:
            return torch.zeros(0, dtype=torch.float64)
        padded = torch.full((len(rows), length), eos, dtype=torch.long)
        for i, x in enumerate(rows):
            if len(x) > length:
                raise ValueError(f"xs[{i}] has {len(x)} tokens > max_len={length}")
            if any(not 0 <= v < vocab for v in x):
                raise ValueError(f"xs[{i}] has token ids outside [0, vocab_size={vocab})")
            if eos in x[:-1]:
                raise ValueError(f"xs[{i}] has tokens after EOS")
            if len(x) < length and (not x or x[-1] != eos):
                raise ValueError(
                    f"xs[{i}] is not a complete response (must end with EOS or have "
                    f"max_len={length} tokens)"
                )
            padded[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        return _factor_sum(program, padded)

    def __repr__(self) -> str:
        return f"PyroFactorReward({self._program!r})"
