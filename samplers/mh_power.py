"""Power sampling (Karan & Du): MH on ``p_ref^alpha``, uniform cuts, ``q`` at ``tau = 1/alpha``.

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
from tiltsample.samplers.mh import power_sampler as sampler

__all__ = ["MHInfo", "MHState", "build_kernel", "done", "init", "record", "result", "sampler"]
