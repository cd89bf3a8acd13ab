r"""The project's samplers against the peers' loops at equal settings (one problem at a time).

Run::

    .venv/bin/python benchmarks/bench_peers.py [--problems 4] [--repeats 3] [--k 16]
        [--mh-steps 30] [--out results/bench]

On the shipped ``arith-ar`` model (``--scale K``: a random-init model ``K`` times wider,
``scaled_model.py``), one torch thread, each pair runs the same algorithm at the same settings
(same steps / particles / candidates, same ``max_new_tokens``), so the ratio measures the
implementation, not a different amount of work. The peer loops (``benchmarks/peer_loops.py``) are
written from the published algorithms with plain ``transformers`` calls, no peer code copied:

**power** (goal: ours >= 3x faster) — Karan & Du's power-sampling MH, ``alpha = 4``, one chain,
``--mh-steps`` steps: an initial ``generate`` from the prompt at temperature ``1/alpha``, then per
step a uniform cut ``j`` and ONE ``model.generate(prompt + x[:j])`` (the full prefix re-encoded
every proposal), ``log p`` from the generate logits and ``log q`` from its processed scores, MH
acceptance with the ``p^alpha`` ratio. Ours: ``sample("power", power_target, 1, num_steps=S)``.

**ets** (goal: >= 3x) — ETS with the authors' re-prefilling HF calls: per guidance step one
``generate`` of the ``M = k//2`` candidate blocks on ``prompt + prefix`` and one of the ``M·K``
rollouts (``K = 1``) on ``prompt + prefix + block``, no KV reuse between calls; ``B`` = the
project's default block (``ceil(d/4)``, ``I = 4``), temperature 1. Ours: ``sample("ets", ...)``
at the ``compare`` recipe.

**smc** (goal: >= 2x) — token-level SMC, ``k`` particles, per step and per particle one uncached
forward of ``prompt + prefix`` for the next-token law, weights ``r/lam`` at completion (the prefix
twist of a terminal verifier reward), resampling when ``ESS < N/2``. Ours: ``sample("smc", ...)``.

Timing: every run of every pair and problem is timed once per repetition, round robin; a run's
time is the median over ``--repeats``, the table gives seconds per problem (mean over the
problems of those medians), the costs of the first repetition (mean per problem) and the speed
ratio ``peer / ours``. Writes ``bench_peers.md`` and ``bench_peers.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peer_loops import peer_ets, peer_power_mh, peer_smc
from scaled_model import add_scale_argument, policy_for

from tiltsample import Cost, sample
from tiltsample.samplers.ets.config import resolve_block_size
from tiltsample.samplers.smc.config import SMCConfig
from tiltsample.target import TiltedTarget, power_target
from tiltsample.targets import tasks
from tiltsample.types import Seq

Run = Callable[[], tuple[list[Seq], Cost]]
COST_FIELDS = ("forward_tokens", "model_calls", "generated_tokens", "reward_calls")


@dataclass(frozen=True)
class Pair:
    """One comparison: our sampler and the peer loop, one run per problem each."""

    name: str
    goal: float
    settings: str
    peer_loop: str
    differences: str
    ours: list[Run]
    peer: list[Run]
    targets: list[TiltedTarget]


def _ours(name: str, target: TiltedTarget, num_samples: int, seed: int, **params: Any) -> Run:
    def run() -> tuple[list[Seq], Cost]:
        res = sample(name, target, num_samples, seed=seed, progress=False, **params)
        return [tuple(x) for x in res.sequences], res.cost

    return run


def _peer(fn: Callable[..., Any], *args: Any) -> Run:
    def run() -> tuple[list[Seq], Cost]:
        out = fn(*args)
        return out.sequences, out.cost

    return run


def build_pairs(
    policy: Any, problems: list[Any], k: int, mh_steps: int, alpha: float, seed: int
) -> list[Pair]:
    """The three pairs over ``problems`` (run ``i`` uses seed ``seed + i`` on both sides)."""
    cap = tasks.MAX_NEW_TOKENS
    verifier = [tasks.problem_target(p, policy, lam=0.1) for p in problems]
    power = [power_target(policy, alpha, p.prompt_ids(), cap) for p in problems]
    seeds = [seed + i for i in range(len(problems))]
    m = k // 2
    block = resolve_block_size(verifier[0], None)
    smc_defaults = SMCConfig()
    if smc_defaults.resampling != "systematic" or smc_defaults.block_size != 1:
        raise RuntimeError("the peer SMC loop mirrors systematic, token-level SMC defaults")
    ess = smc_defaults.ess_threshold
    return [
        Pair(
            "power",
            3.0,
            f"alpha={alpha:g}, 1 chain, {mh_steps} MH steps, uniform cut, d={cap}",
            "Karan-Du MH: one HF generate per proposal on prompt + x[:j] (re-encoded), "
            "T=1/alpha, log p / log q from generate logits / scores",
            "proposals regenerate to EOS or d (project length_mode='exact', with the cut term "
            "log(n_x/n_x')) where Karan-Du's code regenerates to the current length; full "
            "vocabulary (top_k=0, project support='full') where HF's default would apply "
            "top_k=50; one plain chain (no stage blocks); seeded by torch.manual_seed",
            [
                _ours("power", t, 1, s, num_steps=mh_steps)
                for t, s in zip(power, seeds, strict=True)
            ],
            [
                _peer(peer_power_mh, t, alpha, mh_steps, s)
                for t, s in zip(power, seeds, strict=True)
            ],
            power,
        ),
        Pair(
            "ets",
            3.0,
            f"M={m} candidates, K=1 rollout, B={block} (I=4), T=1, lam=0.1, d={cap}",
            "ETS with re-prefilling HF calls: per step one generate of M blocks on "
            "prompt + prefix, one of the M*K rollouts on prompt + prefix + block",
            "none in the call structure (M repeated rows in one generate, all rollouts in one, as "
            "the authors' qwen/generate.py); rollouts complete exactly to d and skip complete "
            "candidates and the last step, where the authors' budget overruns d by up to B and "
            "rolls out every candidate (more peer work, not counted); full vocabulary, no top-k",
            [
                _ours("ets", t, 1, s, num_candidates=m, num_rollouts=1)
                for t, s in zip(verifier, seeds, strict=True)
            ],
            [_peer(peer_ets, t, m, 1, block, s) for t, s in zip(verifier, seeds, strict=True)],
            verifier,
        ),
        Pair(
            "smc",
            2.0,
            f"N={k} particles, token steps, p_ref proposal, prefix twist, ESS<{ess:g}N, d={cap}",
            "per-particle loop: one uncached forward of prompt + prefix per particle and step",
            "systematic resampling (the project's default) where a textbook loop would draw "
            "multinomially (same cost); weights change only at completion (terminal reward)",
            [_ours("smc", t, k, s, num_particles=k) for t, s in zip(verifier, seeds, strict=True)],
            [_peer(peer_smc, t, k, s, ess) for t, s in zip(verifier, seeds, strict=True)],
            verifier,
        ),
    ]


def measure(pairs: list[Pair], repeats: int, warmup: bool) -> dict[str, Any]:
    """Time every run once per repetition, round robin; keep the first repetition's costs."""
    times: dict[tuple[str, str, int], list[float]] = {}
    costs: dict[tuple[str, str, int], Cost] = {}
    valid: dict[tuple[str, str], bool] = {}
    if warmup:
        for pair in pairs:
            pair.ours[0]()
            pair.peer[0]()
    for _ in range(repeats):
        for pair in pairs:
            for i in range(len(pair.ours)):
                for side, run in (("ours", pair.ours[i]), ("peer", pair.peer[i])):
                    t0 = time.perf_counter()
                    seqs, cost = run()
                    times.setdefault((pair.name, side, i), []).append(time.perf_counter() - t0)
                    costs.setdefault((pair.name, side, i), cost)
                    ok = all(pair.targets[i].is_complete(x) for x in seqs)
                    valid[pair.name, side] = valid.get((pair.name, side), True) and ok
    return {"times": times, "costs": costs, "valid": valid}


