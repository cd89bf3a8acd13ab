"""theory.bounds: published values, vacuous cases, and consistency with exact computations."""

from __future__ import annotations

import itertools
import math

import pytest

from tiltsample.theory import bounds
from tiltsample.theory.rates.experiments import majority_error


@pytest.mark.parametrize(
    ("m", "k", "i", "ntok_over_d"),
    [(15, 3, 8, 172.5), (10, 10, 8, 360.0), (15, 3, 4, 82.5), (15, 1, 4, 37.5)],
)
def test_ets_cost_formula_reproduces_the_paper_tables(
    m: int, k: int, i: int, ntok_over_d: float
) -> None:
    assert bounds.ets_cost_tokens(m, k, i, 512) / 512 == pytest.approx(ntok_over_d)


def test_constants_are_vacuous_at_the_papers_settings() -> None:
    # specs/ets.md §8.2 item 1: sinh(5) ≈ 74.2, sinh(10) ≈ 1.10e4
    h = bounds.ets_lemma2_radius(D=0.5, lam=0.1, M=1, delta=2 / math.e)
    assert h == pytest.approx(math.sinh(5.0) * math.sqrt(2.0), rel=1e-12)
    assert bounds.ets_prop3(I=8, M=15, D=1.0, lam=0.1, eps=0.01, C=1.0) == math.inf
    assert bounds.ets_lemma1(eps=0.1, h=0.1, C=1.0) == pytest.approx(0.3 / 0.8 + 0.1)


def test_corrected_prop3_is_never_tighter_than_published() -> None:
    for m in (10, 1000, 10**6):
        published = bounds.ets_prop3(1, m, D=1.0, lam=1.0, eps=0.01, C=2.0)
        corrected = bounds.ets_prop3_corrected(1, m, D=1.0, lam=1.0, eps=0.01)
        assert corrected >= published


def test_prop3_best_eps_decreases_like_one_over_sqrt_m() -> None:
    b1, _ = bounds.ets_prop3_best_eps(1, 10**4, D=1.0, lam=1.0, C=1.5)
    b2, _ = bounds.ets_prop3_best_eps(1, 10**6, D=1.0, lam=1.0, C=1.5)
    assert 0 < b2 < b1 < 1
    assert 5 < b1 / b2 < 15  # ~ sqrt(100) up to log factors


def test_theorem1_and_prop4_shapes() -> None:
    assert bounds.ets_prop4(L=2.0, D=1.0, lam=1.0, K=100, delta=0.1) == pytest.approx(
        2 * math.e * math.sqrt(math.log(20) / 200)
    )
    small_k = bounds.ets_theorem1(2, 10**6, 10, 0.5, 1.0, 1.5, 0.05, 1.0)
    large_k = bounds.ets_theorem1(2, 10**6, 10**5, 0.5, 1.0, 1.5, 0.05, 1.0)
    assert large_k < small_k


def test_theorem2_bounds_the_exact_majority_error() -> None:
    p, q = 0.5, [0.3, 0.2]
    for n in (1, 3, 10, 50, 200):
        per, coarse = bounds.self_consistency_theorem2(n, p, q)
        assert majority_error(n, [p, *q]) <= per <= coarse
    with pytest.raises(ValueError, match="p > max"):
        bounds.self_consistency_theorem2(5, 0.3, [0.4])


def test_majority_error_matches_enumeration_of_votes() -> None:
    probs = [0.45, 0.35, 0.2]
    for n in range(1, 7):
        total = 0.0
        for votes in itertools.product(range(3), repeat=n):
            counts = [votes.count(a) for a in range(3)]
            if counts[0] <= max(counts[1], counts[2]):
                total += math.prod(probs[v] for v in votes)
        assert majority_error(n, probs) == pytest.approx(total, abs=1e-14)


def test_sir_bounds_ordering() -> None:
    pi, w = [0.5, 0.3, 0.2], [2.0, 0.75, 0.5]
    rho = sum(p * wi for p, wi in zip(pi, w, strict=True))
    for m in (1, 4, 64):
        assert bounds.sir_tv_bound_sharp(pi, w, m) <= bounds.sir_tv_bound(rho, m)
    assert bounds.imh_geometric_bound(2.0, 3) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="w_star"):
        bounds.imh_geometric_bound(0.5, 1)
    assert bounds.smc_log_bias_approx(0.5) == -0.25


def test_prop4_is_hoeffding_with_the_range_l_exp_d_over_lam() -> None:
    L, D, lam, K, delta = 3.0, 1.0, 0.3, 7, 0.05
    assert bounds.ets_prop4(L, D, lam, K, delta) == pytest.approx(
        bounds.hoeffding_radius(L * math.exp(D / lam), K, delta), rel=1e-14
    )
    assert bounds.hoeffding_radius(2.0, 4, 0.1) == pytest.approx(2.0 * math.sqrt(math.log(20) / 8))
    with pytest.raises(ValueError, match="value_range"):
        bounds.hoeffding_radius(-1.0, 4, 0.1)
