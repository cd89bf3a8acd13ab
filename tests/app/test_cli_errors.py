"""The CLI never prints a traceback for a user's mistake (docs/errors.md is this table).

Every case runs ``tiltsample.app.cli.main`` in-process and asserts exit status 2, exactly one line
on stderr of the form ``tiltsample <command>: error: <message>``, that the message names the
parameter (and, where useful, the allowed values), and that no traceback is printed. Runtime
failures exit 1 with one line and a hint to rerun with ``--debug``, which shows the traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tiltsample.app import cli
from tiltsample.app.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "errors.md"

# (id, argv with {tmp} for a scratch folder, substrings the one-line message must contain)
CASES: list[tuple[str, list[str], list[str]]] = [
    # ---- sample: counts, seeds, chunks
    ("sample -n 0", ["sample", "best-of-n", "-n", "0"], ["--num-samples", ">= 1"]),
    ("sample -n -5", ["sample", "exact", "-n", "-5"], ["--num-samples", ">= 1"]),
    ("sample -n abc", ["sample", "exact", "-n", "abc"], ["--num-samples", "'abc'"]),
    ("sample --chunk-size 0", ["sample", "exact", "--chunk-size", "0"], ["--chunk-size", ">= 1"]),
    ("sample --seed -1", ["sample", "exact", "--seed", "-1"], ["--seed", ">= 0"]),
    ("sample --seed 1.5", ["sample", "exact", "--seed", "1.5"], ["--seed", "'1.5'"]),
    # ---- sample: sampler parameters
    (
        "unknown sampler",
        ["sample", "best-of-m"],
        ["sampler", "'best-of-m'", "did you mean 'best-of-n'"],
    ),
    (
        "unknown parameter",
        ["sample", "ancestral", "-p", "typo=3"],
        ["-p/--param", "'typo'", "temperature", "batch_size"],
    ),
    (
        "misspelt parameter",
        ["sample", "best-of-n", "-p", "num_candidate=3"],
        ["'num_candidate'", "did you mean 'num_candidates'", "selection"],
    ),
    (
        "unknown parameter (forwarded)",
        ["sample", "entropy-cut", "-p", "typo=3"],
        ["'typo'", "alpha", "num_steps"],
    ),
    ("parameter without =", ["sample", "exact", "-p", "temperature"], ["--param", "KEY=VALUE"]),
    (
        "parameter twice",
        ["sample", "ancestral", "-p", "temperature=1", "-p", "temperature=2"],
        ["--param", "'temperature'", "twice"],
    ),
    (
        "num_samples as -p",
        ["sample", "exact", "-p", "num_samples=3"],
        ["num_samples", "-n/--num-samples"],
    ),
    ("seed as -p", ["sample", "exact", "-p", "seed=3"], ["seed", "--seed"]),
    (
        "temperature nan",
        ["sample", "ancestral", "-p", "temperature=nan"],
        ["temperature", "> 0", "nan"],
    ),
    (
        "temperature inf",
        ["sample", "ancestral", "-p", "temperature=inf"],
        ["temperature", "finite", "inf"],
    ),
    ("temperature zero", ["sample", "ancestral", "-p", "temperature=0"], ["temperature", "> 0"]),
    (
        "temperature text",
        ["sample", "ancestral", "-p", "temperature=hot"],
        ["temperature", "'hot'"],
    ),
    (
        "num_candidates zero",
        ["sample", "best-of-n", "-p", "num_candidates=0"],
        ["num_candidates", ">= 1"],
    ),
    (
        "num_candidates float",
        ["sample", "best-of-n", "-p", "num_candidates=2.5"],
        ["num_candidates", "int"],
    ),
    (
        "num_candidates nan",
        ["sample", "best-of-n", "-p", "num_candidates=nan"],
        ["num_candidates", "int"],
    ),
    (
        "selection typo",
        ["sample", "best-of-n", "-p", "selection=max"],
        ["selection", "softmax", "argmax"],
    ),
    (
        "ess_threshold nan",
        ["sample", "smc", "-p", "ess_threshold=nan"],
        ["ess_threshold", "[0, 1]"],
    ),
    ("beam narrower than -n", ["sample", "beam", "-n", "5", "-p", "num_beams=2"], ["num_beams"]),
    # ---- sample: target options
    (
        "unknown target",
        ["sample", "exact", "--target", "tabluar"],
        ["target", "'tabluar'", "tabular"],
    ),
    (
        "unknown target option",
        ["sample", "exact", "--target-opt", "typo=1"],
        ["--target-opt", "'typo'", "max_len", "lam"],
    ),
    (
        "lam nan",
        ["sample", "exact", "--target-opt", "lam=nan"],
        ["lam", "> 0", "inf allowed", "nan"],
    ),
    ("lam zero", ["sample", "exact", "--target-opt", "lam=0"], ["lam", "> 0"]),
    ("lam -inf", ["sample", "exact", "--target-opt", "lam=-inf"], ["lam", "> 0"]),
    ("max_len zero", ["sample", "exact", "--target-opt", "max_len=0"], ["max_len"]),
    # ---- sample: --out
    ("--out is a folder", ["sample", "exact", "--out", "{tmp}"], ["--out", "is a folder"]),
    (
        "--out in a missing folder",
        ["sample", "exact", "--out", "{tmp}/missing/x.jsonl"],
        ["--out", "missing", "does not exist"],
    ),
    (
        "--out under a file",
        ["sample", "exact", "--out", "{tmp}/file.txt/x.jsonl"],
        ["--out", "file.txt", "not a folder"],
    ),
    ("--out empty", ["sample", "exact", "--out", ""], ["--out", "empty"]),
    (
        "--out of another run",
        ["sample", "exact", "--out", "{tmp}/other.jsonl"],
        ["other.jsonl", "different run", "--out"],
    ),
    (
        "--out damaged",
        ["sample", "exact", "-n", "4", "--chunk-size", "2", "--out", "{tmp}/dup.jsonl"],
        ["dup.jsonl", "line 4", "duplicate record"],
    ),
    ("unrecognised flag", ["sample", "exact", "--bogus"], ["unrecognized arguments", "--bogus"]),
    # ---- sample with a model (refused before the model is loaded)
    (
        "sample --engine without --model",
        ["sample", "power", "--engine", "vllm"],
        ["--engine", "only with --model"],
    ),
    ("sample --lam without --model", ["sample", "power", "--lam", "0.5"], ["--lam", "--model"]),
    (
        "sample --model unknown",
        ["sample", "power", "--model", "nope"],
        ["model", "arith-ar", "nope"],
    ),
    (
        "sample --model with --target",
        ["sample", "power", "--model", "arith-ar", "--target", "tabular"],
        ["--target", "not with --model"],
    ),
    (
        "sample --model --engine vllm --device",
        ["sample", "power", "--model", "arith-ar", "--engine", "vllm", "--device", "cpu"],
        ["device", "CUDA_VISIBLE_DEVICES"],
    ),
    # ---- compare (all refused before the model is loaded)
    ("compare --problems 0", ["compare", "--problems", "0"], ["--problems", ">= 1"]),
    ("compare --repeats 0", ["compare", "--repeats", "0"], ["--repeats", ">= 1"]),
    ("compare --budgets 0", ["compare", "--budgets", "1,0"], ["--budgets", ">= 1"]),
    ("compare --budgets empty", ["compare", "--budgets", ""], ["--budgets", "empty"]),
    ("compare --budgets x", ["compare", "--budgets", "1,x"], ["--budgets", "'x'"]),
    ("compare --seed -1", ["compare", "--seed", "-1"], ["--seed", ">= 0"]),
    ("compare --lam 0", ["compare", "--lam", "0"], ["--lam", "> 0"]),
    ("compare --lam nan", ["compare", "--lam", "nan"], ["--lam", "finite"]),
    ("compare --lam inf", ["compare", "--lam", "inf"], ["--lam", "finite"]),
    ("compare --threads 0", ["compare", "--threads", "0"], ["--threads", ">= 1"]),
    ("compare --samplers empty", ["compare", "--samplers", ""], ["--samplers", "empty"]),
    (
        "compare --samplers unknown",
        ["compare", "--samplers", "nope", "--out", "{tmp}/c"],
        ["sampler", "'nope'", "best-of-n"],
    ),
    ("compare --profile", ["compare", "--profile", "huge"], ["--profile", "'huge'", "demo"]),
    ("compare --device", ["compare", "--device", "tpu"], ["--device", "'tpu'", "cpu", "cuda"]),
    ("compare --dtype", ["compare", "--dtype", "int8"], ["--dtype", "'int8'", "bf16", "float32"]),
    ("compare --engine", ["compare", "--engine", "tgi"], ["--engine", "'tgi'", "vllm"]),
    (
        "compare --engine vllm --device",
        ["compare", "--engine", "vllm", "--device", "cpu"],
        ["device", "CUDA_VISIBLE_DEVICES", "engine 'hf'"],
    ),
    ("compare --out is a file", ["compare", "--out", "{tmp}/file.txt"], ["--out", "is a file"]),
    (
        "compare --out in a missing folder",
        ["compare", "--out", "{tmp}/missing/x"],
        ["--out", "missing", "does not exist"],
    ),
    # ---- demo, verify, train-tiny
    ("demo -n 0", ["demo", "-n", "0"], ["--num-samples", ">= 1"]),
    ("demo --seed -1", ["demo", "--seed", "-1"], ["--seed", ">= 0"]),
    ("demo --out is a file", ["demo", "--out", "{tmp}/file.txt"], ["--out", "is a file"]),
    (
        "verify --only unknown",
        ["verify", "--only", "nope", "--out", "{tmp}/v"],
        ["--only", "'nope'", "valid"],
    ),
    ("verify --only empty", ["verify", "--only", ""], ["--only", "empty"]),
    ("verify --profile", ["verify", "--profile", "slow"], ["--profile", "quick", "full"]),
    (
        "verify --out in a missing folder",
        ["verify", "--out", "{tmp}/missing/v"],
        ["--out", "does not exist"],
    ),
    ("train-tiny --steps 0", ["train-tiny", "--steps", "0"], ["--steps", ">= 1"]),
    ("train-tiny --threads 0", ["train-tiny", "--threads", "0"], ["--threads", ">= 1"]),
    ("train-tiny --eval-every -1", ["train-tiny", "--eval-every", "-1"], ["--eval-every", ">= 0"]),
    ("train-tiny --model", ["train-tiny", "--model", "gpt5"], ["--model", "arith-ar"]),
    # ---- top level
    ("no command", [], ["COMMAND", "required"]),
    ("unknown command", ["smaple"], ["COMMAND", "'smaple'", "sample"]),
]


def _prepare(tmp: Path) -> None:
    """Scratch files some cases need: a plain file, a run file of another run, a damaged one."""
    (tmp / "file.txt").write_text("not a folder\n")
    (tmp / "other.jsonl").write_text(json.dumps({"header": {"sampler": "other"}}) + "\n")
    dup = tmp / "dup.jsonl"
    argv = ["sample", "exact", "-n", "4", "--chunk-size", "2", "--no-exact", "--no-progress"]
    assert main([*argv, "--out", str(dup)]) == 0
    lines = dup.read_text().splitlines()
    dup.write_text("\n".join([*lines[:3], lines[2], *lines[3:]]) + "\n")  # record 1 twice


def _argv(template: list[str], tmp: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)) for a in template]


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch folder outside the current directory (folders may be created only below it)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _prepare(scratch)
    return scratch


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prefix = f"tiltsample {command}: error: " if command else "tiltsample: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix) :]


@pytest.mark.parametrize(("case", "argv", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(
    case: str,
    argv: list[str],
    expected: list[str],
    scratch: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    capsys.readouterr()
    before = sorted(p.name for p in scratch.iterdir())
    code = main(_argv(argv, scratch))
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    command = argv[0] if argv and argv[0] in cli.COMMANDS else ""
    message = _one_error_line(err, command)
    for text in expected:
        assert text in message, (text, message)
    # nothing was written for a refused command
    assert sorted(p.name for p in scratch.iterdir()) == before


def shown(argv: list[str]) -> str:
    """How a case's command line is written in docs/errors.md (the scratch folder is DIR)."""
    return " ".join(["tiltsample", *(shlex.quote(a.replace("{tmp}", "DIR")) for a in argv)])


