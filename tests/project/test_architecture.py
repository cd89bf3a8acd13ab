"""Architecture guard: module size, import cycles, private names across modules, layering.

The rules of ``docs/architecture.md``, measured on the source tree with :mod:`ast` (no imports):

* no module over 600 lines;
* no import cycle between modules (module-level *or* inside functions);
* no private name (``_x``) imported from another module: a helper two modules need is public;
* layering: the core (``tiltsample``), ``samplers``, ``targets`` and ``theory`` never import the
  application layer ``tiltsample.app``; a sampler never imports a concrete target, a target never
  imports a sampler.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {
    "tiltsample": "tiltsample",
    "samplers": "tiltsample.samplers",
    "targets": "tiltsample.targets",
    "theory": "tiltsample.theory",
}
MAX_LINES = 600


@cache
def modules() -> dict[str, Path]:
    """Dotted module name -> source file, as installed."""
    out: dict[str, Path] = {}
    for folder, prefix in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts]
            parts = [p for p in parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _owner(name: str) -> str | None:
    """The project module that defines ``name`` (a module or a name inside one)."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def _base(module: str, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    parts = module.split(".")
    package = parts if modules()[module].name == "__init__.py" else parts[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


@cache
def imports() -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported project module, name imported from it or None)}."""
    mods = modules()
    out: dict[str, set[tuple[str, str | None]]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    owner = _owner(alias.name)
                    if owner and owner != module:
                        out[module].add((owner, None))
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, node)
                if not base or not base.startswith("tiltsample"):
                    continue
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in mods:
                        if full != module:
                            out[module].add((full, None))
                        continue
                    owner = _owner(base)
                    if owner and owner != module:
                        out[module].add((owner, alias.name))
    return out


def test_the_scan_sees_the_whole_package() -> None:
    mods = modules()
    assert "tiltsample.driver" in mods and "tiltsample.samplers.best_of_n" in mods
    assert any(deps for deps in imports().values()), "no import found: the scan is broken"


def test_no_module_over_600_lines() -> None:
    big = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (split them by idea): {big}"


def _cycles() -> list[list[str]]:
    graph = {m: {dep for dep, _ in deps} for m, deps in imports().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    assert not _cycles(), f"import cycles (module- or function-level): {_cycles()}"


def test_no_private_name_imported_across_modules() -> None:
    private = sorted(
        f"{module} imports {owner}.{name}"
        for module, deps in imports().items()
        for owner, name in deps
        if name is not None and name.startswith("_") and not name.startswith("__")
    )
    assert not private, "private names used elsewhere are public names in disguise: " + "; ".join(
        private
    )


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("tiltsample.samplers", "tiltsample.app"),
        ("tiltsample.targets", "tiltsample.app"),
        ("tiltsample.theory", "tiltsample.app"),
        ("tiltsample.samplers", "tiltsample.targets"),
        ("tiltsample.targets", "tiltsample.samplers"),
    ],
)
def test_layering(layer: str, forbidden: str) -> None:
    bad = sorted(
        f"{module} -> {dep}"
        for module, deps in imports().items()
        if module.startswith(layer + ".") or module == layer
        for dep, _ in deps
        if dep.startswith(forbidden + ".") or dep == forbidden
    )
    assert not bad, f"{layer} must not import {forbidden}: {bad}"


def test_core_never_imports_the_app_layer() -> None:
    core = [
        m
        for m in modules()
        if m.startswith("tiltsample.")
        and not m.startswith(("tiltsample.app", "tiltsample.samplers", "tiltsample.targets"))
        and not m.startswith("tiltsample.theory")
    ]
    bad = sorted(
        f"{module} -> {dep}"
        for module in core
        if module != "tiltsample.__main__"
        for dep, _ in imports()[module]
        if dep.startswith("tiltsample.app")
    )
    assert not bad, f"the core must not import the application layer: {bad}"
