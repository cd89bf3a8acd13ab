"""The MH samplers as implemented: conformance, per-move identities, cost, stages, and their laws.

Seed-free per-move checks first (the log-normaliser identity, max-swap, the QAlign shortcut, the
per-token arrays, cost counting), then seeded statistical tests: the law of the chains after ``k``
steps against the exact kernel (``tiltsample.theory.mh_kernels``) for every configuration, the
block-wise schedule against its exact output law, and long chains against the target with a TV
bound derived from their effective sample size. Thresholds are derived from the sample sizes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import tiltsample
from tiltsample import TiltedTarget
from tiltsample.samplers import mh
from tiltsample.samplers.mh import MHInfo, MHState, qalign_log_ratio
from tiltsample.targets.decision_trace import decision_trace
from tiltsample.targets.rewards import ConstraintReward, ContainsTokenReward
from tiltsample.targets.tabular import TabularPolicy, random_tabular
from tiltsample.targets.toys import power_example, tabular_toy
from tiltsample.testing import check_sampler
from tiltsample.testing.strategies import tabular_policies, tabular_targets
from tiltsample.theory import exact_distribution, tv
from tiltsample.theory.mh_kernels import (
    MHKernel,
    integrated_autocorrelation_time,
    law_after,
    mh_kernel,
    stage_schedule_law,
)
from tiltsample.types import Seq


@pytest.fixture(autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Run each test with one intra-op thread, then restore the setting.

    These tensors are tiny: a second thread only adds wake-up latency, which on a loaded 2-core
    machine made single tests 10x slower. The setting is restored after every test.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FACTORIES = {
    "mh": mh.sampler,
    "power": mh.power_sampler,
    "entropy-cut": mh.entropy_cut_sampler,
    "qalign": mh.qalign_sampler,
}
CONFORMANCE: dict[str, dict[str, Any]] = {
    "mh": {"num_steps": 4, "proposal_temperature": 0.7},
    "power": {"alpha": 2.0, "num_steps": 4},
    "entropy-cut": {"alpha": 2.0, "num_steps": 4, "cut_power": 2.0},
    "qalign": {"num_steps": 4},
}


def power_toy(
    seed: int = 1, vocab: int = 3, length: int = 4, alpha: float = 3.0, **kw: Any
) -> TiltedTarget:
    policy = random_tabular(torch.Generator().manual_seed(seed), vocab, length, concentration=0.8)
    return tiltsample.power_target(policy, alpha, max_new_tokens=length, **kw)


def eos_free_power_toy(length: int, alpha: float = 2.0) -> TiltedTarget:
    policy = random_tabular(torch.Generator().manual_seed(0), 3, length, eos_prob=0.0)
    return tiltsample.power_target(policy, alpha, max_new_tokens=length)


def chi_square_pvalue(counts: Counter[Seq], law: dict[Seq, float], n: int) -> float:
    """Pearson chi-square p-value; cells with expected count < 5 merged."""
    obs: list[float] = []
    exp: list[float] = []
    mo = me = 0.0
    for x in sorted(law, key=lambda x: law[x]):
        e = n * law[x]
        if e < 5.0:
            mo += counts.get(x, 0)
            me += e
        else:
            obs.append(counts.get(x, 0))
            exp.append(e)
    if me > 0:
        if me < 5.0 and exp:
            obs[0] += mo
            exp[0] += me
        else:
            obs.append(mo)
            exp.append(me)
    if len(obs) < 2:
        return 1.0
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def assert_draws_follow(draws: list[Seq], law: dict[Seq, float]) -> None:
    """Draws land only on the law's support and pass a chi-square test at level 1e-4."""
    counts = Counter(draws)
    outside = [x for x in counts if law.get(x, 0.0) <= 0.0]
    assert not outside, f"draws outside the exact law's support: {outside[:5]}"
    assert chi_square_pvalue(counts, law, len(draws)) > 1e-4


def run_steps(
    alg: tiltsample.SamplingAlgorithm, seed: int, steps: int
) -> list[tuple[list[Seq], MHState, MHInfo]]:
    """``steps`` steps of ``alg``; each entry is (states before the step, state after, info)."""
    gen = torch.Generator().manual_seed(seed)
    state = alg.init(gen)
    out = []
    for _ in range(steps):
        before = mh.record(state).sequences
        state, info = alg.step(gen, state)
        out.append((before, state, info))
    return out


