r"""Per-call overhead and the many-problems regime (``make bench`` sections; also runnable alone).

Run::

    .venv/bin/python benchmarks/bench_overhead.py [--repeats 3] [--problems 32] [--out DIR]

Two measurements on the shipped ``arith-ar`` model (``--scale K``: a random-init model ``K``
times wider, ``scaled_model.py``), one thread, medians over ``--repeats``,
all runs of a section timed round robin (only ratios within one run are meaningful):

**Per-call overhead.** A sampler run at width ``W`` (rows per model call) spends its wall time in
model calls and in the library around them. For each run the model's ``forward`` is timed from
the inside (a wrapper), which splits the wall time per model call into *in the model* and
*outside* (sessions, laws, draws, bookkeeping), and the total is compared with a **bare cached
forward** of the same width: ``model(input_ids, <cache>)`` one token per call,
log-softmax and one multinomial draw — the least any autoregressive sampler must do per call.
The goal of the throughput issue is ``ms per call / bare ≤ 1.2``.

**Many problems.** Plain batched decoding of ``problems × budget`` rows in **one** multi-prompt
session (:func:`tiltsample.policy.open_session_multi`), every row in every call until the longest
ends as HF ``generate`` does, is the ceiling (the same decoding with finished rows dropped from
the calls, what the i.i.d. samplers and the ETS rollouts do, is reported next to it); each
sampler's generated
tokens/s over the problems is reported as a share of it (the goal: ≥ 0.8, MH ≥ 0.6), and next
to it the share it would reach if everything outside the model cost nothing (its generated tokens
over its time inside ``model.forward``, against the same ceiling: the bound of the calls it
makes, whatever the library around them): each
sampler at the ``compare`` recipe of the budget, batched across problems where it has a batched
run (:func:`tiltsample.app.cells.many_runner`, what ``compare`` runs) and one problem at a time
(what ``compare --no-batch`` runs).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from scaled_model import add_scale_argument, policy_for

from tiltsample import Cost, sample
from tiltsample.app.cells import many_runner
from tiltsample.decoding import decode_until_complete
from tiltsample.policy import open_session_multi
from tiltsample.target import power_target
from tiltsample.targets import tasks


class ForwardTimer:
    """Wraps ``model.forward`` to add up the time spent inside it and count the calls."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inner = model.forward
        self.seconds = 0.0
        self.calls = 0

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return self.inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        model.forward = timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def close(self) -> None:
        self.model.forward = self.inner


@torch.inference_mode()
def bare_forward(model: Any, prompt: tuple[int, ...], width: int, steps: int, seed: int) -> int:
    """``steps`` cached one-token forwards of ``width`` rows after ``prompt`` (prefill
    excluded from the count), each followed by log-softmax and one multinomial draw; returns the
    number of timed calls."""
    from tiltsample.targets.hf import compat

    gen = torch.Generator().manual_seed(seed)
    cache = compat.new_dynamic_cache()
    kwargs = compat.forward_cache_kwargs(model, cache)
    ids = torch.tensor([list(prompt)] * width)
    out = model(input_ids=ids, **kwargs)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        out = model(input_ids=tok, **kwargs)
        law = torch.log_softmax(out.logits[:, -1].to(torch.float64), dim=-1)
        tok = torch.multinomial(law.exp(), 1, generator=gen)
    return steps


def overhead_runs(policy: Any, problem: Any) -> list[tuple[str, int, Callable[[], Cost]]]:
    """(label, rows per call, run) of the samplers whose calls are narrow (per-call bound)."""
    prompt = problem.prompt_ids()
    power = power_target(policy, 4.0, prompt, tasks.MAX_NEW_TOKENS)
    verifier = tasks.problem_target(problem, policy, lam=0.1)

    def run(name: str, target: Any, n: int, **params: Any) -> Callable[[], Cost]:
        return lambda: sample(name, target, n, seed=0, progress=False, **params).cost

    return [
        ("power MH, 1 chain, 20 steps", 1, run("power", power, 1, num_steps=20)),
        ("power MH, 8 chains, 10 steps", 8, run("power", power, 8, num_steps=10)),
        ("smc, 8 particles", 8, run("smc", verifier, 8, num_particles=8)),
        ("ets, M=4, K=2", 8, run("ets", verifier, 1, num_candidates=4, num_rollouts=2)),
    ]


