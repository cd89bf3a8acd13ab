"""The environment under test is the locked one, and the lock honours pyproject.toml.

``requirements.lock`` (``make lock``) pins every runtime and dev dependency; ``make test`` installs
from it. If the environment drifted (a package upgraded by hand, a stale venv), the suite would
silently test something else: this module fails loudly instead. ``make test-latest`` deselects
:func:`test_installed_versions_match_the_lock` on purpose (it runs the newest releases).
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        match = PIN.match(text)
        assert match, f"requirements.lock:{number}: not an exact pin: {text!r}"
        name = canonical(match.group(1))
        assert name not in pins, f"requirements.lock:{number}: {name} pinned twice"
        pins[name] = match.group(2)
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for group in project["optional-dependencies"].values():  # every extra is locked and tested
        reqs += [Requirement(r) for r in group]
    return reqs


def test_lock_pins_the_core_stack() -> None:
    pins = locked()
    for name in ("torch", "transformers", "pyro-ppl", "scipy", "numpy", "pytest", "ruff", "mypy"):
        assert name in pins, f"{name} is not in requirements.lock"
    assert Version(pins["torch"]).base_version == "2.13.0", "torch must stay the 2.13.0 CPU wheel"


def test_lock_satisfies_pyproject_ranges() -> None:
    pins = locked()
    for req in declared():
        name = canonical(req.name)
        assert name in pins, f"{req} (pyproject.toml) is missing from requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject.toml's {req}; "
            "run `make lock`"
        )


def test_installed_versions_match_the_lock() -> None:
    drift = []
    for name, version in sorted(locked().items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            drift.append(f"{name}: locked {version}, not installed")
            continue
        if Version(installed) != Version(version):
            drift.append(f"{name}: locked {version}, installed {installed}")
    if drift:
        pytest.fail(
            "the environment is not the locked one (rerun `make setup` after `rm .venv/.installed`"
            ", or `make lock` if the change is intended):\n  " + "\n  ".join(drift)
        )


def test_cache_keyword_is_decided_in_one_place() -> None:
    """Only targets/hf/compat.py spells the KV-cache keywords of ``transformers``."""
    allowed = ROOT / "targets" / "hf" / "compat.py"
    assert allowed.is_file(), "the compatibility module moved: update this test"
    offenders = []
    for folder in ("tiltsample", "samplers", "targets", "theory", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == allowed:
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                code = line.split("#", 1)[0]
                if re.search(r"\bpast_key_values\s*=|\.past_key_values\b", code):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, "pass the KV cache through hf.compat.forward_cache_kwargs: " + ", ".join(
        offenders
    )
