"""Argument checks shared by every public constructor and sampler.

Each check raises ``ValueError`` or ``TypeError`` with a message that names the parameter and the
allowed values, so bad input fails early and clearly.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
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
