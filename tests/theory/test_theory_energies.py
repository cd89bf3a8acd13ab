"""Exact target and exact energies (tiltsample.theory.enumerate / .energies).

Exact, seed-free checks first: the exact distribution against an independent recursive enumerator
written here, the two-token power example of ``specs/mcmc.md`` §1, and the energy identities of
``specs/ets.md`` §2 (normaliser identity, ``E(()) = Z``, ``E(x) = exp(log_tilt(x))``, chaining the
optimal kernel reproduces ``pi``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiltsample import PrefixPotential, TiltedTarget, power_target
from tiltsample.target import Truncation
from tiltsample.targets.rewards import (
    ConstraintReward,
    ContainsTokenReward,
    CountFractionReward,
    TableReward,
)
from tiltsample.targets.tabular import TabularPolicy, random_tabular
from tiltsample.theory import (
    ExactDistribution,
    ExactPotential,
    exact_distribution,
    exact_energies,
    optimal_next_token_logprobs,
)
from tiltsample.types import Cost, Seq

TRUNCATIONS: tuple[Truncation, ...] = ("stop", "condition")


# ----------------------------------------------------------------------------- helpers
def brute_force_log_density(target: TiltedTarget) -> dict[Seq, float]:
    """Independent recursive enumerator: ``{x: log p(x) + log_tilt(x)}`` over complete x."""
    policy, eos, cap = target.policy, target.eos_id, target.max_new_tokens
    out: dict[Seq, float] = {}

    def walk(prefix: Seq, log_p: float) -> None:
        row = policy.next_logprobs(target.prompt, [prefix])[0].tolist()
        last = len(prefix) == cap - 1
        for v, lp in enumerate(row):
            if lp == -math.inf:
                continue
            if target.truncation == "condition" and last and v != eos:
                continue
            x = (*prefix, v)
            if v == eos or len(x) == cap:
                tilt = float(target.log_tilt([x])[0])
                out[x] = -math.inf if tilt == -math.inf else log_p + lp + tilt
            else:
                walk(x, log_p + lp)

    walk((), 0.0)
    return out


def logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def make_target(
    seed: int,
    vocab: int,
    length: int,
    truncation: Truncation,
    reward: str,
    lam: float,
    constraint: bool,
    dead_ends: bool = False,
) -> TiltedTarget:
    policy = random_tabular(torch.Generator().manual_seed(seed), vocab, length, concentration=0.7)
    if dead_ends:  # EOS impossible after some prefixes of length L-1 ("condition": no completion)
        table = policy.table
        for prefix, row in table.items():
            if len(prefix) == length - 1 and len(prefix) > 0 and sum(prefix) % 2 == 0:
                new = row.clone()
                new[0] = -math.inf
                table[prefix] = new - torch.logsumexp(new, 0)
        policy = TabularPolicy(vocab, 0, length, table)
    rewards = {
        "count": CountFractionReward(1, 0),
        "contains": ContainsTokenReward(vocab - 1, 0),
        "none": None,
    }
    target = TiltedTarget(
        policy, rewards[reward], lam=lam, max_new_tokens=length, truncation=truncation
    )
    if constraint:  # the first token may not be token 1
        target = target.tilt(ConstraintReward(lambda x: not (len(x) > 1 and x[0] == 1)))
    return target


def power_example(alpha: float, truncation: Truncation = "stop") -> TiltedTarget:
    """``specs/mcmc.md`` §1: p(a)=.45, p(b)=.55, p(.|a)={b:1}, p(.|b)={a:.5, b:.5}; no EOS."""
    probs = {(): [0.0, 0.45, 0.55], (1,): [0.0, 0.0, 1.0], (2,): [0.0, 0.5, 0.5]}
    policy = TabularPolicy.from_probs(3, 0, 2, probs)
    return power_target(policy, alpha, max_new_tokens=2, truncation=truncation)


def chain_optimal_kernel(target: TiltedTarget) -> dict[Seq, float]:
    """``pi`` rebuilt by chaining the exact next-token kernels from the empty prefix."""
    energies = exact_energies(target)
    out: dict[Seq, float] = {}

    def walk(prefix: Seq, log_prob: float) -> None:
        kernel = optimal_next_token_logprobs(energies, target, prefix)
        assert not bool(torch.isnan(kernel).any())
        assert abs(float(torch.logsumexp(kernel, 0))) < 1e-12
        for v, lk in enumerate(kernel.tolist()):
            if lk == -math.inf:
                continue
            x = (*prefix, v)
            if target.is_complete(x):
                out[x] = math.exp(log_prob + lk)
            else:
                walk(x, log_prob + lk)

    walk((), 0.0)
    return out


target_params = st.tuples(
    st.integers(0, 10_000),
    st.sampled_from([2, 3]),
    st.integers(1, 4),
    st.sampled_from(TRUNCATIONS),
    st.sampled_from(["count", "contains", "none"]),
    st.sampled_from([0.05, 0.3, 1.0]),
    st.booleans(),
    st.booleans(),
)
Params = tuple[int, int, int, Truncation, str, float, bool, bool]


def build(params: Params) -> TiltedTarget:
    return make_target(*params)


# ----------------------------------------------------------------------------- exact distribution
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_distribution_matches_recursive_enumeration(
    truncation: Truncation, seed: int
) -> None:
    target = make_target(seed, 3, 4, truncation, "count", 0.3, constraint=True)
    dist = exact_distribution(target)
    brute = brute_force_log_density(target)
    log_z = logsumexp(list(brute.values()))
    assert dist.log_z == pytest.approx(log_z, abs=1e-12)
    assert math.fsum(dist.as_dict().values()) == pytest.approx(1.0, abs=1e-12)
    expected = {x: math.exp(v - log_z) for x, v in brute.items() if v > -math.inf}
    assert set(dist.support) == set(expected)
    for x, p in expected.items():
        assert dist.prob(x) == pytest.approx(p, abs=1e-13)
    assert dist.prob((1, 1, 1, 1, 1)) == 0.0  # outside the support
    if truncation == "condition":
        assert all(x[-1] == target.eos_id for x in dist.support)


@settings(max_examples=20)
@given(target_params)
def test_exact_distribution_property(
    params: Params,
) -> None:
    target = build(params)
    dist = exact_distribution(target)
    brute = brute_force_log_density(target)
    assert dist.log_z == pytest.approx(logsumexp(list(brute.values())), abs=1e-12)
    assert float(dist.probs.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool(torch.isfinite(dist.log_probs).all())


@pytest.mark.parametrize(("alpha", "p_ab"), [(2.0, 0.572), (4.0, 0.782)])
def test_power_example(alpha: float, p_ab: float) -> None:
    dist = exact_distribution(power_example(alpha))
    assert dist.prob((1, 2)) == pytest.approx(p_ab, abs=1e-3)
    # closed form: .45^a / (.45^a + 2 .275^a)
    exact = 0.45**alpha / (0.45**alpha + 2 * 0.275**alpha)
    assert dist.prob((1, 2)) == pytest.approx(exact, abs=1e-14)
    assert dist.prob((2, 1)) == pytest.approx(dist.prob((2, 2)), abs=1e-15)
    assert len(dist) == 3


def test_zero_mass_raises() -> None:
    # condition: EOS has probability 0 everywhere, so no response is complete
    with pytest.raises(ValueError, match="zero total mass"):
        exact_distribution(power_example(2.0, "condition"))
    policy = random_tabular(torch.Generator().manual_seed(0), 3, 2)
    target = TiltedTarget(policy, ConstraintReward(lambda x: False), max_new_tokens=2)
    with pytest.raises(ValueError, match="zero total mass"):
        exact_distribution(target)


def test_exact_distribution_methods() -> None:
    dist = exact_distribution(make_target(5, 3, 3, "stop", "count", 0.5, constraint=True))
    draws = dist.sample(20_000, torch.Generator().manual_seed(0))
    again = dist.sample(20_000, torch.Generator().manual_seed(0))
    assert draws == again  # the caller's generator is the only randomness
    assert set(draws) <= set(dist.support)
    lengths = torch.tensor([float(len(x)) for x in dist.support], dtype=torch.float64)
    mean_len = dist.expectation(lengths)
    assert mean_len == pytest.approx(math.fsum(dist.prob(x) * len(x) for x in dist.support))
    assert sum(len(x) for x in draws) / len(draws) == pytest.approx(mean_len, abs=0.05)
    assert dist.sample(0, torch.Generator()) == []
    assert dist.log_tilt is not None and dist.log_reference is not None
    with pytest.raises(ValueError):
        dist.expectation(torch.zeros(len(dist) + 1))
    with pytest.raises(ValueError, match="normalised"):
        ExactDistribution([(0,)], torch.tensor([-0.5]), 0.0)


# ----------------------------------------------------------------------------- energies
def check_energy_identities(target: TiltedTarget) -> None:
    energies = exact_energies(target)
    dist = exact_distribution(target)
    policy = target.policy
    assert energies.log_z == pytest.approx(dist.log_z, abs=1e-12)
    table = energies.table
    assert not any(math.isnan(v) for v in table.values())
    for s, log_e in table.items():
        if target.is_complete(s):
            assert log_e == float(target.log_tilt([s])[0])  # E(x) = exp(log_tilt(x)), exactly
            continue
        row = policy.next_logprobs(target.prompt, [s])[0].tolist()
        terms = [lp + energies.log_energy((*s, v)) for v, lp in enumerate(row) if lp > -math.inf]
        lhs = logsumexp(terms)  # log sum_v p(v|s) E(s+v)
        if log_e == -math.inf:
            assert lhs == -math.inf
        else:
            assert lhs == pytest.approx(log_e, abs=1e-12)
    chained = chain_optimal_kernel(target)
    exact = dist.as_dict()
    assert set(chained) == set(exact)
    for x, p in exact.items():
        assert chained[x] == pytest.approx(p, abs=1e-12)


@pytest.mark.parametrize("dead_ends", [False, True])
@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_energy_identities_fixed(truncation: Truncation, dead_ends: bool) -> None:
    target = make_target(11, 3, 4, truncation, "count", 0.1, True, dead_ends)
    check_energy_identities(target)
    if dead_ends and truncation == "condition":
        energies = exact_energies(target)
        assert (2, 2, 2) not in energies  # reachable, but its only completion has p_ref = 0
        assert energies.log_energy((2, 2, 2)) == -math.inf


@settings(max_examples=25)
@given(target_params)
def test_energy_identities_property(
    params: Params,
) -> None:
    check_energy_identities(build(params))


def test_power_example_energies() -> None:
    target = power_example(2.0)
    energies = exact_energies(target)
    # E(a) = p(b|a) p(ab) = .45 (power reward: exp(log p(x)) = p(x))
    assert math.exp(energies.log_energy((1,))) == pytest.approx(0.45, abs=1e-15)
    assert math.exp(energies.log_energy((2,))) == pytest.approx(0.275, abs=1e-15)
    assert math.exp(energies.log_z) == pytest.approx(0.45**2 + 2 * 0.275**2, abs=1e-15)
    kernel = optimal_next_token_logprobs(energies, target, ()).exp()
    assert float(kernel[1]) == pytest.approx(0.45**2 / (0.45**2 + 2 * 0.275**2), abs=1e-14)
    assert float(kernel[0]) == 0.0


def test_constraint_prefix_has_minus_inf_energy() -> None:
    policy = random_tabular(torch.Generator().manual_seed(3), 3, 3)
    target = TiltedTarget(policy, CountFractionReward(2, 0), lam=0.2, max_new_tokens=3).tilt(
        ConstraintReward(lambda x: x[:1] != (1,))
    )
    energies = exact_energies(target)
    assert energies.log_energy((1,)) == -math.inf
    assert energies.log_energy((1, 2)) == -math.inf
    assert math.isfinite(energies.log_energy((2,)))
    kernel = optimal_next_token_logprobs(energies, target, ())
    assert float(kernel[1]) == -math.inf
    with pytest.raises(ValueError, match="energy 0"):
        optimal_next_token_logprobs(energies, target, (1,))
    with pytest.raises(ValueError, match="complete"):
        optimal_next_token_logprobs(energies, target, (2, 0))


def test_unreachable_and_dead_prefixes() -> None:
    energies = exact_energies(power_example(2.0))
    with pytest.raises(KeyError, match="not a reachable prefix"):
        energies.log_energy((0,))  # EOS has probability 0
    with pytest.raises(KeyError, match="not a reachable prefix"):
        energies.log_energy((1, 1))  # p(a | a) = 0
    with pytest.raises(KeyError, match="not a reachable prefix"):
        energies.log_energy((1, 2, 2))  # longer than max_new_tokens
    # under "condition" nothing completes: every reachable prefix has energy 0, no error, no NaN
    dead = exact_energies(power_example(2.0, "condition"))
    assert dead.log_z == -math.inf
    assert dead.log_energy((1,)) == -math.inf
    assert dead.log_energy((2, 1)) == -math.inf  # reaches the cap without EOS: not complete
    with pytest.raises(KeyError):
        dead.log_energy((1, 1))


def test_condition_last_position_is_eos_only() -> None:
    target = make_target(4, 3, 3, "condition", "count", 0.5, constraint=False)
    energies = exact_energies(target)
    kernel = optimal_next_token_logprobs(energies, target, (1, 2))
    assert float(kernel[0]) == pytest.approx(0.0, abs=1e-12)
    assert kernel[1:].tolist() == [-math.inf, -math.inf]


def test_small_lam_energies_are_finite() -> None:
    policy = random_tabular(torch.Generator().manual_seed(8), 3, 5, concentration=0.5)
    target = TiltedTarget(policy, CountFractionReward(1, 0), lam=1e-3, max_new_tokens=5)
    energies = exact_energies(target)
    values = torch.tensor(list(energies.table.values()), dtype=torch.float64)
    assert bool(torch.isfinite(values).all())
    assert float(values.max()) > 500  # exp(r/lam) up to e^1000: would overflow outside log space
    check_energy_identities(target)


def test_exact_potential() -> None:
    target = make_target(9, 3, 4, "stop", "contains", 0.2, constraint=True)
    potential = ExactPotential(target)
    assert isinstance(potential, PrefixPotential)
    prefixes: list[Seq] = [(), (1,), (2, 1), (2, 2, 0)]
    gen = torch.Generator().manual_seed(0)
    values, cost = potential.log_potential(target.prompt, prefixes, gen)
    assert cost == Cost()
    assert values.dtype == torch.float64
    expected = [potential.energies.log_energy(s) for s in prefixes]
    assert values.tolist() == expected
    again, _ = potential.log_potential(target.prompt, prefixes, torch.Generator().manual_seed(1))
    assert torch.equal(values, again)  # deterministic
    assert values[0].item() == pytest.approx(exact_distribution(target).log_z, abs=1e-12)
    with pytest.raises(ValueError, match="prompt"):
        potential.log_potential((1,), prefixes, gen)


def test_table_reward_energy_by_hand() -> None:
    # V=2 (EOS=0, a=1), L=2, stop: responses (0), (1,0), (1,1)
    probs = {(): [0.5, 0.5], (1,): [0.25, 0.75]}
    policy = TabularPolicy.from_probs(2, 0, 2, probs)
    reward = TableReward({(0,): 0.0, (1, 0): 1.0, (1, 1): 2.0})
    target = TiltedTarget(policy, reward, lam=1.0, max_new_tokens=2)
    energies = exact_energies(target)
    e_a = 0.25 * math.e + 0.75 * math.e**2
    assert math.exp(energies.log_energy((1,))) == pytest.approx(e_a, rel=1e-14)
    assert math.exp(energies.log_z) == pytest.approx(0.5 + 0.5 * e_a, rel=1e-14)
    assert energies.log_energy((1, 1)) == 2.0
    assert set(energies.table) == {(), (0,), (1,), (1, 0), (1, 1)}
