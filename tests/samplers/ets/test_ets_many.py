"""ETS batched across problems (:func:`tiltsample.samplers.ets.sample_many`) returns, for every
target, what ``tiltsample.sample("ets", target, ...)`` returns alone.

On an exact toy (tabular policy, different prompts in one multi-prompt session) the batched run
is bit-identical to the runs alone: sequences, log-weights, log p_ref, evidence, rewards,
selections, counters, generated tokens and reward calls, and every generator ends in the same
state. On the shipped model the tokens are identical and the log-densities agree to float32
precision, while the problems share their model calls. Configurations it does not support are
refused with a ``ValueError`` naming the parameter.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import tiltsample
from tiltsample.samplers import ets
from tiltsample.target import TiltedTarget
from tiltsample.targets import tasks
from tiltsample.targets.masked_diffusion import random_masked_diffusion
from tiltsample.targets.rewards import ConstraintReward, ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.theory import ExactPotential


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _toy_targets(truncation: str = "stop") -> list[TiltedTarget]:
    """Three reward tilts, the last one with a hard constraint (no token 1) as an extra tilt term,
    under which chains can fail."""
    policy = random_tabular(torch.Generator().manual_seed(0), vocab_size=4, max_len=8)
    targets = [
        TiltedTarget(
            policy,
            ContainsTokenReward(tok, policy.eos_id),
            lam=0.5,
            prompt=(tok,) * tok,  # different prompts: a multi-prompt session
            max_new_tokens=8,
            truncation=truncation,  # type: ignore[arg-type]
        )
        for tok in (1, 2, 3)
    ]
    no_one = ConstraintReward(lambda x: 1 not in x)
    return [*targets[:2], targets[2].tilt(no_one)]


def _assert_same_as_alone(got: Any, alone: Any) -> None:
    assert got.sequences == alone.sequences
    assert torch.equal(got.log_weights, alone.log_weights)
    assert torch.equal(got.log_reference, alone.log_reference)
    assert torch.equal(got.rewards, alone.rewards)
    assert got.log_evidence == alone.log_evidence
    assert got.cost.generated_tokens == alone.cost.generated_tokens
    assert got.cost.reward_calls == alone.cost.reward_calls
    for key in (
        "candidate_tokens",
        "rollout_tokens",
        "rollouts",
        "failed",
        "failed_at",
        "guidance_steps",
        "num_guidance_steps",
        "num_proposals",
        "clipped_fraction",
        "sampler",
        "params",
    ):
        assert got.meta[key] == alone.meta[key], key
    assert ("selections" in got.meta) == ("selections" in alone.meta)
    for a, b in zip(got.meta.get("selections", []), alone.meta.get("selections", []), strict=True):
        for sa, sb in zip(a, b, strict=True):
            assert sa.candidates == sb.candidates and sa.chosen == sb.chosen
            assert torch.equal(sa.probs, sb.probs)


@pytest.mark.parametrize(
    ("num_samples", "params", "truncation", "failed"),
    [
        # compare's recipe at k = 4 and k = 16; then other sizes and options
        (1, {"num_candidates": 2, "num_rollouts": 1}, "stop", 1),
        (1, {"num_candidates": 8, "num_rollouts": 1}, "stop", 0),
        (3, {"num_candidates": 3, "num_rollouts": 2, "block_size": 3}, "stop", 1),
        (
            2,
            {
                "num_candidates": 2,
                "temperature": 0.7,
                "proposal_temperature": 1.3,
                "record_selections": False,
            },
            "condition",
            0,
        ),
    ],
)
def test_batched_ets_is_bit_identical_to_the_runs_alone_on_a_toy(
    num_samples: int, params: dict[str, Any], truncation: str, failed: int
) -> None:
    """``failed``: the failed chains (seeded, exact) of the constrained target, so that the
    failure path (all candidate weights zero, log-weight ``-inf``) is covered."""
    targets, seeds = _toy_targets(truncation), [11, 12, 13]
    gens = _gens(seeds)
    batched = ets.sample_many(targets, num_samples, gens, **params)
    calls_alone = 0
    for target, seed, gen, got in zip(targets, seeds, gens, batched, strict=True):
        gen_alone = torch.Generator().manual_seed(seed)
        alone = tiltsample.sample("ets", target, num_samples, generator=gen_alone, **params)
        _assert_same_as_alone(got, alone)
        assert torch.equal(gen.get_state(), gen_alone.get_state())
        if bool(torch.isfinite(alone.log_weights).any()):  # resample needs one live draw
            assert got.resample(1, gen).sequences == alone.resample(1, gen_alone).sequences
        calls_alone += alone.cost.model_calls
    assert batched[-1].meta["failed"] == failed
    joint = batched[0].meta["joint_cost"]
    assert all(r.meta["joint_cost"] is joint for r in batched)
    assert joint.generated_tokens == sum(r.cost.generated_tokens for r in batched)
    assert joint.reward_calls == sum(r.cost.reward_calls for r in batched)
    assert 0 < joint.model_calls <= calls_alone  # the toy session counts calls per prompt


def test_reward_range_is_checked_per_target() -> None:
    targets = _toy_targets()[:2]
    gens = _gens([1, 2])
    batched = ets.sample_many(targets, 2, gens, num_candidates=2, reward_range=(0, 1))
    for target, seed, got in zip(targets, [1, 2], batched, strict=True):
        alone = tiltsample.sample(
            "ets", target, 2, seed=seed, num_candidates=2, reward_range=(0, 1)
        )
        _assert_same_as_alone(got, alone)
    with pytest.raises(ValueError, match="reward_range"):
        ets.sample_many(targets, 2, _gens([1, 2]), num_candidates=2, reward_range=(0.5, 1))


def test_batched_ets_on_the_shipped_model_matches_the_runs_alone() -> None:
    policy = tasks.load_policy()
    targets = [tasks.problem_target(p, policy, lam=0.1) for p in tasks.held_out_problems(3)]
    assert len({t.prompt for t in targets}) == 3  # three prompts: one multi-prompt session
    seeds = [5, 6, 7]
    gens = _gens(seeds)
    params = {"num_candidates": 2, "num_rollouts": 1}  # compare's recipe at k = 4
    batched = ets.sample_many(targets, 1, gens, **params)
    calls_alone = 0
    for target, seed, gen, got in zip(targets, seeds, gens, batched, strict=True):
        gen_alone = torch.Generator().manual_seed(seed)
        alone = tiltsample.sample("ets", target, 1, generator=gen_alone, **params)
        assert got.sequences == alone.sequences
        assert torch.equal(got.rewards, alone.rewards)
        assert torch.equal(got.log_weights, alone.log_weights)
        assert torch.allclose(got.log_reference, alone.log_reference, atol=1e-4, rtol=0)
        assert got.log_evidence is not None and alone.log_evidence is not None
        assert math.isclose(got.log_evidence, alone.log_evidence, abs_tol=1e-4)
        assert got.cost.generated_tokens == alone.cost.generated_tokens
        assert got.cost.reward_calls == alone.cost.reward_calls
        assert [(s.candidates, s.chosen) for s in got.meta["selections"][0]] == [
            (s.candidates, s.chosen) for s in alone.meta["selections"][0]
        ]
        assert torch.equal(gen.get_state(), gen_alone.get_state())
        calls_alone += alone.cost.model_calls
    # the point of batching: the problems share their model calls
    assert batched[0].meta["joint_cost"].model_calls < calls_alone


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"reward_mode": "self-consistency", "answer": "last-token"}, "reward_mode"),
        ({"batching": "continuous"}, "batching"),
        ({"batch_size": 1}, "batch_size"),
        ({"is_log_ratio_clip": 10.0}, "is_log_ratio_clip"),
        ({"output": "vote"}, "output"),
        ({"sc_zero_if_unique": True}, "sc_zero_if_unique"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(params: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ets.sample_many(_toy_targets(), 1, _gens([1, 2, 3]), **params)


def test_proposal_and_potential_are_refused_by_name() -> None:
    targets = _toy_targets()
    with pytest.raises(ValueError, match="proposal"):
        ets.sample_many(targets, 1, _gens([1, 2, 3]), proposal=targets[0].policy)
    with pytest.raises(ValueError, match="potential"):
        ets.sample_many(targets, 1, _gens([1, 2, 3]), potential=ExactPotential(targets[0]))


def test_targets_that_cannot_share_a_job_are_refused() -> None:
    targets = _toy_targets()
    other = random_tabular(torch.Generator().manual_seed(1), vocab_size=4, max_len=8)
    with pytest.raises(ValueError, match="another policy"):
        mixed = [targets[0], TiltedTarget(other, None, lam=1.0, max_new_tokens=8)]
        ets.sample_many(mixed, 1, _gens([1, 2]))
    shorter = TiltedTarget(targets[0].policy, None, lam=1.0, max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ets.sample_many([targets[0], shorter], 1, _gens([1, 2]))
    with pytest.raises(ValueError, match="one length"):
        ets.sample_many(targets, 1, _gens([1, 2]))
    dlm = random_masked_diffusion(torch.Generator().manual_seed(0), vocab_size=3, length=3)
    diffusion = TiltedTarget(dlm, None, lam=1.0, max_new_tokens=dlm.length)
    with pytest.raises(ValueError, match="masked diffusion"):
        ets.sample_many([diffusion], 1, _gens([1]))
