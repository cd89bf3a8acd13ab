"""QAlign (Faria & Smith): uniform-cut suffix MH with ``p_ref`` at ``tau = 1`` as proposal.

A configuration of :mod:`tiltsample.samplers.mh` (the kernel, its state and info, and the
exactness statements live there); ``sampler`` is its registry entry. See
``docs/samplers/mcmc.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.mh.algorithm import make_algorithm
from tiltsample.samplers.mh.chains import init
from tiltsample.samplers.mh.config import make_config
from tiltsample.samplers.mh.kernel import build_kernel
from tiltsample.samplers.mh.outputs import record, result
from tiltsample.samplers.mh.state import MHInfo, MHState, done
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = [
    "MHInfo",
    "MHState",
    "build_kernel",
    "done",
    "init",
    "qalign_sampler",
    "record",
    "result",
    "sampler",
]


def qalign_sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_steps: int | None = None,
    batching: str = "auto",
    initial: Sequence[Seq] | None = None,
    max_rows: int | None = None,
) -> SamplingAlgorithm:
    """QAlign (Faria & Smith): uniform-cut suffix MH with ``p_ref`` at ``tau = 1`` as proposal.

    The likelihoods cancel, so ``log A = Δ log_tilt + log(|y|/|y'|)`` (:func:`qalign_log_ratio`);
    the kernel computes the full ratio, which equals the shortcut up to rounding (and stays exact
    under ``truncation="condition"``, where the shortcut misses the forced EOS's probability).
    """
    cfg = make_config(
        num_steps=num_steps, proposal_temperature=1.0, batching=batching, max_rows=max_rows
    )
    return make_algorithm("qalign", target, num_samples, cfg, initial, cfg.as_dict())


sampler = qalign_sampler
