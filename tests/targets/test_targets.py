"""Target semantics: tilts, composition, length conventions, toy policies (exact, seed-free)."""

from __future__ import annotations

import math

import pytest
import torch

import tiltsample
from tiltsample.enumeration import enumerate_target
from tiltsample.targets.decision_trace import A, B, DecisionTracePolicy, decision_trace
from tiltsample.targets.rewards import (
    ConstraintReward,
    ContainsTokenReward,
    CountFractionReward,
    LastTokenReward,
    ParityReward,
    TableReward,
)
from tiltsample.targets.tabular import TabularPolicy, random_tabular
from tiltsample.targets.toys import power_example, power_example_policy


def _law(target: tiltsample.TiltedTarget) -> dict[tuple[int, ...], float]:
    e = enumerate_target(target)
    probs = torch.softmax(e.log_density, 0)
    return {x: float(p) for x, p in zip(e.support, probs, strict=True) if p > 0}


def test_power_example_matches_the_spec_table() -> None:
    # specs/mcmc.md §1: P(ab) under p^2 and p^4
    assert _law(power_example(alpha=2.0))[(1, 2)] == pytest.approx(0.572, abs=1e-3)
    assert _law(power_example(alpha=4.0))[(1, 2)] == pytest.approx(0.782, abs=1e-3)
    base = _law(tiltsample.reference_target(power_example_policy(), max_new_tokens=2))
    assert base == pytest.approx({(1, 2): 0.45, (2, 1): 0.275, (2, 2): 0.275})


def test_decision_trace_probabilities() -> None:
    target = decision_trace(filler_len=3)
    law = _law(target)
    assert len(law) == 5
    b_trace = next(x for x in law if x[0] == B)
    assert len(b_trace) == 8 and law[b_trace] == pytest.approx(0.927, abs=1e-3)
    base = _law(tiltsample.reference_target(DecisionTracePolicy(3), max_new_tokens=8))
    assert base[b_trace] == pytest.approx(0.4)
    assert all(base[x] == pytest.approx(0.15) for x in base if x[0] == A)


def test_power_target_equals_p_to_the_alpha_on_random_tables() -> None:
    policy = random_tabular(torch.Generator().manual_seed(3), 3, 4)
    base = _law(tiltsample.reference_target(policy, max_new_tokens=4))
    for alpha in (0.5, 2.0, 3.0):
        powered = _law(tiltsample.power_target(policy, alpha, max_new_tokens=4))
        z = sum(p**alpha for p in base.values())
        assert powered == pytest.approx({x: p**alpha / z for x, p in base.items()}, abs=1e-12)


def test_tilts_compose_additively() -> None:
    policy = random_tabular(torch.Generator().manual_seed(1), 3, 3)
    r1 = ContainsTokenReward(1, 0)
    r2 = CountFractionReward(2, 0)
    composed = tiltsample.TiltedTarget(policy, r1, lam=0.5, max_new_tokens=3).tilt(r2, lam=0.25)
    e = enumerate_target(composed)
    want = 2.0 * r1((), e.support) + 4.0 * r2((), e.support)
    assert torch.allclose(e.log_tilt, want)
    power_times_reward = tiltsample.power_target(policy, 2.0, max_new_tokens=3).tilt(r1, lam=0.5)
    e2 = enumerate_target(power_times_reward)
    assert torch.allclose(e2.log_tilt, e2.log_reference + 2.0 * r1((), e2.support))
    assert composed.with_lam(1.0).terms[0].scale == 1.0
    assert len(composed.terms) == 2


def test_constraint_restricts_support_without_nan() -> None:
    policy = random_tabular(torch.Generator().manual_seed(2), 3, 3)
    allowed = ConstraintReward(lambda x: 2 not in x)
    target = tiltsample.TiltedTarget(policy, ContainsTokenReward(1, 0), lam=0.1, max_new_tokens=3)
    law = _law(target.tilt(allowed))
    assert law and all(2 not in x for x in law)
    assert not any(math.isnan(p) for p in law.values())


