"""Prefix-only twists: :class:`NoTwist` (``psi = 1``) and :class:`PrefixTilt` (the tilt factors a
prefix already determines), ``specs/smc.md`` §3."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.reward import PrefixPotential
from tiltsample.samplers.smc.twists.base import Twist, check_twist_output, power_log_tilt
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["NoTwist", "PrefixTilt"]


class NoTwist(Twist):
    """``psi = 1`` on incomplete prefixes: plain importance weights, reweighted at completion."""

    name = "none"

    def log_twist(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        return torch.zeros(len(prefixes), dtype=torch.float64), Cost()

    def log_twist_children(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        next_logprobs: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        out = torch.where(
            next_logprobs > -math.inf,
            torch.zeros((), dtype=torch.float64),
            torch.full((), -math.inf, dtype=torch.float64),
        ).to(torch.float64)
        return out, Cost()


class PrefixTilt(Twist):
    r"""Prefix-only twist: the tilt factors the prefix already determines.

    .. math::

        \log\psi_t(x_{1:t}) = \sum_{k:\ r_k = c_k \log p_{ref}} s_k c_k \log p_{ref}(x_{1:t})
            \;+\; \log \phi(x_{1:t}),

    where the first sum runs over the tilt terms that are multiples of ``log p_ref`` (the power
    tilt, additive over tokens, so its prefix value is exact) and ``phi`` is an optional user
    :class:`~tiltsample.reward.PrefixPotential` for the reward seen so far (for instance a
    constraint that can already be checked on a prefix, or a process reward). With neither, this is
    :class:`NoTwist`. Myopic: it favours what scored well so far, not expected final reward.

    Parameters
    ----------
    potential
        Optional prefix potential added to the factorised part.
    """

    name = "prefix"

    def __init__(self, potential: PrefixPotential | None = None) -> None:
        if potential is not None and not callable(getattr(potential, "log_potential", None)):
            raise TypeError("potential must implement PrefixPotential.log_potential")
        self.potential = potential
        self.random = potential is not None

    def log_twist(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        out = power_log_tilt(target, log_reference)
        cost = Cost()
        if self.potential is not None and len(prefixes):
            values, cost = self.potential.log_potential(target.prompt, prefixes, generator)
            values = check_twist_output(values, len(prefixes), "prefix potential")
            out = torch.where(torch.isneginf(values), values, out + values)
        return out, cost

    def log_twist_children(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        next_logprobs: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        if self.potential is not None:
            return super().log_twist_children(
                target, prefixes, log_reference, next_logprobs, generator
            )
        child_ref = log_reference.to(torch.float64)[:, None] + next_logprobs.to(torch.float64)
        out = power_log_tilt(target, child_ref)
        out = torch.where(next_logprobs > -math.inf, out, torch.full_like(out, -math.inf))
        return out, Cost()

    def __repr__(self) -> str:
        return f"PrefixTilt(potential={self.potential!r})"
