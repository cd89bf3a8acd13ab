"""`tiltsample verify` (quick profile): report rows, bounds respected, slopes, resumable cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiltsample.theory.rates import EXPERIMENTS, run_verify

# Runs the quick verify profile end to end: in `make test`, not `make test-fast`.
pytestmark = pytest.mark.slow


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
    from tiltsample.app.cli import build_parser, main

    assert main(["verify", "--out", str(tmp_path), "--only", "j,imh", "--no-progress"]) == 0
    assert "report.md" in capsys.readouterr().out
    assert (tmp_path / "quick" / "report.md").exists()
    args = build_parser().parse_args(["verify", "--profile", "full", "--docs", "docs"])
    assert (args.profile, args.docs) == ("full", "docs")


def test_bound_violations_flags_only_real_violations() -> None:
    from tiltsample.theory.rates import bound_violations

    rows = [
        {"tv": 0.1, "bound": 0.2},
        {"tv": 0.3, "bound": 0.2},  # violated
        {"tv": 0.5, "bound": "inf"},  # vacuous bound: skipped
        {"tv": 0.5},  # no bound in this row
        {"tv": 0.2, "bound": 0.2 - 1e-15},  # within tolerance
    ]
    assert bound_violations(rows, [("tv", "bound")]) == [(1, "tv", "bound", 0.3, 0.2)]


def test_no_measured_value_exceeds_its_bound(quick: tuple[Path, list[object]]) -> None:
    """Every (measured, bound) column pair, row by row, independent of each verdict's logic."""
    from tiltsample.theory.rates import bound_violations

    _, results = quick
    with_pairs = {r.key for r in results if r.bound_pairs}  # type: ignore[attr-defined]
    assert with_pairs >= {"a1", "a", "b", "c", "d", "e", "f", "g", "j", "imh"}
    for r in results:
        pairs = r.bound_pairs  # type: ignore[attr-defined]
        checked = [row for row in r.rows for m, b in pairs if m in row and b in row]  # type: ignore[attr-defined]
        assert not pairs or checked, r.key  # the pairs name real columns
        assert bound_violations(r.rows, pairs) == [], r.key  # type: ignore[attr-defined]
        assert r.holds is True and "VIOLATED" not in r.verdict, r.key  # type: ignore[attr-defined]


def test_docs_generator_writes_every_row_and_keeps_the_prose(
    quick: tuple[Path, list[object]], tmp_path: Path
) -> None:
    from tiltsample.theory.rates.docs import BEGIN, END, write_docs

    _, results = quick
    docs = tmp_path / "docs"
    docs.mkdir()
    prose_head = "# Theory\n\nHand-written prose before.\n\n"
    prose_tail = "\n\nHand-written prose after.\n"
    (docs / "theory.md").write_text(prose_head + BEGIN + "\nstale\n" + END + prose_tail)
    write_docs(results, "quick", docs, elapsed=1.0, cells=(3, 9))  # type: ignore[arg-type]
    text = (docs / "theory.md").read_text()
    assert text.startswith(prose_head) and text.endswith(prose_tail)
    assert "stale" not in text and "3 cells computed, 6 read from the cache" in text
    section = text.split(BEGIN)[1].split(END)[0]
    for r in results:
        fig = Path(r.figure).name  # type: ignore[attr-defined]
        assert f"| [{r.key}](figures/verify/{fig}) |" in section  # type: ignore[attr-defined]
        assert (docs / "figures" / "verify" / fig).stat().st_size > 5000
    report = (docs / "verify_report.md").read_text()
    for key in EXPERIMENTS:
        assert f"| {key} |" in report and f"## ({key})" in report
    assert "](figures/verify/" in report
    write_docs(results, "quick", docs, elapsed=1.0, cells=(3, 9))  # type: ignore[arg-type]
    assert (docs / "theory.md").read_text() == text  # idempotent
    (docs / "theory.md").write_text(prose_head + BEGIN + "\n")
    with pytest.raises(ValueError, match="END"):
        write_docs(results, "quick", docs)  # type: ignore[arg-type]


def test_docs_need_every_experiment(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="docs"):
        run_verify("quick", tmp_path, only=["j"], docs=tmp_path / "docs")


def test_committed_docs_are_generated_from_the_full_profile() -> None:
    from tiltsample.theory.rates.docs import BEGIN, END

    docs = Path(__file__).resolve().parents[2] / "docs"
    text = (docs / "theory.md").read_text()
    section = text.split(BEGIN)[1].split(END)[0]
    assert "`tiltsample verify --profile full`" in section
    report = (docs / "verify_report.md").read_text()
    assert report.startswith("# Verification report (full profile)")
    for key in EXPERIMENTS:
        assert f"| [{key}](figures/verify/" in section
        assert f"## ({key})" in report
    for link in section.split("](figures/verify/")[1:]:
        assert (docs / "figures" / "verify" / link.split(")")[0]).exists()
    assert "❌" not in section  # no bound violated where its assumptions hold
