"""``tiltsample sample SAMPLER --model arith-ar --problems N`` batches the problems: each problem's
row and draws equal those of the problem run alone (its own seed), only the shared model calls
and forward tokens are apportioned; parameters the batched run does not take run alone."""

from __future__ import annotations

from typing import Any

import pytest

from tiltsample.app.model_sample import sample_problems
from tiltsample.targets import tasks

SAME = ("problem", "draws", "accuracy", "ess", "generated_tokens", "reward_calls")


@pytest.fixture(scope="module")
def policy() -> Any:
    return tasks.load_policy()


@pytest.mark.parametrize(
    ("sampler", "n", "params"),
    [
        ("best-of-n", 2, {"num_candidates": 4}),
        ("smc", 4, {"num_particles": 4}),
        ("ets", 1, {"num_candidates": 2, "num_rollouts": 1}),
        ("qalign", 1, {"num_steps": 3, "batching": "continuous"}),
    ],
)
def test_batched_problems_give_the_rows_of_problems_run_alone(
    policy: Any, sampler: str, n: int, params: dict[str, Any]
) -> None:
    kw: dict[str, Any] = {"problems": 3, "num_samples": n, "lam": 0.1, "seed": 4}
    alone = sample_problems(sampler, policy, params=params, batch=False, progress=False, **kw)
    batched = sample_problems(sampler, policy, params=params, progress=False, **kw)
    for a, b in zip(alone.rows, batched.rows, strict=True):
        assert {k: a[k] for k in SAME} == pytest.approx({k: b[k] for k in SAME}, abs=1e-9)
        assert b["batched"] == 3 and "batched" not in a
    assert batched.total["model_calls"] < alone.total["model_calls"]


def test_parameters_the_batched_run_refuses_run_alone(policy: Any) -> None:
    # MH without continuous batching has no batched run across problems: rows as alone
    kw: dict[str, Any] = {"problems": 2, "num_samples": 1, "lam": 0.1, "seed": 0}
    params = {"num_steps": 2}
    alone = sample_problems("qalign", policy, params=params, batch=False, progress=False, **kw)
    again = sample_problems("qalign", policy, params=params, progress=False, **kw)
    assert [{k: r[k] for k in SAME} for r in alone.rows] == [
        {k: r[k] for k in SAME} for r in again.rows
    ]
    assert all("batched" not in r for r in again.rows)
