"""The resumable JSONL store: a torn last line resumes, anything else out of place is refused.

A run file is header, then per chunk its numbered records and a completion line. Resuming drops
a torn last line and an unfinished chunk (a run killed mid-write) but refuses — naming the file
and the line — a duplicated or reordered line, so a rerun can never report 2,001 draws for 2,000.
A cell file (the keyed mode ``verify`` uses) is header, then one self-contained line per cell, with
the same rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tiltsample.app.cli import main
from tiltsample.run_store import CellStore, RunFile, RunFileError

HEADER: dict[str, Any] = {"run": "test", "n": 6}
SIZES = [2, 2, 2]


def _write(path: Path, chunks: range = range(3)) -> RunFile:
    run = RunFile(path, HEADER, chunk_sizes=SIZES)
    for c in chunks:
        run.write_chunk(c, [{"x": 10 * c + k} for k in range(SIZES[c])], {"cost": c})
    return run


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _set(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def test_records_are_numbered_and_completion_lines_count_them(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    run = _write(path)
    items = [json.loads(line) for line in _lines(path)]
    assert items[0] == {"header": HEADER}
    assert items[1] == {"chunk": 0, "record": 0, "x": 0}
    assert items[3] == {"chunk_done": 0, "records": 2, "cost": 0}
    assert [r["x"] for r in run.all_records()] == [0, 1, 10, 11, 20, 21]
    again = RunFile(path, HEADER, chunk_sizes=SIZES)
    assert again.all_records() == run.all_records() and again.summaries == run.summaries
    assert _lines(path) == [json.dumps(i) for i in items]  # the rewrite changes nothing


def _refused(path: Path, match: str, line: int, sizes: list[int] | None = SIZES) -> None:
    before = path.read_text()
    with pytest.raises(RunFileError, match=match) as info:
        RunFile(path, HEADER, chunk_sizes=sizes)
    assert info.value.path == path and info.value.line == line
    assert str(path) in str(info.value) and f"line {line}" in str(info.value)
    assert path.read_text() == before  # a refused file is left exactly as it was


def test_duplicated_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _write(path)
    lines = _lines(path)
    _set(path, [*lines[:3], lines[2], *lines[3:]])  # record 1 of chunk 0 twice
    _refused(path, "duplicate record 1 of chunk 0 \\(first on line 3\\)", 4)


def test_duplicated_record_of_a_completed_chunk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _write(path)
    lines = _lines(path)
    _set(path, [*lines[:5], lines[1], *lines[5:]])  # chunk 0's record 0 inside chunk 1
    _refused(path, "record of chunk 0, which was completed on line 4", 6)


def test_duplicated_whole_chunk_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _write(path)
    lines = _lines(path)
    _set(path, [*lines, *lines[1:4]])  # chunk 0 appended again
    _refused(path, "record of chunk 0, which was completed", 11)


def test_duplicated_completion_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _write(path)
    lines = _lines(path)
    _set(path, [*lines[:4], lines[3], *lines[4:]])
    _refused(path, "chunk 0 is completed twice \\(first on line 4\\)", 5)


def test_records_out_of_order_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _write(path)
    lines = _lines(path)
    _set(path, [lines[0], lines[2], lines[1], *lines[3:]])  # records 1 and 0 swapped
    _refused(path, "record 1 of chunk 0 out of order \\(expected record 0\\)", 2)


def test_interleaved_chunks_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _write(path)
    lines = _lines(path)
    # chunk 1's first record moved into chunk 0
    _set(path, [lines[0], lines[1], lines[4], lines[2], lines[3], *lines[5:]])
    _refused(path, "record of chunk 1 inside unfinished chunk 0", 3)
    # a completion line for another chunk while one is open
    _set(path, [lines[0], lines[1], lines[2], lines[6], lines[3], *lines[4:6], *lines[7:]])
    _refused(path, "completion of chunk 1 while chunk 0", 4)


def test_missing_record_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _write(path)
    lines = _lines(path)
    _set(path, [*lines[:5], *lines[6:]])  # chunk 1 lost its record 1
    _refused(path, "chunk 1 declares 2 records but 1 precede", 6)


def test_unreadable_line_in_the_middle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _write(path)
    lines = _lines(path)
    _set(path, [*lines[:2], lines[2][:9], *lines[3:]])
    _refused(path, "unreadable line", 3)
    _set(path, [*lines[:2], "[1, 2]", *lines[3:]])
    _refused(path, "not a JSON object", 3)
    _set(path, [*lines[:2], '{"something": 1}', *lines[3:]])
    _refused(path, "neither a record nor", 3)
    _set(path, [*lines[:2], lines[0], *lines[3:]])
    _refused(path, "a second header line", 3)


def test_chunk_outside_the_run_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    _write(path)
    lines = _lines(path)
    extra = [json.dumps({"chunk": 3, "record": 0, "x": 0}), json.dumps({"chunk_done": 3})]
    _set(path, [*lines, *extra])
    _refused(path, "chunk 3 is outside this run \\(chunks 0..2\\)", 11)
    _set(path, [*lines, json.dumps({"chunk": -1, "record": 0})])
    _refused(path, "'chunk' must be an int >= 0", 11)


def test_legacy_files_without_numbers_are_checked_by_chunk_sizes(tmp_path: Path) -> None:
    """Files written before records were numbered: a duplicate is caught by the expected size."""
    path = tmp_path / "run.jsonl"
    _write(path)
    legacy = []
    for line in _lines(path):
        item = json.loads(line)
        item.pop("record", None)
        item.pop("records", None)
        legacy.append(json.dumps(item))
    _set(path, legacy)
    assert len(RunFile(path, HEADER, chunk_sizes=SIZES).all_records()) == 6
    _set(path, [*legacy[:3], legacy[2], *legacy[3:]])
    _refused(path, "chunk 0 holds 3 records, this run writes 2", 5)
    # without expected sizes a legacy duplicate cannot be told from two equal draws
    assert len(RunFile(path, HEADER).all_records()) == 7


def test_truncated_at_every_byte_resumes_to_the_same_file(tmp_path: Path) -> None:
    """SIGKILL mid-write leaves a prefix of the intended file: every prefix resumes cleanly."""
    full = tmp_path / "full.jsonl"
    _write(full)
    data = full.read_bytes()
    header_end = data.index(b"\n") + 1  # the header is written atomically (tmp + rename)
    expected = full.read_text()
    cut = tmp_path / "cut.jsonl"
    for n in range(header_end, len(data) + 1):
        cut.write_bytes(data[:n])
        run = RunFile(cut, HEADER, chunk_sizes=SIZES)
        finished = [c for c in range(3) if run.done(c)]
        assert finished == list(range(len(finished))), n
        for c in range(3):
            if not run.done(c):
                run.write_chunk(c, [{"x": 10 * c + k} for k in range(2)], {"cost": c})
        assert cut.read_text() == expected, n


def test_chunks_may_complete_in_any_order(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    run = RunFile(path, HEADER, chunk_sizes=SIZES)
    for c in (2, 0):
        run.write_chunk(c, [{"x": c}, {"x": c}], {})
    again = RunFile(path, HEADER, chunk_sizes=SIZES)
    assert [again.done(c) for c in range(3)] == [True, False, True]
    assert [r["x"] for r in again.all_records()] == [0, 0, 2, 2]


def test_write_chunk_checks_its_input(tmp_path: Path) -> None:
    run = RunFile(tmp_path / "run.jsonl", HEADER, chunk_sizes=SIZES)
    with pytest.raises(ValueError, match="must hold 2 records"):
        run.write_chunk(0, [{"x": 1}], {})
    with pytest.raises(ValueError, match="chunk must lie in"):
        run.write_chunk(3, [{}, {}], {})
    with pytest.raises(ValueError, match="reserved"):
        run.write_chunk(0, [{"record": 1}, {}], {})
    with pytest.raises(ValueError, match="reserved"):
        run.write_chunk(0, [{}, {}], {"records": 2})
    run.write_chunk(0, [{}, {}], {})
    with pytest.raises(ValueError, match="already written"):
        run.write_chunk(0, [{}, {}], {})


# --------------------------------------------------------------------------- keyed cells
CELLS: dict[str, Any] = {"e:1": 0.5, "e:0": [1, 2.25], "f:{}": {"tv": 1e-4, "nan": "inf"}}


def _cells(path: Path, keys: list[str] | None = None) -> CellStore:
    store = CellStore(path, HEADER)
    for key in CELLS if keys is None else keys:
        store.put(key, CELLS[key])
    return store


def _cells_refused(path: Path, match: str, line: int) -> None:
    before = path.read_text()
    with pytest.raises(RunFileError, match=match) as info:
        CellStore(path, HEADER)
    assert info.value.path == path and info.value.line == line
    assert f"{path}, line {line}" in str(info.value)
    assert path.read_text() == before  # a refused file is left exactly as it was


def test_cells_are_one_line_each_after_a_header(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cells.jsonl"
    store = _cells(path)
    items = [json.loads(line) for line in _lines(path)]
    assert items[0] == {"header": HEADER}
    assert items[1:] == [{"cell": k, "value": v} for k, v in CELLS.items()]
    text = path.read_text()
    again = CellStore(path, HEADER)
    assert len(again) == len(store) == 3 and again.keys() == list(CELLS)
    assert all(again[k] == v for k, v in CELLS.items())
    assert path.read_text() == text  # the rewrite changes nothing
    ran: list[str] = []
    assert again.get_or_run("e:1", lambda: ran.append("e:1")) == 0.5 and not ran
    assert again.get_or_run("g:2", lambda: 7) == 7 and "g:2" in again
    again.put("g:2", 8)  # a stored cell is left alone
    assert again["g:2"] == 7 and _lines(path)[-1] == json.dumps({"cell": "g:2", "value": 7})


def test_cells_may_complete_in_any_order(tmp_path: Path) -> None:
    for order in (["f:{}", "e:1", "e:0"], ["e:0", "f:{}", "e:1"]):
        path = tmp_path / f"{order[0]}.jsonl"
        _cells(path, order[:2])
        again = _cells(path, [k for k in order if k not in CellStore(path, HEADER)])
        assert again.keys() == order and {k: again[k] for k in order} == CELLS


def test_cells_truncated_at_every_byte_resume_to_the_same_file(tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    _cells(full)
    data, expected = full.read_bytes(), full.read_text()
    cut = tmp_path / "cut.jsonl"
    for n in range(data.index(b"\n") + 1, len(data) + 1):  # the header is written atomically
        cut.write_bytes(data[:n])
        store = CellStore(cut, HEADER)
        done = store.keys()
        assert done == list(CELLS)[: len(done)], n
        for key in CELLS:
            store.get_or_run(key, lambda key=key: CELLS[key])
        assert cut.read_text() == expected, n


def test_a_duplicated_cell_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "cells.jsonl"
    _cells(path)
    lines = _lines(path)
    _set(path, [*lines, lines[2]])
    _cells_refused(path, "cell 'e:0' is stored twice \\(first on line 3\\)", 5)
    other = json.dumps({"cell": "e:0", "value": 9})  # another value: still not a guess
    _set(path, [*lines[:3], other, *lines[3:]])
    _cells_refused(path, "cell 'e:0' is stored twice", 4)


def test_a_damaged_cell_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cells.jsonl"
    _cells(path)
    lines = _lines(path)
    _set(path, [*lines[:2], lines[2][:12], *lines[3:]])
    _cells_refused(path, "unreadable line", 3)
    _set(path, [*lines[:2], "[1]", *lines[3:]])
    _cells_refused(path, "not a JSON object", 3)
    _set(path, [*lines[:2], '{"cell": "x"}', *lines[3:]])
    _cells_refused(path, "not a cell line", 3)
    _set(path, [*lines[:2], '{"cell": 3, "value": 1}', *lines[3:]])
    _cells_refused(path, "not a cell line", 3)
    _set(path, [*lines[:2], lines[0], *lines[3:]])
    _cells_refused(path, "a second header line", 3)


def test_a_cell_file_of_another_run_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cells.jsonl"
    _cells(path)
    before = path.read_text()
    with pytest.raises(ValueError, match="holds a different run"):
        CellStore(path, {**HEADER, "n": 7})
    path.write_text('{"not": "a header"}\n')
    with pytest.raises(ValueError, match="not a tiltsample cell file \\(no header line\\)"):
        CellStore(path, HEADER)
    with pytest.raises(ValueError, match="needs a header"):
        CellStore(path)
    path.write_text(before)
    with pytest.raises(RunFileError, match="line 2: neither a record nor"):
        RunFile(path, HEADER)  # a cell file is not a run file of chunks


def test_a_cell_file_without_header_is_read_and_given_one(tmp_path: Path) -> None:
    """Files of the former verify cache (cell lines only) keep their cells."""
    path = tmp_path / "cells.jsonl"
    _cells(path)
    legacy = _lines(path)[1:]
    _set(path, [*legacy, legacy[0][:10]])  # with a torn last line
    store = CellStore(path, HEADER)
    assert store.keys() == list(CELLS) and all(store[k] == v for k, v in CELLS.items())
    assert json.loads(_lines(path)[0]) == {"header": HEADER} and _lines(path)[1:] == legacy
    _set(path, [*legacy, legacy[1]])
    _cells_refused(path, "cell 'e:0' is stored twice \\(first on line 2\\)", 4)


def test_cells_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = CellStore()
    calls: list[int] = []
    value = (1, 2)  # kept as given, not through JSON
    assert store.get_or_run("k", lambda: calls.append(1) or value) is value
    assert store.get_or_run("k", lambda: calls.append(1) or 0) is value and calls == [1]
    store.put("j", object())  # nothing is serialised in memory
    assert len(store) == 2 and store.path is None and list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="must be a str"):
        store.put(3, 0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- through the CLI
ARGV = ["sample", "exact", "-n", "20", "--chunk-size", "10", "--seed", "3", "--no-progress"]


def test_cli_refuses_a_duplicated_record_instead_of_counting_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reported bug: a duplicated line made a rerun report 21 draws for 20."""
    path = tmp_path / "run.jsonl"
    assert main([*ARGV, "--out", str(path)]) == 0
    assert "wrote 20 records" in capsys.readouterr().out
    assert main([*ARGV, "--out", str(path)]) == 0  # a complete file resumes to the same result
    assert "wrote 20 records" in capsys.readouterr().out
    lines = _lines(path)
    _set(path, [*lines[:6], lines[5], *lines[6:]])
    assert main([*ARGV, "--out", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "wrote" not in out and "Traceback" not in err
    assert err.count("\n") == 1 and f"{path}, line 7: duplicate record 4 of chunk 0" in err
    # the same duplicate in a file written before records were numbered
    legacy = [json.loads(line) for line in lines]
    for item in legacy:
        item.pop("record", None)
        item.pop("records", None)
    dumped = [json.dumps(item) for item in legacy]
    _set(path, [*dumped[:6], dumped[5], *dumped[6:]])
    assert main([*ARGV, "--out", str(path)]) == 2
    assert "chunk 0 holds 11 records, this run writes 10" in capsys.readouterr().err


def test_cli_resumes_after_a_torn_last_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    assert main([*ARGV, "--out", str(full)]) == 0
    text = full.read_text()
    cut.write_text(text[: len(text) * 3 // 4])  # killed inside chunk 1
    assert main([*ARGV, "--out", str(cut)]) == 0
    assert "wrote 20 records" in capsys.readouterr().out
    assert cut.read_text() == text
