"""Twist families (samplers/smc/twists/): contracts, unbiased random twists, learned twists.

Exact: analytic children agree with the generic expansion; the TRI-TSMC projection, fed the exact
target path law, recovers the exact value function (the optimal twist) on every prefix.
Statistical: the noisy and rollout twists are unbiased for the energy; TRI-TSMC iterations move the
twisted path measure to pi and cut the spread of log Ẑ, with the evidence staying unbiased.
"""

from __future__ import annotations

import math

import pytest
import torch
from smc_toys import TRUNCATIONS, checked_log_z_spreads, gen, tri_toy, twist_law

from tiltsample import TiltedTarget, power_target
from tiltsample.samplers import smc
from tiltsample.samplers.smc.twists import (
    LinearTwist,
    LogNormalNoise,
    LookaheadTwist,
    NoTwist,
    PrefixTable,
    PrefixTilt,
    RolloutTwist,
    check_twist_output,
    make_twist,
    path_states,
    project_twist,
    state_tables,
    tri_tsmc,
)
from tiltsample.target import Truncation
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.targets.toys import tabular_toy
from tiltsample.theory import ExactPotential, exact_distribution, exact_energies, tv

pytestmark = pytest.mark.usefixtures("serial_torch")


def power_toy(truncation: Truncation = "stop") -> TiltedTarget:
    policy = random_tabular(gen(1), 3, 4, concentration=0.7)
    return power_target(policy, 2.5, max_new_tokens=4, truncation=truncation).tilt(
        ContainsTokenReward(1, 0), lam=0.5
    )


PREFIXES = [(1,), (2,), (1, 2), (2, 2, 1)]


def _log_p(target: TiltedTarget, prefixes: list[tuple[int, ...]]) -> torch.Tensor:
    return torch.tensor(
        [float(target.policy.sequence_logprob((), [s])[0]) if s else 0.0 for s in prefixes],
        dtype=torch.float64,
    )


# ----------------------------------------------------------------------------- exact
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_analytic_children_equal_the_generic_expansion(truncation: Truncation) -> None:
    target = power_toy(truncation)
    prefixes = [(), (1,), (2, 1)]
    log_p = _log_p(target, prefixes)
    nxt = target.policy.next_logprobs((), prefixes).to(torch.float64)
    for twist in (NoTwist(), PrefixTilt()):
        fast, _ = twist.log_twist_children(target, prefixes, log_p, nxt, gen(0))
        slow, _ = super(type(twist), twist).log_twist_children(target, prefixes, log_p, nxt, gen(0))
        mask = (nxt > -math.inf) & (torch.arange(3)[None, :] != target.eos_id)
        assert torch.allclose(fast[mask], slow[mask], atol=1e-12, rtol=0)
        assert bool(torch.isneginf(fast[nxt == -math.inf]).all())


def test_prefix_tilt_is_the_power_part_of_the_tilt() -> None:
    target = power_toy()
    log_p = _log_p(target, PREFIXES)
    values, cost = PrefixTilt().log_twist(target, PREFIXES, log_p, gen(0))
    assert torch.allclose(values, 1.5 * log_p, atol=1e-12, rtol=0)  # (alpha - 1) log p(s)
    assert cost.reward_calls == 0


def test_exact_potential_twist_is_deterministic_and_free() -> None:
    target = power_toy()
    tw = LookaheadTwist(ExactPotential(target), random=False)
    log_p = _log_p(target, PREFIXES)
    a, cost = tw.log_twist(target, PREFIXES, log_p, gen(0))
    b, _ = tw.log_twist(target, PREFIXES, log_p, gen(1))
    assert torch.equal(a, b) and cost.reward_calls == 0
    energies = exact_energies(target)
    assert torch.allclose(a, energies.log_energies(PREFIXES), atol=1e-12, rtol=0)


def test_tri_projection_of_the_exact_path_law_is_the_value_function() -> None:
    """Fed the exact target law (every complete path weighted by pi), the weighted-ML projection
    onto the tabular family returns log psi = log V on every prefix: the optimal twist is the
    fixed point of TRI-TSMC, and the complete states pin its scale (no free constant)."""
    for truncation in TRUNCATIONS:
        target = tabular_toy(vocab_size=3, max_len=4, lam=0.5, truncation=truncation)
        pi = exact_distribution(target)
        table = PrefixTable.from_target(target)
        tables = state_tables(target, table)
        states = path_states(target, pi.support, table)
        theta, _ = project_twist(
            torch.zeros(table.num_features, dtype=torch.float64), states, tables, pi.probs, 0.0, 500
        )
        energies = exact_energies(target)
        exact = energies.log_energies(table.prefixes)
        assert torch.allclose(theta, exact, atol=1e-5, rtol=0), float((theta - exact).abs().max())