def proposal_of(info: MHInfo, c: int) -> Seq:
    return tuple(info.proposal_tokens[c, : int(info.proposal_length[c])].tolist())


# ----------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("name", sorted(FACTORIES))
@settings(max_examples=8)
@given(target=tabular_targets())
def test_conformance_on_random_targets(name: str, target: TiltedTarget) -> None:
    """Valid responses under both conventions (EOS-free policies included), reproducible, no
    global RNG, a Cost; the whole trace of two chains is valid too."""
    params = CONFORMANCE[name]
    alg = FACTORIES[name](target, num_samples=4, **params)
    out = check_sampler(alg, target, num_samples=4)
    assert out.meta["failed"] == int(torch.isneginf(out.log_weights).sum())
    trace = tiltsample.run_chains(
        FACTORIES[name](target, num_samples=2, **params), target, 2, seed=1
    )
    assert trace.num_draws == params["num_steps"]
    for chain in trace.sequences:
        target.check_sequences(chain, name="chain")
    assert {"log_density", "accepted", "cut", "proposal_length", "length"} <= set(trace.stats)


def test_batching_modes_are_reproducible_and_differ_only_in_cost() -> None:
    target = power_toy()
    for batching in ("grouped", "aligned", "ragged", "auto"):
        alg = mh.power_sampler(target, num_samples=6, num_steps=5, batching=batching)
        check_sampler(alg, target, num_samples=6)
    grouped = tiltsample.sample(
        mh.power_sampler(target, num_samples=40, num_steps=20), target, 40, seed=0
    )
    aligned = tiltsample.sample(
        mh.power_sampler(target, num_samples=40, num_steps=20, batching="aligned"),
        target,
        40,
        seed=0,
    )
    assert aligned.cost.model_calls < grouped.cost.model_calls


def test_entropy_cut_is_mh_with_the_entropy_jump_law() -> None:
    target = power_toy(truncation="condition")
    a = tiltsample.sample(
        mh.entropy_cut_sampler(target, num_samples=8, num_steps=6), target, 8, seed=3
    )
    b = tiltsample.sample(
        mh.sampler(
            target, num_samples=8, num_steps=6, cut="entropy_jump", proposal_temperature=1 / 3
        ),
        target,
        8,
        seed=3,
    )
    assert a.sequences == b.sequences and a.cost == b.cost


# ----------------------------------------------------------------------------- per-move identities
def log_z(policy: TabularPolicy, prefix: Seq, alpha: float, support: str, k: int) -> float:
    row = policy.next_logprobs((), [prefix])[0]
    if support == "top_k":
        keep = torch.topk(row, min(k, row.numel())).indices
        row = row[keep]
    return float(torch.logsumexp(alpha * row, 0))


@pytest.mark.parametrize("support", ["full", "top_k"])
@pytest.mark.parametrize("batching", ["grouped", "aligned", "ragged"])
def test_log_normaliser_identity_on_every_move(support: str, batching: str) -> None:
    """Target + proposal terms = sum of log Z_t over the new suffix minus the old (§2.2)."""
    alpha, k = 3.0, 2
    for seed in (0, 1):
        target = power_toy(seed=seed, vocab=4, length=5, alpha=alpha)
        policy = target.policy
        assert isinstance(policy, TabularPolicy)
        alg = mh.power_sampler(
            target, num_samples=12, num_steps=10, support=support, top_k=k, batching=batching
        )
        moves = 0
        for before, _, info in run_steps(alg, seed, 10):
            for c, x in enumerate(before):
                j = int(info.cut[c])
                xp = proposal_of(info, c)
                assert xp[:j] == x[:j]
                want = sum(log_z(policy, xp[:t], alpha, support, k) for t in range(j, len(xp)))
                want -= sum(log_z(policy, x[:t], alpha, support, k) for t in range(j, len(x)))
                got = float(info.log_target_ratio[c] + info.log_proposal_ratio[c])
                assert got == pytest.approx(want, abs=1e-9)
                moves += 1
        assert moves == 120


