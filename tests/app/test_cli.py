"""The command line: list, sample (incremental JSONL that resumes), demo, --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiltsample.app.cli import main
from tiltsample.run_store import RunFile
from tiltsample.seeds import chunk_seed


def test_list_shows_samplers_and_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ancestral", "exact", "best-of-n", "beam", "imh", "tabular", "decision-trace"):
        assert name in out


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--help"], ["demo", "--help"]])
def test_help_everywhere(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tiltsample", *argv], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "usage" in proc.stdout


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sample_writes_jsonl_and_resumes_without_loss_or_duplicates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "sample",
        "best-of-n",
        "-n",
        "30",
        "--chunk-size",
        "10",
        "-p",
        "num_candidates=4",
        "--seed",
        "5",
        "--no-progress",
    ]
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    assert main([*argv, "--out", str(full)]) == 0
    out = capsys.readouterr().out
    assert "tv_to_target" in out and "wrote 30 records" in out
    lines = full.read_text().splitlines()
    # simulate an interruption inside chunk 2: its done-line is missing and the last line is torn
    chunk2 = [i for i, line in enumerate(lines) if '"chunk": 2' in line]
    cut.write_text("\n".join(lines[: chunk2[3]]) + '\n{"chunk": 2, "seq')
    assert main([*argv, "--out", str(cut)]) == 0
    assert _lines(cut) == _lines(full)
    records = [r for r in _lines(cut) if "sequence" in r]
    assert len(records) == 30
    # a different run is never appended to the same file
    assert main([*argv[:-1], "--seed", "6", "--out", str(cut)]) == 2
    assert "different run" in capsys.readouterr().err


def test_run_file_rejects_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"not": "a header"}\n')
    with pytest.raises(ValueError, match="not a tiltsample run file"):
        RunFile(path, {"a": 1})
    assert chunk_seed(1, 0) != chunk_seed(1, 1) != chunk_seed(2, 0)


def test_sample_reports_bad_input_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sample", "best-of-m", "--no-progress"]) == 2
    assert "did you mean 'best-of-n'" in capsys.readouterr().err


def test_demo_writes_table_and_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "-n", "300"]) == 0
    out = capsys.readouterr().out
    assert "SIR M=64" in out and "power P(ab)" in out
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert (tmp_path / "demo_sir_tv.png").stat().st_size > 10_000
    rows = {r["sampler"]: r for r in summary["rows"]}
    # SIR's exact output law gets closer to the target as M grows
    assert (
        rows["SIR M=64"]["tv_exact_law"]
        < rows["SIR M=16"]["tv_exact_law"]
        < rows["SIR M=4"]["tv_exact_law"]
    )


def test_help_states_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "2 usage error" in " ".join(out.split()) and "--debug" in out
