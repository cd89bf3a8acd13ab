"""Conditional SMC, particle Gibbs and the two-sided bounds on ``log Z``:
``tiltsample.samplers.csmc`` gathers :mod:`tiltsample.samplers.smc.csmc`,
:mod:`tiltsample.samplers.smc.particle_gibbs` and :mod:`tiltsample.samplers.smc.bounds` (this
import path is kept for existing code)."""

from __future__ import annotations

from tiltsample.samplers.smc.bounds import (
    EvidenceEstimate,
    log_z_lower,
    log_z_upper,
)
from tiltsample.samplers.smc.csmc import (
    build_kernel,
    done,
    exact_references,
    init,
    resolve_references,
    result,
    sampler,
)
from tiltsample.samplers.smc.particle_gibbs import (
    INITS,
    PGInfo,
    PGState,
    particle_gibbs_init,
    particle_gibbs_kernel,
    particle_gibbs_sampler,
    pg_done,
    pg_result,
    record,
)

__all__ = [
    "INITS",
    "EvidenceEstimate",
    "PGInfo",
    "PGState",
    "build_kernel",
    "done",
    "exact_references",
    "init",
    "log_z_lower",
    "log_z_upper",
    "particle_gibbs_init",
    "particle_gibbs_kernel",
    "particle_gibbs_sampler",
    "pg_done",
    "pg_result",
    "record",
    "resolve_references",
    "result",
    "sampler",
]
