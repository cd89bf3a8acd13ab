"""Exact, seed-free checks of the MH samplers' mathematics (``specs/mcmc.md``).

Power vs low temperature on the spec's tiny example, the Rényi and log-normaliser identities, exact
transition matrices (detailed balance to 1e-12 and stationarity for every configuration; the
reference code's truncation documented as non-reversible), the cut-law correction, max-swap, the
QAlign shortcut, the stage schedule, and the decision-trace mixing table of §3.5 from both the
closed form and the enumerated kernel.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiltsample
from tiltsample import TiltedTarget
from tiltsample.samplers.mh import (
    cut_log_probs,
    decompose_target,
    mh_log_ratio,
    qalign_log_ratio,
    resolve_alpha,
    token_law,
)
from tiltsample.targets.decision_trace import decision_trace
from tiltsample.targets.rewards import ConstraintReward, CountFractionReward
from tiltsample.targets.tabular import TabularPolicy, random_tabular
from tiltsample.targets.toys import power_example, power_example_policy
from tiltsample.testing.strategies import tabular_policies, tabular_targets
from tiltsample.theory import ancestral_law, exact_distribution, tv
from tiltsample.theory.mh_kernels import (
    MHKernel,
    decision_trace_mixing_time,
    decision_trace_rates,
    decision_trace_tv,
    detailed_balance_error,
    law_after,
    leak_mass,
    mh_kernel,
    mixing_time,
    spectral_gap,
    stage_schedule_law,
    stationarity_error,
    tv_curve,
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


EXACT_TOL = 1e-12


def law_of(kernel: MHKernel) -> dict[Seq, float]:
    return kernel.as_dict(kernel.target)


def assert_reversible_for(kernel: MHKernel, exact: dict[Seq, float]) -> None:
    """Rows stochastic, target = the independent exact law, detailed balance, stationarity."""
    p = kernel.matrix
    assert bool((p >= -1e-15).all())
    assert torch.allclose(p.sum(1), torch.ones(len(kernel.states), dtype=torch.float64), atol=1e-12)
    pi = torch.tensor([exact.get(x, 0.0) for x in kernel.states], dtype=torch.float64)
    assert sum(exact.values()) == pytest.approx(float(pi.sum()), abs=1e-12)  # no mass missing
    assert torch.allclose(kernel.target, pi, atol=1e-12, rtol=0)
    assert detailed_balance_error(kernel, pi) < EXACT_TOL
    assert stationarity_error(kernel, pi) < EXACT_TOL


def top_k_restricted(target: TiltedTarget, k: int) -> dict[Seq, float]:
    """The exact target restricted to responses whose tokens are all in their prefix's top-k."""
    law = exact_distribution(target).as_dict()
    keep = {}
    for x, p in law.items():
        ok = True
        for t in range(len(x)):
            if target.truncation == "condition" and t == target.max_new_tokens - 1:
                break  # a forced EOS is not drawn from the top-k set
            row = target.policy.next_logprobs(target.prompt, [x[:t]])[0]
            top = set(torch.topk(row, min(k, row.numel())).indices.tolist())
            ok = ok and x[t] in top
        if ok:
            keep[x] = p
    total = sum(keep.values())
    return {x: p / total for x, p in keep.items()}


# ----------------------------------------------------------------------------- §1
def test_tiny_example_power_is_not_low_temperature() -> None:
    """specs/mcmc.md §1 table, to 1e-3: the MH kernel's law vs low-temperature sampling."""
    table = {
        2.0: ((0.572, 0.214, 0.214), (0.401, 0.300, 0.300)),
        4.0: ((0.782, 0.109, 0.109), (0.309, 0.345, 0.345)),
    }
    ab, ba, bb = (1, 2), (2, 1), (2, 2)
    for alpha, (power, low) in table.items():
        target = power_example(alpha=alpha)
        kernel = mh_kernel(target, proposal_temperature=1 / alpha)
        exact = exact_distribution(target).as_dict()
        assert_reversible_for(kernel, exact)
        got_power = law_of(kernel)
        got_low = ancestral_law(target, 1 / alpha)
        for x, want in zip((ab, ba, bb), power, strict=True):
            assert got_power[x] == pytest.approx(want, abs=1e-3)
        for x, want in zip((ab, ba, bb), low, strict=True):
            assert got_low[x] == pytest.approx(want, abs=1e-3)
    # low temperature puts *less* mass on "ab" than the base model (0.45)
    assert ancestral_law(power_example(alpha=4.0), 0.25)[ab] < 0.45
    # the spec's check at alpha = 2: root normaliser 0.505, then 1 after "a" and 0.5 after "b"
    low2 = ancestral_law(power_example(alpha=2.0), 0.5)
    assert low2[ab] == pytest.approx(0.2025 / 0.505, abs=1e-12)
    assert low2[ba] == pytest.approx(0.075625 / (0.505 * 0.5), abs=1e-12)


