"""The masked-diffusion toy (targets.masked_diffusion) and the core protocol (tiltsample.diffusion).

Exact, seed-free checks first: the conditionals against brute-force marginalisation of the
joint, the exact output law of every unmasking rule against the joint (equal for rules that look
at the revealed tokens only and commit one position per step; different otherwise, as
``specs/ets.md`` §3 says), Chapman–Kolmogorov for ``completion_law``, the autoregressive joint.
Then seeded checks: the sampler's empirical law against the exact law (chi-square, tolerance from
the sample size), reproducibility, costs.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

import tiltsample
from tiltsample.diffusion import (
    MaskedDiffusionPolicy,
    check_states,
    denoise,
    initial_states,
    is_masked_diffusion,
    num_masked,
    states_to_seqs,
)
from tiltsample.targets.masked_diffusion import (
    ORDERS,
    MaskedDiffusionToy,
    masked_diffusion_toy,
    random_masked_diffusion,
)
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.theory import tv
from tiltsample.types import Seq


def toy(seed: int = 0, vocab: int = 3, length: int = 4, **kw: object) -> MaskedDiffusionToy:
    return random_masked_diffusion(torch.Generator().manual_seed(seed), vocab, length, 0.5, **kw)  # type: ignore[arg-type]


def sample_law(policy: MaskedDiffusionToy, n: int, seed: int) -> dict[Seq, int]:
    gen = torch.Generator().manual_seed(seed)
    out = denoise(policy, (), initial_states(policy, n), 0, policy.num_steps, gen)
    counts: dict[Seq, int] = {}
    for x in states_to_seqs(out.states, policy.eos_id, policy.mask_id):
        counts[x] = counts.get(x, 0) + 1
    return counts


def chi2_pvalue(counts: dict[Seq, int], law: dict[Seq, float]) -> float:
    keys = sorted(law)
    n = sum(counts.values())
    assert set(counts) <= set(keys), "the sampler produced a response outside the exact support"
    obs = [counts.get(k, 0) for k in keys]
    exp = [law[k] * n for k in keys]
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


# ----------------------------------------------------------------------------- protocol
def test_toy_implements_the_protocol_and_targets_accept_it() -> None:
    policy = toy()
    assert isinstance(policy, MaskedDiffusionPolicy)
    assert is_masked_diffusion(policy)
    assert (policy.vocab_size, policy.mask_id, policy.length, policy.num_steps) == (3, 3, 4, 4)
    target = tiltsample.TiltedTarget(policy, ContainsTokenReward(1, 0), 0.5, (), 4)  # type: ignore[arg-type]
    law = policy.output_law()
    xs = sorted(law)
    assert torch.allclose(
        target.log_reference(xs), torch.tensor([math.log(law[x]) for x in xs], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="length"):
        tiltsample.TiltedTarget(policy, None, 1.0, (), 3)  # type: ignore[arg-type]


def test_conditionals_are_exact_marginals_of_the_joint() -> None:
    policy = toy(3, vocab=3, length=3)
    joint = torch.exp(policy.log_joint)
    mask = policy.mask_id
    for state in itertools.product([0, 1, 2, mask], repeat=3):
        states = torch.tensor([state])
        got = torch.exp(policy.position_logprobs((), states)[0])
        consistent = torch.ones_like(joint, dtype=torch.bool)
        for j, t in enumerate(state):
            if t != mask:
                shape = [1, 1, 1]
                shape[j] = 3
                consistent = consistent & (torch.arange(3) == t).view(shape)
        sub = joint * consistent
        for j in range(3):
            dims = [d for d in range(3) if d != j]
            want = sub.sum(dim=dims) / sub.sum()
            assert torch.allclose(got[j], want, atol=1e-12), (state, j)


@pytest.mark.parametrize("order", ["fixed", "random", "max-confidence"])
def test_joint_preserving_rules_output_exactly_the_joint(order: str) -> None:
    for seed in range(3):
        policy = toy(seed, order=order, permutation=(2, 0, 3, 1) if order == "fixed" else None)
        law, joint = policy.output_law(), policy.joint_law()
        assert tv(law, joint) < 1e-12
        assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)


def test_drawn_confidence_and_parallel_commits_do_not_preserve_the_joint() -> None:
    policy = toy(1)
    for changed in (
        policy.with_schedule(order="drawn-confidence"),
        policy.with_schedule(order="max-confidence", num_steps=2),
        policy.with_schedule(order="fixed", num_steps=1),
    ):
        law = changed.output_law()
        assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
        assert tv(law, changed.joint_law()) > 0.01
    # all positions at once from the unconditional marginals: the product of the marginals
    one_step = policy.with_schedule(order="fixed", num_steps=1)
    marg = torch.exp(policy.position_logprobs((), initial_states(policy, 1))[0])
    for x, p in one_step.completion_law((policy.mask_id,) * 4, 0).items():
        want = math.prod(float(marg[j, v]) for j, v in enumerate(x))
        assert p == pytest.approx(math.log(want), abs=1e-12)


def test_completion_law_is_chapman_kolmogorov() -> None:
    policy = toy(2, order="drawn-confidence")
    root = (policy.mask_id,) * policy.length
    direct = policy.completion_law(root, 0)
    composed: dict[tuple[int, ...], float] = {}
    for child, lp in policy.transitions(root, 0):
        for z, lz in policy.completion_law(child, 1).items():
            composed[z] = composed.get(z, 0.0) + math.exp(lp + lz)
    assert set(composed) == set(direct)
    for z, p in composed.items():
        assert p == pytest.approx(math.exp(direct[z]), abs=1e-12)
    states = torch.tensor([list(root)] * 2)
    zs = sorted(direct)[:2]
    got = policy.completion_logprob((), states, 0, torch.tensor(zs))
    assert got.tolist() == pytest.approx([direct[z] for z in zs], abs=1e-12)


def test_from_policy_reproduces_the_autoregressive_law() -> None:
    ar = random_tabular(torch.Generator().manual_seed(4), 3, 4, concentration=0.7)
    from tiltsample.enumeration import enumerate_target

    enum = enumerate_target(tiltsample.reference_target(ar, (), 4))
    want = dict(zip(enum.support, torch.exp(enum.log_reference).tolist(), strict=True))
    for order in ("fixed", "max-confidence", "random"):
        dlm = MaskedDiffusionToy.from_policy(ar, 4, order=order)
        assert tv(dlm.output_law(), want) < 1e-12


def test_block_schedule_follows_the_llada_quota() -> None:
    policy = toy(0, vocab=2, length=6, num_steps=4, block_length=3)
    assert [policy.quota(s) for s in range(4)] == [2, 1, 2, 1]
    assert [list(policy.block(s)) for s in (0, 2)] == [[0, 1, 2], [3, 4, 5]]
    assert policy.committed_before(4) == 6
    gen = torch.Generator().manual_seed(0)
    states = initial_states(policy, 5)
    for s in range(4):
        states, cost = policy.denoise_step((), states, s, gen)
        assert cost.generated_tokens == 5 * policy.quota(s)
        if s < 2:
            assert bool((states[:, 3:] == policy.mask_id).all())
    assert int(num_masked(states, policy.mask_id).sum()) == 0


# ----------------------------------------------------------------------------- sampler vs law
@pytest.mark.parametrize("order", ORDERS)
def test_sampler_matches_its_exact_law(order: str) -> None:
    policy = toy(5, vocab=2, length=4, order=order, num_steps=2 if order == "random" else None)
    law = policy.output_law()
    counts = sample_law(policy, 4000, seed=11)
    assert chi2_pvalue(counts, law) > 1e-3


def test_denoise_is_reproducible_costed_and_leaves_global_rng_alone() -> None:
    policy = toy(1, order="random")
    rng = torch.get_rng_state()
    a = denoise(policy, (7, 7), initial_states(policy, 6), 0, 4, torch.Generator().manual_seed(3))
    b = denoise(policy, (7, 7), initial_states(policy, 6), 0, 4, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(a.states, b.states)
    assert a.row_passes == 24
    assert a.cost == tiltsample.Cost(generated_tokens=24, forward_tokens=24 * 6, model_calls=4)
    # complete rows are skipped (no forward pass)
    _, cost = policy.denoise_step((), a.states, 3, torch.Generator())
    assert cost == tiltsample.Cost()


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MaskedDiffusionToy(torch.zeros(3)), "from_flat"),
        (lambda: MaskedDiffusionToy(torch.zeros(2, 2)), "normalised"),
        (lambda: MaskedDiffusionToy(torch.full((2, 3), -math.log(6.0))), r"\[V\] \* L"),
        (lambda: toy(order="left-to-right"), "order"),
        (lambda: toy(num_steps=5), "num_steps"),
        (lambda: toy(block_length=3), "block_length"),
        (lambda: toy(num_steps=3, block_length=2), "multiple"),
        (lambda: toy(permutation=(0, 0, 1, 2)), "permutation"),
        (lambda: toy(eos_id=3), "eos_id"),
    ],
)
def test_bad_toy_input_is_rejected(build: object, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        build()  # type: ignore[operator]


def test_bad_states_and_steps_are_rejected() -> None:
    policy = toy()
    with pytest.raises(ValueError, match="shape"):
        check_states(policy, torch.zeros((2, 3), dtype=torch.long))
    with pytest.raises(ValueError, match="mask_id"):
        check_states(policy, torch.full((1, 4), 9))
    with pytest.raises(ValueError, match="step"):
        policy.denoise_step((), initial_states(policy, 1), 4, torch.Generator())
    with pytest.raises(ValueError, match="complete"):
        states_to_seqs(initial_states(policy, 1), policy.eos_id, policy.mask_id)
    with pytest.raises(ValueError, match="per_token"):
        policy.sequence_logprob((), [(1, 2, 1, 1)], per_token=True)


def test_toy_target_factory() -> None:
    target = masked_diffusion_toy(seed=1, order="drawn-confidence")
    assert target.max_new_tokens == 4 and is_masked_diffusion(target.policy)
    assert target.policy.order == "drawn-confidence"  # type: ignore[attr-defined]
