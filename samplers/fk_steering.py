"""FK steering of masked-diffusion LMs: ``tiltsample.samplers.fk_steering`` is
:mod:`tiltsample.samplers.smc.fk_steering` (this import path is kept for existing code)."""

from __future__ import annotations

from tiltsample.samplers.smc.fk_steering import (
    ESTIMATORS,
    POTENTIALS,
    PROPOSALS,
    FKConfig,
    FKInfo,
    FKState,
    build_kernel,
    done,
    init,
    kernel_from_config,
    log_evidence_runs,
    result,
    run,
    sampler,
)

__all__ = [
    "ESTIMATORS",
    "POTENTIALS",
    "PROPOSALS",
    "FKConfig",
    "FKInfo",
    "FKState",
    "build_kernel",
    "done",
    "init",
    "kernel_from_config",
    "log_evidence_runs",
    "result",
    "run",
    "sampler",
]
