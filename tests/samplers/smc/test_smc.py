"""SMC (samplers/smc/) against exact ground truth.

Exact, seed-free checks first: the zero-variance twisted SMC (exact twists + locally optimal
proposal ⇒ log Ẑ = log Z in every run, for every scheme, threshold, block size, convention and
length convention), the importance-weight identity without resampling (weights accumulate, random
twists telescope), the two bookkeeping conventions, failed runs, costs. Then seeded statistical
tests with tolerances from the sample size: E[Ẑ]/Z, the sign of the log-bias, the pooled particle
law against the exact SIR law (no resampling) and against pi (rate in N), and the invariance of the
resample-move kernel against the exact intermediate target.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from scipy.stats import chisquare
from smc_toys import TRUNCATIONS, merge_rare
from smc_toys import constrained_toy as toy
from smc_toys import smc_runs as runs

import tiltsample
from tiltsample import TiltedTarget, power_target
from tiltsample.samplers import smc
from tiltsample.samplers.smc.twists import LogNormalNoise
from tiltsample.target import Truncation
from tiltsample.targets.rewards import ConstraintReward, ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.targets.toys import tabular_toy
from tiltsample.testing import check_sampler
from tiltsample.testing.strategies import tabular_targets
from tiltsample.theory import (
    ExactPotential,
    exact_distribution,
    expected_tv_iid,
    proposal_law,
    sir_law,
    tv,
)
from tiltsample.theory.smc_exact import evidence_weighted_law, intermediate_law
from tiltsample.types import Seq

Tensor = torch.Tensor


pytestmark = pytest.mark.usefixtures("serial_torch")


SCHEMES = ("systematic", "stratified", "residual", "multinomial")


def weights_of(state: smc.SMCState) -> Tensor:
    out: Tensor = smc.log_evidence_runs(state)
    return out


# ----------------------------------------------------------------------------- exact tests
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_zero_variance_with_exact_twists_and_the_optimal_proposal(truncation: Truncation) -> None:
    target = toy(truncation)
    log_z = exact_distribution(target).log_z
    pot = ExactPotential(target)
    for i, scheme in enumerate(SCHEMES):
        for kappa in (0.0, 0.3, 1.0):
            for convention in ("reset", "mean"):
                block = 1 + (i % 2) * 2
                state = runs(
                    target,
                    5,
                    6,
                    seed=i,
                    twist="lookahead",
                    potential=pot,
                    proposal="optimal",
                    resampling=scheme,
                    ess_threshold=kappa,
                    block_size=block,
                    convention=convention,
                )
                got = weights_of(state)
                assert torch.allclose(got, torch.full_like(got, log_z), atol=1e-9, rtol=0), (
                    scheme,
                    kappa,
                    convention,
                )


@settings(max_examples=15)
@given(target=tabular_targets())
def test_zero_variance_on_random_targets(target: TiltedTarget) -> None:
    log_z = exact_distribution(target).log_z
    out = tiltsample.sample(
        smc.sampler(
            target,
            num_samples=12,
            num_particles=4,
            twist="lookahead",
            potential=ExactPotential(target),
            proposal="optimal",
            num_moves=1,
        ),
        target,
        12,
        seed=0,
    )
    assert out.log_evidence is not None
    assert abs(out.log_evidence - log_z) < 1e-9
    assert all(abs(v - log_z) < 1e-9 for v in out.meta["log_evidence_runs"])


def _importance_log_weight(target: TiltedTarget, xs: list[Seq], temperature: float) -> Tensor:
    """log p(x) + log G(x) - log q_tau(x) by the exact proposal law (independent of smc.py)."""
    law = proposal_law(target, temperature)
    index = {x: i for i, x in enumerate(law.support)}
    lw = law.log_weights
    return torch.tensor([float(lw[index[x]]) for x in xs], dtype=torch.float64)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_without_resampling_weights_accumulate_and_random_twists_telescope(
    truncation: Truncation,
) -> None:
    """kappa = 0: every final weight is the importance weight of its path, whatever the twist.

    This is the FK-steering pitfall of specs/smc.md §10 turned into a test: increments of blocks
    without resampling accumulate, and a random twist drawn once per prefix and reused cancels.
    """
    target = toy(truncation)
    pot = ExactPotential(target)
    for twist_params in (
        {"twist": "none"},
        {"twist": "prefix"},
        {"twist": "lookahead", "potential": pot},
        {"twist": "lookahead", "potential": LogNormalNoise(pot, 1.5)},
    ):
        for block in (1, 2):
            state = runs(
                target,
                40,
                1,
                seed=block,
                ess_threshold=0.0,
                temperature=0.8,
                block_size=block,
                **twist_params,
            )
            out = smc.result(state)
            expected = _importance_log_weight(target, out.sequences, 0.8)
            assert torch.allclose(out.log_weights, expected, atol=1e-10, rtol=0), twist_params
            log_z_hat = float(torch.logsumexp(expected, 0) - math.log(40))
            assert out.log_evidence == pytest.approx(log_z_hat, abs=1e-10)


def test_conventions_a_and_b_agree() -> None:
    """Convention (A) (reset, add the log-mean) and (B) (set weights to the log-mean) give the same
    particle system; log Ẑ agrees to rounding (floating addition is not associative, so exact
    bit-equality of log Ẑ cannot hold in general; the particles, ancestors and normalised weights
    do agree exactly on these seeds)."""
    target = toy("stop")
    for seed in range(2):
        for kappa, moves, scheme in (
            (0.5, 0, "systematic"),
            (1.0, 1, "residual"),
            (0.7, 2, "stratified"),
        ):
            common = dict(ess_threshold=kappa, num_moves=moves, resampling=scheme, temperature=0.9)
            a = tiltsample.sample(
                smc.sampler(target, num_samples=24, num_particles=8, **common),
                target,
                24,
                seed=seed,
            )
            b = tiltsample.sample(
                smc.sampler(target, num_samples=24, num_particles=8, convention="mean", **common),
                target,
                24,
                seed=seed,
            )
            assert a.sequences == b.sequences
            assert a.cost == b.cost
            assert torch.equal(a.normalized_weights(), b.normalized_weights()) or torch.allclose(
                a.normalized_weights(), b.normalized_weights(), atol=1e-14, rtol=0
            )
            assert a.meta["num_resampling"] == b.meta["num_resampling"]
            for x, y in zip(a.meta["log_evidence_runs"], b.meta["log_evidence_runs"], strict=True):
                assert x == pytest.approx(y, abs=1e-12)


def test_all_zero_weights_give_log_evidence_minus_inf_not_nan() -> None:
    policy = random_tabular(torch.Generator().manual_seed(0), 3, 3)
    never = ConstraintReward(lambda x: False)
    target = TiltedTarget(policy, ContainsTokenReward(1, 0), 1.0, (), 3).tilt(never)
    for scheme in SCHEMES:
        for kappa in (0.0, 0.5, 1.0):
            for convention in ("reset", "mean"):
                out = tiltsample.sample(
                    smc.sampler(
                        target,
                        num_samples=6,
                        resampling=scheme,
                        ess_threshold=kappa,
                        convention=convention,
                    ),
                    target,
                    6,
                    seed=0,
                )
                assert out.log_evidence == -math.inf
                assert not bool(torch.isnan(out.log_weights).any())


def test_finished_particles_keep_their_weight_and_can_be_duplicated() -> None:
    """A particle that ends early keeps its weight through later blocks and is resampled with
    the others (specs/smc.md §6 rule 5): with block_size = 1, kappa = 1 on a toy where EOS is
    likely, some final particle sets contain duplicated short responses and log Ẑ stays exact
    with exact twists."""
    target = toy("stop")
    pot = ExactPotential(target)
    state = runs(target, 16, 20, seed=3, twist="lookahead", potential=pot, ess_threshold=1.0)
    out = smc.result(state)
    short = [x for x in out.sequences if len(x) < target.max_new_tokens]
    assert short, "the toy should produce early EOS"
    dup = Counter(out.sequences[:16])
    assert max(dup.values()) > 1


def test_cost_counts_every_token_and_never_re_encodes_a_prefix() -> None:
    target = toy("stop")
    n = 32
    # no resampling: generated tokens are the particles' lengths; one reward call per particle
    out = tiltsample.sample(
        smc.sampler(target, num_samples=n, ess_threshold=0.0), target, n, seed=0
    )
    assert out.cost.generated_tokens == sum(len(x) for x in out.sequences)
    assert out.cost.reward_calls == 2 * n  # two tilt terms (reward, constraint), once each
    # resampling reorders the session: same forward tokens as one pass over n rows (ideal cache:
    # the prompt once, then one token per row per position), one model call per position
    res = tiltsample.sample(
        smc.sampler(target, num_samples=n, ess_threshold=1.0), target, n, seed=0
    )
    steps = res.meta["num_steps"]
    assert res.cost.model_calls <= steps
    assert res.cost.forward_tokens <= 1 + n * steps


def test_same_seed_same_output_and_global_rng_untouched() -> None:
    target = toy("condition")
    for params in (
        {},
        {"proposal": "optimal", "num_moves": 2, "block_size": 2},
        {"twist": "lookahead", "num_rollouts": 2, "num_moves": 1},
    ):
        check_sampler(
            smc.sampler(target, num_samples=8, num_particles=4, **params), target, num_samples=8
        )


# ----------------------------------------------------------------------------- statistical
def _ratio_stats(log_z_hat: Tensor, log_z: float) -> tuple[float, float]:
    ratio = torch.exp(log_z_hat - log_z)
    return float(ratio.mean()), float(ratio.std() / math.sqrt(ratio.numel()))


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"temperature": 0.8, "block_size": 2, "resampling": "residual"},
        {"twist": "lookahead", "potential": "exact", "resampling": "stratified"},
        {"twist": "lookahead", "potential": "noisy", "ess_threshold": 1.0},
        {"proposal": "optimal", "twist": "lookahead", "potential": "noisy", "num_moves": 1},
        {"num_moves": 2, "move_temperature": 0.7, "resampling": "multinomial"},
    ],
    ids=["prefix", "tempered-block", "exact-twist", "noisy-twist", "noisy-optimal-moves", "moves"],
)
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_evidence_is_unbiased_and_log_evidence_biased_down(
    params: dict[str, Any], truncation: Truncation
) -> None:
    target = toy(truncation)
    log_z = exact_distribution(target).log_z
    params = dict(params)
    if params.get("potential") == "exact":
        params["potential"] = ExactPotential(target)
    elif params.get("potential") == "noisy":
        params["potential"] = LogNormalNoise(ExactPotential(target), 1.0)
    r = 300
    state = runs(target, 8, r, seed=11, **params)
    mean, se = _ratio_stats(smc.log_evidence_runs(state), log_z)
    assert abs(mean - 1.0) < 4 * se + 1e-12, (mean, se)
    log_bias = float(smc.log_evidence_runs(state).mean()) - log_z
    assert log_bias < 0  # Jensen: E[log Ẑ] <= log Z
    # the evidence-weighted particle law is unbiased for pi at any N: only noise remains
    law, noise = evidence_weighted_law(smc.result(state), log_z)
    assert tv(law, exact_distribution(target)) < 3 * noise


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_pooled_law_without_resampling_is_the_exact_sir_law(truncation: Truncation) -> None:
    """kappa = 0: the expected normalised histogram of one run is the law of one SIR draw among N
    candidates (theory.sir_law, an exact 1-D quadrature); the average over R runs is within the
    i.i.d. noise floor of R draws of it."""
    target = toy(truncation)
    n, r = 4, 3000
    state = runs(target, n, r, seed=5, ess_threshold=0.0, temperature=0.9)
    pooled = smc.result(state).empirical()
    exact = sir_law(target, n, 0.9)
    floor = expected_tv_iid(exact, r)
    assert tv(pooled, exact) < 1.5 * floor
    assert tv(exact, exact_distribution(target)) > 5 * floor  # the test can see the SIR bias


def test_pooled_particle_law_converges_like_one_over_n() -> None:
    """TV(average of the runs' normalised histograms, pi) falls like 1/N (self-normalisation
    bias, specs/smc.md §12–14) while it is above the noise floor sqrt(K / (2π R N))."""
    target = tabular_toy(vocab_size=3, max_len=3, lam=0.5)
    exact = exact_distribution(target)
    ns = [2, 4, 8, 16]
    tvs = []
    for n in ns:
        state = runs(target, n, 16000 // n, seed=n, ess_threshold=1.0)
        tvs.append(tv(smc.result(state).empirical(), exact))
    slope = float(np.polyfit(np.log(ns), np.log(tvs), 1)[0])
    assert -1.35 < slope < -0.65, (slope, tvs)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("mode", ["none", "exact", "optimal"])
def test_resample_move_leaves_the_intermediate_target_invariant(
    truncation: Truncation, mode: str
) -> None:
    """Start from exact draws of gamma_t (theory.smc_exact.intermediate_law), apply MH moves,
    and test the law of the result against gamma_t with a chi-square test (rare cells merged)."""
    target = toy(truncation)
    pot = ExactPotential(target)
    params: dict[str, Any] = {
        "none": {"twist": "none", "move_temperature": 0.6},
        "exact": {"twist": "lookahead", "potential": pot, "move_temperature": 1.5},
        "optimal": {
            "twist": "lookahead",
            "potential": pot,
            "proposal": "optimal",
            "move_temperature": 0.7,
        },
    }[mode]
    n = 3000
    for t in (2, target.max_new_tokens - 1):  # at the cap every particle has finished
        law = intermediate_law(target, t, "none" if mode == "none" else "exact")
        keys = list(law)
        probs = torch.tensor([law[k] for k in keys], dtype=torch.float64)
        gen = torch.Generator().manual_seed(t)
        idx = torch.multinomial(probs, n, replacement=True, generator=gen)
        state = smc.state_from_sequences(
            target, [keys[i] for i in idx.tolist()], generator=gen, **params
        )
        moved = smc.rejuvenate(state, gen, num_moves=3, **params)
        rate = moved.moves_accepted / moved.moves_proposed
        assert 0.05 < rate < 1.0
        counts = Counter(smc.result(moved).sequences)
        assert set(counts) <= set(keys)
        obs, exp = merge_rare([counts.get(k, 0) for k in keys], (probs * n).tolist())
        assert chisquare(obs, exp).pvalue > 1e-3


def test_batched_resamplers_are_unbiased_and_keep_the_floor_copies() -> None:
    """E[#copies] = N W for every vectorised scheme (5,000 draws; residual, which loops over the
    core function, 1,000); systematic and residual keep
    at least floor(N W) copies."""
    gen = torch.Generator().manual_seed(0)
    w = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1], dtype=torch.float64)
    n = 5
    for scheme in SCHEMES:
        reps = 1000 if scheme == "residual" else 5000  # residual loops over runs: fewer reps
        weights = w[None, :].expand(reps, -1).contiguous()
        anc = smc.batched_resample(scheme, gen, weights)
        assert anc.shape == (reps, n) and int(anc.min()) >= 0 and int(anc.max()) < n
        counts = torch.nn.functional.one_hot(anc, n).sum(dim=1).double()
        assert torch.allclose(counts.mean(0), n * w, atol=0.03), scheme
        if scheme in ("systematic", "residual"):
            assert bool((counts >= torch.floor(n * w)).all()), scheme
    cond = smc.conditional_resample("multinomial", gen, w[None, :].expand(100, -1).contiguous())
    assert bool((cond[:, 0] == 0).all())


# ----------------------------------------------------------------------------- power target
def test_prefix_twist_factorises_the_power_tilt_exactly() -> None:
    """On p^alpha the prefix twist p(s)^(alpha-1) with the tempered proposal tau = 1/alpha makes
    every incremental weight sum_v p(v|s)^alpha: the optimal proposal of the same twist draws the
    same tokens and the same weights (kappa = 0)."""
    policy = random_tabular(torch.Generator().manual_seed(2), 3, 4)
    target = power_target(policy, 3.0, max_new_tokens=4)
    a = tiltsample.sample(
        smc.sampler(target, num_samples=50, temperature=1 / 3, ess_threshold=0.0),
        target,
        50,
        seed=4,
    )
    b = tiltsample.sample(
        smc.sampler(target, num_samples=50, proposal="optimal", ess_threshold=0.0),
        target,
        50,
        seed=4,
    )
    assert a.sequences == b.sequences
    assert torch.allclose(a.log_weights, b.log_weights, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("params", "error", "name"),
    [
        ({"proposal": "greedy"}, ValueError, "proposal"),
        ({"twist": "future"}, ValueError, "twist"),
        ({"twist": "lookahead"}, ValueError, "potential"),
        ({"twist": "none", "potential": object()}, ValueError, "potential"),
        ({"ess_threshold": 1.5}, ValueError, "ess_threshold"),
        ({"resampling": "sys"}, ValueError, "resampling"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"num_moves": -1}, ValueError, "num_moves"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"proposal": "optimal", "temperature": 0.5}, ValueError, "temperature"),
        ({"convention": "both"}, ValueError, "convention"),
        ({"num_particles": 5}, ValueError, "num_particles"),
        ({"twist": "prefix", "num_rollouts": 2}, ValueError, "num_rollouts"),
        ({"twist": 3}, TypeError, "twist"),
    ],
)
def test_bad_parameters_name_themselves(params: dict[str, Any], error: type, name: str) -> None:
    target = toy("stop")
    with pytest.raises(error, match=name):
        smc.sampler(target, num_samples=8, **params)