@settings(max_examples=15)
@given(policy=tabular_policies(max_lens=(1, 2, 3)), alpha=st.sampled_from((0.5, 2.0, 4.0)))
def test_renyi_identity_of_low_temperature(policy: TabularPolicy, alpha: float) -> None:
    """``p_temp(x) ∝ p(x)^alpha · exp((alpha - 1) sum_t H_alpha(p(.|x_<t)))`` (§1)."""
    target = tiltsample.reference_target(policy, max_new_tokens=policy.max_len)
    low = ancestral_law(target, 1 / alpha)
    base = exact_distribution(target).as_dict()
    weights: dict[Seq, float] = {}
    for x, p in base.items():
        renyi = 0.0
        for t in range(len(x)):
            probs = torch.exp(policy.next_logprobs((), [x[:t]])[0])
            renyi += math.log(float((probs**alpha).sum())) / (1 - alpha)
        weights[x] = p**alpha * math.exp((alpha - 1) * renyi)
    total = sum(weights.values())
    assert max(abs(low.get(x, 0.0) - w / total) for x, w in weights.items()) < 1e-12


# ----------------------------------------------------------------------------- §2.2 identity
@settings(max_examples=20)
@given(
    seed=st.integers(0, 10_000),
    alpha=st.sampled_from((1.5, 2.0, 4.0)),
    support=st.sampled_from(("full", "top_k")),
)
def test_log_normaliser_identity_per_token(seed: int, alpha: float, support: str) -> None:
    """``g_t = alpha l_t - log Z_t`` with ``Z_t = sum_{v in A_t} p(v)^alpha`` (§2.2, §2.4)."""
    gen = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(6, 7, generator=gen, dtype=torch.float64) * 2, -1)
    log_p[0, 3] = -math.inf  # an impossible token
    log_p = log_p - torch.logsumexp(log_p, 1, keepdim=True)
    law = token_law(log_p, 1 / alpha, support, top_k=3)
    keep = torch.isfinite(law.log_q)
    if support == "top_k":
        assert bool((keep.sum(1) == 3).all())
    log_z = torch.logsumexp(torch.where(keep, alpha * log_p, -math.inf), dim=1)
    g = law.log_q[keep]
    want = (alpha * log_p - log_z[:, None])[keep]
    assert torch.allclose(g, want, atol=1e-12, rtol=0)
    # l stays the full-vocabulary log-prob; H is the entropy of p renormalised on the support
    assert torch.equal(law.log_p, log_p)
    p_sup = torch.softmax(torch.where(keep, log_p, -math.inf), 1)
    h = -torch.where(p_sup > 0, p_sup * torch.log(p_sup), 0.0).sum(1)
    assert torch.allclose(law.entropy, h, atol=1e-12)


# ----------------------------------------------------------------------------- cut law
def test_cut_term_uniform_is_a_length_ratio() -> None:
    ent = torch.zeros(3, 6, dtype=torch.float64)
    lengths = torch.tensor([6, 4, 1])
    lc = cut_log_probs(ent, lengths, "uniform", 4.0)
    assert torch.allclose(lc[0], torch.full((6,), -math.log(6), dtype=torch.float64))
    assert bool(torch.isneginf(lc[1, 4:]).all()) and float(lc[2, 0]) == 0.0
    # cut term of a move x (n = 6) -> x' (n' = 4) at j: log(n / n'); zero at equal lengths
    assert float(lc[1, 2] - lc[0, 2]) == pytest.approx(math.log(6 / 4), abs=1e-15)
    assert float(lc[0, 2] - lc[0, 2]) == 0.0


