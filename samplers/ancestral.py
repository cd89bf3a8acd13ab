r"""Ancestral sampling from the reference policy, optionally at a temperature.

Target
    None: the draws follow the *decode law* ``q_tau`` (``p_ref`` at temperature ``tau``, stopped at
    EOS or the cap; EOS forced at the cap under ``truncation="condition"``), not the tilted target.
    At ``tau = 1`` with ``truncation="stop"`` that is exactly ``p_ref``. Low temperature
    ``tau = 1/alpha`` is **not** the power distribution ``p_ref^alpha`` (``specs/mcmc.md`` §1).
Weights
    None (all zero); rewards and ``log p_ref`` are reported for every draw.
Exact law
    ``tiltsample.theory.ancestral_law(target, temperature)``.
Cost per draw
    The generated tokens of one response; one batched session per batch (prompt encoded once).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from tiltsample import iid, validation
from tiltsample.proposal import Proposals, propose, propose_many
from tiltsample.results import SampleSet
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

AncestralState = iid.IIDState


class AncestralInfo(NamedTuple):
    cost: Cost
    drawn: int


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    batch_size: int | None = None,
) -> AncestralState:
    """Nothing drawn yet (``generator`` unused; kept for the common signature)."""
    return iid.init_iid(target, num_samples, batch_size)


def draws(props: Proposals, temperature: float) -> SampleSet:
    """The proposals themselves as unweighted draws (rewards and ``log p_ref`` reported)."""
    return SampleSet(
        props.sequences,
        torch.zeros(len(props.sequences), dtype=torch.float64),
        props.cost,
        props.reward,
        props.log_reference,
        None,
        {"law": f"p_ref at temperature {temperature} (not the tilted target)"},
    )


def sample_many(
    targets: Sequence[TiltedTarget],
    num_samples: int,
    generators: Sequence[torch.Generator],
    *,
    temperature: float = 1.0,
) -> list[SampleSet]:
    """Ancestral draws for several targets at once (same policy and cap, e.g. one per problem)
    in one multi-prompt session (:func:`~tiltsample.proposal.propose_many`), target ``i``
    drawing only from ``generators[i]``: its result is the one ``sample("ancestral",
    targets[i], num_samples, generator=generators[i], temperature=...)`` returns (up to the float
    differences of a batched forward). Each result's ``cost`` is its own (generated tokens,
    reward calls); ``meta["joint_cost"]`` is the whole job's, model calls included."""
    n = validation.positive_int("num_samples", num_samples)
    temperature = validation.positive_float("temperature", temperature)
    props, joint = propose_many(targets, generators, n, temperature)
    out = []
    for target, prop in zip(targets, props, strict=True):
        res = result(iid.advance(iid.init_iid(target, n, None), draws(prop, temperature)))
        params = {"temperature": temperature}
        res.meta.update({"sampler": "ancestral", "params": params, "joint_cost": joint})
        out.append(res)
    return out


def build_kernel(temperature: float = 1.0) -> Any:
    """One batch of ancestral draws at ``temperature``."""
    temperature = validation.positive_float("temperature", temperature)

    def step(
        generator: torch.Generator, state: AncestralState
    ) -> tuple[AncestralState, AncestralInfo]:
        n = iid.next_batch(state)
        props = propose(state.target, generator, n, temperature)
        return iid.advance(state, draws(props, temperature)), AncestralInfo(props.cost, n)

    return step


done = iid.done
result = iid.result


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> SamplingAlgorithm:
    """Ancestral sampling (see the module docstring)."""
    step = build_kernel(temperature)
    iid.init_iid(target, num_samples, batch_size)  # validate eagerly
    return SamplingAlgorithm(
        name="ancestral",
        kind="iid",
        init=lambda g: init(target, generator=g, num_samples=num_samples, batch_size=batch_size),
        step=step,
        done=done,
        result=result,
        params={"temperature": temperature, "batch_size": batch_size},
        total_steps=iid.num_steps(num_samples, batch_size),
    )
