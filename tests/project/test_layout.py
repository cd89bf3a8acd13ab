"""Layout guard: samplers/targets/theory are installed only under the tiltsample namespace."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tiltsample

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("samplers", "targets", "theory")


@pytest.mark.parametrize("folder", FOLDERS)
def test_subpackage_lives_in_its_top_level_folder(folder: str) -> None:
    module = importlib.import_module(f"tiltsample.{folder}")
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == ROOT / folder


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_global_top_level_module(folder: str) -> None:
    # run outside the repository root so the folder is not importable from the working directory
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({folder!r}) is not None)"
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, f"'import {folder}' works in the installed environment"


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_module_imports_under_its_tiltsample_name(folder: str) -> None:
    files = sorted(p for p in (ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ is empty"
    for path in files:
        rel = path.relative_to(ROOT / folder).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        name = ".".join(["tiltsample", folder, *parts])
        module = importlib.import_module(name)
        assert Path(module.__file__ or "").resolve() == path.resolve()


def test_core_modules_import() -> None:
    names = [m.name for m in pkgutil.walk_packages(tiltsample.__path__, "tiltsample.")]
    for name in names:
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_import_tiltsample_is_light() -> None:
    code = (
        "import sys, tiltsample\n"
        "heavy = [m for m in ('transformers', 'matplotlib', 'pyro', 'scipy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"import tiltsample pulled in: {proc.stdout.strip()}"


def test_sampling_does_not_import_transformers_or_matplotlib() -> None:
    code = (
        "import sys, tiltsample\n"
        "from tiltsample.targets.toys import tabular_toy\n"
        "tiltsample.sample('best-of-n', tabular_toy(), 4, seed=0)\n"
        "print(','.join(m for m in ('transformers', 'matplotlib') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


# The tests mirror the package: a folder per layer (and per sampler family).
TEST_FOLDERS = {
    "core": ROOT / "tiltsample",
    "app": ROOT / "tiltsample" / "app",
    "samplers": ROOT / "samplers",
    "samplers/ets": ROOT / "samplers" / "ets",
    "samplers/mh": ROOT / "samplers" / "mh",
    "samplers/smc": ROOT / "samplers" / "smc",
    "targets": ROOT / "targets",
    "theory": ROOT / "theory",
    "project": ROOT,
}


def test_tests_mirror_the_layout() -> None:
    tests = ROOT / "tests"
    loose = sorted(p.name for p in tests.glob("test_*.py"))
    assert not loose, f"test modules belong in a layer's folder, not tests/: {loose}"
    folders = {
        str(p.parent.relative_to(tests)) for p in tests.rglob("test_*.py") if p.parent != tests
    }
    assert folders <= set(TEST_FOLDERS), (
        f"test folders without a package: {folders - set(TEST_FOLDERS)}"
    )
    for folder, package in TEST_FOLDERS.items():
        assert package.is_dir(), f"tests/{folder} mirrors {package}, which does not exist"
        assert any((tests / folder).glob("test_*.py")), f"tests/{folder} has no tests"


def test_test_module_names_are_unique() -> None:
    # conftest.py puts every test folder on sys.path: a repeated name would shadow another
    names = [p.stem for p in (ROOT / "tests").rglob("*.py") if p.name != "conftest.py"]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
