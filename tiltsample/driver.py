"""The one-call API: :func:`sample` and :func:`run_chains`."""

from __future__ import annotations

import sys
from typing import Any

import torch

from tiltsample import validation
from tiltsample.registry import sampler_entry
from tiltsample.results import ChainTrace, SampleSet
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq


def build(
    name_or_algorithm: str | SamplingAlgorithm,
    target: TiltedTarget,
    num_samples: int,
    params: dict[str, Any],
) -> SamplingAlgorithm:
    """Resolve a registered name (or pass through an already built algorithm)."""
    if isinstance(name_or_algorithm, SamplingAlgorithm):
        if params:
            raise ValueError(
                "parameters go to the sampler factory; a built SamplingAlgorithm takes none, "
                f"got {sorted(params)}"
            )
        return name_or_algorithm
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    validation.positive_int("num_samples", num_samples)
    factory = sampler_entry(name_or_algorithm).load()
    algorithm: SamplingAlgorithm = factory(target, num_samples=num_samples, **params)
    return algorithm


def _progress(total: int | None, enabled: bool | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def mark_failed(out: SampleSet) -> None:
    """Record ``meta["failed"]``: the number of draws with log-weight ``-inf``.

    The rule every sampler follows (tested over all registered samplers): a draw without target
    mass — every candidate violated a constraint, a chain never left a zero-density state, a
    particle system whose weights all vanished — is returned with log-weight ``-inf``; a sampler
    that cannot return draws at all (``exact``, ``csmc``) raises ``ValueError`` ("zero total
    mass"). Nothing is silently re-weighted. A count the sampler reports itself must agree.
    """
    count = int(torch.isneginf(out.log_weights).sum())
    reported = out.meta.get("failed")
    if reported is not None and int(reported) != count:
        raise RuntimeError(
            f"sampler reported failed={reported} but {count} draws have log-weight -inf"
        )
    out.meta["failed"] = count


def sample(
    name_or_algorithm: str | SamplingAlgorithm,
    target: TiltedTarget,
    num_samples: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    **params: Any,
) -> SampleSet:
    """Run a sampler to completion and return its :class:`~tiltsample.results.SampleSet`.

    Parameters
    ----------
    name_or_algorithm
        A registered sampler name (``tiltsample list``) or a built ``SamplingAlgorithm``.
    target
        The :class:`~tiltsample.target.TiltedTarget` to sample.
    num_samples
        Draws to return; for Markov samplers the number of independent chains, whose final states
        are returned (use :func:`run_chains` for the whole trace).
    seed, generator
        Randomness: one of them. Same seed, same inputs ⇒ bit-identical output. With neither, a
        fresh seed is drawn from the OS and recorded in ``meta["seed"]``.
    progress
        Show a progress bar (default: when stderr is a terminal).
    **params
        Sampler parameters (``num_candidates``, ``selection``, ``temperature``, ...).
    """
    gen, used_seed = validation.make_generator(seed, generator)
    algorithm = build(name_or_algorithm, target, num_samples, params)
    state = algorithm.init(gen)
    with _progress(algorithm.total_steps, progress, algorithm.name) as bar:
        while not algorithm.done(state):
            state, _info = algorithm.step(gen, state)
            bar.update(1)
    out = algorithm.result(state)
    mark_failed(out)
    out.meta.setdefault("sampler", algorithm.name)
    out.meta.setdefault("params", dict(algorithm.params))
    if used_seed is not None:
        out.meta["seed"] = used_seed
    return out


def run_chains(
    name_or_algorithm: str | SamplingAlgorithm,
    target: TiltedTarget,
    num_chains: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    **params: Any,
) -> ChainTrace:
    """Run ``num_chains`` independent chains of a Markov sampler and keep every draw.

    The trace holds the state after each step (the initial state is not a draw). Parameters as in
    :func:`sample`; the number of steps is the sampler's ``num_steps`` parameter.
    """
    gen, used_seed = validation.make_generator(seed, generator)
    algorithm = build(name_or_algorithm, target, num_chains, params)
    if algorithm.kind != "markov" or algorithm.record is None:
        raise ValueError(
            f"run_chains needs a Markov sampler; {algorithm.name!r} is kind={algorithm.kind!r}"
        )
    state = algorithm.init(gen)
    seqs: list[list[Seq]] = [[] for _ in range(num_chains)]
    stats: dict[str, list[torch.Tensor]] = {}
    with _progress(algorithm.total_steps, progress, algorithm.name) as bar:
        while not algorithm.done(state):
            state, _info = algorithm.step(gen, state)
            record = algorithm.record(state)
            for c, x in enumerate(record.sequences):
                seqs[c].append(x)
            for key, value in record.stats.items():
                stats.setdefault(key, []).append(torch.as_tensor(value, dtype=torch.float64))
            bar.update(1)
    final = algorithm.result(state)
    meta: dict[str, Any] = {"sampler": algorithm.name, "params": dict(algorithm.params)}
    if used_seed is not None:
        meta["seed"] = used_seed
    stacked = {k: torch.stack(v, dim=1) for k, v in stats.items()}
    return ChainTrace(seqs, stacked, final.cost, meta)
