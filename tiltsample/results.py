"""Sampler outputs: :class:`SampleSet` (weighted draws) and :class:`ChainTrace` (Markov chains)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tiltsample.types import Cost, Seq


@dataclass(frozen=True)
class Selection:
    """One propose-then-select step: the candidates and the probabilities it drew from.

    Averaging these distributions over draws (Rao–Blackwellisation) estimates a sampler's output law
    without the counting noise of the draws themselves.
    """

    candidates: tuple[Seq, ...]
    probs: Tensor
    chosen: int

    def __post_init__(self) -> None:
        if self.probs.shape != (len(self.candidates),):
            raise ValueError("Selection.probs must have one entry per candidate")


def _log_normalise(log_w: Tensor) -> Tensor:
    top = torch.max(log_w)
    if not torch.isfinite(top):
        raise ValueError("all log-weights are -inf (or a weight is +inf/NaN): nothing to normalise")
    return log_w - torch.logsumexp(log_w, dim=0)


@dataclass(frozen=True)
class SampleSet:
    """Weighted draws from a sampler.

    Attributes
    ----------
    sequences
        The draws (:data:`~tiltsample.types.Seq`).
    log_weights
        ``[N]`` float64 log importance weights (zeros for unweighted draws; ``-inf`` for a failed
        draw). Only their differences matter.
    rewards
        ``[N]`` primary reward of each draw (NaN where not evaluated), or None.
    log_reference
        ``[N]`` ``log p_ref(x)`` of each draw, or None.
    log_evidence
        An estimate of ``log Z`` (unbiased for ``Z`` where the sampler says so), or None.
    cost
        Total compute spent.
    meta
        Sampler name, parameters, seed and anything else the sampler reports.
    selections
        For propose-then-select samplers, one :class:`Selection` per draw.
    """

    sequences: list[Seq]
    log_weights: Tensor
    cost: Cost
    rewards: Tensor | None = None
    log_reference: Tensor | None = None
    log_evidence: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    selections: list[Selection] | None = None

    def __post_init__(self) -> None:
        n = len(self.sequences)
        lw = torch.as_tensor(self.log_weights, dtype=torch.float64)
        object.__setattr__(self, "log_weights", lw)
        if lw.shape != (n,):
            raise ValueError(f"log_weights must have shape ({n},), got {tuple(lw.shape)}")
        if bool(torch.isnan(lw).any()) or bool((lw == torch.inf).any()):
            raise ValueError("log_weights must not contain NaN or +inf")
        for name in ("rewards", "log_reference"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(f"{name} must have shape ({n},)")
        if self.selections is not None and len(self.selections) != n:
            raise ValueError("selections must have one entry per sequence")

    def __len__(self) -> int:
        return len(self.sequences)

    def normalized_weights(self) -> Tensor:
        """``[N]`` self-normalised weights (sum to 1)."""
        return torch.exp(_log_normalise(self.log_weights))

    def ess(self) -> float:
        """Kong's effective sample size ``(sum w)^2 / sum w^2`` of the weights."""
        if len(self) == 0:
            return 0.0
        w = self.normalized_weights()
        return float(1.0 / torch.sum(w * w))

    def empirical(self, rao_blackwell: bool = False) -> dict[Seq, float]:
        """The weighted empirical law ``{sequence: probability}``.

        With ``rao_blackwell=True`` (propose-then-select samplers only), average each draw's
        selection distribution over its candidates instead of counting the chosen one.
        """
        out: dict[Seq, float] = {}
        if rao_blackwell:
            if self.selections is None:
                raise ValueError("rao_blackwell=True needs a sampler that reports selections")
            w = self.normalized_weights().tolist()
            for wi, sel in zip(w, self.selections, strict=True):
                for cand, p in zip(sel.candidates, sel.probs.tolist(), strict=True):
                    if p > 0:
                        out[cand] = out.get(cand, 0.0) + wi * p
            return out
        for x, wi in zip(self.sequences, self.normalized_weights().tolist(), strict=True):
            if wi > 0:
                out[x] = out.get(x, 0.0) + wi
        return out

    def resample(self, n: int, generator: torch.Generator, scheme: str = "systematic") -> SampleSet:
        """``n`` equally weighted draws by resampling (see :mod:`tiltsample.resampling`)."""
        from tiltsample.resampling import resample_indices

        idx = resample_indices(scheme, generator, self.normalized_weights(), n).tolist()
        pick = [self.sequences[i] for i in idx]

        def sub(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return SampleSet(
            pick,
            torch.zeros(n, dtype=torch.float64),
            self.cost,
            sub(self.rewards),
            sub(self.log_reference),
            self.log_evidence,
            {**self.meta, "resampled_from": len(self)},
            None if self.selections is None else [self.selections[i] for i in idx],
        )

    def mean(self, values: Tensor | Sequence[float]) -> float:
        """Self-normalised weighted mean of per-draw ``values``."""
        v = torch.as_tensor(values, dtype=torch.float64)
        return float(torch.sum(self.normalized_weights() * v))

    def to_inference_data(self) -> Any:
        """The draws as ``arviz.InferenceData``: one chain, log-weights, ESS, evidence.

        See :func:`tiltsample.arviz_interop.samples_to_inference_data` (needs the ``arviz`` extra).
        """
        from tiltsample.arviz_interop import samples_to_inference_data

        return samples_to_inference_data(self)

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-serialisable dict per draw."""
        records = []
        for i, x in enumerate(self.sequences):
            rec: dict[str, Any] = {"sequence": list(x), "log_weight": _num(self.log_weights[i])}
            if self.rewards is not None:
                rec["reward"] = _num(self.rewards[i])
            if self.log_reference is not None:
                rec["log_reference"] = _num(self.log_reference[i])
            records.append(rec)
        return records


def _num(value: Tensor | float) -> float | str:
    v = float(value)
    if math.isfinite(v):
        return v
    return str(v)  # JSON has no inf/nan literal


@dataclass(frozen=True)
class ChainTrace:
    """The whole trace of ``C`` Markov chains of ``D`` draws each.

    Attributes
    ----------
    sequences
        ``sequences[c][d]``: the state of chain ``c`` after draw ``d``.
    stats
        Per-draw scalar statistics, each ``[C, D]`` float64: at least ``log_density``; samplers add
        ``reward``, ``accepted``, ``cut``, ``proposal_length``, ...
    cost
        Total compute of all chains.
    meta
        Sampler name, parameters, seed.
    """

    sequences: list[list[Seq]]
    stats: dict[str, Tensor]
    cost: Cost
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_chains(self) -> int:
        return len(self.sequences)

    @property
    def num_draws(self) -> int:
        return len(self.sequences[0]) if self.sequences else 0

    def final(self) -> list[Seq]:
        """The last state of every chain."""
        return [chain[-1] for chain in self.sequences]

    def empirical(self, burn_in: int = 0) -> dict[Seq, float]:
        """The pooled empirical law of all chains after ``burn_in`` draws."""
        out: dict[Seq, float] = {}
        draws = [x for chain in self.sequences for x in chain[burn_in:]]
        if not draws:
            raise ValueError(f"burn_in={burn_in} leaves no draws")
        for x in draws:
            out[x] = out.get(x, 0.0) + 1.0 / len(draws)
        return out

    def diagnostics(self, burn_in: int = 0) -> dict[str, dict[str, float]]:
        """ESS, split R-hat and lag-1 autocorrelation of every scalar statistic.

        Computed by :func:`tiltsample.diagnostics.chain_diagnostics` (``pyro.ops.stats``); includes
        the acceptance rate when the sampler records ``accepted``.
        """
        from tiltsample.diagnostics import chain_diagnostics

        return chain_diagnostics({k: v[:, burn_in:] for k, v in self.stats.items()})

    def to_inference_data(self, burn_in: int = 0) -> Any:
        """The chains as ``arviz.InferenceData`` (``chain × draw``; per-step info as sample stats).

        See :func:`tiltsample.arviz_interop.chains_to_inference_data` (needs the ``arviz`` extra).
        """
        from tiltsample.arviz_interop import chains_to_inference_data

        return chains_to_inference_data(self, burn_in)
