"""``tiltsample compare``: plan, resume, table, figure, CLI (test-sized runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tiltsample.app import cli
from tiltsample.app.compare import (
    PROFILES,
    RECIPES,
    available_recipes,
    markdown_table,
    plan,
    run_compare,
    summarise,
    wilson,
)

FAST = ["ancestral", "majority", "best-of-n", "beam"]


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    previous = torch.get_num_threads()
    yield
    assert torch.get_num_threads() == previous, "compare must restore the thread count"


def test_wilson_interval() -> None:
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and math.isclose(hi, 0.2775, abs_tol=1e-4)
    lo, hi = wilson(5, 10)
    assert math.isclose(lo, 0.2366, abs_tol=1e-4) and math.isclose(hi, 0.7634, abs_tol=1e-4)
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_plan_matches_budgets_and_skips_inapplicable_cells() -> None:
    recipes = [r for r in RECIPES if r.label in ("ancestral", "best-of-n")]
    cells = plan(recipes, [1, 4], num_problems=3, repeats=2)
    assert sum(c.recipe.label == "ancestral" for c in cells) == 3 * 2  # budget 1 only
    bon = [c for c in cells if c.recipe.label == "best-of-n"]
    assert len(bon) == 2 * 3 * 2 and {c.params["num_candidates"] for c in bon} == {1, 4}


def test_unknown_sampler_label_is_rejected() -> None:
    with pytest.raises(ValueError, match="sampler"):
        available_recipes(["best-of-m"])


def test_summary_and_table() -> None:
    recs = [
        {
            "sampler": "ancestral",
            "budget": 1,
            "problem": p,
            "repeat": 0,
            "correct": float(p % 2),
            "generated_tokens": 30,
            "forward_tokens": 40,
            "model_calls": 31,
            "reward_calls": 1,
            "seconds": 0.5,
        }
        for p in range(4)
    ]
    rows = summarise(recs)
    assert len(rows) == 1 and rows[0]["accuracy"] == 0.5 and rows[0]["gen_tokens"] == 30
    assert rows[0]["tokens_per_s"] == 60.0
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == wilson(2, 4)
    table = markdown_table(rows)
    assert (
        table.splitlines()[0].startswith("| sampler | budget |")
        and "| ancestral | 1 | 4 |" in table
    )


def test_run_resume_and_outputs(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    first = run_compare(profile="test", out_dir=out, samplers=FAST, num_problems=1, progress=False)
    assert {r["sampler"] for r in first.rows} == set(FAST)
    for r in first.records:
        assert r["correct"] in (0.0, 1.0) and r["generated_tokens"] > 0
    for name in ("compare.jsonl", "compare.md", "compare.png"):
        assert (out / name).stat().st_size > 0
    # matched by generated tokens: best-of-n at budget 2 spends about twice budget 1
    bon = {r["budget"]: r["gen_tokens"] for r in first.rows if r["sampler"] == "best-of-n"}
    assert 1.3 < bon[2] / bon[1] < 3.0
    # interrupt: drop the last cell and leave a torn line; the rerun redoes exactly that cell
    lines = (out / "compare.jsonl").read_text().splitlines()
    torn = "\n".join(lines[:-2]) + '\n{"chunk": 99, "sampl'
    (out / "compare.jsonl").write_text(torn)
    again = run_compare(profile="test", out_dir=out, samplers=FAST, num_problems=1, progress=False)

    def strip(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]

    assert strip(again.records) == strip(first.records)
    # a different configuration refuses to mix into the same file
    with pytest.raises(ValueError, match="different run"):
        run_compare(
            profile="test", out_dir=out, samplers=FAST, num_problems=1, lam=0.5, progress=False
        )


def test_cli_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        [
            "compare",
            "--profile",
            "test",
            "--out",
            str(tmp_path),
            "--samplers",
            "ancestral",
            "--problems",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| ancestral | 1 | 1 |" in printed
    header = json.loads((tmp_path / "compare.jsonl").read_text().splitlines()[0])["header"]
    assert header["kind"] == "tiltsample-compare" and header["problems"] == 1
    assert cli.main(["compare", "--samplers", "nope", "--out", str(tmp_path / "x")]) == 2


def test_profiles_are_small_enough() -> None:
    assert PROFILES["test"].num_problems <= 3 and max(PROFILES["test"].budgets) <= 2
    assert PROFILES["demo"].num_problems * max(PROFILES["demo"].budgets) <= 600


@pytest.mark.parametrize("command", ["compare", "train-tiny"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0 and "usage" in capsys.readouterr().out


def test_common_random_numbers_at_budget_one(tmp_path: Path) -> None:
    """ancestral, majority and best-of-n with one candidate share the seed: the same draw."""
    out = run_compare(
        profile="test",
        out_dir=tmp_path,
        samplers=["ancestral", "majority", "best-of-n"],
        budgets=[1],
        num_problems=2,
        progress=False,
    )
    by: dict[int, set[str]] = {}
    for r in out.records:
        by.setdefault(r["problem"], set()).add(r["response"])
    assert all(len(v) == 1 for v in by.values())


def test_demo_profile_end_to_end_and_interrupted_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``make demo`` profile (every registered recipe) on two problems, interrupted after a
    few cells: the rerun does only the missing cells and no record is duplicated."""
    import tiltsample.app.compare as compare

    kw: dict[str, Any] = {
        "profile": "demo",
        "out_dir": tmp_path,
        "num_problems": 2,
        "budgets": [1, 4],
        "progress": False,
        "batch_problems": False,  # every cell through run_cell, one at a time
    }
    real = compare.run_cell
    calls = {"n": 0}

    def counting(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the sixth cell
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "run_cell", counting)
    with pytest.raises(KeyboardInterrupt):
        run_compare(**kw)
    calls["n"] = -(10**6)  # no more interruptions
    result = run_compare(**kw)
    recipes, _ = available_recipes()
    cells = plan(recipes, [1, 4], num_problems=2, repeats=1)
    assert calls["n"] + 10**6 == len(cells) - 5  # only the missing cells ran again
    keys = [(r["sampler"], r["budget"], r["problem"], r["repeat"]) for r in result.records]
    assert len(keys) == len(set(keys)) == len(cells)
    chunks = [
        json.loads(line)["chunk"]
        for line in (tmp_path / "compare.jsonl").read_text().splitlines()
        if '"chunk":' in line
    ]
    assert sorted(chunks) == list(range(len(cells)))
    assert {r["sampler"] for r in result.rows} == {r.label for r in recipes}
    for name in ("compare.md", "compare.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_masked_diffusion_recipes(tmp_path: Path) -> None:
    """The optional arith-dlm recipes run by label only, and are matched by generated tokens."""
    from tiltsample.app.compare import DLM_RECIPES

    default, _ = available_recipes()
    assert not {r.label for r in default} & {r.label for r in DLM_RECIPES}
    labels = [r.label for r in DLM_RECIPES]
    out = run_compare(
        profile="test",
        out_dir=tmp_path,
        samplers=labels,
        budgets=[1, 4],
        num_problems=1,
        progress=False,
    )
    rows = {(r["sampler"], r["budget"]): r for r in out.rows}
    assert set(rows) == {
        ("dlm-base", 1),
        ("dlm-best-of-n", 4),
        ("dlm-ets", 4),
        ("dlm-fk-steering", 4),
    }
    base = rows[("dlm-base", 1)]["gen_tokens"]
    assert base == 48  # every position of the masked-diffusion response is committed once
    for key in (("dlm-best-of-n", 4), ("dlm-ets", 4), ("dlm-fk-steering", 4)):
        assert 3 * base <= rows[key]["gen_tokens"] <= 6 * base
    header = json.loads((tmp_path / "compare.jsonl").read_text().splitlines()[0])["header"]
    assert header["diffusion_model"] == "arith-dlm"


def test_batched_cells_give_the_records_of_cells_run_alone(tmp_path: Path) -> None:
    """``batch_problems`` (the default) runs the cells of every default recipe on all problems as
    one job per (recipe, budget): every record has the response, verdict, generated tokens and
    reward calls of the cell run alone; the shared model calls are apportioned (fewer in all);
    an interrupted batched run resumes to the same file as one that ran through."""
    kw: dict[str, Any] = {
        "profile": "test",
        "num_problems": 4,
        "budgets": [1, 4],
        "samplers": None,  # every default recipe
        "progress": False,
    }
    alone = run_compare(out_dir=tmp_path / "alone", batch_problems=False, **kw)
    batched = run_compare(out_dir=tmp_path / "batched", **kw)
    same = ("sampler", "budget", "problem", "repeat", "correct", "answer", "response")
    same += ("generated_tokens", "reward_calls")
    # ancestral, low-temperature; majority, best-of-n, beam at k = 1, 4; ets, smc, power-smc,
    # power, entropy-cut, qalign at k = 4
    assert len(alone.records) == len(batched.records) == 4 * (2 + 2 * 3 + 6)
    for a, b in zip(alone.records, batched.records, strict=True):
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
        assert b["batched"] == 4 and "batched" not in a
    assert batched.cost.model_calls < alone.cost.model_calls
    assert batched.cost.generated_tokens == alone.cost.generated_tokens
    # cut the batched run after 10 cells, as a killed run leaves it: the rerun runs the rest
    path = tmp_path / "batched" / "compare.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    done = [i for i, line in enumerate(lines) if '"chunk_done"' in line]
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "compare.jsonl").write_text("".join(lines[: done[9] + 1]))
    resumed = run_compare(out_dir=tmp_path / "cut", **kw)
    assert [{k: r[k] for k in same} for r in resumed.records] == [
        {k: r[k] for k in same} for r in alone.records
    ]