def test_lam_infinity_is_the_reference() -> None:
    policy = random_tabular(torch.Generator().manual_seed(4), 3, 3)
    target = tiltsample.TiltedTarget(
        policy, ContainsTokenReward(1, 0), lam=math.inf, max_new_tokens=3
    )
    assert not target.is_tilted
    ref = _law(tiltsample.reference_target(policy, max_new_tokens=3))
    assert _law(target) == pytest.approx(ref, abs=1e-15)
    scores = target.evaluate_tilt([(1, 0)])
    assert scores.reward is not None and float(scores.reward[0]) == 1.0


def test_length_conventions() -> None:
    policy = random_tabular(torch.Generator().manual_seed(5), 3, 3)
    stop = tiltsample.reference_target(policy, max_new_tokens=3)
    cond = tiltsample.reference_target(policy, max_new_tokens=3, truncation="condition")
    law_stop, law_cond = _law(stop), _law(cond)
    assert sum(law_stop.values()) == pytest.approx(1.0)
    assert any(len(x) == 3 and x[-1] != 0 for x in law_stop)  # capped, unterminated responses
    assert all(x[-1] == 0 for x in law_cond)  # only EOS-terminated ones
    # condition = stop restricted to EOS-terminated responses, renormalised
    mass = sum(p for x, p in law_stop.items() if x[-1] == 0)
    assert law_cond == pytest.approx(
        {x: p / mass for x, p in law_stop.items() if x[-1] == 0}, abs=1e-12
    )
    assert stop.is_complete((1, 2, 1)) and not cond.is_complete((1, 2, 1))
    with pytest.raises(ValueError, match="not a complete response"):
        cond.check_sequences([(1, 2, 1)])
    with pytest.raises(ValueError, match="after EOS"):
        stop.check_sequences([(0, 1)])


def test_rewards_see_content_only() -> None:
    xs = [(1, 2, 0), (2, 2), (0,), (1, 1, 1)]
    assert ContainsTokenReward(1, 0)((), xs).tolist() == [1, 0, 0, 1]
    assert ParityReward(1, 0)((), xs).tolist() == [1, 0, 0, 1]
    assert LastTokenReward(2, 0)((), xs).tolist() == [1, 1, 0, 0]
    assert CountFractionReward(2, 0)((), xs).tolist() == pytest.approx([0.5, 1.0, 0.0, 0.0])
    table = TableReward({(1, 2, 0): 0.3}, default=0.0)
    assert table((), xs[:2]).tolist() == [0.3, 0.0]
    with pytest.raises(KeyError):
        TableReward({})((), [(1,)])


def test_tabular_validation() -> None:
    with pytest.raises(ValueError, match="normalised"):
        TabularPolicy.from_probs(2, 0, 1, {(): [0.5, 0.6]})
    with pytest.raises(ValueError, match="shape"):
        TabularPolicy(2, 0, 1, {(): torch.zeros(3)})
    policy = TabularPolicy.from_probs(2, 0, 1, {(): [0.5, 0.5]})
    with pytest.raises(KeyError, match="no row"):
        policy.next_logprobs((), [(1,)])


def test_random_tabular_is_reproducible_and_eos_free_when_asked() -> None:
    a = random_tabular(torch.Generator().manual_seed(7), 4, 3, concentration=0.1)
    b = random_tabular(torch.Generator().manual_seed(7), 4, 3, concentration=0.1)
    assert all(torch.equal(a.table[k], b.table[k]) for k in a.table)
    assert all(bool(torch.isfinite(v).all()) for v in a.table.values())  # no underflow to -inf
    no_eos = random_tabular(torch.Generator().manual_seed(7), 4, 3, eos_prob=0.0)
    assert all(bool(torch.isneginf(v[0])) for v in no_eos.table.values())


def test_power_below_one_gives_impossible_responses_zero_weight() -> None:
    # under "condition" a forced EOS of probability zero must get weight 0, not +inf
    target = tiltsample.power_target(power_example_policy(), 0.5, max_new_tokens=2).with_lam(1.0)
    cond = tiltsample.power_target(
        power_example_policy(), 0.5, max_new_tokens=2, truncation="condition"
    )
    tilt = cond.evaluate_tilt([(1, 0)], log_reference=torch.tensor([-math.inf])).log_tilt
    assert bool(torch.isneginf(tilt).all())
    out = tiltsample.sample("best-of-n", cond, 3, seed=0, num_candidates=2)
    assert out.meta["failed"] == 3  # the example has no EOS at all: nothing is in the support
    assert target.log_tilt([(1, 2)]).isfinite().all()
