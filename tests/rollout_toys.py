"""A rollout-only test double of a serving engine, shared by the rollout-level tests.

:class:`RolloutOnlyPolicy` wraps any token-level :class:`~tiltsample.policy.ReferencePolicy` (a
tabular toy, the tiny HF model) and behaves like the vLLM backend with few log-probs per position:
its sessions are :class:`~tiltsample.policy.RolloutSession` s that decode whole continuations
(``decode_rollouts``: the ordinary token-level :func:`~tiltsample.decode_engine.decode` on the
wrapped session, so the draws are those of the token-level loop) and score given continuations,
but raise :class:`~tiltsample.policy.TokenLevelAccessError` from ``logprobs()`` /
``next_logprobs`` and for requests that need full laws (entropies), and ``ValueError`` for laws
a serving engine cannot express (anything but a plain tempered law). Every decode request is
counted in :attr:`RolloutOnlyPolicy.decode_calls`.

Imported by name (``from rollout_toys import ...``): ``tests/conftest.py`` puts this folder on
``sys.path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from tiltsample import TiltedTarget
from tiltsample.decode_engine import Decoded, DecodeRequest, decode, score_continuations
from tiltsample.policy import DecodeSession, ReferencePolicy, TokenLevelAccessError, open_session
from tiltsample.token_laws import TemperedLaw
from tiltsample.types import Cost, Seq

__all__ = ["RolloutOnlyPolicy", "RolloutOnlySession", "rollout_only"]


def _refuse(what: str) -> TokenLevelAccessError:
    return TokenLevelAccessError(
        f"{what} needs token-level access (full next-token laws); this rollout-only test "
        "engine decodes and scores continuations only"
    )


class RolloutOnlySession:
    """A :class:`~tiltsample.policy.RolloutSession` over an ordinary session (see the module
    docstring); ``counter`` is the policy's list of decode-call counts (shared by forks)."""

    def __init__(self, inner: DecodeSession, counter: list[int]) -> None:
        self._inner = inner
        self._counter = counter

    @property
    def batch_size(self) -> int:
        return self._inner.batch_size

    @property
    def length(self) -> int:
        return self._inner.length

    @property
    def cost(self) -> Cost:
        return self._inner.cost

    def tokens(self) -> Tensor:
        return self._inner.tokens()

    def logprobs(self) -> Tensor:
        raise _refuse("reading next-token laws (DecodeSession.logprobs)")

    def extend(self, tokens: Tensor) -> None:
        self._inner.extend(tokens)

    def truncate(self, n: int) -> None:
        self._inner.truncate(n)

    def select(self, indices: Tensor) -> None:
        self._inner.select(indices)

    def fork(self) -> RolloutOnlySession:
        return RolloutOnlySession(self._inner.fork(), self._counter)

    def decode_rollouts(self, generator: torch.Generator, request: Any) -> Decoded:
        """The token-level decode loop on the wrapped session, for the requests a serving
        engine accepts (plain tempered laws, no entropies)."""
        assert isinstance(request, DecodeRequest)
        law = request.law
        if not isinstance(law, TemperedLaw) or not law.expressible:
            raise ValueError(
                f"the rollout-only engine samples plain tempered laws only, got {law!r}"
            )
        if request.record_entropy:
            raise _refuse("recording per-token entropies (record_entropy=True)")
        self._counter[0] += 1
        decoded, out = decode(self._inner, generator, request._replace(parking=None))
        assert out is self._inner
        return decoded

    def score_continuations(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        return score_continuations(self._inner, tokens, lengths)


class RolloutOnlyPolicy:
    """A :class:`~tiltsample.policy.ReferencePolicy` whose sessions are rollout-only (see the
    module docstring). ``sequence_logprob`` (scoring) delegates; ``next_logprobs`` refuses."""

    def __init__(self, inner: ReferencePolicy) -> None:
        self.inner = inner
        self._counter = [0]

    @property
    def decode_calls(self) -> int:
        """Decode requests served so far (by all sessions and forks)."""
        return self._counter[0]

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def eos_id(self) -> int:
        return self.inner.eos_id

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        raise _refuse("next_logprobs")

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        return self.inner.sequence_logprob(prompt, xs, per_token)

    def session(self, prompt: Seq, batch: int) -> RolloutOnlySession:
        return RolloutOnlySession(open_session(self.inner, prompt, batch), self._counter)


def rollout_only(target: TiltedTarget) -> TiltedTarget:
    """``target`` with its policy wrapped in a fresh :class:`RolloutOnlyPolicy` (same law)."""
    return replace(target, policy=RolloutOnlyPolicy(target.policy))
