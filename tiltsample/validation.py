"""Argument checks shared by every public constructor and sampler.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the parameter and the
allowed values, so bad input fails early and clearly.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value


def non_negative_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 0, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value}")
    return value


def positive_float(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """Return ``float(value)`` if it is a finite number > 0 (or +inf when allowed)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number > 0, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or v <= 0 or (math.isinf(v) and not allow_inf):
        allowed = "a number > 0 (inf allowed)" if allow_inf else "a finite number > 0"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return v


def unit_interval(name: str, value: Any, *, closed: bool = True) -> float:
    """Return ``float(value)`` if it lies in [0, 1] (or (0, 1) when ``closed`` is False)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(value).__name__}")
    v = float(value)
    ok = 0.0 <= v <= 1.0 if closed else 0.0 < v < 1.0
    if not ok or math.isnan(v):
        interval = "[0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value}")
    return v


def one_of(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``; suggest the closest otherwise."""
    options = list(allowed)
    if value not in options:
        hint = difflib.get_close_matches(str(value), options, n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"{name} must be one of {options}, got {value!r}{suggestion}")
    return str(value)


def generator(name: str, value: Any) -> torch.Generator:
    """Return ``value`` if it is a CPU ``torch.Generator``."""
    if not isinstance(value, torch.Generator):
        raise TypeError(
            f"{name} must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), "
            f"got {type(value).__name__}"
        )
    return value


def make_generator(
    seed: int | None, gen: torch.Generator | None
) -> tuple[torch.Generator, int | None]:
    """Resolve the ``seed=`` / ``generator=`` pair of the drivers.

    Exactly one may be given. With neither, a fresh seed is drawn from the OS (never from torch's
    global RNG) and returned so that the run can be reproduced.
    """
    if seed is not None and gen is not None:
        raise ValueError("pass either seed= or generator=, not both")
    if gen is not None:
        return generator("generator", gen), None
    if seed is None:
        import secrets

        seed = secrets.randbits(62)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return torch.Generator().manual_seed(seed), seed


def token_id(name: str, value: Any, vocab_size: int) -> int:
    """Return ``value`` if it is a valid token id for a vocabulary of ``vocab_size``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int token id, got {type(value).__name__}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got {value}")
    return value


def finite_or_inf(text: str) -> float | None:
    """Parse the spellings of the IEEE specials that JSON lacks (``inf``, ``-inf``, ``nan``).

    Returns the float for ``inf``/``+inf``/``infinity``/``-inf``/``-infinity``/``nan`` (any
    case) and ``None`` for anything else, so command-line values such as ``lam=inf`` reach the
    checks above as numbers (which then accept or refuse them by name).
    """
    word = text.strip().lower()
    if word in ("inf", "+inf", "infinity", "+infinity"):
        return math.inf
    if word in ("-inf", "-infinity"):
        return -math.inf
    if word == "nan":
        return math.nan
    return None


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable_folder(name: str, folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"{name}: {str(folder)!r} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write into folder {str(folder)!r} (permission denied)")


def _folder_to_create(name: str, folder: Path, create_below: str | os.PathLike[str] | None) -> None:
    """Check that the missing ``folder`` may be created (only inside ``create_below``)."""
    root = None if create_below is None else Path(os.path.abspath(create_below))
    if root is None or not _inside(folder, root):
        where = "" if root is None else f"; missing folders are created only inside {str(root)!r}"
        raise ValueError(f"{name}: folder {str(folder)!r} does not exist (create it first{where})")
    _writable_folder(name, _existing_ancestor(folder))


def _path(name: str, path: Any) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}")
    if os.fspath(path) == "":
        raise ValueError(f"{name} must be a path, got an empty string")
    return Path(os.path.abspath(Path(path).expanduser()))


def output_file(
    name: str, path: Any, *, create_below: str | os.PathLike[str] | None = None
) -> Path:
    """Check a file path to write (or append to) and return it as an absolute ``Path``.

    The path must not be a folder; an existing file must be writable; its folder must exist and
    be writable. A missing folder is accepted only inside ``create_below`` (the CLI passes the
    current directory, so ``results/run.jsonl`` works from a fresh clone while
    ``/nonexistent/x.jsonl`` is refused instead of creating a folder at the filesystem root).
    Nothing is created here.

    Raises
    ------
    ValueError
        Naming ``name`` and the offending path.
    """
    full = _path(name, path)
    if full.is_dir():
        raise ValueError(f"{name} must be a file, but {str(path)!r} is a folder")
    if full.exists():
        if not os.access(full, os.W_OK):
            raise ValueError(f"{name}: cannot write to {str(path)!r} (permission denied)")
        return full
    if full.parent.exists():
        _writable_folder(name, full.parent)
    else:
        _folder_to_create(name, full.parent, create_below)
    return full


def output_folder(
    name: str, path: Any, *, create_below: str | os.PathLike[str] | None = None
) -> Path:
    """Check a folder to write into and return it as an absolute ``Path``.

    An existing path must be a writable folder. A missing folder is accepted when its parent is
    a writable folder (only the folder the caller named is then created), or when it lies inside
    ``create_below`` (missing parents are created too, e.g. ``results/compare-demo`` from a fresh
    clone). Nothing is created here.

    Raises
    ------
    ValueError
        Naming ``name`` and the offending path.
    """
    full = _path(name, path)
    if full.exists():
        if not full.is_dir():
            raise ValueError(f"{name} must be a folder, but {str(path)!r} is a file")
        _writable_folder(name, full)
        return full
    if full.parent.exists():
        _writable_folder(name, full.parent)
    else:
        _folder_to_create(name, full.parent, create_below)
    return full
