r"""Resampling schemes: plain functions ``(generator, weights, n) -> ancestors``.

Each returns ``LongTensor[n]`` of ancestor indices with ``E[#copies of i] = n · W_i`` for the
normalised weights ``W`` (the property that keeps SMC evidence estimates unbiased).

=============  ==============================================================================
multinomial    ``n`` i.i.d. draws from ``Categorical(W)``
stratified     ``u_k = (k + U_k)/n``, independent ``U_k ~ U[0, 1)``; inverse CDF at ``u_k``
systematic     ``u_k = (k + U)/n`` with one shared ``U``
residual       ``floor(n W_i)`` copies, the remaining ``R`` drawn multinomially from the residuals
=============  ==============================================================================

References: Douc, Cappé & Moulines (2005); Chopin & Papaspiliopoulos (2020), ch. 9.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tiltsample import validation

Resampler = Callable[[torch.Generator, Tensor, int], Tensor]


def _normalised(weights: Tensor) -> Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.dim() != 1 or w.numel() == 0:
        raise ValueError(f"weights must be a non-empty 1-D tensor, got shape {tuple(w.shape)}")
    if bool(torch.isnan(w).any()) or bool((w < 0).any()) or bool(torch.isinf(w).any()):
        raise ValueError("weights must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights must not all be zero")
    return w / total


def _inverse_cdf(w: Tensor, u: Tensor) -> Tensor:
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0  # guard against round-off
    return torch.searchsorted(cdf, u, right=True).clamp_(max=w.numel() - 1)


def multinomial(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """``n`` i.i.d. ancestors from ``Categorical(weights)``."""
    w = _normalised(weights)
    validation.positive_int("n", n)
    return torch.multinomial(w, n, replacement=True, generator=generator)


def stratified(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """One uniform per stratum ``[k/n, (k+1)/n)``."""
    w = _normalised(weights)
    validation.positive_int("n", n)
    u = (
        torch.arange(n, dtype=torch.float64)
        + torch.rand(n, generator=generator, dtype=torch.float64)
    ) / n
    return _inverse_cdf(w, u)


def systematic(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """One shared uniform offset for all strata."""
    w = _normalised(weights)
    validation.positive_int("n", n)
    u0 = torch.rand(1, generator=generator, dtype=torch.float64)
    u = (torch.arange(n, dtype=torch.float64) + u0) / n
    return _inverse_cdf(w, u)


def residual(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """Deterministic ``floor(n W_i)`` copies plus multinomial residual draws."""
    w = _normalised(weights)
    validation.positive_int("n", n)
    scaled = n * w
    copies = torch.floor(scaled).long()
    rest = n - int(copies.sum())
    base = torch.repeat_interleave(torch.arange(w.numel()), copies)
    if rest == 0:
        return base
    resid = (scaled - copies.double()).clamp_(min=0.0)
    extra = torch.multinomial(resid / resid.sum(), rest, replacement=True, generator=generator)
    return torch.cat([base, extra])


SCHEMES: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def resample_indices(scheme: str, generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """Ancestors by the named scheme (one of :data:`SCHEMES`)."""
    validation.one_of("scheme", scheme, SCHEMES)
    return SCHEMES[scheme](generator, weights, n)
