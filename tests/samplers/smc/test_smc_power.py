"""Power-SMC (samplers/smc/power_smc.py) on power targets p_ref^alpha.

Exact: with no resampling every final weight is sum_t log Z_t(x_<t), Z_t = sum_v p(v|x_<t)^alpha
(computed here from the policy table, independently of the sampler); the tau = 1/alpha proposal is
the optimal proposal of the prefix twist. Statistical: E[Ẑ]/Z_alpha, the pooled law against the
exact power law (the two-token example of specs/mcmc.md §1 and a random toy), the exponent ramp
keeps the final target, and Power-SMC has lower log-evidence spread than SMC from p_ref.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from smc_toys import TRUNCATIONS, smc_runs

import tiltsample
from tiltsample import power_target
from tiltsample.samplers import csmc, smc
from tiltsample.samplers.smc import power_smc
from tiltsample.target import Truncation
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.targets.toys import power_example, tabular_toy
from tiltsample.testing import check_sampler
from tiltsample.theory import exact_distribution, tv
from tiltsample.theory.smc_exact import evidence_weighted_law

pytestmark = pytest.mark.usefixtures("serial_torch")


def toy(alpha: float = 3.0, truncation: Truncation = "stop") -> tiltsample.TiltedTarget:
    policy = random_tabular(torch.Generator().manual_seed(3), 3, 4, concentration=0.7)
    return power_target(policy, alpha, max_new_tokens=4, truncation=truncation)


def _sum_log_zt(target: tiltsample.TiltedTarget, x: tuple[int, ...], alpha: float) -> float:
    """sum_t log sum_v p(v | x_<t)^alpha over the positions of x (EOS forced at the cap under
    "condition": there Z_t = p(EOS | x_<L)^alpha)."""
    total = 0.0
    for t in range(len(x)):
        row = target.policy.next_logprobs((), [x[:t]])[0].to(torch.float64)
        if target.truncation == "condition" and t == target.max_new_tokens - 1:
            total += alpha * float(row[target.eos_id])
        else:
            total += float(torch.logsumexp(alpha * row, 0))
    return total


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_incremental_weight_is_the_prefix_normaliser(truncation: Truncation) -> None:
    alpha = 2.5
    target = toy(alpha, truncation)
    out = tiltsample.sample(
        power_smc.sampler(target, num_samples=60, ess_threshold=0.0), target, 60, seed=0
    )
    expected = torch.tensor(
        [_sum_log_zt(target, x, alpha) for x in out.sequences], dtype=torch.float64
    )
    assert torch.allclose(out.log_weights, expected, atol=1e-10, rtol=0)
    assert out.cost.reward_calls == 0  # the power tilt reuses log p_ref


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize(
    "params",
    [
        {},
        {"alpha_ramp": 3},
        {"alpha_ramp": 2, "ramp_start": 0.5, "num_moves": 1},
        {"block_size": 2},
    ],
    ids=["plain", "ramp", "ramp-from-half-moves", "block"],
)
def test_evidence_unbiased_and_law_exact(truncation: Truncation, params: dict[str, Any]) -> None:
    target = toy(3.0, truncation)
    exact = exact_distribution(target)
    r, n = 400, 8
    state = smc_runs(target, n, r, 1, **power_smc.smc_params(**params))
    ratio = torch.exp(smc.log_evidence_runs(state) - exact.log_z)
    se = float(ratio.std()) / math.sqrt(r)
    assert abs(float(ratio.mean()) - 1.0) < 4 * se
    # the evidence-weighted particle law is unbiased for pi at any N: only noise remains
    law, noise = evidence_weighted_law(smc.result(state), exact.log_z)
    assert tv(law, exact) < 3 * noise


def test_two_token_example_puts_0782_on_ab() -> None:
    """specs/mcmc.md §1: p^4 puts 0.782 on "ab", low temperature 1/4 only 0.309.

    With N particles the pooled law carries the O(1/N) self-normalisation bias (about -0.38/N
    here by a second-order expansion: -0.024 at N = 16), so N = 512 is used."""
    target = power_example(alpha=4.0)
    out = tiltsample.sample(
        power_smc.sampler(target, num_samples=8192, num_particles=512), target, 8192, seed=0
    )
    p_ab = out.empirical().get((1, 2), 0.0)
    assert p_ab == pytest.approx(0.782, abs=0.015)
    low_temp = tiltsample.sample("ancestral", target, 4000, seed=0, temperature=0.25)
    assert low_temp.empirical().get((1, 2), 0.0) == pytest.approx(0.309, abs=0.03)


def test_power_smc_reduces_log_evidence_spread_against_p_ref_proposals() -> None:
    target = toy(4.0)
    g = torch.Generator().manual_seed(2)
    power = smc.log_evidence_runs(
        smc.run(target, num_particles=8, num_runs=300, generator=g, **power_smc.smc_params())
    )
    base = smc.log_evidence_runs(
        smc.run(target, num_particles=8, num_runs=300, generator=g, twist="prefix")
    )
    assert float(power.std()) < 0.7 * float(base.std())


def test_power_times_verifier_target() -> None:
    """A composed target p^alpha · exp(r/lam): the power part goes into the twist and the
    proposal, the verifier into the final weight; the evidence stays unbiased."""
    target = toy(2.0).tilt(ContainsTokenReward(1, 0), lam=0.5)
    log_z = exact_distribution(target).log_z
    state = smc.run(
        target,
        num_particles=8,
        num_runs=300,
        generator=torch.Generator().manual_seed(4),
        **power_smc.smc_params(alpha_ramp=2),
    )
    ratio = torch.exp(smc.log_evidence_runs(state) - log_z)
    assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(300)
    lo = csmc.log_z_lower(
        target,
        8,
        generator=torch.Generator().manual_seed(5),
        num_runs=200,
        **power_smc.smc_params(),
    )
    assert lo.mean < log_z + 3 * lo.stderr


def test_conformance_and_bad_input() -> None:
    for truncation in TRUNCATIONS:
        target = toy(2.0, truncation)
        check_sampler(power_smc.sampler(target, num_samples=6, alpha_ramp=2), target, num_samples=6)
    plain = tabular_toy(vocab_size=3, max_len=3)  # no power term: alpha = 1, still exact
    out = check_sampler(power_smc.sampler(plain, num_samples=6), plain, num_samples=6)
    assert out.meta["params"]["alpha"] == 1.0
    with pytest.raises(ValueError, match="alpha_ramp"):
        power_smc.sampler(toy(), num_samples=4, alpha_ramp=-1)
    with pytest.raises(ValueError, match="ramp_start"):
        power_smc.sampler(toy(), num_samples=4, alpha_ramp=2, ramp_start=math.nan)
