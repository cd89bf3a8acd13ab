"""Resample-move with entropy-jump cuts (samplers/smc/moves.py, specs/smc.md §8).

Exact: the move's transition matrix (theory.smc_exact.move_kernel) satisfies detailed balance for
gamma_t with the cut-law correction, and is not gamma_t-invariant without it. Implementation:
one move of the sampler from a fixed state has the kernel's row as its law (chi-square), moves
leave exact draws of gamma_t at gamma_t, and SMC with entropy-cut moves targets pi (its
evidence-weighted law is within sampling noise of pi).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from scipy.stats import chisquare
from smc_toys import TRUNCATIONS, merge_rare, smc_runs
from smc_toys import constrained_toy as toy

from tiltsample import TiltedTarget
from tiltsample.samplers import smc
from tiltsample.target import Truncation
from tiltsample.theory import ExactPotential, exact_distribution, tv
from tiltsample.theory.smc_exact import evidence_weighted_law, move_kernel

pytestmark = pytest.mark.usefixtures("serial_torch")


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("twist", ["none", "exact"])
@pytest.mark.parametrize("keep_status", [True, False], ids=["sampler", "reopening"])
def test_entropy_cut_kernel_is_reversible_only_with_the_cut_correction(
    truncation: Truncation, twist: str, keep_status: bool
) -> None:
    """Both the sampler's status-keeping kernel and the EOS-reopening one it replaced satisfy
    detailed balance for gamma_t with the cut-law correction; without it they drift."""
    target = toy(truncation)
    drifts = []
    for t in (2, 3, 4):
        for power in (1.0, 4.0):
            kw: dict[str, Any] = {
                "temperature": 0.7,
                "cut": "entropy_jump",
                "cut_power": power,
                "keep_status": keep_status,
            }
            k = move_kernel(target, t, twist, **kw)
            assert torch.allclose(k.matrix.sum(1), torch.ones(len(k.states), dtype=torch.float64))
            flow = k.gamma[:, None] * k.matrix
            assert float((flow - flow.T).abs().max()) < 1e-14
            naive = move_kernel(target, t, twist, correct=False, **kw)
            drift = float((k.gamma @ naive.matrix - k.gamma).abs().sum())
            drifts.append(drift)
            if not keep_status:
                assert drift > (1e-2 if power == 1.0 else 1e-5), (t, power, drift)  # needed
    if keep_status and twist == "none":
        assert max(drifts) > 1e-4, drifts  # needed (unfinished prefixes all have length t)


def _one_move_from(
    target: TiltedTarget,
    x: tuple[int, ...],
    anchor: tuple[int, ...],
    n: int,
    seed: int,
    **params: Any,
) -> Counter[tuple[int, ...]]:
    """One move of ``n`` copies of ``x``; the extra ``anchor`` row (length ``t``, dropped from
    the counts) fixes the session length ``t`` when ``x`` is shorter."""
    gen = torch.Generator().manual_seed(seed)
    state = smc.state_from_sequences(target, [x] * n + [anchor], generator=gen, **params)
    moved = smc.rejuvenate(state, gen, num_moves=1, **params)
    return Counter(smc.result(moved).sequences[:n])


@pytest.mark.parametrize("truncation", TRUNCATIONS)
def test_one_sampler_move_draws_the_kernel_row(truncation: Truncation) -> None:
    """From the two states where the cut correction changes the kernel row most (chi-square
    noncentrality of the uncorrected row > 50 at this n, rare cells merged, so a missing
    correction fails), one sampler move has the exact row as its law."""
    target = toy(truncation, seed=3, concentration=0.3)  # peaked rows: entropy jumps differ
    params: dict[str, Any] = {
        "twist": "none",
        "move_temperature": 0.7,
        "move_cut": "entropy_jump",
        "move_cut_power": 4.0,
    }
    t, n = 3, 4000
    kw: dict[str, Any] = {"temperature": 0.7, "cut": "entropy_jump", "cut_power": 4.0}
    k = move_kernel(target, t, "none", **kw)
    naive = move_kernel(target, t, "none", correct=False, **kw)
    gaps = []
    for a in range(len(k.states)):
        obs, exp = merge_rare((naive.matrix[a] * n).tolist(), (k.matrix[a] * n).tolist())
        gaps.append(sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True)))
    anchor = next(x for x in k.states if len(x) == t and not target.is_complete(x))
    for a in sorted(range(len(gaps)), key=lambda i: -gaps[i])[:2]:
        assert gaps[a] > 50
        counts = _one_move_from(target, k.states[a], anchor, n, seed=a, **params)
        assert set(counts) <= set(k.states)
        row = k.matrix[a].tolist()
        obs, exp = merge_rare([counts.get(y, 0) for y in k.states], [p * n for p in row])
        assert chisquare(obs, exp).pvalue > 1e-3, (k.states[a], counts)


@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("proposal", ["reference", "optimal"])
def test_entropy_cut_moves_leave_gamma_t_invariant(truncation: Truncation, proposal: str) -> None:
    """With the exact twist, gamma_t (and the fully adapted target of the optimal proposal,
    p(s) sum_v p(v|s) V(s v) = p(s) V(s)) is the time-t marginal of pi."""
    target = toy(truncation)
    pot = ExactPotential(target)
    params: dict[str, Any] = {
        "twist": "lookahead",
        "potential": pot,
        "proposal": proposal,
        "move_temperature": 1.5,
        "move_cut": "entropy_jump",
    }
    n = 3000
    for t in (2, target.max_new_tokens - 1):  # at the cap every particle has finished
        k = move_kernel(target, t, "exact", temperature=1.5, cut="entropy_jump")
        gen = torch.Generator().manual_seed(t)
        idx = torch.multinomial(k.gamma, n, replacement=True, generator=gen)
        state = smc.state_from_sequences(
            target, [k.states[i] for i in idx.tolist()], generator=gen, **params
        )
        moved = smc.rejuvenate(state, gen, num_moves=3, **params)
        assert 0.05 < moved.moves_accepted / moved.moves_proposed < 1.0
        counts = Counter(smc.result(moved).sequences)
        assert set(counts) <= set(k.states)
        obs, exp = merge_rare([counts.get(y, 0) for y in k.states], (k.gamma * n).tolist())
        assert chisquare(obs, exp).pvalue > 1e-3


def test_smc_with_entropy_cut_moves_targets_pi() -> None:
    """Evidence-weighted law of R runs (unbiased for pi at every N) within 4 noise units."""
    target = toy("stop")
    pi = exact_distribution(target)
    r, n = 600, 8
    state = smc_runs(target, n, r, 5, ess_threshold=1.0, num_moves=2, move_cut="entropy_jump")
    assert state.moves_accepted > 0
    law, noise = evidence_weighted_law(smc.result(state), pi.log_z)
    dist = tv(law, pi)
    assert dist < 4 * noise, (dist, noise)
    ratio = torch.exp(smc.log_evidence_runs(state) - pi.log_z)
    assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(r)


def test_bad_cut_names_itself() -> None:
    with pytest.raises(ValueError, match="move_cut"):
        smc.sampler(toy(), num_samples=4, move_cut="entropy")
    with pytest.raises(ValueError, match="move_cut_power"):
        smc.sampler(toy(), num_samples=4, move_cut_power=0.0)