def per_call_overhead(policy: Any, repeats: int) -> list[dict[str, Any]]:
    """Rows of the per-call table (see the module docstring)."""
    problem = tasks.held_out_problems(1)[0]
    context = policy.context(problem.prompt_ids())
    runs = overhead_runs(policy, problem)
    timer = ForwardTimer(policy.model)
    try:
        widths = sorted({w for _, w, _ in runs})
        bare: dict[int, list[float]] = {w: [] for w in widths}
        measured: dict[str, list[tuple[float, float, int]]] = {label: [] for label, _, _ in runs}
        for _, _, fn in runs:
            fn()  # warm-up
        for _ in range(repeats):
            for w in widths:
                start = time.perf_counter()
                calls = bare_forward(policy.model, context, w, tasks.MAX_NEW_TOKENS, 0)
                bare[w].append((time.perf_counter() - start) / calls)
            for label, _, fn in runs:
                timer.reset()
                start = time.perf_counter()
                fn()
                wall = time.perf_counter() - start
                measured[label].append((wall, timer.seconds, timer.calls))
    finally:
        timer.close()
    rows = []
    for label, w, _ in runs:
        per_call = statistics.median(wall / calls for wall, _, calls in measured[label])
        inside = statistics.median(model / calls for _, model, calls in measured[label])
        ref = statistics.median(bare[w])
        rows.append(
            {
                "run": label,
                "width": w,
                "ms_per_call": 1e3 * per_call,
                "ms_in_model": 1e3 * inside,
                "ms_outside": 1e3 * (per_call - inside),
                "ms_bare": 1e3 * ref,
                "vs_bare": per_call / ref,
            }
        )
    return rows


