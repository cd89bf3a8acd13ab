"""``benchmarks/bench_peers.py`` and its peer loops (``benchmarks/peer_loops.py``) on tiny settings:
the loops return valid responses, re-encode their context (counted forward tokens exceed the
generated ones, per token more than the project's samplers), read ``log p`` from the raw logits,
and the report has its three rows."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tiltsample.target import power_target
from tiltsample.targets import tasks

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def modules() -> Iterator[tuple[ModuleType, ModuleType]]:
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("peer_loops"), importlib.import_module("bench_peers")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def policy() -> Any:
    return tasks.load_policy()


def test_generate_rows_reads_log_p_from_raw_logits(
    modules: tuple[ModuleType, ModuleType], policy: Any
) -> None:
    peer_loops, _ = modules
    prompt = tasks.held_out_problems(1)[0].prompt_ids()
    torch.manual_seed(0)
    out = peer_loops.generate_rows(
        policy.model,
        [policy.context(prompt)],
        max_new_tokens=tasks.MAX_NEW_TOKENS,
        temperature=0.25,
        eos_id=policy.eos_id,
        pad_id=policy.eos_id,
    )
    x = out.tokens[0]
    expected = policy.sequence_logprob(prompt, [x], per_token=True)[0][: len(x)]
    assert torch.allclose(torch.tensor(out.log_p[0], dtype=torch.float64), expected, atol=1e-4)
    # the proposal law is the tempered one, not p_ref: log q differs from log p
    assert abs(sum(out.log_q[0]) - sum(out.log_p[0])) > 1e-3
    assert out.cost.forward_tokens == len(policy.context(prompt)) + out.cost.model_calls - 1


def test_bench_peers_tiny_run(
    modules: tuple[ModuleType, ModuleType], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, bench = modules
    argv = ["--problems", "1", "--repeats", "1", "--k", "4", "--mh-steps", "2", "--no-warmup"]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_peers.json").read_text())
    assert (tmp_path / "bench_peers.md").read_text() in capsys.readouterr().out
    rows = {r["pair"]: r for r in report["rows"]}
    assert sorted(rows) == ["ets", "power", "smc"]
    for name, row in rows.items():
        ours, peer = row["ours"], row["peer"]
        assert ours["valid"] and peer["valid"], name  # every output ends with EOS or hits the cap
        assert ours["seconds"] > 0 and peer["seconds"] > 0
        assert row["ratio"] == pytest.approx(peer["seconds"] / ours["seconds"])
        assert peer["generated_tokens"] > 0 and peer["model_calls"] > 0
        # the peer loops re-encode the context: more forward tokens than generated ones, and more
        # per generated token than the project's KV-cached samplers
        assert peer["forward_tokens"] > peer["generated_tokens"], name
        per_token = [s["forward_tokens"] / s["generated_tokens"] for s in (ours, peer)]
        assert per_token[1] > per_token[0], name
    # same algorithm and settings: the same reward calls per completed response in SMC (one per
    # particle) and the uncached SMC loop pays one model call per particle and token
    assert rows["smc"]["peer"]["reward_calls"] == rows["smc"]["ours"]["reward_calls"] == 4
    assert rows["smc"]["peer"]["model_calls"] == rows["smc"]["peer"]["generated_tokens"]
    assert rows["power"]["peer"]["reward_calls"] == 0


def test_peer_smc_resamples_towards_reward(modules: tuple[ModuleType, ModuleType]) -> None:
    peer_loops, _ = modules
    weights = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert peer_loops.systematic(weights, 4).tolist() == [1, 1, 1, 1]


def test_peer_power_mh_is_a_valid_chain(
    modules: tuple[ModuleType, ModuleType], policy: Any
) -> None:
    peer_loops, _ = modules
    prompt = tasks.held_out_problems(1)[0].prompt_ids()
    target = power_target(policy, 4.0, prompt, tasks.MAX_NEW_TOKENS)
    run = peer_loops.peer_power_mh(target, 4.0, 2, 0)
    assert target.is_complete(run.sequences[0])
    assert run.cost.model_calls == run.cost.generated_tokens  # one call per generated token
    # 3 generate calls (initial + 2 proposals), each re-encoding at least the prompt
    assert run.cost.forward_tokens >= run.cost.generated_tokens + 3 * (len(prompt) - 1)
