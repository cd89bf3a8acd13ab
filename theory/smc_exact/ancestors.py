r"""Exact laws of the ancestor vector of every resampling scheme, symmetrised (uniform input
order and output slots, as the conditional schemes of :mod:`tiltsample.resampling` require),
and that law given ``A_0 = 0`` (:func:`ancestor_law`, :func:`conditional_ancestor_law`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = ["ancestor_law", "conditional_ancestor_law"]


def _interval_outcomes(cdf: list[float], k: int, n: int) -> list[tuple[int, float]]:
    """``[(ancestor, probability)]`` of the point ``(k + U)/n``, ``U ~ U[0, 1)``, under ``cdf``."""
    cuts = sorted({0.0, 1.0, *(n * c - k for c in cdf if 0.0 < n * c - k < 1.0)})
    out: dict[int, float] = {}
    for a, b in itertools.pairwise(cuts):
        u = (k + 0.5 * (a + b)) / n
        idx = next((i for i, c in enumerate(cdf) if u < c), len(cdf) - 1)
        out[idx] = out.get(idx, 0.0) + (b - a)
    return list(out.items())


def _multiset_law(scheme: str, w: list[float], n: int) -> dict[tuple[int, ...], float]:
    """Exact law of the sorted multiset of ancestors (averaged over input orders)."""
    size = len(w)
    law: dict[tuple[int, ...], float] = {}

    def add(key: Sequence[int], prob: float) -> None:
        k = tuple(sorted(key))
        law[k] = law.get(k, 0.0) + prob

    if scheme == "multinomial":
        for draw in itertools.product(range(size), repeat=n):
            add(draw, math.prod(w[i] for i in draw))
    elif scheme == "residual":
        copies = [math.floor(n * x) for x in w]
        rest = n - sum(copies)
        resid = [n * x - c for x, c in zip(w, copies, strict=True)]
        base = [i for i, c in enumerate(copies) for _ in range(c)]
        total = sum(resid)
        for draw in itertools.product(range(size), repeat=rest):
            add(base + list(draw), math.prod(resid[i] / total for i in draw))
    else:
        orders = list(itertools.permutations(range(size)))
        for tau in orders:
            cdf = list(itertools.accumulate(w[i] for i in tau))
            cdf[-1] = 1.0
            if scheme == "systematic":
                cuts = sorted(
                    {0.0, 1.0} | {n * c - k for c in cdf for k in range(n) if 0.0 < n * c - k < 1.0}
                )
                for a, b in itertools.pairwise(cuts):
                    u = 0.5 * (a + b)
                    picks = [
                        tau[next((i for i, c in enumerate(cdf) if (k + u) / n < c), size - 1)]
                        for k in range(n)
                    ]
                    add(picks, (b - a) / len(orders))
            else:  # stratified: independent strata
                per = [_interval_outcomes(cdf, k, n) for k in range(n)]
                for combo in itertools.product(*per):
                    add([tau[i] for i, _ in combo], math.prod(p for _, p in combo) / len(orders))
    return law


def ancestor_law(scheme: str, weights: Sequence[float], n: int) -> dict[tuple[int, ...], float]:
    """Exact law of the ancestor vector ``A`` (length ``n``) of the symmetrised scheme.

    The multiset ``S`` of ancestors follows the scheme (stratified/systematic averaged over the
    ``K!`` input orders); the output slots are a uniform arrangement of ``S``:
    ``P(A = a) = P(S) prod_i c_i! / n!``. Every slot then has ``P(A_k = i) = W_i``. Tiny ``K``
    and ``n`` only (``K^n`` ancestor vectors).
    """
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    law: dict[tuple[int, ...], float] = {}
    for multiset, prob in _multiset_law(scheme, w, n).items():
        arrangements = set(itertools.permutations(multiset))
        for a in arrangements:
            law[a] = law.get(a, 0.0) + prob / len(arrangements)
    return law


def conditional_ancestor_law(
    scheme: str, weights: Sequence[float], n: int
) -> dict[tuple[int, ...], float]:
    """``P(A = a | A_0 = 0)`` for the symmetrised scheme (:func:`ancestor_law`), the law a
    conditional scheme must sample."""
    law = ancestor_law(scheme, weights, n)
    mass = sum(p for a, p in law.items() if a[0] == 0)
    return {a: p / mass for a, p in law.items() if a[0] == 0}
