r"""What a run of ETS is compared with: the exact target ``pi`` of a toy, and the Rao–Blackwellised
estimate of the sampler's output law from its recorded selection probabilities."""

from __future__ import annotations

from typing import Any

import torch

from tiltsample.diffusion import is_masked_diffusion
from tiltsample.results import SampleSet
from tiltsample.target import TiltedTarget
from tiltsample.theory.ets_laws.models import log_mul
from tiltsample.types import Seq

__all__ = ["rao_blackwell_law", "tilted_law"]


def rao_blackwell_law(samples: SampleSet, target: TiltedTarget) -> dict[Seq, float]:
    r"""Rao–Blackwellised estimate of ETS's output law from the recorded selections.

    At every guidance step ``i`` a running chain ends with output ``c`` with probability
    ``Σ_{m: c_m = c complete} p_{i,m}`` given everything before the draw; summing these over the
    steps a chain actually ran (before any failed step) is an unbiased estimate of
    ``P(output = c, success)``. The estimate averages it over the draws and divides by the
    fraction of successful draws (the law given success). Needs ``meta["selections"]`` (run the
    sampler with ``record_selections=True``, the default).
    """
    selections = samples.meta.get("selections")
    if selections is None:
        raise ValueError("rao_blackwell_law needs meta['selections'] (record_selections=True)")
    failed_at = samples.meta.get("failed_at") or [None] * len(selections)
    diffusion = is_masked_diffusion(target.policy)
    mask = int(target.policy.mask_id) if diffusion else None  # type: ignore[attr-defined]
    out: dict[Seq, float] = {}
    n = len(selections)
    successes = sum(1 for f in failed_at if f is None)
    if successes == 0:
        raise ValueError("every draw failed: no law to estimate")
    for steps, fail in zip(selections, failed_at, strict=True):
        for i, sel in enumerate(steps, start=1):
            if fail is not None and i >= fail:
                break
            for cand, p in zip(sel.candidates, sel.probs.tolist(), strict=True):
                done_ = (mask not in cand) if diffusion else target.is_complete(cand)
                if done_ and p > 0:
                    out[cand] = out.get(cand, 0.0) + p / n
    scale = n / successes
    return {x: v * scale for x, v in out.items()}


def tilted_law(target: TiltedTarget) -> dict[Seq, float]:
    """The exact target ``pi`` of an autoregressive toy or a masked-diffusion toy target.

    For autoregressive targets this is :func:`tiltsample.theory.exact_distribution`; for a
    masked-diffusion toy the support is the toy's output law (``output_logprobs``), tilted.
    """
    if not is_masked_diffusion(target.policy):
        from tiltsample.theory.enumerate import exact_distribution

        return exact_distribution(target).as_dict()
    policy: Any = target.policy
    law = policy.output_logprobs()
    seqs = list(law)
    log_ref = torch.tensor([law[x] for x in seqs], dtype=torch.float64)
    tilt = target.evaluate_tilt(seqs, log_reference=log_ref).log_tilt
    dens = log_mul(log_ref, tilt)
    probs = torch.exp(dens - torch.logsumexp(dens, 0)).tolist()
    return {x: p for x, p in zip(seqs, probs, strict=True) if p > 0}
