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
from pathlib import Path
from typing import Any, NoReturn

from tiltsample import registry
from tiltsample.app.params import (
    USAGE,
    UsageError,
    budgets,
    build_checked,
    check_target_options,
    classify,
    device_flag,
    dtype_flag,
    int_type,
    names_list,
    out_file,
    out_folder,
    pairs,
    positive_float,
    ray_address,
    ray_backend,
    report,
    unknown,
)
from tiltsample.app.tables import format_table


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``UsageError``), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


COMMANDS = ("list", "sample", "verify", "demo", "train-tiny", "compare")
"""The sub-commands (for error messages)."""


def _cmd_list(args: argparse.Namespace) -> int:
    print("samplers:")
    for e in registry.samplers():
        print(f"  {e.name:<14} {e.kind:<7} {e.summary}")
    print("targets (toy, exactly enumerable):")
    for e in registry.targets():
        print(f"  {e.name:<16} {e.summary}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from tiltsample.driver import sample
    from tiltsample.iid import concat
    from tiltsample.results import SampleSet
    from tiltsample.run_store import RunFile
    from tiltsample.seeds import chunk_seed
    from tiltsample.types import Cost

    if args.model is not None:
        from tiltsample.app.model_sample import command

        return command(args)
    model_only = {"--engine": args.engine, "--device": args.device, "--dtype": args.dtype}
    model_only.update({"--problems": args.problems, "--lam": args.lam})
    given = [flag for flag, value in model_only.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)}: only with --model (toy targets have no model)")
    args.target = args.target or "tabular"
    out_path = None if args.out is None else out_file("--out", args.out)
    target_opts = pairs(args.target_opt, "--target-opt")
    params = pairs(args.param, "--param")
    target_factory = registry.target_entry(args.target).load()
    check_target_options(args.target, target_factory, target_opts)
    target = target_factory(**target_opts)
    chunk = args.chunk_size or args.num_samples
    num_chunks = math.ceil(args.num_samples / chunk)
    sizes = [min(chunk, args.num_samples - c * chunk) for c in range(num_chunks)]
    build_checked(args.sampler, target, sizes[0], params)  # bad parameters fail before --out
    header = {
        "sampler": args.sampler,
        "target": args.target,
        "target_options": target_opts,
        "params": params,
        "num_samples": args.num_samples,
        "chunk_size": chunk,
        "seed": args.seed,
    }
    run = None if out_path is None else RunFile(out_path, header, chunk_sizes=sizes)
    parts: list[SampleSet] = []
    show = None if not args.no_progress else False
    for c in tqdm(range(num_chunks), desc="chunks", disable=show is False or num_chunks == 1):
        if run is not None and run.done(c):
            continue
        out = sample(
            args.sampler, target, sizes[c], seed=chunk_seed(args.seed, c), progress=show, **params
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

    out_folder("--out", args.out)
    if args.docs is not None:
        out_folder("--docs", args.docs)
    if args.only is not None:
        from tiltsample.theory.rates import EXPERIMENTS

        for key in args.only:
            if key not in EXPERIMENTS:
                raise unknown("--only", "experiment", key, list(EXPERIMENTS))
    backend = ray_backend(args.ray, args.ray_workers)
    results = run_verify(
        args.profile,
        args.out,
        only=args.only,
        progress=not args.no_progress,
        docs=args.docs,
        backend=backend,
    )
    rows = [{"": r.key, "measured": r.measured, "rate": r.rate, "holds": r.holds} for r in results]
    print(format_table(rows, ["", "measured", "rate", "holds"]))
    print(f"report: {args.out}/{args.profile}/report.md")
    return 0 if all(r.holds is not False for r in results) else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from tiltsample.app.demo import run_demo

    out_folder("--out", args.out)
    run_demo(out_dir=args.out, num_samples=args.num_samples, seed=args.seed)
    return 0


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    from tiltsample.targets.tasks import held_out_problems
    from tiltsample.targets.tasks.train import evaluate, main_train

    out = Path(args.out or f"results/models/{args.model}")
    out_folder("--out", out)
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
    from tiltsample.app.compare import run_compare

    out_folder("--out", args.out)
    backend = ray_backend(args.ray, args.ray_workers)
    result = run_compare(
        profile=args.profile,
        out_dir=args.out,
        model=args.model,
        samplers=args.samplers,
        num_problems=args.problems,
        budgets=args.budgets,
        repeats=args.repeats,
        lam=args.lam,
        seed=args.seed,
        progress=False if args.no_progress else None,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        engine=args.engine or "hf",
        batch_problems=not args.no_batch,
        backend=backend,
    )
    print(result.table)
    for label, why in result.skipped.items():
        print(f"  {label}: not run ({why})")
    for r in result.records:
        if "error" in r:
            print(f"  {r['sampler']} k={r['budget']} problem {r['problem']}: failed ({r['error']})")
    print(f"wrote {result.out_dir}/compare.jsonl, compare.md, compare.png")
    return 0


def _ray_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        type=ray_address,
        metavar="ADDRESS",
        help=f"run the {what} on Ray: alone, a local cluster on this machine; with ADDRESS "
        "(auto, HOST:PORT, ray://HOST:PORT), the cluster 'ray start --head' started. Same seed, "
        "same records as without --ray (needs pip install 'tiltsample[ray]')",
    )
    p.add_argument(
        "--ray-workers",
        type=int_type(1),
        default=None,
        metavar="N",
        help="with --ray: number of workers (default: the cluster's CPUs)",
    )


