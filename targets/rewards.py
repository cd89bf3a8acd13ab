"""Rewards for toy and real targets.

Every reward follows the :class:`~tiltsample.reward.Reward` protocol:
``reward(prompt, xs) -> Tensor[B]`` (float64), deterministic and stateless. Responses include their
final EOS; the rewards below look only at the *content* (the tokens before EOS) unless stated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from tiltsample.target import LogProbReward
from tiltsample.types import Seq

__all__ = [
    "ConstraintReward",
    "ContainsTokenReward",
    "CountFractionReward",
    "LastTokenReward",
    "LogProbReward",
    "ParityReward",
    "TableReward",
    "content",
]


def content(x: Seq, eos_id: int) -> Seq:
    """The tokens of ``x`` before its EOS (all of ``x`` when it has none)."""
    return x[:-1] if x and x[-1] == eos_id else x


class TableReward:
    """``r(x) = table[x]`` for an explicit table of complete responses.

    Parameters
    ----------
    table
        ``{response: value}`` (responses as :data:`~tiltsample.types.Seq`, EOS included).
    default
        Value for responses missing from the table; ``None`` makes a missing response an error.
    """

    def __init__(self, table: Mapping[Seq, float], default: float | None = None) -> None:
        self.table = {tuple(k): float(v) for k, v in table.items()}
        self.default = default

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        out = []
        for x in xs:
            key = tuple(x)
            if key in self.table:
                out.append(self.table[key])
            elif self.default is not None:
                out.append(float(self.default))
            else:
                raise KeyError(f"TableReward has no value for {key} and no default")
        return torch.tensor(out, dtype=torch.float64)


class ContainsTokenReward:
    """Binary: ``1`` if ``token`` occurs in the content, else ``0``."""

    def __init__(self, token: int, eos_id: int) -> None:
        self.token, self.eos_id = int(token), int(eos_id)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        return torch.tensor(
            [float(self.token in content(x, self.eos_id)) for x in xs], dtype=torch.float64
        )


class ParityReward:
    """Binary: ``1`` if ``token`` occurs an odd (``odd=True``) or even number of times."""

    def __init__(self, token: int, eos_id: int, odd: bool = True) -> None:
        self.token, self.eos_id, self.odd = int(token), int(eos_id), bool(odd)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        vals = [(content(x, self.eos_id).count(self.token) % 2 == 1) == self.odd for x in xs]
        return torch.tensor([float(v) for v in vals], dtype=torch.float64)


class LastTokenReward:
    """Binary: ``1`` if the last content token is ``token`` (``0`` for an empty response)."""

    def __init__(self, token: int, eos_id: int) -> None:
        self.token, self.eos_id = int(token), int(eos_id)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        vals = []
        for x in xs:
            c = content(x, self.eos_id)
            vals.append(float(bool(c) and c[-1] == self.token))
        return torch.tensor(vals, dtype=torch.float64)


class CountFractionReward:
    """Graded, in ``[0, 1]``: the fraction of content tokens equal to ``token`` (0 if empty)."""

    def __init__(self, token: int, eos_id: int) -> None:
        self.token, self.eos_id = int(token), int(eos_id)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        vals = []
        for x in xs:
            c = content(x, self.eos_id)
            vals.append(c.count(self.token) / len(c) if c else 0.0)
        return torch.tensor(vals, dtype=torch.float64)


class ConstraintReward:
    """A hard constraint: ``0`` where ``predicate(x)`` holds, ``-inf`` elsewhere.

    Tilting by it (any ``lam``) restricts the target to the responses that satisfy the predicate.
    """

    def __init__(self, predicate: Callable[[Seq], bool], name: str = "constraint") -> None:
        self.predicate, self.name = predicate, name

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        return torch.tensor(
            [0.0 if self.predicate(tuple(x)) else -torch.inf for x in xs], dtype=torch.float64
        )
