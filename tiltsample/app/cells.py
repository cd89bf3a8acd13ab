"""The cells of ``tiltsample compare``: the plan, each cell's target, seed and record, and the
batched run of one configuration over many problems.

A *cell* is one recipe at one budget on one problem (and one repeat); its randomness is its own
seed (:func:`cell_seed`), whatever runs it. :func:`units` groups the cells still to run: the
cells of one (recipe, budget, repeat) whose sampler can run many problems in one batched job
(:data:`BATCHED`: every recipe of the autoregressive model, through the samplers' ``sample_many``)
form one unit, every other cell is a unit of its own. :func:`run_batched` runs a unit: all its
problems' rows in one multi-prompt session, problem ``i`` drawing only from its cell's generator
(:class:`~tiltsample.row_generators.RowGenerators`; the MH chains' own streams seeded from it),
so each record holds what the cell run alone
returns — the same response, verdict, generated tokens and reward calls. Only what the problems
share is apportioned: the unit's model calls and forward tokens are split over its cells (integer
shares that add up to the unit's), and each cell's ``seconds`` is the unit's wall time divided by
its cells; ``"batched"`` says how many cells shared the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tiltsample.app.recipes import POWER_ALPHA, Recipe
from tiltsample.types import Seq

__all__ = [
    "BATCHED",
    "Cell",
    "batchable",
    "cell_record",
    "cell_seed",
    "error_record",
    "many_runner",
    "plan",
    "run_batched",
    "shares",
    "target_for",
    "units",
]

BATCHED = (
    "ancestral",
    "best-of-n",
    "power",
    "entropy-cut",
    "qalign",
    "smc",
    "power-smc",
    "ets",
    "beam",
)
"""Samplers whose cells run many problems in one batched job (they have a ``sample_many`` taking
one generator per problem; the MH samplers under ``batching="continuous"`` only)."""

MH_SAMPLERS = ("power", "entropy-cut", "qalign")

TOKEN_LEVEL_BATCHED = ("smc", "power-smc", "ets", "beam")
"""Batched runs that need token-level sessions (not a rollout-only engine such as vLLM)."""


def batchable(cell: Cell, rollout_engine: bool = False) -> bool:
    """Whether ``cell`` can share a batched job with the same configuration on other problems
    (``rollout_engine``: the model runs on a rollout-only engine)."""
    name = cell.recipe.name
    if name not in BATCHED or cell.recipe.target == "dlm-verifier":
        return False
    if rollout_engine and name in TOKEN_LEVEL_BATCHED:
        return False
    if name in MH_SAMPLERS:
        return cell.params.get("batching") == "continuous"
    return True


def many_runner(name: str) -> Callable[..., list[Any]]:
    """``run(targets, num_samples, generators, **params)`` of sampler ``name`` (in
    :data:`BATCHED`): one result per target, each what the target's cell returns alone."""
    from tiltsample.samplers import ancestral, beam_many, best_of_n, ets, mh, smc

    if name == "best-of-n":
        return best_of_n.sample_many
    if name == "ancestral":
        return ancestral.sample_many
    if name == "ets":
        return ets.sample_many
    if name == "beam":
        return beam_many.sample_many
    if name in ("smc", "power-smc"):

        def run_smc(targets: Any, n: int, gens: Any, **params: Any) -> list[Any]:
            return smc.sample_many(targets, n, gens, sampler=name, **params)

        return run_smc
    if name in MH_SAMPLERS:

        def run_mh(targets: Any, n: int, gens: Any, **params: Any) -> list[Any]:
            return mh.sample_many(targets, n, generators=gens, sampler=name, **params)

        return run_mh
    raise ValueError(f"sampler {name!r} has no batched run across problems")


@dataclass(frozen=True)
class Cell:
    recipe: Recipe
    budget: int
    problem: int
    repeat: int
    num_samples: int
    params: dict[str, Any]


def plan(
    recipes: Sequence[Recipe], budgets: Sequence[int], num_problems: int, repeats: int
) -> list[Cell]:
    """All cells in run order (recipe, budget, repeat, problem)."""
    cells = []
    for r in recipes:
        for k in budgets:
            conf = r.configure(k)
            if conf is None:
                continue
            n, params = conf
            for rep in range(repeats):
                for p in range(num_problems):
                    cells.append(Cell(r, k, p, rep, n, params))
    return cells


