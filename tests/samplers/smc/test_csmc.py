"""Conditional SMC, particle Gibbs and the bounds on log Z (samplers/smc/: csmc,
particle_gibbs, bounds).

Exact checks: the reference path survives every resampling; with one particle, log Ẑ_CSMC of a
reference is its importance weight and the expectations of both bounds equal log Z ∓ KL
(theory.smc_exact.one_particle_bounds). Statistical checks: the sandwich
E[log Ẑ] <= log Z <= E_pi[log Ẑ_CSMC] with its gap shrinking in N, particle Gibbs leaves pi
invariant (one sweep from exact draws, chi-square) and its chains pass split R-hat < 1.01, and a
differential test against Pyro's SMCFilter on the same toy written as a Pyro program.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency, chisquare
from smc_toys import TRUNCATIONS, gen, merge_rare
from smc_toys import constrained_toy as toy

import tiltsample
from tiltsample.samplers import csmc, smc
from tiltsample.target import Truncation
from tiltsample.targets.pyro_program import PyroProgram
from tiltsample.targets.toys import tabular_toy
from tiltsample.testing import check_sampler
from tiltsample.theory import ExactPotential, exact_distribution, proposal_law, tv
from tiltsample.theory.smc_exact import one_particle_bounds

pytestmark = pytest.mark.usefixtures("serial_torch")


# ----------------------------------------------------------------------------- exact tests
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_reference_particle_keeps_its_path(truncation: Truncation) -> None:
    target = toy(truncation)
    refs = csmc.exact_references(target, 30, gen(0))
    for params in (
        {"ess_threshold": 1.0},
        {"ess_threshold": 0.5, "block_size": 2, "temperature": 0.7},
        {"proposal": "optimal", "twist": "lookahead", "potential": ExactPotential(target)},
    ):
        state = smc.run(
            target, num_particles=4, num_runs=30, generator=gen(1), reference=refs, **params
        )
        out = smc.result(state)
        assert [out.sequences[4 * g] for g in range(30)] == refs


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_one_particle_csmc_evidence_is_the_reference_importance_weight(
    truncation: Truncation,
) -> None:
    target = toy(truncation)
    law = proposal_law(target, 0.8)
    lw = dict(zip(law.support, law.log_weights.tolist(), strict=True))
    refs = csmc.exact_references(target, 25, gen(2))
    for twist in ("none", "prefix"):
        est = csmc.log_z_upper(target, 1, refs, generator=gen(3), temperature=0.8, twist=twist)
        expected = torch.tensor([lw[x] for x in refs], dtype=torch.float64)
        assert torch.allclose(est.values, expected, atol=1e-10, rtol=0)


def test_reference_tokens_are_not_counted_as_generated() -> None:
    target = toy("stop")
    refs = csmc.exact_references(target, 5, gen(6))
    state = smc.run(target, num_particles=1, num_runs=5, generator=gen(7), reference=refs)
    assert state.cost.generated_tokens == 0  # one particle per run: the reference only
    assert state.cost.forward_tokens > 0


def test_exact_twist_and_optimal_proposal_make_csmc_exact_too() -> None:
    target = toy("stop")
    log_z = exact_distribution(target).log_z
    refs = csmc.exact_references(target, 10, gen(4))
    est = csmc.log_z_upper(
        target,
        6,
        refs,
        generator=gen(5),
        twist="lookahead",
        potential=ExactPotential(target),
        proposal="optimal",
    )
    assert torch.allclose(est.values, torch.full_like(est.values, log_z), atol=1e-9, rtol=0)


def test_conformance_and_reproducibility() -> None:
    for truncation in TRUNCATIONS:
        target = toy(truncation)
        check_sampler(csmc.sampler(target, num_samples=8, num_particles=4), target, num_samples=8)
        check_sampler(
            csmc.particle_gibbs_sampler(target, num_samples=3, num_steps=3, num_particles=4),
            target,
            num_samples=3,
        )
        trace = tiltsample.run_chains(
            csmc.particle_gibbs_sampler(target, num_samples=2, num_steps=4, num_particles=4),
            target,
            2,
            seed=0,
        )
        assert trace.num_draws == 4 and "log_density" in trace.stats
        for chain in trace.sequences:
            target.check_sequences(chain)


# ----------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_one_particle_bounds_match_the_exact_kl_divergences(truncation: Truncation) -> None:
    target = toy(truncation)
    exact = one_particle_bounds(target)
    pi = exact_distribution(target)
    lower = csmc.log_z_lower(target, 1, generator=gen(6), num_runs=4000)
    upper = csmc.log_z_upper(target, 1, pi.sample(4000, gen(7)), generator=gen(8))
    if math.isfinite(exact.lower):
        assert abs(lower.mean - exact.lower) < 4 * lower.stderr
    else:  # q puts mass on forced-EOS paths with p_ref = 0: -KL(q||pi) = -inf
        assert lower.mean == -math.inf
    assert abs(upper.mean - exact.upper) < 4 * upper.stderr


def test_sandwich_contains_log_z_and_its_gap_shrinks() -> None:
    """specs/smc.md §9: E[log Ẑ_SMC] <= log Z <= E_pi[log Ẑ_CSMC]; both gaps shrink with N."""
    target = tabular_toy(vocab_size=3, max_len=5, lam=0.5)
    pi = exact_distribution(target)
    gaps = []
    for n in (1, 4, 16, 64):
        r = max(4000 // n, 150)
        params: dict[str, Any] = {"ess_threshold": 1.0, "resampling": "multinomial"}
        lo = csmc.log_z_lower(target, n, generator=gen(n), num_runs=r, **params)
        up = csmc.log_z_upper(target, n, pi.sample(r, gen(100 + n)), generator=gen(n), **params)
        assert lo.mean < pi.log_z + 3 * lo.stderr
        assert up.mean > pi.log_z - 3 * up.stderr
        gaps.append(up.mean - lo.mean)
    assert all(a > b for a, b in itertools.pairwise(gaps)), gaps
    slope = float(np.polyfit(np.log([1, 4, 16, 64]), np.log(gaps), 1)[0])
    assert slope < -0.5, (slope, gaps)


# ----------------------------------------------------------------------------- particle Gibbs
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize(
    "params",
    [
        {"ess_threshold": 1.0},
        {"ess_threshold": 0.5, "temperature": 0.7, "block_size": 2},
        {"proposal": "optimal", "twist": "lookahead", "potential": "noisy"},
        {"ess_threshold": 1.0, "resampling": "systematic"},
        {"ess_threshold": 0.5, "resampling": "systematic", "temperature": 0.7},
        {"ess_threshold": 1.0, "resampling": "stratified"},
        {"ess_threshold": 0.5, "resampling": "residual", "block_size": 2},
    ],
    ids=[
        "every-step",
        "adaptive-tempered-block",
        "optimal-noisy-twist",
        "systematic",
        "systematic-adaptive",
        "stratified",
        "residual-adaptive-block",
    ],
)
def test_particle_gibbs_leaves_pi_invariant(truncation: Truncation, params: dict[str, Any]) -> None:
    """One sweep from exact draws of pi must again give exact draws of pi (chi-square)."""
    from tiltsample.samplers.smc.twists import LogNormalNoise

    target = toy(truncation)
    params = dict(params)
    if params.get("potential") == "noisy":
        params["potential"] = LogNormalNoise(ExactPotential(target), 1.0)
    pi = exact_distribution(target)
    c = 3000
    start = pi.sample(c, gen(9))
    algorithm = csmc.particle_gibbs_sampler(
        target, num_samples=c, num_steps=1, num_particles=4, initial=start, **params
    )
    out = tiltsample.sample(algorithm, target, c, seed=10)
    moved = sum(a != b for a, b in zip(start, out.sequences, strict=True)) / c
    assert moved > 0.1  # the kernel does move
    counts = Counter(out.sequences)
    assert set(counts) <= set(pi.support)
    probs = pi.probs.tolist()
    obs, exp = merge_rare([counts.get(x, 0) for x in pi.support], [p * c for p in probs])
    assert chisquare(obs, exp).pvalue > 1e-3


def test_particle_gibbs_chains_mix_from_overdispersed_starts() -> None:
    target = toy("stop")
    pi = exact_distribution(target)
    trace = tiltsample.run_chains(
        csmc.particle_gibbs_sampler(target, num_samples=8, num_steps=400, num_particles=8),
        target,
        8,
        seed=0,
    )
    diag = trace.diagnostics(burn_in=50)
    assert diag["log_density"]["rhat"] < 1.01
    assert diag["reward"]["rhat"] < 1.01
    assert diag["log_density"]["ess"] > 400
    emp = trace.empirical(burn_in=50)
    floor = sum(
        math.sqrt(p * (1 - p) / (2 * math.pi * diag["log_density"]["ess"]))
        for p in pi.probs.tolist()
    )
    assert tv(emp, pi) < 3 * floor


# ----------------------------------------------------------------------------- Pyro oracle
def test_differential_against_pyro_smcfilter() -> None:
    """The same toy as a Pyro program: its exact log Z (TraceEnum_ELBO) equals ours; SMCFilter
    (p_ref guide, tilt factor at the end, systematic resampling at ESS < N/2) and our SMC without
    intermediate potentials both run importance sampling of N particles, so their log Ẑ have the
    same discrete law (chi-square homogeneity test), and both estimate Z without bias."""
    target = tabular_toy(vocab_size=3, max_len=4, lam=0.5)
    program = PyroProgram.from_target(target)
    log_z = exact_distribution(target).log_z
    assert program.log_z() == pytest.approx(log_z, abs=1e-9)
    n, r = 8, 150
    g = gen(11)
    pyro_runs = [program.smc_filter(n, g) for _ in range(r)]
    theirs = torch.tensor([p.log_evidence for p in pyro_runs], dtype=torch.float64)
    state = smc.run(
        target, num_particles=n, num_runs=1500, generator=gen(12), twist="none", ess_threshold=0.0
    )
    ours = smc.log_evidence_runs(state)
    values = sorted(set(torch.round(torch.cat([ours, theirs]), decimals=9).tolist()))
    table = np.array(
        [[int((torch.round(x, decimals=9) == v).sum()) for v in values] for x in (ours, theirs)]
    )
    table = table[:, table.sum(axis=0) >= 5]
    assert chi2_contingency(table).pvalue > 1e-3
    for est in (ours, theirs):
        ratio = torch.exp(est - log_z)
        assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(len(ratio))
    # the particle laws agree too: pooled weighted histograms within sampling noise of each other
    pooled_theirs: dict[tuple[int, ...], float] = {}
    for p in pyro_runs:
        for x, w in zip(p.particles, torch.exp(p.log_weights).tolist(), strict=True):
            pooled_theirs[x] = pooled_theirs.get(x, 0.0) + w / r
    assert tv(pooled_theirs, smc.result(state).empirical()) < 0.08


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("factory", "error", "name"),
    [
        (
            lambda t: csmc.sampler(t, num_samples=4, resampling="sorted"),
            ValueError,
            "resampling",
        ),
        (lambda t: csmc.sampler(t, num_samples=4, reference="random"), ValueError, "reference"),
        (lambda t: csmc.sampler(t, num_samples=4, reference=[(1,)]), ValueError, "reference"),
        (
            lambda t: csmc.particle_gibbs_sampler(t, num_samples=2, num_steps=0),
            ValueError,
            "num_steps",
        ),
        (
            lambda t: csmc.particle_gibbs_sampler(t, num_samples=2, initial="best"),
            ValueError,
            "initial",
        ),
        (
            lambda t: csmc.particle_gibbs_sampler(t, num_samples=2, num_particles=0),
            ValueError,
            "num_particles",
        ),
    ],
)
def test_bad_parameters_name_themselves(factory: Any, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        factory(toy("stop"))


def test_log_z_upper_needs_complete_exact_samples() -> None:
    target = toy("condition")
    with pytest.raises(ValueError, match="exact_samples"):
        csmc.log_z_upper(target, 2, [(1, 2)], generator=gen(0))
    with pytest.raises(ValueError, match="resampling"):
        csmc.log_z_upper(target, 2, [(0,)], generator=gen(0), resampling="sorted")
