r"""``tiltsample compare``: samplers × compute budgets on held-out problems of the reasoning task.

Every *cell* is one sampler configuration at one budget on one problem (and one repeat): the sampler
runs on the problem's target with the embedded model (or a user's model folder) and returns one
final response, which the exact-match verifier scores. Compute is matched by **generated tokens**:
a budget ``k`` asks each sampler for about ``k`` responses' worth of sampled tokens (the recipes
below translate ``k`` into each sampler's own parameters), and the table and the figure use the
tokens each run actually generated — never the nominal budget.

Samplers (recipes; the ones registered when the run starts are used, others are listed as absent):

=====================  =====================================================================
``ancestral``          one draw at temperature 1 (budget 1 only)
``low-temperature``    one draw at temperature ``1/alpha = 0.25`` (budget 1 only)
``majority``           best-of-N with the self-consistency reward: the first candidate whose
                       answer is the majority answer of the ``k`` candidates
``best-of-n``          best-of-N with the verifier: argmax over ``k`` candidates (pass@k)
``beam``               beam search with ``k`` beams on ``log p_ref + r/lam``
``ets``                ETS with the verifier: ``K = 1`` rollout, ``I = 4`` guidance steps,
                       ``M = k / 2`` candidates (about ``k`` responses of tokens; ``k >= 4``)
``smc``                SMC with ``k`` particles (prefix twist); one particle drawn by weight
``power-smc``          SMC on ``p_ref^4`` with ``k`` particles
``power``              MH power sampling on ``p_ref^4``, ``2(k - 1)`` steps (uniform cut;
                       continuous batching, the default batching on a vLLM engine)
``entropy-cut``        the same with entropy-chosen cut positions
``qalign``             MH on the verifier target, ``2(k - 1)`` steps
=====================  =====================================================================

Optional (by label only): ``dlm-base``, ``dlm-best-of-n``, ``dlm-ets`` and ``dlm-fk-steering`` run
on the shipped masked-diffusion model ``arith-dlm`` (:data:`DLM_RECIPES`); ``tri-tsmc``: toys only.

Runs are written to a JSONL run file (:class:`~tiltsample.run_store.RunFile`) one cell at a time; an
interrupted run resumes where it stopped with the same command, without losing or duplicating
cells. Seeds are *common random numbers*: every sampler gets the same seed
(:func:`~tiltsample.seeds.chunk_seed` of the run seed, problem and repeat) on a given problem,
so differences between samplers are paired, and configurations that coincide at ``k = 1``
(ancestral, majority and best-of-N with one candidate) return the same draw. The report is a
Markdown table (accuracy with a 95% interval, generated tokens per problem, forward tokens, wall
time, generated tokens/s) and an accuracy-vs-tokens figure.

Accuracy intervals: with one run per problem, the Wilson score interval of the proportion; with
repeats, a normal interval on the per-problem mean accuracies (problems are the independent
units).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tiltsample import validation
from tiltsample.app.cells import (
    Cell,
    cell_record,
    cell_seed,
    error_record,
    plan,
    run_batched,
    target_for,
    units,
)
from tiltsample.app.compare_report import markdown_table, plot, summarise, wilson
from tiltsample.app.recipes import (
    ALL_RECIPES,
    DLM_RECIPES,
    DLM_STEPS,
    PROFILES,
    RECIPES,
    RESPONSE_TOKENS,
    TOKEN_LEVEL,
    Profile,
    Recipe,
    available_recipes,
    for_rollout_engine,
)
from tiltsample.executor import SERIAL, Backend, error_text
from tiltsample.types import Cost

__all__ = [
    "ALL_RECIPES",
    "DLM_RECIPES",
    "DLM_STEPS",
    "PROFILES",
    "RECIPES",
    "RESPONSE_TOKENS",
    "TOKEN_LEVEL",
    "Cell",
    "CompareResult",
    "Profile",
    "Recipe",
    "available_recipes",
    "markdown_table",
    "plan",
    "plot",
    "run_cell",
    "run_compare",
    "summarise",
    "wilson",
]


# ------------------------------------------------------------------------------------ cells
def run_cell(
    cell: Cell, problem: Any, policy: Any, lam: float, seed: int, diffusion_policy: Any = None
) -> dict[str, Any]:
    """Run one cell; returns its JSON record (the verdict, the response and the cost)."""
    from tiltsample.driver import sample
    from tiltsample.registry import sampler_entry

    target = target_for(cell.recipe, problem, policy, lam, diffusion_policy)
    factory = sampler_entry(cell.recipe.name).load()
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    algorithm = factory(target, num_samples=cell.num_samples, **cell.params)
    out = sample(algorithm, target, cell.num_samples, generator=gen, progress=False)
    if len(out) > 1:
        out = out.resample(1, gen)
    seconds = time.perf_counter() - start
    return cell_record(cell, target, out, seconds)


@dataclass(frozen=True)
class ModelSetup:
    """Loads the models of a comparison (once per worker): ``(policy, diffusion policy or None)``.

    ``threads`` (on a Ray worker): torch intra-op threads of that worker process.
    """

    model_dir: str
    placement: tuple[str, str]
    diffusion: bool
    threads: int | None = None
    engine: str = "hf"

    def __call__(self) -> tuple[Any, Any]:
        from tiltsample.targets import tasks

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        dev, kind = self.placement
        if self.engine == "vllm":
            from tiltsample.targets.vllm import load_vllm_policy

            policy = load_vllm_policy(self.model_dir, dtype=kind)
        else:
            policy = tasks.load_policy_from(self.model_dir, device=dev, dtype=kind)
        dlm = tasks.load_diffusion_policy(device=dev, dtype=kind) if self.diffusion else None
        return policy, dlm


ENGINES = ("hf", "vllm")
"""The model engines of ``compare`` and ``sample``: transformers or a vLLM engine."""


def _diffusion_needs_hf(
    recipes: list[Recipe], skipped: dict[str, str]
) -> tuple[list[Recipe], dict[str, str]]:
    """Leave out the masked-diffusion recipes (the vLLM backend serves causal LMs only)."""
    kept = [r for r in recipes if r.target != "dlm-verifier"]
    why = "the masked-diffusion model runs on engine 'hf' only"
    return kept, {**skipped, **{r.label: why for r in recipes if r not in kept}}


def _token_level_left_out(
    recipes: list[Recipe], skipped: dict[str, str], policy: Any
) -> tuple[list[Recipe], dict[str, str]]:
    """Leave out the recipes whose sampler needs full next-token laws (:data:`TOKEN_LEVEL`)
    when ``policy`` cannot return them."""
    kept = [r for r in recipes if r.name not in TOKEN_LEVEL]
    why = (
        "needs full next-token laws; this vLLM engine returns at most "
        f"{policy.engine.max_logprobs} log-probs per position"
    )
    return kept, {**skipped, **{r.label: why for r in recipes if r not in kept}}


def compare_cell(models: tuple[Any, Any], job: tuple[Cell, Any, float, int]) -> dict[str, Any]:
    """One cell on a worker's loaded models: ``job`` is ``(cell, problem, lam, seed)``."""
    cell, problem, lam, seed = job
    return run_cell(cell, problem, models[0], lam, seed, models[1])


