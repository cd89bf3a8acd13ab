"""Griffe extension for the API reference (used by mkdocstrings; not part of the package).

1. ``tiltsample.samplers``, ``tiltsample.targets`` and ``tiltsample.theory`` live in the top-level
   folders ``samplers/``, ``targets/`` and ``theory/`` (setuptools ``package-dir``). Griffe's static
   loader only sees ``tiltsample/``, so once ``tiltsample`` is loaded the three folders are loaded
   from the handler's ``paths`` and attached under it (their paths become ``tiltsample.<folder>``).
2. The docstrings are numpydoc with reStructuredText math. Markdown does not know ``.. math::`` or
   ``:class:`X```, so they are rewritten on load: math blocks and ``:math:`` roles become
   arithmatex ``$$ … $$`` / ``$…$`` (MathJax renders them), cross-reference roles become code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

FOLDERS = ("samplers", "targets", "theory")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const|term):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")


def _display(target: str) -> str:
    # ``~a.b.c`` shows ``c``; a role with an explicit title ``title <target>`` shows the title
    title = re.match(r"(.+?)\s*<[^>]+>$", target)
    return title.group(1) if title else target


def rst_to_markdown(text: str) -> str:
    """Rewrite the reStructuredText math and cross-reference roles of one docstring."""
    lines = definition_lists(text).split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group("indent")
        body = [m.group("rest")] if m.group("rest").strip() else []
        i += 1
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        width = min((_indent(b) for b in block if b.strip()), default=0)
        body += [b[width:] for b in block if b.strip()]
        out += ["", f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$", ""]
    text = "\n".join(out)
    text = _MATH_ROLE.sub(lambda r: f"${r.group(1)}$", text)
    return _ROLE.sub(_role, text)


def _role(match: re.Match[str]) -> str:
    shown = _display(match.group(1))
    if "~" in match.group(0).split("`")[1][:1]:
        shown = shown.rsplit(".", 1)[-1]
    return f"`{shown}`"


_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")


def definition_lists(text: str) -> str:
    """Turn the reST definition lists of a docstring's description into Markdown.

    A line at column 0 directly followed by indented lines is a term and its definition; Markdown
    would read the indented paragraphs as code, so the term becomes bold and the body is dedented.
    Only the description (before the first numpydoc section) is touched.
    """
    lines = text.split("\n")
    stop = next(
        (
            i - 1
            for i in range(1, len(lines))
            if _UNDERLINE.match(lines[i]) and lines[i - 1].strip()
        ),
        len(lines),
    )
    out: list[str] = []
    i = 0
    while i < stop:
        line = lines[i]
        is_term = (
            line.strip()
            and _indent(line) == 0
            and not line.rstrip().endswith("::")
            and i + 1 < stop
            and lines[i + 1].strip()
            and _indent(lines[i + 1]) > 0
        )
        if not is_term:
            out.append(line)
            i += 1
            continue
        out += ["", f"**{line.strip()}**", ""]
        i += 1
        body: list[str] = []
        while i < stop and (not lines[i].strip() or _indent(lines[i]) > 0):
            body.append(lines[i])
            i += 1
        width = min((_indent(b) for b in body if b.strip()), default=0)
        out += [b[width:] for b in body]
    return "\n".join(out + lines[stop:])


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


_PARAM_SECTIONS = ("Parameters", "Other Parameters")


def trailing_prose(text: str, names: set[str]) -> str:
    """Give prose that follows a Parameters section its own ``Notes`` section.

    Numpydoc reads every column-0 line of a Parameters section as a parameter; a paragraph written
    after the list (or a ``Cost`` pseudo-heading) would be rendered, and warned about, as a
    parameter that the signature does not have. Such a line starts a Notes section instead.
    """
    lines = text.split("\n")
    out: list[str] = []
    section = ""
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and _UNDERLINE.match(nxt):
            section = line.strip()
        elif (
            section in _PARAM_SECTIONS
            and line.strip()
            and _indent(line) == 0
            and not _UNDERLINE.match(line)
            and (i == 0 or not lines[i - 1].strip())
            and line.split(":")[0].strip().lstrip("*") not in names
            and not all(n.strip().lstrip("*") in names for n in line.split(":")[0].split(","))
        ):
            out += ["Notes", "-----"]
            section = "Notes"
        out.append(line)
    return "\n".join(out)


def _parameter_names(obj: griffe.Object) -> set[str] | None:
    target: Any = obj
    if obj.is_class:
        init = obj.members.get("__init__")
        if init is None or init.is_alias:
            return None
        target = init
    elif not obj.is_function:
        return None
    return {p.name for p in target.parameters}


def _walk(obj: griffe.Object, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if obj.docstring is not None:
        text = rst_to_markdown(obj.docstring.value)
        names = _parameter_names(obj)
        obj.docstring.value = text if names is None else trailing_prose(text, names)
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member, seen)  # type: ignore[arg-type]


class TiltsampleDocs(griffe.Extension):
    """Attach the mapped folders under ``tiltsample`` and make the docstrings Markdown."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "tiltsample":
            return
        for folder in FOLDERS:
            if folder not in pkg.members:
                pkg.set_member(folder, loader.load(folder))
        _walk(pkg, set())
