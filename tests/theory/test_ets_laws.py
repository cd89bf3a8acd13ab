"""Exact ETS laws (tiltsample.theory.ets_laws): quadrature, chain composition, rates.

All tests here are exact and seed-free: the one-step quadrature against enumeration of every
ordered tuple of (candidate, K rollouts) selected by the sampler's own rule, the chain law
against closed forms (lam → ∞ gives p_ref, one guidance step is soft best-of-N), the Doob kernel
against the target, and the convergence claims of ``specs/ets.md`` §8.2 as log-log slopes of
exact TV (no sampling noise): rate ``1/M`` at every fixed ``K`` including ``K = 1`` (no floor),
``TV ≤ ρ̂/M`` per step, no monotonicity in ``K``. The seeded comparisons of the sampler with
these laws are in ``tests/samplers/ets/test_ets.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import tiltsample
from tiltsample import TiltedTarget
from tiltsample.samplers.ets import selection_probabilities
from tiltsample.target import Truncation
from tiltsample.targets.masked_diffusion import MaskedDiffusionToy, random_masked_diffusion
from tiltsample.targets.rewards import ContainsTokenReward, CountFractionReward
from tiltsample.targets.tabular import TabularPolicy, random_tabular
from tiltsample.theory import (
    exact_distribution,
    exact_energies,
    optimal_next_token_logprobs,
    sir_law,
    tv,
)
from tiltsample.theory.ets_laws import (
    ets_law,
    ets_law_sweep,
    ets_step_law,
    ets_step_law_bruteforce,
    sir_select_log_probs,
    tilted_law,
)


def ar_target(
    seed: int = 0,
    vocab: int = 3,
    length: int = 3,
    lam: float = 0.3,
    truncation: Truncation = "stop",
    graded: bool = False,
    eos_prob: float | None = None,
) -> TiltedTarget:
    policy = random_tabular(
        torch.Generator().manual_seed(seed), vocab, length, 0.7, eos_prob=eos_prob
    )
    reward = CountFractionReward(1, 0) if graded else ContainsTokenReward(1, 0)
    return TiltedTarget(policy, reward, lam, (), length, truncation)


def dlm_target(seed: int = 0, order: str = "drawn-confidence", lam: float = 0.3) -> TiltedTarget:
    policy = random_masked_diffusion(torch.Generator().manual_seed(seed), 2, 4, 0.5, order=order)
    return TiltedTarget(policy, ContainsTokenReward(1, 0), lam, (), 4)  # type: ignore[arg-type]


def perturbed(policy: TabularPolicy, seed: int, scale: float = 0.7) -> TabularPolicy:
    """A proposal with the same vocabulary: every row mixed with a random Dirichlet row."""
    other = random_tabular(
        torch.Generator().manual_seed(seed), policy.vocab_size, policy.max_len, 1.0
    ).table
    rows = {}
    for k, row in policy.table.items():
        mix = torch.logaddexp(row + math.log(1 - scale), other[k] + math.log(scale))
        rows[k] = mix - torch.logsumexp(mix, 0)
    return TabularPolicy(policy.vocab_size, policy.eos_id, policy.max_len, rows)


def slopes(ms: list[int], tvs: list[float]) -> np.ndarray:
    return np.diff(np.log(tvs)) / np.diff(np.log(ms))


# ----------------------------------------------------------------------------- the selection rule
def test_selection_is_proportional_to_the_energy_not_argmax_not_softmax_of_energy() -> None:
    energies = torch.tensor([[1.0, 2.0, 5.0]], dtype=torch.float64)
    probs, failed = selection_probabilities(torch.log(energies))
    assert probs[0].tolist() == pytest.approx([1 / 8, 2 / 8, 5 / 8], abs=1e-15)
    assert not bool(failed.any())
    # lam = 1e-3 scale: weights e^1000 vs e^999 are fine in log space
    probs, _ = selection_probabilities(torch.tensor([[1000.0, 999.0, -math.inf]]))
    assert probs[0].tolist() == pytest.approx([1 / (1 + math.e**-1), 1 / (1 + math.e), 0.0])
    probs, failed = selection_probabilities(torch.full((1, 4), -math.inf))
    assert bool(failed.all()) and probs[0].tolist() == [0.25] * 4


def test_quadrature_with_deterministic_weights_is_sir_law() -> None:
    target = ar_target(2, length=2, graded=True, lam=0.1)
    for m in (1, 3, 17):
        a = ets_law(target, num_candidates=m, block_size=2)
        assert a.steps == 1
        b = sir_law(target, m)
        assert tv(a.law, b) < 1e-10


# ---------------------------------------------------------------- step law = brute force
STEP_CASES: list[tuple[str, dict[str, Any]]] = [
    ("exact energies", {"energies": "exact", "num_candidates": 3}),
    (
        "exact energies, step 2",
        {"energies": "exact", "num_candidates": 3, "state": (2,), "guidance_step": 2},
    ),
    ("K=1 rollouts", {"num_candidates": 3, "num_rollouts": 1}),
    ("K=2 rollouts", {"num_candidates": 2, "num_rollouts": 2}),
    ("temperature", {"num_candidates": 2, "num_rollouts": 2, "temperature": 0.6}),
    ("IS proposal", {"num_candidates": 2, "num_rollouts": 2, "proposal": "perturbed"}),
    (
        "IS clipped",
        {"num_candidates": 2, "num_rollouts": 1, "proposal": "perturbed", "is_log_ratio_clip": 0.3},
    ),
]


@pytest.mark.parametrize(("name", "case"), STEP_CASES, ids=[c[0] for c in STEP_CASES])
@pytest.mark.parametrize("truncation", ["stop", "condition"])
def test_one_step_quadrature_matches_bruteforce(
    name: str, case: dict[str, Any], truncation: Truncation
) -> None:
    target = ar_target(1, length=3, truncation=truncation, graded=True, lam=0.2)
    params = dict(case)
    if params.get("proposal") == "perturbed":
        params["proposal"] = perturbed(target.policy, 5)  # type: ignore[arg-type]
    params["block_size"] = 1
    law = ets_step_law(target, **params)
    brute = ets_step_law_bruteforce(target, **params)
    got = law.as_dict()
    assert set(got) == set(brute)
    assert max(abs(got[k] - brute[k]) for k in got) < 1e-9
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-12)  # no zero weights here


@pytest.mark.parametrize("order", ["max-confidence", "drawn-confidence"])
def test_one_step_quadrature_matches_bruteforce_on_masked_diffusion(order: str) -> None:
    target = dlm_target(3, order)
    proposal = target.policy.tempered(0.6)  # type: ignore[attr-defined]
    for params in (
        {"energies": "exact", "num_candidates": 3},
        {"num_candidates": 2, "num_rollouts": 2},
        {"num_candidates": 2, "num_rollouts": 1, "proposal": proposal},
    ):
        law = ets_step_law(target, block_size=2, **params).as_dict()  # type: ignore[arg-type]
        brute = ets_step_law_bruteforce(target, block_size=2, **params)  # type: ignore[arg-type]
        assert max(abs(law[k] - brute.get(k, 0.0)) for k in law) < 1e-9


def test_zero_weights_give_the_failure_mass() -> None:
    # EOS has probability 0 after prefix (1,): under truncation="condition" those responses
    # get weight 0 (p_ref(EOS) = 0), so a step can fail.
    table = {(): [0.2, 0.5, 0.3], (1,): [0.0, 0.5, 0.5], (2,): [0.5, 0.25, 0.25]}
    policy = TabularPolicy.from_probs(3, 0, 2, table)
    target = TiltedTarget(policy, ContainsTokenReward(2, 0), 0.5, (), 2, "condition")
    law = ets_step_law(target, num_candidates=2, num_rollouts=1, block_size=1)
    brute = ets_step_law_bruteforce(target, num_candidates=2, num_rollouts=1, block_size=1)
    assert max(abs(law.as_dict()[k] - brute[k]) for k in brute) < 1e-9
    fail = math.exp(law.log_failure)
    assert 0 < fail < 1
    assert sum(law.as_dict().values()) + fail == pytest.approx(1.0, abs=1e-12)
    # the direct formula: P(W = 0) = q(1,) (the only prefix whose rollouts all die)
    assert fail == pytest.approx(0.5**2, abs=1e-12)


def test_lam_1e3_is_finite() -> None:
    target = ar_target(0, length=3, lam=1e-3)
    law = ets_law(target, num_candidates=4, num_rollouts=2, block_size=1)
    assert all(math.isfinite(p) for p in law.law.values())
    exact = exact_distribution(target).as_dict()
    assert tv(law.law, exact) < 0.5


# ---------------------------------------------------------------- limits and identities
@pytest.mark.parametrize("kind", ["ar", "ar-eos-free", "dlm"])
def test_lam_infinity_gives_p_ref_exactly(kind: str) -> None:
    # (under truncation="condition" the lam = inf target is p_ref *conditioned* on EOS by the
    # cap: a genuine 0/1 tilt, which ETS reaches only as M grows)
    if kind == "dlm":
        target = dlm_target(1).with_lam(math.inf)
        ref = target.policy.output_law()  # type: ignore[attr-defined]
    else:
        eos = 0.0 if kind == "ar-eos-free" else None
        target = ar_target(3, length=3, eos_prob=eos).with_lam(math.inf)
        ref = exact_distribution(target).as_dict()
    for m, k in ((1, 1), (3, 2), (8, 1)):
        law = ets_law(target, num_candidates=m, num_rollouts=k, block_size=1)
        assert tv(law.law, ref) < 1e-9


def test_doob_kernel_chains_to_the_target() -> None:
    target = ar_target(4, length=3, graded=True, truncation="condition")
    pi = exact_distribution(target).as_dict()
    energies = exact_energies(target)
    for prefix in [(), (1,), (2, 1)]:  # the kernel agrees with theory.energies (B = 1)
        step = ets_step_law(
            target,
            prefix,
            guidance_step=len(prefix) + 1,
            num_candidates=2,
            block_size=1,
            energies="exact",
        )
        want = optimal_next_token_logprobs(energies, target, prefix)
        for c, lp in zip(step.candidates, step.log_kernel.tolist(), strict=True):
            assert isinstance(c, tuple)
            assert lp == pytest.approx(float(want[c[-1]]), abs=1e-12)
    out: dict[tuple[int, ...], float] = {}
    layer: dict[tuple[int, ...], float] = {(): 1.0}
    for i in (1, 2, 3):
        nxt: dict[tuple[int, ...], float] = {}
        for x, px in layer.items():
            step = ets_step_law(
                target, x, guidance_step=i, num_candidates=2, block_size=1, energies="exact"
            )
            for c, p in step.kernel().items():
                assert isinstance(c, tuple)
                bucket = out if target.is_complete(c) else nxt
                bucket[c] = bucket.get(c, 0.0) + px * p
        layer = nxt
    assert tv(out, pi) < 1e-12


def test_is_with_the_reference_as_proposal_is_plain_ets() -> None:
    target = ar_target(5, length=3, graded=True)
    twin = TabularPolicy(3, 0, 3, target.policy.table)  # type: ignore[attr-defined]
    a = ets_law(target, num_candidates=4, num_rollouts=2, block_size=1)
    b = ets_law(target, num_candidates=4, num_rollouts=2, block_size=1, proposal=twin)
    assert tv(a.law, b.law) < 1e-12
    dlm = dlm_target(2)
    same = dlm.policy.with_schedule()  # type: ignore[attr-defined]
    a = ets_law(dlm, num_candidates=3, num_rollouts=2, block_size=1)
    b = ets_law(dlm, num_candidates=3, num_rollouts=2, block_size=1, proposal=same)
    assert tv(a.law, b.law) < 1e-12


def test_masked_diffusion_left_to_right_is_the_autoregressive_chain() -> None:
    ar = ar_target(6, length=3, graded=True)
    dlm_policy = MaskedDiffusionToy.from_policy(ar.policy, 3, order="fixed")
    dlm = TiltedTarget(dlm_policy, ar.reward, ar.lam, (), 3)  # type: ignore[arg-type]
    for params in ({"num_rollouts": 2}, {"energies": "exact"}):
        a = ets_law(ar, num_candidates=3, block_size=1, **params)  # type: ignore[arg-type]
        b = ets_law(dlm, num_candidates=3, block_size=1, **params)  # type: ignore[arg-type]
        assert tv(a.law, b.law) < 1e-9
    assert tv(tilted_law(dlm), exact_distribution(ar).as_dict()) < 1e-12


# ----------------------------------------------------------------------------- rates (spec §8.2)
MS = [8, 16, 32, 64]
LARGE_MS = [64, 128, 256]


@pytest.mark.parametrize("seed", [0, 2])
def test_chain_law_converges_at_rate_one_over_m_at_every_k(seed: int) -> None:
    target = ar_target(seed, vocab=3, length=3, lam=0.2)
    pi = exact_distribution(target).as_dict()
    for k in (1, 2, None):
        params: dict[str, Any] = {"energies": "exact"} if k is None else {"num_rollouts": k}
        tvs = [
            tv(ets_law(target, num_candidates=m, block_size=1, **params).law, pi) for m in LARGE_MS
        ]
        # rate exactly 1/M (the paper's bounds give 1/sqrt(M) plus an I/sqrt(K) floor): every
        # doubling of M halves the exact TV, at K = 1 too. (Below M ~ 32 the decay can be
        # faster; measured slopes: docs/samplers/ets.md.)
        for s in slopes(LARGE_MS, tvs):
            assert -1.2 < float(s) < -0.9, (k, tvs)


def test_one_step_tv_is_below_rho_over_m() -> None:
    target = ar_target(7, vocab=3, length=3, lam=0.2, graded=True)
    for k in (1, 3, None):
        params: dict[str, Any] = {"energies": "exact"} if k is None else {"num_rollouts": k}
        for m in (1, 2, 4, 16, 64):
            law = ets_step_law(target, num_candidates=m, block_size=1, **params)
            gap = tv(law.as_dict(), law.kernel())
            assert gap <= law.rho / m + 1e-12
        assert law.rho >= 1.0


def test_tv_need_not_decrease_with_k() -> None:
    # specs/ets.md §8.2: rollout noise can cancel part of the finite-M selection bias.
    target = tiltsample.TiltedTarget(
        random_tabular(torch.Generator().manual_seed(0), 3, 3, 0.5),
        ContainsTokenReward(1, 0),
        0.25,
        (),
        3,
    )
    pi = exact_distribution(target).as_dict()
    one = tv(ets_law(target, num_candidates=64, num_rollouts=1, block_size=1).law, pi)
    exact = tv(ets_law(target, num_candidates=64, block_size=1, energies="exact").law, pi)
    assert one < exact


def test_perturbed_proposal_is_consistent_and_clipping_is_not() -> None:
    target = ar_target(8, length=3, lam=0.3)
    prop = perturbed(target.policy, 9, scale=0.9)  # type: ignore[arg-type]
    pi = exact_distribution(target).as_dict()
    for k in (1, 4):
        laws = ets_law_sweep(
            target, num_candidates=LARGE_MS, num_rollouts=k, block_size=1, proposal=prop
        )
        tvs = [tv(law.law, pi) for law in laws]
        for s in slopes(LARGE_MS, tvs):
            assert -1.2 < float(s) < -0.9, (k, tvs)
    clipped = ets_law_sweep(
        target,
        num_candidates=[64, 512],
        num_rollouts=1,
        block_size=1,
        proposal=prop,
        is_log_ratio_clip=0.2,
    )
    floor = [tv(law.law, pi) for law in clipped]
    assert floor[1] > 0.5 * floor[0] > 1e-3, floor  # a floor: clipping biases the energies


def test_masked_diffusion_chain_converges_to_its_target() -> None:
    target = dlm_target(4, "drawn-confidence")
    pi = tilted_law(target)
    for params in ({"num_rollouts": 1}, {"energies": "exact"}):
        laws = ets_law_sweep(target, num_candidates=MS, block_size=1, **params)  # type: ignore[arg-type]
        tvs = [tv(law.law, pi) for law in laws]
        assert float(slopes(MS, tvs)[-1]) < -0.8, tvs


def test_sir_select_rejects_a_lossy_grid() -> None:
    log_q = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="grid_step"):
        sir_select_log_probs(
            log_q,
            torch.zeros(2, dtype=torch.float64),
            torch.tensor([0, 1]),
            torch.zeros(2, dtype=torch.float64),
            torch.tensor([0.0, 30.0], dtype=torch.float64),
            5,
            1,
            grid_step=4.0,
        )


# ----------------------------------------------------------------------------- issue 5 extensions
def _d3_toy(seed: int, scale: float) -> tuple[TiltedTarget, TabularPolicy]:
    from tiltsample.theory.rates.experiments_ets.common import ar_target as _ar_target
    from tiltsample.theory.rates.experiments_ets.common import perturbed as _perturbed

    target = _ar_target(seed, 3, 3, 0.3)
    return target, _perturbed(target, 9, scale)


def test_reference_law_with_default_ratio_is_the_specified_law() -> None:
    from tiltsample.theory.ets_laws import ets_law_reference

    target, small = _d3_toy(8, 0.9)
    ms = [2, 16, 256]
    spec = ets_law_sweep(target, num_candidates=ms, num_rollouts=2, block_size=1, proposal=small)
    ref = ets_law_reference(target, num_candidates=ms, num_rollouts=2, block_size=1, proposal=small)
    for a, b in zip(spec, ref, strict=True):
        assert a.law.keys() == b.law.keys()
        assert max(abs(a.law[x] - b.law[x]) for x in a.law) < 1e-13


def _pair_sir(options: list[tuple[float, float, Any]]) -> dict[Any, float]:
    """M = 2 SIR by enumeration: options ``(probability, weight, label)`` of one extended draw."""
    out: dict[Any, float] = {}
    for p1, w1, c1 in options:
        for p2, w2, c2 in options:
            if w1 + w2 == 0:
                continue
            out[c1] = out.get(c1, 0.0) + p1 * p2 * w1 / (w1 + w2)
            out[c2] = out.get(c2, 0.0) + p1 * p2 * w2 / (w1 + w2)
    return out


def test_reference_law_matches_enumeration_of_the_reference_rule() -> None:
    """Block ratio + temperature mismatch, M = 2, K = 1, d = 2: every (candidate, rollout) pair."""
    from tiltsample.theory.ets_laws import ets_law_reference
    from tiltsample.theory.rates.experiments_ets.common import tempered

    policy = random_tabular(torch.Generator().manual_seed(4), 3, 2, 0.7)
    small = random_tabular(torch.Generator().manual_seed(5), 3, 2, 1.0)
    ref_t, small_t = tempered(policy, 0.7), tempered(small, 0.7)
    target = TiltedTarget(ref_t, ContainsTokenReward(1, 0), 0.5, (), 2, "stop")

    def lp(pol: TabularPolicy, s: tuple[int, ...]) -> list[float]:
        return pol.next_logprobs((), [s])[0].tolist()

    def tilt(x: tuple[int, ...]) -> float:
        return math.exp(float(target.log_tilt([x])[0]))

    def ratio(s: tuple[int, ...], v: int) -> float:  # untempered p_ref / p_small
        return math.exp(lp(policy, s)[v] - lp(small, s)[v])

    # step 1 from the root: candidate v ~ ref_t; a complete candidate is scored exactly,
    # an incomplete one by one rollout w ~ small_t with the untempered ratio
    options = []
    for v in range(3):
        qv = math.exp(lp(ref_t, ())[v])
        block = ratio((), v)
        if v == 0:
            options.append((qv, block * tilt((0,)), (0,)))
            continue
        for w in range(3):
            pw = math.exp(lp(small_t, (v,))[w])
            options.append((qv * pw, block * ratio((v,), w) * tilt((v, w)), (v,)))
    step1 = _pair_sir(options)
    law: dict[tuple[int, ...], float] = {(0,): step1.get((0,), 0.0)}
    for v in (1, 2):  # step 2: complete candidates, weight = block ratio × exact tilt
        opts = [
            (math.exp(lp(ref_t, (v,))[w]), ratio((v,), w) * tilt((v, w)), (v, w)) for w in range(3)
        ]
        for x, p in _pair_sir(opts).items():
            law[x] = step1[(v,)] * p
    got = ets_law_reference(
        target,
        num_candidates=[2],
        num_rollouts=1,
        block_size=1,
        proposal=small_t,
        ratio_numerator=policy,
        ratio_denominator=small,
        ratio_over_block=True,
    )[0].law
    assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
    assert got.keys() == {x for x, p in law.items() if p > 0}
    assert max(abs(got[x] - law[x]) for x in got) < 1e-10


def test_reference_deviation_laws_tend_to_their_limit_laws() -> None:
    """The finite-M reference laws converge (rate 1/M) to the M = ∞ laws of experiment (f)."""
    from tiltsample.theory.ets_laws import ets_law_reference
    from tiltsample.theory.rates.experiments_ets.deviations import deviation_setup

    for name in ("block", "mismatch"):
        _, limit, _, kwargs = deviation_setup(8, 0.9, 0.7)[name]
        laws = ets_law_reference(num_candidates=[256, 1024], **kwargs)
        tvs = [tv(law.law, limit) for law in laws]
        assert tvs[1] < tvs[0] / 3, (name, tvs)
        assert tvs[1] < 1e-3


def test_reference_law_rejects_bad_input() -> None:
    from tiltsample.theory.ets_laws import ets_law_reference

    target, small = _d3_toy(8, 0.5)
    cond = TiltedTarget(target.policy, target.reward, 0.3, (), 3, "condition")
    with pytest.raises(ValueError, match="truncation"):
        ets_law_reference(cond, num_candidates=[4], proposal=small)
    with pytest.raises(ValueError, match="ratio_numerator"):
        other = random_tabular(torch.Generator().manual_seed(0), 4, 3, 1.0)
        ets_law_reference(target, num_candidates=[4], proposal=small, ratio_numerator=other)


def test_energy_estimate_laws_are_unbiased_and_clipping_biases_them() -> None:
    from tiltsample.theory.ets_laws import energy_estimate_laws

    target, small = _d3_toy(8, 0.9)
    laws = energy_estimate_laws(target, block_size=1, proposal=small)
    assert len(laws) == 6  # the incomplete prefixes (1,), (2,) and their 4 children
    for law in laws:
        mean = float((law.probs * torch.exp(law.log_values)).sum())
        assert mean == pytest.approx(math.exp(law.log_energy), rel=1e-12)
    clipped = energy_estimate_laws(target, block_size=1, proposal=small, is_log_ratio_clip=0.2)
    gaps = [
        abs(float((c.probs * torch.exp(c.log_values)).sum()) / math.exp(c.log_energy) - 1)
        for c in clipped
    ]
    assert max(gaps) > 0.01


def test_mean_law_brackets_the_enumerated_tail() -> None:
    import itertools

    from tiltsample.theory.ets_laws import MeanLaw

    gen = torch.Generator().manual_seed(3)
    probs = torch.rand(5, generator=gen, dtype=torch.float64)
    probs = probs / probs.sum()
    values = torch.rand(5, generator=gen, dtype=torch.float64) * 7.0
    values[0] = 0.0
    log_values = torch.log(values)
    for k in (1, 2, 3, 4):
        law = MeanLaw(probs, log_values, k, cells=256)
        center = float((probs * values).sum())
        for radius in (0.0, 0.3, 1.0, 2.5, 6.0):
            exact = sum(
                math.prod(float(probs[j]) for j in c)
                for c in itertools.product(range(5), repeat=k)
                if abs(sum(float(values[j]) for j in c) / k - center) > radius
            )
            lo, hi = law.tail(center, radius)
            assert lo - 1e-12 <= exact <= hi + 1e-12, (k, radius, lo, exact, hi)
        r_lo, r_hi = law.radius(center, 0.1)
        assert r_lo <= r_hi
        assert law.tail(center, r_hi)[1] <= 0.1
    # values on the grid: the bracket is exact
    grid = MeanLaw(torch.tensor([0.5, 0.5]), torch.log(torch.tensor([0.0, 2.0])), 3, cells=2)
    assert grid.tail(1.0, 0.5) == pytest.approx((0.25, 0.25), abs=1e-15)
    with pytest.raises(ValueError, match="delta"):
        grid.radius(1.0, 1.5)
