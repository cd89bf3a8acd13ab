"""The sampler factory :func:`sampler` (plain MH) with its :class:`~tiltsample.sampler.
SamplingAlgorithm` builder, and :func:`sample_many` (several targets in one batch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tiltsample import validation
from tiltsample.results import SampleSet
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.mh.chains import init, init_many
from tiltsample.samplers.mh.config import MHConfig, make_config
from tiltsample.samplers.mh.kernel import build_kernel
from tiltsample.samplers.mh.outputs import record, result, results
from tiltsample.samplers.mh.parts import decompose_target, resolve_alpha
from tiltsample.samplers.mh.schedule import total_steps
from tiltsample.samplers.mh.state import check_target, done
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = ["make_algorithm", "sample_many", "sampler"]


def make_algorithm(
    name: str,
    target: TiltedTarget,
    num_samples: int,
    cfg: MHConfig,
    initial: Sequence[Seq] | None,
    params: dict[str, Any],
) -> SamplingAlgorithm:
    """The :class:`~tiltsample.sampler.SamplingAlgorithm` of ``num_samples`` chains of the MH
    configuration ``cfg`` on ``target`` (checked now), reported as ``name`` with ``params``."""
    validation.positive_int("num_samples", num_samples)
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    check_target(target, cfg, decompose_target(target))
    if initial is not None and len(initial) != num_samples:
        raise ValueError(f"initial must hold num_samples={num_samples} responses")
    return SamplingAlgorithm(
        name=name,
        kind="markov",
        init=lambda g: init(
            target, generator=g, num_samples=num_samples, initial=initial, _config=cfg
        ),
        step=build_kernel(_config=cfg),
        done=done,
        result=result,
        params=params,
        record=record,
        total_steps=total_steps(target.max_new_tokens, cfg),
    )


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_steps: int | None = None,
    cut: str = "uniform",
    cut_power: float = 4.0,
    proposal_temperature: float = 1.0,
    length_mode: str = "exact",
    support: str = "full",
    top_k: int = 50,
    block_size: int | None = None,
    batching: str = "auto",
    initial: Sequence[Seq] | None = None,
    max_rows: int | None = None,
) -> SamplingAlgorithm:
    """Suffix-resampling MH on any autoregressive target (see the module docstring).

    Parameters
    ----------
    target
        The target ``pi``; ``num_samples`` independent chains are run.
    num_steps
        MH steps per stage (the whole run is one stage when ``block_size`` is None). Default
        100 for plain MH, 10 per stage (the paper's ``N_MCMC``) when staged; 0 is allowed when
        staged (pure block-wise low-temperature decoding).
    cut
        ``"uniform"`` or ``"entropy_jump"`` (``cut_power`` = ``beta``, default 4).
    proposal_temperature
        ``tau`` of the suffix proposal (1 = QAlign; ``1/alpha`` = power sampling).
    length_mode
        ``"exact"`` (reversible, default) or ``"reference"`` (the published code's truncation;
        not reversible, for reproducing published numbers; ``truncation="stop"`` only).
    support
        ``"full"`` (no truncation anywhere) or ``"top_k"`` (target and proposal restricted to the
        ``top_k`` most likely tokens at every prefix; ``l`` from the full softmax).
    block_size
        ``B`` of the stage schedule (None: plain MH on the full target).
    batching
        ``"auto"`` (default: ``"ragged"`` when the policy's session has ragged rows, else
        ``"grouped"``), ``"ragged"`` (all chains cut at their own positions and decoded in one
        batch; nothing re-encoded), ``"grouped"`` (one batch per (session, cut) group) or
        ``"aligned"`` (one batch per step, re-feeds frozen prefixes above the smallest cut) or
        ``"continuous"`` (chains leave the lock-step: a chain whose proposal ended starts its next
        step at once; plain MH only, no ``initial``; per-chain random streams).
    initial
        Optional starting responses, one per chain (plain mode).
    max_rows
        ``batching="continuous"`` only: decode at most this many chains at once (the session's
        rows); the other chains wait and take the row of a chain that has made all its steps.
        Default: one row per chain.
    """
    cfg = make_config(
        num_steps=num_steps,
        cut=cut,
        cut_power=cut_power,
        proposal_temperature=proposal_temperature,
        length_mode=length_mode,
        support=support,
        top_k=top_k,
        block_size=block_size,
        batching=batching,
        max_rows=max_rows,
    )
    return make_algorithm("mh", target, num_samples, cfg, initial, cfg.as_dict())


def sample_many(
    targets: Sequence[TiltedTarget],
    num_samples: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    generators: Sequence[torch.Generator] | None = None,
    sampler: str = "mh",
    alpha: float | None = None,
    **params: Any,
) -> list[SampleSet]:
    """Run ``num_samples`` chains for each of ``targets`` in one batch; one result per target.

    ``sampler`` picks the configuration as the registered names do: ``"mh"`` (``params`` as in
    :func:`make_config`), ``"power"`` and ``"entropy-cut"`` (proposal temperature ``1/alpha``,
    ``alpha`` read from the targets' common exponent of ``p_ref`` unless given), ``"qalign"``
    (temperature 1, uniform cut). Targets must share the policy, cap, truncation and tilt
    structure (:func:`init_many`); each target's chains follow exactly the kernel they would
    follow alone — only the model calls are shared. Returns :func:`results`.

    ``generators`` (one per target, instead of ``seed`` / ``generator``; needs
    ``batching="continuous"``): target ``i`` draws only from ``generators[i]``, so its result is
    the one ``sample(sampler, targets[i], num_samples, generator=generators[i], ...)`` returns
    alone (up to the float differences of a batched forward) and ``generators[i]`` ends in the
    same state — what ``tiltsample compare`` needs to batch cells across problems.
    """
    if generators is not None:
        if seed is not None or generator is not None:
            raise ValueError("give generators= (one per target) or seed= / generator=, not both")
        if isinstance(generators, torch.Generator):
            raise TypeError("generators must be a sequence of torch.Generator, one per target")
        return _run_many(list(targets), num_samples, list(generators), sampler, alpha, params)
    if generator is None:
        if seed is None:
            raise ValueError("sample_many needs seed= or generator=")
        generator = torch.Generator().manual_seed(validation.non_negative_int("seed", seed))
    validation.generator("generator", generator)
    return _run_many(list(targets), num_samples, generator, sampler, alpha, params)


def _run_many(
    listed: list[TiltedTarget],
    num_samples: int,
    generator: torch.Generator | list[torch.Generator],
    sampler: str,
    alpha: float | None,
    params: dict[str, Any],
) -> list[SampleSet]:
    if not listed:
        raise ValueError("targets must hold at least one TiltedTarget")
    validation.one_of("sampler", sampler, ("mh", "power", "entropy-cut", "qalign"))
    cfg_params = dict(params)
    if sampler in ("power", "entropy-cut"):
        a = resolve_alpha(listed[0], alpha)
        greedy = math.isinf(a)
        if "proposal_temperature" not in cfg_params:
            if greedy:
                raise ValueError("alpha=inf (max-swap) needs an explicit proposal_temperature")
            cfg_params["proposal_temperature"] = 1.0 / a
        cfg_params["greedy"] = greedy
        if sampler == "entropy-cut":
            cfg_params["cut"] = "entropy_jump"
    elif sampler == "qalign":
        cfg_params["proposal_temperature"] = 1.0
    elif alpha is not None:
        raise TypeError("alpha= applies to sampler='power' or 'entropy-cut'")
    cfg = make_config(**cfg_params)
    state = init_many(listed, generator=generator, num_samples=num_samples, _config=cfg)
    step = build_kernel(_config=cfg)
    # the continuous engine draws from its chains' own streams; the kernel ignores this one
    step_gen = generator if isinstance(generator, torch.Generator) else torch.Generator()
    while not done(state):
        state, _ = step(step_gen, state)
    return results(state)
