"""Power-SMC: ``tiltsample.samplers.power_smc`` is :mod:`tiltsample.samplers.smc.power_smc` (this
import path is kept for existing code)."""

from __future__ import annotations

from tiltsample.samplers.smc.power_smc import (
    PowerRampTwist,
    sampler,
    smc_params,
)

__all__ = [
    "PowerRampTwist",
    "sampler",
    "smc_params",
]
