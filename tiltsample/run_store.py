"""The resumable JSONL store of long runs: records in chunks (:class:`RunFile`) or keyed cells
(:class:`CellStore`).

Both kinds of file start with one ``{"header": {...}}`` line saying what is being run; resuming a
file written with another header is refused (``ValueError``), so two runs are never mixed. Work is
appended and flushed (``fsync``) as it finishes, in any order.

* A :class:`RunFile` (``tiltsample sample --out``, ``compare``) splits the work into chunks; each
  chunk appends its records and then one ``{"chunk_done": c, ...}`` line. Every record carries its
  chunk and its position in the chunk (``{"chunk": c, "record": k, ...}``) and the completion line
  the number of records of the chunk (``"records": n``), so the file describes itself.
* A :class:`CellStore` (the rate experiments of ``tiltsample verify``) holds finished cells keyed
  by a string, one self-contained line each, ``{"cell": key, "value": ...}``: the line is the
  record and its completion at once. Without a path it is an in-memory store.

On resume the file is read back and checked line by line. A torn *last* line (a run killed in the
middle of a write) and the records of unfinished chunks are dropped, and only the missing work runs
again — nothing is lost or duplicated. Anything else out of place — a duplicated record, cell or
completion line, a record out of order, a chunk with more or fewer records than it declares (or
than the caller expects), an unreadable line in the middle — is refused with a
:class:`RunFileError` naming the file and the line: the store never guesses which of two copies is
right. Each chunk's or cell's randomness is derived from the run seed and its own index or
parameters, so a resumed run writes exactly what an uninterrupted run would have.

Older files are still read: run files written before records were numbered (no ``"record"`` /
``"records"`` keys; duplicates are then caught through the ``chunk_sizes`` the caller passes), and
cell files written before cell files had a header (only cell lines): their cells are checked like
any others and the file is rewritten with the caller's header.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CellStore", "RunFile", "RunFileError"]

_RECORD_KEYS = ("chunk", "record")
_DONE_KEYS = ("chunk_done", "records")
_CELL_KEYS = {"cell", "value"}


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


def _parse(path: Path) -> list[tuple[int, Any]]:
    """The decoded lines of ``path`` with their 1-based numbers; a torn last line is dropped.

    An unreadable first line ends the list (the caller reports the missing header).
    """
    numbered = [
        (i + 1, line) for i, line in enumerate(path.read_text().split("\n")) if line.strip()
    ]
    parsed: list[tuple[int, Any]] = []
    for pos, (lineno, line) in enumerate(numbered):
        try:
            parsed.append((lineno, json.loads(line)))
        except json.JSONDecodeError:
            if pos == 0 or pos == len(numbered) - 1:
                break  # no header line (reported by the caller) / torn last line
            raise RunFileError(path, lineno, "unreadable line (not JSON)") from None
    return parsed


def _check_header(path: Path, first: Any, header: dict[str, Any], what: str) -> None:
    if not isinstance(first, dict) or "header" not in first:
        raise ValueError(f"{path} is not a tiltsample {what} (no header line)")
    if first["header"] != header:
        raise ValueError(
            f"{path} holds a different run ({first['header']}); use another --out file or delete it"
        )


def _write_atomically(path: Path, lines: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as f:
        f.writelines(line + "\n" for line in lines)
    tmp.replace(path)


def _append(path: Path, lines: list[str]) -> None:
    with path.open("a") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())


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
        parsed = _parse(self.path)
        _check_header(self.path, parsed[0][1] if parsed else None, self.header, "run file")
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
        lines = [json.dumps({"header": self.header})]
        for c in sorted(self.records):
            lines += [json.dumps(rec) for rec in self.records[c]]
            lines.append(json.dumps(self.summaries[c]))
        _write_atomically(self.path, lines)

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
        _append(self.path, [json.dumps(item) for item in [*recs, done_line]])
        self.records[chunk] = recs
        self.summaries[chunk] = done_line

    def all_records(self) -> list[dict[str, Any]]:
        """Records of all completed chunks, in chunk order."""
        return [r for c in sorted(self.records) for r in self.records[c]]


class CellStore:
    """Finished cells keyed by a string: a JSONL cell file with a header, or an in-memory store.

    A cell is a pure function of its key (its parameters and seed), so cells may finish and be
    stored in any order (a distributed run streams them in as they arrive), and a value read back
    is the value a fresh run would compute.

    Parameters
    ----------
    path
        The ``.jsonl`` file, created (with its folder) if missing; ``None`` keeps the cells in
        memory only.
    header
        What is being run (needed with a ``path``). Resuming a file written with a different
        header raises ``ValueError``. A file written before cell files had a header (cell lines
        only) is read and rewritten with this header.

    Raises
    ------
    RunFileError
        The file holds a duplicated cell, a line that is not a cell line, or an unreadable line
        that is not the last (a torn last line is dropped).
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, header: dict[str, Any] | None = None
    ) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None and header is None:
            raise ValueError("a cell file needs a header (what is being run)")
        self.header: dict[str, Any] = json.loads(json.dumps(header or {}))
        self._values: dict[str, Any] = {}
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load(self.path)
        self._rewrite(self.path)  # a fresh header, or the file without a torn last line

    def _load(self, path: Path) -> None:
        parsed = _parse(path)
        first = parsed[0][1] if parsed else None
        legacy = isinstance(first, dict) and set(first) == _CELL_KEYS  # no header line
        if not legacy:
            _check_header(path, first, self.header, "cell file")
            parsed = parsed[1:]
        seen: dict[str, int] = {}  # key -> line
        for lineno, item in parsed:
            if not isinstance(item, dict):
                raise RunFileError(path, lineno, "not a JSON object")
            if "header" in item:
                raise RunFileError(path, lineno, "a second header line")
            if set(item) != _CELL_KEYS or not isinstance(item["cell"], str):
                raise RunFileError(path, lineno, 'not a cell line {"cell": key, "value": ...}')
            key = item["cell"]
            if key in seen:
                raise RunFileError(
                    path, lineno, f"cell {key!r} is stored twice (first on line {seen[key]})"
                )
            seen[key] = lineno
            self._values[key] = item["value"]

    def _rewrite(self, path: Path) -> None:
        lines = [json.dumps({"header": self.header})]
        lines += [json.dumps({"cell": k, "value": v}) for k, v in self._values.items()]
        _write_atomically(path, lines)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def keys(self) -> list[str]:
        """The stored keys, in the order they were stored."""
        return list(self._values)

    def get_or_run(self, key: str, run: Callable[[], Any]) -> Any:
        """The stored value of ``key``, computing and storing it if missing."""
        if key in self._values:
            return self._values[key]
        value = run()
        self.put(key, value)
        return value

    def put(self, key: str, value: Any) -> None:
        """Store a finished cell (appended and flushed; a cell already stored is left alone).

        ``value`` must be JSON-serialisable (with a path); it is kept as given in memory.
        """
        if not isinstance(key, str):
            raise TypeError(f"a cell key must be a str, got {type(key).__name__}")
        if key in self._values:
            return
        if self.path is not None:
            _append(self.path, [json.dumps({"cell": key, "value": value})])
        self._values[key] = value
