"""Continuous batching of the MH chains (``batching="continuous"``): same kernel, per-chain streams.

Seed-free checks first (the configuration errors, the per-move identities of every recorded step,
the exact reward-call count), then statistical ones: the law of the chains after ``k`` steps — the
final states of ``sample`` and every draw of ``run_chains`` — against the exact ``k``-step law of
the kernel (:mod:`tiltsample.theory.mh_kernels`), with a chi-square test at level 1e-4 (cells with
expected count < 5 merged, so the test is valid at the sample size used). Then reproducibility
(same seed ⇒ identical output; a chain's trajectory does not depend on the other chains) and a
run on the embedded language model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from test_mh_sampler import assert_draws_follow, power_toy

import tiltsample
from tiltsample import TiltedTarget
from tiltsample.samplers import mh
from tiltsample.targets.rewards import ConstraintReward, ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.targets.toys import tabular_toy
from tiltsample.testing import check_sampler
from tiltsample.testing.strategies import tabular_targets
from tiltsample.theory.mh_kernels import law_after, mh_kernel
from tiltsample.types import Seq

pytestmark = pytest.mark.usefixtures("serial_torch")


def reward_toy() -> TiltedTarget:
    toy: TiltedTarget = tabular_toy(vocab_size=3, max_len=4, lam=0.4).tilt(
        ConstraintReward(lambda x: not (len(x) > 1 and x[0] == 2))
    )
    return toy


THIRD = 1 / 3
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("power", "power", {}, {"proposal_temperature": THIRD}),
    (
        "entropy-condition",
        "condition",
        {"cut": "entropy_jump", "cut_power": 2.0},
        {"cut": "entropy_jump", "cut_power": 2.0, "proposal_temperature": THIRD},
    ),
    (
        "top-k",
        "power",
        {"support": "top_k", "top_k": 2},
        {"support": "top_k", "top_k": 2, "proposal_temperature": THIRD},
    ),
    (
        "reference",
        "power",
        {"length_mode": "reference"},
        {"length_mode": "reference", "proposal_temperature": THIRD},
    ),
    (
        "max-swap",
        "power",
        {"alpha": math.inf, "proposal_temperature": 0.5},
        {"greedy": True, "proposal_temperature": 0.5},
    ),
    ("qalign-reward", "reward", {"qalign": True}, {}),
]


def _target(kind: str) -> TiltedTarget:
    if kind == "reward":
        return reward_toy()
    if kind == "condition":
        return power_toy(truncation="condition")
    return power_toy()


def _algorithm(kind: str, params: dict[str, Any], n: int, steps: int) -> Any:
    target = _target(kind)
    params = dict(params)
    if params.pop("qalign", False):
        return target, mh.qalign_sampler(
            target, num_samples=n, num_steps=steps, batching="continuous", **params
        )
    return target, mh.power_sampler(
        target, num_samples=n, num_steps=steps, batching="continuous", **params
    )


# ----------------------------------------------------------------------------- seed-free
def test_continuous_mode_rejects_the_stage_schedule_and_initial_states() -> None:
    target = power_toy()
    with pytest.raises(ValueError, match="block_size"):
        mh.power_sampler(target, num_samples=2, block_size=2, batching="continuous")
    with pytest.raises(ValueError, match="initial"):
        tiltsample.sample(
            mh.power_sampler(
                target, num_samples=1, num_steps=2, batching="continuous", initial=[(0,)]
            ),
            target,
            1,
            seed=0,
        )


def test_every_recorded_step_is_an_mh_move_of_the_previous_state() -> None:
    """Per chain and step: the proposal keeps the previous state below the cut, the new state is
    the proposal iff accepted (else the old state), the stored arrays are the state's."""
    target = power_toy(truncation="condition")
    policy = target.policy
    alg = mh.entropy_cut_sampler(target, num_samples=16, num_steps=6, batching="continuous")
    gen = torch.Generator().manual_seed(5)
    state = alg.init(gen)
    previous: list[Seq] | None = None
    for _ in range(6):
        state, info = alg.step(gen, state)
        seqs = mh.record(state).sequences
        per = policy.sequence_logprob(target.prompt, seqs, per_token=True).to(torch.float64)
        for c, x in enumerate(seqs):
            assert torch.allclose(state.ell[c, : len(x)], per[c, : len(x)], atol=1e-9)
            assert float(state.log_reference[c]) == pytest.approx(float(per[c].sum()))
            j = int(info.cut[c])
            prop = tuple(info.proposal_tokens[c, : int(info.proposal_length[c])].tolist())
            assert int(info.regenerated[c]) == len(prop) - j >= 1
            if previous is not None:
                assert prop[:j] == previous[c][:j] and j < len(previous[c])
                assert x == (prop if bool(info.accepted[c]) else previous[c])
        previous = seqs
    assert bool(info.moved.all()) and state.steps_done == 6
    assert mh.done(state)


