"""Basic value types shared by every layer: :data:`Seq` and :class:`Cost`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypeAlias

Seq: TypeAlias = tuple[int, ...]
"""Canonical, hashable form of a response: the generated token ids, EOS included as the last
token when the response ended with EOS. Exact distributions are ``dict[Seq, float]``."""


@dataclass(frozen=True, slots=True)
class Cost:
    """Compute spent by a sampler (or a step, a session, a potential).

    Attributes
    ----------
    generated_tokens
        Tokens *sampled* from a model (candidates, rollouts and rejected proposals included).
    forward_tokens
        Tokens pushed through the model, prefill included. A KV-cached session counts a shared
        prompt once; a stateless recompute counts the whole prefix at every call.
    model_calls
        Batched forward invocations of the model.
    reward_calls
        Sequences scored by a reward (one per sequence per reward term).

    Costs add element-wise, so per-step costs sum to the run's cost; comparisons between samplers
    are made at equal cost, never at equal "steps".
    """

    generated_tokens: int = 0
    forward_tokens: int = 0
    model_calls: int = 0
    reward_calls: int = 0

    def __post_init__(self) -> None:
        # every step of every sampler adds Costs: a fast path for plain ints
        for name in _COUNTERS:
            value = getattr(self, name)
            if type(value) is int and value >= 0:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Cost.{name} must be a non-negative int, got {value!r}")

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(
            self.generated_tokens + other.generated_tokens,
            self.forward_tokens + other.forward_tokens,
            self.model_calls + other.model_calls,
            self.reward_calls + other.reward_calls,
        )

    def as_dict(self) -> dict[str, int]:
        """The four counters as a plain dict (for tables and JSON records)."""
        return {name: getattr(self, name) for name in _COUNTERS}


_COUNTERS = tuple(f.name for f in fields(Cost))

ZERO_COST = Cost()
