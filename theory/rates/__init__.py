"""Rate experiments: each theorem's bound vs the measured error on exact targets.

:func:`run_verify` runs every registered experiment for a profile (``"quick"``: CI, under two
minutes; ``"full"``: the committed report), stores finished cells in ``<out>/<profile>/cells.jsonl``
(a :class:`~tiltsample.run_store.CellStore` whose header is :func:`verify_header`; a rerun resumes),
writes one PNG per experiment and ``<out>/<profile>/report.md`` (result | bound | measured | rate |
verdict).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tiltsample.theory.rates.core import (
    CellCache,
    ExperimentResult,
    SlopeFit,
    bound_violations,
    fit_loglog_slope,
    prefetch_cells,
)
from tiltsample.theory.rates.experiments import (
    best_of_n_limit,
    imh_geometric,
    self_consistency,
    sir_tv_vs_m,
)
from tiltsample.theory.rates.experiments_ets import (
    ets_cost,
    ets_is,
    ets_reference_deviations,
    ets_tv_vs_i,
    ets_tv_vs_k,
    ets_tv_vs_m_exact,
)
from tiltsample.theory.rates.experiments_mh import mh_decision_trace
from tiltsample.theory.rates.experiments_smc import smc_evidence
from tiltsample.theory.rates.report import render_report

Experiment = Callable[[str, CellCache, Path], ExperimentResult]

EXPERIMENTS: dict[str, Experiment] = {
    "a1": sir_tv_vs_m,
    "a": ets_tv_vs_m_exact,
    "b": ets_tv_vs_k,
    "c": ets_tv_vs_i,
    "d": ets_is,
    "e": best_of_n_limit,
    "f": ets_reference_deviations,
    "g": ets_cost,
    "h": smc_evidence,
    "i": mh_decision_trace,
    "j": self_consistency,
    "imh": imh_geometric,
}

__all__ = [
    "EXPERIMENTS",
    "CellCache",
    "ExperimentResult",
    "SlopeFit",
    "bound_violations",
    "fit_loglog_slope",
    "render_report",
    "run_verify",
    "verify_header",
]


def verify_header(profile: str) -> dict[str, Any]:
    """The header of a verify cell file: what its cells belong to.

    Only the profile: the cell keys name their experiment and parameters, so runs of different
    ``only`` selections share one file, while a file of another profile is refused.
    """
    return {"kind": "tiltsample-verify", "profile": profile}


def run_verify(
    profile: str = "quick",
    out_dir: str | Path = "results/verify",
    only: list[str] | None = None,
    progress: bool | None = None,
    docs: str | Path | None = None,
    backend: Any = None,
) -> list[ExperimentResult]:
    """Run the experiments, write figures, ``cells.jsonl`` and ``report.md``; return the results.

    With ``docs`` (e.g. ``"docs"``), also regenerate the documentation from this run
    (:func:`~tiltsample.theory.rates.docs.write_docs`): the figures in
    ``<docs>/figures/verify/``, ``<docs>/verify_report.md`` and the generated section of
    ``<docs>/theory.md``.

    With ``backend`` (a :class:`~tiltsample.executor.Backend` on Ray), the cells run there first
    (:func:`~tiltsample.theory.rates.core.prefetch_cells`), each cached as it arrives; the
    experiments then read them from the cache. The cells, and so the report, are those of a
    serial run.
    """
    import sys
    import time

    from tqdm.auto import tqdm

    from tiltsample import validation

    validation.one_of("profile", profile, ("quick", "full"))
    keys = list(EXPERIMENTS) if only is None else only
    for k in keys:
        validation.one_of("experiment", k, EXPERIMENTS)
    if docs is not None and set(keys) != set(EXPERIMENTS):
        raise ValueError("docs: the documentation needs every experiment; drop `only`")
    out = Path(out_dir) / profile
    out.mkdir(parents=True, exist_ok=True)
    cache = CellCache(out / "cells.jsonl", verify_header(profile))
    cached = len(cache)
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    if backend is not None and backend.ray:
        prefetch_cells([EXPERIMENTS[k] for k in keys], profile, cache, backend, show)
    results = []
    bar = tqdm(keys, desc="verify", disable=not show)
    for key in bar:
        bar.set_postfix_str(key)
        results.append(EXPERIMENTS[key](profile, cache, out))
    elapsed = time.perf_counter() - start
    (out / "report.md").write_text(render_report(results, profile))
    if docs is not None:
        from tiltsample.theory.rates.docs import write_docs

        write_docs(results, profile, docs, elapsed, (len(cache) - cached, len(cache)))
    return results
