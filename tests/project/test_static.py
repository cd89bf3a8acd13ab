"""ruff and mypy are part of the test suite.

mypy cannot see through the editable-install finder, so it checks a generated *view*: a copy of the
package laid out as installed (``tiltsample/{samplers,targets,theory}``). A second run with an
injected type error proves the view really checks every folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build_view(dest: Path) -> Path:
    """Copy the sources into ``dest/tiltsample`` with the installed layout."""
    pkg = dest / "tiltsample"
    shutil.copytree(ROOT / "tiltsample", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("samplers", "targets", "theory"):
        shutil.copytree(ROOT / folder, pkg / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return pkg


def run_mypy(view: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--no-error-summary",
            "tiltsample",
        ],
        cwd=view.parent,
        capture_output=True,
        text=True,
    )


def test_ruff_clean() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def view(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_view(tmp_path_factory.mktemp("view"))


def test_mypy_clean(view: Path) -> None:
    proc = run_mypy(view)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["samplers", "targets", "theory", "."])
def test_mypy_catches_an_injected_error(tmp_path: Path, folder: str) -> None:
    pkg = build_view(tmp_path)
    bad = pkg / folder / "_injected_error.py"
    bad.write_text('def f() -> int:\n    return "not an int"\n')
    proc = run_mypy(pkg)
    assert proc.returncode != 0
    assert "_injected_error.py" in proc.stdout
