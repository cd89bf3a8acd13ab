r"""Weight and chain diagnostics.

Weights
    :func:`ess` (Kong 1992: ``(sum w)^2 / sum w^2``) and :func:`pareto_khat` (the PSIS shape
    estimate of the weight tail, Vehtari et al. 2024: below 0.5 good, 0.5–0.7 usable, above 0.7
    unreliable), fitted with ``pyro.ops.stats.fit_generalized_pareto``.
Chains
    :func:`chain_diagnostics`: ESS, split R-hat (Gelman–Rubin on split chains) and autocorrelation
    through ``pyro.ops.stats`` on per-draw scalar statistics ``[chains, draws]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def ess(log_weights: Tensor) -> float:
    """Kong's effective sample size of log-weights (``-inf`` entries count as zero weight)."""
    lw = torch.as_tensor(log_weights, dtype=torch.float64)
    if lw.numel() == 0 or not bool(torch.isfinite(lw).any()):
        return 0.0
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))


def pareto_khat(log_weights: Tensor) -> float:
    """PSIS ``k̂``: generalised-Pareto shape fitted to the largest weights (Vehtari et al. 2024).

    The tail is the weights strictly above the ``M + 1``-th largest, ``M = ceil(min(N/5,
    3 sqrt(N)))`` (ties at the cutoff stay in the body), fitted by Zhang–Stephens with the weakly
    informative prior on ``k`` (``pyro.ops.stats.fit_generalized_pareto``). This is the selection
    of ArviZ's ``psislw`` (with ``reff = 1``): ``tests/core/test_arviz.py`` checks that both give
    the same ``k̂`` to 1e-6. ``-inf`` log-weights (failed draws) are dropped first. Returns NaN when
    fewer than 5 weights are in the tail (ArviZ returns ``inf`` there) or the fit degenerates.
    """
    from pyro.ops.stats import fit_generalized_pareto

    lw = torch.as_tensor(log_weights, dtype=torch.float64)
    lw = lw[torch.isfinite(lw)]
    n = lw.numel()
    tail = math.ceil(min(n / 5.0, 3.0 * math.sqrt(n)))
    if tail < 5:
        return float("nan")
    lw = lw - lw.max()
    sorted_lw, _ = torch.sort(lw)
    cutoff = max(float(sorted_lw[-tail - 1]), math.log(torch.finfo(torch.float64).tiny))
    top = sorted_lw[sorted_lw > cutoff]
    if top.numel() <= 4:
        return float("nan")
    try:
        k, _sigma = fit_generalized_pareto(torch.exp(top) - math.exp(cutoff))
    except ZeroDivisionError:  # a degenerate tail (the posterior mean of b is exactly 0)
        return float("nan")
    return float(k)


def chain_diagnostics(stats: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """ESS, split R-hat and lag-1 autocorrelation of each ``[chains, draws]`` statistic.

    ``ess`` is pyro's multi-chain autocorrelation ESS (Geyer initial monotone sequence); ``rhat`` is
    split Gelman–Rubin. Constant statistics get ``ess = chains·draws``, ``rhat = 1``. The
    ``accepted`` statistic also reports its mean as ``acceptance_rate``.
    """
    from pyro.ops.stats import autocorrelation, effective_sample_size, split_gelman_rubin

    out: dict[str, dict[str, float]] = {}
    for name, values in stats.items():
        x = torch.as_tensor(values, dtype=torch.float64)
        if x.dim() != 2:
            raise ValueError(f"statistic {name!r} must be [chains, draws], got {tuple(x.shape)}")
        chains, draws = x.shape
        entry: dict[str, float] = {"mean": float(x.mean()) if x.numel() else float("nan")}
        if not bool(torch.isfinite(x).all()) or draws < 4:
            entry.update(ess=float("nan"), rhat=float("nan"), autocorr_lag1=float("nan"))
        elif float(x.std()) == 0.0:
            entry.update(ess=float(chains * draws), rhat=1.0, autocorr_lag1=0.0)
        else:
            entry["ess"] = float(effective_sample_size(x, chain_dim=0, sample_dim=1))
            entry["rhat"] = float(split_gelman_rubin(x, chain_dim=0, sample_dim=1))
            entry["autocorr_lag1"] = float(autocorrelation(x, dim=1)[:, 1].mean())
        if name == "accepted":
            entry["acceptance_rate"] = entry["mean"]
        out[name] = entry
    return out
