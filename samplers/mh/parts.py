"""The target split ``log pi(x) = a · log p_ref(x) + rest(x)``: reference-log-probability tilt
terms folded into the exponent ``a``, the other terms evaluated on complete responses."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.reward import check_reward_output
from tiltsample.target import TiltedTarget, TiltTerm
from tiltsample.types import Cost, Seq

__all__ = [
    "TargetParts",
    "decompose_target",
    "evaluate_rest",
    "log_density_from_parts",
    "resolve_alpha",
]


class TargetParts(NamedTuple):
    """``log pi(x) = power · log p_ref(x) + sum(rest terms)(x)``."""

    power: float
    """The exponent ``a`` of ``p_ref`` (``alpha`` for a power target, 1 for a reward tilt)."""
    rest: tuple[TiltTerm, ...]
    """Tilt terms that are not a multiple of ``log p_ref`` (rewards, constraints)."""


def _is_logprob_term(term: TiltTerm) -> bool:
    scale = getattr(term.reward, "scale", None)
    return (
        bool(getattr(term.reward, "uses_reference_logprob", False))
        and isinstance(scale, int | float)
        and not isinstance(scale, bool)
        and math.isfinite(float(scale))
    )


def decompose_target(target: TiltedTarget) -> TargetParts:
    """Fold reference-log-probability tilt terms into the exponent of ``p_ref``.

    A term ``s · (c · log p_ref)`` (a :class:`~tiltsample.target.LogProbReward` of scale ``c`` at
    tilt scale ``s = 1/lam``) adds ``s·c`` to the exponent; every other term stays a function of
    the complete response.
    """
    power = 1.0
    rest: list[TiltTerm] = []
    for term in target.terms:
        if _is_logprob_term(term):
            power += term.scale * float(term.reward.scale)  # type: ignore[attr-defined]
        else:
            rest.append(term)
    return TargetParts(power, tuple(rest))


def resolve_alpha(target: TiltedTarget, alpha: float | None) -> float:
    """The power ``alpha`` of a power target, or the explicit ``alpha`` for any other target.

    ``alpha`` is read from the target (its exponent of ``p_ref``, :func:`decompose_target`,
    consistent with ``target.meta["alpha"]``). An explicit ``alpha`` must agree with a power
    target's (``inf`` — max-swap — is always allowed); for a target that is not a power target it
    only sets the proposal temperature ``1/alpha``.
    """
    parts = decompose_target(target)
    is_power = target.meta.get("kind") == "power" or parts.power != 1.0
    if alpha is not None:
        alpha = validation.positive_float("alpha", alpha, allow_inf=True)
        if is_power and math.isfinite(alpha) and abs(alpha - parts.power) > 1e-12 * alpha:
            raise ValueError(
                f"alpha={alpha} disagrees with the target's alpha={parts.power} (the target is a "
                "power target; omit alpha to use its own, or pass alpha=inf for max-swap)"
            )
        return alpha
    if not is_power:
        raise ValueError(
            "alpha is required: the target is not a power target (build one with "
            "tiltsample.power_target(policy, alpha)) or pass alpha= to set the proposal "
            "temperature 1/alpha"
        )
    if not parts.power > 0:
        raise ValueError(
            f"the target's exponent of p_ref is {parts.power} <= 0; power sampling needs alpha > 0"
        )
    return parts.power


def _scale_keep_neginf(values: Tensor, scale: float) -> Tensor:
    return torch.where(torch.isneginf(values), values, values * scale)


def evaluate_rest(
    target: TiltedTarget, parts: TargetParts, xs: Sequence[Seq], log_reference: Tensor
) -> tuple[Tensor, Tensor | None, Cost]:
    """``rest(x)`` of complete responses, the primary reward (for reporting) and reward calls."""
    batch = len(xs)
    other = torch.zeros(batch, dtype=torch.float64)
    reward: Tensor | None = None
    calls = 0
    for term in parts.rest:
        if getattr(term.reward, "uses_reference_logprob", False):
            values = term.reward.from_reference(log_reference)  # type: ignore[attr-defined]
        else:
            values = term.reward(target.prompt, list(xs)) if batch else torch.zeros(0)
            calls += batch
        values = check_reward_output(values, batch, what=f"tilt term {term.name!r}")
        if term.name == "reward" and reward is None:
            reward = values
        other = other + _scale_keep_neginf(values, term.scale)
    primary = target.reward
    if primary is not None and reward is None:
        if getattr(primary, "uses_reference_logprob", False):
            reward = check_reward_output(primary.from_reference(log_reference), batch)  # type: ignore[attr-defined]
        else:  # lam = inf: reported, not tilted
            reward = check_reward_output(
                primary(target.prompt, list(xs)) if batch else torch.zeros(0), batch
            )
            calls += batch
    return other, reward, Cost(reward_calls=calls)


def log_density_from_parts(power: float, log_reference: Tensor, rest: Tensor) -> Tensor:
    """``power · log p_ref + rest`` with ``-inf`` wherever either part is ``-inf`` (never NaN)."""
    out = power * torch.where(torch.isneginf(log_reference), 0.0, log_reference) + rest
    off = torch.isneginf(log_reference) | torch.isneginf(rest)
    return torch.where(off, torch.full_like(out, -math.inf), out)