def test_entropy_cut_term_and_its_fallback() -> None:
    beta = 2.0
    x = torch.tensor([[0.5, 0.2, 1.0, 0.1, 0.0]], dtype=torch.float64)  # n = 5
    # H_j is the entropy of p(. | x_<j): a proposal cut at j <= 2 shares H_0..H_j with x
    y = torch.tensor([[0.5, 0.2, 1.0, 0.9, 1.5]], dtype=torch.float64)
    n = torch.tensor([5])
    lx = cut_log_probs(x, n, "entropy_jump", beta)[0]
    ly = cut_log_probs(y, n, "entropy_jump", beta)[0]
    wx = [0.5**beta, 0.0, 0.8**beta, 0.0, 0.0]
    wy = [0.5**beta, 0.0, 0.8**beta, 0.0, 0.6**beta]
    assert torch.allclose(torch.exp(lx), torch.tensor(wx, dtype=torch.float64) / sum(wx))
    # without fallback, the cut term at a shared-prefix cut j is log W(x) - log W(x')
    for j in (0, 2):
        assert float(ly[j] - lx[j]) == pytest.approx(math.log(sum(wx) / sum(wy)), abs=1e-12)
    # W = 0 (no entropy ever increases): explicit uniform fallback over the state's length
    flat = torch.zeros(2, 5, dtype=torch.float64)
    lf = cut_log_probs(flat, torch.tensor([5, 3]), "entropy_jump", beta)
    assert torch.allclose(torch.exp(lf[0]), torch.full((5,), 0.2, dtype=torch.float64))
    assert torch.allclose(torch.exp(lf[1, :3]), torch.full((3,), 1 / 3, dtype=torch.float64))
    # a fallback state and a non-fallback proposal: a cut with w_j = 0 cannot be reversed
    ratio = mh_log_ratio(
        power=2.0,
        ell_current=torch.tensor([-1.0]),
        ell_proposal=torch.tensor([-0.5]),
        g_current=torch.tensor([-1.0]),
        g_proposal=torch.tensor([-1.0]),
        rest_current=torch.zeros(1),
        rest_proposal=torch.zeros(1),
        log_cut_forward=lf[0, 1:2],
        log_cut_reverse=lx[1:2],
    )
    assert float(ratio.cut) == -math.inf and float(ratio.total) == -math.inf


# ----------------------------------------------------------------------------- ratios
def test_max_swap_accepts_iff_the_suffix_likelihood_strictly_increases() -> None:
    ell_cur = torch.tensor([-1.0, -1.0, -1.0, -math.inf, -2.0])
    ell_prop = torch.tensor([-0.5, -1.0, -1.5, -3.0, -math.inf])
    z = torch.zeros(5, dtype=torch.float64)
    ratio = mh_log_ratio(
        power=math.inf,
        ell_current=ell_cur.double(),
        ell_proposal=ell_prop.double(),
        g_current=torch.randn(5, dtype=torch.float64),
        g_proposal=torch.randn(5, dtype=torch.float64),
        rest_current=z,
        rest_proposal=z,
        log_cut_forward=torch.full((5,), -1.0, dtype=torch.float64),
        log_cut_reverse=torch.full((5,), -2.0, dtype=torch.float64),
        greedy=True,
    )
    assert ratio.total.tolist() == [math.inf, -math.inf, -math.inf, math.inf, -math.inf]


def test_qalign_shortcut_equals_the_full_ratio_at_temperature_one() -> None:
    """With ``q = p`` at ``tau = 1`` the likelihoods cancel: ``Δ log_tilt + log(n/n')``."""
    gen = torch.Generator().manual_seed(0)
    n = 50
    # suffix sums of l (= g at tau = 1), prefix sums, rewards, lengths
    ell_cur = -torch.rand(n, generator=gen, dtype=torch.float64) * 5
    ell_prop = -torch.rand(n, generator=gen, dtype=torch.float64) * 5
    prefix = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    r_cur = torch.rand(n, generator=gen, dtype=torch.float64)
    r_prop = torch.rand(n, generator=gen, dtype=torch.float64)
    r_prop[:3] = -math.inf  # a violated constraint
    len_cur = torch.randint(1, 9, (n,), generator=gen)
    len_prop = torch.randint(1, 9, (n,), generator=gen)
    lam, power = 0.3, 1.7  # a composed target: p^1.7 · exp(r/lam)
    rest_cur, rest_prop = r_cur / lam, torch.where(torch.isneginf(r_prop), -math.inf, r_prop / lam)
    full = mh_log_ratio(
        power=power,
        ell_current=ell_cur,
        ell_proposal=ell_prop,
        g_current=ell_cur,
        g_proposal=ell_prop,
        rest_current=rest_cur,
        rest_proposal=rest_prop,
        log_cut_forward=-torch.log(len_cur.double()),
        log_cut_reverse=-torch.log(len_prop.double()),
    ).total
    tilt_cur = (power - 1) * (prefix + ell_cur) + rest_cur
    tilt_prop = torch.where(
        torch.isneginf(rest_prop), -math.inf, (power - 1) * (prefix + ell_prop) + rest_prop
    )
    short = qalign_log_ratio(tilt_cur, tilt_prop, len_cur, len_prop)
    assert bool(torch.isneginf(full[:3]).all()) and bool(torch.isneginf(short[:3]).all())
    assert torch.allclose(full[3:], short[3:], atol=1e-12, rtol=0)