def test_max_swap_accepts_iff_the_suffix_likelihood_increases() -> None:
    target = power_toy(seed=2)
    alg = mh.power_sampler(
        target, num_samples=10, num_steps=15, alpha=math.inf, proposal_temperature=0.6
    )
    accepted = 0
    for before, state, info in run_steps(alg, 0, 15):
        after = mh.record(state).sequences
        for c, x in enumerate(before):
            j = int(info.cut[c])
            xp = proposal_of(info, c)
            assert 0 <= j < len(x) and xp[:j] == x[:j]  # a cut inside x; the prefix is kept
            gain = float(target.log_reference([xp])[0] - target.log_reference([x])[0])
            assert bool(info.accepted[c]) == (gain > 1e-12)
            assert after[c] == (xp if bool(info.accepted[c]) else x)
            accepted += int(info.accepted[c])
    assert accepted > 0


def test_qalign_ratio_is_the_rewards_and_lengths_shortcut() -> None:
    """Under ``truncation="stop"`` QAlign's log A is ``Δ log_tilt + log(n/n')`` on every move;
    under ``"condition"`` the shortcut misses the forced EOS's ``p(EOS | x_<L)``."""
    for truncation in ("stop", "condition"):
        target = tabular_toy(vocab_size=3, max_len=4, lam=0.5, truncation=truncation)
        alg = mh.qalign_sampler(target, num_samples=16, num_steps=8)
        worst = 0.0
        for before, _, info in run_steps(alg, 1, 8):
            props = [proposal_of(info, c) for c in range(16)]
            short = qalign_log_ratio(
                target.log_tilt(before),
                target.log_tilt(props),
                torch.tensor([len(x) for x in before]),
                torch.tensor([len(x) for x in props]),
            )
            worst = max(worst, float((short - info.log_acceptance).abs().max()))
        if truncation == "stop":
            assert worst < 1e-12
        else:
            assert worst > 1e-3


def test_state_arrays_are_the_per_token_quantities() -> None:
    """``l``, ``g``, ``H`` of the state are log p, log q_tau and the entropy of every token."""
    target = power_toy(vocab=4, length=5, alpha=2.0, truncation="condition")
    alg = mh.power_sampler(target, num_samples=10, num_steps=6, cut="entropy_jump")
    state = run_steps(alg, 5, 6)[-1][1]
    seqs = mh.record(state).sequences
    per = target.policy.sequence_logprob((), seqs, per_token=True)
    for c, x in enumerate(seqs):
        n = len(x)
        assert int(state.length[c]) == n
        assert state.tokens[c, :n].tolist() == list(x)
        assert bool((state.tokens[c, n:] == target.eos_id).all())
        assert torch.allclose(state.ell[c, :n], per[c, :n], atol=1e-12)
        for arr in (state.ell, state.g, state.entropy):
            assert bool((arr[c, n:] == 0).all())
        for t in range(n):
            row = target.policy.next_logprobs((), [x[:t]])[0]
            p = torch.exp(row)
            h = float(-torch.where(p > 0, p * row, 0.0).sum())
            assert float(state.entropy[c, t]) == pytest.approx(h, abs=1e-12)
            forced = t == target.max_new_tokens - 1
            want_g = 0.0 if forced else float(torch.log_softmax(row * 2.0, 0)[x[t]])
            assert float(state.g[c, t]) == pytest.approx(want_g, abs=1e-12)
        assert float(state.log_reference[c]) == pytest.approx(float(per[c].sum()), abs=1e-12)


# ----------------------------------------------------------------------------- cost
def test_generated_tokens_are_the_regenerated_suffixes() -> None:
    target = power_toy(truncation="condition")
    alg = mh.power_sampler(target, num_samples=9, num_steps=12, cut="entropy_jump")
    for before, _, info in run_steps(alg, 0, 12):
        assert info.cost.generated_tokens == int(info.regenerated.sum())
        for c, x in enumerate(before):
            assert int(info.regenerated[c]) == int(info.proposal_length[c]) - int(info.cut[c])
            assert 0 <= int(info.cut[c]) < len(x)
    # a tilted target: one reward call per proposal per reward term
    toy = tabular_toy(vocab_size=3, max_len=4).tilt(ConstraintReward(lambda x: len(x) > 1))
    for _, _, info in run_steps(mh.qalign_sampler(toy, num_samples=7, num_steps=3), 0, 3):
        assert info.cost.reward_calls == 2 * 7


