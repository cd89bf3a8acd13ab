"""The ETS sampler (tiltsample.samplers.ets): contract, exact identities, costs, laws, bad input.

Exact and seed-free (or seed-exact) checks first: ``I = 1`` is bit-identical to soft best-of-N,
``lam = ∞`` selects uniformly, ETS-IS with a copy of ``p_ref`` as proposal draws exactly what
ETS draws, the paper's token-count formula holds exactly, prefixes are never re-encoded. Then
seeded statistical checks of the sampler's output law against the exact law of
:mod:`tiltsample.theory.ets_laws` (chi-square; the tolerance comes from the sample size), for
plain ETS, tempered candidates under ``truncation="condition"``, ETS-IS with a perturbed
proposal, oracle energies and masked diffusion.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from scipy.stats import chisquare

import tiltsample
from tiltsample import TiltedTarget
from tiltsample.policy import DecodeSession, PrefixSession
from tiltsample.samplers import ets
from tiltsample.samplers.ets import DiffusionRolloutPotential, RolloutPotential
from tiltsample.target import Truncation
from tiltsample.targets.masked_diffusion import random_masked_diffusion
from tiltsample.targets.rewards import ConstraintReward, ContainsTokenReward, CountFractionReward
from tiltsample.targets.tabular import TabularPolicy, random_tabular
from tiltsample.testing import check_sampler
from tiltsample.testing.strategies import tabular_targets
from tiltsample.theory import ExactPotential, exact_distribution, exact_energies, tv
from tiltsample.theory.ets_laws import ets_law, rao_blackwell_law
from tiltsample.types import Seq


def ar_target(
    seed: int = 0,
    vocab: int = 3,
    length: int = 4,
    lam: float = 0.3,
    truncation: Truncation = "stop",
    eos_prob: float | None = None,
    prompt: Seq = (),
) -> TiltedTarget:
    policy = random_tabular(
        torch.Generator().manual_seed(seed), vocab, length, 0.7, eos_prob=eos_prob
    )
    return TiltedTarget(policy, ContainsTokenReward(1, 0), lam, prompt, length, truncation)


def dlm_target(seed: int = 0, order: str = "drawn-confidence") -> TiltedTarget:
    policy = random_masked_diffusion(torch.Generator().manual_seed(seed), 2, 4, 0.5, order=order)
    return TiltedTarget(policy, ContainsTokenReward(1, 0), 0.3, (), 4)  # type: ignore[arg-type]


def run(target: TiltedTarget, n: int, seed: int = 0, **params: Any) -> tiltsample.SampleSet:
    return tiltsample.sample(ets.sampler(target, num_samples=n, **params), target, n, seed=seed)


def perturbed(policy: TabularPolicy, seed: int, scale: float = 0.7) -> TabularPolicy:
    other = random_tabular(
        torch.Generator().manual_seed(seed), policy.vocab_size, policy.max_len, 1.0
    ).table
    rows = {}
    for k, row in policy.table.items():
        mix = torch.logaddexp(row + math.log(1 - scale), other[k] + math.log(scale))
        rows[k] = mix - torch.logsumexp(mix, 0)
    return TabularPolicy(policy.vocab_size, policy.eos_id, policy.max_len, rows)


def chi2_pvalue(samples: Sequence[Seq], law: dict[Seq, float]) -> float:
    """Pearson chi-square of the draws against an exact law (rare cells pooled)."""
    n = len(samples)
    counts: dict[Seq, int] = {}
    for x in samples:
        counts[x] = counts.get(x, 0) + 1
    assert set(counts) <= {k for k, p in law.items() if p > 0}, "a draw outside the support"
    keys = sorted(law, key=lambda k: -law[k])
    obs, exp = [], []
    rest_o, rest_e = 0, 0.0
    for k in keys:
        if law[k] * n >= 5:
            obs.append(counts.get(k, 0))
            exp.append(law[k] * n)
        else:
            rest_o += counts.get(k, 0)
            rest_e += law[k] * n
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


# ----------------------------------------------------------------------------- contract
@settings(max_examples=12)
@given(target=tabular_targets())
def test_conformance_on_random_targets(target: TiltedTarget) -> None:
    check_sampler(
        ets.sampler(target, num_samples=5, num_candidates=3, num_rollouts=2, block_size=1),
        target,
        num_samples=5,
    )
    check_sampler(
        ets.sampler(
            target,
            num_samples=4,
            num_candidates=2,
            num_rollouts=1,
            block_size=min(2, target.max_new_tokens),
            temperature=0.8,
            proposal=target.policy,
            proposal_temperature=1.3,
        ),
        target,
        num_samples=4,
    )


def test_conformance_on_masked_diffusion_and_with_an_oracle() -> None:
    target = dlm_target(1)
    check_sampler(
        ets.sampler(target, num_samples=4, num_candidates=3, num_rollouts=2, block_size=1),
        target,
        num_samples=4,
    )
    ar = ar_target(2)
    check_sampler(
        ets.sampler(ar, num_samples=4, num_candidates=3, potential=ExactPotential(ar)),
        ar,
        num_samples=4,
    )


def test_info_reports_the_selection_probabilities() -> None:
    target = ar_target(3, eos_prob=0.0)
    algo = ets.sampler(target, num_samples=5, num_candidates=4, num_rollouts=2, block_size=2)
    gen = torch.Generator().manual_seed(0)
    state = algo.init(gen)
    infos = []
    while not algo.done(state):
        state, info = algo.step(gen, state)
        infos.append(info)
    assert [i.guidance_step for i in infos] == [1, 2]
    for info in infos:
        assert info.selection_probs.shape == (5, 4)
        assert torch.allclose(info.selection_probs.sum(1), torch.ones(5, dtype=torch.float64))
        want = torch.softmax(info.log_weights, 1)
        assert torch.allclose(info.selection_probs, want, atol=1e-15)
    assert bool(infos[-1].complete.all()) and not bool(infos[0].complete.any())
    out = algo.result(state)
    sel = out.meta["selections"]
    assert len(sel) == 5 and all(len(s) == 2 for s in sel)
    for steps, x in zip(sel, out.sequences, strict=True):
        assert steps[-1].candidates[steps[-1].chosen] == x
        assert steps[1].candidates[0][:2] == steps[0].candidates[steps[0].chosen]


# ----------------------------------------------------------------------------- exact identities
@pytest.mark.parametrize("truncation", ["stop", "condition"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_guidance_step_is_soft_best_of_n_bit_for_bit(
    truncation: Truncation, temperature: float
) -> None:
    target = ar_target(4, truncation=truncation)
    a = run(target, 200, seed=4, num_candidates=5, block_size=4, temperature=temperature)
    b = tiltsample.sample(
        "best-of-n", target, 200, seed=4, num_candidates=5, temperature=temperature
    )
    assert a.sequences == b.sequences
    assert a.log_evidence == b.log_evidence
    # the same work, except that best-of-n's throw-away session drops its finished rows from the
    # model calls (decode_until_complete(drop_finished=True)); ETS's candidates keep theirs
    assert dataclasses.replace(a.cost, forward_tokens=0) == dataclasses.replace(
        b.cost, forward_tokens=0
    )
    assert b.cost.forward_tokens < a.cost.forward_tokens
    assert a.selections is not None and b.selections is not None
    for x, y in zip(a.selections, b.selections, strict=True):
        assert x.candidates == y.candidates and x.chosen == y.chosen
        assert torch.allclose(x.probs, y.probs, rtol=0.0, atol=1e-13)  # same law, summed
        # in another order: (log p − log q) + tilt vs log p + tilt − log q


def test_lam_infinity_selects_uniformly() -> None:
    for target in (ar_target(5).with_lam(math.inf), dlm_target(2).with_lam(math.inf)):
        algo = ets.sampler(target, num_samples=6, num_candidates=4, num_rollouts=2, block_size=1)
        gen = torch.Generator().manual_seed(1)
        state = algo.init(gen)
        while not algo.done(state):
            state, info = algo.step(gen, state)
            assert bool((info.selection_probs == 0.25).all())


def test_is_with_a_copy_of_p_ref_draws_exactly_what_ets_draws() -> None:
    target = ar_target(6, length=5)
    twin = TabularPolicy(3, 0, 5, target.policy.table)  # type: ignore[attr-defined]
    a = run(target, 50, seed=2, num_candidates=3, num_rollouts=2, block_size=2)
    b = run(target, 50, seed=2, num_candidates=3, num_rollouts=2, block_size=2, proposal=twin)
    assert a.sequences == b.sequences
    assert torch.equal(a.log_reference, b.log_reference)  # type: ignore[arg-type]
    assert b.cost.generated_tokens == a.cost.generated_tokens
    assert b.cost.forward_tokens > a.cost.forward_tokens  # p_ref also scores the rollouts


def test_tiny_lam_is_finite_and_matches_its_law() -> None:
    target = ar_target(7, length=3, lam=1e-3)
    n = 600
    out = run(target, n, seed=0, num_candidates=4, num_rollouts=2, block_size=1)
    assert out.log_evidence is not None and math.isfinite(out.log_evidence)
    assert not bool(torch.isnan(out.log_weights).any())
    law = ets_law(target, num_candidates=4, num_rollouts=2, block_size=1).law
    rewards = dict(zip(law, target.evaluate_tilt(list(law)).reward.tolist(), strict=True))  # type: ignore[union-attr]
    mean = sum(p * rewards[x] for x, p in law.items())
    ref = exact_distribution(target.with_lam(math.inf)).as_dict()
    ref_mean = sum(p * float(target.evaluate_tilt([x]).reward[0]) for x, p in ref.items())  # type: ignore[index]
    assert mean > ref_mean + 0.2  # the exact law of ETS at M = 4, K = 2 is far from p_ref
    assert out.rewards is not None
    assert abs(float(out.rewards.mean()) - mean) < 4 * math.sqrt(mean * (1 - mean) / n)


# ----------------------------------------------------------------------------- cost
@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_generated_tokens_follow_the_paper_formula_exactly(block: int) -> None:
    target = ar_target(8, length=8, eos_prob=0.0)
    m, k, n = 3, 2, 4
    out = run(target, n, seed=0, num_candidates=m, num_rollouts=k, block_size=block)
    steps = 8 // block
    assert out.cost.generated_tokens == n * m * (1 + k * (steps - 1) / 2) * 8
    assert out.meta["candidate_tokens"] == n * m * 8
    assert out.meta["rollouts"] == n * m * k * (steps - 1)
    # each generated token is pushed through the model at most once, plus one prompt prefill
    assert out.cost.forward_tokens <= out.cost.generated_tokens + 1
    assert out.cost.reward_calls == n * m * (1 + k * (steps - 1))


def test_masked_diffusion_cost_counts_denoiser_passes() -> None:
    target = dlm_target(3)
    m, k, n = 3, 2, 5
    for block in (1, 2, 4):
        out = run(target, n, seed=0, num_candidates=m, num_rollouts=k, block_size=block)
        steps = 4 // block
        want = n * m * (1 + k * (steps - 1) / 2) * 4
        assert out.meta["denoiser_passes"] == want
        assert out.cost.generated_tokens == want  # one position per denoising step
        assert out.cost.forward_tokens == want * 4


class CountingPolicy:
    """A tabular policy that counts every row it evaluates (one KV-cache position each)."""

    def __init__(self, policy: TabularPolicy) -> None:
        self.inner = policy
        self.rows = 0
        self.max_len = policy.max_len

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def eos_id(self) -> int:
        return self.inner.eos_id

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> torch.Tensor:
        self.rows += len(prefixes)
        return self.inner.next_logprobs(prompt, prefixes)

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Any:
        return self.inner.sequence_logprob(prompt, xs, per_token)

    def session(self, prompt: Seq, batch: int) -> DecodeSession:
        return PrefixSession(self, prompt, batch, accounting="cached")


def test_prefixes_are_never_re_encoded() -> None:
    base = random_tabular(torch.Generator().manual_seed(9), 3, 6, 0.7)
    policy = CountingPolicy(base)
    target = TiltedTarget(policy, ContainsTokenReward(1, 0), 0.5, (1, 2, 2), 6)
    n = 8
    out = run(target, n, seed=0, num_candidates=3, num_rollouts=3, block_size=2)
    # every evaluated row is the position after a generated token, or the prompt (once per
    # chain: the table policy does not share the prompt row between chains)
    assert policy.rows <= out.cost.generated_tokens + n
    # ETS-IS: the proposal pays for its rollouts and the teacher-forced blocks, p_ref for the
    # teacher-forced rollout tokens; still no prefix is encoded twice
    prop = CountingPolicy(perturbed(base, 3))
    policy.rows = 0
    out = run(target, n, seed=0, num_candidates=3, num_rollouts=3, block_size=2, proposal=prop)
    gen = out.cost.generated_tokens
    assert (
        policy.rows + prop.rows
        <= gen + out.meta["rollout_tokens"] + out.meta["candidate_tokens"] + 2 * n
    )


def test_complete_candidates_get_no_rollouts() -> None:
    table = {(): [0.5, 0.3, 0.2]}
    for a in (1, 2):
        table[(a,)] = [0.4, 0.3, 0.3]
        for b in (1, 2):
            table[(a, b)] = [0.4, 0.3, 0.3]
    policy = TabularPolicy.from_probs(3, 0, 3, table)
    target = TiltedTarget(policy, ContainsTokenReward(1, 0), 0.5, (), 3)
    out = run(target, 30, seed=0, num_candidates=4, num_rollouts=3, block_size=1)
    incomplete = sum(
        1
        for steps in out.meta["selections"]
        for sel in steps
        for c in sel.candidates
        if not target.is_complete(c)
    )
    assert out.meta["rollouts"] == 3 * incomplete
    for steps in out.meta["selections"]:
        for sel in steps:
            for c in sel.candidates:
                assert 0 not in c[:-1]  # nothing past EOS is ever scored or kept


# ----------------------------------------------------------------------------- laws (seeded)
N_LAW = 3000
LAW_CASES: list[tuple[str, dict[str, Any]]] = [
    ("rollouts K=1", {"num_candidates": 4, "num_rollouts": 1, "block_size": 1}),
    ("rollouts K=2, B=2", {"num_candidates": 3, "num_rollouts": 2, "block_size": 2}),
    (
        "condition + temperature",
        {
            "num_candidates": 3,
            "num_rollouts": 2,
            "block_size": 1,
            "temperature": 0.7,
            "truncation": "condition",
        },
    ),
    (
        "IS perturbed",
        {"num_candidates": 3, "num_rollouts": 2, "block_size": 1, "proposal": "perturbed"},
    ),
    ("oracle energies", {"num_candidates": 3, "block_size": 1, "energies": "exact"}),
]


@pytest.mark.parametrize(("name", "case"), LAW_CASES, ids=[c[0] for c in LAW_CASES])
def test_sampler_law_matches_the_exact_ets_law(name: str, case: dict[str, Any]) -> None:
    params = dict(case)
    truncation = params.pop("truncation", "stop")
    target = ar_target(10, vocab=3, length=3, lam=0.3, truncation=truncation)
    if params.get("proposal") == "perturbed":
        params["proposal"] = perturbed(target.policy, 4)  # type: ignore[arg-type]
    law_params = dict(params)
    if params.pop("energies", None) == "exact":
        params["potential"] = ExactPotential(target)
    exact = ets_law(target, **law_params).law
    out = run(target, N_LAW, seed=12, **params)
    assert chi2_pvalue(out.sequences, exact) > 1e-3
    # the Rao–Blackwellised estimate is unbiased for the same law
    rb = rao_blackwell_law(out, target)
    floor = sum(math.sqrt(p * (1 - p) / (2 * math.pi * N_LAW)) for p in exact.values())
    assert tv(rb, exact) < 2.5 * floor


@pytest.mark.parametrize("order", ["max-confidence", "drawn-confidence"])
def test_masked_diffusion_sampler_law_matches_the_exact_ets_law(order: str) -> None:
    target = dlm_target(4, order)
    proposal = target.policy.tempered(0.7)  # type: ignore[attr-defined]
    params = (
        {"num_candidates": 3, "num_rollouts": 1, "block_size": 2}
        if order == "max-confidence"
        else {"num_candidates": 3, "num_rollouts": 2, "block_size": 1, "proposal": proposal}
    )
    exact = ets_law(target, **params).law  # type: ignore[arg-type]
    out = run(target, 2000, seed=13, **params)
    assert chi2_pvalue(out.sequences, exact) > 1e-3


# ----------------------------------------------------------------------------- potentials
def test_rollout_potential_is_unbiased() -> None:
    target = ar_target(12, vocab=3, length=4, lam=0.5, truncation="condition")
    energies = exact_energies(target)
    prefixes: list[Seq] = [(), (1,), (2, 1), (1, 2, 2), (2, 2, 0)]
    prop = perturbed(target.policy, 6)  # type: ignore[arg-type]
    for potential in (
        RolloutPotential(target, 4),
        RolloutPotential(target, 2, proposal=prop, proposal_temperature=1.2),
    ):
        reps = 600
        gen = torch.Generator().manual_seed(0)
        values, cost = potential.log_potential((), prefixes * reps, gen)
        ratio = torch.exp(values.view(reps, -1) - energies.log_energies(prefixes)[None, :])
        mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(reps)
        assert bool(((mean - 1).abs() <= 4 * se + 1e-12).all()), (mean, se)
        assert bool((ratio[:, -1] == 1).all())  # a complete prefix is scored exactly
        assert cost.generated_tokens > 0


def test_diffusion_rollout_potential_is_unbiased() -> None:
    target = dlm_target(5)
    policy: Any = target.policy
    potential = DiffusionRolloutPotential(target, 2, proposal=policy.tempered(0.8))
    state = torch.tensor([[policy.mask_id, 1, policy.mask_id, policy.mask_id]])
    # after one step of drawn-confidence decoding from the all-masked state
    step = 1
    law = policy.completion_law(tuple(state[0].tolist()), step)
    tilt = target.log_tilt([policy.to_seq(z) for z in law])
    exact = math.log(sum(math.exp(lp + float(t)) for lp, t in zip(law.values(), tilt, strict=True)))
    reps = 2000
    values, _ = potential.log_potential_states((), state.repeat(reps, 1), step, torch.Generator())
    ratio = torch.exp(values - exact)
    assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(reps)


def test_beam_search_accepts_the_rollout_potential() -> None:
    from tiltsample.diffusion import StatePotential

    target = ar_target(13, length=3)
    assert isinstance(RolloutPotential(target, 2), tiltsample.PrefixPotential)
    assert isinstance(DiffusionRolloutPotential(dlm_target(), 2), StatePotential)
    out = tiltsample.sample(
        "beam", target, 1, seed=0, num_beams=2, potential=RolloutPotential(target, 2)
    )
    target.check_sequences(out.sequences)
    assert out.cost.generated_tokens > 0


# ----------------------------------------------------------------------------- reward modes
def test_self_consistency_cache_grows_and_is_reproducible() -> None:
    target = ar_target(14, length=4, eos_prob=0.0)
    params = {
        "num_candidates": 3,
        "num_rollouts": 2,
        "block_size": 2,
        "reward_mode": "self-consistency",
        "answer": "last-token",
    }
    a = run(target, 6, seed=3, **params)
    b = run(target, 6, seed=3, **params)
    assert a.sequences == b.sequences and a.meta["answer_caches"] == b.meta["answer_caches"]
    for cache in a.meta["answer_caches"]:
        # every completion voted: M·K rollouts at step 1 and M complete candidates at step 2
        assert cache["total"] == 3 * 2 + 3
    assert a.log_evidence is None
    assert a.rewards is not None and set(a.rewards.tolist()) <= {0.0, 1.0}
    vote = run(target, 6, seed=3, output="vote", **params)
    for x, cache in zip(vote.sequences, vote.meta["answer_caches"], strict=True):
        top = max(c for _, c in cache["counts"])
        first_top = next(ans for ans, c in cache["counts"] if c == top)
        assert x[-1] == first_top  # the first completion with the majority answer


def test_self_consistency_reward_target_supplies_the_extractor() -> None:
    from tiltsample.targets.rewards import SelfConsistencyReward

    base = ar_target(19, length=3, eos_prob=0.0)

    def extract(x: Seq) -> str | None:
        return str(x[-1]) if x else None

    target = TiltedTarget(base.policy, SelfConsistencyReward(extract), 0.3, (), 3)
    out = run(
        target,
        4,
        seed=0,
        num_candidates=2,
        num_rollouts=2,
        block_size=1,
        reward_mode="self-consistency",
    )
    for cache in out.meta["answer_caches"]:
        assert all(isinstance(a, str) for a, _ in cache["counts"])
    with pytest.raises(ValueError, match="answer"):
        ets.sampler(base, num_samples=2, reward_mode="self-consistency")


def test_answer_cache_breaks_ties_by_first_appearance() -> None:
    cache = ets.AnswerCache.empty().added(["b", "a", None], [(1,), (2,), (3,)])
    assert cache.majority() == ("b", 1)
    assert cache.majority(["a"]) == ("a", 2)
    assert cache.majority(["c", "c"]) == ("c", 2)
    assert cache.first == {"b": (1,), "a": (2,)} and cache.total == 2


def test_self_consistency_zero_if_unique_option() -> None:
    target = ar_target(15, length=2, eos_prob=0.0)
    out = run(
        target,
        20,
        seed=0,
        num_candidates=2,
        num_rollouts=1,
        block_size=2,
        reward_mode="self-consistency",
        answer=lambda x: x,  # every completion is its own answer: top count 1 unless repeated
        sc_zero_if_unique=True,
    )
    for r, cache in zip(out.rewards.tolist(), out.meta["answer_caches"], strict=True):  # type: ignore[union-attr]
        if max(c for _, c in cache["counts"]) == 1:
            assert r == 0.0


def test_clipping_flag_is_reported() -> None:
    target = ar_target(16, length=4)
    prop = perturbed(target.policy, 2, scale=0.95)  # type: ignore[arg-type]
    out = run(
        target,
        20,
        seed=0,
        num_candidates=3,
        num_rollouts=2,
        block_size=1,
        proposal=prop,
        is_log_ratio_clip=0.1,
    )
    assert 0.0 < out.meta["clipped_fraction"] <= 1.0
    plain = run(target, 20, seed=0, num_candidates=3, num_rollouts=2, block_size=1, proposal=prop)
    assert plain.meta["clipped_fraction"] == 0.0


def test_failed_draws_are_marked() -> None:
    target = ar_target(17, length=3).tilt(ConstraintReward(lambda x: False))
    out = run(target, 4, seed=0, num_candidates=2, num_rollouts=1, block_size=1)
    assert out.meta["failed"] == 4 and out.meta["failed_at"] == [1, 1, 1, 1]
    assert bool(torch.isneginf(out.log_weights).all())
    target.check_sequences(out.sequences)


def test_batches_split_the_chains() -> None:
    target = ar_target(18)
    out = run(target, 7, seed=0, num_candidates=2, num_rollouts=1, block_size=2, batch_size=3)
    assert len(out) == 7 and len(out.meta["selections"]) == 7
    assert out.meta["num_proposals"] == 14


# ----------------------------------------------------------------------------- bad input
POLICY = random_tabular(torch.Generator().manual_seed(0), 3, 4)
TARGET = TiltedTarget(POLICY, CountFractionReward(1, 0), 0.5, (), 4)
OTHER_VOCAB = random_tabular(torch.Generator().manual_seed(1), 4, 4)
OTHER_EOS = random_tabular(torch.Generator().manual_seed(1), 3, 4, eos_id=2)
DLM = dlm_target(0)

BAD: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("M = 0", {"num_candidates": 0}, ValueError, "num_candidates"),
    ("M float", {"num_candidates": 2.5}, TypeError, "num_candidates"),
    ("K = 0", {"num_rollouts": 0}, ValueError, "num_rollouts"),
    ("B = 0", {"block_size": 0}, ValueError, "block_size"),
    ("B > d", {"block_size": 5}, ValueError, "max_new_tokens=4"),
    ("proposal vocabulary", {"proposal": OTHER_VOCAB}, ValueError, "vocab_size"),
    ("proposal eos", {"proposal": OTHER_EOS}, ValueError, "eos_id"),
    ("proposal kind", {"proposal": DLM.policy}, TypeError, "ReferencePolicy"),
    ("temperature", {"temperature": 0.0}, ValueError, "temperature"),
    ("clip", {"is_log_ratio_clip": -1.0}, ValueError, "is_log_ratio_clip"),
    (
        "potential and K",
        {"potential": ExactPotential(TARGET), "num_rollouts": 2},
        ValueError,
        "potential",
    ),
    ("potential type", {"potential": object()}, TypeError, "potential"),
    ("reward mode", {"reward_mode": "majority"}, ValueError, "reward_mode"),
    ("sc without answer", {"reward_mode": "self-consistency"}, ValueError, "answer"),
    ("bad answer", {"reward_mode": "self-consistency", "answer": "last"}, ValueError, "answer"),
    ("vote without sc", {"output": "vote"}, ValueError, "self-consistency"),
    ("reward range order", {"reward_range": (1.0, 0.0)}, ValueError, "reward_range"),
    ("reward range type", {"reward_range": 3}, TypeError, "reward_range"),
    ("num_samples", {"num_samples": 0}, ValueError, "num_samples"),
]


@pytest.mark.parametrize(("name", "params", "exc", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_fails_early(
    name: str, params: dict[str, Any], exc: type[Exception], match: str
) -> None:
    kwargs: dict[str, Any] = {"num_samples": 2, **params}
    with pytest.raises(exc, match=match):
        ets.sampler(TARGET, **kwargs)


def test_bad_masked_diffusion_input() -> None:
    with pytest.raises(ValueError, match="num_steps=4"):
        ets.sampler(DLM, num_samples=2, block_size=5)
    with pytest.raises(ValueError, match="temperature"):
        ets.sampler(DLM, num_samples=2, temperature=0.5)
    cond = TiltedTarget(DLM.policy, DLM.reward, 0.3, (), 4, "condition")
    with pytest.raises(ValueError, match="truncation"):
        ets.sampler(cond, num_samples=2)
    with pytest.raises(TypeError, match="log_potential_states"):
        ets.sampler(DLM, num_samples=2, potential=ExactPotential(TARGET))

    class NoRatio:
        vocab_size, eos_id, mask_id, length, num_steps = 2, 0, 2, 4, 4
        position_logprobs = denoise_step = None

    with pytest.raises(ValueError, match="completion_logprob"):
        ets.sampler(DLM, num_samples=2, proposal=NoRatio())


def test_reward_outside_the_declared_range_is_an_error() -> None:
    target = TiltedTarget(POLICY, lambda p, xs: torch.full((len(xs),), 2.0), 0.5, (), 4)
    with pytest.raises(ValueError, match="reward_range"):
        run(target, 2, num_candidates=2, num_rollouts=1, reward_range=(0.0, 1.0))
    run(target, 2, num_candidates=2, num_rollouts=1, reward_range=(0.0, 2.0))


# ----------------------------------------------------------------------------- CLI
def test_cli_runs_ets_on_toy_targets() -> None:
    code = (
        "from tiltsample import registry\n"
        "registry.register_sampler('ets', 'tiltsample.samplers.ets:sampler', 'ETS')\n"
        "registry.register_target('masked-diffusion', "
        "'tiltsample.targets.masked_diffusion:masked_diffusion_toy', 'toy')\n"
        "from tiltsample.app.cli import main\n"
        "args = ['sample', 'ets', '-n', '200', '--no-progress', '-p', 'num_candidates=4', "
        "'-p', 'num_rollouts=2', '-p', 'block_size=2', '--target-opt', 'max_len=4']\n"
        "assert main(args) == 0\n"
        "assert main(['sample', 'ets', '--target', 'masked-diffusion', '-n', '50', "
        "'--no-progress', '--no-exact', '-p', 'block_size=1']) == 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "tv_to_target" in proc.stdout and "ets" in proc.stdout