def many_problems(
    policy: Any, num_problems: int, budget: int, repeats: int, one_at_a_time_too: bool = True
) -> list[dict[str, Any]]:
    """Rows of the many-problems table (see the module docstring)."""
    problems = tasks.held_out_problems(num_problems)
    prompts = [p.prompt_ids() for p in problems]

    def plain(drop_finished: bool) -> Callable[[], Cost]:
        def run() -> Cost:
            gen = torch.Generator().manual_seed(0)
            session = open_session_multi(policy, prompts, budget)
            out = decode_until_complete(
                session,
                gen,
                eos_id=policy.eos_id,
                max_length=tasks.MAX_NEW_TOKENS,
                drop_finished=drop_finished,
            )
            cost: Cost = session.cost + Cost(generated_tokens=out.generated_tokens)
            return cost

        return run

    def one_at_a_time(name: str, n: int, target_of: Callable[[Any], Any], **params: Any) -> Any:
        def run() -> Cost:
            total = Cost()
            for p in problems:
                total = total + sample(name, target_of(p), n, seed=0, progress=False, **params).cost
            return total

        return run

    def verifier(p: Any) -> Any:
        return tasks.problem_target(p, policy, lam=0.1)

    def power(p: Any) -> Any:
        return power_target(policy, 4.0, p.prompt_ids(), tasks.MAX_NEW_TOKENS)

    def batched(name: str, n: int, target_of: Callable[[Any], Any], **params: Any) -> Any:
        run_many = many_runner(name)

        def run() -> Cost:
            gens = [torch.Generator().manual_seed(i) for i in range(len(problems))]
            outs = run_many([target_of(p) for p in problems], n, gens, **params)
            joint: Cost = outs[0].meta["joint_cost"]
            return joint

        return run

    # (label, sampler, num_samples, target, params): the compare recipes at this budget
    configs: list[tuple[str, str, int, Callable[[Any], Any], dict[str, Any]]] = [
        ("best-of-n", "best-of-n", 1, verifier, {"num_candidates": budget}),
        ("beam", "beam", 1, verifier, {"num_beams": budget}),
        ("smc", "smc", budget, verifier, {"num_particles": budget}),
        ("ets", "ets", 1, verifier, {"num_candidates": budget // 2, "num_rollouts": 1}),
        (
            "power MH",
            "power",
            1,
            power,
            {"num_steps": 2 * (budget - 1), "batching": "continuous"},
        ),
    ]
    runs: list[tuple[str, Callable[[], Cost]]] = [
        (f"plain decoding, {num_problems} x {budget} rows in one session", plain(False)),
        ("plain decoding, finished rows dropped", plain(True)),
    ]
    for label, name, n, target_of, params in configs:
        with contextlib.suppress(ValueError):  # no batched run across problems: skipped
            runs.append(
                (f"{label}, all problems in one job", batched(name, n, target_of, **params))
            )
        if one_at_a_time_too:
            runs.append(
                (f"{label}, one problem at a time", one_at_a_time(name, n, target_of, **params))
            )
    times: dict[str, list[float]] = {label: [] for label, _ in runs}
    inside: dict[str, list[float]] = {label: [] for label, _ in runs}
    costs: dict[str, Cost] = {}
    timer = ForwardTimer(policy.model)
    try:
        for _ in range(repeats):
            for label, fn in runs:
                timer.reset()
                start = time.perf_counter()
                costs[label] = fn()
                times[label].append(time.perf_counter() - start)
                inside[label].append(timer.seconds)
    finally:
        timer.close()
    ceiling = costs[runs[0][0]].generated_tokens / statistics.median(times[runs[0][0]])
    rows = []
    for label, _ in runs:
        generated = costs[label].generated_tokens
        rate = generated / statistics.median(times[label])
        model_s = statistics.median(inside[label])
        rows.append(
            {
                "run": label,
                "generated": generated,
                "calls": costs[label].model_calls,
                "seconds": statistics.median(times[label]),
                "model_seconds": model_s,
                "rate": rate,
                "vs_ceiling": rate / ceiling,
                # the ratio if everything outside the model cost nothing (same ceiling)
                "bound": generated / model_s / ceiling if model_s > 0 else float("nan"),
            }
        )
    return rows


def markdown(per_call: list[dict[str, Any]], many: list[dict[str, Any]], note: str) -> str:
    """Both tables as Markdown."""
    lines = [
        f"## Per-call overhead ({note})",
        "",
        "| run | rows / call | ms / call | in the model | outside | bare forward | vs bare |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in per_call:
        lines.append(
            f"| {r['run']} | {r['width']} | {r['ms_per_call']:.2f} | {r['ms_in_model']:.2f} | "
            f"{r['ms_outside']:.2f} | {r['ms_bare']:.2f} | {r['vs_bare']:.2f} |"
        )
    lines += [
        "",
        f"## Many problems, one at a time vs one batched session ({note})",
        "",
        "| run | gen. tokens | model calls | wall s | in the model s | gen. tokens/s "
        "| vs plain, one session | with a free library |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in many:
        lines.append(
            f"| {r['run']} | {r['generated']} | {r['calls']} | {r['seconds']:.2f} | "
            f"{r['model_seconds']:.2f} | {r['rate']:.0f} | {r['vs_ceiling']:.2f} | "
            f"{r['bound']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="folder for overhead.md (default: print only)")
    parser.add_argument(
        "--batched-only",
        action="store_true",
        help="many-problems section: skip the one-problem-at-a-time runs",
    )
    add_scale_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy, model_name = policy_for(parser, args.scale)
    per_call = per_call_overhead(policy, args.repeats)
    many = many_problems(policy, args.problems, args.budget, args.repeats, not args.batched_only)
    note = f"{model_name}, {args.threads} thread(s), median of {args.repeats}"
    text = markdown(per_call, many, note)
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "overhead.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