def test_uniform_cut_regenerates_half_the_length_on_average() -> None:
    """EOS-free states of length L: a uniform cut regenerates (L + 1)/2 tokens on average (§2.5),
    and grouped batching pushes exactly those tokens through the model (no prefix re-encoded);
    ragged batching decodes all chains in one batch (model calls = the longest suffix) without
    re-encoding a frozen prefix either."""
    length, chains, steps = 8, 64, 20
    target = eos_free_power_toy(length)
    grouped = run_steps(
        mh.power_sampler(target, num_samples=chains, num_steps=steps, batching="grouped"), 0, steps
    )
    regenerated = torch.cat([info.regenerated for _, _, info in grouped]).double()
    n = regenerated.numel()
    sd = math.sqrt((length**2 - 1) / 12)
    assert abs(float(regenerated.mean()) - (length + 1) / 2) < 4 * sd / math.sqrt(n)
    for _, _, info in grouped:
        assert info.cost.forward_tokens == info.cost.generated_tokens
    aligned = run_steps(
        mh.power_sampler(target, num_samples=chains, num_steps=steps, batching="aligned"), 0, steps
    )
    fwd_g = sum(info.cost.forward_tokens for _, _, info in grouped)
    fwd_a = sum(info.cost.forward_tokens for _, _, info in aligned)
    calls_g = sum(info.cost.model_calls for _, _, info in grouped)
    calls_a = sum(info.cost.model_calls for _, _, info in aligned)
    assert fwd_a > 1.5 * fwd_g  # the aligned batch re-feeds frozen prefixes ...
    assert calls_a * 4 < calls_g  # ... in far fewer model calls
    ragged = run_steps(mh.power_sampler(target, num_samples=chains, num_steps=steps), 0, steps)
    assert ragged[0][1].batching == "ragged"  # the default on a session with ragged rows
    for _, _, info in ragged:
        longest = int(info.regenerated.max())
        # one call per position of the longest suffix; each call pushes one token per row of
        # the decoding batch (the re-fed last kept token first, then the new ones), and
        # finished rows leave the batch once half of it has finished
        assert info.cost.model_calls == longest
        assert info.cost.generated_tokens <= info.cost.forward_tokens < chains * longest
    calls_r = sum(info.cost.model_calls for _, _, info in ragged)
    fwd_r = sum(info.cost.forward_tokens for _, _, info in ragged)
    assert calls_r * 4 < calls_g and fwd_r < fwd_a


def test_stage_schedule_cost_matches_the_formula() -> None:
    """E[generated] = T (initial block and extensions) + N sum_k (L_k + 1)/2 per chain (§2.5)."""
    length, block, steps, chains = 8, 2, 3, 200
    target = eos_free_power_toy(length)
    alg = mh.power_sampler(target, num_samples=chains, num_steps=steps, block_size=block)
    history = run_steps(alg, 0, alg.total_steps or 0)
    assert len(history) == 12 and alg.total_steps == 4 * steps
    per_chain = torch.zeros(chains, dtype=torch.float64)
    for _, _, info in history:
        per_chain += info.regenerated.double()
    caps = [2, 4, 6, 8]
    expected_mh = steps * sum((c + 1) / 2 for c in caps)
    sd = math.sqrt(steps * sum((c**2 - 1) / 12 for c in caps))
    assert abs(float(per_chain.mean()) - expected_mh) < 4 * sd / math.sqrt(chains)
    final = history[-1][1]
    assert final.cost.generated_tokens == int(per_chain.sum()) + chains * length


