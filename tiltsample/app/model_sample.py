r"""``tiltsample sample SAMPLER --model M``: a sampler on held-out task problems with a real model.

For each of the first ``problems`` held-out problems ``y`` of the arithmetic task the target is
``pi(x | y) ∝ p_ref(x | y) exp(r(y, x) / lam)`` with ``p_ref`` the model (the shipped ``arith-ar``
by name, or a folder whose tokenizer uses the task's character vocabulary) and ``r`` the
exact-match verifier. The sampler draws ``num_samples`` weighted responses per problem; the
report gives, per problem, the *weighted accuracy* ``sum_i w̄_i r(y, x_i)`` (the self-normalised
estimate of ``E_pi[r]``), the ESS and the cost, and their totals. Problem ``i`` is sampled with
the seed ``chunk_seed(seed, i)``, so any subset of problems, resumed or not, gives the same
draws. With ``out`` the draws are written problem by problem to a resumable
:class:`~tiltsample.run_store.RunFile` (one chunk per problem).

The model runs on the transformers engine (``engine="hf"``, with ``device`` / ``dtype``) or on a
vLLM engine (``engine="vllm"``, started once per process,
:func:`~tiltsample.targets.vllm.load_vllm_policy`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tiltsample import validation
from tiltsample.app.cells import BATCHED, many_runner, shares

__all__ = ["ModelRun", "command", "load_model", "problem_row", "sample_problems"]


class ModelRun:
    """What :func:`sample_problems` returns: one row per problem and the total row."""

    def __init__(self, rows: list[dict[str, Any]], total: dict[str, Any]) -> None:
        self.rows = rows
        self.total = total


def load_model(model: str, engine: str, device: Any = None, dtype: Any = None) -> Any:
    """The reference policy of ``model`` (the shipped ``arith-ar`` or a causal-LM folder) on
    ``engine``.

    Raises
    ------
    ValueError
        ``engine`` unknown, ``device`` given with the vLLM engine, ``model`` neither a shipped
        name nor a folder, or a bad ``device`` / ``dtype`` (each naming the parameter).
    """
    from tiltsample.targets import tasks

    validation.one_of("engine", engine, ("hf", "vllm"))
    if model == tasks.DEFAULT_AR:
        folder = tasks.model_path(model)
    elif Path(model).is_dir():
        folder = Path(model)
    else:
        raise ValueError(
            f"model must be the shipped causal LM {tasks.DEFAULT_AR!r} or a model folder, "
            f"got {model!r}"
        )
    if engine == "vllm":
        if device is not None:
            raise ValueError(
                "device: the vLLM engine places the model itself (select GPUs with "
                "CUDA_VISIBLE_DEVICES); device applies to engine 'hf' only"
            )
        from tiltsample.targets.vllm import load_vllm_policy

        kind = tasks.check_placement(None, dtype)[1]
        return load_vllm_policy(folder, dtype=kind)
    return tasks.load_policy_from(folder, device=device, dtype=dtype)


def problem_row(problem: int, out: Any, seconds: float) -> dict[str, Any]:
    """The report row of one problem's :class:`~tiltsample.results.SampleSet` (its rewards are
    the verifier's 0/1 verdicts)."""
    w = out.normalized_weights()
    rewards = out.rewards if out.rewards is not None else torch.zeros(len(out))
    accuracy = float((w * rewards.to(torch.float64)).sum())
    return {
        "problem": problem,
        "draws": len(out),
        "accuracy": accuracy,
        "ess": out.ess(),
        "seconds": seconds,
        **out.cost.as_dict(),
    }


