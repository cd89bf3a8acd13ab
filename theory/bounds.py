r"""The convergence bounds of the papers, one function per result.

Each function states its source and assumptions and returns the bound's value for given
parameters. Where ``specs/ets.md`` §8.2 notes a likely slip or a loose constant, the bound *as
published* and the corrected or sharper form are separate functions, and the verification report
(:mod:`tiltsample.theory.rates`) shows both.

Notation (``specs/ets.md`` §1, §8): rewards in ``[-D, D]`` (A1), KL coefficient ``lam``, ``M``
candidates, ``K`` rollouts, ``I`` guidance steps, ``C`` the partition function (``C >= e^{-D/lam}``
under (A1)), ``eps`` the uniform energy error of (A2), ``L`` the likelihood-ratio bound of (A3).
A bound whose denominator is not positive is vacuous and returned as ``inf``.

References
----------
ETS: Li, Zhang, Yi, Li, Wang, Wang, Fan, *ETS: Energy-Guided Test-Time Scaling for Training-Free
RL Alignment*, arXiv 2601.21484 (v3): Lemmas 1–2, Props. 3–4, Theorems 1–2, App. B.1.
SIR: Agapiou, Papaspiliopoulos, Sanz-Alonso & Stuart (2017); Kong (1992).
Independence MH: Mengersen & Tweedie (1996), Theorem 2.1.
SMC: Del Moral (2004); Cérou, Del Moral & Guyader (2011).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.optimize import minimize_scalar

from tiltsample import validation


def _vacuous_if_not_positive(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.inf


def ets_lemma2_radius(D: float, lam: float, M: int, delta: float) -> float:
    r"""ETS Lemma 2 (A1): ``|mean of M candidate energies − C| <= h`` w.p. ``>= 1 − delta``.

    .. math:: h = \sinh(D/\lambda)\,\sqrt{(2/M)\log(2/\delta)}.

    As published the centre is ``C``; at guidance step ``i > 1`` the candidates' mean energy is
    ``E(y, x_{t_i})``, not ``C`` (``specs/ets.md`` §8.2 item 2) — the radius is unchanged.
    """
    validation.positive_float("D", D)
    validation.positive_float("lam", lam)
    validation.positive_int("M", M)
    validation.unit_interval("delta", delta, closed=False)
    return math.sinh(D / lam) * math.sqrt(2.0 / M * math.log(2.0 / delta))


def ets_lemma1(eps: float, h: float, C: float) -> float:
    r"""ETS Lemma 1 (A1, A2): one guidance step's error ``(2ε + h)/(C − ε − h) + ε``."""
    return _vacuous_if_not_positive(2 * eps + h, C - eps - h) + eps


def ets_prop3(I: int, M: int, D: float, lam: float, eps: float, C: float) -> float:
    r"""ETS Proposition 3 as published (A1, A2, A4).

    .. math::

        \mathrm{TV}(q, p^*) \le I\,\frac{2\varepsilon + h}{C - \varepsilon - h} + I\varepsilon,
        \qquad h = \sinh(D/\lambda)\sqrt{(2/M)\log(2/\varepsilon)}.

    ``eps`` plays both roles of the paper (energy error of (A2) and Lemma 2's ``delta``).
    """
    validation.positive_int("I", I)
    h = ets_lemma2_radius(D, lam, M, eps)
    return I * ets_lemma1(eps, h, C)


def ets_prop3_corrected(
    I: int, M: int, D: float, lam: float, eps: float, energy_floor: float | None = None
) -> float:
    r"""Prop. 3 with the Lemma 2 slip fixed (``specs/ets.md`` §8.2 item 2).

    The candidates' mean energy at step ``i`` is ``E(y, x_{t_i})``, so ``C`` in the denominator is
    replaced by a lower bound of every state's energy, ``e^{-D/lam}`` under (A1) unless a sharper
    ``energy_floor`` is known. Same rate, worse constant.
    """
    floor = math.exp(-D / lam) if energy_floor is None else energy_floor
    return ets_prop3(I, M, D, lam, eps, floor)


def ets_prop3_best_eps(I: int, M: int, D: float, lam: float, C: float) -> tuple[float, float]:
    r"""Prop. 3 minimised over ``eps ∈ (0, 1)``: ``(bound, argmin)``.

    With *exact* energies (A2) holds for every ``eps > 0`` while ``log(2/eps)`` inside ``h``
    diverges at ``eps = 0``, so the informative value is the minimum over ``eps``
    (``specs/ets.md`` §9 (a)).
    """

    def f(log_eps: float) -> float:
        value = ets_prop3(I, M, D, lam, math.exp(log_eps), C)
        return value if math.isfinite(value) else 1e300

    res = minimize_scalar(f, bounds=(math.log(1e-12), math.log(0.999)), method="bounded")
    eps = math.exp(float(res.x))
    return ets_prop3(I, M, D, lam, eps, C), eps


def ets_prop4(L: float, D: float, lam: float, K: int, delta: float) -> float:
    r"""ETS Proposition 4 (A1, A3): ``|E − Ê_small| <= L e^{D/λ} sqrt(log(2/δ)/(2K))``.

    Holds with probability at least ``1 − δ``.
    """
    validation.positive_int("K", K)
    validation.unit_interval("delta", delta, closed=False)
    return L * math.exp(D / lam) * math.sqrt(math.log(2.0 / delta) / (2.0 * K))