def target_for(
    recipe: Recipe, problem: Any, policy: Any, lam: float, diffusion_policy: Any = None
) -> Any:
    from tiltsample.target import TiltedTarget, power_target
    from tiltsample.targets import tasks

    if recipe.target == "dlm-verifier":
        if diffusion_policy is None:
            raise ValueError(f"recipe {recipe.label!r} needs the masked-diffusion policy")
        return tasks.problem_target(problem, diffusion_policy, lam=lam)
    base = tasks.problem_target(problem, policy, lam=lam)
    if recipe.target == "verifier":
        return base
    if recipe.target == "self-consistency":
        return TiltedTarget(
            policy, tasks.self_consistency(), lam, base.prompt, base.max_new_tokens, meta=base.meta
        )
    if recipe.target == "power":
        return power_target(policy, POWER_ALPHA, base.prompt, base.max_new_tokens)
    raise ValueError(f"unknown recipe target {recipe.target!r}")


def cell_seed(seed: int, cell: Cell) -> int:
    """The seed of a cell: the run seed, the problem and the repeat (common random numbers)."""
    from tiltsample.seeds import chunk_seed

    return chunk_seed(seed, cell.problem * 10_000 + cell.repeat)


def error_record(cell: Cell, error: str | None) -> dict[str, Any]:
    """The record of a cell that raised: its key and the error (one line)."""
    key = {"sampler": cell.recipe.label, "budget": cell.budget, "problem": cell.problem}
    return {**key, "repeat": cell.repeat, "error": error}


def cell_record(cell: Cell, target: Any, out: Any, seconds: float) -> dict[str, Any]:
    """The JSON record of a cell: its key, the verifier's verdict on the (one) response, the
    response, the wall time and the cost."""
    from tiltsample.targets import tasks

    x: Seq = out.sequences[0]
    correct = float(tasks.verifier()(target.prompt, [x])[0])
    return {
        "sampler": cell.recipe.label,
        "budget": cell.budget,
        "problem": cell.problem,
        "repeat": cell.repeat,
        "correct": correct,
        "answer": tasks.answer_text_of_response(x),
        "response": tasks.decode(x),
        "seconds": seconds,
        **out.cost.as_dict(),
    }


def units(
    cells: Sequence[Cell], todo: Sequence[int], batch: bool, rollout_engine: bool = False
) -> list[list[int]]:
    """The indices ``todo`` of ``cells`` grouped into units (see the module docstring); without
    ``batch`` every cell is its own unit (``rollout_engine``: see :func:`batchable`). Units keep
    the run order."""
    groups: dict[tuple[str, int, int], list[int]] = {}
    out: list[list[int]] = []
    for i in todo:
        c = cells[i]
        if not batch or not batchable(c, rollout_engine):
            out.append([i])
            continue
        key = (c.recipe.label, c.budget, c.repeat)
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(i)
    return out


def shares(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` integers that add up to it (the first ones one larger)."""
    base, extra = divmod(total, parts)
    return [base + (1 if k < extra else 0) for k in range(parts)]


def run_batched(
    cells: Sequence[Cell], problems: Sequence[Any], policy: Any, lam: float, seeds: Sequence[int]
) -> list[dict[str, Any]]:
    """The records of a unit of cells of one recipe, budget and repeat on several problems (see
    the module docstring)."""
    first = cells[0]
    run = many_runner(first.recipe.name)
    targets = [target_for(c.recipe, p, policy, lam) for c, p in zip(cells, problems, strict=True)]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    start = time.perf_counter()
    outs = run(targets, first.num_samples, gens, **first.params)
    outs = [o.resample(1, g) if len(o) > 1 else o for o, g in zip(outs, gens, strict=True)]
    seconds = (time.perf_counter() - start) / len(cells)
    joint = outs[0].meta["joint_cost"]
    forward = shares(joint.forward_tokens, len(cells))
    calls = shares(joint.model_calls, len(cells))
    records = []
    for k, (cell, target, out) in enumerate(zip(cells, targets, outs, strict=True)):
        record = cell_record(cell, target, out, seconds)
        record.update(forward_tokens=forward[k], model_calls=calls[k], batched=len(cells))
        records.append(record)
    return records
