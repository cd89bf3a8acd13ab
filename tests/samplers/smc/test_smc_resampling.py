"""Conditional resampling schemes (tiltsample/resampling.py) against their exact laws.

Exact: the symmetrised unconditional schemes (theory.smc_exact.ancestor_law, enumerated) have
every slot's marginal equal to the weights, so conditioning on ``A_0 = 0`` keeps mass ``W_0``.
Statistical: the conditional samplers draw the unconditional law conditioned on ``A_0 = 0``
(chi-square on the whole ancestor vector at a sample size where every cell expects >= 5 draws).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from tiltsample import resampling
from tiltsample.samplers import smc
from tiltsample.theory.smc_exact import ancestor_law, conditional_ancestor_law

SCHEMES = ("multinomial", "systematic", "stratified", "residual")
# n W_0 < 1, n W_0 > 1 with a dominant non-reference particle, and four particles
CASES = [([0.45, 0.35, 0.2], 3), ([0.1, 0.6, 0.3], 3), ([0.3, 0.45, 0.15, 0.1], 4)]


pytestmark = pytest.mark.usefixtures("serial_torch")


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("weights", "n"), CASES)
def test_symmetrised_scheme_has_the_marginal_property(
    scheme: str, weights: list[float], n: int
) -> None:
    law = ancestor_law(scheme, weights, n)
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
    for slot in range(n):
        for i, w in enumerate(weights):
            marginal = sum(p for a, p in law.items() if a[slot] == i)
            assert marginal == pytest.approx(w, abs=1e-12)


def test_the_sorted_systematic_scheme_lacks_it() -> None:
    """Why the conditional schemes symmetrise: without the permutations slot 0 of systematic
    resampling takes particle 0 with probability min(1, n W_0), not W_0."""
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    hits = sum(int(resampling.systematic(g, w, 3)[0]) == 0 for _ in range(2000)) / 2000
    assert abs(hits - 0.6) < 0.05  # min(1, 3 · 0.2), far from 0.2


def _draws(
    scheme: str, weights: list[float], n: int, draws: int, batched: bool
) -> Counter[tuple[int, ...]]:
    """``draws`` conditional ancestor vectors: one call per draw (tiltsample.resampling), or one
    batched call over ``draws`` runs (the vectorised scheme of samplers/smc/resampling.py)."""
    g = torch.Generator().manual_seed(1)
    w = torch.tensor(weights, dtype=torch.float64)
    if batched:
        rows = smc.conditional_resample(scheme, g, w.expand(draws, -1).clone())
        return Counter(tuple(r) for r in rows.tolist())
    return Counter(
        tuple(resampling.conditional_resample_indices(scheme, g, w, n).tolist())
        for _ in range(draws)
    )


@pytest.mark.parametrize("batched", [False, True], ids=["per-run", "batched"])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("weights", "n"), CASES[1:])
def test_conditional_scheme_is_the_conditioned_law(
    scheme: str, weights: list[float], n: int, batched: bool
) -> None:
    exact = conditional_ancestor_law(scheme, weights, n)
    draws = 3000
    counts = _draws(scheme, weights, n, draws, batched)
    assert set(counts) <= set(exact)
    # the multiset of the other slots (the part the scheme shapes) ...
    ms_exact: Counter[tuple[int, ...]] = Counter()
    ms_seen: Counter[tuple[int, ...]] = Counter()
    for a, p in exact.items():
        ms_exact[tuple(sorted(a[1:]))] += p
    for a, c in counts.items():
        ms_seen[tuple(sorted(a[1:]))] += c
    keys = [k for k in ms_exact if ms_exact[k] * draws >= 5]
    rest = draws - sum(ms_seen[k] for k in keys)
    obs = [ms_seen[k] for k in keys] + ([rest] if len(keys) < len(ms_exact) else [])
    exp = [ms_exact[k] * draws for k in keys]
    if len(keys) < len(ms_exact):
        exp.append(draws - sum(exp))
    assert chisquare(obs, exp).pvalue > 1e-3
    # ... and the slots: each other slot is marginally the size-biased law of one ancestor
    for slot in range(1, n):
        for i in range(len(weights)):
            p = sum(q for a, q in exact.items() if a[slot] == i)
            seen = sum(c for a, c in counts.items() if a[slot] == i) / draws
            assert abs(seen - p) < 4 * (p * (1 - p) / draws) ** 0.5 + 1e-9


@pytest.mark.parametrize("scheme", SCHEMES)
def test_conditional_scheme_keeps_slot_zero_and_is_reproducible(scheme: str) -> None:
    w = torch.tensor([0.05, 0.7, 0.1, 0.15], dtype=torch.float64)
    a = [resampling.conditional_resample_indices(scheme, torch.Generator().manual_seed(3), w, 4)]
    b = [resampling.conditional_resample_indices(scheme, torch.Generator().manual_seed(3), w, 4)]
    assert torch.equal(a[0], b[0])
    g = torch.Generator().manual_seed(4)
    for _ in range(50):
        anc = resampling.conditional_resample_indices(scheme, g, w, 4)
        assert anc.shape == (4,) and int(anc[0]) == 0
        assert bool((anc >= 0).all()) and bool((anc < 4).all())
    # a reference of weight zero: slot 0 still keeps it, the others never pick it
    zero = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    anc = resampling.conditional_resample_indices(scheme, g, zero, 3)
    assert int(anc[0]) == 0 and bool((anc[1:] > 0).all())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_batched_conditional_scheme_handles_mixed_runs(scheme: str) -> None:
    """Runs with different weights in one call, a reference of weight zero and a reference
    carrying all the weight: slot 0 keeps ancestor 0, the rest follows each run's weights."""
    w = torch.tensor(
        [[0.05, 0.7, 0.1, 0.15], [0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25] * 4],
        dtype=torch.float64,
    )
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        anc = smc.conditional_resample(scheme, g, w)
        assert anc.shape == (4, 4) and bool((anc[:, 0] == 0).all())
        assert bool((w.gather(1, anc)[:, 1:] > 0).all())  # no free slot takes weight zero
        assert bool((anc[2] == 0).all())
    a = smc.conditional_resample(scheme, torch.Generator().manual_seed(5), w)
    b = smc.conditional_resample(scheme, torch.Generator().manual_seed(5), w)
    assert torch.equal(a, b)


def test_bad_scheme_names_itself() -> None:
    with pytest.raises(ValueError, match="scheme"):
        resampling.conditional_resample_indices(
            "sorted", torch.Generator(), torch.ones(3, dtype=torch.float64), 3
        )
