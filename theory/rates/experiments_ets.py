r"""Rate experiments of ETS (``specs/ets.md`` §8–§9, §11) on exact output laws.

Every TV below is between the **exact** output law of the sampler as implemented
(:func:`~tiltsample.theory.ets_laws.ets_law_sweep`: the guidance steps composed over the prefix
tree, each step a 1-D quadrature) and the exact target — no sampling noise, so rates are resolved
to ``1e-6`` and below. Keys follow issue 5:

``a``  TV vs ``M`` at fixed ``I`` with exact energies: fitted slope (paper needs ``<= −1/2``, SIR
       theory predicts ``−1``) against Prop. 3 as published (minimised over ``eps``), Prop. 3 with
       the Lemma 2 slip corrected, and the ``(1/M) Σ_i E_{p*}[ρ̂_i]`` bound of §8.2.
``b``  TV vs ``M`` at each ``K`` with Monte-Carlo energies, and TV vs ``K`` at the largest ``M``:
       is there a floor ``∝ I/√K`` (Prop. 3 with the Prop. 4 radius), or none?
``c``  TV vs ``I`` at fixed ``(M, K)``: linear (Remark 2), flat or non-monotone?
``d``  ETS-IS with perturbed proposals of known likelihood-ratio bound ``L``: TV vs ``K`` and ``L``
       against Theorem 1 (minimised over ``eps``) and the ``ρ̂/M`` bound.
``f``  The reference code's deviations (§11): clipping of the IS log-ratio (exact finite-``M``
       law), the IS ratio over the candidate block and the temperature mismatch (exact ``M → ∞``
       limit laws), the majority-vote reward (not a fixed target: not measurable as a TV).
``g``  Generated tokens of the ``ets`` sampler vs the cost formula ``M(1 + K(I − 1)/2)d``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tiltsample.target import TiltedTarget
from tiltsample.theory import bounds
from tiltsample.theory.rates.core import (
    CellCache,
    ExperimentResult,
    bound_violations,
    cell_key,
    finite_or_inf,
    fit_loglog_slope,
    new_figure,
    save_figure,
)
from tiltsample.types import Seq

D_BINARY = 1.0
"""(A1) for the binary reward ``r ∈ {0, 1} ⊂ [−1, 1]``."""


# ----------------------------------------------------------------------------- toys and helpers
def _ar_target(
    seed: int, vocab: int, length: int, lam: float, eos_prob: float | None = None
) -> TiltedTarget:
    """A random tabular policy (Dirichlet 0.7) tilted by ``r = 1{token 1 occurs}``, ``"stop"``."""
    from tiltsample.targets.rewards import ContainsTokenReward
    from tiltsample.targets.tabular import random_tabular

    policy = random_tabular(
        torch.Generator().manual_seed(seed), vocab, length, 0.7, eos_prob=eos_prob
    )
    return TiltedTarget(policy, ContainsTokenReward(1, 0), lam, (), length, "stop")


def _perturbed(target: TiltedTarget, seed: int, scale: float) -> Any:
    """A proposal policy: every row of ``p_ref`` mixed with a random Dirichlet(1) row."""
    from tiltsample.targets.tabular import TabularPolicy, random_tabular

    policy: TabularPolicy = target.policy  # type: ignore[assignment]
    other = random_tabular(
        torch.Generator().manual_seed(seed), policy.vocab_size, policy.max_len, 1.0
    ).table
    rows = {}
    for key, row in policy.table.items():
        mix = torch.logaddexp(row + math.log(1 - scale), other[key] + math.log(scale))
        rows[key] = mix - torch.logsumexp(mix, 0)
    return TabularPolicy(policy.vocab_size, policy.eos_id, policy.max_len, rows)


def _tempered(policy: Any, temperature: float) -> Any:
    """The full-vocabulary tempered tabular policy ``softmax(log p / t)``."""
    from tiltsample.targets.tabular import TabularPolicy

    rows = {k: torch.log_softmax(r / temperature, 0) for k, r in policy.table.items()}
    return TabularPolicy(policy.vocab_size, policy.eos_id, policy.max_len, rows)


def _pi(target: TiltedTarget) -> dict[Seq, float]:
    from tiltsample.theory import exact_distribution

    return exact_distribution(target).as_dict()


def _z(target: TiltedTarget) -> float:
    from tiltsample.theory import exact_distribution

    return math.exp(exact_distribution(target).log_z)


def _tvs(target: TiltedTarget, ms: list[int], **params: Any) -> list[float]:
    """Exact ``TV(ETS output law, pi)`` for every ``M`` of ``ms`` (one tree for all)."""
    from tiltsample.theory import tv
    from tiltsample.theory.ets_laws import ets_law_sweep

    pi = _pi(target)
    return [tv(law.law, pi) for law in ets_law_sweep(target, num_candidates=ms, **params)]


def _rho_sum(target: TiltedTarget, **params: Any) -> float:
    r"""``Σ_i E_{x ~ p*(x_{t_i})}[ρ̂_i(x)]`` (``specs/ets.md`` §8.2): ``TV <= this / M``.

    The boundary states' law under ``p*`` is the composition of the exact kernels ``pi(c | x)``
    (:attr:`~tiltsample.theory.ets_laws.StepLaw.log_kernel`); ``ρ̂`` does not depend on ``M``.
    """
    from tiltsample.theory.ets_laws import ets_step_law

    layer: dict[Any, float] = {None: 1.0}
    total = 0.0
    step = 1
    while layer:
        nxt: dict[Any, float] = {}
        for x, p in layer.items():
            law = ets_step_law(target, x, guidance_step=step, num_candidates=1, **params)
            total += p * law.rho
            probs = torch.exp(law.log_kernel).tolist()
            for key, done, prob in zip(law.candidates, law.complete, probs, strict=True):
                if not done and prob > 0:
                    nxt[key] = nxt.get(key, 0.0) + p * prob
        layer = nxt
        step += 1
    return total


def _min_over_eps(bound: Callable[[float], float]) -> float:
    """``min_{eps ∈ (0, 1)}`` of a bound on a log grid (``inf`` if vacuous everywhere)."""
    values = [bound(float(e)) for e in np.logspace(-12, -1e-3, 400)]
    return min(values)


def _prop3_rows(i: int, m: int, lam: float, z: float) -> dict[str, float | str]:
    published, _ = bounds.ets_prop3_best_eps(i, m, D=D_BINARY, lam=lam, C=z)
    corrected = _min_over_eps(lambda e: bounds.ets_prop3_corrected(i, m, D_BINARY, lam, e))
    corrected_floor1 = _min_over_eps(
        lambda e: bounds.ets_prop3_corrected(i, m, D_BINARY, lam, e, energy_floor=1.0)
    )
    return {
        "prop3_published": finite_or_inf(min(published, math.inf)),
        "prop3_corrected": finite_or_inf(corrected),
        "prop3_corrected_floor1": finite_or_inf(corrected_floor1),
    }


def _finite(value: float | str) -> bool:
    return not isinstance(value, str) and math.isfinite(value)


def _two_panels(
    left: tuple[str, str, str], right: tuple[str, str, str]
) -> tuple[Any, tuple[Any, Any]]:
    """A two-panel matplotlib figure (Agg backend); each panel ``(title, xlabel, ylabel)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, xlabel, ylabel) in zip(axes, (left, right), strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    return fig, (axes[0], axes[1])


def _log_ticks(ticks: list[int], *axes: Any) -> None:
    """Label a log x-axis at ``ticks`` only (no crowded minor labels)."""
    from matplotlib.ticker import NullFormatter

    for ax in axes:
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ticks, [str(t) for t in ticks])


