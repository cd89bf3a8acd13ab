r"""Exact i.i.d. sampling from an enumerable target.

Target
    ``pi`` exactly: the support is enumerated once (:func:`tiltsample.enumeration.enumerate_target`,
    toy targets only, at most ``max_support`` responses) and draws are categorical with the caller's
    generator.
Weights
    None (exact draws); ``log_evidence`` is the exact ``log Z``.
Cost
    The enumeration: one reward call per support element (reported once); no generated tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.enumeration import DEFAULT_MAX_SUPPORT, Enumeration, enumerate_target
from tiltsample.results import SampleSet
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq


class ExactState(NamedTuple):
    enumeration: Enumeration
    log_probs: Tensor
    log_z: float
    remaining: int
    drawn: tuple[int, ...]
    cost: Cost


class ExactInfo(NamedTuple):
    cost: Cost
    drawn: int


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    max_support: int = DEFAULT_MAX_SUPPORT,
) -> ExactState:
    """Enumerate the target."""
    validation.positive_int("num_samples", num_samples)
    enum = enumerate_target(target, max_support=max_support)
    log_density = enum.log_density
    log_z = float(torch.logsumexp(log_density, 0)) if len(enum.support) else -float("inf")
    if not log_z > -float("inf"):
        raise ValueError("the target has zero total mass (every response violates a constraint)")
    cost = Cost(reward_calls=len(enum.support) * len(target.terms))
    return ExactState(enum, log_density - log_z, log_z, num_samples, (), cost)


def build_kernel(batch_size: int | None = None) -> Any:
    """Draw ``batch_size`` (default: all) categorical indices per step."""
    if batch_size is not None:
        validation.positive_int("batch_size", batch_size)

    def step(generator: torch.Generator, state: ExactState) -> tuple[ExactState, ExactInfo]:
        n = state.remaining if batch_size is None else min(batch_size, state.remaining)
        idx = torch.multinomial(
            torch.exp(state.log_probs), n, replacement=True, generator=generator
        )
        new = state._replace(remaining=state.remaining - n, drawn=state.drawn + tuple(idx.tolist()))
        return new, ExactInfo(Cost(), n)

    return step


def done(state: ExactState) -> bool:
    return state.remaining <= 0


def result(state: ExactState) -> SampleSet:
    enum = state.enumeration
    idx = torch.tensor(state.drawn, dtype=torch.long)
    seqs: list[Seq] = [enum.support[i] for i in state.drawn]
    return SampleSet(
        seqs,
        torch.zeros(len(seqs), dtype=torch.float64),
        state.cost,
        None,
        enum.log_reference[idx],
        state.log_z,
        {"support_size": len(enum.support)},
    )


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    batch_size: int | None = None,
    max_support: int = DEFAULT_MAX_SUPPORT,
) -> SamplingAlgorithm:
    """Exact sampling (see the module docstring)."""
    validation.positive_int("num_samples", num_samples)
    return SamplingAlgorithm(
        name="exact",
        kind="iid",
        init=lambda g: init(target, generator=g, num_samples=num_samples, max_support=max_support),
        step=build_kernel(batch_size),
        done=done,
        result=result,
        params={"batch_size": batch_size, "max_support": max_support},
        total_steps=1 if batch_size is None else -(-num_samples // batch_size),
    )
