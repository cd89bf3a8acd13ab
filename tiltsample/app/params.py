"""Command-line values and errors: parsing ``KEY=VALUE`` pairs and typed flags, checking sampler
and target parameter names against the factories, and turning exceptions into one-line messages
with their exit status (2 for a user's mistake, 1 for a runtime failure)."""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tiltsample import registry, validation


# ------------------------------------------------------------------------------ error handling
class UsageError(Exception):
    """A mistake in the command line: reported on one line with exit status 2."""


USAGE = 2
"""Exit status of a usage error (bad argument, bad value, bad path, unusable resume file)."""
FAILURE = 1
"""Exit status of a runtime failure (I/O, out of memory, a bug)."""

PATH_ERRORS = (
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileNotFoundError,
    FileExistsError,
)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def report(prog: str, kind: str, message: str) -> None:
    print(f"{prog}: {kind}: {one_line(message)}", file=sys.stderr)


def os_message(exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    return f"{what}: {exc.filename!r}" if exc.filename else str(exc) or what


# ------------------------------------------------------------------------------ value parsing
def literal(text: str) -> Any:
    """Parse ``key=value`` values: JSON literals (numbers, true/false, null, lists), the floats
    ``inf``/``-inf``/``nan``, or else strings."""
    special = validation.finite_or_inf(text)
    if special is not None:
        return special
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def pairs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        if key in out:
            raise UsageError(f"{flag}: {key!r} is given twice")
        out[key] = literal(value)
    return out


def int_type(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum`` (the message names the allowed range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    special = validation.finite_or_inf(text)
    try:
        value = float(text) if special is None else special
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def names_list(text: str) -> list[str]:
    """An argparse type: a non-empty comma-separated list of names."""
    names = [v.strip() for v in text.split(",")]
    if not text.strip() or not all(names):
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of names without empty entries, got {text!r}"
        )
    return names


def budgets(text: str) -> list[int]:
    """An argparse type: a non-empty comma-separated list of ints >= 1."""
    parse = int_type(1)
    items = [v.strip() for v in text.split(",")]
    if not text.strip() or not all(items):
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of ints >= 1 without empty entries, got {text!r}"
        )
    try:
        return [parse(v) for v in items]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"every budget {exc}") from None


def ray_address(text: str) -> str:
    """An argparse type for ``--ray [ADDRESS]``: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``
    (the address ``ray start --head`` prints); ``""`` (the flag alone) is a local cluster."""
    if text == "" or text == "auto":
        return text
    host, sep, port = text.removeprefix("ray://").rpartition(":")
    if not sep or not host or any(c.isspace() for c in text) or not port.isdigit():
        raise argparse.ArgumentTypeError(
            f"must be auto, HOST:PORT or ray://HOST:PORT (as printed by 'ray start --head'), "
            f"got {text!r}"
        )
    if not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"port must lie in 1..65535, got {text!r}")
    return text


def ray_backend(address: str | None, workers: int | None) -> Any:
    """The :class:`~tiltsample.executor.Backend` of ``--ray [ADDRESS]`` / ``--ray-workers N``
    (serial without ``--ray``); ``UsageError`` when ``ray`` is not installed."""
    import importlib.util

    from tiltsample.executor import SERIAL, Backend

    if address is None:
        if workers is not None:
            raise UsageError("--ray-workers needs --ray")
        return SERIAL
    if importlib.util.find_spec("ray") is None:
        raise UsageError("--ray needs Ray: pip install 'tiltsample[ray]'")
    return Backend(ray=True, address=address or None, workers=workers)


def device_flag(flag: str) -> Callable[[str], str]:
    """An argparse type for a device flag (``--device cuda:1``): checked by the library's rule
    (:func:`tiltsample.targets.hf.resolve_device`: malformed, or CUDA on a machine without it),
    reported on one line naming ``flag``; returns the canonical name (``"cuda:1"``)."""

    def parse(text: str) -> str:
        from tiltsample.targets.hf import resolve_device

        try:
            return str(resolve_device(text, flag))
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    parse.__name__ = "device"
    return parse


def dtype_flag(flag: str) -> Callable[[str], str]:
    """An argparse type for a model dtype flag (``--dtype bf16``), checked by
    :func:`tiltsample.targets.hf.resolve_dtype`; returns the canonical name (``"bfloat16"``)."""

    def parse(text: str) -> str:
        from tiltsample.targets.hf import resolve_dtype

        try:
            return str(resolve_dtype(text, flag)).removeprefix("torch.")
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    parse.__name__ = "dtype"
    return parse


