"""The report of ``tiltsample compare``: the summary rows, the Markdown table and the figure.

Re-exported by :mod:`tiltsample.app.compare`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tiltsample.app.recipes import ALL_RECIPES

__all__ = ["markdown_table", "plot", "summarise", "wilson"]


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (sampler, budget): accuracy, CI, mean tokens per problem, time, tokens/s."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        if "error" in r:  # a cell that raised: counted in the notes, not in the table
            continue
        groups.setdefault((r["sampler"], int(r["budget"])), []).append(r)
    order = {rec.label: i for i, rec in enumerate(ALL_RECIPES)}
    rows = []
    for (label, budget), recs in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])
    ):
        n = len(recs)
        per_problem: dict[int, list[float]] = {}
        for r in recs:
            per_problem.setdefault(int(r["problem"]), []).append(float(r["correct"]))
        means = [sum(v) / len(v) for v in per_problem.values()]
        acc = sum(means) / len(means)
        if all(len(v) == 1 for v in per_problem.values()):
            lo, hi = wilson(sum(means), len(means))
        else:
            m = len(means)
            sd = math.sqrt(sum((v - acc) ** 2 for v in means) / max(m - 1, 1))
            lo, hi = (
                max(0.0, acc - 1.96 * sd / math.sqrt(m)),
                min(1.0, acc + 1.96 * sd / math.sqrt(m)),
            )
        gen = sum(int(r["generated_tokens"]) for r in recs)
        fwd = sum(int(r["forward_tokens"]) for r in recs)
        secs = sum(float(r["seconds"]) for r in recs)
        rows.append(
            {
                "sampler": label,
                "budget": budget,
                "runs": n,
                "accuracy": acc,
                "ci_low": lo,
                "ci_high": hi,
                "gen_tokens": gen / n,
                "forward_tokens": fwd / n,
                "seconds": secs / n,
                "tokens_per_s": gen / secs if secs > 0 else math.nan,
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison table in Markdown."""
    head = (
        "| sampler | budget | runs | accuracy | 95% CI | gen. tokens / problem | "
        "forward tokens / problem | wall s / problem | gen. tokens / s |\n"
        "|---|---:|---:|---:|---|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['budget']} | {r['runs']} | {r['accuracy']:.3f} | "
            f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] | {r['gen_tokens']:.0f} | "
            f"{r['forward_tokens']:.0f} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy (95% interval) against generated tokens per problem, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.4))
    cmap = plt.get_cmap("tab20")
    colors = [cmap(i) for i in range(20)]
    markers = "osD^v<>pXh*"
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["sampler"], []).append(r)
    for i, (label, rs) in enumerate(by.items()):
        rs = sorted(rs, key=lambda r: r["gen_tokens"])
        x = [r["gen_tokens"] for r in rs]
        y = [r["accuracy"] for r in rs]
        err = [
            [r["accuracy"] - r["ci_low"] for r in rs],
            [r["ci_high"] - r["accuracy"] for r in rs],
        ]
        ax.errorbar(
            x,
            y,
            yerr=err,
            marker=markers[i % len(markers)],
            color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
            capsize=3,
            label=label,
            linestyle="-" if len(rs) > 1 else "none",
        )
    ax.set_xscale("log")
    xs = [r["gen_tokens"] for r in rows if r["gen_tokens"] > 0]
    if xs:
        from matplotlib.ticker import NullFormatter

        lo, hi = math.floor(math.log2(min(xs))), math.ceil(math.log2(max(xs)))
        ax.set_xticks([2.0**e for e in range(lo, hi + 1)])
        ax.set_xticklabels([str(2**e) for e in range(lo, hi + 1)])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("generated tokens per problem (measured)")
    ax.set_ylabel("accuracy (exact match)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
