"""`tiltsample verify` (quick profile): report rows, bounds respected, slopes, resumable cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiltsample.theory.rates import EXPERIMENTS, run_verify


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[object]]:
    out = tmp_path_factory.mktemp("verify")
    return out, run_verify("quick", out, progress=False)  # type: ignore[return-value]


def test_report_has_every_experiment_and_figure(quick: tuple[Path, list[object]]) -> None:
    out, results = quick
    report = (out / "quick" / "report.md").read_text()
    for key in EXPERIMENTS:
        assert f"| {key} |" in report
        assert f"## ({key})" in report
    for r in results:
        assert Path(r.figure).stat().st_size > 5000  # type: ignore[attr-defined]


def test_bounds_hold_where_their_assumptions_hold(quick: tuple[Path, list[object]]) -> None:
    _, results = quick
    assert all(r.holds for r in results)  # type: ignore[attr-defined]


def test_sir_rate_is_about_minus_one(quick: tuple[Path, list[object]]) -> None:
    _, results = quick
    a1 = next(r for r in results if r.key == "a1")  # type: ignore[attr-defined]
    # the paper's bound needs <= -1/2; SIR theory predicts about -1
    assert a1.fit.high < -0.5
    assert a1.fit.low - 0.25 < -1.0 < a1.fit.high + 0.25


def test_rerun_resumes_from_cached_cells(quick: tuple[Path, list[object]]) -> None:
    out, _ = quick
    cells = out / "quick" / "cells.jsonl"
    before = cells.read_text()
    with cells.open("a") as f:
        f.write('{"cell": "torn')  # an interrupted write
    run_verify("quick", out, progress=False)
    assert cells.read_text() == before  # torn line dropped; nothing recomputed or duplicated


def test_unknown_profile_or_experiment(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="profile"):
        run_verify("fast", tmp_path)
    with pytest.raises(ValueError, match="experiment"):
        run_verify("quick", tmp_path, only=["zz"])


def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tiltsample.cli import main

    assert main(["verify", "--out", str(tmp_path), "--only", "j,imh", "--no-progress"]) == 0
    assert "report.md" in capsys.readouterr().out
    assert (tmp_path / "quick" / "report.md").exists()