# ----------------------------------------------------------------------------- stages
def test_stage_schedule_structure_and_early_return() -> None:
    target = power_toy(seed=3, vocab=3, length=6, alpha=2.0)
    block = 2
    alg = mh.power_sampler(target, num_samples=30, num_steps=2, block_size=block)
    history = run_steps(alg, 0, alg.total_steps or 0)
    assert [info.stage for _, _, info in history] == [1, 1, 2, 2, 3, 3]
    finished: dict[int, Seq] = {}
    for before, state, info in history:
        for c in range(30):
            if c in finished:  # a finished chain never moves again
                assert not bool(info.moved[c]) and mh.record(state).sequences[c] == finished[c]
        if info.stage < 3:
            caps = {1: 2, 2: 4}[info.stage]
            assert all(len(x) <= caps for x in mh.record(state).sequences)
        for c in (~state.active).nonzero().flatten().tolist():
            x = mh.record(state).sequences[c]
            assert x[-1] == target.eos_id
            finished.setdefault(c, x)
        del before
    out = alg.result(history[-1][1])
    assert out.meta["stages"] == 3 and out.meta["failed"] == 0
    target.check_sequences(out.sequences)
    assert finished  # some chains returned early at an EOS


@pytest.mark.parametrize("batching", ["aligned", "ragged"])
def test_stage_schedule_matches_its_exact_law(batching: str) -> None:
    target = power_toy(seed=4, vocab=3, length=4, alpha=3.0)
    law = stage_schedule_law(target, block_size=2, num_steps=2, proposal_temperature=1 / 3)
    n = 3000
    alg = mh.power_sampler(target, num_samples=n, num_steps=2, block_size=2, batching=batching)
    out = tiltsample.sample(alg, target, n, seed=7)
    assert_draws_follow(out.sequences, law)


# ----------------------------------------------------------------------------- laws vs kernels
def _configs() -> list[tuple[str, TiltedTarget, dict[str, Any], dict[str, Any]]]:
    """(name, target, sampler params, kernel params)."""
    power = power_toy()
    cond = power_toy(truncation="condition")
    tilted = tabular_toy(vocab_size=3, max_len=4, lam=0.4).tilt(
        ConstraintReward(lambda x: not (len(x) > 1 and x[0] == 2))
    )
    third = 1 / 3
    return [
        ("power", power, {}, {"proposal_temperature": third}),
        (
            "entropy-condition",
            cond,
            {"cut": "entropy_jump", "cut_power": 2.0, "batching": "aligned"},
            {"cut": "entropy_jump", "cut_power": 2.0, "proposal_temperature": third},
        ),
        (
            "top-k",
            power,
            {"support": "top_k", "top_k": 2},
            {"support": "top_k", "top_k": 2, "proposal_temperature": third},
        ),
        (
            "reference",
            power,
            {"length_mode": "reference"},
            {"length_mode": "reference", "proposal_temperature": third},
        ),
        (
            "max-swap",
            power,
            {"alpha": math.inf, "proposal_temperature": 0.5},
            {"greedy": True, "proposal_temperature": 0.5},
        ),
        ("qalign", tilted, {"qalign": True, "batching": "aligned"}, {}),
        (
            "power-grouped",
            power,
            {"batching": "grouped"},
            {"proposal_temperature": third},
        ),
        (
            "entropy-condition-ragged",
            cond,
            {"cut": "entropy_jump", "cut_power": 2.0, "batching": "ragged"},
            {"cut": "entropy_jump", "cut_power": 2.0, "proposal_temperature": third},
        ),
    ]


@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in _configs()])
def test_k_step_law_matches_the_exact_kernel(case: int) -> None:
    """The chains' law after 2 steps from a q_tau draw is mu_0 P^2 of the exact kernel."""
    name, target, params, kernel_params = _configs()[case]
    n, steps = 3000, 2
    params = dict(params)
    if params.pop("qalign", False):
        alg = mh.qalign_sampler(target, num_samples=n, num_steps=steps, **params)
    else:
        alg = mh.power_sampler(target, num_samples=n, num_steps=steps, **params)
    kernel = mh_kernel(target, **kernel_params)
    law = kernel.as_dict(law_after(kernel, steps))
    out = tiltsample.sample(alg, target, n, seed=11 + case)
    assert_draws_follow(out.sequences, law)
    if name == "reference":  # the leak is visible in the output, not hidden
        leaked = sum(
            1 for x in out.sequences if x[-1] != target.eos_id and len(x) < target.max_new_tokens
        )
        assert out.meta["incomplete"] == leaked and out.meta["failed"] >= leaked


