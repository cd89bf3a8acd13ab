"""Distances and the TV noise floor (tiltsample.theory.distances).

Exact checks first (hand-computed values, the closed-form binomial mean absolute deviation against
the full pmf sum), then properties, then seeded Monte-Carlo checks whose tolerances come from the
Monte-Carlo standard error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiltsample import SampleSet
from tiltsample.theory import (
    ExactDistribution,
    as_law,
    chi2,
    expected_tv_iid,
    expected_tv_iid_bruteforce,
    kl,
    tv,
    tv_noise_floor,
)
from tiltsample.types import Cost, Seq

P = {(1,): 0.5, (2,): 0.5}
Q = {(1,): 0.25, (2,): 0.25, (3,): 0.5}


def random_law(seed: int, size: int, concentration: float = 1.0) -> dict[Seq, float]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch._standard_gamma(torch.full((size,), concentration, dtype=torch.float64), gen)
    weights = weights / weights.sum()
    return {(i,): float(w) for i, w in enumerate(weights.tolist())}


def empirical_tv(law: dict[Seq, float], n: int, gen: torch.Generator) -> float:
    """TV between ``law`` and the empirical law of ``n`` exact i.i.d. draws from it."""
    keys = list(law)
    probs = torch.tensor([law[k] for k in keys], dtype=torch.float64)
    idx = torch.multinomial(probs, n, replacement=True, generator=gen)
    counts = torch.bincount(idx, minlength=len(keys)).to(torch.float64)
    return 0.5 * float(torch.sum(torch.abs(counts / n - probs)))


# ----------------------------------------------------------------------------- exact values
def test_hand_computed_values() -> None:
    assert tv(P, Q) == pytest.approx(0.5, abs=1e-15)
    assert tv(Q, P) == tv(P, Q)
    assert kl(P, Q) == pytest.approx(math.log(2.0), abs=1e-15)
    assert kl(Q, P) == math.inf
    assert chi2(P, Q) == pytest.approx(1.0, abs=1e-15)
    assert chi2(Q, P) == math.inf
    assert tv(P, P) == 0.0 and kl(P, P) == 0.0 and chi2(P, P) == 0.0


def test_as_law_accepts_every_law_type() -> None:
    dist = ExactDistribution(
        [(1,), (2,)], torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64)), 0.0
    )
    assert as_law(dist) == pytest.approx(P)
    assert tv(dist, P) == pytest.approx(0.0, abs=1e-15)
    # a sample set with a failed draw (log-weight -inf) and a repeated sequence
    samples = SampleSet(
        [(1,), (2,), (1,), (3,)],
        torch.tensor([0.0, math.log(2.0), 0.0, -math.inf], dtype=torch.float64),
        Cost(),
    )
    law = as_law(samples)
    assert law == pytest.approx({(1,): 0.5, (2,): 0.5})
    assert tv(samples, dist) == pytest.approx(0.0, abs=1e-15)
    converted = as_law({(np.int64(1), np.int64(0)): 1.0})
    assert converted == {(1, 0): 1.0}
    assert all(type(t) is int for t in next(iter(converted)))
    with pytest.raises(ValueError, match="finite"):
        as_law({(1,): -0.1})
    with pytest.raises(TypeError, match="law"):
        as_law([(1,)])  # type: ignore[arg-type]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 50, 333])
def test_expected_tv_closed_form_equals_pmf_sum(n: int) -> None:
    law = random_law(n, 12, concentration=0.5)
    law[(99,)] = 0.0  # a zero cell contributes nothing
    assert expected_tv_iid(law, n) == pytest.approx(expected_tv_iid_bruteforce(law, n), abs=1e-13)


def test_expected_tv_integer_np_and_degenerate_cells() -> None:
    # n p integer for every cell (the floor/ceil ambiguity of de Moivre's formula)
    law = {(0,): 0.25, (1,): 0.25, (2,): 0.5}
    for n in (4, 8, 20):
        assert expected_tv_iid(law, n) == pytest.approx(
            expected_tv_iid_bruteforce(law, n), abs=1e-14
        )
    assert expected_tv_iid({(0,): 1.0}, 10) == 0.0
    # n = 1 on two cells of mass 1/2: TV is always 1/2
    assert expected_tv_iid({(0,): 0.5, (1,): 0.5}, 1) == pytest.approx(0.5, abs=1e-15)
    with pytest.raises(ValueError, match="n must be"):
        expected_tv_iid(law, 0)


def test_expected_tv_approaches_noise_floor() -> None:
    law = random_law(0, 30, concentration=3.0)
    n = 100_000
    assert min(law.values()) * n > 300  # asymptotic regime
    exact, floor = expected_tv_iid(law, n), tv_noise_floor(law, n)
    assert exact == pytest.approx(floor, rel=0.02)
    # away from the asymptotic regime the two differ, and the exact value is the right one
    small = random_law(1, 30, concentration=0.3)
    assert abs(expected_tv_iid(small, 20) / tv_noise_floor(small, 20) - 1) > 0.05


def test_expected_tv_is_fast_for_large_n() -> None:
    law = random_law(2, 5000, concentration=0.5)
    value = expected_tv_iid(law, 10**7)
    assert math.isfinite(value) and value > 0
    assert value == pytest.approx(tv_noise_floor(law, 10**7), rel=0.02)


# ----------------------------------------------------------------------------- properties
laws = st.integers(0, 10_000).flatmap(
    lambda seed: st.tuples(st.just(random_law(seed, 8, 0.7)), st.just(random_law(seed + 1, 8, 0.7)))
)


@settings(max_examples=50)
@given(laws, st.integers(0, 10_000))
def test_distance_properties(pair: tuple[dict[Seq, float], dict[Seq, float]], seed: int) -> None:
    p, q = pair
    r = random_law(seed, 8, 2.0)
    d = tv(p, q)
    assert 0.0 <= d <= 1.0
    assert d == pytest.approx(tv(q, p), abs=1e-15)
    assert tv(p, r) <= tv(p, q) + tv(q, r) + 1e-15  # triangle inequality
    assert kl(p, q) >= 0.0
    assert d <= math.sqrt(kl(p, q) / 2.0) + 1e-12  # Pinsker
    assert d <= 0.5 * math.sqrt(chi2(p, q)) + 1e-12  # Cauchy-Schwarz
    assert kl(p, q) <= math.log1p(chi2(p, q)) + 1e-12


@settings(max_examples=30)
@given(st.integers(0, 10_000), st.integers(1, 2000))
def test_expected_tv_bounds(seed: int, n: int) -> None:
    law = random_law(seed, 6, 1.0)
    value = expected_tv_iid(law, n)
    # specs/smc.md §12: E[TV] <= ½ Σ sqrt(p(1−p)/n) <= ½ sqrt((K−1)/n)
    bound = 0.5 * sum(math.sqrt(p * (1 - p) / n) for p in law.values())
    assert 0.0 < value <= bound + 1e-15
    assert bound <= 0.5 * math.sqrt((len(law) - 1) / n) + 1e-15


# ----------------------------------------------------------------------------- Monte Carlo
@pytest.mark.parametrize(("n", "size", "seed"), [(50, 10, 0), (400, 25, 1), (5000, 40, 2)])
def test_expected_tv_matches_monte_carlo(n: int, size: int, seed: int) -> None:
    law = random_law(seed + 100, size, concentration=0.8)
    gen = torch.Generator().manual_seed(seed)
    reps = 4000
    values = np.array([empirical_tv(law, n, gen) for _ in range(reps)])
    se = values.std(ddof=1) / math.sqrt(reps)
    assert abs(values.mean() - expected_tv_iid(law, n)) < 4.0 * se
    # the Monte-Carlo sd respects the bounded-differences (Efron–Stein) bound 1/sqrt(2n)
    assert values.std(ddof=1) <= 1.0 / math.sqrt(2.0 * n)


def test_exact_distribution_samples_sit_at_the_noise_floor() -> None:
    dist = ExactDistribution(
        [(i,) for i in range(20)],
        torch.log_softmax(torch.linspace(-2.0, 1.0, 20, dtype=torch.float64), 0),
        0.0,
    )
    gen = torch.Generator().manual_seed(7)
    n, reps = 1000, 300
    values = []
    for _ in range(reps):
        draws = dist.sample(n, gen)
        emp: dict[Seq, float] = {}
        for x in draws:
            emp[x] = emp.get(x, 0.0) + 1.0 / n
        values.append(tv(emp, dist))
    arr = np.array(values)
    se = arr.std(ddof=1) / math.sqrt(reps)
    assert abs(arr.mean() - expected_tv_iid(dist, n)) < 4.0 * se
