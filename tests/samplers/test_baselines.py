"""Baseline samplers: conformance, reproducibility, costs, exact laws where closed-form."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given, settings

import tiltsample
from tiltsample import registry
from tiltsample.enumeration import enumerate_target
from tiltsample.targets.rewards import ConstraintReward, ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.targets.toys import tabular_toy
from tiltsample.testing import check_sampler
from tiltsample.testing.strategies import tabular_targets
from tiltsample.types import Seq

#: Every registered sampler with its registry example parameters (``register_sampler(example=)``).
PARAMS: dict[str, dict[str, object]] = {e.name: dict(e.example) for e in registry.samplers()}

#: The target kind of the samplers that do not run on the tabular (autoregressive) toys; the tests
#: below run them on the masked-diffusion counterpart of each toy (:func:`_target_for`), and
#: ``test_samplers_of_another_kind_refuse_the_tabular_toy`` asserts why.
TARGET_KIND: dict[str, str] = {"fk-steering": "masked-diffusion"}


def _target_for(name: str, target: tiltsample.TiltedTarget) -> tiltsample.TiltedTarget:
    """``target``, or for a masked-diffusion sampler a random masked-diffusion toy with the same
    vocabulary, EOS, length (at least 2, the toy's minimum), reward, ``lam`` and truncation."""
    if TARGET_KIND.get(name) != "masked-diffusion":
        return target
    from tiltsample.targets.masked_diffusion import random_masked_diffusion

    length = max(2, target.max_new_tokens)
    gen = torch.Generator().manual_seed(target.vocab_size * 10 + length)
    policy = random_masked_diffusion(gen, target.vocab_size, length, eos_id=target.eos_id)
    return tiltsample.TiltedTarget(
        policy,  # type: ignore[arg-type]
        target.reward,
        target.lam,
        (),
        length,
        target.truncation,
    )


def test_target_kinds_agree_with_the_registry() -> None:
    assert set(TARGET_KIND) <= set(PARAMS)
    for name, kind in TARGET_KIND.items():
        assert registry.sampler_entry(name).target_kind == kind


@pytest.mark.parametrize("name", sorted(TARGET_KIND))
def test_samplers_of_another_kind_refuse_the_tabular_toy(name: str) -> None:
    """The reason for :data:`TARGET_KIND`: a tabular (autoregressive) target is refused by name."""
    with pytest.raises(TypeError, match=TARGET_KIND[name]):
        tiltsample.sample(name, tabular_toy(), 2, seed=0, **PARAMS[name])


@pytest.mark.parametrize("name", sorted(PARAMS))
@settings(max_examples=10)
@given(target=tabular_targets())
def test_sampler_conformance_on_random_targets(name: str, target: tiltsample.TiltedTarget) -> None:
    target = _target_for(name, target)
    n = 5
    if name == "beam":
        # beam returns distinct hypotheses: asking for more than the support holds is refused
        # ("raise num_beams"), which the support-size-1 examples would hit
        n = min(2, len(enumerate_target(target).support))
    if TARGET_KIND.get(name) == "masked-diffusion" and target.truncation == "condition":
        # a masked-diffusion response cannot be forced to end with EOS: a particle without EOS
        # is returned with log-weight -inf (a failed draw), which check_sampler's "every draw is
        # a complete response" refuses; its conformance is checked on the "stop" twin instead
        out = tiltsample.sample(name, target, n, seed=0, **PARAMS[name])
        valid = torch.tensor([target.is_complete(x) for x in out.sequences])
        assert bool(torch.isneginf(out.log_weights[~valid]).all())
        target = dataclasses.replace(target, truncation="stop")
    check_sampler(name, target, num_samples=n, **PARAMS[name])


def _beam_reference(target: tiltsample.TiltedTarget, width: int) -> list[tuple[Seq, float]]:
    """A plain re-statement of the beam rule, scoring by exhaustive dictionary lookups."""
    e = enumerate_target(target)
    log_pi = dict(zip(e.support, e.log_density.tolist(), strict=True))
    eos, cap = target.eos_id, target.max_new_tokens
    beams: list[tuple[Seq, float, bool]] = [((), 0.0, False)]
    while not all(done for _, _, done in beams):
        cands: list[tuple[Seq, float, bool]] = []
        for prefix, logp, done in beams:
            if done:
                cands.append((prefix, logp, True))
                continue
            lp = target.policy.next_logprobs((), [prefix])[0]
            for v in range(target.vocab_size):
                if lp[v] == -math.inf:
                    continue
                if target.truncation == "condition" and len(prefix) == cap - 1 and v != eos:
                    continue
                x = (*prefix, v)
                if target.is_complete(x):
                    cands.append((x, log_pi.get(x, -math.inf), True))
                else:
                    cands.append((x, logp + float(lp[v]), False))
        cands.sort(key=lambda c: -c[1])  # stable: ties keep expansion order
        beams = cands[:width]
    return [(x, s) for x, s, _ in beams]


@settings(max_examples=20)
@given(target=tabular_targets())
def test_beam_matches_the_reference_rule(target: tiltsample.TiltedTarget) -> None:
    for width in (1, 2, 5):
        out = tiltsample.sample("beam", target, 1, seed=0, num_beams=width)
        ref = _beam_reference(target, width)
        assert out.sequences[0] == ref[0][0]
        assert out.meta["scores"][0] == pytest.approx(ref[0][1], abs=1e-9)


def test_best_of_n_cost_and_selections() -> None:
    target = tabular_toy()
    out = tiltsample.sample("best-of-n", target, 5, seed=3, num_candidates=4)
    assert out.selections is not None and len(out.selections) == 5
    lengths = sum(len(c) for sel in out.selections for c in sel.candidates)
    assert out.cost.generated_tokens == lengths  # every candidate token counted
    assert out.cost.reward_calls == 20
    for sel, x in zip(out.selections, out.sequences, strict=True):
        assert sel.candidates[sel.chosen] == x
        assert float(sel.probs.sum()) == pytest.approx(1.0)
    rb = out.empirical(rao_blackwell=True)
    assert sum(rb.values()) == pytest.approx(1.0)


def test_best_of_n_with_one_candidate_is_ancestral() -> None:
    target = tabular_toy()
    a = tiltsample.sample("best-of-n", target, 50, seed=9, num_candidates=1)
    b = tiltsample.sample("ancestral", target, 50, seed=9)
    assert a.sequences == b.sequences


def test_tiny_lam_is_finite_and_picks_reward_maximisers() -> None:
    target = tabular_toy().with_lam(1e-3)
    out = tiltsample.sample("best-of-n", target, 200, seed=0, num_candidates=8)
    assert out.rewards is not None
    assert not bool(torch.isnan(out.log_weights).any())
    assert out.log_evidence is not None and math.isfinite(out.log_evidence)
    # a draw has reward 0 only when all 8 candidates had reward 0
    imp = tiltsample.sample("importance", target, 2000, seed=1)
    p0 = float((imp.rewards == 0).double().mean())  # type: ignore[union-attr]
    zeros = int((out.rewards == 0).sum())
    assert zeros <= 200 * p0**8 + 4 * math.sqrt(200 * p0**8) + 1


def test_failed_draws_are_marked_not_hidden() -> None:
    policy = random_tabular(torch.Generator().manual_seed(0), 3, 2)
    never = ConstraintReward(lambda x: False)
    target = tiltsample.TiltedTarget(policy, ContainsTokenReward(1, 0), 1.0, (), 2).tilt(never)
    out = tiltsample.sample("best-of-n", target, 3, seed=0, num_candidates=2)
    assert out.meta["failed"] == 3
    assert bool(torch.isneginf(out.log_weights).all())
    assert out.log_evidence == -math.inf


def test_exact_sampler_matches_the_exact_law_statistically() -> None:
    target = tabular_toy()
    e = enumerate_target(target)
    probs = torch.softmax(e.log_density, 0)
    n = 20000
    out = tiltsample.sample("exact", target, n, seed=0)
    assert out.log_evidence == pytest.approx(float(torch.logsumexp(e.log_density, 0)))
    # the mean reward is within 4 standard errors of the exact mean
    rewards = target.evaluate_tilt(e.support).reward
    assert rewards is not None
    mean = float((probs * rewards).sum())
    sd = math.sqrt(mean * (1 - mean) / n)
    got = float(target.evaluate_tilt(out.sequences).reward.mean())  # type: ignore[union-attr]
    assert abs(got - mean) < 4 * sd


def test_importance_evidence_is_unbiased() -> None:
    target = tabular_toy()
    log_z = float(torch.logsumexp(enumerate_target(target).log_density, 0))
    reps = 300
    ratios = torch.tensor(
        [
            math.exp(tiltsample.sample("importance", target, 16, seed=s).log_evidence - log_z)  # type: ignore[operator]
            for s in range(reps)
        ]
    )
    se = float(ratios.std()) / math.sqrt(reps)
    assert abs(float(ratios.mean()) - 1.0) < 4 * se


def test_imh_chains_reach_the_target() -> None:
    target = tabular_toy(vocab_size=3, max_len=4)
    e = enumerate_target(target)
    pi = dict(zip(e.support, torch.softmax(e.log_density, 0).tolist(), strict=True))
    trace = tiltsample.run_chains("imh", target, 8, seed=0, num_steps=600)
    diag = trace.diagnostics(burn_in=100)
    assert diag["log_density"]["rhat"] < 1.05
    assert 0.0 < diag["accepted"]["acceptance_rate"] < 1.0
    ess = diag["log_density"]["ess"]
    emp = trace.empirical(burn_in=100)
    tv = 0.5 * sum(abs(emp.get(x, 0.0) - p) for x, p in pi.items())
    # noise floor of an i.i.d. sample of size ESS, with a factor 3 of slack
    floor = sum(math.sqrt(p * (1 - p) / (2 * math.pi * ess)) for p in pi.values())
    assert tv < 3 * floor


def test_imh_kernel_is_exact_on_a_two_state_target() -> None:
    # pi(x) vs q(x) on two responses: the exact kernel leaves pi invariant; check P(accept)
    policy = random_tabular(torch.Generator().manual_seed(0), 2, 1)  # responses: (0,), (1,)
    target = tiltsample.TiltedTarget(policy, ContainsTokenReward(1, 0), 0.5, (), 1)
    e = enumerate_target(target)
    q = torch.exp(e.log_reference)
    pi = torch.softmax(e.log_density, 0)
    w = pi / q
    kernel = torch.zeros(2, 2, dtype=torch.float64)
    for i, j in itertools.product(range(2), range(2)):
        if i != j:
            kernel[i, j] = q[j] * min(1.0, float(w[j] / w[i]))
    kernel += torch.diag(1 - kernel.sum(1))
    assert torch.allclose(pi @ kernel, pi, atol=1e-15)
    trace = tiltsample.run_chains("imh", target, 400, seed=0, num_steps=1)
    start = tiltsample.sample("ancestral", target, 400, seed=0)  # same seed: same initial draws
    moves = sum(1 for a, b in zip(start.sequences, trace.final(), strict=True) if a != b)
    p_move = sum(float(q[i] * kernel[i, 1 - i]) for i in range(2))
    assert abs(moves / 400 - p_move) < 4 * math.sqrt(p_move * (1 - p_move) / 400)


# ---------------------------------------------------------------- zero-mass targets: one rule
#: Samplers that cannot return any draw of a zero-mass target and raise instead.
RAISE_ON_ZERO_MASS = {"exact", "csmc", "tri-tsmc"}
#: Samplers whose draws are not aimed at pi: ``ancestral`` draws p_ref by definition.
NOT_TARGETING_PI = {"ancestral"}


@pytest.mark.parametrize("truncation", ["stop", "condition"])
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_zero_mass_target_fails_loudly(name: str, truncation: str) -> None:
    """A target with no sequence of positive mass never yields silent draws: every sampler raises
    "zero total mass" or flags every draw failed (log-weight -inf, meta['failed'] = n)."""
    policy = random_tabular(torch.Generator().manual_seed(0), vocab_size=3, max_len=3)
    target = tiltsample.TiltedTarget(
        policy, ConstraintReward(lambda x: False), lam=1.0, max_new_tokens=3, truncation=truncation
    )
    target = _target_for(name, target)
    params = dict(PARAMS[name])
    if name == "beam":
        params["num_beams"] = 4
    if name in RAISE_ON_ZERO_MASS:
        with pytest.raises(ValueError, match="zero total mass"):
            tiltsample.sample(name, target, 4, seed=0, **params)
        return
    out = tiltsample.sample(name, target, 4, seed=0, **params)
    if name in NOT_TARGETING_PI:
        assert out.meta["failed"] == 0
        return
    assert out.meta["failed"] == 4, f"{name}: {out.meta['failed']} of 4 draws flagged failed"
    assert bool(torch.isneginf(out.log_weights).all())
    assert out.log_evidence is None or out.log_evidence == -math.inf


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_failed_count_is_always_reported(name: str) -> None:
    target = _target_for(name, tabular_toy())
    out = tiltsample.sample(name, target, 2 if name == "beam" else 4, seed=1, **PARAMS[name])
    assert out.meta["failed"] == int(torch.isneginf(out.log_weights).sum())
