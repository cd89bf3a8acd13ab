r"""Conditional SMC (CSMC, ``csmc``; ``specs/smc.md`` §9).

The SMC of :mod:`tiltsample.samplers.smc` with a *reference path* ``x*``: particle 0 of each run
takes the tokens of ``x*`` instead of sampling them, and its weight is computed by the usual
formula; at each resampling particles ``1..N-1`` draw their ancestors from all ``N`` particles
while particle 0 keeps its own lineage: ``resampling=`` names the conditional version of an SMC
scheme (:data:`tiltsample.resampling.CONDITIONAL_SCHEMES`: ``multinomial``, the default, and
``systematic``, ``stratified``, ``residual``, each the law of the symmetrised unconditional scheme
given that slot 0 keeps ancestor 0; Chopin & Singh 2015). ``log Ẑ_CSMC`` uses the same formula
as ``log Ẑ``. Resampling times follow the same (symmetric) ESS rule as SMC; ``ess_threshold=1``
fixes them to every block. Its expectation over exact references upper-bounds ``log Z``
(:mod:`~tiltsample.samplers.smc.bounds`); iterated, it is particle Gibbs
(:mod:`~tiltsample.samplers.smc.particle_gibbs`).

Cost
    As SMC; the reference particle's tokens are not generated but still pushed through the model
    (its forward tokens count, its ``generated_tokens`` do not).

References
----------
Andrieu, Doucet & Holenstein (2010), *Particle Markov chain Monte Carlo methods*, JRSS B;
Chopin & Singh (2015), Bernoulli; Zhao, Brekelmans, Makhzani & Grosse, arXiv 2404.17546.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tiltsample import validation
from tiltsample.enumeration import enumerate_target
from tiltsample.reward import PrefixPotential
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.smc.algorithm import particles_per_run
from tiltsample.samplers.smc.config import SMCConfig, conditional_config
from tiltsample.samplers.smc.evidence import result
from tiltsample.samplers.smc.state import SMCState, done
from tiltsample.samplers.smc.state import init as smc_init
from tiltsample.samplers.smc.step import kernel_from_config
from tiltsample.samplers.smc.twists.base import Twist
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = [
    "build_kernel",
    "done",
    "exact_references",
    "init",
    "resolve_references",
    "result",
    "sampler",
]


def exact_references(
    target: TiltedTarget, n: int, generator: torch.Generator, max_support: int = 200_000
) -> list[Seq]:
    """``n`` exact i.i.d. draws of ``pi`` by enumeration (enumerable toys only)."""
    validation.positive_int("n", n)
    enum = enumerate_target(target, max_support=max_support)
    log_density = enum.log_density
    if not bool(torch.isfinite(log_density).any()):
        raise ValueError("the target has zero total mass: no exact reference can be drawn")
    probs = torch.softmax(log_density, dim=0)
    idx = torch.multinomial(probs, n, replacement=True, generator=generator)
    return [enum.support[i] for i in idx.tolist()]


def resolve_references(
    target: TiltedTarget,
    reference: str | Seq | Sequence[Seq],
    groups: int,
    generator: torch.Generator,
) -> list[Seq]:
    """One reference path per run: ``"exact"`` (exact draws of ``pi``), one complete response
    (the same for every run) or one per run."""
    if isinstance(reference, str):
        validation.one_of("reference", reference, ("exact",))
        return exact_references(target, groups, generator)
    items: list[Any] = list(reference)
    if items and all(isinstance(t, int) for t in items):
        items = [tuple(items)] * groups  # one path given: the same reference for every run
    if len(items) != groups:
        raise ValueError(f"reference must give one path per run ({groups}), got {len(items)}")
    return [tuple(int(t) for t in x) for x in items]


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_particles: int,
    reference: str | Seq | Sequence[Seq] = "exact",
    num_groups: int = 1,
) -> SMCState:
    """CSMC particles with particle 0 of each run pinned to its reference path.

    ``reference="exact"`` draws each run's reference exactly from ``pi`` (enumerable toys).
    """
    refs = resolve_references(target, reference, num_groups, generator)
    return smc_init(
        target,
        generator=generator,
        num_particles=num_particles,
        num_groups=num_groups,
        reference=refs,
    )


def build_kernel(**params: Any) -> Any:
    """One block step of CSMC (parameters of :func:`tiltsample.samplers.smc.sampler`; the
    conditional rules of :func:`~tiltsample.samplers.smc.config.conditional_config`)."""
    return kernel_from_config(conditional_config(params))


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_particles: int | None = None,
    reference: str | Seq | Sequence[Seq] = "exact",
    twist: str | Twist = "prefix",
    potential: PrefixPotential | None = None,
    proposal: str = "reference",
    temperature: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "multinomial",
    convention: str = "reset",
) -> SamplingAlgorithm:
    """Conditional SMC: ``num_samples / num_particles`` runs, each conditioned on a reference.

    ``reference``: ``"exact"`` (default: exact draws of ``pi``, enumerable toys only), one complete
    response (used by every run), or one per run. Other parameters as in
    :func:`tiltsample.samplers.smc.sampler`. ``log_evidence`` is ``log Ẑ_CSMC`` (pooled over runs
    as a log-mean); its expectation over exact references upper-bounds ``log Z``.
    """
    n = particles_per_run(num_samples, num_particles)
    groups = num_samples // n
    params: dict[str, Any] = {
        "twist": twist,
        "potential": potential,
        "proposal": proposal,
        "temperature": temperature,
        "block_size": block_size,
        "ess_threshold": ess_threshold,
        "resampling": resampling,
        "convention": convention,
    }
    config: SMCConfig = conditional_config(params)
    if isinstance(reference, str):  # validate eagerly
        validation.one_of("reference", reference, ("exact",))
    else:
        refs = resolve_references(target, reference, groups, torch.Generator())
        target.check_sequences(refs, name="reference")
    return SamplingAlgorithm(
        name="csmc",
        kind="iid",
        init=lambda g: init(
            target, generator=g, num_particles=n, reference=reference, num_groups=groups
        ),
        step=kernel_from_config(config),
        done=done,
        result=result,
        params={"num_particles": n, "reference": reference, **params},
        total_steps=math.ceil(target.max_new_tokens / block_size),
    )
