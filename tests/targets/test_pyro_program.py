"""The Pyro-program toy: a target for every sampler and an independent oracle.

Exact checks first (policy, reward, enumerated log Z against the trie enumeration of the core), then
seeded statistical checks of the SMCFilter particles with tolerances derived from the particle
count / effective sample size.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine

import tiltsample
from tiltsample.enumeration import enumerate_target
from tiltsample.policy import ReferencePolicy
from tiltsample.reward import Reward
from tiltsample.target import TiltedTarget, power_target
from tiltsample.targets.pyro_program import (
    MAX_INDEX,
    PyroFactorReward,
    PyroProgram,
    PyroProgramPolicy,
)
from tiltsample.targets.rewards import (
    ConstraintReward,
    ContainsTokenReward,
    CountFractionReward,
)
from tiltsample.targets.tabular import TabularPolicy, random_tabular
from tiltsample.types import Seq

EOS = 0


def make_target(
    seed: int,
    vocab: int,
    length: int,
    kind: str = "contains",
    lam: float = 1.0,
    truncation: str = "stop",
    eos_prob: float | None = None,
) -> TiltedTarget:
    """A random tabular toy with one of a few tilts."""
    policy = random_tabular(
        torch.Generator().manual_seed(seed), vocab, length, eos_id=EOS, eos_prob=eos_prob
    )
    token = 1 + seed % (vocab - 1)
    if kind == "power":
        return power_target(
            policy, 0.5 if seed % 2 else 4.0, max_new_tokens=length, truncation=truncation
        )
    reward = (
        CountFractionReward(token, EOS)
        if kind in ("fraction", "constrained")
        else ContainsTokenReward(token, EOS)
    )
    target = TiltedTarget(policy, reward, lam=lam, max_new_tokens=length, truncation=truncation)
    if kind == "constrained":  # a hard constraint as an extra tilt term
        target = target.tilt(ConstraintReward(lambda x: len(x) >= 2, "min-length"))
    return target


def exact_log_z(target: TiltedTarget) -> float:
    return float(torch.logsumexp(enumerate_target(target).log_density, dim=0))


def eos_free_prefixes(vocab: int, length: int) -> list[Seq]:
    others = [v for v in range(vocab) if v != EOS]
    return [p for t in range(length) for p in itertools.product(others, repeat=t)]


def test_builds_a_genuine_pyro_program() -> None:
    program = PyroProgram.from_target(make_target(0, 3, 3))
    assert isinstance(program.policy, PyroProgramPolicy)
    assert isinstance(program.reward, PyroFactorReward)
    assert isinstance(program.policy, ReferencePolicy)
    assert isinstance(program.reward, Reward)
    data = {"x_0": torch.tensor(2), "x_1": torch.tensor(1), "x_2": torch.tensor(EOS)}
    trace = poutine.trace(poutine.condition(program.model, data=data)).get_trace()
    sample_sites = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert sample_sites == ["x_0", "x_1", "x_2", "tilt"]
    assert trace.nodes["tilt"]["is_observed"]


@pytest.mark.parametrize(("seed", "vocab", "length"), [(0, 2, 4), (1, 3, 3), (2, 4, 3)])
def test_policy_equals_source_policy_on_all_prefixes(seed: int, vocab: int, length: int) -> None:
    target = make_target(seed, vocab, length)
    program = PyroProgram.from_target(target)
    prefixes = eos_free_prefixes(vocab, length)
    got = program.policy.next_logprobs((), prefixes)  # mixed lengths in one call
    want = target.policy.next_logprobs((), prefixes)
    assert got.dtype == torch.float64
    assert got.shape == (len(prefixes), vocab)
    assert torch.allclose(got, want, rtol=0.0, atol=1e-12)
    support = enumerate_target(target).support
    assert torch.allclose(
        program.policy.sequence_logprob((), support),
        target.policy.sequence_logprob((), support),
        rtol=0.0,
        atol=1e-12,
    )


def test_policy_is_absorbing_after_eos_and_rejects_long_prefixes() -> None:
    program = PyroProgram.from_target(make_target(3, 3, 3))
    lp = program.policy.next_logprobs((), [(1, EOS), (EOS,)])
    assert torch.equal(lp[:, EOS], torch.zeros(2, dtype=torch.float64))
    assert bool(torch.isneginf(lp[:, 1:]).all())
    assert program.policy.next_logprobs((), []).shape == (0, 3)
    with pytest.raises(ValueError, match="shorter than max_len=3"):
        program.policy.next_logprobs((), [(1, 2, 1)])
    with pytest.raises(ValueError, match="token ids outside"):
        program.policy.next_logprobs((), [(7,)])


@pytest.mark.parametrize("truncation", ["stop", "condition"])
@pytest.mark.parametrize("kind", ["contains", "fraction", "power", "constrained"])
def test_reward_equals_target_log_tilt_on_every_complete_response(
    kind: str, truncation: str
) -> None:
    target = make_target(5, 3, 4, kind=kind, lam=0.1, truncation=truncation)
    program = PyroProgram.from_target(target)
    support = enumerate_target(target).support
    got = program.reward((), support)
    want = target.log_tilt(support)
    assert got.dtype == torch.float64
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = ~torch.isneginf(want)
    assert torch.allclose(got[finite], want[finite], rtol=0.0, atol=1e-12)
    assert program.reward((), []).shape == (0,)


def test_reward_rejects_incomplete_or_malformed_responses() -> None:
    program = PyroProgram.from_target(make_target(0, 3, 3))
    with pytest.raises(ValueError, match="not a complete response"):
        program.reward((), [(1,)])
    with pytest.raises(ValueError, match="tokens after EOS"):
        program.reward((), [(EOS, 1, EOS)])
    with pytest.raises(ValueError, match="> max_len=3"):
        program.reward((), [(1, 1, 1, EOS)])


@settings(max_examples=15, derandomize=True, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    vocab=st.integers(2, 3),
    length=st.integers(2, 4),
    kind=st.sampled_from(["contains", "fraction", "power", "constrained"]),
    lam=st.sampled_from([0.1, 1.0, 10.0]),
    truncation=st.sampled_from(["stop", "condition"]),
)
def test_enumerated_log_z_matches_trie_enumeration(
    seed: int, vocab: int, length: int, kind: str, lam: float, truncation: str
) -> None:
    target = make_target(seed, vocab, length, kind=kind, lam=lam, truncation=truncation)
    log_z = PyroProgram.from_target(target).log_z()
    assert isinstance(log_z, float)
    assert math.isfinite(log_z)
    assert abs(log_z - exact_log_z(target)) <= 1e-6


@pytest.mark.parametrize("truncation", ["stop", "condition"])
def test_as_target_has_the_source_law(truncation: str) -> None:
    target = make_target(7, 3, 4, kind="fraction", lam=0.5, truncation=truncation)
    program = PyroProgram.from_target(target)
    mine, theirs = enumerate_target(program.as_target()), enumerate_target(target)
    assert mine.support == theirs.support
    assert torch.allclose(mine.log_density, theirs.log_density, rtol=0.0, atol=1e-12)


def test_zero_mass_program_gives_minus_inf_without_nan() -> None:
    # EOS impossible under truncation="condition": every response leaves the support.
    target = make_target(4, 3, 3, truncation="condition", eos_prob=0.0)
    program = PyroProgram.from_target(target)
    tilt = program.tilt_table
    assert not bool(torch.isnan(tilt).any())
    assert bool(torch.isneginf(tilt).any())  # EOS-free responses leave the support
    assert program.log_z() == -math.inf
    assert exact_log_z(target) == -math.inf


def test_exact_sampler_on_the_program_target() -> None:
    target = make_target(11, 3, 4, kind="contains", lam=0.5)
    program = PyroProgram.from_target(target)
    out = tiltsample.sample("exact", program.as_target(), 10, seed=0)
    assert len(out.sequences) == 10
    assert out.log_evidence is not None
    assert abs(out.log_evidence - program.log_z()) <= 1e-9
    assert abs(out.log_evidence - exact_log_z(target)) <= 1e-9


def test_policy_reward_and_log_z_never_touch_the_global_rng() -> None:
    program = PyroProgram.from_target(make_target(2, 3, 3))
    before = torch.get_rng_state()
    program.policy.next_logprobs((), eos_free_prefixes(3, 3))
    program.reward((), enumerate_target(program.as_target()).support)
    program.log_z()
    assert torch.equal(torch.get_rng_state(), before)


SMC_PARTICLES = 2000


def test_smc_filter_first_token_marginal_and_evidence() -> None:
    lam = 1.0
    target = make_target(13, 3, 4, kind="contains", lam=lam)
    program = PyroProgram.from_target(target)
    particles, log_w, log_evidence = program.smc_filter(
        SMC_PARTICLES, torch.Generator().manual_seed(0)
    )
    assert len(particles) == SMC_PARTICLES == log_w.shape[0]
    assert log_w.dtype == torch.float64
    assert not bool(torch.isnan(log_w).any())
    weights = torch.exp(log_w)
    assert abs(float(weights.sum()) - 1.0) < 1e-12
    ess = 1.0 / float((weights**2).sum())
    enum = enumerate_target(target)
    probs = torch.softmax(enum.log_density, dim=0)
    tol = 5.0 / math.sqrt(ess)
    for v in range(target.vocab_size):
        exact = sum(p for x, p in zip(enum.support, probs.tolist(), strict=True) if x[0] == v)
        estimate = sum(w for x, w in zip(particles, weights.tolist(), strict=True) if x[0] == v)
        assert abs(estimate - exact) <= tol, (v, estimate, exact, tol)
    # Proposal p_ref, weights G(x) = exp(r/lam) in [1, e^{1/lam}] (reward in [0, 1]): the relative
    # std of Ẑ is at most (e^{1/lam} - 1) / (2 sqrt(N)) (Popoviciu, E[G] >= 1).
    assert log_evidence is not None
    rel_sd = (math.exp(1.0 / lam) - 1.0) / (2.0 * math.sqrt(SMC_PARTICLES))
    assert abs(log_evidence - program.log_z()) <= 5.0 * rel_sd


def test_smc_filter_is_reproducible_and_leaves_global_rng_alone() -> None:
    program = PyroProgram.from_target(make_target(17, 3, 3, kind="fraction", lam=0.1))
    with torch.random.fork_rng(devices=[]):  # keep the global state of other tests intact
        torch.manual_seed(123)
        before = torch.get_rng_state()
        first = program.smc_filter(500, torch.Generator().manual_seed(42))
        assert torch.equal(torch.get_rng_state(), before)
        torch.manual_seed(999)  # a different global state must not matter
        second = program.smc_filter(500, torch.Generator().manual_seed(42))
    assert first.particles == second.particles
    assert torch.equal(first.log_weights, second.log_weights)
    assert first.log_evidence == second.log_evidence
    third = program.smc_filter(500, torch.Generator().manual_seed(43))
    assert third.particles != first.particles


def test_smc_filter_under_condition_keeps_weights_nan_free() -> None:
    target = make_target(19, 3, 3, kind="contains", truncation="condition")
    program = PyroProgram.from_target(target)
    particles, log_w, log_evidence = program.smc_filter(
        300, torch.Generator().manual_seed(1), ess_threshold=1e-6
    )
    assert not bool(torch.isnan(log_w).any())
    dead = torch.isneginf(log_w)
    assert all(x[-1] != EOS for x, d in zip(particles, dead.tolist(), strict=True) if d)
    assert all(x[-1] == EOS for x, d in zip(particles, dead.tolist(), strict=True) if not d)
    assert log_evidence is not None and math.isfinite(log_evidence)


def test_rejects_bad_input() -> None:
    big = TiltedTarget(TabularPolicy(5, EOS, 8, {}), None, max_new_tokens=8)
    assert MAX_INDEX < 5**8
    with pytest.raises(ValueError, match="max_new_tokens=8"):
        PyroProgram.from_target(big)
    program = PyroProgram.from_target(make_target(0, 2, 2))
    with pytest.raises(ValueError, match="num_particles"):
        program.smc_filter(0, torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="generator"):
        program.smc_filter(10, 0)  # type: ignore[arg-type]
    tables = list(program.tables)
    tables[1] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="not normalised"):
        PyroProgram(2, EOS, tables, program.tilt_table)
    with pytest.raises(ValueError, match="shape"):
        PyroProgram(2, EOS, program.tables, torch.zeros(3, dtype=torch.float64))


def test_round_trip_through_the_program_target() -> None:
    target = make_target(23, 3, 3, kind="power", truncation="condition")
    program = PyroProgram.from_target(target)
    again = PyroProgram.from_target(program.as_target())
    for mine, theirs in zip(again.tables, program.tables, strict=True):
        assert torch.equal(torch.isneginf(mine), torch.isneginf(theirs))
        finite = ~torch.isneginf(theirs)
        assert torch.allclose(mine[finite], theirs[finite], rtol=0.0, atol=1e-12)
    tilt, tilt0 = again.tilt_table, program.tilt_table
    assert torch.equal(torch.isneginf(tilt), torch.isneginf(tilt0))
    finite = ~torch.isneginf(tilt0)
    assert torch.allclose(tilt[finite], tilt0[finite], rtol=0.0, atol=1e-12)
    assert again.decode(0) == (EOS,)
    assert again.decode(3**3 - 1) == (2, 2, 2)
