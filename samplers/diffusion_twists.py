"""Learned twists of masked-diffusion states: ``tiltsample.samplers.diffusion_twists`` is
:mod:`tiltsample.samplers.smc.twists.diffusion` (this import path is kept for existing code)."""

from __future__ import annotations

from tiltsample.samplers.smc.twists.diffusion import (
    LinearStateTwist,
    StateFeatures,
    StateTable,
    StateTwistResult,
    StateTwistStep,
    learn_state_twist,
)

__all__ = [
    "LinearStateTwist",
    "StateFeatures",
    "StateTable",
    "StateTwistResult",
    "StateTwistStep",
    "learn_state_twist",
]
