"""MH chains of several targets (prompts, rewards) in one batch: each target keeps its own law.

Exact-law check on toys (the law of each target's chains after ``k`` steps is ``mu_0 P^k`` of
that target's own exact kernel, chi-square at level 1e-4), then the prompt routing and cost split
on a tiny random Qwen2 model, then the input checks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hf_toys import tiny_model
from test_mh_sampler import assert_draws_follow

import tiltsample
from tiltsample import TiltedTarget
from tiltsample.samplers import mh
from tiltsample.targets.hf import HFPolicy
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.theory.mh_kernels import law_after, mh_kernel

pytestmark = pytest.mark.usefixtures("serial_torch")


def reward_targets() -> list[TiltedTarget]:
    policy = random_tabular(torch.Generator().manual_seed(3), 3, 4, concentration=0.8)
    eos = policy.eos_id
    return [
        TiltedTarget(policy, ContainsTokenReward(1, eos), 0.5, prompt=(), max_new_tokens=4),
        TiltedTarget(policy, ContainsTokenReward(2, eos), 0.3, prompt=(1,), max_new_tokens=4),
    ]


@pytest.mark.parametrize("batching", ["ragged", "grouped", "aligned"])
def test_each_target_of_a_joint_run_follows_its_own_kernel(batching: str) -> None:
    targets = reward_targets()
    n, steps = 2000, 2
    outs = mh.sample_many(targets, n, seed=3, sampler="qalign", num_steps=steps, batching=batching)
    assert len(outs) == 2
    for target, out in zip(targets, outs, strict=True):
        assert len(out) == n and out.meta["batching"] == batching
        kernel = mh_kernel(target)  # QAlign: uniform cut, tau = 1
        law = kernel.as_dict(law_after(kernel, steps))
        assert_draws_follow(out.sequences, law)
        assert out.meta["joint_targets"] == 2
    # the laws differ (different rewards), so a swapped assignment would be caught
    a = mh_kernel(targets[0])
    b = mh_kernel(targets[1])
    law_a, law_b = a.as_dict(law_after(a, steps)), b.as_dict(law_after(b, steps))
    assert max(abs(law_a[x] - law_b.get(x, 0.0)) for x in law_a) > 0.05
    # cost split: generated tokens and reward calls per target add up to the joint run
    joint = outs[0].meta["joint_cost"]
    assert sum(o.cost.generated_tokens for o in outs) == joint.generated_tokens
    assert sum(o.cost.reward_calls for o in outs) == joint.reward_calls
    assert sum(o.cost.forward_tokens for o in outs) == joint.forward_tokens
    assert outs[0].cost.reward_calls == n * (steps + 1)  # one call per proposal and start


def test_joint_power_chains_keep_their_own_prompts_on_a_language_model() -> None:
    """Two power targets with different prompts in one batch on a tiny Qwen2: the stored
    per-token log-probs of every chain equal a recompute under *its own* prompt."""
    policy = HFPolicy(tiny_model(torch.float64, seed=1))
    prompts = [(2, 5, 3, 4), (6,)]
    targets = [tiltsample.power_target(policy, 3.0, prompt=p, max_new_tokens=10) for p in prompts]
    gen = torch.Generator().manual_seed(0)
    state = mh.init_many(
        targets, generator=gen, num_samples=3, num_steps=4, proposal_temperature=0.5
    )
    assert state.batching == "ragged"
    step = mh.build_kernel(num_steps=4, proposal_temperature=0.5)
    moved = 0
    while not mh.done(state):
        state, info = step(gen, state)
        moved += int(info.accepted.sum())
    assert moved > 0
    outs = mh.results(state)
    for i, (p, out) in enumerate(zip(prompts, outs, strict=True)):
        per = policy.sequence_logprob(p, out.sequences, per_token=True)
        other = policy.sequence_logprob(prompts[1 - i], out.sequences)
        assert out.log_reference is not None
        assert torch.allclose(out.log_reference, per.sum(dim=1), atol=1e-9)
        assert not torch.allclose(out.log_reference, other, atol=1e-3)
        targets[i].check_sequences(out.sequences)


def test_a_single_target_joint_run_is_the_plain_sampler() -> None:
    """One target through ``sample_many`` draws exactly what ``sample`` draws (same seed)."""
    target = reward_targets()[0]
    (joint,) = mh.sample_many([target], 40, seed=5, sampler="qalign", num_steps=3)
    alone = tiltsample.sample(
        mh.qalign_sampler(target, num_samples=40, num_steps=3), target, 40, seed=5
    )
    assert joint.sequences == alone.sequences
    assert joint.cost == alone.cost


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"max_new_tokens": 3}, "max_new_tokens"),
        ({"lam": None}, "reward"),
    ],
)
def test_joint_targets_must_share_their_structure(change: dict[str, Any], match: str) -> None:
    a, b = reward_targets()
    if "lam" in change:
        b = TiltedTarget(b.policy, None, 1.0, prompt=b.prompt, max_new_tokens=b.max_new_tokens)
    else:
        b = TiltedTarget(b.policy, b.reward, 0.3, prompt=b.prompt, **change)
    with pytest.raises(ValueError, match=match):
        mh.sample_many([a, b], 2, seed=0, sampler="qalign", num_steps=1)
    with pytest.raises(ValueError, match="seed"):
        mh.sample_many([a], 2, num_steps=1)
    other = random_tabular(torch.Generator().manual_seed(9), 3, 4)
    c = TiltedTarget(other, a.reward, 0.5, prompt=(), max_new_tokens=4)
    with pytest.raises(ValueError, match="policy"):
        mh.sample_many([a, c], 2, seed=0, sampler="qalign", num_steps=1)


@pytest.mark.parametrize("sampler", ["qalign", "power", "entropy-cut"])
def test_per_target_generators_give_each_target_its_alone_run(sampler: str) -> None:
    """``generators=`` (continuous batching): every target's chains, costs and generator state
    are bit-identical to that target run alone with its generator (tiltsample compare's cells)."""
    a, b = reward_targets()
    policy = a.policy
    targets = (
        [a, b, TiltedTarget(policy, ContainsTokenReward(1, policy.eos_id), 0.9, max_new_tokens=4)]
        if sampler == "qalign"
        else [tiltsample.power_target(policy, 3.0, prompt=p, max_new_tokens=4) for p in [(), (1,)]]
    )
    params: dict[str, Any] = {"num_steps": 5, "batching": "continuous"}
    gens = [torch.Generator().manual_seed(10 + i) for i in range(len(targets))]
    outs = mh.sample_many(targets, 3, generators=gens, sampler=sampler, **params)
    for i, (t, out) in enumerate(zip(targets, outs, strict=True)):
        g = torch.Generator().manual_seed(10 + i)
        alone = tiltsample.sample(sampler, t, 3, generator=g, progress=False, **params)
        assert out.sequences == alone.sequences
        assert torch.equal(out.log_weights, alone.log_weights)
        assert out.cost.generated_tokens == alone.cost.generated_tokens
        assert out.cost.reward_calls == alone.cost.reward_calls
        assert torch.equal(gens[i].get_state(), g.get_state())
    # the targets' draws differ (their own streams), so a shared stream would be caught
    assert outs[0].sequences != outs[1].sequences


def test_per_target_generators_are_checked() -> None:
    a, b = reward_targets()
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    with pytest.raises(ValueError, match="batching='continuous'"):
        mh.sample_many([a, b], 2, generators=gens, sampler="qalign", num_steps=1)
    with pytest.raises(ValueError, match="one per target"):
        mh.sample_many(
            [a, b], 2, generators=gens[:1], sampler="qalign", num_steps=1, batching="continuous"
        )
    with pytest.raises(ValueError, match="not both"):
        mh.sample_many([a, b], 2, seed=0, generators=gens, sampler="qalign", num_steps=1)


def test_per_target_generators_on_the_shipped_model_give_the_alone_tokens() -> None:
    """Three problems of arith-ar in one multi-prompt session: each problem's power chain draws
    the tokens of its alone run (log-densities to float32 precision of a batched forward)."""
    from tiltsample.targets import tasks

    policy = tasks.load_policy()
    targets = [
        tiltsample.power_target(policy, 4.0, p.prompt_ids(), tasks.MAX_NEW_TOKENS)
        for p in tasks.held_out_problems(3)
    ]
    params: dict[str, Any] = {"num_steps": 6, "batching": "continuous"}
    outs = mh.sample_many(
        targets,
        1,
        generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)],
        sampler="power",
        **params,
    )
    alone_calls = 0
    for s, t, out in zip((1, 2, 3), targets, outs, strict=True):
        g = torch.Generator().manual_seed(s)
        alone = tiltsample.sample("power", t, 1, generator=g, progress=False, **params)
        alone_calls += alone.cost.model_calls
        assert out.sequences == alone.sequences
        assert out.log_reference is not None and alone.log_reference is not None
        assert torch.allclose(out.log_reference, alone.log_reference, atol=1e-4)
        assert out.cost.generated_tokens == alone.cost.generated_tokens
    joint = outs[0].meta["joint_cost"]
    assert joint.model_calls < alone_calls  # the problems shared their model calls