def test_alpha_is_read_from_the_target() -> None:
    policy = power_example_policy()
    assert resolve_alpha(tiltsample.power_target(policy, 3.0, max_new_tokens=2), None) == 3.0
    composed = tiltsample.power_target(policy, 2.5, max_new_tokens=2).tilt(
        CountFractionReward(1, 0), lam=0.5
    )
    assert resolve_alpha(composed, None) == 2.5
    assert decompose_target(composed).power == 2.5 and len(decompose_target(composed).rest) == 1
    assert (
        resolve_alpha(tiltsample.power_target(policy, 3.0, max_new_tokens=2), math.inf) == math.inf
    )
    plain = tiltsample.reference_target(policy, max_new_tokens=2)
    with pytest.raises(ValueError, match="alpha is required"):
        resolve_alpha(plain, None)
    assert resolve_alpha(plain, 2.0) == 2.0
    with pytest.raises(ValueError, match="disagrees"):
        resolve_alpha(tiltsample.power_target(policy, 3.0, max_new_tokens=2), 2.0)


# ----------------------------------------------------------------------------- exact kernels
@settings(max_examples=12)
@given(
    target=tabular_targets(max_lens=(1, 2, 3)),
    cut=st.sampled_from(("uniform", "entropy_jump")),
    tau=st.sampled_from((1.0, 0.5, 2.0)),
)
def test_tilted_target_kernels_are_reversible(target: TiltedTarget, cut: str, tau: float) -> None:
    """Reward-tilted targets (QAlign's setting and beyond), both truncations, EOS-free included."""
    kernel = mh_kernel(target, cut=cut, cut_power=2.0, proposal_temperature=tau)
    assert_reversible_for(kernel, exact_distribution(target).as_dict())


@settings(max_examples=12)
@given(
    policy=tabular_policies(vocab_sizes=(3, 4), max_lens=(2, 3, 4)),
    alpha=st.sampled_from((2.0, 4.0)),
    cut=st.sampled_from(("uniform", "entropy_jump")),
    truncation=st.sampled_from(("stop", "condition")),
    support=st.sampled_from(("full", "top_k")),
)
def test_power_target_kernels_are_reversible(
    policy: TabularPolicy, alpha: float, cut: str, truncation: str, support: str
) -> None:
    """Power targets with the tau = 1/alpha proposal, EOS and a cap, top-k restriction."""
    eos_impossible = bool(torch.isneginf(policy.next_logprobs((), [()])[0, policy.eos_id]))
    if truncation == "condition" and eos_impossible:
        truncation = "stop"
    target = tiltsample.power_target(
        policy,
        alpha,
        max_new_tokens=policy.max_len,
        truncation=truncation,  # type: ignore[arg-type]
    )
    kernel = mh_kernel(target, cut=cut, proposal_temperature=1 / alpha, support=support, top_k=2)
    exact = (
        exact_distribution(target).as_dict() if support == "full" else top_k_restricted(target, 2)
    )
    assert_reversible_for(kernel, exact)