def test_table_in_the_docs_lists_every_case() -> None:
    docs = DOCS.read_text()
    assert len(CASES) >= 30
    missing = [case for case, argv, _ in CASES if f"`{shown(argv)}`" not in docs]
    assert not missing, missing


# ------------------------------------------------------------------------ other error paths
def test_read_only_folder_is_refused(
    scratch: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the checks run as root here, where chmod does not stop writes: simulate the permission
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == scratch else real(p, mode)
    )
    assert main(["sample", "exact", "--out", str(scratch / "x.jsonl")]) == 2
    assert "permission denied" in _one_error_line(capsys.readouterr().err, "sample")
    assert main(["compare", "--out", str(scratch / "c")]) == 2
    assert "permission denied" in _one_error_line(capsys.readouterr().err, "compare")


def _raiser(exc: BaseException) -> Any:
    def run(args: Any) -> int:
        raise exc

    return run


@pytest.mark.parametrize(
    ("exc", "code", "kind", "texts"),
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/ro/x.jsonl"),
            2,
            "error",
            ["/ro/x.jsonl"],
        ),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/tmp"), 2, "error", ["/tmp"]),
        (
            OSError(errno.ENOSPC, "No space left on device", "x.jsonl"),
            1,
            "error",
            ["No space", "--debug"],
        ),
        (
            RuntimeError("CUDA out of memory.\nTried to allocate"),
            1,
            "error",
            ["RuntimeError", "--debug"],
        ),
        (
            ZeroDivisionError("division by zero"),
            1,
            "internal error",
            ["ZeroDivisionError", "bug", "--debug"],
        ),
        (KeyError("x"), 1, "internal error", ["KeyError", "--debug"]),
        (KeyboardInterrupt(), 130, "interrupted", ["resume"]),
    ],
    ids=["permission", "is-a-directory", "disk-full", "runtime", "bug", "key-error", "ctrl-c"],
)
def test_runtime_failures_are_one_line(
    exc: BaseException,
    code: int,
    kind: str,
    texts: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(cli, "_cmd_list", _raiser(exc))
    assert main(["list"]) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tiltsample list: {kind}: "), err
    for text in texts:
        assert text in lines[0]
    # --debug (before or after the command) lets the exception through, traceback and all
    for argv in (["--debug", "list"], ["list", "--debug"]):
        with pytest.raises(type(exc)):
            main(argv)


def test_lam_inf_is_accepted_where_the_api_allows_it(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sample", "ancestral", "-n", "20", "--target-opt", "lam=inf", "--no-progress"]
    assert main(argv) == 0
    assert "tv_to_target" in capsys.readouterr().out


def test_bad_parameter_writes_no_run_file(
    scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A parameter error is found before --out is created, so the corrected rerun can use it."""
    out = scratch / "run.jsonl"
    base = ["sample", "best-of-n", "-n", "6", "--no-progress", "--no-exact", "--out", str(out)]
    assert main([*base, "-p", "num_candidates=0"]) == 2
    assert not out.exists()
    assert main([*base, "-p", "num_candidates=2"]) == 0


def test_missing_folders_are_created_only_below_the_current_directory(
    scratch: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # relative to the current directory (as in `make demo`'s results/compare-demo): created
    assert main(["sample", "exact", "-n", "4", "--no-progress", "--out", "a/b/x.jsonl"]) == 0
    assert Path("a/b/x.jsonl").is_file()
    # a folder named by the user whose parent exists: only that leaf folder is created
    assert main(["demo", "-n", "30", "--out", str(scratch / "leaf")]) == 0
    assert (scratch / "leaf" / "demo.json").is_file()


@pytest.mark.parametrize(
    ("argv", "code", "texts"),
    [
        (["sample", "best-of-n", "-n", "0"], 2, ["tiltsample sample: error: ", "--num-samples"]),
        (["--debug", "sample", "exact", "--out", "."], 1, ["Traceback", "UsageError", "--out"]),
    ],
    ids=["usage", "debug"],
)
def test_end_to_end(argv: list[str], code: int, texts: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tiltsample", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == code, proc.stderr
    for text in texts:
        assert text in proc.stderr
    if code == 2:
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