def _model_flags(p: argparse.ArgumentParser, only: str) -> None:
    """``--engine``, ``--device``, ``--dtype`` (``only`` prefixes their help)."""
    p.add_argument(
        "--engine",
        choices=["hf", "vllm"],
        default=None,
        help=f"{only}the model engine: hf (transformers, default) or vllm (a vLLM engine; "
        "needs pip install 'tiltsample[vllm]' or vllm on a GPU machine)",
    )
    p.add_argument(
        "--device",
        type=device_flag("--device"),
        default=None,
        help=f"{only}where the model runs with --engine hf: cpu (default), cuda, cuda:N, mps",
    )
    p.add_argument(
        "--dtype",
        type=dtype_flag("--dtype"),
        default=None,
        help=f"{only}model dtype: float32 (default), bfloat16/bf16, float16/fp16, float64",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = _Parser(
        prog="tiltsample",
        description="Samplers for reward-tilted sequence distributions "
        "pi(x|y) ∝ p_ref(x|y)·exp(r(y,x)/lam), checked against exact ground truth.",
        epilog="Exit status: 0 success, 1 runtime failure (or a failed check in 'verify'), "
        "2 usage error (bad argument, value or path); errors are one line on stderr, "
        "--debug shows the traceback.",
    )
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, show the full traceback",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, parents=[common], **kw)
        return p

    nonneg, positive = int_type(0), int_type(1)

    p_list = command("list", help="registered samplers and toy targets")
    p_list.set_defaults(func=_cmd_list)

    p_sample = command(
        "sample",
        help="run a sampler on a named toy target, print a table, write JSONL",
        description="Run SAMPLER on a named toy target; compare with the exact target law. "
        "With --out the draws are written chunk by chunk and an interrupted run resumes "
        "where it stopped (same command line).",
    )
    p_sample.add_argument("sampler", help="registered sampler name (see 'tiltsample list')")
    p_sample.add_argument("--target", help="toy target name (default: tabular)")
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
    p_sample.add_argument("--num-samples", "-n", type=positive, default=1000)
    p_sample.add_argument("--seed", type=nonneg, default=0)
    p_sample.add_argument(
        "--out",
        help="JSONL file to write (and resume); its folder must exist unless it lies below the "
        "current directory",
    )
    p_sample.add_argument(
        "--chunk-size", type=positive, default=None, help="draws per chunk (default: all)"
    )
    p_sample.add_argument("--no-exact", action="store_true", help="skip the exact comparison")
    p_sample.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_sample.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="sample held-out task problems with this causal LM instead of a toy target: a "
        "shipped model (arith-ar) or a folder whose tokenizer uses the task's vocabulary",
    )
    _model_flags(p_sample, "with --model: ")
    p_sample.add_argument(
        "--problems", type=positive, default=None, help="with --model: problems (default 1)"
    )
    p_sample.add_argument(
        "--lam", type=positive_float, default=None, help="with --model: KL coefficient (0.1)"
    )
    p_sample.set_defaults(func=_cmd_sample)

    p_verify = command(
        "verify",
        help="check every convergence bound against exact ground truth (figures + report)",
        description="Run the rate experiments: bound as published, measured error on exact "
        "targets, fitted rate with a bootstrap CI, verdict. Finished cells are cached, so a "
        "rerun resumes.",
    )
    p_verify.add_argument("--profile", choices=["quick", "full"], default="quick")
    p_verify.add_argument("--out", default="results/verify", help="output folder")
    p_verify.add_argument(
        "--only", type=names_list, help="comma-separated experiment keys (default: all)"
    )
    p_verify.add_argument("--no-progress", action="store_true")
    p_verify.add_argument(
        "--docs",
        help="also regenerate the docs from this run: DOCS/theory.md (between its markers), "
        "DOCS/verify_report.md and DOCS/figures/verify/ (e.g. --profile full --docs docs)",
    )
    _ray_flags(p_verify, "cells of the experiments")
    p_verify.set_defaults(func=_cmd_verify)

    p_demo = command("demo", help="exact target vs samplers on a toy: table of TV and cost, figure")
    p_demo.add_argument("--out", default="results", help="output folder (default: results)")
    p_demo.add_argument("--num-samples", "-n", type=positive, default=4000)
    p_demo.add_argument("--seed", type=nonneg, default=0)
    p_demo.set_defaults(func=_cmd_demo)

    p_train = command(
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
    p_train.add_argument("--steps", type=positive, default=None, help="override the preset's steps")
    p_train.add_argument("--seed", type=nonneg, default=None, help="override the preset's seed")
    p_train.add_argument(
        "--eval-every", type=nonneg, default=0, help="evaluate on held-out problems every N steps"
    )
    p_train.add_argument(
        "--evaluate", type=nonneg, default=0, metavar="N", help="evaluate on N problems at the end"
    )
    p_train.add_argument(
        "--threads",
        type=positive,
        default=None,
        help="torch threads (weights are bit-identical only for the same count; default: the "
        "preset's, 2 for arith-ar, 1 otherwise)",
    )
    p_train.add_argument("--no-progress", action="store_true")
    p_train.set_defaults(func=_cmd_train_tiny)

    p_cmp = command(
        "compare",
        help="samplers × budgets on held-out task problems with the embedded model",
        description="Run every registered sampler recipe at matched generated-token budgets on "
        "held-out problems of the arithmetic task; write JSONL (resumable), a Markdown table and "
        "an accuracy-vs-tokens figure. Re-running the same command resumes.",
    )
    p_cmp.add_argument("--profile", choices=["test", "demo", "full"], default="demo")
    p_cmp.add_argument(
        "--out",
        default="results/compare",
        help="output folder (created; its parent must exist unless it lies below the current "
        "directory)",
    )
    p_cmp.add_argument("--model", help="causal-LM folder (default: the shipped arith-ar)")
    p_cmp.add_argument(
        "--samplers",
        type=names_list,
        help="comma-separated recipe labels (default: all of the autoregressive model; the "
        "masked-diffusion recipes dlm-base, dlm-best-of-n, dlm-ets run only when named)",
    )
    p_cmp.add_argument("--problems", type=positive, help="number of held-out problems")
    p_cmp.add_argument(
        "--budgets", type=budgets, help="comma-separated budgets in responses, e.g. 1,4,16"
    )
    p_cmp.add_argument("--repeats", type=positive, help="runs per problem")
    p_cmp.add_argument(
        "--lam", type=positive_float, default=0.1, help="KL coefficient of the verifier"
    )
    p_cmp.add_argument("--seed", type=nonneg, default=0)
    p_cmp.add_argument("--threads", type=positive, default=1, help="torch threads (default 1)")
    _model_flags(p_cmp, "")
    p_cmp.add_argument(
        "--no-batch",
        action="store_true",
        help="one cell at a time (default: the cells of ancestral / best-of-n recipes run all "
        "their problems in one batched job, with the same responses)",
    )
    p_cmp.add_argument("--no-progress", action="store_true")
    _ray_flags(p_cmp, "cells (one worker per model replica)")
    p_cmp.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tiltsample`` command.

    Parameters
    ----------
    argv
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success; 2 for a usage error (bad argument, value or path, a
        resume file that belongs to another run or is damaged); 1 for a runtime failure (I/O,
        memory, a bug) or, for ``verify``, a failed check; 130 when interrupted. Errors are one
        line on stderr, ``tiltsample <command>: error: <message>``; with ``--debug`` the
        exception propagates with its traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as exc:
        command = next((a for a in argv if not a.startswith("-")), None)
        known = command in COMMANDS
        report(f"tiltsample {command}" if known else "tiltsample", "error", str(exc))
        return USAGE
    prog = f"tiltsample {args.command}"
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if args.debug:
            raise
        report(prog, "interrupted", "stopped by the user (rerun the same command to resume)")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        kind, code, message = classify(exc)
        report(prog, kind, message)
        return code
