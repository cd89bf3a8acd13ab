r"""Independent oracles of a :class:`~tiltsample.targets.pyro_program.PyroProgram`.

* :func:`enumeration_log_z`: the exact ``log Z`` by variable elimination — ``TraceEnum_ELBO`` with
  every site enumerated in parallel and an empty guide gives ``ELBO = log Z`` exactly, so
  ``log Z = -loss``;
* :func:`run_smc_filter`: ``pyro.infer.SMCFilter`` with ``p_ref`` as the proposal and the tilt as a
  factor at the last step (particle indices, normalised log-weights, evidence estimate).

Both act on the program's dense tables (:mod:`tiltsample.targets.pyro_tables`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SMCFilter, TraceEnum_ELBO, config_enumerate
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

__all__ = ["enumeration_log_z", "run_smc_filter"]


def _empty_guide() -> None:
    """The empty guide of :func:`enumeration_log_z`: every latent site is enumerated."""
    return None


def enumeration_log_z(model: Callable[[], None]) -> float:
    """``log Z`` of a Pyro ``model`` without plates by parallel enumeration of every site
    (``TraceEnum_ELBO(max_plate_nesting=0)``, empty guide, ``log Z = -loss``)."""
    elbo = TraceEnum_ELBO(max_plate_nesting=0)
    loss = elbo.loss(config_enumerate(model, default="parallel"), _empty_guide)
    return -float(loss)


def run_smc_filter(
    tables: Sequence[Tensor],
    tilt: Tensor,
    num_particles: int,
    generator: torch.Generator,
    ess_threshold: float,
) -> tuple[Tensor, Tensor, float]:
    """``SMCFilter`` on the program of ``tables`` and ``tilt`` (arguments already checked).

    Returns the final particles' full indices ``[N]``, their normalised float64 log-weights and
    the evidence estimate ``log Ẑ``. ``SMCFilter`` draws from torch's global RNG, so the run happens
    inside ``torch.random.fork_rng`` seeded from one draw of ``generator``.
    """
    n = num_particles
    seed = int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        smc = _EvidenceSMCFilter(
            _SMCModel(tables, tilt, n),
            _SMCGuide(tables),
            n,
            max_plate_nesting=0,
            ess_threshold=ess_threshold,
        )
        smc.init()
        for t in range(len(tables)):
            smc.step(t)
        index = smc.state["idx"].clone()
        log_w = smc.get_empirical()["idx"].log_weights.to(torch.float64)
    log_w = log_w - torch.logsumexp(log_w, dim=0)
    return index, log_w, smc.log_evidence


class _SMCModel:
    """``SMCFilter`` model: state ``idx`` (flattened prefix index per particle)."""

    def __init__(self, tables: Sequence[Tensor], tilt: Tensor, num_particles: int) -> None:
        self.tables = tables
        self.tilt = tilt
        self.vocab_size = int(tables[0].shape[1])
        self.num_particles = num_particles

    def init(self, state: Any) -> None:
        state["idx"] = torch.zeros(self.num_particles, dtype=torch.long)

    def step(self, state: Any, t: int) -> None:
        logits = self.tables[t][state["idx"]]
        x = pyro.sample(f"x_{t}", dist.Categorical(logits=logits))
        state["idx"] = state["idx"] * self.vocab_size + x.long()
        if t == len(self.tables) - 1:
            pyro.factor("tilt", self.tilt[state["idx"]])


class _SMCGuide:
    """``SMCFilter`` guide: proposes ``x_t`` from ``p_ref`` (reads the state, never writes)."""

    def __init__(self, tables: Sequence[Tensor]) -> None:
        self.tables = tables

    def init(self, state: Any) -> None:
        return None

    def step(self, state: Any, t: int) -> None:
        logits = self.tables[t][state["idx"]]
        pyro.sample(f"x_{t}", dist.Categorical(logits=logits))


class _EvidenceSMCFilter(SMCFilter):
    """``SMCFilter`` with float64 weights that also accumulates the evidence estimate.

    ``SMCFilter`` renormalises its weights after every update, which loses ``Ẑ``. Before delegating
    each update this subclass computes the same incremental log-weight ``log w_t`` as
    ``SMCFilter._update_weights`` (guide sites ``log p - log q`` plus observed model sites) and adds
    ``log Σ_i W^i_{t-1} w^i_t`` to :attr:`log_evidence`. Relies on the internals of pyro 1.9
    (``state._log_weights``, ``_update_weights``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state._log_weights = torch.zeros(self.num_particles, dtype=torch.float64)
        self.log_evidence = 0.0

    def _update_weights(self, model_trace: Any, guide_trace: Any) -> None:
        n = self.num_particles
        log_prev = self.state._log_weights.to(torch.float64)
        log_prev = log_prev - torch.logsumexp(log_prev, dim=0)
        model_tr = prune_subsample_sites(model_trace)
        guide_tr = prune_subsample_sites(guide_trace)
        model_tr.compute_log_prob()
        guide_tr.compute_log_prob()
        inc = torch.zeros(n, dtype=torch.float64)
        for name, guide_site in guide_tr.nodes.items():
            if guide_site["type"] == "sample":
                log_p = model_tr.nodes[name]["log_prob"].reshape(n, -1).sum(-1)
                log_q = guide_site["log_prob"].reshape(n, -1).sum(-1)
                inc = inc + (log_p - log_q).to(torch.float64)
        for site in model_tr.nodes.values():
            if site["type"] == "sample" and site["is_observed"]:
                inc = inc + site["log_prob"].reshape(n, -1).sum(-1).to(torch.float64)
        self.log_evidence += float(torch.logsumexp(log_prev + inc, dim=0))
        super()._update_weights(model_trace, guide_trace)