def test_one_step_from_a_fixed_state_is_the_kernel_row() -> None:
    target = power_toy(truncation="condition")
    kernel = mh_kernel(target, cut="entropy_jump", proposal_temperature=1 / 3)
    start = max(kernel.states, key=len)
    row = kernel.as_dict(kernel.matrix[kernel.index(start)])
    n = 3000
    alg = mh.power_sampler(
        target, num_samples=n, num_steps=1, cut="entropy_jump", initial=[start] * n
    )
    out = tiltsample.sample(alg, target, n, seed=2)
    assert out.cost.generated_tokens > 0
    assert_draws_follow(out.sequences, row)


def top_k_law(target: TiltedTarget, k: int, *, exempt_forced_eos: bool) -> dict[Seq, float]:
    """``pi`` restricted to responses whose tokens all lie in their prefix's top-``k`` set; with
    ``exempt_forced_eos`` the EOS that ``truncation="condition"`` forces at ``L - 1`` is not
    required to (it is not drawn)."""
    law = exact_distribution(target).as_dict()
    keep = {}
    for x, p in law.items():
        drawn = len(x)
        if exempt_forced_eos and target.truncation == "condition":
            drawn = min(drawn, target.max_new_tokens - 1)
        rows = target.policy.next_logprobs(target.prompt, [x[:t] for t in range(drawn)])
        if all(x[t] in torch.topk(rows[t], min(k, rows.shape[1])).indices for t in range(drawn)):
            keep[x] = p
    total = sum(keep.values())
    return {x: p / total for x, p in keep.items()}


def test_top_k_under_condition_exempts_the_forced_eos() -> None:
    """The documented law of ``support="top_k"`` with ``truncation="condition"``
    (docs/samplers/mcmc.md, "Support"): ``p^alpha`` restricted to responses whose *drawn* tokens
    lie in their top-k sets; the EOS forced at ``L - 1`` is the length convention, not a draw,
    and is exempt. The exact kernel's target is that law; chains started from it stay at it
    (chi-square), including the responses whose forced EOS is outside the top-k set (12% of the
    mass on this toy, so the strict restriction would fail the same test)."""
    policy = random_tabular(torch.Generator().manual_seed(9), 3, 4, concentration=1.0)
    target = tiltsample.power_target(policy, 2.0, max_new_tokens=4, truncation="condition")
    k = 2
    law = top_k_law(target, k, exempt_forced_eos=True)
    strict = top_k_law(target, k, exempt_forced_eos=False)
    kernel = mh_kernel(target, proposal_temperature=0.5, support="top_k", top_k=k)
    held = kernel.as_dict(kernel.target)
    assert max(abs(held.get(x, 0.0) - law.get(x, 0.0)) for x in set(held) | set(law)) < 1e-12
    outside = sum(p for x, p in law.items() if x not in strict)
    assert outside > 0.1
    n = 3000
    keys = list(law)
    probs = torch.tensor([law[x] for x in keys], dtype=torch.float64)
    idx = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(0))
    alg = mh.power_sampler(
        target,
        num_samples=n,
        num_steps=2,
        support="top_k",
        top_k=k,
        initial=[keys[i] for i in idx.tolist()],
    )
    out = tiltsample.sample(alg, target, n, seed=1)
    assert out.cost.generated_tokens > 0
    assert_draws_follow(out.sequences, law)
    seen = sum(1 for x in out.sequences if x not in strict) / n
    assert abs(seen - outside) < 4 * math.sqrt(outside * (1 - outside) / n)


def exact_expected_tv(kernel: MHKernel, draws: int) -> float:
    """Expected TV of ``draws`` stationary chain draws: sum_x sqrt(tau_x p(1-p) / (2 pi draws))."""
    total = 0.0
    for i, p in enumerate(kernel.target.tolist()):
        if 0 < p < 1:
            indicator = torch.zeros(len(kernel.states), dtype=torch.float64)
            indicator[i] = 1.0
            tau = integrated_autocorrelation_time(kernel, indicator)
            total += math.sqrt(tau * p * (1 - p) / (2 * math.pi * draws))
    return total


