"""SMC batched across problems (samplers/smc/many.py) equals the runs alone.

``smc.sample_many`` runs the SMC (or Power-SMC) of several targets as one job in one multi-prompt
session. Result i must be what ``tiltsample.sample(sampler, targets[i], k, generator=gens[i])``
returns alone (sequences, weights, log Ẑ and its meta, own generated tokens and reward calls), and
gens[i] must be left in the same state (checked by drawing from it afterwards): bit-identical on
an exact toy whose targets finish after different numbers of steps, the same tokens on the
shipped model.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch
from rollout_toys import RolloutOnlyPolicy

import tiltsample
from tiltsample.results import SampleSet
from tiltsample.samplers import smc
from tiltsample.target import TiltedTarget, Truncation, power_target
from tiltsample.targets import tasks
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.targets.tabular import random_tabular

pytestmark = pytest.mark.usefixtures("serial_torch")

SEEDS = [11, 12, 13]


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _toy_targets(sampler: str, truncation: Truncation = "stop") -> list[TiltedTarget]:
    """Three targets on one tabular policy: different prompts and rewards (smc) or exponents
    (power-smc), so the runs differ in weights, lengths and number of steps."""
    policy = random_tabular(torch.Generator().manual_seed(0), vocab_size=4, max_len=6)
    if sampler == "power-smc":
        return [
            power_target(policy, alpha, (tok,), 6, truncation=truncation)
            for tok, alpha in ((1, 2.0), (2, 3.0), (3, 4.0))
        ]
    return [
        TiltedTarget(
            policy,
            ContainsTokenReward(tok, policy.eos_id),
            lam=0.5,
            prompt=(tok,),
            max_new_tokens=6,
            truncation=truncation,
        )
        for tok in (1, 2, 3)
    ]


def _assert_same_as_alone(
    sampler: str,
    targets: list[TiltedTarget],
    num_samples: int,
    params: dict[str, Any],
    *,
    exact: bool,
) -> list[SampleSet]:
    """Run the batch and every run alone; check results, costs and generator states."""
    gens = _gens(SEEDS)
    batched = smc.sample_many(targets, num_samples, gens, sampler=sampler, **params)
    assert len(batched) == len(targets)
    alones = []
    for target, seed, gen, got in zip(targets, SEEDS, gens, batched, strict=True):
        gen_alone = torch.Generator().manual_seed(seed)
        alone = tiltsample.sample(sampler, target, num_samples, generator=gen_alone, **params)
        alones.append(alone)
        assert got.sequences == alone.sequences
        assert got.cost.generated_tokens == alone.cost.generated_tokens
        assert got.cost.reward_calls == alone.cost.reward_calls
        # the generator is left where the run alone leaves it
        assert torch.equal(gen.get_state(), gen_alone.get_state())
        assert got.resample(1, gen).sequences == alone.resample(1, gen_alone).sequences
        meta = {k: v for k, v in got.meta.items() if k != "joint_cost"}
        assert got.log_evidence is not None and alone.log_evidence is not None
        assert got.log_reference is not None and alone.log_reference is not None
        if exact:
            assert torch.equal(got.log_weights, alone.log_weights)
            assert torch.equal(got.log_reference, alone.log_reference)
            assert got.log_evidence == alone.log_evidence
            assert meta == alone.meta
        else:
            assert torch.allclose(got.log_weights, alone.log_weights, atol=1e-4, rtol=0)
            assert torch.allclose(got.log_reference, alone.log_reference, atol=1e-4, rtol=0)
            assert math.isclose(got.log_evidence, alone.log_evidence, abs_tol=1e-4)
            for key in ("num_resampling", "num_steps", "num_runs", "failed", "params"):
                assert meta[key] == alone.meta[key]
        if alone.rewards is not None:
            assert got.rewards is not None
            assert torch.allclose(got.rewards, alone.rewards, equal_nan=True)
    joint = batched[0].meta["joint_cost"]
    assert all(r.meta["joint_cost"] == joint for r in batched)
    assert joint.generated_tokens == sum(r.cost.generated_tokens for r in batched)
    assert joint.reward_calls == sum(r.cost.reward_calls for r in batched)
    assert 0 < joint.model_calls <= sum(a.cost.model_calls for a in alones)
    return alones


SMC_CASES: list[dict[str, Any]] = [
    {},
    {"proposal": "optimal"},
    {"block_size": 2},
    {"block_size": 4, "proposal": "optimal"},
    {"ess_threshold": 1.0, "resampling": "multinomial"},
    {"ess_threshold": 1.0, "resampling": "residual"},
    {"ess_threshold": 0.9, "resampling": "stratified"},
    {"ess_threshold": 0.0},
    {"ess_threshold": 1.0, "convention": "mean"},
    {"twist": "none"},
    {"temperature": 0.7},
]
POWER_CASES: list[dict[str, Any]] = [
    {},
    {"alpha_ramp": 3},
    {"block_size": 2, "ess_threshold": 1.0, "resampling": "residual"},
]


@pytest.mark.parametrize("truncation", ["stop", "condition"])
@pytest.mark.parametrize(("k", "num_particles"), [(4, 4), (2, 2), (6, 3)])
@pytest.mark.parametrize(
    ("sampler", "params"),
    [("smc", p) for p in SMC_CASES] + [("power-smc", p) for p in POWER_CASES],
)
def test_batched_smc_is_bit_identical_to_the_runs_alone_on_a_toy(
    sampler: str, params: dict[str, Any], k: int, num_particles: int, truncation: Truncation
) -> None:
    targets = _toy_targets(sampler, truncation)
    _assert_same_as_alone(
        sampler, targets, k, {"num_particles": num_particles, **params}, exact=True
    )


@pytest.mark.parametrize("sampler", ["smc", "power-smc"])
def test_the_compare_configuration_on_a_toy_runs_of_different_lengths(sampler: str) -> None:
    """``num_samples = num_particles = k`` (the compare recipes), k in 2..16: the runs end after
    different numbers of steps, and resampling happens."""
    targets = _toy_targets(sampler)
    steps: set[tuple[int, ...]] = set()
    resampled = 0
    for k in (2, 5, 16):
        alones = _assert_same_as_alone(sampler, targets, k, {"num_particles": k}, exact=True)
        steps.add(tuple(a.meta["num_steps"] for a in alones))
        resampled += sum(sum(a.meta["num_resampling"]) for a in alones)
    assert any(len(set(s)) > 1 for s in steps)  # some target finished before another
    assert resampled > 0


@pytest.mark.parametrize("sampler", ["smc", "power-smc"])
def test_batched_smc_on_the_shipped_model_matches_the_runs_alone(sampler: str) -> None:
    policy = tasks.load_policy()
    targets = [tasks.problem_target(p, policy, lam=0.1) for p in tasks.held_out_problems(3)]
    if sampler == "power-smc":
        targets = [power_target(policy, 4.0, t.prompt, tasks.MAX_NEW_TOKENS) for t in targets]
    assert len({t.prompt for t in targets}) == 3  # three prompts: one multi-prompt session
    alones = _assert_same_as_alone(sampler, targets, 4, {"num_particles": 4}, exact=False)
    assert len({a.meta["num_steps"] for a in alones}) > 1  # the runs end at different steps


def test_the_shipped_model_shares_model_calls() -> None:
    policy = tasks.load_policy()
    targets = [tasks.problem_target(p, policy, lam=0.1) for p in tasks.held_out_problems(3)]
    batched = smc.sample_many(targets, 4, _gens(SEEDS), num_particles=4)
    longest = max(r.meta["num_steps"] for r in batched)
    assert batched[0].meta["joint_cost"].model_calls <= longest + 1
    assert all(r.cost.model_calls == 0 and r.cost.forward_tokens == 0 for r in batched)


@pytest.mark.parametrize(
    ("sampler", "params", "match"),
    [
        ("beam", {}, "sampler must be one of"),
        ("csmc", {}, "sampler must be one of"),
        ("smc", {"num_moves": 1}, "num_moves"),
        ("power-smc", {"num_moves": 2}, "num_moves"),
        ("smc", {"twist": "lookahead"}, "twist"),
        ("smc", {"potential": object()}, "potential"),
        ("smc", {"num_rollouts": 4}, "num_rollouts"),
        ("smc", {"move_cut": "entropy_jump"}, "move_cut"),
        ("smc", {"alpha_ramp": 2}, "alpha_ramp"),
        ("power-smc", {"proposal": "reference"}, "proposal"),
        ("smc", {"num_particles": 3}, "num_particles"),
        ("smc", {"resampling": "bogus"}, "resampling"),
    ],
)
def test_unsupported_samplers_and_parameters_are_refused(
    sampler: str, params: dict[str, Any], match: str
) -> None:
    targets = _toy_targets("smc")
    with pytest.raises(ValueError, match=match):
        smc.sample_many(targets, 4, _gens(SEEDS), sampler=sampler, **params)


def test_targets_that_cannot_share_a_session_are_refused() -> None:
    targets = _toy_targets("smc")
    other = random_tabular(torch.Generator().manual_seed(1), vocab_size=4, max_len=6)
    with pytest.raises(ValueError, match="another policy"):
        smc.sample_many([targets[0], replace(targets[1], policy=other)], 2, _gens([1, 2]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        smc.sample_many([targets[0], replace(targets[1], max_new_tokens=5)], 2, _gens([1, 2]))
    with pytest.raises(ValueError, match="one length"):
        smc.sample_many(targets, 2, _gens([1]))
    with pytest.raises(ValueError, match="non-empty"):
        smc.sample_many([], 2, [])
    with pytest.raises(TypeError, match="generators"):
        smc.sample_many(targets[:1], 2, [0])  # type: ignore[list-item]


def test_a_rollout_level_session_is_refused() -> None:
    inner = random_tabular(torch.Generator().manual_seed(0), vocab_size=4, max_len=6)
    policy = RolloutOnlyPolicy(inner)
    targets = [TiltedTarget(policy, None, lam=1.0, max_new_tokens=6) for _ in range(2)]
    with pytest.raises(ValueError, match="rollout-level"):
        smc.sample_many(targets, 2, _gens([1, 2]))