def summarise(pairs: list[Pair], data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per pair: per-problem seconds (mean of medians) and costs, the ratio peer/ours."""
    rows = []
    for pair in pairs:
        n = len(pair.ours)
        row: dict[str, Any] = {"pair": pair.name, "goal": pair.goal, "settings": pair.settings}
        for side in ("ours", "peer"):
            medians = [statistics.median(data["times"][pair.name, side, i]) for i in range(n)]
            costs = [data["costs"][pair.name, side, i] for i in range(n)]
            row[side] = {
                "seconds": statistics.fmean(medians),
                "seconds_per_problem": medians,
                **{f: statistics.fmean(getattr(c, f) for c in costs) for f in COST_FIELDS},
                "valid": data["valid"][pair.name, side],
            }
        row["ratio"] = row["peer"]["seconds"] / row["ours"]["seconds"]
        row["meets_goal"] = row["ratio"] >= pair.goal
        row["peer_loop"] = pair.peer_loop
        row["differences"] = pair.differences
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The report: the table, then each peer loop and where it differs from the published one."""
    head = (
        "| pair | side | s / problem | forward tokens | model calls | generated tokens "
        "| reward calls | peer / ours | goal |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [
        "# Project samplers vs the peers' loops",
        "",
        f"`{settings['model']}`, {settings['problems']} problems, median of {settings['repeats']} "
        f"round-robin repetitions, {settings['threads']} torch thread, k={settings['k']}; "
        "costs are means per problem.",
        "",
        head,
    ]
    for r in rows:
        for side in ("ours", "peer"):
            s = r[side]
            ratio = f"**{r['ratio']:.2f}x**" if side == "peer" else ""
            goal = (
                (f">= {r['goal']:g}x " + ("met" if r["meets_goal"] else "NOT met")) if ratio else ""
            )
            lines.append(
                f"| {r['pair']} | {side} | {s['seconds']:.3f} | {s['forward_tokens']:.0f} "
                f"| {s['model_calls']:.0f} | {s['generated_tokens']:.0f} "
                f"| {s['reward_calls']:.0f} | {ratio} | {goal} |"
            )
    lines += ["", "## Peer loops", ""]
    for r in rows:
        lines += [
            f"- **{r['pair']}** ({r['settings']}): {r['peer_loop']}. "
            f"Differences from the published loop: {r['differences']}.",
        ]
    bad = [f"{r['pair']}/{s}" for r in rows for s in ("ours", "peer") if not r[s]["valid"]]
    lines += ["", f"Invalid responses: {', '.join(bad) if bad else 'none'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--problems", type=int, default=4, help="held-out problems (P)")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin repetitions")
    ap.add_argument("--k", type=int, default=16, help="budget: ETS M=k//2, SMC k particles")
    ap.add_argument("--mh-steps", type=int, default=None, help="MH steps (default 2(k-1))")
    ap.add_argument("--alpha", type=float, default=4.0, help="power exponent")
    ap.add_argument("--seed", type=int, default=0, help="seed of problem 0 (+i for problem i)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    add_scale_argument(ap)
    args = ap.parse_args(argv)
    if args.k < 4:
        ap.error("--k must be >= 4 (ETS needs M = k//2 >= 2)")
    mh_steps = 2 * (args.k - 1) if args.mh_steps is None else args.mh_steps
    torch.set_num_threads(args.threads)
    policy, model_name = policy_for(ap, args.scale)
    problems = tasks.held_out_problems(args.problems)
    pairs = build_pairs(policy, problems, args.k, mh_steps, args.alpha, args.seed)
    data = measure(pairs, args.repeats, warmup=not args.no_warmup)
    rows = summarise(pairs, data)
    settings = {
        "model": model_name,
        "problems": args.problems,
        "repeats": args.repeats,
        "k": args.k,
        "mh_steps": mh_steps,
        "alpha": args.alpha,
        "seed": args.seed,
        "threads": args.threads,
        "max_new_tokens": tasks.MAX_NEW_TOKENS,
        "torch": torch.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, settings)
    (args.out / "bench_peers.md").write_text(text)
    report = {"settings": settings, "rows": rows}
    (args.out / "bench_peers.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