def test_composed_target_kernel_is_reversible() -> None:
    """``p^2 · exp(r/lam) · constraint`` with a length cap and EOS, both cut laws."""
    policy = random_tabular(torch.Generator().manual_seed(5), 3, 4, concentration=0.7)
    target = (
        tiltsample.power_target(policy, 2.0, max_new_tokens=4)
        .tilt(CountFractionReward(1, 0), lam=0.4)
        .tilt(ConstraintReward(lambda x: not (len(x) > 1 and x[0] == 1)))
    )
    exact = exact_distribution(target).as_dict()
    for cut in ("uniform", "entropy_jump"):
        kernel = mh_kernel(target, cut=cut, proposal_temperature=0.5)
        assert_reversible_for(kernel, exact)
        assert spectral_gap(kernel) > 0
        # zero-density responses (the constraint) are transient states: left and never re-entered
        off = kernel.target == 0
        assert bool(off.any()) and float(kernel.matrix[~off][:, off].abs().max()) == 0.0


def spec_reference_toy(seed: int, alpha: float) -> TiltedTarget:
    """V = 3, cap 3, EOS likely early: the toy of specs/mcmc.md §7 item 4."""
    policy = random_tabular(torch.Generator().manual_seed(seed), 3, 3, concentration=1.0)
    return tiltsample.power_target(policy, alpha, max_new_tokens=3)


@pytest.mark.parametrize(("seed", "alpha", "violation"), [(0, 2.0, 0.05), (1, 4.0, 0.4)])
def test_reference_length_mode_is_not_reversible(seed: int, alpha: float, violation: float) -> None:
    """Documented behaviour: the published code's truncation breaks detailed balance (§2.3)."""
    target = spec_reference_toy(seed, alpha)
    exact = exact_distribution(target).as_dict()
    for cut in ("uniform", "entropy_jump"):
        ok = mh_kernel(target, cut=cut, proposal_temperature=1 / alpha)
        assert_reversible_for(ok, exact)
        ref = mh_kernel(target, cut=cut, proposal_temperature=1 / alpha, length_mode="reference")
        assert detailed_balance_error(ref) > violation
        assert stationarity_error(ref) > violation
        # it even leaves the target's support: unterminated responses shorter than the cap
        assert leak_mass(ref) > violation
        assert any(x[-1] != 0 and len(x) < 3 for x in ref.states)
        # started at pi, its law drifts away and stays away
        far = law_after(ref, 300, ref.target)
        assert 0.5 * float((far - ref.target).abs().sum()) > 2 * violation


def test_max_swap_kernel_only_moves_uphill() -> None:
    policy = random_tabular(torch.Generator().manual_seed(2), 3, 3, concentration=0.5)
    target = tiltsample.power_target(policy, 2.0, max_new_tokens=3)
    kernel = mh_kernel(target, proposal_temperature=0.7, greedy=True)
    log_p = target.log_reference(kernel.states)
    moves = (kernel.matrix > 0) & ~torch.eye(len(kernel.states), dtype=torch.bool)
    i, j = moves.nonzero(as_tuple=True)
    assert len(i) > 0 and bool((log_p[j] > log_p[i]).all())


# ----------------------------------------------------------------------------- stages
def test_stage_schedule_law_limits() -> None:
    policy = random_tabular(torch.Generator().manual_seed(4), 3, 4, concentration=0.8)
    target = tiltsample.power_target(policy, 3.0, max_new_tokens=4)
    tau = 1 / 3
    # no MH step: block-wise low-temperature decoding is plain low-temperature decoding
    low = ancestral_law(target, tau)
    zero = stage_schedule_law(target, block_size=2, num_steps=0, proposal_temperature=tau)
    assert tv(zero, low) < 1e-12
    # one stage: the plain chain after num_steps steps
    one = stage_schedule_law(target, block_size=4, num_steps=3, proposal_temperature=tau)
    kernel = mh_kernel(target, proposal_temperature=tau)
    assert tv(one, kernel.as_dict(law_after(kernel, 3))) < 1e-12
    # Even with infinitely many steps per stage the schedule is biased: a chain whose stage-1
    # state ends with EOS is returned with the stage-1 target's law pi_1 (p^alpha over stopped
    # responses of cap 2), which overweights early EOS. The N -> inf limit is the mixture
    # pi_1 restricted to EOS-terminated responses + pi_1(unterminated) · pi.
    exact = exact_distribution(target).as_dict()
    pi_1 = exact_distribution(tiltsample.power_target(policy, 3.0, max_new_tokens=2)).as_dict()
    limit = {x: p for x, p in pi_1.items() if x[-1] == policy.eos_id}
    rest = 1.0 - sum(limit.values())
    for x, p in exact.items():
        limit[x] = limit.get(x, 0.0) + rest * p
    paper = stage_schedule_law(target, block_size=2, num_steps=10, proposal_temperature=tau)
    many = stage_schedule_law(target, block_size=2, num_steps=400, proposal_temperature=tau)
    assert sum(paper.values()) == pytest.approx(1.0, abs=1e-12)
    assert tv(many, limit) < 1e-12
    assert tv(many, exact) > 0.03 and tv(paper, exact) > 0.1


