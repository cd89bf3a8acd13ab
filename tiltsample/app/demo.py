"""``tiltsample demo``: exact ground truth vs the samplers on the default toy target.

This is the exactly-enumerable part of ``make demo``; the part on the embedded default *model*
(``arith-ar``) is ``tiltsample compare --profile demo`` (:mod:`tiltsample.app.compare`), which
``make demo`` runs next.

The toy is the ``tabular`` target (random tabular policy, ``V = 4``, length cap 6, binary reward,
``lam = 0.25``; 1,093 responses), whose law is known exactly. The demo enumerates it, runs
every baseline sampler, prints TV to the target beside the i.i.d. noise floor and the cost per draw,
shows the power-vs-low-temperature example, and writes ``results/demo.json`` and the figure
``results/demo_sir_tv.png`` (TV of soft best-of-N vs the number of candidates ``M``: exact output
law, measured draws, noise floor).

``best-of-n`` appears twice: the ``SIR M=…`` rows are its default, ``selection="softmax"`` (one
sampling-importance-resampling draw among ``M`` candidates, whose law tends to ``pi`` as ``M``
grows); the ``argmax M=16`` row is ``selection="argmax"`` (the highest-tilt candidate, which does
not target ``pi``).

``tv_exact_law`` is the TV between the sampler's exact output law and ``pi``: ``exact`` draws
from ``pi`` itself (0); ancestral, argmax and SIR use :mod:`tiltsample.theory.laws`; IMH uses the
law after its ``num_steps`` steps from the exact transition matrix
(:func:`tiltsample.theory.imh_law`). Importance
sampling returns a *weighted* sample, not draws of one output law, so it has none: the table shows
``—`` with a footnote and ``demo.json`` has ``null``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

NO_LAW = "—"
"""Shown in the table where a sampler has no single output law (``null`` in ``demo.json``)."""


def run_demo(out_dir: str = "results", num_samples: int = 4000, seed: int = 0) -> dict[str, Any]:
    """Run the demo; returns what it wrote to ``demo.json``."""
    import tiltsample
    from tiltsample.app.tables import format_table
    from tiltsample.targets.toys import power_example, power_example_policy, tabular_toy
    from tiltsample.theory import (
        ancestral_law,
        best_of_n_law,
        exact_distribution,
        expected_tv_iid,
        imh_law,
        sir_law,
        tv,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = tabular_toy(seed=0)
    exact = exact_distribution(target)
    pi = exact.as_dict()
    floor = expected_tv_iid(pi, num_samples)
    print(f"target: {target.describe()}")
    print(f"support: {len(exact.support)} responses, log Z = {exact.log_z:.4f}\n")

    runs: list[tuple[str, str, dict[str, Any], Any]] = [
        ("exact", "exact", {}, lambda: pi),
        ("ancestral", "ancestral", {}, lambda: ancestral_law(target)),
        ("ancestral", "ancestral τ=0.5", {"temperature": 0.5}, lambda: ancestral_law(target, 0.5)),
        ("importance", "importance", {}, None),
        (
            "best-of-n",
            "argmax M=16",
            {"num_candidates": 16, "selection": "argmax"},
            lambda: best_of_n_law(target, 16),
        ),
    ]
    for m in (4, 16, 64):
        runs.append(
            (
                "best-of-n",
                f"SIR M={m}",
                {"num_candidates": m, "selection": "softmax"},
                lambda m=m: sir_law(target, m),
            )
        )
    runs.append(
        ("imh", "IMH 30 steps", {"num_steps": 30}, lambda: imh_law(ancestral_law(target), pi, 30))
    )

    rows: list[dict[str, Any]] = []
    for name, label, params, law_fn in runs:
        start = time.perf_counter()
        res = tiltsample.sample(name, target, num_samples, seed=seed, progress=False, **params)
        seconds = time.perf_counter() - start
        row: dict[str, Any] = {
            "sampler": label,
            "tv_draws": tv(res.empirical(), pi),
            "tv_floor": floor,
            "tv_exact_law": tv(law_fn(), pi) if law_fn else None,
            "mean_reward": exact_expected_reward(target, res),
            "gen_tok/draw": res.cost.generated_tokens / num_samples,
            "reward/draw": res.cost.reward_calls / num_samples,
            "seconds": seconds,
        }
        rows.append(row)
    beam = tiltsample.sample("beam", target, 1, seed=seed, num_beams=8)
    mode = max(pi, key=pi.__getitem__)
    shown = [{k: NO_LAW if v is None else v for k, v in row.items()} for row in rows]
    print(format_table(shown, list(rows[0])))
    print(
        f"{NO_LAW} no output law: importance sampling returns a weighted sample (tv_draws uses"
        " its weights)\n"
        'best-of-n rows: "SIR M" is its default, selection="softmax" (soft best-of-N; its law'
        ' tends to pi as M grows);\n"argmax M=16" is selection="argmax" (does not target pi)'
    )
    print(
        f"\nbeam search (8 beams) returns {beam.sequences[0]} "
        f"with pi = {pi.get(beam.sequences[0], 0):.4f};"
        f" the mode of pi is {mode} with pi = {pi[mode]:.4f}"
    )
    print(f"target mean reward E_pi[r] = {exact.expectation(_rewards(target, exact.support)):.4f}")

    # power distribution vs low temperature (specs/mcmc.md §1)
    print("\npower distribution is not low temperature (two-token example):")
    prow = []
    base = power_example_policy()
    for alpha in (2.0, 4.0):
        p_alpha = exact_distribution(power_example(alpha=alpha)).as_dict()
        low_t = ancestral_law(tiltsample.reference_target(base, max_new_tokens=2), 1.0 / alpha)
        prow.append(
            {
                "alpha": alpha,
                "power P(ab)": p_alpha[(1, 2)],
                "low-temp P(ab)": low_t[(1, 2)],
                "base P(ab)": 0.45,
            }
        )
    print(format_table(prow, list(prow[0])))

    figure = _sir_figure(target, pi, num_samples, seed, out / "demo_sir_tv.png")
    summary = {
        "target": target.describe(),
        "log_z": exact.log_z,
        "num_samples": num_samples,
        "rows": rows,
        "power_example": prow,
        "figure": str(figure),
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {out / 'demo.json'} and {figure}")
    return summary


def _rewards(target: Any, seqs: list[Any]) -> Any:
    scores = target.evaluate_tilt(seqs)
    return scores.reward


def exact_expected_reward(target: Any, res: Any) -> float:
    """Weighted mean reward of a sample set (rewards recomputed if the sampler did not report)."""
    rewards = res.rewards if res.rewards is not None else _rewards(target, res.sequences)
    return float(res.mean(rewards))


def _sir_figure(target: Any, pi: dict[Any, float], n: int, seed: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import tiltsample
    from tiltsample.theory import expected_tv_iid, sir_law, tv

    ms = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    exact_tv = [tv(sir_law(target, m), pi) for m in ms]
    ms_draw = [1, 4, 16, 64]
    drawn_tv = [
        tv(tiltsample.sample("best-of-n", target, n, seed=seed, num_candidates=m).empirical(), pi)
        for m in ms_draw
    ]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(ms, exact_tv, "o-", label="exact output law (quadrature)")
    ax.loglog(ms_draw, drawn_tv, "s", label=f"{n} draws")
    ax.axhline(expected_tv_iid(pi, n), ls="--", c="gray", label=f"i.i.d. noise floor (N={n})")
    ax.loglog(ms, [exact_tv[-1] * ms[-1] / m for m in ms], ":", c="k", label="slope −1")
    ax.set_xlabel("candidates M")
    ax.set_ylabel("TV(output law, π)")
    ax.set_title("soft best-of-N (SIR) on the tabular toy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
