r"""Self-normalised importance sampling — and the copy-me template for a new sampler.

Copy this file to ``samplers/<your_method>.py``, rename the ``Importance*`` names, register the
factory in :mod:`tiltsample.registry` (kebab-case name), and run the conformance checks of
:mod:`tiltsample.testing` on it (see ``docs/adding_a_sampler.md``). It is registered as
``importance`` so the conformance tests exercise the template itself and it cannot rot.

Target
    The tilted target ``pi(x) ∝ p_ref(x) exp(log_tilt(x))``.
Proposal
    ``q_tau``: ``p_ref`` at ``temperature`` (full vocabulary), EOS forced at the cap under
    ``truncation="condition"``.
Weights
    ``log w = log p_ref(x) + log_tilt(x) - log q_tau(x)`` (log space; ``-inf`` off-support).
Exactness
    Consistent: weighted expectations converge to ``pi`` as ``N → ∞`` with bias ``O(rho/N)``,
    ``rho = E_q[w^2]/Z^2``. ``log_evidence = log mean w`` is unbiased for ``Z`` (in ``Z``, not in
    ``log Z``).
Cost per draw
    One generated response and one reward call per tilt term; the prompt is encoded once per batch.
References
    Kong (1992); Agapiou, Papaspiliopoulos, Sanz-Alonso & Stuart (2017).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from tiltsample import iid, validation
from tiltsample.proposal import propose
from tiltsample.results import SampleSet
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

# 1. State: everything a step needs, as an immutable NamedTuple (i.i.d. samplers reuse IIDState).
ImportanceState = iid.IIDState


# 2. Info: what one step reports; it always has `cost`.
class ImportanceInfo(NamedTuple):
    cost: Cost
    ess: float


# 3. init(target, *, generator, **config) -> State
def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    batch_size: int | None = None,
) -> ImportanceState:
    """Nothing drawn yet."""
    return iid.init_iid(target, num_samples, batch_size)


# 4. build_kernel(**config) -> step(generator, state) -> (state, info). Validate config here.
def build_kernel(temperature: float = 1.0) -> Any:
    """One batch of weighted proposals."""
    temperature = validation.positive_float("temperature", temperature)

    def step(
        generator: torch.Generator, state: ImportanceState
    ) -> tuple[ImportanceState, ImportanceInfo]:
        n = iid.next_batch(state)
        props = propose(state.target, generator, n, temperature)
        log_w = props.log_weights
        part = SampleSet(
            props.sequences,
            log_w,
            props.cost,
            props.reward,
            props.log_reference,
            float(torch.logsumexp(log_w, 0) - math.log(n)),
            {"num_proposals": n},
        )
        from tiltsample.diagnostics import ess

        return iid.advance(state, part), ImportanceInfo(props.cost, ess(log_w))

    return step


# 5. done(state) and result(state) -> SampleSet
done = iid.done
result = iid.result


# 6. sampler(target, *, num_samples, **params) -> SamplingAlgorithm (what the registry points to)
def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> SamplingAlgorithm:
    """Self-normalised importance sampling (see the module docstring)."""
    step = build_kernel(temperature)
    iid.init_iid(target, num_samples, batch_size)  # validate eagerly
    return SamplingAlgorithm(
        name="importance",
        kind="iid",
        init=lambda g: init(target, generator=g, num_samples=num_samples, batch_size=batch_size),
        step=step,
        done=done,
        result=result,
        params={"temperature": temperature, "batch_size": batch_size},
        total_steps=iid.num_steps(num_samples, batch_size),
    )
