r"""Independence Metropolis–Hastings with whole-response proposals from ``p_ref``.

Target
    The tilted target ``pi``.
Proposal
    A fresh complete response ``x' ~ q_tau`` (``p_ref`` at ``temperature``), independent of the
    current state ``x``.
Acceptance
    ``min(1, w(x') / w(x))`` with ``w = p_ref exp(log_tilt) / q_tau`` (log space). Chains start from
    a draw of ``q_tau``; a state of zero weight is left at the first proposal of positive weight.
Exactness
    ``pi`` is stationary and the kernel is reversible; with ``w* = sup_x pi(x)/q(x)`` (normalised)
    ``||P^n(x, .) - pi||_TV <= (1 - 1/w*)^n`` (Mengersen & Tweedie 1996).
Cost per step
    One generated response per chain (rejected proposals included) and one reward call per tilt
    term.

``sample("imh", ...)`` returns the final state of ``num_samples`` independent chains after
``num_steps`` steps; ``run_chains("imh", ...)`` keeps every draw with the statistics
``log_density``, ``reward``, ``accepted`` and ``log_weight``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.proposal import Proposals, propose
from tiltsample.results import SampleSet
from tiltsample.sampler import ChainRecord, SamplingAlgorithm
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq


class IMHState(NamedTuple):
    target: TiltedTarget
    sequences: list[Seq]
    log_weight: Tensor
    log_reference: Tensor
    log_tilt: Tensor
    reward: Tensor | None
    accepted: Tensor
    steps_done: int
    num_steps: int
    cost: Cost


class IMHInfo(NamedTuple):
    cost: Cost
    accepted: Tensor
    log_acceptance: Tensor


def _state(target: TiltedTarget, props: Proposals, num_steps: int, cost: Cost) -> IMHState:
    accepted = torch.ones(len(props.sequences), dtype=torch.bool)
    return IMHState(
        target,
        props.sequences,
        props.log_weights,
        props.log_reference,
        props.log_tilt,
        props.reward,
        accepted,
        0,
        num_steps,
        cost,
    )


def build_kernel(temperature: float = 1.0) -> Any:
    """One independence-MH step for every chain."""
    temperature = validation.positive_float("temperature", temperature)

    def step(generator: torch.Generator, state: IMHState) -> tuple[IMHState, IMHInfo]:
        n = len(state.sequences)
        props = propose(state.target, generator, n, temperature)
        new_w, old_w = props.log_weights, state.log_weight
        log_ratio = torch.where(
            torch.isneginf(old_w),
            torch.where(torch.isneginf(new_w), -math.inf, math.inf),
            new_w - old_w,
        )
        log_u = torch.log(torch.rand(n, generator=generator, dtype=torch.float64))
        acc = log_u < log_ratio
        pick = acc.tolist()
        seqs = [
            b if a else x for a, x, b in zip(pick, state.sequences, props.sequences, strict=True)
        ]

        def mix(new: Tensor, old: Tensor) -> Tensor:
            return torch.where(acc, new, old)

        reward = (
            None
            if props.reward is None or state.reward is None
            else mix(props.reward, state.reward)
        )
        cost = state.cost + props.cost
        new_state = IMHState(
            state.target,
            seqs,
            mix(new_w, old_w),
            mix(props.log_reference, state.log_reference),
            mix(props.log_tilt, state.log_tilt),
            reward,
            acc,
            state.steps_done + 1,
            state.num_steps,
            cost,
        )
        return new_state, IMHInfo(props.cost, acc, log_ratio.clamp(max=0.0))

    return step


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    num_steps: int = 100,
    temperature: float = 1.0,
) -> IMHState:
    """Start every chain from an independent draw of the proposal."""
    validation.positive_int("num_samples", num_samples)
    validation.positive_int("num_steps", num_steps)
    props = propose(target, generator, num_samples, temperature)
    return _state(target, props, num_steps, props.cost)


def done(state: IMHState) -> bool:
    """True after ``num_steps`` steps."""
    return state.steps_done >= state.num_steps


def record(state: IMHState) -> ChainRecord:
    """Current states and per-chain statistics."""
    log_density = torch.where(
        torch.isneginf(state.log_tilt), state.log_tilt, state.log_reference + state.log_tilt
    )
    stats = {
        "log_density": log_density,
        "accepted": state.accepted.to(torch.float64),
        "log_weight": state.log_weight,
    }
    if state.reward is not None:
        stats["reward"] = state.reward
    return ChainRecord(list(state.sequences), stats)


def result(state: IMHState) -> SampleSet:
    # a chain still in a state of zero target density (no proposal of positive weight was ever
    # accepted) has not produced a draw: it is marked failed (log-weight -inf)
    failed = torch.isneginf(state.log_weight)
    return SampleSet(
        list(state.sequences),
        torch.where(failed, -math.inf, 0.0).to(torch.float64),
        state.cost,
        state.reward,
        state.log_reference,
        None,
        {"num_steps": state.steps_done},
    )


def sampler(
    target: TiltedTarget, *, num_samples: int, num_steps: int = 100, temperature: float = 1.0
) -> SamplingAlgorithm:
    """Independence MH (see the module docstring); ``num_samples`` is the number of chains."""
    num_steps = validation.positive_int("num_steps", num_steps)
    validation.positive_int("num_samples", num_samples)
    return SamplingAlgorithm(
        name="imh",
        kind="markov",
        init=lambda g: init(
            target,
            generator=g,
            num_samples=num_samples,
            num_steps=num_steps,
            temperature=temperature,
        ),
        step=build_kernel(temperature),
        done=done,
        result=result,
        params={"num_steps": num_steps, "temperature": temperature},
        record=record,
        total_steps=num_steps,
    )
