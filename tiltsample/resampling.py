r"""Resampling schemes: plain functions ``(generator, weights, n) -> ancestors``.

Each returns ``LongTensor[n]`` of ancestor indices with ``E[#copies of i] = n · W_i`` for the
normalised weights ``W`` (the property that keeps SMC evidence estimates unbiased).

=============  ==============================================================================
multinomial    ``n`` i.i.d. draws from ``Categorical(W)``
stratified     ``u_k = (k + U_k)/n``, independent ``U_k ~ U[0, 1)``; inverse CDF at ``u_k``
systematic     ``u_k = (k + U)/n`` with one shared ``U``
residual       ``floor(n W_i)`` copies, the remaining ``R`` drawn multinomially from the residuals
=============  ==============================================================================

Conditional resampling (conditional SMC, particle Gibbs).

The reference particle sits in slot 0 and its ancestor is particle 0. A conditional scheme draws
the ancestor vector ``A`` from the law of the *symmetrised* unconditional scheme given
``A_0 = 0``:

* the symmetrised scheme permutes the input particles uniformly (``tau``) before the inverse CDF
  and the output slots uniformly (``sigma``) after it. Both permutations leave the counts'
  law of multinomial and residual unchanged, and make every slot's marginal
  ``P(A_k = i) = W_i`` (the marginal condition of Andrieu, Doucet & Holenstein 2010). Invariance
  under simultaneous relabelling of inputs and outputs means the CSMC law does not depend on
  where the reference lineage sits, so pinning it to slot 0 is the particle Gibbs kernel;
* given ``A_0 = 0``, the multiset ``S`` of ancestors has law ``P(S) c_0(S) / (n W_0)``
  (size-biased by the number ``c_0`` of copies of 0) and the other ``n - 1`` slots are a
  uniform arrangement of ``S`` minus one copy of 0.

Size-biasing, per scheme (``I = [C, C + W_0)`` is particle 0's CDF interval in the order
``tau``, which stays uniform because ``E[c_0 | tau] = n W_0`` for every order):

systematic
    ``c_0(U) = sum_k 1{(k + U)/n in I}``: choose the stratum ``k`` with probability
    ``∝ |[k, k+1) ∩ nI|``, draw ``U`` uniform on ``(nI - k) ∩ [0, 1)``; all points share ``U``.
stratified
    the same choice of ``k`` and ``U_k``; the other ``U_j`` stay independent uniforms.
residual
    ``c_0 = floor(n W_0) + X_0`` with ``X_0`` the residual draws of 0: with probability
    ``floor(n W_0) / (n W_0)`` the reference takes a deterministic copy (all ``R`` residual draws
    free), otherwise one residual draw is forced to 0 and ``R - 1`` are free.
multinomial
    ``A_1..A_{n-1}`` i.i.d. ``Categorical(W)`` (the classic conditional multinomial scheme).

Cf. Chopin & Singh (2015), *On particle Gibbs sampling*, Bernoulli 21(3). A reference of weight
0 has no conditional law; the other slots are then drawn by the conditional multinomial scheme.

References: Douc, Cappé & Moulines (2005); Chopin & Papaspiliopoulos (2020), ch. 9; Chopin &
Singh (2015); Andrieu, Doucet & Holenstein (2010).
"""

from __future__ import annotations

import math
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


# --------------------------------------------------------------------------- conditional schemes


def _arrange_rest(generator: torch.Generator, ancestors: Tensor, ref_pos: int) -> Tensor:
    """``[0, shuffled(ancestors without entry ref_pos)]``: the reference keeps slot 0."""
    rest = torch.cat([ancestors[:ref_pos], ancestors[ref_pos + 1 :]])
    perm = torch.randperm(rest.numel(), generator=generator)
    return torch.cat([torch.zeros(1, dtype=torch.long), rest[perm]])


