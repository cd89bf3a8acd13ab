"""The ``tiltsample`` command line: ``list``, ``sample``, ``verify``, ``demo``, ``train-tiny``,
``compare``.

The CLI is the front door: the one module that may reach every layer (lazily, inside its
commands); nothing imports it.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tiltsample import registry, validation


# ------------------------------------------------------------------------------ error handling
class UsageError(Exception):
    """A mistake in the command line: reported on one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``UsageError``), not usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


USAGE = 2
"""Exit status of a usage error (bad argument, bad value, bad path, unusable resume file)."""
FAILURE = 1
"""Exit status of a runtime failure (I/O, out of memory, a bug)."""

COMMANDS = ("list", "sample", "verify", "demo", "train-tiny", "compare")
"""The sub-commands (for error messages)."""

_PATH_ERRORS = (
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileNotFoundError,
    FileExistsError,
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _report(prog: str, kind: str, message: str) -> None:
    print(f"{prog}: {kind}: {_one_line(message)}", file=sys.stderr)


def _os_message(exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    return f"{what}: {exc.filename!r}" if exc.filename else str(exc) or what


# ------------------------------------------------------------------------------ value parsing
def _literal(text: str) -> Any:
    """Parse ``key=value`` values: JSON literals (numbers, true/false, null, lists), the floats
    ``inf``/``-inf``/``nan``, or else strings."""
    special = validation.finite_or_inf(text)
    if special is not None:
        return special
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        if key in out:
            raise UsageError(f"{flag}: {key!r} is given twice")
        out[key] = _literal(value)
    return out


def _int_type(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum`` (the message names the allowed range)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    special = validation.finite_or_inf(text)
    try:
        value = float(text) if special is None else special
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    """An argparse type: a non-empty comma-separated list of names."""
    names = [v.strip() for v in text.split(",")]
    if not text.strip() or not all(names):
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of names without empty entries, got {text!r}"
        )
    return names


def _budgets(text: str) -> list[int]:
    """An argparse type: a non-empty comma-separated list of ints >= 1."""
    parse = _int_type(1)
    items = [v.strip() for v in text.split(",")]
    if not text.strip() or not all(items):
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of ints >= 1 without empty entries, got {text!r}"
        )
    try:
        return [parse(v) for v in items]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"every budget {exc}") from None


def _out_file(flag: str, path: str | Path) -> Path:
    try:
        return validation.output_file(flag, path, create_below=Path.cwd())
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def _out_folder(flag: str, path: str | Path) -> Path:
    try:
        return validation.output_folder(flag, path, create_below=Path.cwd())
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


# ------------------------------------------------------------------------------ parameter names
_RESERVED = {
    "target": "the target is chosen with --target",
    "num_samples": "set it with -n/--num-samples",
    "seed": "set it with --seed",
    "generator": "the CLI seeds a generator from --seed",
    "progress": "use --no-progress",
}


def _keyword_names(func: Callable[..., Any]) -> tuple[list[str], bool]:
    """Keyword parameters of ``func`` and whether it also takes ``**kwargs``."""
    names: list[str] = []
    var = False
    for p in inspect.signature(func).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            var = True
        elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            names.append(p.name)
    return names, var


def _unknown(flag: str, what: str, key: str, valid: Sequence[str]) -> UsageError:
    hint = difflib.get_close_matches(key, valid, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    listed = ", ".join(valid) if valid else "(none)"
    return UsageError(f"{flag}: unknown {what} {key!r}{suggestion}; valid: {listed}")


def _check_target_options(name: str, factory: Callable[..., Any], opts: dict[str, Any]) -> None:
    valid, var = _keyword_names(factory)
    if var:
        return
    for key in opts:
        if key not in valid:
            raise _unknown("--target-opt", f"{name} option", key, valid)


def _forwarded(factory: Callable[..., Any], callee: str) -> set[str]:
    """Keywords that ``factory`` itself passes to ``callee`` (so a user cannot)."""
    import ast
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(factory)))
    except (OSError, TypeError, SyntaxError):
        return set()
    return {
        k.arg
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == callee
        for k in node.keywords
        if k.arg is not None
    }


def _sampler_parameters(factory: Callable[..., Any], callee: str | None = None) -> list[str]:
    """The sampler parameters a user may pass with ``-p`` (following ``**kwargs`` to ``callee``,
    a function of the factory's module, when the factory forwards them)."""
    valid, var = _keyword_names(factory)
    if var and callee is not None:
        inner = getattr(sys.modules.get(factory.__module__), callee, None)
        if callable(inner):
            fixed = _forwarded(factory, callee)
            valid += [n for n in _keyword_names(inner)[0] if n not in valid and n not in fixed]
    return [n for n in valid if n not in _RESERVED]


def _check_sampler_parameters(
    name: str, factory: Callable[..., Any], params: dict[str, Any]
) -> None:
    for key in params:
        if key in _RESERVED:
            raise UsageError(f"-p/--param {key}: not a sampler parameter ({_RESERVED[key]})")
    valid, var = _keyword_names(factory)
    if var:
        return  # checked when the sampler is built (see _build_checked)
    for key in params:
        if key not in valid:
            raise _unknown("-p/--param", f"{name} parameter", key, _sampler_parameters(factory))


_UNEXPECTED = re.compile(r"(\w+)\(\) got an unexpected keyword argument '(\w+)'")