def test_every_proposal_is_scored_once_and_rewards_are_batched() -> None:
    """Reward calls = chains × (steps + 1) exactly; the reward sees many responses per call."""
    base = reward_toy()
    calls: list[int] = []

    class Counting:
        def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> torch.Tensor:
            calls.append(len(xs))
            return torch.tensor([float(1 in x) for x in xs], dtype=torch.float64)

    target = TiltedTarget(base.policy, Counting(), 0.5, prompt=(), max_new_tokens=4)
    n, steps = 64, 5
    out = tiltsample.sample(
        mh.qalign_sampler(target, num_samples=n, num_steps=steps, batching="continuous"),
        target,
        n,
        seed=2,
    )
    assert out.cost.reward_calls == sum(calls) == n * (steps + 1)
    assert len(calls) < n * (steps + 1) / 4  # finished suffixes are scored together
    assert out.rewards is not None
    # generated tokens: every regenerated suffix (rejected ones included) plus the initial draws
    trace = tiltsample.run_chains(
        mh.qalign_sampler(target, num_samples=8, num_steps=steps, batching="continuous"),
        target,
        8,
        seed=2,
    )
    regenerated = trace.stats["proposal_length"] - trace.stats["cut"]
    first_lengths = trace.cost.generated_tokens - int(regenerated.sum())
    assert 8 <= first_lengths <= 8 * target.max_new_tokens


# ----------------------------------------------------------------------------- laws
@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_k_step_law_matches_the_exact_kernel(case: int) -> None:
    name, kind, params, kernel_params = CASES[case]
    n, steps = 3000, 2
    target, alg = _algorithm(kind, params, n, steps)
    kernel = mh_kernel(target, **kernel_params)
    out = tiltsample.sample(alg, target, n, seed=21 + case)
    assert out.meta["batching"] == "continuous"
    assert_draws_follow(out.sequences, kernel.as_dict(law_after(kernel, steps)))
    if name == "reference":  # the leak is visible in the output, not hidden
        leaked = sum(
            1 for x in out.sequences if x[-1] != target.eos_id and len(x) < target.max_new_tokens
        )
        assert out.meta["incomplete"] == leaked


def test_ten_step_law_catches_a_missing_cut_correction() -> None:
    """After 10 steps the law is sensitive to the uniform cut correction ``log(n / n')`` (dropping
    it gives a chi-square p-value ~1e-16 here), so this checks the acceptance ratio in full."""
    target = power_toy()
    n, steps = 3000, 10
    alg = mh.power_sampler(target, num_samples=n, num_steps=steps, batching="continuous")
    kernel = mh_kernel(target, proposal_temperature=THIRD)
    out = tiltsample.sample(alg, target, n, seed=1)
    assert_draws_follow(out.sequences, kernel.as_dict(law_after(kernel, steps)))


def test_run_chains_records_every_step_in_order() -> None:
    """Draw ``d`` of every chain follows ``mu_0 P^(d+1)`` (the records are per chain, in step
    order, although chains run ahead of each other inside the engine)."""
    target = power_toy()
    n, steps = 2500, 3
    alg = mh.power_sampler(target, num_samples=n, num_steps=steps, batching="continuous")
    trace = tiltsample.run_chains(alg, target, n, seed=7)
    assert trace.num_draws == steps
    kernel = mh_kernel(target, proposal_temperature=THIRD)
    for d in (0, steps - 1):
        law = kernel.as_dict(law_after(kernel, d + 1))
        assert_draws_follow([chain[d] for chain in trace.sequences], law)
    assert {"log_density", "accepted", "cut", "proposal_length", "length"} <= set(trace.stats)


def test_joint_runs_follow_each_targets_kernel() -> None:
    policy = random_tabular(torch.Generator().manual_seed(3), 3, 4, concentration=0.8)
    eos = policy.eos_id
    targets = [
        TiltedTarget(policy, ContainsTokenReward(1, eos), 0.5, prompt=(), max_new_tokens=4),
        TiltedTarget(policy, ContainsTokenReward(2, eos), 0.3, prompt=(1,), max_new_tokens=4),
    ]
    n, steps = 2000, 2
    outs = mh.sample_many(
        targets, n, seed=3, sampler="qalign", num_steps=steps, batching="continuous"
    )
    for target, out in zip(targets, outs, strict=True):
        kernel = mh_kernel(target)
        assert_draws_follow(out.sequences, kernel.as_dict(law_after(kernel, steps)))
        assert out.cost.reward_calls == n * (steps + 1)
    joint = outs[0].meta["joint_cost"]
    assert sum(o.cost.generated_tokens for o in outs) == joint.generated_tokens


