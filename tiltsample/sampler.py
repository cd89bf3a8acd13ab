"""The sampler shape shared by every algorithm (after BlackJAX).

Each sampler module exports

``XState``, ``XInfo``
    NamedTuples; ``Info`` always has a ``cost`` field (the :class:`~tiltsample.types.Cost` of the
    step).
``init(target, *, generator, **config) -> XState``
    The initial state (it owns its decode session / KV cache).
``build_kernel(**config) -> step``
    ``step(generator, state) -> (state, info)``; the signature never grows: configuration is
    closed over by ``build_kernel``.
``done(state) -> bool`` and ``result(state) -> SampleSet``
``sampler(target, *, num_samples, **params) -> SamplingAlgorithm``
    Everything bundled for the drivers :func:`tiltsample.sample` and :func:`tiltsample.run_chains`.

``kind="iid"`` samplers produce ``num_samples`` independent (possibly weighted) draws;
``kind="markov"`` samplers run ``num_samples`` independent chains and also provide ``record`` (the
current state of each chain plus per-chain scalar statistics) so that ``run_chains`` can keep the
whole trace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from tiltsample.results import SampleSet
from tiltsample.types import Seq


class ChainRecord(NamedTuple):
    """The current draw of every chain of a Markov sampler."""

    sequences: list[Seq]
    stats: dict[str, Tensor]
    """Each ``[num_chains]``; at least ``log_density``."""


class SamplingAlgorithm(NamedTuple):
    """A sampler bound to a target and its parameters."""

    name: str
    kind: Literal["iid", "markov"]
    init: Callable[[torch.Generator], Any]
    step: Callable[[torch.Generator, Any], tuple[Any, Any]]
    done: Callable[[Any], bool]
    result: Callable[[Any], SampleSet]
    params: dict[str, Any]
    record: Callable[[Any], ChainRecord] | None = None
    total_steps: int | None = None
    """How many steps a run takes, when known in advance (for progress bars)."""
