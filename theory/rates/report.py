"""The Markdown verification report of a :func:`~tiltsample.theory.rates.run_verify` run."""

from __future__ import annotations

from pathlib import Path

from tiltsample.theory.rates.core import ExperimentResult


def render_report(results: list[ExperimentResult], profile: str, figure_prefix: str = "") -> str:
    """The Markdown report: one table row per experiment, then each experiment's rows.

    Figures are linked as ``figure_prefix + file name`` (next to the report by default).
    """
    lines = [
        f"# Verification report ({profile} profile)",
        "",
        "| | result | bound (as published) | measured | fitted rate (95% CI) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [r.key, r.result, r.bound, r.measured, r.rate, r.verdict]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    for r in results:
        lines += ["", f"## ({r.key}) {r.title}", ""]
        if r.figure:
            lines += [f"![{r.key}]({figure_prefix}{Path(r.figure).name})", ""]
        if r.rows:
            keys = list(dict.fromkeys(k for row in r.rows for k in row))
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for row in r.rows:
                vals = [row.get(k, "") for k in keys]
                lines.append(
                    "| "
                    + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in vals)
                    + " |"
                )
    return "\n".join(lines) + "\n"