# ----------------------------------------------------------------------------- reproducibility
def test_same_seed_same_output_and_chains_do_not_depend_on_each_other() -> None:
    target = power_toy(truncation="condition")
    for cut in ("uniform", "entropy_jump"):
        alg = mh.power_sampler(target, num_samples=6, num_steps=5, cut=cut, batching="continuous")
        check_sampler(alg, target, num_samples=6)
    few = tiltsample.run_chains(
        mh.power_sampler(target, num_samples=4, num_steps=5, batching="continuous"),
        target,
        4,
        seed=9,
    )
    many = tiltsample.run_chains(
        mh.power_sampler(target, num_samples=32, num_steps=5, batching="continuous"),
        target,
        32,
        seed=9,
    )
    # chain c draws from its own stream: its trajectory is the same whatever runs beside it
    assert few.sequences == many.sequences[:4]
    assert torch.equal(few.stats["accepted"], many.stats["accepted"][:4])
    other = tiltsample.run_chains(
        mh.power_sampler(target, num_samples=32, num_steps=5, batching="continuous"),
        target,
        32,
        seed=10,
    )
    assert other.sequences != many.sequences


def test_queued_chains_in_fewer_rows_give_the_same_output() -> None:
    """``max_rows``: 24 chains through 5 session rows (waiting chains take freed rows) give
    exactly the chains of the one-row-per-chain run: each chain has its own stream."""
    target = power_toy(truncation="condition")
    full = tiltsample.run_chains(
        mh.power_sampler(target, num_samples=24, num_steps=4, batching="continuous"),
        target,
        24,
        seed=4,
    )
    queued = tiltsample.run_chains(
        mh.power_sampler(target, num_samples=24, num_steps=4, batching="continuous", max_rows=5),
        target,
        24,
        seed=4,
    )
    assert queued.sequences == full.sequences
    assert torch.equal(queued.stats["accepted"], full.stats["accepted"])
    assert queued.cost.generated_tokens == full.cost.generated_tokens
    assert queued.cost.model_calls > full.cost.model_calls  # 5 rows per call instead of 24
    with pytest.raises(ValueError, match="max_rows"):
        mh.power_sampler(target, num_samples=4, max_rows=2, batching="ragged")
    with pytest.raises(ValueError, match="max_rows"):
        mh.power_sampler(target, num_samples=4, max_rows=0, batching="continuous")


def test_queued_chains_follow_the_exact_kernel() -> None:
    target = power_toy()
    n, steps = 3000, 3
    alg = mh.power_sampler(
        target, num_samples=n, num_steps=steps, batching="continuous", max_rows=200
    )
    kernel = mh_kernel(target, proposal_temperature=THIRD)
    out = tiltsample.sample(alg, target, n, seed=12)
    assert_draws_follow(out.sequences, kernel.as_dict(law_after(kernel, steps)))


# ----------------------------------------------------------------------------- a real (tiny) LM
def test_continuous_power_sampling_on_the_embedded_language_model() -> None:
    """KV-cached session rows cut, re-fed and restarted independently: the stored per-token
    log-probs equal a fresh recompute; every generated token is counted once."""
    from tiltsample.targets import tasks

    policy = tasks.load_policy()
    problem = tasks.held_out_problems(1)[0]
    prompt = tasks.problem_target(problem, policy).prompt
    target = tiltsample.power_target(policy, 4.0, prompt=prompt, max_new_tokens=40)
    alg = mh.entropy_cut_sampler(target, num_samples=6, num_steps=4, batching="continuous")
    gen = torch.Generator().manual_seed(0)
    state = alg.init(gen)
    regenerated = 0
    while not mh.done(state):
        state, info = alg.step(gen, state)
        regenerated += int(info.regenerated.sum())
    seqs = mh.record(state).sequences
    target.check_sequences(seqs)
    per = policy.sequence_logprob(prompt, seqs, per_token=True).to(torch.float64)
    for c, x in enumerate(seqs):
        assert torch.allclose(state.ell[c, : len(x)], per[c, : len(x)], atol=1e-4)
    out = mh.result(state)
    initial = out.cost.generated_tokens - regenerated
    assert 6 <= initial <= 6 * 40
    assert out.cost.model_calls > 0 and out.meta["batching"] == "continuous"
    again = tiltsample.sample(alg, target, 6, seed=1)
    assert again.sequences == tiltsample.sample(alg, target, 6, seed=1).sequences


@pytest.mark.parametrize("name", ["power", "entropy-cut", "qalign"])
@settings(max_examples=6, deadline=None)
@given(target=tabular_targets())
def test_conformance_on_random_targets(name: str, target: TiltedTarget) -> None:
    """Valid responses under both conventions (EOS-free policies included), reproducible, no
    global RNG, a Cost; ``run_chains`` keeps ``num_steps`` draws per chain."""
    factory = {
        "power": mh.power_sampler,
        "entropy-cut": mh.entropy_cut_sampler,
        "qalign": mh.qalign_sampler,
    }[name]
    params: dict[str, Any] = {"num_steps": 3, "batching": "continuous"}
    if name != "qalign":
        params["alpha"] = 2.0
    out = check_sampler(factory(target, num_samples=4, **params), target, num_samples=4)
    assert out.meta["batching"] == "continuous"
    trace = tiltsample.run_chains(factory(target, num_samples=2, **params), target, 2, seed=1)
    assert trace.num_draws == 3
    for chain in trace.sequences:
        target.check_sequences(chain, name="chain")
