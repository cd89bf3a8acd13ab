"""Core vocabulary: Cost, resampling schemes, diagnostics, sessions, results."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tiltsample
from tiltsample import diagnostics, resampling
from tiltsample.policy import PrefixSession, open_session, sequence_logprob_from_next
from tiltsample.results import SampleSet
from tiltsample.targets.decision_trace import DecisionTracePolicy
from tiltsample.targets.tabular import random_tabular
from tiltsample.testing import check_policy, check_sampler
from tiltsample.testing.strategies import tabular_policies
from tiltsample.types import Cost, Seq


def test_cost_adds_elementwise_and_rejects_negatives() -> None:
    total = Cost(1, 2, 3, 4) + Cost(10, 20, 30, 40)
    assert total == Cost(11, 22, 33, 44)
    assert total.as_dict()["model_calls"] == 33
    with pytest.raises(ValueError, match="forward_tokens"):
        Cost(forward_tokens=-1)


# ---------------------------------------------------------------- resampling (exact properties)
@pytest.mark.parametrize("scheme", sorted(resampling.SCHEMES))
@given(
    w=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=12).filter(lambda v: sum(v) > 1e-6),
    n=st.integers(1, 40),
    seed=st.integers(0, 1000),
)
def test_resampling_indices_are_valid(scheme: str, w: list[float], n: int, seed: int) -> None:
    weights = torch.tensor(w, dtype=torch.float64)
    idx = resampling.resample_indices(scheme, torch.Generator().manual_seed(seed), weights, n)
    assert idx.shape == (n,) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < len(w)
    assert bool((weights[idx] > 0).all()), "a zero-weight particle was selected"
    counts = torch.bincount(idx, minlength=len(w))
    if scheme in ("systematic", "residual", "stratified"):
        floor = torch.floor(n * weights / weights.sum()).long()
        if scheme != "stratified":
            assert bool((counts >= floor).all()), "fewer than floor(n W) copies"
        assert bool((counts <= floor + (2 if scheme == "stratified" else 1)).all()) or (
            scheme == "residual"
        )


@pytest.mark.parametrize("scheme", sorted(resampling.SCHEMES))
def test_resampling_is_unbiased_and_low_variance(scheme: str) -> None:
    # E[counts] = n W within a tolerance from the count variance over R repetitions
    w = torch.tensor([0.05, 0.3, 0.15, 0.5], dtype=torch.float64)
    n, reps = 7, 4000
    gen = torch.Generator().manual_seed(1)
    counts = torch.stack(
        [torch.bincount(resampling.SCHEMES[scheme](gen, w, n), minlength=4) for _ in range(reps)]
    ).double()
    mean, var = counts.mean(0), counts.var(0)
    se = torch.sqrt(var / reps).clamp(min=1e-3)
    assert bool(((mean - n * w).abs() <= 4.5 * se + 1e-9).all()), (mean, n * w)
    multinomial_var = n * w * (1 - w)
    if scheme in ("stratified", "residual", "systematic"):
        assert bool((var <= multinomial_var * 1.1 + 1e-9).all())


def test_resampling_rejects_bad_weights() -> None:
    gen = torch.Generator()
    with pytest.raises(ValueError, match="non-negative"):
        resampling.systematic(gen, torch.tensor([0.5, -0.1]), 3)
    with pytest.raises(ValueError, match="all be zero"):
        resampling.systematic(gen, torch.tensor([0.0, 0.0]), 3)
    with pytest.raises(ValueError, match="scheme"):
        resampling.resample_indices("sistematic", gen, torch.tensor([1.0]), 1)


# ---------------------------------------------------------------- diagnostics
def test_ess_extremes() -> None:
    assert diagnostics.ess(torch.zeros(10)) == pytest.approx(10.0)
    assert diagnostics.ess(torch.tensor([0.0, -math.inf, -math.inf])) == pytest.approx(1.0)
    assert diagnostics.ess(torch.tensor([-math.inf, -math.inf])) == 0.0
    # lam = 1e-3 scale log-weights do not overflow
    assert diagnostics.ess(torch.tensor([1000.0, 1000.0, 0.0])) == pytest.approx(2.0)


def test_pareto_khat_separates_light_and_heavy_tails() -> None:
    gen = torch.Generator().manual_seed(0)
    light = torch.randn(4000, generator=gen, dtype=torch.float64) * 0.3
    u = torch.rand(4000, generator=gen, dtype=torch.float64)
    heavy = -1.2 * torch.log(u)  # weights Pareto with shape 1.2 > 0.7
    assert diagnostics.pareto_khat(light) < 0.5
    assert diagnostics.pareto_khat(heavy) > 0.7


def test_chain_diagnostics_detect_non_mixing() -> None:
    gen = torch.Generator().manual_seed(0)
    good = torch.randn(4, 500, generator=gen, dtype=torch.float64)
    bad = good + torch.tensor([0.0, 0.0, 5.0, 5.0], dtype=torch.float64)[:, None]
    out = diagnostics.chain_diagnostics({"good": good, "bad": bad, "accepted": good > 0})
    assert out["good"]["rhat"] < 1.01
    assert out["bad"]["rhat"] > 1.5
    assert out["good"]["ess"] > 1000
    assert 0.4 < out["accepted"]["acceptance_rate"] < 0.6


# ---------------------------------------------------------------- policies and sessions
@given(policy=tabular_policies())
def test_tabular_policies_honour_the_policy_contract(policy: object) -> None:
    check_policy(policy, max_len=policy.max_len)  # type: ignore[arg-type, attr-defined]


def test_decision_trace_honours_the_policy_contract() -> None:
    check_policy(DecisionTracePolicy(3, filler_noise=0.1), max_len=8)


class UserPolicy:
    """A policy written by a user: plain attributes, no project base class, no session."""

    vocab_size = 3
    eos_id = 2

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> torch.Tensor:
        rows = []
        for p in prefixes:
            ones = sum(1 for t in p if t == 1)
            logits = torch.tensor([0.0, 0.5 * ones, -0.5 + 0.2 * len(p)], dtype=torch.float64)
            rows.append(torch.log_softmax(logits, 0))
        return torch.stack(rows) if rows else torch.zeros((0, 3), dtype=torch.float64)

    def sequence_logprob(
        self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False
    ) -> torch.Tensor:
        return sequence_logprob_from_next(self, prompt, xs, per_token)


def test_a_users_own_policy_works_everywhere() -> None:
    policy = UserPolicy()
    assert isinstance(policy, tiltsample.ReferencePolicy)
    check_policy(policy, max_len=4)
    assert isinstance(open_session(policy, (), 2), PrefixSession)
    reward = lambda prompt, xs: torch.tensor([float(1 in x) for x in xs])  # noqa: E731
    target = tiltsample.TiltedTarget(policy, reward, lam=0.5, max_new_tokens=4)
    for name, params in [
        ("ancestral", {}),
        ("best-of-n", {"num_candidates": 3}),
        ("importance", {}),
        ("exact", {}),
        ("imh", {"num_steps": 3}),
        ("beam", {"num_beams": 3}),
    ]:
        check_sampler(name, target, num_samples=3 if name != "beam" else 2, **params)


def test_recompute_session_counts_full_prefixes_and_cached_counts_once() -> None:
    policy = random_tabular(torch.Generator().manual_seed(0), 3, 4, eos_prob=0.0)
    prompt = (1, 1, 1)
    recompute = PrefixSession(policy, prompt, 2, accounting="recompute")
    cached = PrefixSession(policy, prompt, 2, accounting="cached")
    for s in (recompute, cached):
        s.logprobs()
        s.extend(torch.tensor([1, 2]))
        s.logprobs()
        s.extend(torch.tensor([1, 1]))
        s.logprobs()
    # recompute: 2 rows x (3 + 0), (3 + 1), (3 + 2) tokens
    assert recompute.cost == Cost(forward_tokens=2 * (3 + 4 + 5), model_calls=3)
    # cached: the prompt once, then one token per row per extend
    assert cached.cost == Cost(forward_tokens=3 + 2 + 2, model_calls=3)
    twin = cached.fork()
    assert twin.cost == Cost()
    cached.select(torch.tensor([0, 0, 1]))
    cached.extend(torch.tensor([1, 1, 1]))
    cached.logprobs()
    assert cached.cost.forward_tokens == 3 + 2 + 2 + 3


def test_sessions_pad_finished_rows_with_eos() -> None:
    policy = random_tabular(torch.Generator().manual_seed(0), 3, 4)
    s = open_session(policy, (), 2)
    s.extend(torch.tensor([0, 1]))  # row 0 ends (EOS = 0)
    s.extend(torch.tensor([2, 2]))
    assert s.tokens().tolist() == [[0, 0], [1, 2]]
    lp = s.logprobs()
    assert lp[0, 0] == 0.0 and bool(torch.isneginf(lp[0, 1:]).all())


# ---------------------------------------------------------------- results
def test_sampleset_weights_empirical_and_records() -> None:
    s = SampleSet(
        [(1, 0), (2, 0), (1, 0)],
        torch.tensor([0.0, math.log(2.0), -math.inf]),
        Cost(generated_tokens=6),
        rewards=torch.tensor([1.0, 0.0, 1.0]),
    )
    assert torch.allclose(
        s.normalized_weights(), torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64)
    )
    assert s.empirical() == pytest.approx({(1, 0): 1 / 3, (2, 0): 2 / 3})
    assert s.ess() == pytest.approx(1.0 / (1 / 9 + 4 / 9))
    assert s.mean(s.rewards) == pytest.approx(1 / 3)  # type: ignore[arg-type]
    rec = s.to_records()
    assert rec[2]["log_weight"] == "-inf" and rec[0]["sequence"] == [1, 0]
    r = s.resample(5, torch.Generator().manual_seed(0))
    assert len(r) == 5 and (1, 0) in r.sequences and all(x != () for x in r.sequences)
    with pytest.raises(ValueError, match="NaN"):
        SampleSet([(1,)], torch.tensor([math.nan]), Cost())
    with pytest.raises(ValueError, match="all log-weights are -inf"):
        SampleSet([(1,)], torch.tensor([-math.inf]), Cost()).normalized_weights()
