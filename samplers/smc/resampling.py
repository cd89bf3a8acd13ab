"""Resampling glue of the SMC family: Kong's ESS per run, ancestors for many runs at once
(:func:`batched_resample`), the conditional schemes of conditional SMC
(:func:`conditional_resample`, particle 0 keeps its lineage), all with the laws of
:mod:`tiltsample.resampling`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tiltsample.resampling import resample_indices

__all__ = ["batched_resample", "conditional_resample", "ess_rows"]


def ess_rows(log_w: Tensor) -> Tensor:
    """Kong's ESS of every row of ``[G, N]`` log-weights (0 for a row of zero weights)."""
    num = 2 * torch.logsumexp(log_w, dim=1)
    den = torch.logsumexp(2 * log_w, dim=1)
    out = torch.exp(num - den)
    return torch.where(torch.isfinite(num), out, torch.zeros_like(out))


def batched_resample(scheme: str, generator: torch.Generator, weights: Tensor) -> Tensor:
    """Ancestors ``[G, N]`` for ``G`` runs at once (normalised ``weights [G, N]``).

    One run uses :func:`tiltsample.resampling.resample_indices` itself; several runs use the same
    rules vectorised (multinomial, stratified, systematic) or a loop over the core function
    (residual). Every scheme has ``E[#copies of i] = N W_i``.
    """
    groups, n = weights.shape
    if groups == 1 or scheme == "residual":
        return torch.stack([resample_indices(scheme, generator, w, n) for w in weights])
    if scheme == "multinomial":
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    if scheme == "stratified":
        u0 = torch.rand((groups, n), generator=generator, dtype=torch.float64)
    else:  # systematic
        u0 = torch.rand((groups, 1), generator=generator, dtype=torch.float64).expand(-1, n)
    u = (torch.arange(n, dtype=torch.float64)[None, :] + u0) / n
    cdf = torch.cumsum(weights.to(torch.float64), dim=1)
    cdf[:, -1] = 1.0  # guard against round-off
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=n - 1)


def conditional_resample(scheme: str, generator: torch.Generator, weights: Tensor) -> Tensor:
    """Conditional ancestors ``[G, N]``: particle 0 of each run keeps its lineage.

    Vectorised over the runs, with the laws of :mod:`tiltsample.resampling`'s conditional schemes
    (the symmetrised scheme given ``A_0 = 0``; a reference of weight 0 falls back to the
    conditional multinomial scheme): multinomial draws the other slots freely; systematic and
    stratified size-bias the stratum that hits particle 0's interval in a uniformly permuted input
    order; residual forces one residual draw of particle 0 unless the reference is one of its
    deterministic copies. The other ``N - 1`` slots are then a uniform arrangement of the
    multiset minus one copy of 0.
    """
    groups, n = weights.shape
    w = weights.to(torch.float64)
    w = w / w.sum(dim=1, keepdim=True)
    anc = torch.zeros((groups, n), dtype=torch.long)
    if n == 1:
        return anc
    if scheme == "multinomial":
        anc[:, 1:] = torch.multinomial(w, n - 1, replacement=True, generator=generator)
        return anc
    zero = w[:, 0] == 0.0
    if bool(zero.any()):  # no conditional law: the other slots draw freely
        anc[zero, 1:] = torch.multinomial(w[zero], n - 1, replacement=True, generator=generator)
    rest = (~zero).nonzero().flatten()
    if rest.numel():
        if scheme == "residual":
            picks = _conditional_residual_rows(generator, w[rest])
        else:
            picks = _conditional_inverse_cdf_rows(generator, w[rest], scheme == "systematic")
        anc[rest] = _arrange_after_reference(generator, picks)
    return anc


def _arrange_after_reference(generator: torch.Generator, picks: Tensor) -> Tensor:
    """``[0, uniform arrangement of the rest]`` for ancestor rows ``[G, N]`` whose column 0 holds
    a copy of ancestor 0."""
    groups, n = picks.shape
    order = torch.argsort(torch.rand((groups, n - 1), generator=generator), dim=1)
    out = torch.zeros_like(picks)
    out[:, 1:] = picks[:, 1:].gather(1, order)
    return out