def _conditional_inverse_cdf(generator: torch.Generator, w: Tensor, n: int, shared: bool) -> Tensor:
    k_total = w.numel()
    tau = torch.randperm(k_total, generator=generator)
    wt = w[tau]
    r = int((tau == 0).nonzero()[0, 0])
    lo = float(n * wt[:r].sum())
    hi = lo + float(n * w[0])
    strata = torch.arange(n, dtype=torch.float64)
    overlap = (torch.clamp(strata + 1.0, max=hi) - torch.clamp(strata, min=lo)).clamp_(min=0.0)
    k = int(torch.multinomial(overlap / overlap.sum(), 1, generator=generator))
    start, stop = max(float(k), lo), min(float(k + 1), hi)
    v = start + (stop - start) * float(torch.rand(1, generator=generator, dtype=torch.float64))
    u_k = min(max(v - k, 0.0), math.nextafter(1.0, 0.0))
    if shared:
        offsets = torch.full((n,), u_k, dtype=torch.float64)
    else:
        offsets = torch.rand(n, generator=generator, dtype=torch.float64)
        offsets[k] = u_k
    pos = _inverse_cdf(wt, (torch.arange(n, dtype=torch.float64) + offsets) / n)
    pos[k] = r  # point k lies in particle 0's interval by construction (guards round-off)
    return _arrange_rest(generator, tau[pos], k)


def conditional_multinomial(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """Slot 0 keeps ancestor 0; slots ``1..n-1`` i.i.d. ``Categorical(weights)``."""
    w = _normalised(weights)
    validation.positive_int("n", n)
    rest = torch.multinomial(w, n - 1, replacement=True, generator=generator) if n > 1 else None
    head = torch.zeros(1, dtype=torch.long)
    return head if rest is None else torch.cat([head, rest])


def _conditional_start(
    generator: torch.Generator, weights: Tensor, n: int
) -> tuple[Tensor, Tensor | None]:
    """Normalised weights, and the ancestors already drawn when the reference has weight 0 (then
    no scheme constrains the other slots beyond :func:`conditional_multinomial`), else None."""
    w = _normalised(weights)
    validation.positive_int("n", n)
    return w, conditional_multinomial(generator, w, n) if float(w[0]) == 0.0 else None


def conditional_systematic(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """Symmetrised systematic resampling conditioned on slot 0 taking ancestor 0."""
    w, done = _conditional_start(generator, weights, n)
    return done if done is not None else _conditional_inverse_cdf(generator, w, n, shared=True)


def conditional_stratified(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """Symmetrised stratified resampling conditioned on slot 0 taking ancestor 0."""
    w, done = _conditional_start(generator, weights, n)
    return done if done is not None else _conditional_inverse_cdf(generator, w, n, shared=False)


def conditional_residual(generator: torch.Generator, weights: Tensor, n: int) -> Tensor:
    """Symmetrised residual resampling conditioned on slot 0 taking ancestor 0."""
    w, done = _conditional_start(generator, weights, n)
    if done is not None:
        return done
    scaled = n * w
    copies = torch.floor(scaled).long()
    rest = n - int(copies.sum())
    resid = (scaled - copies.double()).clamp_(min=0.0)
    f0 = float(copies[0])
    u = float(torch.rand(1, generator=generator, dtype=torch.float64))
    if u * float(scaled[0]) < f0:  # the reference is one of the deterministic copies
        free = rest
        forced: list[int] = []
    else:  # the reference is a residual draw of particle 0
        free = rest - 1
        forced = [0]
    base = torch.repeat_interleave(torch.arange(w.numel()), copies)
    extra = (
        torch.multinomial(resid / resid.sum(), free, replacement=True, generator=generator)
        if free > 0
        else torch.zeros(0, dtype=torch.long)
    )
    allc = torch.cat([torch.tensor(forced, dtype=torch.long), base, extra])
    return _arrange_rest(generator, allc, 0)


CONDITIONAL_SCHEMES: dict[str, Resampler] = {
    "multinomial": conditional_multinomial,
    "stratified": conditional_stratified,
    "systematic": conditional_systematic,
    "residual": conditional_residual,
}


def conditional_resample_indices(
    scheme: str, generator: torch.Generator, weights: Tensor, n: int
) -> Tensor:
    """Conditional ancestors by the named scheme: slot 0 keeps ancestor 0 (the reference)."""
    validation.one_of("scheme", scheme, CONDITIONAL_SCHEMES)
    return CONDITIONAL_SCHEMES[scheme](generator, weights, n)