# ----------------------------------------------------------------------------- (a)
def ets_tv_vs_m_exact(profile: str, cache: CellCache, out: Path) -> ExperimentResult:
    """(a) ETS TV vs ``M`` at fixed ``I`` with exact (oracle) energies."""
    lam, length = 0.5, 4
    target = _ar_target(0, 3, length, lam)
    steps = length  # B = 1
    ms = [4, 8, 16, 32, 64, 128, 256] + ([512, 1024, 2048, 4096] if profile == "full" else [])
    params = {"block_size": 1, "energies": "exact"}
    rho = cache.get_or_run(cell_key("a-rho", lam=lam), partial(_rho_sum, target, **params))
    z = _z(target)
    rows = []
    for m in ms:
        value = cache.get_or_run(
            cell_key("a", m=m, lam=lam), partial(lambda m: _tvs(target, [m], **params)[0], m)
        )
        rows.append(
            {"M": m, "tv_exact_law": value, "rho_bound": min(1.0, rho / m)}
            | _prop3_rows(steps, m, lam, z)
        )
    tail = [r for r in rows if r["M"] >= 16]
    fit = fit_loglog_slope([r["M"] for r in tail], [r["tv_exact_law"] for r in tail])
    pairs = [
        ("tv_exact_law", k)
        for k in ("rho_bound", "prop3_published", "prop3_corrected", "prop3_corrected_floor1")
    ]
    rho_ok = not bound_violations(rows, pairs[:1])
    prop_ok = not bound_violations(rows, pairs[1:])
    first_finite = {
        k: next((r["M"] for r in rows if _finite(r[k]) and r[k] < 1), "none")
        for k in ("prop3_published", "prop3_corrected", "prop3_corrected_floor1")
    }
    fig, ax = new_figure(
        f"(a) ETS, I = {steps}, exact energies: TV vs M", "candidates M", "TV(law, pi)"
    )
    xs = [r["M"] for r in rows]
    ax.loglog(xs, [r["tv_exact_law"] for r in rows], "o-", label="exact output law")
    ax.loglog(xs, [r["rho_bound"] for r in rows], "--", label="(1/M) Σ_i E[rho_i] (§8.2)")
    for k, style in (("prop3_published", "-."), ("prop3_corrected_floor1", ":")):
        pts = [(r["M"], r[k]) for r in rows if _finite(r[k])]
        if pts:
            ax.loglog(*zip(*pts, strict=True), style, label=k.replace("_", " "))
    ax.loglog(xs, np.exp(fit.intercept) * np.array(xs, float) ** fit.slope, color="gray", lw=0.7)
    ax.legend(fontsize=7)
    return ExperimentResult(
        key="a",
        title=f"ETS TV vs M at I = {steps} (exact energies)",
        result="ETS Prop. 3 (A1, A2, A4; as published and with the Lemma 2 slip fixed) and "
        "specs/ets.md §8.2 (TV <= Σ_i E[rho_i]/M)",
        bound=f"Prop. 3: Õ(I/sqrt(M)), min over eps (C = Z = {z:.3f}, D = 1, lam = {lam}); "
        f"§8.2: {rho:.3f}/M",
        measured=f"TV = {rows[0]['tv_exact_law']:.3g} (M = {ms[0]}) … "
        f"{rows[-1]['tv_exact_law']:.3g} (M = {ms[-1]}); Prop. 3 below 1 (informative) from M = "
        f"{first_finite['prop3_published']} (published), "
        f"{first_finite['prop3_corrected_floor1']} (corrected, energy floor 1), "
        f"{first_finite['prop3_corrected']} (corrected, floor e^(−D/lam))",
        rate=f"slope {fit} (M >= 16)",
        verdict=(
            ("rate ≈ −1 (§8.2), faster than the paper's −1/2; " if fit.high < -0.5 else "")
            + ("§8.2 bound holds at every M; " if rho_ok else "§8.2 bound VIOLATED; ")
            + (
                "Prop. 3 holds where finite (> 1, i.e. vacuous, below the M above)"
                if prop_ok
                else "Prop. 3 VIOLATED"
            )
        ),
        rows=rows,
        figure=save_figure(fig, out / "a_ets_tv_vs_m.png"),
        holds=rho_ok and prop_ok,
        fit=fit,
        bound_pairs=pairs,
    )


