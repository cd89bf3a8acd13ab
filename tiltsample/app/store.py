"""Incremental, resumable JSONL output for long runs.

A run file starts with one ``{"header": {...}}`` line (what was run). Work is split into chunks;
each chunk appends its records and then one ``{"chunk_done": c, ...}`` line. Every record carries
its chunk and its position in the chunk (``{"chunk": c, "record": k, ...}``) and the completion
line the number of records of the chunk (``"records": n``), so the file describes itself.

On resume the file is read back and checked line by line. A torn *last* line (a run killed in the
middle of a write) and the records of unfinished chunks are dropped, and only the missing chunks
run again — nothing is lost or duplicated. Anything else that does not fit the one order a
:class:`RunFile` writes — a duplicated record or completion line, a record out of order, a chunk
with more or fewer records than it declares (or than the caller expects), an unreadable line in
the middle — is refused with a :class:`RunFileError` naming the file and the line: the store never
guesses which of two copies is right. Each chunk's randomness is derived from the run seed and the
chunk index, so a resumed run writes exactly what an uninterrupted run would have.

Files written before records were numbered (no ``"record"`` / ``"records"`` keys) are still read;
for them duplicates are caught through the ``chunk_sizes`` the caller passes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_RECORD_KEYS = ("chunk", "record")
_DONE_KEYS = ("chunk_done", "records")


class RunFileError(ValueError):
    """A run file that cannot be resumed safely (duplicated, reordered or unreadable lines).

    Parameters
    ----------
    path
        The run file.
    line
        The 1-based number of the offending line.
    problem
        What is wrong with that line.
    """

    def __init__(self, path: Path, line: int, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        super().__init__(
            f"{path}, line {line}: {problem}; refusing to resume from a damaged run file "
            "(remove the offending line, or delete the file to start over)"
        )


class RunFile:
    """A JSONL run file with a header and completed chunks.

    Parameters
    ----------
    path
        The ``.jsonl`` file; created (with its folder) if missing. Callers check user-given paths
        first (:func:`tiltsample.validation.output_file`).
    header
        What is being run. Resuming a file written with a different header raises ``ValueError``
        (records of two different runs are never mixed).
    chunk_sizes
        Optional: the number of records each chunk must hold (its length is the number of
        chunks). When given, a completed chunk on disk with another number of records, or a chunk
        index outside the run, is refused; this also protects files written before records were
        numbered.

    Raises
    ------
    RunFileError
        The file holds a duplicated, reordered or unreadable line (not a torn last line).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        header: dict[str, Any],
        *,
        chunk_sizes: Sequence[int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.header = json.loads(json.dumps(header))
        self.chunk_sizes = None if chunk_sizes is None else [int(n) for n in chunk_sizes]
        self.records: dict[int, list[dict[str, Any]]] = {}
        self.summaries: dict[int, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            self._rewrite()

    # ------------------------------------------------------------------------------ reading
    def _parse(self) -> list[tuple[int, Any]]:
        """The decoded lines with their 1-based numbers; a torn last line is dropped."""
        numbered = [
            (i + 1, line)
            for i, line in enumerate(self.path.read_text().split("\n"))
            if line.strip()
        ]
        parsed: list[tuple[int, Any]] = []
        for pos, (lineno, line) in enumerate(numbered):
            try:
                parsed.append((lineno, json.loads(line)))
            except json.JSONDecodeError:
                if pos == len(numbered) - 1 and pos > 0:
                    break  # torn last line of an interrupted run
                if pos == 0:
                    break  # reported below as "no header line"
                raise RunFileError(self.path, lineno, "unreadable line (not JSON)") from None
        return parsed

    def _index(self, item: dict[str, Any], key: str, lineno: int) -> int:
        value = item[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise RunFileError(self.path, lineno, f"{key!r} must be an int >= 0, got {value!r}")
        sizes = self.chunk_sizes
        if sizes is not None and key != "record" and value >= len(sizes):
            raise RunFileError(
                self.path, lineno, f"chunk {value} is outside this run (chunks 0..{len(sizes) - 1})"
            )
        return value

    def _load(self) -> None:
        parsed = self._parse()
        first = parsed[0][1] if parsed else None
        if not isinstance(first, dict) or "header" not in first:
            raise ValueError(f"{self.path} is not a tiltsample run file (no header line)")
        if first["header"] != self.header:
            raise ValueError(
                f"{self.path} holds a different run ({first['header']}); "
                "use another --out file or delete it"
            )
        done_line: dict[int, int] = {}  # chunk -> line of its completion
        open_chunk: int | None = None  # the chunk whose records are being read
        open_line = 0
        pending: list[tuple[int, dict[str, Any]]] = []  # (line, record) of the open chunk
        for lineno, item in parsed[1:]:
            if not isinstance(item, dict):
                raise RunFileError(self.path, lineno, "not a JSON object")
            if "header" in item:
                raise RunFileError(self.path, lineno, "a second header line")
            if "chunk_done" in item:
                c = self._index(item, "chunk_done", lineno)
                if c in done_line:
                    raise RunFileError(
                        self.path,
                        lineno,
                        f"chunk {c} is completed twice (first on line {done_line[c]})",
                    )
                if open_chunk is not None and open_chunk != c:
                    raise RunFileError(
                        self.path,
                        lineno,
                        f"completion of chunk {c} while chunk {open_chunk} (records from line "
                        f"{open_line}) is unfinished: records out of order",
                    )
                recs = [r for _, r in pending]
                declared = item.get("records")
                if declared is not None and declared != len(recs):
                    raise RunFileError(
                        self.path,
                        lineno,
                        f"chunk {c} declares {declared} records but {len(recs)} precede its "
                        "completion line",
                    )
                if self.chunk_sizes is not None and len(recs) != self.chunk_sizes[c]:
                    raise RunFileError(
                        self.path,
                        lineno,
                        f"chunk {c} holds {len(recs)} records, this run writes "
                        f"{self.chunk_sizes[c]} (a duplicated or missing record line?)",
                    )
                self.records[c] = recs
                self.summaries[c] = item
                done_line[c] = lineno
                open_chunk, pending = None, []
            elif "chunk" in item:
                c = self._index(item, "chunk", lineno)
                if c in done_line:
                    raise RunFileError(
                        self.path,
                        lineno,
                        f"record of chunk {c}, which was completed on line {done_line[c]} "
                        "(a duplicated line?)",
                    )
                if open_chunk is not None and open_chunk != c:
                    raise RunFileError(
                        self.path,
                        lineno,
                        f"record of chunk {c} inside unfinished chunk {open_chunk} (records "
                        f"from line {open_line}): records out of order",
                    )
                if "record" in item:
                    k = self._index(item, "record", lineno)
                    if k < len(pending):
                        raise RunFileError(
                            self.path,
                            lineno,
                            f"duplicate record {k} of chunk {c} (first on line {pending[k][0]})",
                        )
                    if k > len(pending):
                        raise RunFileError(
                            self.path,
                            lineno,
                            f"record {k} of chunk {c} out of order (expected record "
                            f"{len(pending)})",
                        )
                if open_chunk is None:
                    open_chunk, open_line = c, lineno
                pending.append((lineno, item))
            else:
                raise RunFileError(
                    self.path, lineno, "neither a record nor a chunk completion line"
                )
        self._rewrite()  # drop a torn last line and an unfinished chunk

    # ------------------------------------------------------------------------------ writing
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
        """Append one chunk's records and its completion line, flushed to disk.

        Parameters
        ----------
        chunk
            The chunk index (any order; each chunk once).
        records
            JSON-serialisable dicts; the keys ``chunk`` and ``record`` are the store's.
        summary
            Extra fields of the completion line; the keys ``chunk_done`` and ``records`` are the
            store's.
        """
        if self.done(chunk):
            raise ValueError(f"chunk {chunk} is already written")
        if self.chunk_sizes is not None:
            if not 0 <= chunk < len(self.chunk_sizes):
                raise ValueError(f"chunk must lie in [0, {len(self.chunk_sizes)}), got {chunk}")
            if len(records) != self.chunk_sizes[chunk]:
                raise ValueError(
                    f"chunk {chunk} must hold {self.chunk_sizes[chunk]} records, got {len(records)}"
                )
        for keys, what in ((_RECORD_KEYS, records), (_DONE_KEYS, [summary])):
            clash = sorted({k for r in what for k in r} & set(keys))
            if clash:
                raise ValueError(f"keys {clash} are reserved by the run file")
        recs = [{"chunk": chunk, "record": k, **r} for k, r in enumerate(records)]
        done_line = {"chunk_done": chunk, "records": len(recs), **summary}
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
