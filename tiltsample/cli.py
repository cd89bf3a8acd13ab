"""The ``tiltsample`` command line: ``list``, ``sample``, ``verify``, ``demo``, ``train-tiny``,
``compare``.

The CLI is the front door: the one module that may reach every layer (lazily, inside its
commands); nothing imports it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from tiltsample import registry


def _literal(text: str) -> Any:
    """Parse ``key=value`` values: JSON literals (numbers, true/false, null, lists) or strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects key=value, got {item!r}")
        out[key.replace("-", "_")] = _literal(value)
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    print("samplers:")
    for e in registry.samplers():
        print(f"  {e.name:<14} {e.kind:<7} {e.summary}")
    print("targets (toy, exactly enumerable):")
    for e in registry.targets():
        print(f"  {e.name:<16} {e.summary}")
    return 0


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table (floats to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, "-" * len(line), *body])


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from tiltsample.driver import sample
    from tiltsample.iid import concat
    from tiltsample.records import RunFile, chunk_seed
    from tiltsample.results import SampleSet
    from tiltsample.types import Cost

    target_opts = _pairs(args.target_opt, "--target-opt")
    params = _pairs(args.param, "--param")
    target = registry.target_entry(args.target).load()(**target_opts)
    registry.sampler_entry(args.sampler)  # fail early on an unknown name
    chunk = args.chunk_size or args.num_samples
    num_chunks = math.ceil(args.num_samples / chunk)
    header = {
        "sampler": args.sampler,
        "target": args.target,
        "target_options": target_opts,
        "params": params,
        "num_samples": args.num_samples,
        "chunk_size": chunk,
        "seed": args.seed,
    }
    run = RunFile(args.out, header) if args.out else None
    parts: list[SampleSet] = []
    show = None if not args.no_progress else False
    for c in tqdm(range(num_chunks), desc="chunks", disable=show is False or num_chunks == 1):
        if run is not None and run.done(c):
            continue
        n = min(chunk, args.num_samples - c * chunk)
        out = sample(
            args.sampler, target, n, seed=chunk_seed(args.seed, c), progress=show, **params
        )
        parts.append(out)
        if run is not None:
            summary = {"cost": out.cost.as_dict(), "log_evidence": out.log_evidence}
            run.write_chunk(c, out.to_records(), summary)
    if run is not None:
        records = run.all_records()
        cost = Cost()
        for s in run.summaries.values():
            cost = cost + Cost(**s["cost"])
        seqs = [tuple(r["sequence"]) for r in records]
        log_w = torch.tensor([float(r["log_weight"]) for r in records], dtype=torch.float64)
        result = SampleSet(seqs, log_w, cost)
        print(f"wrote {len(records)} records to {args.out}")
    else:
        result = concat(parts)
    row: dict[str, Any] = {
        "sampler": args.sampler,
        "draws": len(result),
        "ess": result.ess(),
        "gen_tokens/draw": result.cost.generated_tokens / max(len(result), 1),
        "reward_calls/draw": result.cost.reward_calls / max(len(result), 1),
    }
    columns = list(row)
    if not args.no_exact:
        from tiltsample.theory import exact_distribution, expected_tv_iid, tv

        exact = exact_distribution(target)
        row["tv_to_target"] = tv(result.empirical(), exact.as_dict())
        row["tv_noise_floor"] = expected_tv_iid(exact.as_dict(), len(result))
        columns += ["tv_to_target", "tv_noise_floor"]
    print(f"target: {args.target} — {target.describe()}")
    print(format_table([row], columns))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from tiltsample.theory.rates import run_verify

    only = args.only.split(",") if args.only else None
    results = run_verify(
        args.profile, args.out, only=only, progress=not args.no_progress, docs=args.docs
    )
    rows = [{"": r.key, "measured": r.measured, "rate": r.rate, "holds": r.holds} for r in results]
    print(format_table(rows, ["", "measured", "rate", "holds"]))
    print(f"report: {args.out}/{args.profile}/report.md")
    return 0 if all(r.holds is not False for r in results) else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from tiltsample.demo import run_demo

    run_demo(out_dir=args.out, num_samples=args.num_samples, seed=args.seed)
    return 0


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tiltsample.targets.tasks import held_out_problems
    from tiltsample.targets.tasks.train import evaluate, main_train

    out = Path(args.out or f"results/models/{args.model}")
    result = main_train(
        args.model,
        out,
        steps=args.steps,
        seed=args.seed,
        eval_every=args.eval_every,
        progress=not args.no_progress,
        threads=args.threads,
    )
    print(f"trained {args.model} in {result.seconds:.0f} s; saved to {out}")
    if args.evaluate:
        config = result.config
        problems = held_out_problems(args.evaluate, seed=0, task=config.task)
        scores = evaluate(result.model, config, problems, num_samples=8, seed=1)
        print(json.dumps(scores))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from tiltsample.compare import run_compare

    def ints(text: str | None) -> list[int] | None:
        return None if text is None else [int(v) for v in text.split(",") if v]

    result = run_compare(
        profile=args.profile,
        out_dir=args.out,
        model=args.model,
        samplers=args.samplers.split(",") if args.samplers else None,
        num_problems=args.problems,
        budgets=ints(args.budgets),
        repeats=args.repeats,
        lam=args.lam,
        seed=args.seed,
        progress=False if args.no_progress else None,
        threads=args.threads,
    )
    print(result.table)
    for label, why in result.skipped.items():
        print(f"  {label}: not run ({why})")
    print(f"wrote {result.out_dir}/compare.jsonl, compare.md, compare.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="tiltsample",
        description="Samplers for reward-tilted sequence distributions "
        "pi(x|y) ∝ p_ref(x|y)·exp(r(y,x)/lam), checked against exact ground truth.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="registered samplers and toy targets")
    p_list.set_defaults(func=_cmd_list)

    p_sample = sub.add_parser(
        "sample",
        help="run a sampler on a named toy target, print a table, write JSONL",
        description="Run SAMPLER on a named toy target; compare with the exact target law. "
        "With --out the draws are written chunk by chunk and an interrupted run resumes "
        "where it stopped (same command line).",
    )
    p_sample.add_argument("sampler", help="registered sampler name (see 'tiltsample list')")
    p_sample.add_argument("--target", default="tabular", help="toy target name (default: tabular)")
    p_sample.add_argument(
        "--target-opt", action="append", metavar="KEY=VALUE", help="toy target option (repeatable)"
    )
    p_sample.add_argument(
        "--param",
        "-p",
        action="append",
        metavar="KEY=VALUE",
        help="sampler parameter, e.g. -p num_candidates=16 -p selection=softmax",
    )
    p_sample.add_argument("--num-samples", "-n", type=int, default=1000)
    p_sample.add_argument("--seed", type=int, default=0)
    p_sample.add_argument("--out", help="JSONL file to write (and resume)")
    p_sample.add_argument("--chunk-size", type=int, default=None, help="draws per chunk")
    p_sample.add_argument("--no-exact", action="store_true", help="skip the exact comparison")
    p_sample.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_sample.set_defaults(func=_cmd_sample)

    p_verify = sub.add_parser(
        "verify",
        help="check every convergence bound against exact ground truth (figures + report)",
        description="Run the rate experiments: bound as published, measured error on exact "
        "targets, fitted rate with a bootstrap CI, verdict. Finished cells are cached, so a "
        "rerun resumes.",
    )
    p_verify.add_argument("--profile", choices=["quick", "full"], default="quick")
    p_verify.add_argument("--out", default="results/verify", help="output folder")
    p_verify.add_argument("--only", help="comma-separated experiment keys (default: all)")
    p_verify.add_argument("--no-progress", action="store_true")
    p_verify.add_argument(
        "--docs",
        help="also regenerate the docs from this run: DOCS/theory.md (between its markers), "
        "DOCS/verify_report.md and DOCS/figures/verify/ (e.g. --profile full --docs docs)",
    )
    p_verify.set_defaults(func=_cmd_verify)

    p_demo = sub.add_parser(
        "demo", help="exact target vs samplers on a toy: table of TV and cost, figure"
    )
    p_demo.add_argument("--out", default="results", help="output folder (default: results)")
    p_demo.add_argument("--num-samples", "-n", type=int, default=4000)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=_cmd_demo)

    p_train = sub.add_parser(
        "train-tiny",
        help="train a tiny task model deterministically (the shipped checkpoints' recipe)",
        description="Train a preset of tiltsample.targets.tasks.train (arith-ar, arith-dlm, or "
        "the test-sized tiny-ar / tiny-dlm). Same seed, same weights. To reproduce a shipped "
        "checkpoint: tiltsample train-tiny --model arith-ar --out targets/tasks/models/arith-ar",
    )
    p_train.add_argument(
        "--model", default="arith-ar", choices=["arith-ar", "arith-dlm", "tiny-ar", "tiny-dlm"]
    )
    p_train.add_argument("--out", help="output folder (default: results/models/<model>)")
    p_train.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p_train.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    p_train.add_argument(
        "--eval-every", type=int, default=0, help="evaluate on held-out problems every N steps"
    )
    p_train.add_argument(
        "--evaluate", type=int, default=0, metavar="N", help="evaluate on N problems at the end"
    )
    p_train.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (weights are bit-identical only for the same count; default: the "
        "preset's, 2 for arith-ar, 1 otherwise)",
    )
    p_train.add_argument("--no-progress", action="store_true")
    p_train.set_defaults(func=_cmd_train_tiny)

    p_cmp = sub.add_parser(
        "compare",
        help="samplers × budgets on held-out task problems with the embedded model",
        description="Run every registered sampler recipe at matched generated-token budgets on "
        "held-out problems of the arithmetic task; write JSONL (resumable), a Markdown table and "
        "an accuracy-vs-tokens figure. Re-running the same command resumes.",
    )
    p_cmp.add_argument("--profile", choices=["test", "demo", "full"], default="demo")
    p_cmp.add_argument("--out", default="results/compare", help="output folder")
    p_cmp.add_argument("--model", help="causal-LM folder (default: the shipped arith-ar)")
    p_cmp.add_argument(
        "--samplers",
        help="comma-separated recipe labels (default: all of the autoregressive model; the "
        "masked-diffusion recipes dlm-base, dlm-best-of-n, dlm-ets run only when named)",
    )
    p_cmp.add_argument("--problems", type=int, help="number of held-out problems")
    p_cmp.add_argument("--budgets", help="comma-separated budgets in responses, e.g. 1,4,16")
    p_cmp.add_argument("--repeats", type=int, help="runs per problem")
    p_cmp.add_argument("--lam", type=float, default=0.1, help="KL coefficient of the verifier")
    p_cmp.add_argument("--seed", type=int, default=0)
    p_cmp.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p_cmp.add_argument("--no-progress", action="store_true")
    p_cmp.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tiltsample`` command."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (ValueError, TypeError, KeyError) as exc:
        print(f"tiltsample: error: {exc}", file=sys.stderr)
        return 2
    return code
