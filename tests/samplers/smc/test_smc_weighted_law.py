"""End-to-end law of SMC with resample-move (samplers/smc/, specs/smc.md §6, §8).

SMC's unnormalised particle measure is unbiased at every ``N``: ``E[Ẑ/Z · W(x)] = pi(x)`` for
every sequence ``x`` (Del Moral 2004), with or without resampling, for every twist, proposal and
unbiased scheme, and with invariant moves. This is the property a biased move schedule breaks,
and the one :func:`smc_toys.weighted_law_check` tests, cell by cell, with Hotelling's ``T²`` over
``R`` independent runs (a resolution check makes sure the run count resolves a 5% relative bias of
the heaviest cell at 4 standard errors).

Exact first: with one particle the sampler's weighted law is computable
(:func:`tiltsample.theory.smc_exact.resample_move_law`: extensions and exact move kernels
composed) and equals ``pi`` to round-off for every deterministic twist, cut law and truncation.
Then the implementation end to end: ``N ∈ {1, 2, 4}`` × both truncations × every twist (none,
prefix, exact lookahead, noisy lookahead, rollout lookahead, optimal proposal) × both cut laws,
moves after every block; adaptive resampling with moves; blocks. Last, runs sharing a session
are independent: the spread of the mean ``Ẑ/Z`` across seeds matches the within-session standard
error (F test).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from scipy.stats import f as f_dist
from smc_toys import TRUNCATIONS, gen, power_graded_toy, smc_runs, weighted_law_check

from tiltsample import TiltedTarget
from tiltsample.samplers import smc
from tiltsample.samplers.smc.twists import LogNormalNoise, make_twist
from tiltsample.target import Truncation
from tiltsample.theory import ExactPotential, exact_distribution
from tiltsample.theory.smc_exact import resample_move_law

pytestmark = pytest.mark.usefixtures("serial_torch")

TWISTS = ("none", "prefix", "exact", "noisy", "rollout", "optimal")
CUTS = ("uniform", "entropy_jump")
ROWS = 20_000
"""Particles per configuration (``R = ROWS / N`` runs)."""


def twist_params(name: str, target: TiltedTarget) -> dict[str, Any]:
    """The SMC parameters of one twist configuration."""
    if name in ("none", "prefix"):
        return {"twist": name}
    if name == "rollout":
        return {"twist": "lookahead", "num_rollouts": 2}
    pot = ExactPotential(target)
    noisy = LogNormalNoise(pot, 0.5)
    if name == "exact":
        return {"twist": "lookahead", "potential": pot}
    if name == "noisy":
        return {"twist": "lookahead", "potential": noisy}
    return {"twist": "lookahead", "potential": noisy, "proposal": "optimal"}


# ----------------------------------------------------------------------------- exact, N = 1
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("twist", ["none", "prefix", "exact"])
@pytest.mark.parametrize("cut", CUTS)
def test_one_particle_resample_move_law_is_exactly_pi(
    truncation: Truncation, twist: str, cut: str
) -> None:
    """Extensions and the exact move kernels composed over t = 1..L: E[Ẑ/Z · 1{x}] = pi(x); the
    schedule it replaced (``legacy``) is off by more than 0.1 on some response."""
    target = power_graded_toy(truncation)
    pi = exact_distribution(target).as_dict()
    log_twist: Any = twist
    if twist == "prefix":
        tilt = make_twist("prefix")
        log_twist = lambda xs, lp: tilt.log_twist(target, xs, lp, gen(0))[0]  # noqa: E731
    law = resample_move_law(target, log_twist, temperature=0.8, cut=cut, num_moves=2)
    assert set(law) == set(pi)
    assert max(abs(law[x] - p) for x, p in pi.items()) < 1e-12
    old = resample_move_law(target, log_twist, temperature=0.8, cut=cut, num_moves=2, legacy=True)
    assert max(abs(old.get(x, 0.0) - p) for x, p in pi.items()) > 0.1


def test_the_old_schedule_is_biased_in_closed_form() -> None:
    """The schedule this module replaced (EOS-reopening moves, skipped once the particle has
    finished) over-weights the short response: at L = 2 with no tilt and no twist, x = (EOS,)
    gets E[Ẑ/Z · 1{x}] = p0 (2 - p0) instead of p0, p0 = p(EOS | ())."""
    policy = power_graded_toy().policy
    target = TiltedTarget(policy, None, 1.0, (), 2)
    p0 = math.exp(float(policy.next_logprobs((), [()])[0, 0]))
    law = resample_move_law(target, "none", cut="uniform", legacy=True)
    assert law[(0,)] == pytest.approx(p0 * (2 - p0), abs=1e-12)
    assert resample_move_law(target, "none", cut="uniform")[(0,)] == pytest.approx(p0, abs=1e-12)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow  # 5-12 s per (N, truncation): 12 configurations of 20,000 particles each
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_resample_move_weighted_law_is_pi(n: int, truncation: Truncation) -> None:
    """Every twist × cut law, resampling and moves after every block: T² below its 0.999
    quantile, and the run count resolves a 5% relative bias of the heaviest sequence."""
    target = power_graded_toy(truncation)
    failures = []
    for k, (twist, cut) in enumerate(itertools.product(TWISTS, CUTS)):
        state = smc_runs(
            target,
            n,
            ROWS // n,
            seed=100 * n + k,
            ess_threshold=1.0,
            num_moves=1,
            move_cut=cut,
            move_temperature=0.8,
            **twist_params(twist, target),
        )
        assert state.moves_accepted > 0
        check = weighted_law_check(state)
        assert check.resolution < 0.05, (twist, cut, str(check))
        if not check.ok:
            failures.append(f"{twist}/{cut}: {check}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "params",
    [
        {"twist": "exact", "resampling": "multinomial"},
        {"twist": "prefix", "resampling": "residual", "move_cut": "entropy_jump", "num_moves": 2},
        {"twist": "exact", "block_size": 2},
        {"twist": "exact", "ess_threshold": 0.0},
    ],
    ids=["adaptive", "adaptive-entropy", "blocks", "never-resample"],
)
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_adaptive_resampling_with_moves_keeps_the_law(
    params: dict[str, Any], truncation: Truncation
) -> None:
    """ESS-triggered resampling (kappa = 0.9: some blocks resample, some do not) does not gate
    the moves, which run after every block: the law stays exact at N = 2 and 4. (Moving only
    after a resampling ties the moves to the weights: T² in the hundreds on this toy.)"""
    target = power_graded_toy(truncation)
    params = {"ess_threshold": 0.9, "num_moves": 1, "move_temperature": 0.8, **params}
    params.update(twist_params(params.pop("twist"), target))
    for n in (2, 4):
        state = smc_runs(target, n, ROWS // n, seed=7 + n, **params)
        if params["ess_threshold"] > 0:
            assert 0 < int(state.resample_count.sum()) < state.num_groups * state.steps
        check = weighted_law_check(state)
        assert check.resolution < 0.05, str(check)
        assert check.ok, str(check)


# ----------------------------------------------------------------------------- independence
@pytest.mark.parametrize("cut", CUTS)
def test_runs_sharing_a_session_are_independent(cut: str) -> None:
    """Between-seed variance of the mean Ẑ/Z over R runs against the within-session variance /
    R: the ratio is F(S - 1, S (R - 1)) for independent runs (a cut shared by the session's runs
    inflates it)."""
    target = power_graded_toy("stop")
    log_z = exact_distribution(target).log_z
    seeds, r = 12, 4000
    means, variances = [], []
    for seed in range(seeds):
        state = smc_runs(
            target,
            1,
            r,
            seed=seed,
            twist="none",
            ess_threshold=1.0,
            num_moves=1,
            move_cut=cut,
            move_temperature=0.8,
        )
        ratio = torch.exp(smc.log_evidence_runs(state) - log_z)
        means.append(float(ratio.mean()))
        variances.append(float(ratio.var()))
    between = float(torch.tensor(means).var())
    within = sum(variances) / seeds / r
    stat = between / within
    assert stat < float(f_dist.ppf(1 - 1e-3, seeds - 1, seeds * (r - 1))), (stat, means)
    assert abs(sum(means) / seeds - 1) < 4 * math.sqrt(within / seeds)
