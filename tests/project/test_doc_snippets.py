"""Every ```python block of README.md and docs/**/*.md runs as written.

Convention
----------
* **Every block is a whole program.** Each fenced block whose info string starts with ``python``
  (or ``py``) runs on its own, in a fresh interpreter (``python -W error -c BLOCK``), in an empty
  temporary directory. Blocks never build on earlier blocks of the same file: a reader can copy any
  single block and run it. So a block carries its own imports and builds its own target (toys, or
  the shipped ``arith-ar`` model via ``tasks.load_policy()`` / ``tasks.model_path("arith-ar")``).
* **Small and fast.** Each block has a wall-clock budget of :data:`BLOCK_BUDGET_S` seconds (the
  test fails when it is exceeded); blocks are written to take a few seconds on a loaded 2-core CPU
  machine (small ``n``, toy targets, the tiny shipped model).
* **Warnings are errors**, as in the rest of the suite (``-W error``).
* **Opting out** is possible but discouraged: a block opened with ```python no-run is reported as
  skipped (the rest of the info string is the reason). No block uses it today.
* Blocks of other languages (``sh``, ``text``, none) are not run.

Test ids name the file and the block's number among that file's Python blocks (from 1), with the
line where it starts: ``docs/hf.md#1(L9)``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

# Each block is a fresh interpreter (seconds each): in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BLOCK_BUDGET_S = 120
"""Per-block wall-clock limit in seconds (a loaded 2-core machine; blocks take a few seconds)."""

PYTHON_INFO = ("python", "py", "python3")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced Python block of a Markdown file."""

    path: str
    """File, relative to the repository root."""
    number: int
    """Position among the file's Python blocks, from 1."""
    line: int
    """Line of the opening fence, from 1."""
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.path}#{self.number}(L{self.line})"


def markdown_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown file under docs/ (recursively), in a stable order."""
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    return files + sorted((root / "docs").rglob("*.md"))


def python_blocks(text: str, path: str) -> list[Block]:
    """The fenced Python blocks of one Markdown text (indented fences are dedented)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m["fence"], m["indent"]
        words = m["info"].strip().split()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if close and close["fence"].startswith(fence) and not close["info"].strip():
                break
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        if words and words[0].lower() in PYTHON_INFO:
            reason = None
            if len(words) > 1 and words[1] == "no-run":
                reason = " ".join(words[2:]) or "marked no-run"
            code = textwrap.dedent("\n".join(body)) + "\n"
            blocks.append(Block(path, len(blocks) + 1, start + 1, code, reason))
    return blocks


def all_blocks(root: Path = ROOT) -> list[Block]:
    out: list[Block] = []
    for file in markdown_files(root):
        out += python_blocks(file.read_text(encoding="utf-8"), file.relative_to(root).as_posix())
    return out


BLOCKS = all_blocks()


def test_extractor_finds_blocks_and_skips_other_languages() -> None:
    text = (
        "intro\n```sh\nmake demo\n```\n```python\nx = 1\n```\n"
        "- item\n\n  ```python\n  y = 2\n  ```\n```\nplain\n```\n"
        "```python no-run needs a GPU\nz\n```\n"
    )
    blocks = python_blocks(text, "doc.md")
    assert [b.code for b in blocks] == ["x = 1\n", "y = 2\n", "z\n"]
    assert [b.number for b in blocks] == [1, 2, 3]
    assert [b.line for b in blocks] == [5, 10, 16]
    assert [b.skip_reason for b in blocks] == [None, None, "needs a GPU"]
    assert blocks[0].id == "doc.md#1(L5)"


def test_the_readme_and_the_docs_have_python_blocks() -> None:
    files = {b.path for b in BLOCKS}
    assert "README.md" in files
    assert any(f.startswith("docs/") for f in files)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block_runs(block: Block, tmp_path: Path) -> None:
    if block.skip_reason is not None:
        pytest.skip(f"{block.id}: {block.skip_reason}")
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",  # tiny tensors: threads only add wake-up latency
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-W", "error", "-c", block.code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=BLOCK_BUDGET_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} ran longer than {BLOCK_BUDGET_S} s:\n{block.code}")
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, (
        f"{block.id} failed (exit {proc.returncode}, {seconds:.1f} s)\n--- code\n{block.code}"
        f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    )
    assert not re.search(r"\bnan\b", proc.stdout, re.IGNORECASE), (
        f"{block.id} printed NaN:\n{proc.stdout}"
    )
