r"""Sampler outputs as ``arviz.InferenceData`` (the ``arviz`` extra; imported only when called).

:func:`chains_to_inference_data` (``ChainTrace.to_inference_data()``)
    ``C`` chains of ``D`` draws become dimensions ``(chain, draw)``. Statistics of the *state* —
    ``log_density``, ``reward``, ``length``, ``log_weight``, ... — go to ``posterior``, so
    ``az.summary``, ``az.ess``, ``az.rhat`` and ``az.plot_trace`` work on them directly. The
    per-step information of the *move* — ``accepted``, ``acceptance_prob``, ``cut``,
    ``proposal_length``, ``regenerated`` and a log acceptance ratio where the sampler records one
    — goes to ``sample_stats``, together with ``lp`` (ArviZ's name for the log density). A
    ``burn_in`` puts the first draws in ``warmup_posterior`` / ``warmup_sample_stats``.
:func:`samples_to_inference_data` (``SampleSet.to_inference_data()``)
    Weighted draws (importance sampling, SMC, best-of-N, ...) become one chain of ``N`` draws:
    ``posterior`` holds ``reward``, ``log_reference`` and ``length``; ``sample_stats`` holds
    ``log_weight`` and the self-normalised ``log_weight_normalized``; the attributes hold the
    Kong ESS, the PSIS ``pareto_k``, ``log_evidence`` and, for SMC, ``log_evidence_runs``
    (``idata.posterior.attrs`` and ``idata.sample_stats.attrs``).
    ArviZ's ``az.ess`` / ``az.summary`` ignore importance weights: for weighted draws read
    ``attrs["ess"]``, or resample first (``SampleSet.resample``).

ArviZ's split R-hat is pyro's split Gelman–Rubin up to the rank normalisation ArviZ adds; its
bulk ESS (rank-normalised, Geyer's initial monotone sequence) and pyro's ESS agree to within
a few per cent on long, well-mixed chains (``tests/core/test_arviz.py`` checks both).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch
from torch import Tensor

from tiltsample.types import Seq


# Structural types: results.py calls this module, so it must not import results (no cycle).
class ChainTrace(Protocol):
    """What :func:`chains_to_inference_data` reads of a ``ChainTrace``."""

    @property
    def sequences(self) -> list[list[Seq]]: ...
    @property
    def stats(self) -> dict[str, Tensor]: ...
    @property
    def meta(self) -> dict[str, Any]: ...

    @property
    def num_chains(self) -> int: ...

    @property
    def num_draws(self) -> int: ...


class SampleSet(Protocol):
    """What :func:`samples_to_inference_data` reads of a ``SampleSet``."""

    @property
    def sequences(self) -> list[Seq]: ...
    @property
    def log_weights(self) -> Tensor: ...
    @property
    def rewards(self) -> Tensor | None: ...
    @property
    def log_reference(self) -> Tensor | None: ...
    @property
    def log_evidence(self) -> float | None: ...
    @property
    def meta(self) -> dict[str, Any]: ...

    def __len__(self) -> int: ...

    def ess(self) -> float: ...


STEP_STATS = frozenset(
    {
        "accepted",
        "acceptance_prob",
        "cut",
        "proposal_length",
        "regenerated",
        "log_ratio",
        "log_acceptance",
        "log_acceptance_ratio",
    }
)
"""Per-step statistics that describe the move, not the state: they go to ``sample_stats``."""


def _arviz() -> Any:
    try:
        import arviz
    except ImportError as err:  # pragma: no cover - the arviz extra is in the lock
        raise ImportError("to_inference_data needs ArviZ: pip install 'tiltsample[arviz]'") from err
    return arviz


def _attrs(meta: dict[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    if meta.get("sampler") is not None:
        attrs["sampler"] = str(meta["sampler"])
    if meta.get("seed") is not None:
        attrs["seed"] = int(meta["seed"])
    if meta.get("params"):
        attrs["params"] = json.dumps(meta["params"], default=str, sort_keys=True)
    return attrs


def chains_to_inference_data(trace: ChainTrace, burn_in: int = 0) -> Any:
    """``arviz.InferenceData`` of a :class:`~tiltsample.results.ChainTrace` (see the module doc).

    Parameters
    ----------
    trace
        The chains, ``C × D``.
    burn_in
        The first ``burn_in`` draws of every chain go to the warmup groups.
    """
    az = _arviz()
    if not 0 <= burn_in <= trace.num_draws:
        raise ValueError(f"burn_in must be in [0, {trace.num_draws}], got {burn_in}")
    stats = {k: torch.as_tensor(v, dtype=torch.float64).numpy() for k, v in trace.stats.items()}
    if "length" not in stats and trace.num_chains:
        lengths = [[float(len(x)) for x in chain] for chain in trace.sequences]
        stats["length"] = torch.tensor(lengths, dtype=torch.float64).numpy()
    posterior = {k: v for k, v in stats.items() if k not in STEP_STATS}
    sample_stats = {k: v for k, v in stats.items() if k in STEP_STATS}
    if "log_density" in stats:
        sample_stats["lp"] = stats["log_density"]

    def split(group: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return {k: v[:, burn_in:] for k, v in group.items()}, {
            k: v[:, :burn_in] for k, v in group.items()
        }

    post, warm_post = split(posterior)
    sstats, warm_stats = split(sample_stats)
    kwargs: dict[str, Any] = {}
    if burn_in:
        kwargs = {
            "warmup_posterior": warm_post,
            "warmup_sample_stats": warm_stats or None,
            "save_warmup": True,
        }
    attrs = {**_attrs(trace.meta), "burn_in": burn_in}
    return az.from_dict(
        posterior=post,
        sample_stats=sstats or None,
        posterior_attrs=dict(attrs),
        sample_stats_attrs=dict(attrs),
        **kwargs,
    )


def samples_to_inference_data(samples: SampleSet) -> Any:
    """``arviz.InferenceData`` of a :class:`~tiltsample.results.SampleSet` (see the module doc)."""
    from tiltsample.diagnostics import pareto_khat

    az = _arviz()
    n = len(samples)
    lw = samples.log_weights
    posterior: dict[str, Any] = {
        "length": torch.tensor([[float(len(x)) for x in samples.sequences]]).numpy()
    }
    if samples.rewards is not None:
        posterior["reward"] = samples.rewards.to(torch.float64).reshape(1, n).numpy()
    if samples.log_reference is not None:
        posterior["log_reference"] = samples.log_reference.to(torch.float64).reshape(1, n).numpy()
    sample_stats: dict[str, Any] = {"log_weight": lw.reshape(1, n).numpy()}
    if n and bool(torch.isfinite(lw).any()):
        normalised = lw - torch.logsumexp(lw, 0)
        sample_stats["log_weight_normalized"] = normalised.reshape(1, n).numpy()
    attrs: dict[str, Any] = {**_attrs(samples.meta), "ess": samples.ess() if n else 0.0}
    attrs["pareto_k"] = pareto_khat(lw) if n else float("nan")
    if samples.log_evidence is not None:
        attrs["log_evidence"] = float(samples.log_evidence)
    runs = samples.meta.get("log_evidence_runs")
    if runs is not None:
        attrs["log_evidence_runs"] = [float(v) for v in runs]
    return az.from_dict(
        posterior=posterior,
        sample_stats=sample_stats,
        posterior_attrs=dict(attrs),
        sample_stats_attrs=dict(attrs),
    )
