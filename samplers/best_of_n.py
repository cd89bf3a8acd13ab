r"""Best-of-N: one SIR draw among N candidates (soft best-of-N; default) or the tilt's argmax.

For each output, draw ``M = num_candidates`` complete responses ``x_1..x_M ~ q_tau`` (``p_ref`` at
``temperature``; ``tau = 1`` by default) and compute importance weights
``w_m = p_ref(x_m) exp(log_tilt(x_m)) / q_tau(x_m)``.

``selection="softmax"`` (sampling-importance-resampling)
    Return ``x_m`` with probability ``w_m / sum_j w_j``. Target: the tilted target ``pi``; the
    output law converges to ``pi`` as ``M → ∞`` (TV of order ``rho/M``, ``rho = E_q[w^2]/Z^2``).
    This is ETS with one guidance step (``specs/ets.md`` §4). Exact law:
    ``tiltsample.theory.sir_law`` (1-D quadrature).
``selection="argmax"``
    Return the candidate with the largest log-tilt (first index among ties — by exchangeability
    equivalent to a uniform tie-break). As ``lam → 0`` with many candidates this concentrates on the
    reward maximisers; it is not a sampler of ``pi``. Exact law:
    ``tiltsample.theory.best_of_n_law``.

Both report every draw's candidates and selection probabilities (``SampleSet.selections``; one-hot
for argmax) and ``log_evidence = log mean_m w_m`` over all candidates, an unbiased estimate of
``Z``.
A group whose weights are all zero (every candidate violates a constraint) yields a failed draw
with log-weight ``-inf``.

Cost per draw: ``M`` complete responses (one batched session for all ``n·M`` rows of a batch; the
prompt is encoded once) and ``M`` reward calls per tilt term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import iid, validation
from tiltsample.proposal import Proposals, propose, propose_many
from tiltsample.results import SampleSet, Selection
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

SELECTIONS = ("softmax", "argmax")

BestOfNState = iid.IIDState


class BestOfNInfo(NamedTuple):
    cost: Cost
    selection_probs: Tensor
    """``[n, M]``: the probabilities each draw was made from."""
    chosen: Tensor
    """``[n]``: chosen candidate index per draw."""


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    batch_size: int | None = None,
) -> BestOfNState:
    """Nothing drawn yet."""
    return iid.init_iid(target, num_samples, batch_size)


def selection_probabilities(log_weights: Tensor, log_tilt: Tensor, selection: str) -> Tensor:
    """``[n, M]`` selection probabilities from candidate log-weights / log-tilts.

    Rows with no valid candidate (all weights zero) get NaN-free uniform rows; callers mark them
    as failed.
    """
    if selection == "softmax":
        valid = torch.isfinite(log_weights).any(dim=1, keepdim=True)
        safe = torch.where(valid, log_weights, torch.zeros_like(log_weights))
        return torch.softmax(safe, dim=1)
    score = torch.where(torch.isfinite(log_weights), log_tilt, torch.full_like(log_tilt, -math.inf))
    best = torch.argmax(score, dim=1)  # first index among ties
    return torch.nn.functional.one_hot(best, score.shape[1]).to(torch.float64)


def select_draws(
    props: Proposals, n: int, m: int, selection: str, generator: torch.Generator
) -> tuple[SampleSet, BestOfNInfo]:
    """``n`` draws, each chosen among its ``m`` candidates of ``props`` (rows ``r·m .. r·m+m-1``)
    by ``selection`` with one multinomial of ``generator``: the draws, with their selections and
    ``log_evidence = log mean w`` over all ``n·m`` candidates."""
    log_w = props.log_weights.view(n, m)
    probs = selection_probabilities(log_w, props.log_tilt.view(n, m), selection)
    chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    failed = ~torch.isfinite(log_w).any(dim=1)
    flat = torch.arange(n) * m + chosen
    seqs = [props.sequences[i] for i in flat.tolist()]
    selections = [
        Selection(tuple(props.sequences[r * m : (r + 1) * m]), probs[r], int(chosen[r]))
        for r in range(n)
    ]
    log_z = float(torch.logsumexp(props.log_weights, 0) - math.log(n * m))
    part = SampleSet(
        seqs,
        torch.where(failed, -math.inf, 0.0).to(torch.float64),
        props.cost,
        None if props.reward is None else props.reward[flat],
        props.log_reference[flat],
        log_z,
        {"num_proposals": n * m, "failed": int(failed.sum())},
        selections,
    )
    return part, BestOfNInfo(props.cost, probs, chosen)


def build_kernel(num_candidates: int, selection: str = "softmax", temperature: float = 1.0) -> Any:
    """One batch of best-of-N draws."""
    m = validation.positive_int("num_candidates", num_candidates)
    selection = validation.one_of("selection", selection, SELECTIONS)
    temperature = validation.positive_float("temperature", temperature)

    def step(generator: torch.Generator, state: BestOfNState) -> tuple[BestOfNState, BestOfNInfo]:
        n = iid.next_batch(state)
        props = propose(state.target, generator, n * m, temperature)
        part, info = select_draws(props, n, m, selection, generator)
        return iid.advance(state, part), info

    return step


done = iid.done


def result(state: BestOfNState) -> SampleSet:
    """All draws; ``meta["failed"]`` counts draws whose candidates all had zero weight."""
    failed = sum(int(p.meta.get("failed", 0)) for p in state.parts)
    return iid.concat(state.parts, {"failed": failed})


def sample_many(
    targets: Sequence[TiltedTarget],
    num_samples: int,
    generators: Sequence[torch.Generator],
    *,
    num_candidates: int = 8,
    selection: str = "softmax",
    temperature: float = 1.0,
) -> list[SampleSet]:
    """Best-of-N on several targets at once (same policy and cap, e.g. one per problem): all
    ``len(targets) · num_samples · num_candidates`` candidates decode in one multi-prompt session
    (:func:`~tiltsample.proposal.propose_many`), target ``i`` drawing only from
    ``generators[i]``, so its result is the one ``sample("best-of-n", targets[i], num_samples,
    generator=generators[i], ...)`` returns (up to the float differences of a batched forward).

    Each result's ``cost`` is its own (generated tokens, reward calls); ``meta["joint_cost"]``
    holds the cost of the whole job, model calls included (they serve all targets at once).
    """
    n = validation.positive_int("num_samples", num_samples)
    m = validation.positive_int("num_candidates", num_candidates)
    selection = validation.one_of("selection", selection, SELECTIONS)
    temperature = validation.positive_float("temperature", temperature)
    props, joint = propose_many(targets, generators, n * m, temperature)
    params = {"num_candidates": m, "selection": selection, "temperature": temperature}
    out = []
    for target, prop, generator in zip(targets, props, generators, strict=True):
        part, _ = select_draws(prop, n, m, selection, generator)
        res = result(iid.advance(iid.init_iid(target, n, None), part))
        res.meta.update({"sampler": "best-of-n", "params": params, "joint_cost": joint})
        out.append(res)
    return out


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_candidates: int = 8,
    selection: str = "softmax",
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> SamplingAlgorithm:
    """Best-of-N (see the module docstring)."""
    step = build_kernel(num_candidates, selection, temperature)
    iid.init_iid(target, num_samples, batch_size)
    return SamplingAlgorithm(
        name="best-of-n",
        kind="iid",
        init=lambda g: init(target, generator=g, num_samples=num_samples, batch_size=batch_size),
        step=step,
        done=done,
        result=result,
        params={
            "num_candidates": num_candidates,
            "selection": selection,
            "temperature": temperature,
            "batch_size": batch_size,
        },
        total_steps=iid.num_steps(num_samples, batch_size),
    )