def _build_checked(name: str, target: Any, num_samples: int, params: dict[str, Any]) -> None:
    """Build the sampler once (cheap) so that bad parameters fail before anything is written."""
    from tiltsample.driver import build

    factory = registry.sampler_entry(name).load()
    _check_sampler_parameters(name, factory, params)
    try:
        build(name, target, num_samples, params)
    except TypeError as exc:
        m = _UNEXPECTED.search(str(exc))
        if m is None:
            raise
        valid = _sampler_parameters(factory, m.group(1))
        raise _unknown("-p/--param", f"{name} parameter", m.group(2), valid) from None


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

    out_path = None if args.out is None else _out_file("--out", args.out)
    target_opts = _pairs(args.target_opt, "--target-opt")
    params = _pairs(args.param, "--param")
    target_factory = registry.target_entry(args.target).load()
    _check_target_options(args.target, target_factory, target_opts)
    target = target_factory(**target_opts)
    chunk = args.chunk_size or args.num_samples
    num_chunks = math.ceil(args.num_samples / chunk)
    sizes = [min(chunk, args.num_samples - c * chunk) for c in range(num_chunks)]
    _build_checked(args.sampler, target, sizes[0], params)  # bad parameters fail before --out
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

    _out_folder("--out", args.out)
    if args.docs is not None:
        _out_folder("--docs", args.docs)
    if args.only is not None:
        from tiltsample.theory.rates import EXPERIMENTS

        for key in args.only:
            if key not in EXPERIMENTS:
                raise _unknown("--only", "experiment", key, list(EXPERIMENTS))
    results = run_verify(
        args.profile, args.out, only=args.only, progress=not args.no_progress, docs=args.docs
    )
    rows = [{"": r.key, "measured": r.measured, "rate": r.rate, "holds": r.holds} for r in results]
    print(format_table(rows, ["", "measured", "rate", "holds"]))
    print(f"report: {args.out}/{args.profile}/report.md")
    return 0 if all(r.holds is not False for r in results) else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from tiltsample.demo import run_demo

    _out_folder("--out", args.out)
    run_demo(out_dir=args.out, num_samples=args.num_samples, seed=args.seed)
    return 0


def _cmd_train_tiny(args: argparse.Namespace) -> int:
    from tiltsample.targets.tasks import held_out_problems
    from tiltsample.targets.tasks.train import evaluate, main_train

    out = Path(args.out or f"results/models/{args.model}")
    _out_folder("--out", out)
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

    _out_folder("--out", args.out)
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
    )
    print(result.table)
    for label, why in result.skipped.items():
        print(f"  {label}: not run ({why})")
    print(f"wrote {result.out_dir}/compare.jsonl, compare.md, compare.png")
    return 0


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

    nonneg, positive = _int_type(0), _int_type(1)

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
        "--only", type=_names, help="comma-separated experiment keys (default: all)"
    )
    p_verify.add_argument("--no-progress", action="store_true")
    p_verify.add_argument(
        "--docs",
        help="also regenerate the docs from this run: DOCS/theory.md (between its markers), "
        "DOCS/verify_report.md and DOCS/figures/verify/ (e.g. --profile full --docs docs)",
    )
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
        type=_names,
        help="comma-separated recipe labels (default: all of the autoregressive model; the "
        "masked-diffusion recipes dlm-base, dlm-best-of-n, dlm-ets run only when named)",
    )
    p_cmp.add_argument("--problems", type=positive, help="number of held-out problems")
    p_cmp.add_argument(
        "--budgets", type=_budgets, help="comma-separated budgets in responses, e.g. 1,4,16"
    )
    p_cmp.add_argument("--repeats", type=positive, help="runs per problem")
    p_cmp.add_argument(
        "--lam", type=_positive_float, default=0.1, help="KL coefficient of the verifier"
    )
    p_cmp.add_argument("--seed", type=nonneg, default=0)
    p_cmp.add_argument("--threads", type=positive, default=1, help="torch threads (default 1)")
    p_cmp.add_argument("--no-progress", action="store_true")
    p_cmp.set_defaults(func=_cmd_compare)
    return parser


def _classify(exc: BaseException) -> tuple[str, int, str]:
    """(kind, exit status, message) of an exception raised by a command."""
    if isinstance(exc, UsageError | ValueError | TypeError):
        return "error", USAGE, str(exc)
    if isinstance(exc, _PATH_ERRORS):
        return "error", USAGE, _os_message(exc)
    hint = " (rerun with --debug for the traceback)"
    if isinstance(exc, OSError):
        return "error", FAILURE, _os_message(exc) + hint
    if isinstance(exc, MemoryError | RuntimeError | ImportError):
        text = _one_line(str(exc)) or type(exc).__name__
        text = text if len(text) <= 400 else text[:400] + " ..."
        return "error", FAILURE, f"{type(exc).__name__}: {text}{hint}"
    return (
        "internal error",
        FAILURE,
        f"{type(exc).__name__}: {exc} — this is a bug in tiltsample; rerun with --debug for "
        "the traceback and please report it",
    )


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
        _report(f"tiltsample {command}" if known else "tiltsample", "error", str(exc))
        return USAGE
    prog = f"tiltsample {args.command}"
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if args.debug:
            raise
        _report(prog, "interrupted", "stopped by the user (rerun the same command to resume)")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        kind, code, message = _classify(exc)
        _report(prog, kind, message)
        return code
