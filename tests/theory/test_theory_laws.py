"""Exact sampler laws (tiltsample.theory.laws) against brute force and against the samplers.

Exact, seed-free checks first: the proposal law against a recursive enumerator written here, the
SIR quadrature (``specs/ets.md`` §9) and the argmax closed form against enumeration of every
ordered candidate tuple, limits (``M = 1``, ``M → ∞``, ``lam = 1e-3``). Then seeded statistical
tests: the empirical law of the real samplers against the exact laws, with thresholds derived
from the sample size.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import tiltsample
from tiltsample import SampleSet, TiltedTarget, reference_target
from tiltsample.target import Truncation
from tiltsample.targets.rewards import ConstraintReward, ContainsTokenReward, CountFractionReward
from tiltsample.targets.tabular import TabularPolicy, random_tabular
from tiltsample.theory import (
    ancestral_law,
    best_of_n_law,
    best_of_n_law_bruteforce,
    exact_distribution,
    expected_tv_iid,
    importance_log_weights,
    proposal_law,
    sir_law,
    sir_law_bruteforce,
    tv,
)
from tiltsample.types import Seq

TRUNCATIONS: tuple[Truncation, ...] = ("stop", "condition")


# ----------------------------------------------------------------------------- helpers
def policy_with_dead_ends(seed: int, vocab: int, length: int) -> TabularPolicy:
    """A random policy where EOS is impossible after some prefixes of length ``length - 1``.

    Under ``truncation="condition"`` the decoder still forces EOS there: those responses have
    ``q > 0`` but ``p_ref = 0`` (zero-weight candidates).
    """
    base = random_tabular(torch.Generator().manual_seed(seed), vocab, length, concentration=0.7)
    table = base.table
    for prefix, row in table.items():
        if len(prefix) == length - 1 and len(prefix) > 0 and sum(prefix) % 2 == 0:
            new = row.clone()
            new[base.eos_id] = -math.inf
            table[prefix] = new - torch.logsumexp(new, 0)
    return TabularPolicy(vocab, base.eos_id, length, table)


def make_target(
    seed: int,
    vocab: int,
    length: int,
    truncation: Truncation,
    reward: str = "count",
    lam: float = 0.3,
    constraint: bool = True,
    dead_ends: bool = False,
) -> TiltedTarget:
    if dead_ends:
        policy = policy_with_dead_ends(seed, vocab, length)
    else:
        policy = random_tabular(torch.Generator().manual_seed(seed), vocab, length, 0.7)
    r = CountFractionReward(1, 0) if reward == "count" else ContainsTokenReward(vocab - 1, 0)
    target = TiltedTarget(policy, r, lam=lam, max_new_tokens=length, truncation=truncation)
    if constraint:  # the first token may not be token 1 (unless it is the whole response)
        target = target.tilt(ConstraintReward(lambda x: not (len(x) > 1 and x[0] == 1)))
    return target


def brute_proposal(target: TiltedTarget, tau: float) -> dict[Seq, tuple[float, float]]:
    """Independent recursive enumeration of the decode law: ``{x: (log q_tau, log p_ref)}``."""
    policy, eos, cap = target.policy, target.eos_id, target.max_new_tokens
    out: dict[Seq, tuple[float, float]] = {}

    def walk(prefix: Seq, lq: float, lp: float) -> None:
        row = policy.next_logprobs(target.prompt, [prefix])[0].to(torch.float64)
        if target.truncation == "condition" and len(prefix) == cap - 1:
            children = [(eos, 0.0, float(row[eos]))]
        else:
            tq = torch.log_softmax(row / tau, 0)
            children = [
                (v, float(tq[v]), float(row[v])) for v in range(len(row)) if row[v] > -math.inf
            ]
        for v, q, p in children:
            x = (*prefix, v)
            if v == eos or len(x) == cap:
                out[x] = (lq + q, lp + p)
            else:
                walk(x, lq + q, lp + p)

    walk((), 0.0, 0.0)
    return out


def max_abs_diff(a: dict[Seq, float], b: dict[Seq, float]) -> float:
    return max(abs(a.get(x, 0.0) - b.get(x, 0.0)) for x in a.keys() | b.keys())


def has_valid_candidate(target: TiltedTarget, tau: float) -> bool:
    return bool(torch.isfinite(importance_log_weights(proposal_law(target, tau))).any())


def successful_draws(samples: SampleSet) -> list[Seq]:
    ok = torch.isfinite(samples.log_weights).tolist()
    return [x for x, good in zip(samples.sequences, ok, strict=True) if good]


def chi_square_pvalue(counts: Counter[Seq], law: dict[Seq, float], n: int) -> float:
    """Pearson chi-square p-value, cells with expected count < 5 merged into one."""
    cells = sorted(law, key=lambda x: law[x])
    obs: list[float] = []
    exp: list[float] = []
    merged_o = merged_e = 0.0
    for x in cells:
        e = n * law[x]
        if e < 5.0:
            merged_o += counts.get(x, 0)
            merged_e += e
        else:
            obs.append(counts.get(x, 0))
            exp.append(e)
    if merged_e > 0:
        if merged_e < 5.0 and exp:  # fold the merged cell into the smallest regular cell
            obs[0] += merged_o
            exp[0] += merged_e
        else:
            obs.append(merged_o)
            exp.append(merged_e)
    if len(obs) < 2:
        return 1.0
    scale = sum(obs) / sum(exp)  # equal totals up to rounding
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def assert_sample_follows(samples: SampleSet, law: dict[Seq, float]) -> None:
    """The successful draws of ``samples`` are i.i.d. from ``law``.

    Two checks, both with false-alarm probability far below 1e-4:

    * TV to ``law`` below ``E[TV] + 4 sd`` of an exact i.i.d. sample of the same size ``n``.
      ``E[TV]`` is :func:`expected_tv_iid` (exact); TV of ``n`` draws changes by at most ``1/n``
      when one draw changes, so Efron–Stein gives ``sd <= 1/sqrt(2n)``, and McDiarmid gives
      ``P(TV >= E + 4/sqrt(2n)) <= exp(-16)``.
    * Pearson chi-square with rare cells merged: ``p > 1e-4``.
    """
    draws = successful_draws(samples)
    n = len(draws)
    assert n > 1000
    counts = Counter(draws)
    assert set(counts) <= set(law), "a draw outside the exact law's support"
    empirical = {x: c / n for x, c in counts.items()}
    assert tv(empirical, law) <= expected_tv_iid(law, n) + 4.0 / math.sqrt(2.0 * n)
    assert chi_square_pvalue(counts, law, n) > 1e-4


law_params = st.tuples(
    st.integers(0, 10_000),
    st.sampled_from([2, 3]),
    st.integers(1, 3),
    st.sampled_from(TRUNCATIONS),
    st.sampled_from(["count", "contains"]),
    st.sampled_from([0.05, 0.3, 1.0]),
    st.booleans(),
    st.booleans(),
)


# ----------------------------------------------------------------------------- proposal law
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_proposal_law_matches_recursive_enumeration(truncation: Truncation, tau: float) -> None:
    target = make_target(3, 3, 4, truncation, dead_ends=True)
    law = proposal_law(target, tau)
    brute = brute_proposal(target, tau)
    assert set(law.support) == set(brute)
    assert len(law.support) == len(set(law.support))
    assert float(torch.logsumexp(law.log_q, 0)) == pytest.approx(0.0, abs=1e-12)
    for x, lq, lp in zip(law.support, law.log_q.tolist(), law.log_reference.tolist(), strict=True):
        assert lq == pytest.approx(brute[x][0], abs=1e-12)
        assert lp == pytest.approx(brute[x][1], abs=1e-12) or lp == brute[x][1] == -math.inf
    if truncation == "condition":  # forced EOS of probability 0: q > 0, p_ref = 0
        assert bool(torch.isneginf(law.log_reference).any())
        assert all(x[-1] == target.eos_id for x in law.support)


def test_ancestral_law_at_temperature_one_is_the_reference() -> None:
    policy = random_tabular(torch.Generator().manual_seed(1), 3, 4)
    target = reference_target(policy, max_new_tokens=4)
    law = ancestral_law(target)
    exact = exact_distribution(target).as_dict()
    assert max_abs_diff(law, exact) < 1e-14


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_importance_weights_are_unbiased_for_z(truncation: Truncation, tau: float) -> None:
    target = make_target(5, 3, 4, truncation, dead_ends=True)
    law = proposal_law(target, tau)
    log_w = importance_log_weights(law)
    assert not bool(torch.isnan(log_w).any())
    # E_q[w] = Z exactly: q covers the target's support
    log_z = float(torch.logsumexp(law.log_q + log_w, 0))
    assert log_z == pytest.approx(exact_distribution(target).log_z, abs=1e-12)
    assert torch.equal(law.log_weights, log_w)


# ----------------------------------------------------------------------------- vs brute force
@settings(max_examples=100)
@given(law_params, st.integers(1, 4), st.sampled_from([0.5, 1.0, 2.0]))
def test_sir_law_matches_bruteforce(
    params: tuple[int, int, int, Truncation, str, float, bool, bool], m: int, tau: float
) -> None:
    target = make_target(*params)
    if not has_valid_candidate(target, tau):
        with pytest.raises(ValueError, match="positive weight"):
            sir_law(target, m, tau)
        return
    exact = sir_law(target, m, tau)
    brute = sir_law_bruteforce(target, m, tau)
    assert max_abs_diff(exact, brute) < 1e-10
    assert math.fsum(exact.values()) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=100)
@given(law_params, st.integers(1, 4), st.sampled_from([0.5, 1.0, 2.0]))
def test_best_of_n_law_matches_bruteforce(
    params: tuple[int, int, int, Truncation, str, float, bool, bool], m: int, tau: float
) -> None:
    target = make_target(*params)
    if not has_valid_candidate(target, tau):
        with pytest.raises(ValueError, match="positive weight"):
            best_of_n_law(target, m, tau)
        return
    exact = best_of_n_law(target, m, tau)
    brute = best_of_n_law_bruteforce(target, m, tau)
    assert max_abs_diff(exact, brute) < 1e-12
    assert math.fsum(exact.values()) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_laws_match_bruteforce_grid(truncation: Truncation, tau: float, m: int) -> None:
    # the largest brute-forceable toy of the grid: V=3, L=3 (15 responses, 15**4 tuples)
    target = make_target(m + 10, 3, 3, truncation, dead_ends=True, lam=0.1)
    assert max_abs_diff(sir_law(target, m, tau), sir_law_bruteforce(target, m, tau)) < 1e-10
    best, brute = best_of_n_law(target, m, tau), best_of_n_law_bruteforce(target, m, tau)
    assert max_abs_diff(best, brute) < 1e-12


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_failures_are_conditioned_away(truncation: Truncation) -> None:
    # a strong constraint: most candidates have zero weight, so many draws fail
    target = make_target(2, 3, 3, truncation, dead_ends=True).tilt(
        ConstraintReward(lambda x: 2 in x)
    )
    for m in (1, 2, 3):
        for law, brute in (
            (sir_law(target, m, 0.8), sir_law_bruteforce(target, m, 0.8)),
            (best_of_n_law(target, m, 0.8), best_of_n_law_bruteforce(target, m, 0.8)),
        ):
            assert max_abs_diff(law, brute) < 1e-10
            assert all(2 in x for x in law)


# ----------------------------------------------------------------------------- limits
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_one_candidate_gives_the_proposal_law(truncation: Truncation, tau: float) -> None:
    target = make_target(7, 3, 4, truncation, dead_ends=True)
    prop = proposal_law(target, tau)
    valid = torch.isfinite(prop.log_weights)
    q = torch.exp(prop.log_q[valid] - torch.logsumexp(prop.log_q[valid], 0)).tolist()
    expected = dict(
        zip([x for x, ok in zip(prop.support, valid.tolist(), strict=True) if ok], q, strict=True)
    )
    assert max_abs_diff(sir_law(target, 1, tau), expected) < 1e-13
    assert max_abs_diff(best_of_n_law(target, 1, tau), expected) < 1e-13


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_sir_law_converges_to_the_target(tau: float) -> None:
    target = make_target(0, 3, 4, "stop", lam=0.3)
    exact = exact_distribution(target)
    prop = proposal_law(target, tau)
    ms = [2**k for k in range(13)]
    tvs = [tv(sir_law(target, m, tau, proposal=prop), exact) for m in ms]
    assert all(b < a for a, b in itertools.pairwise(tvs))
    assert tvs[ms.index(256)] < 0.01
    # specs/ets.md §9 (a): exact energies give a log-log slope of -1 in M
    slope = math.log(tvs[-1] / tvs[-3]) / math.log(ms[-1] / ms[-3])
    assert slope == pytest.approx(-1.0, abs=0.05)


def test_small_lam_runs_without_overflow() -> None:
    target = make_target(4, 3, 3, "stop", lam=1e-3)
    for tau in (0.5, 1.0):
        for m in (2, 3):
            law = sir_law(target, m, tau)
            assert max_abs_diff(law, sir_law_bruteforce(target, m, tau)) < 1e-10
            best, brute = best_of_n_law(target, m, tau), best_of_n_law_bruteforce(target, m, tau)
            assert max_abs_diff(best, brute) < 1e-12
    big = make_target(6, 4, 6, "condition", lam=1e-3)
    prop = proposal_law(big, 0.8)
    for m in (1, 8, 64, 4096):
        law = sir_law(big, m, proposal=prop)
        values = torch.tensor(list(law.values()), dtype=torch.float64)
        assert bool(torch.isfinite(values).all())
        assert float(values.sum()) == pytest.approx(1.0, abs=1e-12)
    # as M grows the SIR law reaches pi, which at lam = 1e-3 sits on the reward maximisers
    exact = exact_distribution(big)
    far, near = sir_law(big, 64, proposal=prop), sir_law(big, 10**6, proposal=prop)
    assert tv(near, exact) < tv(far, exact)


def test_grid_step_convergence() -> None:
    target = make_target(9, 3, 4, "stop", lam=0.05)
    fine = sir_law(target, 16, 0.6, grid_step=0.02)
    assert max_abs_diff(sir_law(target, 16, 0.6), fine) < 1e-13
    with pytest.raises(RuntimeError, match="grid_step"):
        sir_law(target, 16, 0.6, grid_step=2.0)


def test_best_of_n_law_ignores_lam_and_concentrates_on_the_maximisers() -> None:
    target = make_target(1, 3, 4, "stop", reward="count", lam=0.3)
    for tau in (0.5, 1.0):
        a = best_of_n_law(target, 5, tau)
        b = best_of_n_law(target.with_lam(0.01), 5, tau)
        assert max_abs_diff(a, b) < 1e-15  # only the order of the tilts matters
    prop = proposal_law(target, 1.0)
    ok = torch.isfinite(prop.log_weights)
    top = float(prop.log_tilt[ok].max())
    tilts = prop.log_tilt.tolist()
    winners = {
        x for x, t, good in zip(prop.support, tilts, ok.tolist(), strict=True) if good and t == top
    }
    law = best_of_n_law(target, 10**9, proposal=prop)
    assert sum(law.get(x, 0.0) for x in winners) == pytest.approx(1.0, abs=1e-12)


def test_input_errors() -> None:
    target = make_target(0, 3, 3, "stop")
    with pytest.raises(ValueError, match="num_candidates"):
        sir_law(target, 0)
    with pytest.raises(TypeError, match="num_candidates"):
        best_of_n_law(target, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        proposal_law(target, -1.0)
    big = make_target(0, 3, 5, "stop")
    with pytest.raises(ValueError, match="brute force"):
        sir_law_bruteforce(big, 5)
    impossible = target.tilt(ConstraintReward(lambda x: False))
    with pytest.raises(ValueError, match="positive weight"):
        sir_law(impossible, 3)
    with pytest.raises(ValueError, match="positive weight"):
        best_of_n_law(impossible, 3)


# ----------------------------------------------------------------------------- vs the samplers
def test_soft_best_of_n_sampler_follows_sir_law() -> None:
    target = make_target(3, 3, 4, "condition", dead_ends=True, lam=0.3)
    samples = tiltsample.sample(
        "best-of-n",
        target,
        20_000,
        seed=11,
        num_candidates=4,
        selection="softmax",
        temperature=0.8,
    )
    assert samples.meta["failed"] > 0  # failures occur and are dropped by empirical()
    assert_sample_follows(samples, sir_law(target, 4, 0.8))


def test_argmax_best_of_n_sampler_follows_best_of_n_law() -> None:
    target = make_target(4, 3, 4, "stop", reward="count", lam=0.3)
    samples = tiltsample.sample(
        "best-of-n", target, 20_000, seed=12, num_candidates=3, selection="argmax"
    )
    assert_sample_follows(samples, best_of_n_law(target, 3))


def test_ancestral_sampler_follows_ancestral_law() -> None:
    target = make_target(5, 3, 4, "condition", dead_ends=True)
    samples = tiltsample.sample("ancestral", target, 20_000, seed=13, temperature=0.7)
    assert_sample_follows(samples, ancestral_law(target, 0.7))


def test_imh_law_starts_at_q_and_obeys_the_mengersen_tweedie_bound() -> None:
    """Exact IMH law: step 0 is the proposal; TV to pi <= (1 - 1/w*)^n at every n; -> pi."""
    from tiltsample.targets.toys import tabular_toy
    from tiltsample.theory import ancestral_law, exact_distribution, imh_law, tv

    target = tabular_toy(seed=0)
    q = ancestral_law(target)
    pi = exact_distribution(target).as_dict()
    assert tv(imh_law(q, pi, 0), q) < 1e-12
    w_star = max(p / q[x] for x, p in pi.items())
    for n in (1, 2, 5, 10, 30):
        assert tv(imh_law(q, pi, n), pi) <= (1.0 - 1.0 / w_star) ** n + 1e-12
    assert tv(imh_law(q, pi, 400), pi) < 1e-9