def test_long_chains_reach_the_target_within_their_ess() -> None:
    """TV(empirical law of the chains, pi) below 3x the noise floor of their effective sample
    size; pyro's ESS estimate agrees with the kernel's exact integrated autocorrelation."""
    target = power_toy(seed=6, vocab=3, length=4, alpha=2.0)
    pi = exact_distribution(target).as_dict()
    chains, steps, burn = 10, 1000, 100
    alg = mh.power_sampler(target, num_samples=chains, num_steps=steps, batching="aligned")
    trace = tiltsample.run_chains(alg, target, chains, seed=0)
    diag = trace.diagnostics(burn_in=burn)
    assert diag["log_density"]["rhat"] < 1.05
    assert 0.05 < diag["accepted"]["acceptance_rate"] < 1.0
    draws = chains * (steps - burn)
    kernel = mh_kernel(target, proposal_temperature=0.5)
    tau = integrated_autocorrelation_time(kernel, kernel.log_density.clamp(min=-1e3))
    ess = diag["log_density"]["ess"]
    assert 0.5 < ess / (draws / tau) < 2.0
    emp = trace.empirical(burn_in=burn)
    floor_ess = sum(math.sqrt(p * (1 - p) / (2 * math.pi * ess)) for p in pi.values())
    assert tv(emp, pi) < 3 * floor_ess
    assert tv(emp, pi) < 3 * exact_expected_tv(kernel, draws)


def test_decision_trace_chains_mix_as_the_closed_form_says() -> None:
    """Empirical P(B) after n steps vs the exact (1 - a - b)^n decay (uniform vs entropy cut)."""
    target = decision_trace(2, alpha=4.0)  # T = 6: uniform needs 68 steps, entropy cut 216
    n = 300
    for cut, steps in (("uniform", 25), ("entropy_jump", 25)):
        kernel = mh_kernel(target, cut=cut, proposal_temperature=0.25)
        law = law_after(kernel, steps)
        p_b = sum(p for x, p in zip(kernel.states, law.tolist(), strict=True) if x[0] == 2)
        alg = mh.power_sampler(target, num_samples=n, num_steps=steps, cut=cut, batching="aligned")
        out = tiltsample.sample(alg, target, n, seed=5)
        got = sum(1 for x in out.sequences if x[0] == 2) / n
        assert abs(got - p_b) < 4 * math.sqrt(p_b * (1 - p_b) / n)