def sample_problems(
    sampler: str,
    policy: Any,
    *,
    problems: int,
    num_samples: int,
    lam: float,
    seed: int,
    params: dict[str, Any],
    run: Any = None,
    progress: bool | None = None,
    batch: bool = True,
) -> ModelRun:
    """Run ``sampler`` on the first ``problems`` held-out problems with ``policy`` (see the
    module docstring); ``run`` is a :class:`~tiltsample.run_store.RunFile` whose finished
    problems are read back instead of run again.

    With ``batch`` (the default) the problems still to run go through the sampler's batched run
    across problems when it has one for these parameters
    (:func:`~tiltsample.app.cells.many_runner`): every problem draws exactly what it draws alone
    (its own generator), the job's model calls, forward tokens and wall time are apportioned over
    the problems, and their rows say ``"batched": N``. Parameters the batched run does not take
    (it raises ``ValueError``) run the problems one at a time."""
    from tqdm.auto import tqdm

    from tiltsample.driver import sample
    from tiltsample.results import SampleSet
    from tiltsample.seeds import chunk_seed
    from tiltsample.targets import tasks
    from tiltsample.types import Cost

    cases = tasks.held_out_problems(problems)
    rows_of: dict[int, dict[str, Any]] = {}
    todo = []
    for i in range(problems):
        if run is not None and run.done(i):
            rows_of[i] = run.summaries[i]["row"]
        else:
            todo.append(i)
    targets = {i: tasks.problem_target(cases[i], policy, lam=lam) for i in todo}

    def finish(i: int, out: Any, seconds: float, extra: dict[str, Any]) -> None:
        if out.rewards is None:  # samplers that do not report rewards: score the draws here
            verdicts = tasks.verifier()(targets[i].prompt, list(out.sequences))
            out = SampleSet(out.sequences, out.log_weights, out.cost, rewards=verdicts)
        row = {**problem_row(i, out, seconds), **extra}
        rows_of[i] = row
        if run is not None:
            run.write_chunk(i, out.to_records(), {"row": row})

    bar = tqdm(total=len(todo), desc="problems", disable=progress is False or problems == 1)
    if batch and len(todo) > 1 and sampler in BATCHED:
        done = _sample_batched(sampler, [targets[i] for i in todo], todo, num_samples, seed, params)
        if done:  # else the batched run does not take these parameters: one at a time
            for i, (out, seconds, extra) in zip(todo, done, strict=True):
                finish(i, out, seconds, extra)
                bar.update(1)
            todo = []
    for i in todo:
        start = time.perf_counter()
        out = sample(
            sampler, targets[i], num_samples, seed=chunk_seed(seed, i), progress=False, **params
        )
        finish(i, out, time.perf_counter() - start, {})
        bar.update(1)
    bar.close()
    rows = [rows_of[i] for i in range(problems)]
    cost = Cost()
    for r in rows:
        cost = cost + Cost(
            r["generated_tokens"], r["forward_tokens"], r["model_calls"], r["reward_calls"]
        )
    total = {
        "problem": "all",
        "draws": sum(r["draws"] for r in rows),
        "accuracy": sum(r["accuracy"] for r in rows) / len(rows),
        "ess": sum(r["ess"] for r in rows) / len(rows),
        "seconds": sum(r["seconds"] for r in rows),
        **cost.as_dict(),
    }
    return ModelRun(rows, total)


def _sample_batched(
    sampler: str,
    targets: list[Any],
    problems: list[int],
    num_samples: int,
    seed: int,
    params: dict[str, Any],
) -> list[tuple[Any, float, dict[str, Any]]]:
    """``(result, seconds, extra row fields)`` of every problem from one batched job, or ``[]``
    when the batched run does not take these parameters (ValueError; then run them alone)."""
    from tiltsample.seeds import chunk_seed
    from tiltsample.types import Cost

    run_many = many_runner(sampler)
    gens = [torch.Generator().manual_seed(chunk_seed(seed, i)) for i in problems]
    start = time.perf_counter()
    try:
        outs = run_many(targets, num_samples, gens, **params)
    except ValueError:
        return []
    seconds = (time.perf_counter() - start) / len(problems)
    joint = outs[0].meta["joint_cost"]
    forward = shares(joint.forward_tokens, len(problems))
    calls = shares(joint.model_calls, len(problems))
    done = []
    for k, out in enumerate(outs):
        own = Cost(out.cost.generated_tokens, forward[k], calls[k], out.cost.reward_calls)
        done.append((replace(out, cost=own), seconds, {"batched": len(problems)}))
    return done


def command(args: argparse.Namespace) -> int:
    """``tiltsample sample SAMPLER --model M ...`` (the parsed arguments of the CLI's ``sample``):
    refuses the toy-target flags, runs :func:`sample_problems`, prints the table."""
    from tiltsample.app.params import UsageError, out_file, pairs
    from tiltsample.app.tables import format_table
    from tiltsample.run_store import RunFile

    if args.target is not None or args.target_opt:
        raise UsageError("--target, --target-opt: not with --model (its targets are task problems)")
    if args.chunk_size is not None:
        raise UsageError("--chunk-size: not with --model (each problem is one chunk)")
    out_path = None if args.out is None else out_file("--out", args.out)
    params = pairs(args.param, "--param")
    problems = args.problems or 1
    lam = 0.1 if args.lam is None else args.lam
    engine = args.engine or "hf"
    policy = load_model(args.model, engine, args.device, args.dtype)
    header = {
        "sampler": args.sampler,
        "model": args.model,
        "engine": engine,
        "problems": problems,
        "lam": lam,
        "params": params,
        "num_samples": args.num_samples,
        "seed": args.seed,
    }
    sizes = [args.num_samples] * problems
    run = None if out_path is None else RunFile(out_path, header, chunk_sizes=sizes)
    result = sample_problems(
        args.sampler,
        policy,
        problems=problems,
        num_samples=args.num_samples,
        lam=lam,
        seed=args.seed,
        params=params,
        run=run,
        progress=False if args.no_progress else None,
    )
    columns = ["problem", "draws", "accuracy", "ess", "generated_tokens", "model_calls", "seconds"]
    rows = result.rows + ([result.total] if len(result.rows) > 1 else [])
    print(f"sampler: {args.sampler} — model {args.model} on engine {engine}, lam={lam}")
    print(format_table(rows, columns))
    if args.out is not None:
        print(f"wrote {problems * args.num_samples} records to {args.out}")
    return 0
