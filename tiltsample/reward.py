"""Reward and prefix-potential protocols.

A :class:`Reward` scores complete responses; a :class:`PrefixPotential` (a *twist*) estimates the
log-energy ``log E[exp(log_tilt(x)) | prefix]`` of partial responses. Both are structural protocols:
any object with the right call signature works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from tiltsample.types import Cost, Seq


@runtime_checkable
class Reward(Protocol):
    """``r(y, x)`` for a batch of complete responses: ``__call__(prompt, xs) -> Tensor[B]``.

    Deterministic and stateless. Values may be ``-inf`` (a hard constraint) but never NaN or
    ``+inf``. Responses are :data:`~tiltsample.types.Seq` with EOS included when they ended with
    EOS; a reward sees nothing past EOS.
    """

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor: ...


@runtime_checkable
class PrefixPotential(Protocol):
    """An estimate of ``log psi(prefix) = log E_p[exp(log_tilt(x)) | prefix]`` (a twist).

    Used by beam search, SMC (lookahead twists) and ETS (the K-rollout estimator is one
    implementation). For a complete prefix the exact value is ``log_tilt(prefix)``. Random
    estimators draw from ``generator`` and report the cost they spent.
    """

    def log_potential(
        self, prompt: Seq, prefixes: Sequence[Seq], generator: torch.Generator
    ) -> tuple[Tensor, Cost]: ...


def check_reward_output(values: object, batch: int, what: str = "reward") -> Tensor:
    """Validate a reward's output: a float tensor of shape ``[batch]``, no NaN, no ``+inf``."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{what} must return a torch.Tensor of shape [{batch}], got {type(values)}")
    if tuple(values.shape) != (batch,):
        raise ValueError(f"{what} returned shape {tuple(values.shape)}, expected ({batch},)")
    values = values.to(torch.float64)
    if bool(torch.isnan(values).any()):
        raise ValueError(f"{what} returned NaN for {int(torch.isnan(values).sum())} sequence(s)")
    if bool((values == torch.inf).any()):
        raise ValueError(f"{what} returned +inf; rewards must be finite or -inf (a constraint)")
    return values
