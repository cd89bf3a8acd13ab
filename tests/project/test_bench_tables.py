"""``benchmarks/bench_hf.py``, ``bench_overhead.py`` and ``bench_peers.py`` on tiny settings: the
scaled random-init model has the shape asked for and every script runs on it by ``--scale``,
``--only`` keeps the runs named, and the many-problems table reports the time inside the model
with the share a free library would reach."""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tiltsample.targets import tasks

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    """The benchmark scripts as modules, by name."""
    names = ("bench_hf", "bench_overhead", "bench_peers", "scaled_model")
    sys.path.insert(0, str(BENCH))
    try:
        yield {name: importlib.import_module(name) for name in names}
    finally:
        sys.path.remove(str(BENCH))


def test_scaled_policy_is_wider_and_decodes(bench: dict[str, ModuleType]) -> None:
    shipped = tasks.load_policy()
    wide = bench["scaled_model"].scaled_policy(2)
    base, cfg = shipped.model.config, wide.model.config
    assert cfg.hidden_size == 2 * base.hidden_size
    assert cfg.intermediate_size == 2 * base.intermediate_size
    assert cfg.num_hidden_layers == base.num_hidden_layers
    assert (wide.eos_id, wide.bos_id, wide.vocab_size) == (
        shipped.eos_id,
        shipped.bos_id,
        shipped.vocab_size,
    )
    params = sum(p.numel() for p in wide.model.parameters())
    assert params > 3 * sum(p.numel() for p in shipped.model.parameters())
    prompt = tasks.held_out_problems(1)[0].prompt_ids()
    law = wide.next_logprobs(prompt, [()])
    assert law.shape == (1, shipped.vocab_size)
    assert math.isclose(float(law.exp().sum()), 1.0, rel_tol=1e-9)


def test_bench_hf_only_keeps_the_named_runs(bench: dict[str, ModuleType], tmp_path: Path) -> None:
    bench_hf = bench["bench_hf"]
    argv = ["--batch", "8", "--repeats", "1", "--only", "best-of-n", "--only", "smc"]
    assert bench_hf.main([*argv, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    samplers = [r["run"] for r in rows if not r["run"].startswith("plain decode")]
    assert samplers == ["best-of-n (N=8)", "smc (prefix twist)"]
    assert "model arith-ar," in (tmp_path / "bench.md").read_text()
    with pytest.raises(SystemExit):
        bench_hf.main(["--scale", "0", "--out", str(tmp_path)])


def test_many_problems_reports_the_model_time_and_the_free_library_bound(
    bench: dict[str, ModuleType],
) -> None:
    bench_overhead = bench["bench_overhead"]
    rows = bench_overhead.many_problems(tasks.load_policy(), 2, 2, 1, False)
    assert rows[0]["vs_ceiling"] == pytest.approx(1.0)
    for r in rows:
        assert 0 < r["model_seconds"] < r["seconds"], r["run"]
        # without the library's work a run can only be faster: the bound exceeds the ratio
        assert r["bound"] > r["vs_ceiling"], r["run"]
        assert r["bound"] == pytest.approx(
            r["generated"] / r["model_seconds"] / (rows[0]["generated"] / rows[0]["seconds"])
        )
    table = bench_overhead.markdown([], rows, "test")
    assert "with a free library" in table and rows[-1]["run"] in table


def test_bench_peers_runs_on_the_scaled_model_and_names_it(
    bench: dict[str, ModuleType], tmp_path: Path
) -> None:
    argv = ["--problems", "1", "--repeats", "1", "--k", "4", "--mh-steps", "2", "--no-warmup"]
    assert bench["bench_peers"].main([*argv, "--scale", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_peers.json").read_text())
    assert report["settings"]["model"] == "arith-ar shape x2, random init"
    assert {r["pair"] for r in report["rows"]} == {"power", "ets", "smc"}
    assert "`arith-ar shape x2, random init`" in (tmp_path / "bench_peers.md").read_text()
    for script in ("bench_peers", "bench_overhead"):
        with pytest.raises(SystemExit):
            bench[script].main(["--scale", "0", "--out", str(tmp_path)])
