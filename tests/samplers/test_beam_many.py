"""Beam search batched across problems returns what each search returns alone.

:func:`tiltsample.samplers.beam_many.sample_many` runs several targets' searches as rows of one
multi-prompt session, each group keeping its own ``num_beams`` best. On an exact toy every result
is bit-identical to ``sample("beam", target, ...)`` run alone (sequences, scores, log-reference,
log-weights, generated tokens and reward calls); on the shipped model the hypotheses are the same
and the scores agree to float32 precision. Beam search draws nothing: the generators are left as
they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

import tiltsample
from tiltsample.samplers.beam_many import sample_many
from tiltsample.target import TiltedTarget
from tiltsample.targets import tasks
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.types import Seq


class ForbidToken:
    """A hard constraint: ``-inf`` when ``token`` occurs, else ``0`` (deterministic, stateless)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        return torch.tensor([-torch.inf if self.token in x else 0.0 for x in xs])


def _gens(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _toy_targets(truncation: str) -> list[TiltedTarget]:
    policy = random_tabular(torch.Generator().manual_seed(3), vocab_size=4, max_len=6)
    rewards = [ContainsTokenReward(1, 0), ContainsTokenReward(2, 0), ForbidToken(3), None]
    return [
        TiltedTarget(
            policy, r, lam=0.5, prompt=(i % 3 + 1, i), max_new_tokens=5, truncation=truncation
        )
        for i, r in enumerate(rewards)
    ]


def _assert_same_as_alone(batched: list, targets: list[TiltedTarget], n: int, width: int) -> int:
    calls_alone = 0
    for target, got in zip(targets, batched, strict=True):
        alone = tiltsample.sample("beam", target, n, seed=0, num_beams=width)
        assert got.sequences == alone.sequences
        assert got.meta["scores"] == alone.meta["scores"]
        assert got.meta["failed"] == alone.meta["failed"]
        assert got.meta["params"] == alone.meta["params"]
        assert torch.equal(got.log_reference, alone.log_reference)
        assert torch.equal(got.log_weights, alone.log_weights)
        assert got.cost.generated_tokens == alone.cost.generated_tokens
        assert got.cost.reward_calls == alone.cost.reward_calls
        calls_alone += alone.cost.model_calls
    return calls_alone


@pytest.mark.parametrize("truncation", ["stop", "condition"])
@pytest.mark.parametrize(("n", "width"), [(1, 1), (2, 3), (3, 8), (5, 40)])
def test_batched_beam_is_bit_identical_to_the_searches_alone_on_a_toy(
    truncation: str, n: int, width: int
) -> None:
    targets = _toy_targets(truncation)
    batched = sample_many(targets, n, _gens([1, 2, 3, 4]), num_beams=width)
    calls_alone = _assert_same_as_alone(batched, targets, n, width)
    joint = batched[0].meta["joint_cost"]
    assert all(r.meta["joint_cost"] == joint for r in batched)
    assert joint.generated_tokens == sum(r.cost.generated_tokens for r in batched)
    assert joint.reward_calls == sum(r.cost.reward_calls for r in batched)
    assert 0 < joint.model_calls <= calls_alone
    assert all(r.cost.model_calls == 0 for r in batched)  # shared: only in joint_cost


def test_violated_constraints_give_failed_hypotheses_as_alone() -> None:
    policy = random_tabular(torch.Generator().manual_seed(5), vocab_size=3, max_len=4)
    targets = [
        TiltedTarget(policy, ForbidToken(tok), max_new_tokens=4, truncation="condition")
        for tok in (1, 2)
    ]
    batched = sample_many(targets, 3, None, num_beams=3)
    # forbidding 1 leaves responses of 0s and 2s; forbidding 2 too, but fewer with high p_ref
    assert sum(r.meta["failed"] for r in batched) >= 1
    _assert_same_as_alone(batched, targets, 3, 3)


def test_the_generators_are_left_untouched() -> None:
    gens = _gens([7, 8, 9, 10])
    before = [g.get_state().clone() for g in gens]
    sample_many(_toy_targets("stop"), 2, gens, num_beams=3)
    assert all(torch.equal(g.get_state(), b) for g, b in zip(gens, before, strict=True))


def test_bad_batches_are_refused() -> None:
    targets = _toy_targets("stop")
    other = random_tabular(torch.Generator().manual_seed(1), vocab_size=4, max_len=6)
    with pytest.raises(ValueError, match="another policy"):
        sample_many([targets[0], TiltedTarget(other, None, max_new_tokens=5)], 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        shorter = TiltedTarget(targets[0].policy, None, max_new_tokens=4)
        sample_many([targets[0], shorter], 1)
    with pytest.raises(ValueError, match="one length"):
        sample_many(targets, 1, _gens([1]))
    with pytest.raises(ValueError, match="num_beams"):
        sample_many(targets, 3, num_beams=2)
    with pytest.raises(ValueError, match="potential"):
        sample_many(targets, 1, num_beams=2, potential=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        sample_many([], 1)


def test_batched_beam_on_the_shipped_model_matches_the_searches_alone() -> None:
    policy = tasks.load_policy()
    targets = [tasks.problem_target(p, policy, lam=0.1) for p in tasks.held_out_problems(3)]
    assert len({t.prompt for t in targets}) == 3  # three prompts: one multi-prompt session
    batched = sample_many(targets, 2, _gens([5, 6, 7]), num_beams=4)
    calls_alone = 0
    for target, got in zip(targets, batched, strict=True):
        alone = tiltsample.sample("beam", target, 2, seed=0, num_beams=4)
        assert got.sequences == alone.sequences
        assert got.log_reference is not None and alone.log_reference is not None
        assert torch.allclose(got.log_reference, alone.log_reference, atol=1e-4, rtol=0)
        assert got.meta["scores"] == pytest.approx(alone.meta["scores"], abs=1e-4)
        assert got.cost.generated_tokens == alone.cost.generated_tokens
        assert got.cost.reward_calls == alone.cost.reward_calls
        calls_alone += alone.cost.model_calls
    # the point of batching: the searches share their model calls
    assert batched[0].meta["joint_cost"].model_calls < calls_alone