def _conditional_inverse_cdf_rows(generator: torch.Generator, w: Tensor, shared: bool) -> Tensor:
    """Systematic (``shared``) or stratified ancestors ``[G, N]`` given that particle 0 is drawn,
    with that draw in column 0 (weights ``[G, N]`` with ``w[:, 0] > 0``)."""
    groups, n = w.shape
    f64 = torch.float64
    tau = torch.argsort(torch.rand((groups, n), generator=generator), dim=1)  # input order
    wt = w.gather(1, tau)
    cdf = torch.cumsum(wt, dim=1)
    cdf[:, -1] = 1.0  # guard against round-off
    r = (tau == 0).to(torch.long).argmax(dim=1)  # where particle 0 sits in that order
    before = torch.cat([torch.zeros((groups, 1), dtype=f64), torch.cumsum(wt, dim=1)], dim=1)
    lo = n * before.gather(1, r[:, None]).squeeze(1)
    hi = lo + n * w[:, 0]
    strata = torch.arange(n, dtype=f64)[None, :]
    overlap = (torch.minimum(strata + 1.0, hi[:, None]) - torch.maximum(strata, lo[:, None])).clamp(
        min=0.0
    )
    k = torch.multinomial(overlap / overlap.sum(dim=1, keepdim=True), 1, generator=generator)
    k = k.squeeze(1)
    kf = k.to(f64)
    start, stop = torch.maximum(kf, lo), torch.minimum(kf + 1.0, hi)
    v = start + (stop - start) * torch.rand(groups, generator=generator, dtype=f64)
    u_k = (v - kf).clamp(min=0.0, max=math.nextafter(1.0, 0.0))
    if shared:
        offsets = u_k[:, None].expand(-1, n).clone()
    else:
        offsets = torch.rand((groups, n), generator=generator, dtype=f64)
        offsets.scatter_(1, k[:, None], u_k[:, None])
    u = (torch.arange(n, dtype=f64)[None, :] + offsets) / n
    pos = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=n - 1)
    pos.scatter_(1, k[:, None], r[:, None])  # point k lies in particle 0's interval
    picks = tau.gather(1, pos)
    # move the reference's draw (column k) to column 0
    first = picks[:, :1].clone()
    picks.scatter_(1, k[:, None], first)
    picks[:, 0] = 0
    return picks


def _conditional_residual_rows(generator: torch.Generator, w: Tensor) -> Tensor:
    """Residual ancestors ``[G, N]`` given that particle 0 is drawn, that draw in column 0
    (weights ``[G, N]`` with ``w[:, 0] > 0``)."""
    groups, n = w.shape
    scaled = n * w
    copies = torch.floor(scaled).long()
    rest = n - copies.sum(dim=1)
    resid = (scaled - copies.to(torch.float64)).clamp(min=0.0)
    u = torch.rand(groups, generator=generator, dtype=torch.float64)
    deterministic = u * scaled[:, 0] < copies[:, 0].to(torch.float64)
    forced = ~deterministic & (rest > 0)  # the reference is a residual draw of particle 0
    free = rest - forced.long()
    counts = copies.clone()
    counts[:, 0] += forced.long()
    width = int(free.max()) if free.numel() else 0
    if width > 0:
        has = rest > 0
        probs = torch.where(has[:, None], resid, torch.ones_like(resid))
        extra = torch.multinomial(
            probs / probs.sum(dim=1, keepdim=True), width, replacement=True, generator=generator
        )
        keep = torch.arange(width)[None, :] < free[:, None]
        counts.scatter_add_(1, extra, keep.long())
    flat = torch.repeat_interleave(torch.arange(n).repeat(groups), counts.reshape(-1))
    return flat.view(groups, n)  # sorted per row: column 0 is a copy of ancestor 0