# ----------------------------------------------------------------------------- §3.5 decision trace
SPEC_TABLE = {2: (68, 216), 10: (250, 216), 50: (1163, 216), 200: (4585, 216)}


def test_decision_trace_table_from_the_closed_form() -> None:
    for filler, (uniform, entropy) in SPEC_TABLE.items():
        u = decision_trace_rates(filler, alpha=4.0, cut="uniform")
        e = decision_trace_rates(filler, alpha=4.0, cut="entropy_jump", cut_power=4.0)
        assert u.trace_length == 2 * filler + 2
        assert decision_trace_mixing_time(u) == uniform
        assert decision_trace_mixing_time(e) == entropy
    # the spec's constants: q(B) = 0.165, pi(B) = 0.927, c_A(0) = 0.327 / 0.191 / 0.053
    rates = {b: decision_trace_rates(50, cut="entropy_jump", cut_power=b) for b in (1.0, 2.0, 4.0)}
    assert rates[4.0].initial_b == pytest.approx(0.165, abs=1e-3)
    assert rates[4.0].target_b == pytest.approx(0.927, abs=1e-3)
    for beta, c_a in ((1.0, 0.327), (2.0, 0.191), (4.0, 0.053)):
        h0 = -(0.6 * math.log(0.6) + 0.4 * math.log(0.4))
        assert h0**beta / (h0**beta + math.log(4) ** beta) == pytest.approx(c_a, abs=1e-3)
    assert [decision_trace_mixing_time(rates[b]) for b in (1.0, 2.0, 4.0)] == [34, 59, 216]


@pytest.mark.parametrize("filler", sorted(SPEC_TABLE))
def test_decision_trace_table_from_the_enumerated_kernel(filler: int) -> None:
    target = decision_trace(filler, alpha=4.0)
    uniform, entropy = SPEC_TABLE[filler]
    for cut, want in (("uniform", uniform), ("entropy_jump", entropy)):
        kernel = mh_kernel(target, cut=cut, cut_power=4.0, proposal_temperature=0.25)
        assert len(kernel.states) == 5
        assert detailed_balance_error(kernel) < 1e-18
        assert mixing_time(kernel) == want
        # the whole TV curve is the closed form's (1 - a - b)^n decay
        rates = decision_trace_rates(filler, cut=cut, cut_power=4.0)
        curve = tv_curve(kernel, 50)
        closed = torch.tensor([decision_trace_tv(rates, n) for n in range(51)], dtype=torch.float64)
        assert torch.allclose(curve, closed, atol=1e-12, rtol=0)


def test_decision_trace_beta_sweep_from_the_enumerated_kernel() -> None:
    target = decision_trace(50, alpha=4.0)
    got = [
        mixing_time(mh_kernel(target, cut="entropy_jump", cut_power=b, proposal_temperature=0.25))
        for b in (1.0, 2.0, 4.0)
    ]
    assert got == [34, 59, 216]


def test_uniform_cut_mixing_grows_linearly_in_the_trace_length() -> None:
    """Mixing time ∝ T for the uniform cut (a log-log slope of 1), flat for the entropy cut."""
    lengths, uniform, entropy = [], [], []
    for filler in (5, 10, 20, 40, 80, 160, 320):
        lengths.append(2 * filler + 2)
        uniform.append(decision_trace_mixing_time(decision_trace_rates(filler)))
        entropy.append(decision_trace_mixing_time(decision_trace_rates(filler, cut="entropy_jump")))
    x = torch.log(torch.tensor(lengths, dtype=torch.float64))
    y = torch.log(torch.tensor(uniform, dtype=torch.float64))
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    assert 0.97 < slope < 1.03
    assert len(set(entropy)) == 1
