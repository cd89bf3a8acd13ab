r"""Throughput of the HF backend and the samplers on the embedded model (``make bench`` material).

Run::

    .venv/bin/python benchmarks/bench_hf.py [--repeats 5] [--batch 64] [--out results/bench]

Reported side by side, all measured in the same run (medians over ``--repeats``; timings on shared
machines vary 2–5× between runs, so only ratios within one run are meaningful):

* plain batched decoding with the KV-cached :class:`~tiltsample.targets.hf.HFSession`
  (generated tokens/s) and the same loop without a cache (every step re-encodes prompt + prefix,
  what a ``generate``-per-step implementation pays);
* every registered sampler's generated tokens/s, its ratio to plain decoding at the same batch
  width (goal: ≥ 0.85), and its ``forward_tokens / generated_tokens`` (minimal ≈ 1 plus prompt
  prefill; larger means re-encoding or re-fed tokens);
* ETS wall time against the time plain decoding needs for the same number of tokens.

Writes ``bench.md`` and ``bench.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tiltsample import Cost, registry, sample
from tiltsample.decoding import decode_until_complete
from tiltsample.policy import PrefixSession
from tiltsample.target import power_target
from tiltsample.targets import tasks


def plain_decode(policy: Any, prompt: tuple[int, ...], batch: int, cached: bool, seed: int) -> Cost:
    gen = torch.Generator().manual_seed(seed)
    session: Any = (
        policy.session(prompt, batch)
        if cached
        else PrefixSession(policy, prompt, batch, accounting="recompute")
    )
    d = decode_until_complete(session, gen, eos_id=policy.eos_id, max_length=tasks.MAX_NEW_TOKENS)
    return session.cost + Cost(generated_tokens=d.generated_tokens)


def sampler_runs(batch: int) -> list[tuple[str, str, str, int, dict[str, Any]]]:
    """(label, registry name, target kind, num_samples, params) with about ``batch`` rows."""
    return [
        ("ancestral", "ancestral", "verifier", batch, {}),
        ("best-of-n (N=8)", "best-of-n", "verifier", batch // 8, {"num_candidates": 8}),
        ("beam (8 beams)", "beam", "verifier", 1, {"num_beams": 8}),
        (
            "ets (M=4, K=2, I=4)",
            "ets",
            "verifier",
            max(batch // 12, 1),
            {"num_candidates": 4, "num_rollouts": 2},
        ),
        ("smc (prefix twist)", "smc", "verifier", batch, {"num_particles": batch}),
        ("power (MH, alpha=4)", "power", "power", batch // 4, {"num_steps": 4}),
        ("entropy-cut (MH)", "entropy-cut", "power", batch // 4, {"num_steps": 4}),
        ("mh (uniform cut)", "mh", "power", batch // 4, {"num_steps": 4}),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = tasks.load_policy()
    problem = tasks.held_out_problems(1)[0]
    prompt = problem.prompt_ids()

    runs: list[tuple[str, int, Callable[[], Cost]]] = [
        (
            "plain decode, KV cache",
            args.batch,
            lambda: plain_decode(policy, prompt, args.batch, True, 0),
        ),
        (
            "plain decode, no cache (re-encode)",
            args.batch,
            lambda: plain_decode(policy, prompt, args.batch, False, 0),
        ),
    ]
    names = {e.name for e in registry.samplers()}
    skipped = []
    for label, name, kind, n, params in sampler_runs(args.batch):
        if name not in names:
            skipped.append(f"{label}: sampler {name!r} not registered")
            continue
        target = (
            tasks.problem_target(problem, policy, lam=0.1)
            if kind == "verifier"
            else power_target(policy, 4.0, prompt, tasks.MAX_NEW_TOKENS)
        )

        def run(name: str = name, target: Any = target, n: int = n, params: Any = params) -> Cost:
            return sample(name, target, n, seed=0, progress=False, **params).cost

        try:
            run()  # warm-up, and a check that the parameters are accepted
        except (TypeError, ValueError) as exc:  # parameters of a sampler still in flux
            skipped.append(f"{label}: {exc}")
            continue
        runs.append((label, n, run))

    # round robin: every repetition times each run once, so load drift hits all runs alike
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    costs: dict[str, Cost] = {}
    runs[0][2]()
    for _ in range(args.repeats):
        for label, _, fn in runs:
            start = time.perf_counter()
            costs[label] = fn()
            times[label].append(time.perf_counter() - start)
    median = {label: statistics.median(ts) for label, ts in times.items()}
    plain = runs[0][0]
    plain_rate = costs[plain].generated_tokens / median[plain]
    rows = [_row(label, n, median[label], costs[label], plain_rate) for label, n, _ in runs]
    ets_time = next(
        ((median[label], costs[label]) for label, _, _ in runs if label.startswith("ets")), None
    )

    lines = [
        f"# HF backend benchmark (model arith-ar, batch {args.batch}, {args.threads} thread(s), "
        f"median of {args.repeats})",
        "",
        "| run | draws | gen. tokens | forward tokens | model calls | wall s | gen. tokens/s | "
        "vs plain decode | forward / generated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['draws']} | {r['generated']} | {r['forward']} | {r['calls']} | "
            f"{r['seconds']:.3f} | {r['rate']:.0f} | {r['vs_plain']:.2f} | {r['fwd_per_gen']:.2f} |"
        )
    if ets_time is not None:
        t, c = ets_time
        same = c.generated_tokens / plain_rate
        lines += [
            "",
            f"ETS wall time {t:.3f} s vs {same:.3f} s for the same "
            f"{c.generated_tokens} tokens in plain batched decoding (ratio {t / same:.2f}).",
        ]
    if skipped:
        lines += ["", "Not run:"] + [f"- {s}" for s in skipped]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    (out / "bench.json").write_text(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
    print("\n".join(lines))
    return 0


def _row(label: str, draws: int, seconds: float, cost: Cost, plain_rate: float) -> dict[str, Any]:
    rate = cost.generated_tokens / seconds
    return {
        "run": label,
        "draws": draws,
        "generated": cost.generated_tokens,
        "forward": cost.forward_tokens,
        "calls": cost.model_calls,
        "seconds": seconds,
        "rate": rate,
        "vs_plain": rate / plain_rate,
        "fwd_per_gen": cost.forward_tokens / max(cost.generated_tokens, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