def out_file(flag: str, path: str | Path) -> Path:
    try:
        return validation.output_file(flag, path, create_below=Path.cwd())
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def out_folder(flag: str, path: str | Path) -> Path:
    try:
        return validation.output_folder(flag, path, create_below=Path.cwd())
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


# ------------------------------------------------------------------------------ parameter names
RESERVED = {
    "target": "the target is chosen with --target",
    "num_samples": "set it with -n/--num-samples",
    "seed": "set it with --seed",
    "generator": "the CLI seeds a generator from --seed",
    "progress": "use --no-progress",
}


def keyword_names(func: Callable[..., Any]) -> tuple[list[str], bool]:
    """Keyword parameters of ``func`` and whether it also takes ``**kwargs``."""
    names: list[str] = []
    var = False
    for p in inspect.signature(func).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var = True
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(p.name)
    return names, var


def unknown(flag: str, what: str, key: str, valid: Sequence[str]) -> UsageError:
    hint = difflib.get_close_matches(key, valid, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    listed = ", ".join(valid) if valid else "(none)"
    return UsageError(f"{flag}: unknown {what} {key!r}{suggestion}; valid: {listed}")


def check_target_options(name: str, factory: Callable[..., Any], opts: dict[str, Any]) -> None:
    valid, var = keyword_names(factory)
    if var:
        return
    for key in opts:
        if key not in valid:
            raise unknown("--target-opt", f"{name} option", key, valid)


def forwarded(factory: Callable[..., Any], callee: str) -> set[str]:
    """Keywords that ``factory`` itself passes to ``callee`` (so a user cannot)."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(factory)))
    except (OSError, TypeError, SyntaxError):
        return set()
    return {
        k.arg
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == callee
        for k in node.keywords
        if k.arg is not None
    }


def sampler_parameters(factory: Callable[..., Any], callee: str | None = None) -> list[str]:
    """The sampler parameters a user may pass with ``-p`` (following ``**kwargs`` to ``callee``,
    a function of the factory's module, when the factory forwards them)."""
    valid, var = keyword_names(factory)
    if var and callee is not None:
        inner = getattr(sys.modules.get(factory.__module__), callee, None)
        if callable(inner):
            fixed = forwarded(factory, callee)
            valid += [n for n in keyword_names(inner)[0] if n not in valid and n not in fixed]
    return [n for n in valid if n not in RESERVED]


def check_sampler_parameters(
    name: str, factory: Callable[..., Any], params: dict[str, Any]
) -> None:
    for key in params:
        if key in RESERVED:
            raise UsageError(f"-p/--param {key}: not a sampler parameter ({RESERVED[key]})")
    valid, var = keyword_names(factory)
    if var:
        return  # checked when the sampler is built (see build_checked)
    for key in params:
        if key not in valid:
            raise unknown("-p/--param", f"{name} parameter", key, sampler_parameters(factory))


_UNEXPECTED = re.compile(r"(\w+)\(\) got an unexpected keyword argument '(\w+)'")


def build_checked(name: str, target: Any, num_samples: int, params: dict[str, Any]) -> None:
    """Build the sampler once (cheap) so that bad parameters fail before anything is written."""
    from tiltsample.driver import build

    factory = registry.sampler_entry(name).load()
    check_sampler_parameters(name, factory, params)
    try:
        build(name, target, num_samples, params)
    except TypeError as exc:
        m = _UNEXPECTED.search(str(exc))
        if m is None:
            raise
        valid = sampler_parameters(factory, m.group(1))
        raise unknown("-p/--param", f"{name} parameter", m.group(2), valid) from None


def classify(exc: BaseException) -> tuple[str, int, str]:
    """(kind, exit status, message) of an exception raised by a command."""
    if isinstance(exc, UsageError | ValueError | TypeError):
        return "error", USAGE, str(exc)
    if isinstance(exc, PATH_ERRORS):
        return "error", USAGE, os_message(exc)
    hint = " (rerun with --debug for the traceback)"
    if isinstance(exc, OSError):
        return "error", FAILURE, os_message(exc) + hint
    if isinstance(exc, MemoryError | RuntimeError | ImportError):
        text = one_line(str(exc)) or type(exc).__name__
        text = text if len(text) <= 400 else text[:400] + " ..."
        return "error", FAILURE, f"{type(exc).__name__}: {text}{hint}"
    return (
        "internal error",
        FAILURE,
        f"{type(exc).__name__}: {exc} — this is a bug in tiltsample; rerun with --debug for "
        "the traceback and please report it",
    )