# ----------------------------------------------------------------------------- (b)
def ets_tv_vs_k(profile: str, cache: CellCache, out: Path) -> ExperimentResult:
    """(b) ETS TV vs ``M`` at each ``K`` (MC energies), and TV vs ``K`` at the largest ``M``."""
    lam, length = 0.2, 3
    target = _ar_target(0, 3, length, lam)
    steps = length
    full = profile == "full"
    ms = [16, 32, 64, 128, 256] + ([512, 1024, 2048] if full else [])
    ks: list[int | str] = [1, 2, 4] + ([8, 16] if full else []) + ["exact"]
    rows = []
    fits = {}
    for k in ks:
        params: dict[str, Any] = (
            {"block_size": 1, "energies": "exact"}
            if k == "exact"
            else {"block_size": 1, "num_rollouts": k}
        )
        tvs = cache.get_or_run(
            cell_key("b", k=k, ms=ms, lam=lam), partial(_tvs, target, ms, **params)
        )
        rho = cache.get_or_run(cell_key("b-rho", k=k, lam=lam), partial(_rho_sum, target, **params))
        # the paper's floor: Prop. 3's I·eps with eps the Prop. 4 radius (L = 1, delta = 0.05)
        floor = 0.0 if k == "exact" else steps * bounds.ets_prop4(1.0, D_BINARY, lam, int(k), 0.05)
        for m, value in zip(ms, tvs, strict=True):
            rows.append(
                {
                    "K": str(k),
                    "M": m,
                    "tv_exact_law": value,
                    "rho_bound": min(1.0, rho / m),
                    "paper_floor_I_eps": floor,
                }
            )
        fits[str(k)] = fit_loglog_slope(ms[-4:], tvs[-4:])
    pairs = [("tv_exact_law", "rho_bound")]
    rho_ok = not bound_violations(rows, pairs)
    no_floor = all(f.high < -0.5 for f in fits.values())
    at_max = {r["K"]: r["tv_exact_law"] for r in rows if r["M"] == ms[-1]}
    mc = [at_max[str(k)] for k in ks if k != "exact"]
    monotone = all(a >= b for a, b in itertools.pairwise(mc))
    fig, ax = new_figure(
        f"(b) ETS, I = {steps}, MC energies: TV vs M at each K", "candidates M", "TV(law, pi)"
    )
    for k in ks:
        sel = [r for r in rows if r["K"] == str(k)]
        ax.loglog([r["M"] for r in sel], [r["tv_exact_law"] for r in sel], "o-", label=f"K = {k}")
    ax.legend(fontsize=7)
    return ExperimentResult(
        key="b",
        title=f"ETS TV vs M at each K (Monte-Carlo energies), I = {steps}",
        result="ETS Prop. 3 / Thm 1 floor I·eps with eps ~ 1/sqrt(K) (Prop. 4) vs "
        "specs/ets.md §8.2 (no floor; TV <= Σ_i E[rho_i(K)]/M)",
        bound=f"paper: floor I·eps_K = {rows[0]['paper_floor_I_eps']:.3g} at K = 1 (vacuous: "
        f"> 1); §8.2: rho/M with a Var/(K M) term",
        measured=f"TV at M = {ms[-1]}: " + ", ".join(f"K = {k}: {at_max[str(k)]:.3g}" for k in ks),
        rate="; ".join(f"K = {k}: {fits[str(k)]}" for k in ks),
        verdict=(
            ("no floor: slope ≈ −1 in M at every K, K = 1 included; " if no_floor else "FLOOR; ")
            + (
                "TV decreasing in K at the largest M; "
                if monotone
                else "TV not monotone in K at the largest M; "
            )
            + ("§8.2 bound holds" if rho_ok else "§8.2 bound VIOLATED")
        ),
        rows=rows,
        figure=save_figure(fig, out / "b_ets_tv_vs_k.png"),
        holds=rho_ok,
        fit=fits["1"],
        bound_pairs=pairs,
    )


