r"""Rate experiment (h): the SMC evidence estimator and the SMC/CSMC sandwich vs ``N``.

``h``  On the toy of ``specs/smc.md`` §14 (:func:`~tiltsample.theory.smc_exact.spec_toy`: 243
       responses, exact ``log Z``), ``R`` independent runs of the ``smc`` sampler (prefix twist,
       adaptive systematic resampling) per particle count ``N``:

       * ``E[Ẑ]/Z`` — exactly 1 at every ``N`` (Del Moral 2004); the measurement is a mean of ``R``
         heavy-tailed ratios, reported with its standard error (the noise floor), never as a
         deviation below it;
       * ``E[log Ẑ] − log Z`` — negative, ``≈ −Var(log Ẑ)/2`` (delta method), ``O(1/N)``;
       * ``sd(log Ẑ)`` — ``O(N^{-1/2})``;

       and the sandwich of :mod:`tiltsample.samplers.csmc` (multinomial resampling at every step):
       ``E[log Ẑ_SMC] <= log Z <= E_pi[log Ẑ_CSMC]``, whose gap closes like ``1/N``; at ``N = 1``
       both sides are known exactly, ``−KL(q‖pi)`` and ``+KL(pi‖q)``
       (:func:`~tiltsample.theory.smc_exact.one_particle_bounds`).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from tiltsample.theory import bounds
from tiltsample.theory.rates.core import (
    CellCache,
    ExperimentResult,
    cell_key,
    fit_loglog_slope,
    new_figure,
    save_figure,
)


def _evidence_cell(n: int, runs: int) -> dict[str, float]:
    from tiltsample.samplers import smc
    from tiltsample.theory import exact_distribution
    from tiltsample.theory.smc_exact import spec_toy

    target = spec_toy()
    log_z = exact_distribution(target).log_z
    state = smc.run(
        target, num_particles=n, num_runs=runs, generator=torch.Generator().manual_seed(n)
    )
    d = smc.log_evidence_runs(state) - log_z
    ratio = torch.exp(d)
    return {
        "E[Z]/Z": float(ratio.mean()),
        "E[Z]/Z_se": float(ratio.std() / math.sqrt(runs)),
        "log_bias": float(d.mean()),
        "log_bias_se": float(d.std() / math.sqrt(runs)),
        "sd_logZ": float(d.std()),
        "minus_var_over_2": bounds.smc_log_bias_approx(float(d.var())),
    }


def _sandwich_cell(n: int, runs: int) -> dict[str, float]:
    from tiltsample.samplers import csmc
    from tiltsample.theory import exact_distribution
    from tiltsample.theory.smc_exact import spec_toy

    target = spec_toy()
    exact = exact_distribution(target)
    lo = csmc.log_z_lower(
        target,
        n,
        generator=torch.Generator().manual_seed(n),
        num_runs=runs,
        ess_threshold=1.0,
        resampling="multinomial",
    )
    refs = exact.sample(runs, torch.Generator().manual_seed(1000 + n))
    up = csmc.log_z_upper(
        target, n, refs, generator=torch.Generator().manual_seed(n), ess_threshold=1.0
    )
    return {
        "lower": lo.mean - exact.log_z,
        "lower_se": lo.stderr,
        "upper": up.mean - exact.log_z,
        "upper_se": up.stderr,
        "gap": up.mean - lo.mean,
        "gap_se": math.hypot(lo.stderr, up.stderr),
    }


def _one_particle() -> dict[str, float]:
    from tiltsample.theory.smc_exact import one_particle_bounds, spec_toy

    b = one_particle_bounds(spec_toy())
    return {"lower": b.lower - b.log_z, "upper": b.upper - b.log_z}


def smc_evidence(profile: str, cache: CellCache, out: Path) -> ExperimentResult:
    """(h) ``E[Ẑ]/Z``, log-bias and ``sd(log Ẑ)`` vs ``N``; the SMC/CSMC sandwich vs ``N``."""
    full = profile == "full"
    ns = [2, 4, 8, 16, 32, 64] + ([128, 256, 512] if full else [])
    runs = 400 if full else 60
    sw_ns = [1, 2, 4, 8] + ([16, 32, 64] if full else [])
    sw_runs = 400 if full else 60
    rows = []
    for n in ns:
        value = cache.get_or_run(
            cell_key("h-evidence", n=n, runs=runs), partial(_evidence_cell, n, runs)
        )
        rows.append({"N": n, "runs": runs, **value})
    sw_rows = []
    for n in sw_ns:
        value = cache.get_or_run(
            cell_key("h-sandwich", n=n, runs=sw_runs), partial(_sandwich_cell, n, sw_runs)
        )
        sw_rows.append({"N": n, "runs": sw_runs, **value})
    exact1 = cache.get_or_run(cell_key("h-one-particle"), _one_particle)

    # unbiasedness: within 4 standard errors (the heavy right tail makes the sample mean low)
    z_scores = [(r["E[Z]/Z"] - 1.0) / r["E[Z]/Z_se"] for r in rows]
    unbiased = all(abs(z) < 4.0 for z in z_scores)
    sd_fit = fit_loglog_slope([r["N"] for r in rows], [r["sd_logZ"] for r in rows])
    resolved = [r for r in rows if -r["log_bias"] > 2 * r["log_bias_se"]]
    bias_fit = (
        fit_loglog_slope([r["N"] for r in resolved], [-r["log_bias"] for r in resolved])
        if len(resolved) >= 3
        else None
    )
    sandwich = all(
        r["lower"] - 3 * r["lower_se"] <= 0.0 <= r["upper"] + 3 * r["upper_se"] for r in sw_rows
    )
    n1 = sw_rows[0]
    n1_ok = (
        abs(n1["lower"] - exact1["lower"]) < 4 * n1["lower_se"]
        and abs(n1["upper"] - exact1["upper"]) < 4 * n1["upper_se"]
    )
    gap_fit = fit_loglog_slope([r["N"] for r in sw_rows], [r["gap"] for r in sw_rows])
    holds = unbiased and sandwich and n1_ok

    fig, ax = new_figure("(h) SMC evidence on the spec toy", "particles N", "")
    xs = [r["N"] for r in rows]
    ax.errorbar(
        xs,
        [r["E[Z]/Z"] for r in rows],
        yerr=[2 * r["E[Z]/Z_se"] for r in rows],
        fmt="o-",
        label="E[Z^]/Z (±2 se)",
    )
    ax.errorbar(
        xs,
        [max(-r["log_bias"], 1e-4) for r in rows],
        yerr=[2 * r["log_bias_se"] for r in rows],
        fmt="s-",
        label="−(E[log Z^] − log Z) (±2 se)",
    )
    ax.plot(xs, [-r["minus_var_over_2"] for r in rows], ":", label="Var(log Z^)/2")
    ax.plot(xs, [r["sd_logZ"] for r in rows], "^-", label="sd(log Z^)")
    ax.plot([r["N"] for r in sw_rows], [r["gap"] for r in sw_rows], "d--", label="CSMC − SMC gap")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    last = rows[-1]
    return ExperimentResult(
        key="h",
        title="SMC evidence: E[Z^]/Z, log-bias, sd(log Z^) and the SMC/CSMC sandwich vs N",
        result="SMC evidence facts (Del Moral 2004; specs/smc.md §9, §12)",
        bound="E[Z^] = Z; E[log Z^] − log Z ≈ −Var(log Z^)/2 < 0; "
        "E[log Z^_SMC] <= log Z <= E_pi[log Z^_CSMC]",
        measured=f"N = {last['N']}: E[Z^]/Z = {last['E[Z]/Z']:.3f} ± {last['E[Z]/Z_se']:.3f} (se, "
        f"{runs} runs); log-bias {last['log_bias']:.4f} ± {last['log_bias_se']:.4f} vs "
        f"−Var/2 = {last['minus_var_over_2']:.4f}; N = 1 sandwich {n1['lower']:.3f} / "
        f"{n1['upper']:.3f} vs exact {exact1['lower']:.3f} / {exact1['upper']:.3f}",
        rate=f"sd(log Z^) slope {sd_fit}; −log-bias slope "
        + (f"{bias_fit}" if bias_fit else "n/a (below the noise)")
        + f"; sandwich gap slope {gap_fit}",
        verdict=(
            "E[Z^]/Z = 1 within noise at every N; sandwich holds; N = 1 sides match the exact "
            "−KL(q‖pi), +KL(pi‖q)"
            if holds
            else "unbiasedness or sandwich VIOLATED beyond 4 se"
        ),
        rows=[*rows, {"N": "1 (exact)", **exact1}, *sw_rows],
        figure=save_figure(fig, out / "h_smc_evidence.png"),
        holds=holds,
        fit=sd_fit,
    )


__all__ = ["smc_evidence"]
