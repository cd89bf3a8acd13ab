"""Independent runs batched across problems draw exactly what each run draws alone.

:class:`~tiltsample.row_generators.RowGenerators` gives every group of rows its own generator;
:func:`~tiltsample.proposal.propose_many`, :func:`tiltsample.samplers.best_of_n.sample_many` and
:func:`tiltsample.samplers.ancestral.sample_many`
decode several targets' candidates in one session. On an exact toy a batched run is
bit-identical to the runs alone; on the shipped model (different prompts, one multi-prompt
session) the tokens are identical and the log-densities agree to float32 precision.
"""

from __future__ import annotations

import math

import pytest
import torch

import tiltsample
from tiltsample.row_generators import RowGenerators
from tiltsample.samplers import ancestral, best_of_n
from tiltsample.target import TiltedTarget
from tiltsample.targets import tasks
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.token_laws import draw_tokens


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_each_group_draws_from_its_own_generator_and_only_when_needed() -> None:
    law = torch.log_softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), -1)
    law = law.to(torch.float64)
    rows = RowGenerators.of_sizes(_gens([1, 2, 3]), [2, 3, 1])
    need = torch.tensor([True, False, False, False, False, True])  # group 1 needs nothing
    idle = rows.generators[1].get_state().clone()
    tokens = rows.draw(law, need, eos_id=4)
    alone = _gens([1, 2, 3])
    assert torch.equal(tokens[:2], draw_tokens(alone[0], law[:2]))
    assert torch.equal(tokens[2:5], torch.full((3,), 4))
    assert torch.equal(rows.generators[1].get_state(), idle)  # no draw consumed
    assert torch.equal(tokens[5:], draw_tokens(alone[2], law[5:]))
    # a subset keeps each row's generator
    assert rows.subset(torch.tensor([5, 0])).group.tolist() == [2, 0]


def test_bad_row_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="sizes"):
        RowGenerators.of_sizes(_gens([1]), [2, 3])
    with pytest.raises(ValueError, match="group values"):
        RowGenerators(_gens([1]), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="generators"):
        RowGenerators([0], torch.tensor([0]))  # type: ignore[list-item]


def _toy_targets() -> list[TiltedTarget]:
    policy = random_tabular(torch.Generator().manual_seed(0), vocab_size=4, max_len=6)
    rewards = [ContainsTokenReward(tok, policy.eos_id) for tok in (1, 2, 3)]
    return [TiltedTarget(policy, r, lam=0.5, max_new_tokens=6) for r in rewards]


@pytest.mark.parametrize("selection", ["softmax", "argmax"])
def test_batched_best_of_n_is_bit_identical_to_the_runs_alone_on_a_toy(selection: str) -> None:
    targets, seeds = _toy_targets(), [11, 12, 13]
    batched = best_of_n.sample_many(targets, 5, _gens(seeds), num_candidates=4, selection=selection)
    calls_alone = 0
    for target, seed, got in zip(targets, seeds, batched, strict=True):
        alone = tiltsample.sample(
            "best-of-n", target, 5, seed=seed, num_candidates=4, selection=selection
        )
        assert got.sequences == alone.sequences
        assert torch.equal(got.log_weights, alone.log_weights)
        assert got.rewards is not None and alone.rewards is not None
        assert torch.equal(got.rewards, alone.rewards)
        assert got.log_evidence == alone.log_evidence
        assert got.cost.generated_tokens == alone.cost.generated_tokens
        assert got.cost.reward_calls == alone.cost.reward_calls
        calls_alone += alone.cost.model_calls
    joint = batched[0].meta["joint_cost"]
    assert joint.generated_tokens == sum(r.cost.generated_tokens for r in batched)
    assert joint.reward_calls == sum(r.cost.reward_calls for r in batched)
    assert 0 < joint.model_calls <= calls_alone  # the toy session counts calls per prefix


def test_batched_best_of_n_on_the_shipped_model_matches_the_runs_alone() -> None:
    policy = tasks.load_policy()
    targets = [tasks.problem_target(p, policy, lam=0.1) for p in tasks.held_out_problems(3)]
    assert len({t.prompt for t in targets}) == 3  # three prompts: one multi-prompt session
    seeds = [5, 6, 7]
    batched = best_of_n.sample_many(targets, 2, _gens(seeds), num_candidates=4)
    calls_alone = 0
    for target, seed, got in zip(targets, seeds, batched, strict=True):
        alone = tiltsample.sample("best-of-n", target, 2, seed=seed, num_candidates=4)
        assert got.sequences == alone.sequences
        assert got.log_reference is not None and alone.log_reference is not None
        assert torch.allclose(got.log_reference, alone.log_reference, atol=1e-4, rtol=0)
        assert got.log_evidence is not None and alone.log_evidence is not None
        assert math.isclose(got.log_evidence, alone.log_evidence, abs_tol=1e-4)
        calls_alone += alone.cost.model_calls
    # the point of batching: the problems share their model calls
    assert batched[0].meta["joint_cost"].model_calls < calls_alone


def test_propose_many_refuses_targets_it_cannot_batch() -> None:
    targets = _toy_targets()
    other = random_tabular(torch.Generator().manual_seed(1), vocab_size=4, max_len=6)
    mixed = [targets[0], TiltedTarget(other, None, lam=1.0, max_new_tokens=6)]
    with pytest.raises(ValueError, match="another policy"):
        best_of_n.sample_many(mixed, 1, _gens([1, 2]))
    with pytest.raises(ValueError, match="one length"):
        best_of_n.sample_many(targets, 1, _gens([1]))


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_batched_ancestral_matches_the_runs_alone(temperature: float) -> None:
    policy = tasks.load_policy()
    targets = [tasks.problem_target(p, policy, lam=0.1) for p in tasks.held_out_problems(3)]
    seeds = [21, 22, 23]
    batched = ancestral.sample_many(targets, 3, _gens(seeds), temperature=temperature)
    for target, seed, got in zip(targets, seeds, batched, strict=True):
        alone = tiltsample.sample("ancestral", target, 3, seed=seed, temperature=temperature)
        assert got.sequences == alone.sequences
        assert got.rewards is not None and alone.rewards is not None
        assert torch.equal(got.rewards, alone.rewards)
        assert got.cost.generated_tokens == alone.cost.generated_tokens