def compare_unit(models: tuple[Any, Any], job: tuple[Any, ...]) -> list[dict[str, Any]]:
    """One unit of cells (:func:`~tiltsample.app.cells.units`) on a worker's loaded models:
    ``job`` is ``(cells, problems, lam, seeds)``; one record per cell, in order. When the
    batched run raises, the unit's cells run one at a time, so only a failing cell is recorded
    as failed (its error, one line)."""
    cells, problems, lam, seeds = job
    if len(cells) == 1:
        return [compare_cell(models, (cells[0], problems[0], lam, seeds[0]))]
    try:
        return run_batched(cells, problems, models[0], lam, seeds)
    except Exception:  # one failing problem must not fail the others: run the cells alone
        records = []
        for cell, problem, seed in zip(cells, problems, seeds, strict=True):
            try:
                records.append(compare_cell(models, (cell, problem, lam, seed)))
            except Exception as exc:  # recorded like a failing cell of the serial path
                records.append(error_record(cell, error_text(exc)))
        return records


# ------------------------------------------------------------------------------------ runner
@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    records: list[dict[str, Any]]
    skipped: dict[str, str]
    table: str
    out_dir: Path
    cost: Cost


def run_compare(
    *,
    profile: str = "demo",
    out_dir: str | Path = "results/compare",
    model: str | None = None,
    samplers: Sequence[str] | None = None,
    num_problems: int | None = None,
    budgets: Sequence[int] | None = None,
    repeats: int | None = None,
    lam: float = 0.1,
    seed: int = 0,
    progress: bool | None = None,
    threads: int | None = 1,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    engine: str = "hf",
    batch_problems: bool = True,
    backend: Backend = SERIAL,
) -> CompareResult:
    """Run (or resume) a comparison and write ``compare.jsonl``, ``compare.md``, ``compare.png``.

    Parameters
    ----------
    profile
        ``"test"`` (seconds), ``"demo"`` (a few minutes) or ``"full"``; the explicit arguments
        below override its sizes.
    out_dir
        The output folder. It is created if missing when its parent exists; missing parents are
        created only inside the current directory (``results/compare-demo`` from a fresh clone),
        never elsewhere (``/nonexistent/x`` is refused).
    model
        A causal-LM folder (default: the shipped ``arith-ar``); its tokenizer must use the task's
        character vocabulary.
    samplers
        Recipe labels to run (default: every recipe whose sampler is registered).
    num_problems, budgets, repeats
        Override the profile's sizes; ``None`` keeps the profile's value, and an explicit ``0``
        or empty list is refused (never silently replaced by the default).
    lam, seed
        KL coefficient of the verifier target (finite, > 0) and run seed (int >= 0).
    threads
        torch intra-op threads during the run (restored afterwards). One thread is fastest for
        the tiny model on a shared machine.
    device, dtype
        Where the models run and in which dtype (default: the CPU, float32; e.g. ``"cuda"``,
        ``"bf16"``), see :class:`~tiltsample.targets.hf.HFPolicy`. Samplers and their generators
        stay on the CPU. A non-default value is part of the run's header, so a run resumes only
        with the same placement.
    engine
        ``"hf"`` (default: transformers, :class:`~tiltsample.targets.hf.HFPolicy`) or ``"vllm"``
        (a vLLM engine started once, :func:`~tiltsample.targets.vllm.load_vllm_policy`; vLLM
        places the model itself, so ``device`` must be left unset). Recipes that need full
        next-token laws are left out (``skipped``) when the engine cannot return them; the
        masked-diffusion recipes need ``"hf"``. A non-default engine is part of the header.
    batch_problems
        Run the cells of one (recipe, budget, repeat) whose sampler can (``ancestral``,
        ``best-of-n``: :data:`~tiltsample.app.cells.BATCHED`) as one batched job over all their
        problems (one session, or one vLLM engine call; see :mod:`tiltsample.app.cells`). Each
        cell's response, verdict, generated tokens and reward calls are those of the cell run
        alone; the shared model calls, forward tokens and wall time are apportioned. ``False``:
        one cell at a time.
    backend
        Where the cells run (:class:`~tiltsample.executor.Backend`): serially here (default) or
        on Ray, one actor per model replica, each loading the models once. Records are the same
        either way (each cell's seed is its own) and are written as they arrive; a cell that
        raises is recorded with its ``error`` and left out of the table.

    Raises
    ------
    ValueError, TypeError
        On a bad argument (naming it) before anything is loaded or written.
    """
    import sys

    from tqdm.auto import tqdm

    from tiltsample.executor import run_cells
    from tiltsample.run_store import RunFile
    from tiltsample.targets import tasks

    validation.one_of("profile", profile, list(PROFILES))
    prof = PROFILES[profile]
    # None means "the profile's value"; an explicit 0 or [] is an error, never the default
    n_prob = validation.positive_int(
        "num_problems", prof.num_problems if num_problems is None else num_problems
    )
    budget_list = tuple(prof.budgets if budgets is None else budgets)
    if not budget_list:
        raise ValueError("budgets must be a non-empty list of ints >= 1, got []")
    for i, b in enumerate(budget_list):
        validation.positive_int(f"budgets[{i}]", b)
    reps = validation.positive_int("repeats", prof.repeats if repeats is None else repeats)
    lam = validation.positive_float("lam", lam)
    validation.non_negative_int("seed", seed)
    if threads is not None:
        validation.positive_int("threads", threads)
    validation.one_of("engine", engine, ENGINES)
    if engine == "vllm" and device is not None:
        raise ValueError(
            "device: the vLLM engine places the model itself (select GPUs with "
            "CUDA_VISIBLE_DEVICES); device applies to engine 'hf' only"
        )
    placement = tasks.check_placement(device, dtype)  # ValueError naming device / dtype
    if samplers is not None and (isinstance(samplers, str) or not samplers):
        raise ValueError(f"samplers must be a non-empty list of recipe labels, got {samplers!r}")
    validation.output_folder("out_dir", out_dir, create_below=Path.cwd())
    out = Path(out_dir)
    recipes, skipped = available_recipes(samplers)
    if engine == "vllm":
        recipes, skipped = _diffusion_needs_hf(recipes, skipped)
        recipes = [for_rollout_engine(r) for r in recipes]
    if not recipes:
        raise ValueError("no sampler to compare (none of the requested recipes can run)")
    model_dir = str(tasks.model_path(tasks.DEFAULT_AR) if model is None else Path(model))
    use_dlm = any(r.target == "dlm-verifier" for r in recipes)
    setup: Callable[[], tuple[Any, Any]]
    if backend.ray:  # the workers load the models; check the folder here, before anything runs
        if not Path(model_dir).is_dir():
            raise ValueError(f"model: {model_dir!r} is not a folder")
        setup = ModelSetup(str(Path(model_dir).resolve()), placement, use_dlm, threads, engine)
    else:  # loaded now, so that a bad model fails before the run file is written
        loaded = ModelSetup(model_dir, placement, use_dlm, None, engine)()
        setup = lambda: loaded  # noqa: E731
        if not getattr(loaded[0], "full_vocabulary", True):
            recipes, skipped = _token_level_left_out(recipes, skipped, loaded[0])
            if not recipes:
                raise ValueError(
                    "no sampler to compare: every requested recipe needs full next-token laws, "
                    "which this vLLM engine cannot return"
                )
    problems = tasks.held_out_problems(n_prob, seed=seed)
    cells = plan(recipes, budget_list, n_prob, reps)
    header = {
        "kind": "tiltsample-compare",
        "model": model if model is not None else tasks.DEFAULT_AR,
        "task": tasks.DEFAULT_TASK.as_dict(),
        "problems": n_prob,
        "budgets": list(budget_list),
        "repeats": reps,
        "lam": lam,
        "seed": seed,
        "cells": [[c.recipe.label, c.budget, c.num_samples, c.params] for c in cells[::n_prob]],
    }
    if use_dlm:
        header["diffusion_model"] = tasks.DEFAULT_DLM
    # only a non-default placement enters the header (run files written before stay resumable)
    if placement[0] != "cpu":
        header["device"] = placement[0]
    if placement[1] != "float32":
        header["dtype"] = placement[1]
    if engine != "hf":
        header["engine"] = engine
    run = RunFile(out / "compare.jsonl", header)
    if progress is None:
        progress = sys.stderr.isatty()
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(validation.positive_int("threads", threads))
    lost: list[str] = []
    try:
        todo = [i for i in range(len(cells)) if not run.done(i)]
        # common random numbers: every sampler sees the same seed on a given (problem, repeat), so
        # comparisons are paired (and k = 1 variants of one law give the same draw); the seed is
        # the cell's own, whichever worker runs it and whenever
        groups = units(cells, todo, batch_problems, rollout_engine=engine == "vllm")
        jobs = [
            (
                tuple(cells[i] for i in g),
                tuple(problems[cells[i].problem] for i in g),
                lam,
                tuple(cell_seed(seed, cells[i]) for i in g),
            )
            for g in groups
        ]
        bar = tqdm(total=len(todo), desc="compare", disable=not progress)
        outcomes = run_cells(compare_unit, jobs, setup=setup, backend=backend)
        try:
            for outcome in outcomes:
                group = groups[outcome.index]
                cell = cells[group[0]]
                bar.set_postfix_str(f"{cell.recipe.label} k={cell.budget}")
                bar.update(len(group))
                if outcome.lost:  # not written: a rerun runs the cells again
                    lost += [
                        f"{cell.recipe.label} k={cell.budget} p={cells[i].problem}" for i in group
                    ]
                    continue
                for k, i in enumerate(group):
                    ok = outcome.ok
                    rec = outcome.value[k] if ok else error_record(cells[i], outcome.error)
                    run.write_chunk(i, [rec], {})
        finally:  # Ctrl-C or a failed write: stop the workers now
            outcomes.close()
            bar.close()
    finally:
        torch.set_num_threads(previous)
    if lost:
        raise RuntimeError(
            f"{len(lost)} cell(s) lost with their Ray worker ({', '.join(lost[:3])}, ...); "
            "rerun the same command to run them"
        )
    records = run.all_records()
    rows = summarise(records)
    table = markdown_table(rows)
    notes = "".join(f"\n- {label}: not run ({why})" for label, why in skipped.items())
    failed = [r for r in records if "error" in r]
    notes += "".join(
        f"\n- {r['sampler']} k={r['budget']} problem {r['problem']}: failed ({r['error']})"
        for r in failed
    )
    title = (
        f"tiltsample compare — profile {profile}, {n_prob} held-out problems × {reps} repeat(s), "
        f"lam={lam}, seed={seed}, model {header['model']}"
    )
    (out / "compare.md").write_text(f"# {title}\n\n{table}\n{notes}\n")
    plot(rows, out / "compare.png", title=f"{n_prob} problems, lam={lam}")
    cost = Cost()
    for r in records:
        if "error" in r:
            continue
        cost = cost + Cost(
            r["generated_tokens"], r["forward_tokens"], r["model_calls"], r["reward_calls"]
        )
    return CompareResult(rows, records, skipped, table, out, cost)
