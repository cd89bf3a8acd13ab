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
  prefill; larger means re-encoding or re-fed tokens); the MH rows run one chain per row (ragged
  batching), their continuous-batching rows (``batching="continuous"``, also at 16 steps next to
  ragged), plus the old grouped batching and a joint run of 4 prompts for reference;
* ETS wall time against the time plain decoding needs for the same number of tokens.

``--scale K`` runs the same table on a random-init model ``K`` times wider than the shipped one
(``scaled_model.scaled_policy``), where a model call costs more against the library's work;
``--only TEXT`` (repeatable) keeps the sampler runs whose label contains one of the texts.

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
from scaled_model import add_scale_argument, policy_for

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
    cost: Cost = session.cost + Cost(generated_tokens=d.generated_tokens)
    return cost


def peak_width(name: str, num_samples: int, params: dict[str, Any]) -> int:
    """Rows of the widest model call of a run (its session width), for same-width comparisons."""
    if name == "beam":
        return int(params["num_beams"])
    if name == "best-of-n":
        return num_samples * int(params["num_candidates"])
    if name == "ets":
        chains = int(params.get("batch_size") or num_samples)
        return chains * int(params["num_candidates"]) * int(params["num_rollouts"])
    if name in ("smc", "power-smc"):
        return int(params["num_particles"])
    if params.get("max_rows"):  # MH, continuous batching with queued chains
        return min(int(params["max_rows"]), num_samples)
    return num_samples


_CONT: dict[str, Any] = {"batching": "continuous"}


