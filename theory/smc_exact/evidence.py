r"""Exact and unbiased evidence quantities: the two sides of the ``log Z`` sandwich at ``N = 1``
(:func:`one_particle_bounds`) and the evidence-weighted particle law of many SMC runs
(:func:`evidence_weighted_law`), unbiased for ``pi`` at every ``N``."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from tiltsample.results import SampleSet
from tiltsample.target import TiltedTarget
from tiltsample.theory.enumerate import exact_distribution
from tiltsample.theory.laws import importance_log_weights, proposal_law
from tiltsample.types import Seq

__all__ = ["OneParticleBounds", "evidence_weighted_law", "one_particle_bounds"]


class OneParticleBounds(NamedTuple):
    """The sandwich of ``specs/smc.md`` §9 at ``N = 1``."""

    log_z: float
    lower: float
    """``E_SMC[log Ẑ] = log Z - KL(q ‖ pi)`` (``-inf`` if ``q`` puts mass where ``pi`` has none)."""
    upper: float
    """``E_{x* ~ pi}[log Ẑ_CSMC(x*)] = log Z + KL(pi ‖ q)``."""


def one_particle_bounds(target: TiltedTarget, temperature: float = 1.0) -> OneParticleBounds:
    r"""Exact ``E[log Ẑ]`` of SMC and of CSMC (exact references) with one particle.

    With ``N = 1`` resampling is the identity and any twist telescopes, so
    ``log Ẑ = log w(x) = log p(x) + log G(x) - log q_tau(x)`` for the path ``x``: drawn from
    ``q_tau`` (SMC) or from ``pi`` (CSMC). The proposal is ``p_ref`` at ``temperature``.
    """
    prop = proposal_law(target, temperature)
    log_w = importance_log_weights(prop)
    exact = exact_distribution(target)
    q = torch.exp(prop.log_q)
    lower = float((q * log_w).sum()) if bool(torch.isfinite(log_w).all()) else -math.inf
    idx = {x: i for i, x in enumerate(prop.support)}
    pi_lw = torch.tensor([float(log_w[idx[x]]) for x in exact.support], dtype=torch.float64)
    upper = float((exact.probs * pi_lw).sum())
    return OneParticleBounds(exact.log_z, lower, upper)


def evidence_weighted_law(result: SampleSet, log_z: float) -> tuple[dict[Seq, float], float]:
    r"""The evidence-weighted particle law of ``R`` SMC runs and its expected sampling noise.

    .. math::

        \hat\pi(x) = \frac1R \sum_{r=1}^R \frac{\hat Z_r}{Z}\, \hat\pi_r(x),

    where ``pî_r`` is run ``r``'s normalised weighted histogram. SMC's unnormalised particle
    measure is unbiased, ``E[Ẑ pî_N(f)] = Z pi(f)`` (Del Moral 2004), so ``E[pî(x)] = pi(x)`` at
    every ``N``: a test of ``TV(pî, pi)`` against the returned noise level
    ``½ Σ_x sd_r / sqrt(R) · sqrt(2/pi)`` (from the runs' own spread) checks the sampler's law
    with no ``O(1/N)`` bias to allow for.

    Parameters
    ----------
    result
        A pooled SMC-family result (``meta["num_particles"]``, ``meta["log_evidence_runs"]``,
        weights normalised per run), e.g. ``smc.result(state)``.
    log_z
        The exact ``log Z``.
    """
    n = int(result.meta["num_particles"])
    runs = torch.tensor(result.meta["log_evidence_runs"], dtype=torch.float64)
    r = runs.numel()
    if len(result) != n * r:
        raise ValueError("result must pool num_runs runs of num_particles particles")
    scale = torch.exp(runs - log_z)
    lw = result.log_weights.view(r, n)
    top = torch.logsumexp(lw, dim=1, keepdim=True)
    w = torch.where(torch.isfinite(top), torch.exp(lw - top), torch.zeros_like(lw))
    keys = sorted(set(result.sequences))
    index = {x: i for i, x in enumerate(keys)}
    col = torch.tensor([index[x] for x in result.sequences], dtype=torch.long).view(r, n)
    per_run = torch.zeros((r, len(keys)), dtype=torch.float64).scatter_add_(1, col, w)
    values = scale[:, None] * per_run
    law = dict(zip(keys, values.mean(dim=0).tolist(), strict=True))
    noise = 0.5 * float((values.std(dim=0) / math.sqrt(r)).sum()) * math.sqrt(2 / math.pi)
    return law, noise
