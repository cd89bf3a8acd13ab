r"""Two-sided bounds on ``log Z`` (``specs/smc.md`` §9; Zhao et al. 2024; bidirectional Monte
Carlo, Grosse et al. 2015).

``E_SMC[log Ẑ] <= log Z <= E_{x* ~ pi}[log Ẑ_CSMC(x*)]``; both gaps are KL divergences on the
extended space and shrink as ``N`` grows; at ``N = 1`` they are ``-KL(q‖pi)`` and ``+KL(pi‖q)``
for the proposal's path law ``q``. :func:`log_z_lower` and :func:`log_z_upper` estimate the two
sides (the upper one needs exact draws of ``pi``: free on enumerable toys).

References
----------
Zhao, Brekelmans, Makhzani & Grosse, arXiv 2404.17546; Grosse, Ghahramani & Adams (2015),
arXiv 1511.02543.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.samplers.smc.algorithm import run
from tiltsample.samplers.smc.config import conditional_config
from tiltsample.samplers.smc.evidence import log_evidence_runs
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["EvidenceEstimate", "log_z_lower", "log_z_upper"]


class EvidenceEstimate(NamedTuple):
    """Monte Carlo estimate of ``E[log Ẑ]`` over independent runs."""

    mean: float
    stderr: float
    values: Tensor
    """``[R]`` ``log Ẑ`` of every run (``-inf`` for failed runs)."""
    cost: Cost


def _estimate(values: Tensor, cost: Cost) -> EvidenceEstimate:
    r = values.numel()
    mean = float(values.mean())
    se = float(values.std() / math.sqrt(r)) if r > 1 and math.isfinite(mean) else math.nan
    return EvidenceEstimate(mean, se, values, cost)


def log_z_lower(
    target: TiltedTarget,
    num_particles: int,
    *,
    generator: torch.Generator,
    num_runs: int = 100,
    **smc_params: Any,
) -> EvidenceEstimate:
    r"""Estimate ``E_SMC[log Ẑ] <= log Z`` from ``num_runs`` independent SMC runs.

    ``smc_params`` configure the SMC (:func:`tiltsample.samplers.smc.sampler`; a Power-SMC
    configuration from :func:`tiltsample.samplers.smc.power_smc.smc_params` works too). The gap
    ``log Z - E[log Ẑ]`` is a KL divergence on the sampler's extended space (``-KL(q‖pi)`` at
    ``N = 1``).
    """
    validation.positive_int("num_runs", num_runs)
    state = run(
        target,
        num_particles=num_particles,
        generator=generator,
        num_runs=num_runs,
        **smc_params,
    )
    return _estimate(log_evidence_runs(state), state.cost)


def log_z_upper(
    target: TiltedTarget,
    num_particles: int,
    exact_samples: Sequence[Seq],
    *,
    generator: torch.Generator,
    **smc_params: Any,
) -> EvidenceEstimate:
    r"""Estimate ``E_{x* ~ pi}[log Ẑ_CSMC(x*)] >= log Z``: one CSMC run per exact sample.

    ``exact_samples`` must be exact i.i.d. draws of ``pi`` (e.g.
    :func:`~tiltsample.samplers.smc.csmc.exact_references`,
    ``theory.exact_distribution(target).sample``); with other references the inequality does not
    hold. The CSMC uses the conditional version of ``resampling`` (default multinomial).
    """
    refs = target.check_sequences(list(exact_samples), name="exact_samples")
    if not refs:
        raise ValueError("exact_samples must not be empty")
    config = conditional_config(smc_params)
    state = run(
        target,
        num_particles=num_particles,
        generator=generator,
        num_runs=len(refs),
        reference=refs,
        config=config,
    )
    return _estimate(log_evidence_runs(state), state.cost)