# ----------------------------------------------------------------------------- diagnostics, input
def test_run_chains_reports_acceptance_ess_and_rhat() -> None:
    target = power_example(alpha=4.0)
    trace = tiltsample.run_chains(
        mh.power_sampler(target, num_samples=4, num_steps=40), target, 4, seed=0
    )
    diag = trace.diagnostics(burn_in=5)
    for key in ("ess", "rhat", "autocorr_lag1"):
        assert key in diag["log_density"]
    assert 0.0 < diag["accepted"]["acceptance_rate"] <= 1.0
    assert trace.stats["cut"].shape == (4, 40)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"cut": "entropy"}, ValueError, "cut must be one of"),
        ({"length_mode": "truncate"}, ValueError, "length_mode"),
        ({"support": "topk"}, ValueError, "support"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"num_steps": 0}, ValueError, "num_steps"),
        ({"proposal_temperature": 0.0}, ValueError, "proposal_temperature"),
        ({"cut_power": -1.0}, ValueError, "cut_power"),
        ({"batching": "zigzag"}, ValueError, "batching"),
        ({"num_steps": 2.5}, TypeError, "num_steps"),
    ],
)
def test_bad_parameters_name_themselves(
    params: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        mh.sampler(power_toy(), num_samples=2, **params)


def test_bad_targets_and_alpha_are_rejected() -> None:
    reward_target = tabular_toy(vocab_size=3, max_len=3)
    with pytest.raises(ValueError, match="alpha is required"):
        mh.power_sampler(reward_target, num_samples=2)
    with pytest.raises(ValueError, match="disagrees"):
        mh.power_sampler(power_toy(alpha=3.0), num_samples=2, alpha=2.0)
    with pytest.raises(ValueError, match="proposal_temperature"):
        mh.power_sampler(power_toy(), num_samples=2, alpha=math.inf)
    with pytest.raises(ValueError, match="block_size"):
        mh.sampler(reward_target, num_samples=2, block_size=2)
    with pytest.raises(ValueError, match="truncation='stop'"):
        mh.sampler(power_toy(truncation="condition"), num_samples=2, length_mode="reference")
    with pytest.raises(ValueError, match="initial"):
        mh.sampler(power_toy(), num_samples=2, initial=[(1, 0)])
    with pytest.raises(ValueError, match="initial"):
        alg = mh.sampler(power_toy(), num_samples=1, initial=[(1, 2)])  # not complete
        tiltsample.sample(alg, power_toy(), 1, seed=0)
    with pytest.raises(TypeError, match="TiltedTarget"):
        mh.sampler("power-example", num_samples=2)
    # a power target with alpha read from it sets tau = 1/alpha
    alg = mh.power_sampler(power_toy(alpha=4.0), num_samples=2)
    assert alg.params["alpha"] == 4.0 and alg.params["proposal_temperature"] == 0.25
    # alpha given for a reward-tilted target only sets the proposal temperature
    alg = mh.power_sampler(reward_target, num_samples=2, alpha=2.0)
    assert alg.params["proposal_temperature"] == 0.5


@settings(max_examples=6)
@given(
    policy=tabular_policies(vocab_sizes=(3, 4), max_lens=(2, 3)),
    truncation=st.sampled_from(("stop", "condition")),
)
def test_power_and_entropy_cut_on_random_power_targets(
    policy: TabularPolicy, truncation: Literal["stop", "condition"]
) -> None:
    if truncation == "condition" and bool(
        torch.isneginf(policy.next_logprobs((), [()])[0, policy.eos_id])
    ):
        truncation = "stop"
    target = tiltsample.power_target(
        policy, 2.0, max_new_tokens=policy.max_len, truncation=truncation
    )
    for factory in (mh.power_sampler, mh.entropy_cut_sampler):
        out = check_sampler(factory(target, num_samples=3, num_steps=3), target, num_samples=3)
        assert out.meta["power"] == 2.0
    staged = mh.power_sampler(target, num_samples=3, num_steps=1, block_size=1)
    check_sampler(staged, target, num_samples=3)


def test_composed_power_and_reward_target_is_sampled_exactly() -> None:
    """``p^2 · exp(r/lam)``: power sampling's proposal with a verifier-style reward on top."""
    policy = random_tabular(torch.Generator().manual_seed(5), 3, 4, concentration=0.7)
    target = tiltsample.power_target(policy, 2.0, max_new_tokens=4).tilt(
        ContainsTokenReward(1, 0), lam=0.5
    )
    n, steps = 3000, 2
    kernel = mh_kernel(target, proposal_temperature=0.5)
    law = kernel.as_dict(law_after(kernel, steps))
    out = tiltsample.sample(
        mh.power_sampler(target, num_samples=n, num_steps=steps, batching="aligned"),
        target,
        n,
        seed=4,
    )
    assert out.rewards is not None
    assert_draws_follow(out.sequences, law)


# ----------------------------------------------------------------------------- a real (tiny) LM
def test_power_sampling_on_the_embedded_language_model() -> None:
    """KV-cached sessions: after forks, selects and truncates the stored per-token log-probs still
    equal a fresh recompute, in both batching modes; responses are valid and costs add up."""
    from tiltsample.targets import tasks

    policy = tasks.load_policy()
    problem = tasks.held_out_problems(1)[0]
    prompt = tasks.problem_target(problem, policy).prompt
    target = tiltsample.power_target(policy, 4.0, prompt=prompt, max_new_tokens=40)
    for batching in ("grouped", "aligned", "ragged"):
        alg = mh.entropy_cut_sampler(target, num_samples=4, num_steps=3, batching=batching)
        history = run_steps(alg, 0, 3)
        state = history[-1][1]
        seqs = mh.record(state).sequences
        target.check_sequences(seqs)
        per = policy.sequence_logprob(prompt, seqs, per_token=True).to(torch.float64)
        for c, x in enumerate(seqs):
            assert torch.allclose(state.ell[c, : len(x)], per[c, : len(x)], atol=1e-4)
        generated = sum(info.cost.generated_tokens for _, _, info in history)
        assert generated == sum(int(info.regenerated.sum()) for _, _, info in history)
        assert state.cost.model_calls > 0
