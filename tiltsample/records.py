"""Incremental, resumable JSONL output for long runs.

A run file starts with one ``{"header": {...}}`` line (what was run). Work is split into chunks;
each chunk appends its records and then one ``{"chunk_done": c, ...}`` line. On resume the file is
read back, a torn last line and the records of unfinished chunks are dropped, and only the missing
chunks run again — nothing is lost or duplicated. Each chunk's randomness is derived from the run
seed and the chunk index, so a resumed run writes exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def chunk_seed(seed: int, chunk: int) -> int:
    """A deterministic per-chunk seed (SplitMix64-style mixing of ``seed`` and ``chunk``)."""
    z = (seed * 0x9E3779B97F4A7C15 + (chunk + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**62 - 1)


class RunFile:
    """A JSONL run file with a header and completed chunks.

    Parameters
    ----------
    path
        The ``.jsonl`` file; created (with its folder) if missing.
    header
        What is being run. Resuming a file written with a different header raises ``ValueError``
        (records of two different runs are never mixed).
    """

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))
        self.records: dict[int, list[dict[str, Any]]] = {}
        self.summaries: dict[int, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            self._rewrite()

    def _load(self) -> None:
        lines = self.path.read_text().split("\n")
        parsed: list[dict[str, Any]] = []
        for line in lines:
            if not line.strip():
                continue
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                break  # torn last line of an interrupted run
        if not parsed or "header" not in parsed[0]:
            raise ValueError(f"{self.path} is not a tiltsample run file (no header line)")
        if parsed[0]["header"] != self.header:
            raise ValueError(
                f"{self.path} holds a different run ({parsed[0]['header']}); "
                "use another --out file or delete it"
            )
        pending: dict[int, list[dict[str, Any]]] = {}
        for item in parsed[1:]:
            if "chunk_done" in item:
                c = int(item["chunk_done"])
                self.records[c] = pending.pop(c, [])
                self.summaries[c] = item
            else:
                pending.setdefault(int(item["chunk"]), []).append(item)
        self._rewrite()  # drop torn lines and unfinished chunks

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps({"header": self.header}) + "\n")
            for c in sorted(self.records):
                for rec in self.records[c]:
                    f.write(json.dumps(rec) + "\n")
                f.write(json.dumps(self.summaries[c]) + "\n")
        tmp.replace(self.path)

    def done(self, chunk: int) -> bool:
        """Whether ``chunk`` is complete on disk."""
        return chunk in self.records

    def write_chunk(
        self, chunk: int, records: list[dict[str, Any]], summary: dict[str, Any]
    ) -> None:
        """Append one chunk's records and its completion line, flushed to disk."""
        if self.done(chunk):
            raise ValueError(f"chunk {chunk} is already written")
        recs = [{"chunk": chunk, **r} for r in records]
        done_line = {"chunk_done": chunk, **summary}
        with self.path.open("a") as f:
            for rec in recs:
                f.write(json.dumps(rec) + "\n")
            f.write(json.dumps(done_line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[chunk] = recs
        self.summaries[chunk] = done_line

    def all_records(self) -> list[dict[str, Any]]:
        """Records of all completed chunks, in chunk order."""
        return [r for c in sorted(self.records) for r in self.records[c]]
