"""``twist=`` by name: :func:`make_twist` resolves the SMC samplers' twist parameters."""

from __future__ import annotations

from tiltsample import validation
from tiltsample.reward import PrefixPotential
from tiltsample.samplers.smc.twists.base import Twist
from tiltsample.samplers.smc.twists.lookahead import LookaheadTwist, RolloutTwist
from tiltsample.samplers.smc.twists.prefix import NoTwist, PrefixTilt

__all__ = ["TWIST_NAMES", "make_twist"]

TWIST_NAMES = ("none", "prefix", "lookahead")


def make_twist(
    twist: str | Twist,
    potential: PrefixPotential | None = None,
    num_rollouts: int | None = None,
    rollout_temperature: float = 1.0,
) -> Twist:
    """Resolve the ``twist=`` / ``potential=`` / ``num_rollouts=`` parameters of the SMC samplers.

    ``"none"`` → :class:`NoTwist`; ``"prefix"`` → :class:`PrefixTilt` (``potential`` optional);
    ``"lookahead"`` → :class:`LookaheadTwist` (``potential``) or :class:`RolloutTwist`
    (``num_rollouts``): exactly one of the two; a :class:`Twist` instance is returned as is.
    """
    if num_rollouts is not None and (twist != "lookahead" or potential is not None):
        raise ValueError("num_rollouts= goes with twist='lookahead' and no potential=")
    if isinstance(twist, Twist):
        if potential is not None:
            raise ValueError("pass potential= only with twist='prefix' or 'lookahead'")
        return twist
    if not isinstance(twist, str):
        raise TypeError(
            f"twist must be one of {list(TWIST_NAMES)} or a Twist instance, "
            f"got {type(twist).__name__}"
        )
    validation.one_of("twist", twist, TWIST_NAMES)
    if twist == "none":
        if potential is not None:
            raise ValueError("twist='none' takes no potential; use twist='prefix' or 'lookahead'")
        return NoTwist()
    if twist == "prefix":
        return PrefixTilt(potential)
    if num_rollouts is not None:
        return RolloutTwist(num_rollouts, rollout_temperature)
    if potential is None:
        raise ValueError(
            "twist='lookahead' needs potential= (a PrefixPotential, e.g. "
            "tiltsample.theory.ExactPotential(target)) or num_rollouts= (K-rollout estimates)"
        )
    return LookaheadTwist(potential)
