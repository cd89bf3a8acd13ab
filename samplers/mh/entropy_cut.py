"""Entropy-cut MH (Zhou, Mehrotra & Liu): power sampling with the entropy-jump cut law.

A configuration of :mod:`tiltsample.samplers.mh` (the kernel, its state and info, and the
exactness statements live there); ``sampler`` is its registry entry. See
``docs/samplers/mcmc.md``.
"""

from __future__ import annotations

from typing import Any

from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.mh.chains import init
from tiltsample.samplers.mh.kernel import build_kernel
from tiltsample.samplers.mh.outputs import record, result
from tiltsample.samplers.mh.power import power_sampler
from tiltsample.samplers.mh.state import MHInfo, MHState, done
from tiltsample.target import TiltedTarget

__all__ = [
    "MHInfo",
    "MHState",
    "build_kernel",
    "done",
    "entropy_cut_sampler",
    "init",
    "record",
    "result",
    "sampler",
]


def entropy_cut_sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    alpha: float | None = None,
    cut_power: float = 4.0,
    **params: Any,
) -> SamplingAlgorithm:
    """Entropy-cut MH (Zhou, Mehrotra & Liu): :func:`power_sampler` with the entropy-jump cut."""
    if "cut" in params:
        raise TypeError("entropy-cut fixes cut='entropy_jump'; use the 'mh' sampler to change it")
    return power_sampler(
        target,
        num_samples=num_samples,
        alpha=alpha,
        cut="entropy_jump",
        cut_power=cut_power,
        name="entropy-cut",
        **params,
    )


sampler = entropy_cut_sampler
