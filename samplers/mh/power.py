"""Power sampling (Karan & Du): MH on ``p_ref^alpha``, uniform cuts, ``q`` at ``tau = 1/alpha``.

A configuration of :mod:`tiltsample.samplers.mh` (the kernel, its state and info, and the
exactness statements live there); ``sampler`` is its registry entry. See
``docs/samplers/mcmc.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.mh.algorithm import make_algorithm
from tiltsample.samplers.mh.chains import init
from tiltsample.samplers.mh.config import make_config
from tiltsample.samplers.mh.kernel import build_kernel
from tiltsample.samplers.mh.outputs import record, result
from tiltsample.samplers.mh.parts import resolve_alpha
from tiltsample.samplers.mh.state import MHInfo, MHState, done
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = [
    "MHInfo",
    "MHState",
    "build_kernel",
    "done",
    "init",
    "power_sampler",
    "record",
    "result",
    "sampler",
]


def power_sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    alpha: float | None = None,
    num_steps: int | None = None,
    proposal_temperature: float | None = None,
    cut: str = "uniform",
    cut_power: float = 4.0,
    length_mode: str = "exact",
    support: str = "full",
    top_k: int = 50,
    block_size: int | None = None,
    batching: str = "auto",
    initial: Sequence[Seq] | None = None,
    name: str = "power",
    max_rows: int | None = None,
) -> SamplingAlgorithm:
    """Power sampling (Karan & Du): MH on ``p_ref^alpha``, suffix proposals at ``tau = 1/alpha``.

    ``alpha`` is read from a power target (``tiltsample.power_target(policy, alpha)``); for any
    other target it must be given and only sets ``tau``. ``alpha=inf`` is max-swap (accept iff the
    suffix log-likelihood strictly increases) and needs an explicit ``proposal_temperature``.
    Other parameters as in :func:`sampler`.
    """
    a = resolve_alpha(target, alpha)
    greedy = math.isinf(a)
    if proposal_temperature is None:
        if greedy:
            raise ValueError(
                "alpha=inf (max-swap) needs an explicit proposal_temperature (1/alpha = 0 would "
                "be greedy decoding)"
            )
        proposal_temperature = 1.0 / a
    cfg = make_config(
        num_steps=num_steps,
        cut=cut,
        cut_power=cut_power,
        proposal_temperature=proposal_temperature,
        length_mode=length_mode,
        support=support,
        top_k=top_k,
        block_size=block_size,
        batching=batching,
        greedy=greedy,
        max_rows=max_rows,
    )
    params = {"alpha": a, **cfg.as_dict()}
    return make_algorithm(name, target, num_samples, cfg, initial, params)


sampler = power_sampler
