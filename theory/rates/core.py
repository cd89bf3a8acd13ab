r"""Machinery of the rate experiments: cached cells, slope fits, results and figures.

An experiment sweeps one parameter; each *cell* (experiment, parameters, seed) is a pure function of
its arguments, so cells can run in any order or on Ray, and a finished cell is stored in
``cells.jsonl``, a keyed cell file of the project's one resumable store
(:class:`tiltsample.run_store.CellStore`: a header naming the verify profile, then one line per
cell, appended and flushed as it finishes; a torn last line is dropped, a duplicated or damaged
line refused), so re-running ``tiltsample verify`` resumes without recomputing or duplicating
anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tiltsample.run_store import CellStore

CellCache = CellStore
"""The cell store of the experiments: :class:`tiltsample.run_store.CellStore` (keyed cells, one
line each, after a header naming the verify profile; ``None`` as the path keeps them in memory)."""


class Pending(float):
    """What a planning pass returns for a missing cell: NaN that also answers ``value[key]``."""

    def __new__(cls) -> Pending:
        return super().__new__(cls, math.nan)

    def __getitem__(self, key: Any) -> Pending:
        return Pending()

    def get(self, key: Any, default: Any = None) -> Pending:
        return Pending()

    def keys(self) -> list[str]:
        return []


class PlanningCache(CellStore):
    """A view of a :class:`~tiltsample.run_store.CellStore` that records the cells an experiment
    asks for and does not run them (they return :class:`Pending`): the planning pass of a
    distributed run. It writes nothing; :meth:`put` stores into the viewed store."""

    def __init__(self, cache: CellStore) -> None:
        super().__init__(None)
        self.cache = cache
        self.missing: dict[str, Callable[[], Any]] = {}

    def __len__(self) -> int:
        return len(self.cache)

    def __contains__(self, key: object) -> bool:
        return key in self.cache

    def __getitem__(self, key: str) -> Any:
        return self.cache[key]

    def keys(self) -> list[str]:
        return self.cache.keys()

    def get_or_run(self, key: str, run: Callable[[], Any]) -> Any:
        if key in self.cache:
            return self.cache[key]
        self.missing.setdefault(key, run)
        return Pending()

    def put(self, key: str, value: Any) -> None:
        self.cache.put(key, value)


def prefetch_cells(
    experiments: Sequence[Callable[[str, CellStore, Path], Any]],
    profile: str,
    cache: CellStore,
    backend: Any,
    progress: bool = False,
) -> list[str]:
    """Run the cells the experiments will ask for on ``backend`` (a
    :class:`~tiltsample.executor.Backend`), caching each as it arrives; return the failed ones.

    Rounds of a planning pass (each experiment run on a :class:`PlanningCache`, its figures
    thrown away, its errors ignored: it sees NaN for the missing cells) and a parallel run of the
    cells it asked for, until no new cell is asked for. Cells are pure, so the values are those
    of a serial run; the experiments then run for real on the full cache. A cell that raised is
    not cached (the real pass runs it again and reports its error as a serial run would).
    """
    import contextlib
    import tempfile
    import warnings

    from tqdm.auto import tqdm

    from tiltsample.executor import call_thunk, run_cells

    failed: dict[str, str] = {}
    while True:
        planner = PlanningCache(cache)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for experiment in experiments:
                # the NaN of a missing cell may go where a number is needed: planning stops there
                with contextlib.suppress(Exception):
                    experiment(profile, planner, Path(tmp))
                _close_figures()
        todo = [(k, run) for k, run in planner.missing.items() if k not in failed]
        if not todo:
            return [f"{key}: {error}" for key, error in failed.items()]
        items = [run for _, run in todo]
        bar = tqdm(total=len(items), desc="verify cells", disable=not progress)
        for outcome in run_cells(call_thunk, items, backend=backend):
            key = todo[outcome.index][0]
            bar.update()
            if outcome.ok:
                cache.put(key, outcome.value)
            else:
                failed[key] = str(outcome.error)
        bar.close()


def _close_figures() -> None:
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def cell_key(experiment: str, **params: Any) -> str:
    """A canonical key for a cell."""
    return experiment + ":" + json.dumps(params, sort_keys=True)


@dataclass(frozen=True)
class SlopeFit:
    """A least-squares log-log slope with a percentile-bootstrap 95% interval."""

    slope: float
    intercept: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.slope:.3f} [{self.low:.3f}, {self.high:.3f}]"


def fit_loglog_slope(
    x: Sequence[float], y: Sequence[float], seed: int = 0, resamples: int = 2000
) -> SlopeFit:
    """Slope of ``log y`` on ``log x`` with a paired percentile bootstrap (``scipy.stats``).

    Needs at least three points with ``x, y > 0``.
    """
    from scipy import stats

    lx = np.log(np.asarray(x, dtype=float))
    ly = np.log(np.asarray(y, dtype=float))
    if len(lx) < 3 or not (np.all(np.isfinite(lx)) and np.all(np.isfinite(ly))):
        raise ValueError("a slope fit needs >= 3 points with positive x and y")
    fit = stats.linregress(lx, ly)

    def slope(a: np.ndarray, b: np.ndarray) -> float:
        if np.ptp(a) == 0:
            return float(fit.slope)
        return float(np.polyfit(a, b, 1)[0])

    boot = stats.bootstrap(
        (lx, ly),
        slope,
        paired=True,
        vectorized=False,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = boot.confidence_interval
    return SlopeFit(float(fit.slope), float(fit.intercept), float(ci.low), float(ci.high))


@dataclass
class ExperimentResult:
    """What one experiment measured and concluded."""

    key: str
    title: str
    result: str
    """The result under test, with its source."""
    bound: str
    """The bound as published (and the corrected/sharper form where there is one)."""
    measured: str
    rate: str
    verdict: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    figure: str | None = None
    holds: bool | None = None
    """Whether every measured value respected the bound where its assumptions hold."""
    fit: SlopeFit | None = None
    bound_pairs: list[tuple[str, str]] = field(default_factory=list)
    """``(measured column, bound column)`` pairs of :attr:`rows`: every row holding both must have
    ``measured <= bound`` (checked by :func:`bound_violations` and the tests)."""


def bound_violations(
    rows: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]], tol: float = 1e-12
) -> list[tuple[int, str, str, float, float]]:
    """Every ``(row index, measured column, bound column, measured, bound)`` with
    ``measured > bound + tol``. Rows missing a column, and non-numeric entries (``"inf"``, a
    vacuous bound), are skipped. ``tol`` is the float64 floor of the exact-law sums (a TV summed
    over the support carries ``~1e-16`` of rounding), far below every resolved measurement."""
    bad = []
    for i, row in enumerate(rows):
        for m_key, b_key in pairs:
            m, b = row.get(m_key), row.get(b_key)
            if not (isinstance(m, (int, float)) and isinstance(b, (int, float))):
                continue
            if isinstance(m, bool) or isinstance(b, bool):
                continue
            if m > b + tol:
                bad.append((i, m_key, b_key, float(m), float(b)))
    return bad


def save_figure(fig: Any, path: Path) -> str:
    """Write a matplotlib figure and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def new_figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """A log-log matplotlib figure (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return fig, ax


def finite_or_inf(value: float) -> float | str:
    """JSON-friendly float (inf as a string)."""
    return value if math.isfinite(value) else str(value)
