r"""Distances between finite laws over responses, and the sampling-noise floor of TV.

A *law* is anything :func:`as_law` accepts: a ``Mapping[Seq, float]`` of probabilities, an
:class:`~tiltsample.theory.enumerate.ExactDistribution`, or a
:class:`~tiltsample.results.SampleSet` (its weighted empirical law; failed draws, whose log-weight
is ``-inf``, are dropped). Distances are exact dict differences over the union of the supports
(``DESIGN.md``: "exact TV is a dict difference").

Noise floor (``specs/smc.md`` §12, ``specs/ets.md`` §9): the empirical law of ``n`` exact i.i.d.
draws is not at TV 0 from the truth; compare samplers against :func:`expected_tv_iid` (exact) or
its asymptotic form :func:`tv_noise_floor`, never against 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from tiltsample.results import SampleSet
from tiltsample.theory.enumerate import ExactDistribution
from tiltsample.types import Seq

__all__ = [
    "Law",
    "as_law",
    "chi2",
    "expected_tv_iid",
    "expected_tv_iid_bruteforce",
    "kl",
    "tv",
    "tv_noise_floor",
]

Law: TypeAlias = Mapping[Seq, float] | ExactDistribution | SampleSet
"""Anything that :func:`as_law` turns into ``{sequence: probability}``."""


def as_law(obj: Law) -> dict[Seq, float]:
    """``{sequence: probability}`` of a mapping, an exact distribution or a sample set.

    Parameters
    ----------
    obj
        A ``Mapping[Seq, float]`` (values must be finite and ``>= 0``; they are not renormalised),
        an :class:`ExactDistribution` (``as_dict()``) or a :class:`SampleSet` (``empirical()``).
    """
    if isinstance(obj, ExactDistribution):
        return obj.as_dict()
    if isinstance(obj, SampleSet):
        return obj.empirical()
    if isinstance(obj, Mapping):
        out: dict[Seq, float] = {}
        for key, value in obj.items():
            v = float(value)
            if not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"law value for {key} must be finite and >= 0, got {value!r}")
            k = tuple(int(t) for t in key)
            out[k] = out.get(k, 0.0) + v
        return out
    raise TypeError(
        "a law must be a Mapping[Seq, float], an ExactDistribution or a SampleSet, "
        f"got {type(obj).__name__}"
    )


def tv(p: Law, q: Law) -> float:
    r"""Total variation ``TV(p, q) = ½ Σ_x |p(x) − q(x)|`` over the union of the supports."""
    a, b = as_law(p), as_law(q)
    keys = a.keys() | b.keys()
    return 0.5 * math.fsum(abs(a.get(x, 0.0) - b.get(x, 0.0)) for x in keys)


def kl(p: Law, q: Law) -> float:
    r"""``KL(p ‖ q) = Σ_{p(x) > 0} p(x) log(p(x)/q(x))``; ``inf`` if ``p`` puts mass where ``q``
    has none."""
    a, b = as_law(p), as_law(q)
    terms: list[float] = []
    for x, px in a.items():
        if px <= 0.0:
            continue
        qx = b.get(x, 0.0)
        if qx <= 0.0:
            return math.inf
        terms.append(px * (math.log(px) - math.log(qx)))
    return max(math.fsum(terms), 0.0)


def chi2(p: Law, q: Law) -> float:
    r"""Pearson divergence ``χ²(p ‖ q) = Σ_x (p(x) − q(x))² / q(x)``; ``inf`` if ``p`` puts mass
    where ``q`` has none."""
    a, b = as_law(p), as_law(q)
    terms: list[float] = []
    for x in a.keys() | b.keys():
        px, qx = a.get(x, 0.0), b.get(x, 0.0)
        if qx <= 0.0:
            if px > 0.0:
                return math.inf
            continue
        terms.append((px - qx) ** 2 / qx)
    return math.fsum(terms)


def _probs(law: Law) -> npt.NDArray[np.float64]:
    values = np.fromiter(as_law(law).values(), dtype=np.float64)
    total = float(values.sum())
    if not total > 0:
        raise ValueError("the law has zero total mass")
    out: npt.NDArray[np.float64] = values / total
    return out


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return int(n)


def tv_noise_floor(law: Law, n: int) -> float:
    r"""Asymptotic expected TV of ``n`` exact i.i.d. draws: ``Σ_x sqrt(p(1 − p) / (2π n))``.

    From ``E|N(0, σ²)| = σ sqrt(2/π)`` with ``σ² = p(1 − p)/n`` per cell, halved
    (``specs/smc.md`` §12 and ``specs/ets.md`` §9, where ``2π`` is written ``6.283``). Accurate when
    every ``n p(x)`` is large; :func:`expected_tv_iid` is exact for every ``n``. The law is
    renormalised first.
    """
    n = _check_n(n)
    p = _probs(law)
    return float(np.sum(np.sqrt(p * (1.0 - p) / (2.0 * math.pi * n))))


def expected_tv_iid(law: Law, n: int) -> float:
    r"""Exact ``E[TV(p̂_n, p)] = ½ Σ_x E|K_x/n − p_x|`` for ``K_x ~ Binomial(n, p_x)``.

    Each mean absolute deviation uses de Moivre's closed form, which is the binomial pmf sum
    ``Σ_k |k − np| pmf(k)`` evaluated exactly:

    .. math::

        \mathbb{E}|K - np| = 2\,k\,(1 - p)\,\mathrm{pmf}(k;\, n, p),
        \qquad k = \lfloor np \rfloor + 1

    (the value is the same with ``k = np`` when ``np`` is an integer, so rounding of ``np`` does
    not matter). The pmf comes from ``scipy.stats.binom.logpmf``, vectorised over the support;
    cost ``O(|support|)`` for any ``n``. The law is renormalised first.

    Parameters
    ----------
    law
        The true law ``p``.
    n
        Sample size.
    """
    from scipy.stats import binom

    n = _check_n(n)
    p = _probs(law)
    k = np.floor(n * p) + 1.0
    inner = (p > 0.0) & (p < 1.0) & (k <= n)
    kk, pp = k[inner], p[inner]
    mad = 2.0 * kk * (1.0 - pp) * np.exp(binom.logpmf(kk, n, pp))
    return float(0.5 * np.sum(mad) / n)


def expected_tv_iid_bruteforce(law: Law, n: int) -> float:
    r"""``½ Σ_x Σ_{k=0}^{n} |k/n − p_x| pmf(k; n, p_x)`` by the full pmf sum (tests, small ``n``).

    Chunked over the support so memory stays ``O(chunk · n)``.
    """
    from scipy.stats import binom

    n = _check_n(n)
    p = _probs(law)
    ks = np.arange(n + 1, dtype=np.float64)
    total = 0.0
    chunk = max(1, 2_000_000 // (n + 1))
    for start in range(0, len(p), chunk):
        pc = p[start : start + chunk, None]
        pmf = binom.pmf(ks[None, :], n, pc)
        total += float(np.sum(np.abs(ks[None, :] / n - pc) * pmf))
    return 0.5 * total