# ----------------------------------------------------------------------------- (c)
def ets_tv_vs_i(profile: str, cache: CellCache, out: Path) -> ExperimentResult:
    """(c) ETS TV vs the number of guidance steps ``I`` at fixed ``(M, K)``."""
    full = profile == "full"
    lam, length, m = 0.3, (6 if full else 4), 16
    target = _ar_target(1, 3, length, lam)
    blocks = [b for b in range(length, 0, -1) if length % b == 0]
    ks: list[int | str] = [1, 3, "exact"] if full else [1, "exact"]
    z = _z(target)
    rows = []
    for k in ks:
        for b in blocks:
            params: dict[str, Any] = (
                {"block_size": b, "energies": "exact"}
                if k == "exact"
                else {"block_size": b, "num_rollouts": k}
            )
            value = cache.get_or_run(
                cell_key("c", k=k, b=b, m=m, d=length, lam=lam),
                partial(lambda p: _tvs(target, [m], **p)[0], params),
            )
            rho = cache.get_or_run(
                cell_key("c-rho", k=k, b=b, d=length, lam=lam),
                partial(_rho_sum, target, **params),
            )
            published, _ = bounds.ets_prop3_best_eps(length // b, m, D_BINARY, lam, z)
            rows.append(
                {
                    "K": str(k),
                    "I": length // b,
                    "B": b,
                    "tv_exact_law": value,
                    "rho_bound": min(1.0, rho / m),
                    "prop3_published": finite_or_inf(published),
                }
            )
    pairs = [("tv_exact_law", "rho_bound"), ("tv_exact_law", "prop3_published")]
    rho_ok = not bound_violations(rows, pairs[:1])
    prop_ok = not bound_violations(rows, pairs[1:])
    shapes = {}
    for k in ks:
        tvs = [r["tv_exact_law"] for r in rows if r["K"] == str(k)]
        up = all(a <= b for a, b in itertools.pairwise(tvs))
        down = all(a >= b for a, b in itertools.pairwise(tvs))
        growth = tvs[-1] / tvs[0]
        shapes[str(k)] = (
            "increasing" if up else "decreasing" if down else "non-monotone"
        ) + f", TV(I={length})/TV(I=1) = {growth:.2f}"
    fit = fit_loglog_slope(
        [r["I"] for r in rows if r["K"] == "exact"],
        [r["tv_exact_law"] for r in rows if r["K"] == "exact"],
    )
    fig, ax = new_figure(
        f"(c) ETS TV vs I at M = {m} (d = {length})", "guidance steps I", "TV(law, pi)"
    )
    for k in ks:
        sel = [r for r in rows if r["K"] == str(k)]
        ax.loglog([r["I"] for r in sel], [r["tv_exact_law"] for r in sel], "o-", label=f"K = {k}")
    ax.legend(fontsize=7)
    return ExperimentResult(
        key="c",
        title=f"ETS TV vs I at fixed (M = {m}, K)",
        result="ETS Prop. 3 / Remark 2 (bound linear in I) and specs/ets.md §8.2",
        bound="Prop. 3: linear in I (vacuous here); §8.2: Σ_{i<=I} E[rho_i]/M",
        measured="; ".join(f"K = {k}: {s}" for k, s in shapes.items()),
        rate=f"exact energies: slope in I {fit}",
        verdict=(
            "TV vs I measured (no direction assumed): "
            + "; ".join(f"K = {k} {s.split(',')[0]}" for k, s in shapes.items())
            + ("; §8.2 bound holds" if rho_ok else "; §8.2 bound VIOLATED")
            + ("; Prop. 3 holds where finite" if prop_ok else "; Prop. 3 VIOLATED")
        ),
        rows=rows,
        figure=save_figure(fig, out / "c_ets_tv_vs_i.png"),
        holds=rho_ok and prop_ok,
        fit=fit,
        bound_pairs=pairs,
    )


# ----------------------------------------------------------------------------- (d)
def likelihood_ratio_bound(target: TiltedTarget, proposal: Any) -> float:
    r"""(A3)'s ``L = sup_{s, x_0} p_ref(x_0 | s) / p_small(x_0 | s)`` over every state ``s`` and
    completion ``x_0`` (a max-product recursion over the prefix trie, ``"stop"`` convention)."""
    policy = target.policy
    eos, length = target.eos_id, target.max_new_tokens
    memo: dict[Seq, float] = {}

    def log_sup(s: Seq) -> float:
        if s in memo:
            return memo[s]
        ref = policy.next_logprobs((), [s])[0]
        small = proposal.next_logprobs((), [s])[0]
        best = -math.inf
        for v in range(len(ref)):
            if ref[v] == -math.inf:
                continue
            tail = 0.0 if v == eos or len(s) + 1 == length else log_sup((*s, v))
            best = max(best, float(ref[v] - small[v]) + tail)
        memo[s] = best
        return best

    log_sup(())
    return math.exp(max(memo.values()))


def _theorem1(steps: int, m: int, k: int, lam: float, big_l: float, z: float, eps: float) -> float:
    return bounds.ets_theorem1(steps, m, k, D_BINARY, lam, big_l, eps, z)


PROP4_DELTA = 0.05
PROP4_CELLS = 2048


def _prop4_cell(seed: int, scale: float, k: int, lam: float) -> dict[str, float]:
    r"""ETS-IS Prop. 4 at every state of the ``d = 3`` toy: the worst state's exact tail.

    For every incomplete candidate ``c`` (every guidance step) the law of ``Ê(c) = mean_K(Y)`` is
    bracketed by :class:`~tiltsample.theory.ets_laws.MeanLaw` (certified, grid ``max Y/2048``);
    returned are the maxima over states of ``P(|Ê − E| > radius)`` at Prop. 4's radius and at the
    state-range Hoeffding radius, and of the exact ``(1 − δ)``-quantile of ``|Ê − E|``.
    """
    from tiltsample.theory.ets_laws import MeanLaw, energy_estimate_laws

    target = _ar_target(seed, 3, 3, lam)
    prop = _perturbed(target, 9, scale)
    big_l = likelihood_ratio_bound(target, prop)
    radius = bounds.ets_prop4(big_l, D_BINARY, lam, k, PROP4_DELTA)
    worst = {
        "prop4_radius": radius,
        "tail_at_prop4_lo": 0.0,
        "tail_at_prop4_hi": 0.0,
        "hoeffding_state_radius": 0.0,
        "tail_at_hoeffding_hi": 0.0,
        "measured_radius_lo": 0.0,
        "measured_radius_hi": 0.0,
        "states": 0.0,
    }
    for law in energy_estimate_laws(target, block_size=1, proposal=prop):
        y = torch.exp(law.log_values)
        energy = math.exp(law.log_energy)
        mean_law = MeanLaw(law.probs, law.log_values, k, PROP4_CELLS)
        lo, hi = mean_law.tail(energy, radius)
        h_radius = bounds.hoeffding_radius(float(y.max() - y.min()), k, PROP4_DELTA)
        r_lo, r_hi = mean_law.radius(energy, PROP4_DELTA)
        for key, value in (
            ("tail_at_prop4_lo", lo),
            ("tail_at_prop4_hi", hi),
            ("hoeffding_state_radius", h_radius),
            ("tail_at_hoeffding_hi", mean_law.tail(energy, h_radius)[1]),
            ("measured_radius_lo", r_lo),
            ("measured_radius_hi", r_hi),
        ):
            worst[key] = max(worst[key], value)
        worst["states"] += 1
    return worst


def ets_is(profile: str, cache: CellCache, out: Path) -> ExperimentResult:
    """(d) ETS-IS TV vs ``K`` and vs the likelihood-ratio bound ``L`` of a perturbed proposal."""
    full = profile == "full"
    lam, length = 0.3, 3
    target = _ar_target(8, 3, length, lam)
    steps = length
    m = 1024 if full else 128
    scales = [0.3, 0.6, 0.9]
    ks = [1, 2, 4, 8] + ([16, 32] if full else [])
    z = _z(target)
    rows = []
    for scale in scales:
        prop = _perturbed(target, 9, scale)
        big_l = likelihood_ratio_bound(target, prop)
        for k in ks:
            params = {"block_size": 1, "num_rollouts": k, "proposal": prop}
            value = cache.get_or_run(
                cell_key("d", scale=scale, k=k, m=m, lam=lam),
                partial(lambda p: _tvs(target, [m], **p)[0], params),
            )
            rho = cache.get_or_run(
                cell_key("d-rho", scale=scale, k=k, lam=lam), partial(_rho_sum, target, **params)
            )
            thm1 = _min_over_eps(partial(_theorem1, steps, m, k, lam, big_l, z))
            tail = cache.get_or_run(
                cell_key(
                    "d-prop4", scale=scale, k=k, lam=lam, delta=PROP4_DELTA, cells=PROP4_CELLS
                ),
                partial(_prop4_cell, 8, scale, k, lam),
            )
            rows.append(
                {
                    "scale": scale,
                    "L": big_l,
                    "K": k,
                    "M": m,
                    "tv_exact_law": value,
                    "rho_bound": min(1.0, rho / m),
                    "theorem1": finite_or_inf(thm1),
                    "delta": PROP4_DELTA,
                }
                | {key: v for key, v in tail.items() if key != "states"}
            )
            n_states = int(tail["states"])
    # M-rate at the strongest perturbation, K = 1: consistent as M grows?
    ms = [16, 32, 64, 128, 256] + ([512, 1024] if full else [])
    prop = _perturbed(target, 9, scales[-1])
    m_tvs = cache.get_or_run(
        cell_key("d-m", scale=scales[-1], k=1, ms=ms, lam=lam),
        partial(_tvs, target, ms, block_size=1, num_rollouts=1, proposal=prop),
    )
    fit = fit_loglog_slope(ms[-4:], m_tvs[-4:])
    pairs = [
        ("tv_exact_law", "rho_bound"),
        ("tv_exact_law", "theorem1"),
        ("tail_at_prop4_hi", "delta"),
        ("tail_at_hoeffding_hi", "delta"),
        ("measured_radius_lo", "prop4_radius"),
    ]
    violations = bound_violations(rows, pairs)
    rho_ok = not bound_violations(rows, pairs[:1])
    thm_ok = not bound_violations(rows, pairs[1:2])
    prop4_ok = not bound_violations(rows, pairs[2:])
    n_finite = sum(_finite(r["theorem1"]) and r["theorem1"] < 1 for r in rows)
    small_l = [r for r in rows if r["scale"] == scales[0]]
    radius_fit = fit_loglog_slope(
        [r["K"] for r in small_l], [r["measured_radius_hi"] for r in small_l]
    )
    slack = min(r["prop4_radius"] / r["measured_radius_hi"] for r in rows)
    worst_tail = max(r["tail_at_prop4_hi"] for r in rows)
    worst_h_tail = max(r["tail_at_hoeffding_hi"] for r in rows)
    fig, (ax, ax2) = _two_panels(
        (f"(d) ETS-IS at M = {m}: TV vs K", "rollouts K", "TV(law, pi)"),
        ("(d) Prop. 4: radius of |E − Ê| at δ = 0.05 (worst state)", "rollouts K", "radius"),
    )
    for scale in scales:
        sel = [r for r in rows if r["scale"] == scale]
        label = f"L = {sel[0]['L']:.2f}"
        ks_ = [r["K"] for r in sel]
        ax.loglog(ks_, [r["tv_exact_law"] for r in sel], "o-", label=label)
        ax.loglog(ks_, [r["rho_bound"] for r in sel], ":", color="gray")
        line = ax2.loglog(ks_, [r["measured_radius_hi"] for r in sel], "o-", label=label)[0]
        ax2.loglog(ks_, [r["prop4_radius"] for r in sel], "--", color=line.get_color())
        ax2.loglog(ks_, [r["hoeffding_state_radius"] for r in sel], ":", color=line.get_color())
    ax2.plot([], [], "k--", label="Prop. 4 (as published)")
    ax2.plot([], [], "k:", label="Hoeffding, state's range")
    ax.plot([], [], ":", color="gray", label="§8.2 bound rho/M")
    ax.legend(fontsize=7)
    ax2.legend(fontsize=6)
    _log_ticks(ks, ax, ax2)
    by_l = {r["L"]: r["tv_exact_law"] for r in rows if r["K"] == ks[0]}
    return ExperimentResult(
        key="d",
        title="ETS-IS: TV vs K and vs the likelihood-ratio bound L",
        result="ETS Prop. 4 (tail of /E − Ê_small/, A1, A3) / Theorem 1 (A1, A3, A4) and "
        "specs/ets.md §8.2 (rho includes the IS variance)",
        bound=f"Prop. 4: /E − Ê/ <= L e^(D/lam) sqrt(log(2/δ)/(2K)) w.p. >= 1 − δ (δ = "
        f"{PROP4_DELTA}); Thm 1: Õ(I/sqrt(M) + I/sqrt(K)), min over eps; below 1 in "
        f"{n_finite}/{len(rows)} cells; §8.2: rho(K, L)/M",
        measured=f"Prop. 4 (exact tails at all {n_states} states, certified to a grid of "
        f"max Y/{PROP4_CELLS}): worst P(/E − Ê/ > radius) = {worst_tail:.2g} at the published "
        f"radius, {worst_h_tail:.2g} at the state-range Hoeffding radius (δ = {PROP4_DELTA}); "
        f"published radius / measured 95% radius >= {slack:.1f}. TV at M = {m}, K = 1: "
        + ", ".join(f"L = {lv:.2f}: {tvv:.3g}" for lv, tvv in by_l.items())
        + f"; K = {ks[-1]}: "
        + ", ".join(f"{r['tv_exact_law']:.3g}" for r in rows if r["K"] == ks[-1]),
        rate=f"measured 95% radius vs K at L = {small_l[0]['L']:.2f}: slope {radius_fit} "
        f"(Prop. 4: −1/2); TV vs M at L = {max(by_l):.2f}, K = 1: slope {fit} (consistent, no "
        "K floor)",
        verdict=(
            (
                f"Prop. 4 holds at every state, K and L (loose: radius ≥ {slack:.0f}× the "
                "measured one); "
                if prop4_ok
                else "Prop. 4 VIOLATED; "
            )
            + ("§8.2 bound holds; " if rho_ok else "§8.2 bound VIOLATED; ")
            + ("Thm 1 holds where finite" if thm_ok else "Thm 1 VIOLATED")
            + ("" if n_finite else " (but >= 1, i.e. vacuous, in every cell: its 4I exp(...) term)")
        ),
        rows=rows + [{"M": mm, "tv_K1_strongest": t} for mm, t in zip(ms, m_tvs, strict=True)],
        figure=save_figure(fig, out / "d_ets_is.png"),
        holds=not violations,
        fit=fit,
        bound_pairs=pairs,
    )


# ----------------------------------------------------------------------------- (f)
def _limit_law(
    target: TiltedTarget,
    candidate: Callable[[Seq], Tensor],
    rollout: Callable[[Seq], Tensor],
) -> dict[Seq, float]:
    r"""The ``M → ∞`` output law of a ``B = 1`` ETS variant (``"stop"`` convention).

    As ``M → ∞`` one SIR step selects ``c`` with probability ``∝ q(c) E[W_c]``, so the chain is
    the Markov chain ``P(v | s) ∝ exp(candidate(s)[v]) · E'(s v)``, where
    ``log E'(s) = logsumexp_v(rollout(s)[v] + log E'(s v))`` and ``E'(x) = exp(log_tilt(x))`` on
    complete ``x``: ``candidate`` is ``log q + log`` (the candidate weight's block factor), and
    ``rollout`` the per-token log of (rollout law × IS factor) — the mean of the energy estimator.
    """
    eos, length = target.eos_id, target.max_new_tokens
    completes: list[Seq] = []

    def walk(s: Seq) -> None:
        for v in range(target.policy.vocab_size):
            x = (*s, v)
            if v == eos or len(x) == length:
                completes.append(x)
            else:
                walk(x)

    walk(())
    tilt = dict(zip(completes, target.log_tilt(completes).tolist(), strict=True))
    memo: dict[Seq, float] = {}

    def child(s: Seq, v: int) -> float:
        x = (*s, v)
        return tilt[x] if x in tilt else log_energy(x)

    def log_energy(s: Seq) -> float:
        if s not in memo:
            f = rollout(s).tolist()
            memo[s] = _lse([a + child(s, v) for v, a in enumerate(f) if a > -math.inf])
        return memo[s]

    law: dict[Seq, float] = {}

    def forward(s: Seq, logp: float) -> None:
        c = candidate(s).tolist()
        scores = [a + child(s, v) if a > -math.inf else -math.inf for v, a in enumerate(c)]
        norm = _lse(scores)
        for v, sc in enumerate(scores):
            if sc == -math.inf:
                continue
            x = (*s, v)
            if x in tilt:
                law[x] = math.exp(logp + sc - norm)
            else:
                forward(x, logp + sc - norm)

    forward((), 0.0)
    return law


def _lse(values: list[float]) -> float:
    top = max(values, default=-math.inf)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


DEVIATIONS = ("block", "mismatch", "both")
"""The reference-code IS-ratio deviations of ``specs/ets.md`` §11 items 2–3 measured in (f)."""


def _deviation_setup(
    seed: int, scale: float, temperature: float
) -> dict[str, tuple[str, dict[Seq, float], TiltedTarget, dict[str, Any]]]:
    r"""Each variant: ``(label, M = ∞ limit law, the target it is measured against, kwargs)``.

    ``kwargs`` are those of :func:`~tiltsample.theory.ets_laws.ets_law_reference` (``B = 1``,
    ``K = 1``) giving the variant's exact finite-``M`` law. The temperature-mismatch variants
    sample candidates and rollouts at ``t`` (tempered tables) with ratios from the untempered
    log-probs, and are measured against the tilt of the tempered sampler (``specs/ets.md`` §1).
    """
    target = _ar_target(seed, 3, 3, 0.3)
    ref = target.policy
    small = _perturbed(target, 9, scale)
    ref_t, small_t = _tempered(ref, temperature), _tempered(small, temperature)
    target_t = TiltedTarget(ref_t, target.reward, target.lam, (), target.max_new_tokens, "stop")

    def lp(policy: Any) -> Callable[[Seq], Tensor]:
        return lambda s: policy.next_logprobs((), [s])[0]

    def plus(
        *fs: Callable[[Seq], Tensor], minus: Callable[[Seq], Tensor] | None = None
    ) -> Callable[[Seq], Tensor]:
        def f(s: Seq) -> Tensor:
            total = sum((g(s) for g in fs), torch.zeros(ref.vocab_size, dtype=torch.float64))
            if minus is not None:
                total = total - minus(s)
            return torch.nan_to_num(total, nan=-math.inf)

        return f

    base: dict[str, Any] = {"block_size": 1, "num_rollouts": 1}
    untempered = {"ratio_numerator": ref, "ratio_denominator": small}
    return {
        "consistent": (
            "consistent ETS-IS",
            _limit_law(target, lp(ref), plus(lp(small), lp(ref), minus=lp(small))),
            target,
            base | {"target": target, "proposal": small},
        ),
        "block": (
            "IS ratio over the candidate block",
            _limit_law(target, plus(lp(ref), lp(ref), minus=lp(small)), lp(ref)),
            target,
            base | {"target": target, "proposal": small, "ratio_over_block": True},
        ),
        "mismatch": (
            f"temperature mismatch t = {temperature}",
            _limit_law(target_t, lp(ref_t), plus(lp(small_t), lp(ref), minus=lp(small))),
            target_t,
            base | {"target": target_t, "proposal": small_t} | untempered,
        ),
        "both": (
            "block ratio + temperature mismatch",
            _limit_law(
                target_t,
                plus(lp(ref_t), lp(ref), minus=lp(small)),
                plus(lp(small_t), lp(ref), minus=lp(small)),
            ),
            target_t,
            base | {"target": target_t, "proposal": small_t, "ratio_over_block": True} | untempered,
        ),
    }


def _deviation_limits(seed: int, scale: float, temperature: float) -> dict[str, float]:
    """TV to the target of each ``M → ∞`` limit law (consistent variant and deviations)."""
    from tiltsample.theory import tv

    return {
        f"{label} (M = inf)": tv(limit, _pi(measured))
        for label, limit, measured, _ in _deviation_setup(seed, scale, temperature).values()
    }


def _deviation_curve(
    seed: int, scale: float, temperature: float, name: str, ms: list[int]
) -> dict[str, list[float]]:
    """Exact finite-``M`` laws of one deviation: TV to the target and to its own ``M = ∞`` law."""
    from tiltsample.theory import tv
    from tiltsample.theory.ets_laws import ets_law_reference

    _, limit, measured, kwargs = _deviation_setup(seed, scale, temperature)[name]
    laws = ets_law_reference(num_candidates=ms, **kwargs)
    pi = _pi(measured)
    return {
        "tv": [tv(law.law, pi) for law in laws],
        "tv_to_limit": [tv(law.law, limit) for law in laws],
    }


def ets_reference_deviations(profile: str, cache: CellCache, out: Path) -> ExperimentResult:
    """(f) How far each reference-code deviation (``specs/ets.md`` §11) moves the output law."""
    full = profile == "full"
    lam, scale, temperature = 0.3, 0.9, 0.7
    target = _ar_target(8, 3, 3, lam)
    prop = _perturbed(target, 9, scale)
    ms = [16, 64, 256] + ([1024, 4096] if full else [])
    clips: list[float | None] = [None, 1.0, 0.2]
    rows: list[dict[str, Any]] = []
    curves = {}
    for clip in clips:
        tvs = cache.get_or_run(
            cell_key("f-clip", clip=clip, ms=ms, scale=scale, lam=lam),
            partial(
                _tvs,
                target,
                ms,
                block_size=1,
                num_rollouts=1,
                proposal=prop,
                is_log_ratio_clip=clip,
            ),
        )
        curves[clip] = tvs
        for m, value in zip(ms, tvs, strict=True):
            rows.append(
                {
                    "deviation": f"clip ±{clip}" if clip else "none (ETS-IS, K = 1)",
                    "M": m,
                    "tv_exact_law": value,
                }
            )
    limits = cache.get_or_run(
        cell_key("f-limits", scale=scale, t=temperature, lam=lam),
        partial(_deviation_limits, 8, scale, temperature),
    )
    labels = {
        name: label for name, (label, *_rest) in _deviation_setup(8, scale, temperature).items()
    }
    dev_curves: dict[str, dict[str, list[float]]] = {}
    dev_fits = {}
    for name in DEVIATIONS:
        curve = cache.get_or_run(
            cell_key("f-dev", name=name, ms=ms, scale=scale, t=temperature, lam=lam),
            partial(_deviation_curve, 8, scale, temperature, name, ms),
        )
        dev_curves[name] = curve
        limit_tv = limits[f"{labels[name]} (M = inf)"]
        for m, value, to_limit in zip(ms, curve["tv"], curve["tv_to_limit"], strict=True):
            rows.append(
                {
                    "deviation": labels[name],
                    "M": m,
                    "tv_exact_law": value,
                    "tv_to_own_limit": to_limit,
                    "gap_to_limit_tv": abs(value - limit_tv),
                }
            )
        dev_fits[name] = fit_loglog_slope(ms, curve["tv_to_limit"])
    for name, value in limits.items():
        rows.append({"deviation": name, "M": "inf", "tv_exact_law": value})
    rows.append(
        {
            "deviation": "majority-vote reward with cache",
            "M": "—",
            "tv_exact_law": "not measurable: sample-dependent reward, no fixed target "
            "(the vote itself: experiment j)",
        }
    )
    pairs = [("gap_to_limit_tv", "tv_to_own_limit")]  # triangle inequality, exact laws
    unclipped_fit = fit_loglog_slope(ms, curves[None])
    consistent = next(v for k, v in limits.items() if k.startswith("consistent"))
    floors = {c: curves[c][-1] / curves[c][-2] for c in clips if c is not None}
    to_limit_ok = all(f.high < -0.5 for f in dev_fits.values())
    holds = (
        consistent < 1e-12
        and unclipped_fit.high < -0.5
        and to_limit_ok
        and not bound_violations(rows, pairs)
    )
    fig, (ax, ax2) = _two_panels(
        ("(f) reference-code deviations: TV to the target", "candidates M", "TV(law_M, pi)"),
        ("(f) distance to the variant's own M = ∞ law", "candidates M", "TV(law_M, law_inf)"),
    )
    for clip in clips:
        ax.loglog(ms, curves[clip], "o-", label=f"clip ±{clip}" if clip else "no clipping")
    ax2.loglog(ms, curves[None], "o-", label="no clipping (its limit is pi)")
    for name in DEVIATIONS:
        line = ax.loglog(ms, dev_curves[name]["tv"], "s-", label=labels[name])[0]
        ax.axhline(limits[f"{labels[name]} (M = inf)"], ls=":", lw=0.8, color=line.get_color())
        ax2.loglog(
            ms, dev_curves[name]["tv_to_limit"], "s-", color=line.get_color(), label=labels[name]
        )
    ax.plot([], [], ":", color="gray", label="M = inf limit (same colour)")
    ax.legend(fontsize=6)
    ax2.loglog(ms, [ms[0] * curves[None][0] / m for m in ms], ":", color="gray", label="∝ 1/M")
    ax2.legend(fontsize=6)
    _log_ticks(ms, ax, ax2)
    dev = {k.split(" (")[0]: v for k, v in limits.items()}
    at_max = {labels[n]: dev_curves[n]["tv"][-1] for n in DEVIATIONS}
    return ExperimentResult(
        key="f",
        title="Reference-code deviations (specs/ets.md §11)",
        result="specs/ets.md §11 items 1–3, 7: clipping, IS ratio over the candidate block, "
        "temperature mismatch, majority vote",
        bound="as specified: consistent (TV → 0 as M → ∞)",
        measured=f"unclipped ETS-IS → 0 (TV {curves[None][-1]:.2g} at M = {ms[-1]}); clip ±1: "
        f"{curves[1.0][-1]:.3g}, clip ±0.2: {curves[0.2][-1]:.3g} at M = {ms[-1]}; exact "
        "finite-M laws: "
        + ", ".join(
            f"{k}: {dev_curves[n]['tv'][0]:.3g} (M = {ms[0]}) → {at_max[k]:.3g} (M = {ms[-1]})"
            for n, k in labels.items()
            if n in DEVIATIONS
        )
        + "; M = ∞: "
        + ", ".join(f"{k}: {v:.3g}" for k, v in dev.items() if not k.startswith("consistent")),
        rate=f"unclipped slope {unclipped_fit}; clipped: TV(M_max)/TV(M_prev) = "
        + ", ".join(f"±{c}: {r:.2f}" for c, r in floors.items())
        + "; TV(law_M, own M = ∞ law): "
        + ", ".join(f"{labels[n]} {dev_fits[n]}" for n in DEVIATIONS),
        verdict=(
            "the specified ETS-IS is consistent; clipping, the block ratio and the temperature "
            "mismatch each leave a floor (a different target) that no M removes — at finite M "
            "the block-ratio and mismatch laws converge at rate 1/M to their own M = ∞ laws, "
            "whose TV to the target is the floor"
            if holds
            else "the consistent variant does NOT converge, or a deviation does not approach "
            "its M = ∞ law"
        ),
        rows=rows,
        figure=save_figure(fig, out / "f_ets_reference_deviations.png"),
        holds=holds,
        fit=unclipped_fit,
        bound_pairs=pairs,
    )


# ----------------------------------------------------------------------------- (g)
def _cost_cell(m: int, k: int, b: int, d: int, eos: bool, draws: int) -> float:
    import tiltsample
    from tiltsample.samplers import ets

    target = _ar_target(4, 3, d, 0.5, eos_prob=None if eos else 0.0)
    algo = ets.sampler(target, num_samples=draws, num_candidates=m, num_rollouts=k, block_size=b)
    out = tiltsample.sample(algo, target, draws, seed=0)
    return out.cost.generated_tokens / draws


def ets_cost(profile: str, cache: CellCache, out: Path) -> ExperimentResult:
    """(g) Generated tokens per draw of the ``ets`` sampler vs ``M(1 + K(I − 1)/2)d``."""
    d = 8
    configs = [(3, 3, 2), (4, 2, 4), (2, 1, 1), (5, 3, 8), (3, 2, 1)]
    draws = 4
    rows = []
    for m, k, b in configs:
        steps = d // b
        formula = bounds.ets_cost_tokens(m, k, steps, d)
        for eos in (False, True):
            value = cache.get_or_run(
                cell_key("g", m=m, k=k, b=b, d=d, eos=eos, draws=draws),
                partial(_cost_cell, m, k, b, d, eos, draws),
            )
            rows.append(
                {
                    "M": m,
                    "K": k,
                    "I": steps,
                    "B": b,
                    "eos": eos,
                    "tokens_per_draw": value,
                    "formula": formula,
                    "reference_worst_case": m * (1 + k * (steps + 1) / 2) * d,
                }
            )
    pairs = [("tokens_per_draw", "formula")]
    exact = all(r["tokens_per_draw"] == r["formula"] for r in rows if not r["eos"])
    below = not bound_violations(rows, pairs)
    fig, ax = new_figure("(g) ETS generated tokens vs the cost formula", "formula", "measured")
    ax.loglog(
        [r["formula"] for r in rows if not r["eos"]],
        [r["tokens_per_draw"] for r in rows if not r["eos"]],
        "o",
        label="fixed length",
    )
    ax.loglog(
        [r["formula"] for r in rows if r["eos"]],
        [r["tokens_per_draw"] for r in rows if r["eos"]],
        "x",
        label="with EOS",
    )
    lim = [min(r["formula"] for r in rows), max(r["formula"] for r in rows)]
    ax.loglog(lim, lim, ":", color="gray", label="y = x")
    ax.legend(fontsize=7)
    return ExperimentResult(
        key="g",
        title="ETS generated tokens vs the cost formula",
        result="ETS App. B.1, Eq. 54 (specs/ets.md §6)",
        bound="N_tokens = M (1 + K (I − 1)/2) d on fixed-length targets (EOS only lowers it)",
        measured=", ".join(
            f"(M,K,I)=({r['M']},{r['K']},{r['I']}): {r['tokens_per_draw']:.4g}"
            for r in rows
            if not r["eos"]
        ),
        rate="exact equality" if exact else "mismatch",
        verdict=(
            ("equals the formula on every fixed-length config" if exact else "formula MISMATCH")
            + ("; below it with EOS" if below else "; EXCEEDS it with EOS")
            + " (the reference code's worst case M(1 + K(I + 1)/2)d is not reached)"
        ),
        rows=rows,
        figure=save_figure(fig, out / "g_ets_cost.png"),
        holds=exact and below,
        bound_pairs=pairs,
    )


__all__ = [
    "ets_cost",
    "ets_is",
    "ets_reference_deviations",
    "ets_tv_vs_i",
    "ets_tv_vs_k",
    "ets_tv_vs_m_exact",
    "likelihood_ratio_bound",
]
