"""tiltsample: samplers for reward-tilted sequence distributions.

``pi(x | y) ∝ p_ref(x | y) · exp(r(y, x) / lam)`` — one target abstraction
(:class:`TiltedTarget`), interchangeable samplers (:func:`sample`, :func:`run_chains`), and exact
ground truth on enumerable toys (:mod:`tiltsample.theory`).

``import tiltsample`` is light: it never imports transformers or matplotlib; samplers, targets and
theory modules load on first use.
"""

from __future__ import annotations

from tiltsample.diffusion import MaskedDiffusionPolicy
from tiltsample.driver import run_chains, sample
from tiltsample.policy import (
    DecodeSession,
    PrefixSession,
    RaggedDecodeSession,
    ReferencePolicy,
    append_rows,
    extend_and_score,
    open_session,
    open_session_multi,
    truncate_rows,
)
from tiltsample.results import ChainTrace, SampleSet, Selection
from tiltsample.reward import PrefixPotential, Reward
from tiltsample.sampler import ChainRecord, SamplingAlgorithm
from tiltsample.target import (
    LogProbReward,
    TiltedTarget,
    TiltTerm,
    power_target,
    reference_target,
)
from tiltsample.types import Cost, Seq

__version__ = "0.1.0"

__all__ = [
    "ChainRecord",
    "ChainTrace",
    "Cost",
    "DecodeSession",
    "LogProbReward",
    "MaskedDiffusionPolicy",
    "PrefixPotential",
    "PrefixSession",
    "RaggedDecodeSession",
    "ReferencePolicy",
    "Reward",
    "SampleSet",
    "SamplingAlgorithm",
    "Selection",
    "Seq",
    "TiltTerm",
    "TiltedTarget",
    "__version__",
    "append_rows",
    "extend_and_score",
    "open_session",
    "open_session_multi",
    "power_target",
    "reference_target",
    "run_chains",
    "sample",
    "truncate_rows",
]
