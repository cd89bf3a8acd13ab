"""Entropy-cut MH (Zhou, Mehrotra & Liu): power sampling with the entropy-jump cut law.

A configuration of :mod:`tiltsample.samplers.mh` (the kernel, its state and info, and the exactness
statements live there); this module gives it its registry entry. See ``docs/samplers/mcmc.md``.
"""

from __future__ import annotations

from tiltsample.samplers.mh import (
    MHInfo,
    MHState,
    build_kernel,
    done,
    init,
    record,
    result,
)
from tiltsample.samplers.mh import entropy_cut_sampler as sampler

__all__ = ["MHInfo", "MHState", "build_kernel", "done", "init", "record", "result", "sampler"]
