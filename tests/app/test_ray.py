"""Sweeps on Ray: ``compare`` and ``verify`` on a local 2-CPU cluster give the serial run's records.

One local cluster (2 CPUs, no dashboard) serves the whole test session. Cells defined here are
pickled by value (the workers cannot import the test module).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tiltsample.app.cli import main
from tiltsample.executor import SERIAL, Backend, Outcome, run_cells

RAY = Backend(ray=True)
SAMPLERS = ["ancestral", "best-of-n", "smc"]
# a local Ray cluster (seconds to start, workers per test): in `make test`, not `make test-fast`
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray
    from ray import cloudpickle

    ray.init(
        num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False
    )
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == previous


def square_or_fail(context: Any, x: int) -> int:
    if x == 3:
        raise ValueError("cell three fails")
    return x * x + (context or 0)


def die_once(context: Any, item: tuple[int, str]) -> int:
    x, marker = item
    if x == 1 and not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(1)  # the worker process dies in the middle of the cell
    return x + 100


def _values(outcomes: Iterator[Outcome]) -> dict[int, Any]:
    return {o.index: o.value if o.ok else o.error for o in outcomes}


# ------------------------------------------------------------------------------------ executor
def test_executor_ray_equals_serial_and_records_errors(ray_cluster: None) -> None:
    items = list(range(6))
    serial = _values(run_cells(square_or_fail, items, setup=lambda: 1))
    ray_run = _values(run_cells(square_or_fail, items, setup=lambda: 1, backend=RAY))
    assert serial == ray_run
    assert ray_run[3] == "ValueError: cell three fails"
    assert ray_run[5] == 26


def test_dead_worker_is_retried(ray_cluster: None, tmp_path: Path) -> None:
    marker = str(tmp_path / "died")
    outs = list(run_cells(die_once, [(x, marker) for x in range(4)], backend=RAY))
    assert Path(marker).exists(), "the worker never died"
    assert sorted(o.index for o in outs) == [0, 1, 2, 3]
    assert all(o.ok and not o.lost for o in outs)
    assert {o.index: o.value for o in outs} == {x: x + 100 for x in range(4)}


# ------------------------------------------------------------------------------------ compare
def _compare(out: Path, backend: Backend = SERIAL) -> Any:
    from tiltsample.app.compare import run_compare

    return run_compare(
        profile="test", out_dir=out, samplers=SAMPLERS, progress=False, backend=backend
    )


def _by_cell(records: list[dict[str, Any]]) -> dict[tuple[Any, ...], tuple[Any, Any]]:
    keys = [(r["sampler"], r["budget"], r["problem"], r["repeat"]) for r in records]
    assert len(keys) == len(set(keys)), "a duplicated cell"
    return {k: (r.get("response"), r.get("correct")) for k, r in zip(keys, records, strict=True)}


@pytest.fixture(scope="module")
def serial_compare(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[Any, ...], Any]:
    return _by_cell(_compare(tmp_path_factory.mktemp("serial")).records)


def test_compare_on_ray_gives_the_serial_records(
    ray_cluster: None, serial_compare: dict[tuple[Any, ...], Any], tmp_path: Path
) -> None:
    result = _compare(tmp_path, RAY)
    assert _by_cell(result.records) == serial_compare
    assert {r["sampler"] for r in result.rows} == set(SAMPLERS)


def test_killed_driver_resumes_without_loss_or_duplicates(
    ray_cluster: None,
    serial_compare: dict[tuple[Any, ...], Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tiltsample.run_store import RunFile

    real = RunFile.write_chunk
    written = {"n": 0}

    def interrupted(self: RunFile, *args: Any, **kwargs: Any) -> None:
        if written["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C while results stream in
        written["n"] += 1
        real(self, *args, **kwargs)

    monkeypatch.setattr(RunFile, "write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _compare(tmp_path, RAY)
    monkeypatch.setattr(RunFile, "write_chunk", real)
    lines = (tmp_path / "compare.jsonl").read_text().splitlines()
    assert sum('"chunk_done"' in line for line in lines) == 3
    result = _compare(tmp_path, RAY)
    assert _by_cell(result.records) == serial_compare
    chunks = [json.loads(line)["chunk"] for line in lines if '"chunk":' in line]
    assert len(chunks) == len(set(chunks)) == 3


def test_a_cell_that_raises_is_recorded_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tiltsample.app.compare as compare

    real = compare.run_cell
    real_batched = compare.run_batched

    def flaky(cell: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if cell.recipe.label == "smc" and cell.problem == 1:
            raise RuntimeError("out of particles")
        return real(cell, *args, **kwargs)

    def flaky_batched(cells: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        if any(c.recipe.label == "smc" and c.problem == 1 for c in cells):
            raise RuntimeError("out of particles")  # the unit's cells then run alone
        return real_batched(cells, *args, **kwargs)

    monkeypatch.setattr(compare, "run_cell", flaky)
    monkeypatch.setattr(compare, "run_batched", flaky_batched)
    result = _compare(tmp_path)
    failed = [r for r in result.records if "error" in r]
    assert failed == [
        {
            "chunk": failed[0]["chunk"],
            "record": 0,
            "sampler": "smc",
            "budget": 2,
            "problem": 1,
            "repeat": 0,
            "error": "RuntimeError: out of particles",
        }
    ]
    assert {r["sampler"] for r in result.rows} == set(SAMPLERS)
    assert "out of particles" in (tmp_path / "compare.md").read_text()
    again = _compare(tmp_path)  # resumes: the failure stays recorded, nothing runs twice
    assert again.records == result.records


# ------------------------------------------------------------------------------------ verify
def test_verify_on_ray_gives_the_serial_cells(
    ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiltsample.theory.rates import CellCache, run_verify

    only = ["a1", "j"]
    serial = run_verify("quick", tmp_path / "serial", only=only, progress=False)

    def cached_only(self: CellCache, key: str, run: Any) -> Any:
        assert key in self, f"cell {key} ran in the driver, not on Ray"
        return self[key]

    monkeypatch.setattr(CellCache, "get_or_run", cached_only)  # the experiments' real pass
    dist = run_verify("quick", tmp_path / "ray", only=only, progress=False, backend=RAY)

    def cells(folder: Path) -> dict[str, Any]:
        path = folder / "quick" / "cells.jsonl"
        header, *items = [json.loads(line) for line in path.read_text().splitlines()]
        assert header == {"header": {"kind": "tiltsample-verify", "profile": "quick"}}
        assert len(items) == len({i["cell"] for i in items}), "a duplicated cell"
        return {i["cell"]: i["value"] for i in items}

    assert cells(tmp_path / "ray") == cells(tmp_path / "serial")
    assert [r.rows for r in dist] == [r.rows for r in serial]
    assert (tmp_path / "ray" / "quick" / "report.md").read_text() == (
        tmp_path / "serial" / "quick" / "report.md"
    ).read_text()


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["compare", "--ray", "no port"], "--ray"),
        (["compare", "--ray", "host:99999"], "1..65535"),
        (["verify", "--ray", "host"], "HOST:PORT"),
        (["compare", "--ray-workers", "2"], "--ray-workers needs --ray"),
        (["verify", "--ray", "--ray-workers", "0"], "--ray-workers"),
    ],
)
def test_bad_ray_flags_exit_2_with_one_line(
    argv: list[str], text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and text in err[0], err