# ----------------------------------------------------------------------------- random twists
def test_log_normal_noise_is_unbiased_and_reproducible() -> None:
    target = power_toy()
    pot = LogNormalNoise(ExactPotential(target), 0.8)
    prefixes = PREFIXES * 5000
    a, _ = pot.log_potential((), prefixes, gen(3))
    b, _ = pot.log_potential((), prefixes, gen(3))
    assert torch.equal(a, b)
    exact = exact_energies(target).log_energies(PREFIXES)
    ratio = torch.exp(a.view(5000, len(PREFIXES)) - exact[None, :])
    se = ratio.std(dim=0) / math.sqrt(5000)
    assert bool(((ratio.mean(dim=0) - 1).abs() < 4 * se).all())


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_rollout_twist_is_unbiased_for_the_energy(truncation: Truncation) -> None:
    target = power_toy(truncation)
    exact = exact_energies(target)
    tw = RolloutTwist(2, temperature=0.8)
    reps = 3000
    prefixes = [(1,), (2, 1)]
    values, cost = tw.log_twist(target, prefixes * reps, _log_p(target, prefixes * reps), gen(4))
    assert cost.generated_tokens > 0 and cost.reward_calls > 0
    ratio = torch.exp(values.view(reps, 2) - exact.log_energies(prefixes)[None, :])
    se = ratio.std(dim=0) / math.sqrt(reps)
    assert bool(((ratio.mean(dim=0) - 1).abs() < 4 * se).all())
    # children through the session path (no re-encoding of the prefix)
    from tiltsample.policy import open_session

    session = open_session(target.policy, (), reps)
    session.extend(torch.full((reps, 1), 1, dtype=torch.long))
    nxt = session.logprobs().to(torch.float64)
    log_p = _log_p(target, [(1,)]).expand(reps)
    kids, _ = tw.log_twist_children_session(target, session, log_p, nxt, gen(5))
    for v in (1, 2):
        if float(nxt[0, v]) > -math.inf:
            r = torch.exp(kids[:, v] - exact.log_energy((1, v)))
            assert abs(float(r.mean()) - 1) < 4 * float(r.std()) / math.sqrt(reps)


# ----------------------------------------------------------------------------- learned twists
def test_tri_tsmc_learns_the_twist_and_cuts_the_variance() -> None:
    target, table = tri_toy()
    pi = exact_distribution(target)
    energies = exact_energies(target)
    start = LinearTwist(table)
    result = tri_tsmc(
        target, start, generator=gen(0), num_iterations=4, num_paths=384, step_size=0.5
    )
    assert len(result.history) == 4 and result.cost.generated_tokens > 0
    assert result.history[-1].ess_fraction > 2 * result.history[0].ess_fraction

    tv0, tv1 = tv(twist_law(target, start), pi), tv(twist_law(target, result.twist), pi)
    assert tv1 < tv0 / 4, (tv0, tv1)
    # twist error where it matters: the pi-weighted mean |log psi - log V| over visited prefixes
    err = []
    for x, p in pi.as_dict().items():
        for t in range(1, len(x)):
            s = x[:t]
            err.append(p * abs(float(result.twist.theta[table.index[s]]) - energies.log_energy(s)))
    assert sum(err) < 0.5
    # variance reduction of twisted SMC, with the evidence still unbiased
    spreads = checked_log_z_spreads(target, (start, result.twist), pi.log_z)
    assert spreads[1] < spreads[0] / 3, spreads


# ----------------------------------------------------------------------------- bad input
def test_bad_twists_fail_early() -> None:
    with pytest.raises(ValueError, match="NaN"):
        check_twist_output(torch.tensor([math.nan]), 1, "t")
    with pytest.raises(ValueError, match=r"\+inf"):
        check_twist_output(torch.tensor([math.inf]), 1, "t")
    with pytest.raises(TypeError, match="Tensor"):
        check_twist_output([0.0], 1, "t")
    with pytest.raises(ValueError, match="shape"):
        check_twist_output(torch.zeros(2), 1, "t")
    with pytest.raises(TypeError, match="PrefixPotential"):
        LookaheadTwist(object())
    with pytest.raises(ValueError, match="sigma"):
        LogNormalNoise(ExactPotential(power_toy()), -1.0)
    with pytest.raises(ValueError, match="num_rollouts"):
        RolloutTwist(0)
    with pytest.raises(ValueError, match="potential"):
        make_twist("lookahead")
    with pytest.raises(ValueError, match="theta"):
        LinearTwist(PrefixTable([(1,)]), torch.tensor([math.nan]))
    with pytest.raises(ValueError, match="step_size"):
        tri_tsmc(power_toy(), LinearTwist(PrefixTable([(1,)])), generator=gen(0), step_size=0.0)


def test_nan_from_a_user_potential_is_reported_by_the_sampler() -> None:
    class Bad:
        def log_potential(self, prompt, prefixes, generator):  # type: ignore[no-untyped-def]
            from tiltsample.types import Cost

            return torch.full((len(prefixes),), math.nan, dtype=torch.float64), Cost()

    target = power_toy()
    with pytest.raises(ValueError, match="NaN"):
        smc.run(target, num_particles=4, generator=gen(0), twist="lookahead", potential=Bad())


def test_zero_rollout_estimates_bias_smc_and_the_floor_fixes_it() -> None:
    """specs/smc.md §3 asks for *positive* random twists. One rollout of a prefix under a hard
    constraint ("token 1 must occur") is often 0 although the energy is positive: without a floor
    SMC loses those particles and E[Ẑ]/Z drops (0.90 here); the default floor (fall back to the
    prefix twist) restores unbiasedness."""
    from tiltsample.targets.rewards import ConstraintReward, CountFractionReward

    policy = random_tabular(gen(0), 3, 4, concentration=0.8)
    target = TiltedTarget(policy, CountFractionReward(1, 0), 0.5, (), 4).tilt(
        ConstraintReward(lambda x: 1 in x)
    )
    log_z = exact_distribution(target).log_z
    r = 3000
    means = {}
    for floor in (None, 1.0):
        state = smc.run(
            target,
            num_particles=4,
            num_runs=r,
            generator=gen(1),
            twist=RolloutTwist(1, floor=floor),
        )
        ratio = torch.exp(smc.log_evidence_runs(state) - log_z)
        means[floor] = (float(ratio.mean()), float(ratio.std()) / math.sqrt(r))
    biased, fixed = means[None], means[1.0]
    assert biased[0] < 1 - 4 * biased[1], biased
    assert abs(fixed[0] - 1) < 4 * fixed[1], fixed