def sampler_runs(batch: int) -> list[tuple[str, str, str, int, dict[str, Any]]]:
    """(label, registry name, target kind, num_samples, params), at most ``batch`` rows per call.

    ETS runs ``batch / (M K)`` chains so that its rollout phase is exactly ``batch`` rows wide;
    beam search is a single search, shown at 8 beams and at ``batch`` beams.
    """
    return [
        ("ancestral", "ancestral", "verifier", batch, {}),
        ("best-of-n (N=8)", "best-of-n", "verifier", batch // 8, {"num_candidates": 8}),
        ("beam (8 beams)", "beam", "verifier", 1, {"num_beams": 8}),
        (f"beam ({batch} beams)", "beam", "verifier", 1, {"num_beams": batch}),
        (
            "ets (M=4, K=2, I=4)",
            "ets",
            "verifier",
            max(batch // 8, 1),
            {"num_candidates": 4, "num_rollouts": 2},
        ),
        (
            "ets (M=8, K=1, I=4)",
            "ets",
            "verifier",
            max(batch // 8, 1),
            {"num_candidates": 8, "num_rollouts": 1},
        ),
        # 4x the chains in the same 64-row budget: lock step runs 4 batches one after the other,
        # continuous batching admits a chain whenever rows are free
        *[
            (
                f"ets (M=4, K=2, I=4), {4 * max(batch // 8, 1)} chains, {mode}",
                "ets",
                "verifier",
                4 * max(batch // 8, 1),
                {
                    "num_candidates": 4,
                    "num_rollouts": 2,
                    "batch_size": max(batch // 8, 1),
                    "batching": mode,
                },
            )
            for mode in ("lockstep", "continuous")
        ],
        ("smc (prefix twist)", "smc", "verifier", batch, {"num_particles": batch}),
        # MH: one chain per row at the same batch width (ragged batching, the default), the old
        # grouped batching at a quarter of the width for reference, and chains of 4 prompts in
        # one batch (tiltsample.samplers.mh.sample_many)
        ("power (MH, alpha=4)", "power", "power", batch, {"num_steps": 4}),
        ("entropy-cut (MH)", "entropy-cut", "power", batch, {"num_steps": 4}),
        ("mh (uniform cut)", "mh", "power", batch, {"num_steps": 4}),
        # continuous batching: a chain whose proposal ended starts its next step at once, so
        # the batch stays full until chains run out of steps (the drain at the end is amortised
        # over more steps: 16-step rows for both modes)
        ("power (MH, continuous)", "power", "power", batch, {"num_steps": 4, **_CONT}),
        ("entropy-cut (MH, continuous)", "entropy-cut", "power", batch, {"num_steps": 4, **_CONT}),
        ("mh (uniform cut, continuous)", "mh", "power", batch, {"num_steps": 4, **_CONT}),
        ("power (MH, ragged, 16 steps)", "power", "power", batch, {"num_steps": 16}),
        ("power (MH, continuous, 16 steps)", "power", "power", batch, {"num_steps": 16, **_CONT}),
        # 4x the chains through the same rows: a waiting chain takes the row of a finished one,
        # so the batch only drains once, at the very end
        (
            f"power (MH, continuous, {4 * batch} chains in {batch} rows)",
            "power",
            "power",
            4 * batch,
            {"num_steps": 4, "max_rows": batch, **_CONT},
        ),
        (
            "power (MH, grouped batching)",
            "power",
            "power",
            batch // 4,
            {"num_steps": 4, "batching": "grouped"},
        ),
        # num_samples = all chains of the joint run: batch // 4 per prompt
        ("power (MH, 4 prompts, one batch)", "power", "power-joint", batch, {"num_steps": 4}),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/bench")
    add_scale_argument(parser)
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        help="run only the samplers whose label contains this text (repeatable; plain decoding "
        "always runs)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy, model_name = policy_for(parser, args.scale)
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
    widths: dict[str, int] = {label: args.batch for label, _, _ in runs}
    # plain decoding at the narrower widths some samplers run at (same-width reference)
    plain_at: dict[int, str] = {args.batch: runs[0][0]}
    for w in sorted({8, max(args.batch // 4, 1)} - {args.batch}):
        label = f"plain decode, KV cache, {w} rows"

        def narrow(w: int = w) -> Cost:
            return plain_decode(policy, prompt, w, True, 0)

        runs.append((label, w, narrow))
        widths[label] = w
        plain_at[w] = label
    names = {e.name for e in registry.samplers()}
    skipped = []
    for label, name, kind, n, params in sampler_runs(args.batch):
        if args.only is not None and not any(text in label for text in args.only):
            continue
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

        if kind == "power-joint":
            from tiltsample.samplers import mh

            joint = [
                power_target(policy, 4.0, p.prompt_ids(), tasks.MAX_NEW_TOKENS)
                for p in tasks.held_out_problems(4)
            ]

            def run(
                name: str = name, target: Any = joint, n: int = n, params: Any = params
            ) -> Cost:
                per_prompt = max(n // len(target), 1)
                outs = mh.sample_many(target, per_prompt, seed=0, sampler=name, **params)
                joint_cost: Cost = outs[0].meta["joint_cost"]
                return joint_cost

        try:
            run()  # warm-up, and a check that the parameters are accepted
        except (TypeError, ValueError) as exc:  # parameters of a sampler still in flux
            skipped.append(f"{label}: {exc}")
            continue
        runs.append((label, n, run))
        widths[label] = peak_width(name, n, params)

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
    for r in rows:
        w = widths[r["run"]]
        ref = plain_at.get(w)
        r["width"] = w
        r["vs_plain_same_width"] = (
            r["rate"] / (costs[ref].generated_tokens / median[ref]) if ref else None
        )
    ets_times = [(label, median[label], costs[label]) for label, _, _ in runs if label[:3] == "ets"]

    lines = [
        f"# HF backend benchmark (model {model_name}, batch {args.batch}, "
        f"{args.threads} thread(s), median of {args.repeats})",
        "",
        "| run | draws | rows / call (peak) | gen. tokens | forward tokens | model calls | "
        f"wall s | gen. tokens/s | vs plain decode ({args.batch} rows) | "
        "vs plain decode, same rows | forward / generated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same_w = r["vs_plain_same_width"]
        lines.append(
            f"| {r['run']} | {r['draws']} | {r['width']} | {r['generated']} | {r['forward']} | "
            f"{r['calls']} | {r['seconds']:.3f} | {r['rate']:.0f} | {r['vs_plain']:.2f} | "
            f"{'' if same_w is None else f'{same_w:.2f}'} | {r['fwd_per_gen']:.2f} |"
        )
    if ets_times:
        lines.append("")
    for label, t, c in ets_times:
        same = c.generated_tokens / plain_rate
        lines.append(
            f"{label}: wall time {t:.3f} s vs {same:.3f} s for the same {c.generated_tokens} "
            f"tokens in plain batched decoding (ratio {t / same:.2f}); {c.model_calls} model "
            f"calls vs {costs[plain].model_calls}."
        )
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