def ets_theorem1(
    I: int, M: int, K: int, D: float, lam: float, L: float, eps: float, C: float
) -> float:
    r"""ETS-IS Theorem 1 as published (A1, A3, A4).

    .. math::

        \mathrm{TV}(q, p^*) \le I\,\frac{2\varepsilon + g}{C - \varepsilon - g}
            + 4I\exp\!\Big(-\frac{2K\varepsilon^2}{L^2 e^{2D/\lambda}}\Big),
        \quad g = \sinh(D/\lambda)\sqrt{\frac{4K\varepsilon^2}{M L^2 e^{2D/\lambda}}}.
    """
    validation.positive_int("I", I)
    validation.positive_int("M", M)
    validation.positive_int("K", K)
    scale = L * L * math.exp(2 * D / lam)
    g = math.sinh(D / lam) * math.sqrt(4 * K * eps * eps / (M * scale))
    return I * _vacuous_if_not_positive(2 * eps + g, C - eps - g) + 4 * I * math.exp(
        -2 * K * eps * eps / scale
    )


def ets_cost_tokens(M: int, K: int, I: int, d: int) -> float:
    r"""Generated tokens of ETS on a fixed-length target (paper App. B.1, Eq. 54).

    .. math:: N_{tokens} = \sum_{i=1}^{I} M\,(B + K(d - iB)) = M\,(1 + K(I-1)/2)\,d, \quad B = d/I.
    """
    return M * (1 + K * (I - 1) / 2) * d


def sir_tv_bound(rho: float, M: int) -> float:
    r"""One SIR draw among ``M`` candidates: ``TV(law, pi) <= rho / M`` (``specs/ets.md`` §8.2).

    ``rho = E_q[w^2] / Z^2 = 1 + chi^2(pi || q)``. From the selected draw's density
    ``M E[1/(w + S)]`` relative to ``pi`` and Jensen:
    ``TV <= E_pi[(w − 1)_+ / (w + M − 1)] <= rho / M`` (normalised weights); see
    :func:`sir_tv_bound_sharp` for the middle term.
    """
    validation.positive_int("M", M)
    return min(1.0, rho / M)


def sir_tv_bound_sharp(pi: Sequence[float], w: Sequence[float], M: int) -> float:
    r"""The sharper middle term ``E_pi[(w − 1)_+ / (w + M − 1)]``, mean-one weights ``w = pi/q``."""
    validation.positive_int("M", M)
    return sum(p * max(wi - 1.0, 0.0) / (wi + M - 1.0) for p, wi in zip(pi, w, strict=True))


def self_consistency_theorem2(N: int, p: float, q: Sequence[float]) -> tuple[float, float]:
    r"""ETS Theorem 2: the majority of ``N`` i.i.d. votes is wrong w.p. at most

    .. math::

        \sum_{a \ne a^*} e^{-N (p - q_a)^2 / 2}
            \;\le\; (|\mathcal A| - 1)\, e^{-N (p - q_{max})^2/2},

    for ``p > q_max`` (Hoeffding on ``1{a*} − 1{a}``; ties count as errors). Returns both forms.
    """
    validation.positive_int("N", N)
    if not q or max(q) >= p:
        raise ValueError("Theorem 2 needs p > max(q) (the correct answer is the mode)")
    per = sum(math.exp(-N * (p - qa) ** 2 / 2) for qa in q)
    return per, len(q) * math.exp(-N * (p - max(q)) ** 2 / 2)


def imh_geometric_bound(w_star: float, n: int) -> float:
    r"""Independence MH (Mengersen & Tweedie 1996): ``||P^n(x, .) − pi||_TV <= (1 − 1/w*)^n``.

    ``w* = sup_x pi(x)/q(x) >= 1`` (normalised densities).
    """
    if not w_star >= 1.0:
        raise ValueError(f"w_star = sup pi/q must be >= 1, got {w_star}")
    validation.non_negative_int("n", n)
    return (1.0 - 1.0 / w_star) ** n


def smc_log_bias_approx(var_log_z: float) -> float:
    r"""SMC evidence: ``E[log Ẑ] − log Z ≈ −Var(log Ẑ)/2`` (delta method; ``E[Ẑ] = Z`` exactly).

    Unbiasedness of ``Ẑ`` holds for any proposal with adequate support and any unbiased resampling
    scheme (Del Moral 2004); the log-bias approximation is poor below about 16 particles
    (``specs/smc.md`` §12).
    """
    return -0.5 * var_log_z


def hoeffding_radius(value_range: float, K: int, delta: float) -> float:
    r"""Hoeffding's two-sided radius for the mean of ``K`` i.i.d. draws in an interval of length
    ``value_range``: ``|mean − E| <= value_range · sqrt(log(2/δ)/(2K))`` w.p. ``>= 1 − δ``.

    ETS Proposition 4 is this with the range bounded by ``L e^{D/λ}`` (a rollout term
    ``Y = ρ e^{r/λ}`` lies in ``[0, L e^{D/λ}]`` under (A1), (A3)); with a state's actual range
    ``max Y − min Y`` it is the sharper, state-dependent form of the same proof.
    """
    validation.positive_int("K", K)
    validation.unit_interval("delta", delta, closed=False)
    if not value_range >= 0:
        raise ValueError(f"value_range must be >= 0, got {value_range}")
    return value_range * math.sqrt(math.log(2.0 / delta) / (2.0 * K))
