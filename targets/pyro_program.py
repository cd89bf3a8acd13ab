r"""A tilted toy written as a genuine Pyro program: a target *and* an independent oracle.

The program draws one categorical site per token position and adds the log-tilt as a factor,

.. math::

    x_t \sim \mathrm{Categorical}\big(p_{\mathrm{ref}}(\cdot \mid x_{<t})\big),
        \quad t = 0, \dots, L - 1, \qquad
    \texttt{factor}\big(\text{"tilt"},\ \log G(x)\big),

so that its unnormalised joint density is ``p_ref(x) · G(x)`` and its normaliser is

.. math::

    Z \;=\; \sum_{x} p_{\mathrm{ref}}(x)\, G(x), \qquad
    \log G(x) = \texttt{target.log\_tilt}(x)\ \text{on complete responses.}

Encoding. Sites are read through a flattened prefix index
``idx_t = idx_{t-1} · V + x_t`` (``idx_{-1} = 0``), and position ``t`` holds a dense table
``table_t`` of shape ``[V^t, V]`` so that the logits of site ``x_t`` are
``table_t[idx_{t-1}]``. This is ordinary tensor indexing, hence it broadcasts under Pyro's parallel
enumeration. After EOS the program is *absorbing*: a prefix that contains EOS puts a point mass on
EOS (log-probability 0), so a response ``x`` shorter than ``L`` is the trace ``x`` padded with EOS
and has the same probability.
The tilt is a table over the ``V^L`` full indices: each index is decoded to its response (cut after
the first EOS) and scored by ``target.evaluate_tilt``; under ``truncation="condition"`` a response
without EOS is outside the support and gets ``log G = -inf`` (the target's own
``is_complete`` convention).

Uses.

* :class:`PyroProgramPolicy` and :class:`PyroFactorReward` answer the
  :class:`~tiltsample.policy.ReferencePolicy` and :class:`~tiltsample.reward.Reward` protocols by
  *running the program* (conditioned with ``poutine.condition``, stopped with ``poutine.escape``,
  or traced), so :meth:`PyroProgram.as_target` is a :class:`~tiltsample.target.TiltedTarget` that
  every sampler accepts.
* :meth:`PyroProgram.log_z` is the exact ``log Z`` by variable elimination:
  ``TraceEnum_ELBO`` with every site enumerated in parallel and an empty guide gives
  ``ELBO = log Z`` exactly, so ``log Z = -loss``.
* :meth:`PyroProgram.smc_filter` runs ``pyro.infer.SMCFilter`` with ``p_ref`` as the proposal and
  the tilt as a factor at the last step (particles, normalised log-weights, evidence estimate).

Only toys with ``V^L <= 2e5`` are accepted (the tilt table and the enumerated joint are dense).

This module holds the program; the encoding lives in :mod:`tiltsample.targets.pyro_tables`, the
policy and reward views in :mod:`tiltsample.targets.pyro_views` (re-exported here) and the oracles'
Pyro machinery in :mod:`tiltsample.targets.pyro_oracles`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.target import TRUNCATIONS, TiltedTarget, Truncation
from tiltsample.targets.pyro_oracles import enumeration_log_z, run_smc_filter
from tiltsample.targets.pyro_tables import (
    MAX_INDEX,
    check_tables,
    cut_response,
    index_digits,
    tabulate_target,
)
from tiltsample.targets.pyro_views import PyroFactorReward, PyroProgramPolicy
from tiltsample.types import Seq

__all__ = [
    "MAX_INDEX",
    "PyroFactorReward",
    "PyroProgram",
    "PyroProgramPolicy",
    "SMCFilterResult",
]

_QUERY_BATCH = 4096


class SMCFilterResult(NamedTuple):
    """What :meth:`PyroProgram.smc_filter` returns (unpacks as a 3-tuple)."""

    particles: list[Seq]
    """Final particles as responses (cut after the first EOS)."""
    log_weights: Tensor
    """``[N]`` float64 normalised log-weights (``logsumexp = 0``; ``-inf`` for dead particles)."""
    log_evidence: float | None
    """The SMC estimate ``log Ẑ`` (unbiased for ``Z`` in ``Z``, not in ``log Z``)."""


class PyroProgram:
    r"""A tabular tilted toy as a Pyro program (see the module docstring for the encoding).

    Parameters
    ----------
    vocab_size
        ``V >= 2`` (EOS included).
    eos_id
        The EOS id.
    tables
        ``L >= 1`` float64 tensors; ``tables[t]`` has shape ``[V^t, V]`` and row ``i`` holds the
        normalised next-token log-probabilities after the prefix whose flattened index is ``i``
        (``idx = Σ_s x_s V^{t-1-s}``). Rows of prefixes that contain EOS must be the absorbing
        point mass on EOS (``0`` at EOS, ``-inf`` elsewhere).
    tilt
        ``[V^L]`` float64 log-tilt of every full index (``-inf`` allowed, no NaN or ``+inf``).
    truncation
        The length convention of :meth:`as_target` (``"stop"`` or ``"condition"``); ``tilt`` must
        already encode it (``-inf`` on EOS-free responses for ``"condition"``).
    prompt
        The prompt of :meth:`as_target` (the program itself has a single context and ignores it).

    Notes
    -----
    Usually built with :meth:`from_target`. The program is deterministic given its sites: the
    policy and the reward condition every site they need and never sample, so they leave torch's
    global RNG untouched. Calling :meth:`model` unconditioned samples with the global RNG, as any
    Pyro model does.
    """

    def __init__(
        self,
        vocab_size: int,
        eos_id: int,
        tables: Sequence[Tensor],
        tilt: Tensor,
        truncation: Truncation = "stop",
        prompt: Seq = (),
    ) -> None:
        vocab = validation.positive_int("vocab_size", vocab_size)
        if vocab < 2:
            raise ValueError(f"vocab_size must be >= 2 (EOS plus one token), got {vocab}")
        eos = validation.token_id("eos_id", eos_id, vocab)
        validation.one_of("truncation", truncation, TRUNCATIONS)
        checked, tilt = check_tables(vocab, eos, tables, tilt)
        length = len(checked)
        self._vocab = vocab
        self._eos = eos
        self._length = length
        self._tables: tuple[Tensor, ...] = tuple(checked)
        self._tilt = tilt
        self._truncation: Truncation = truncation
        self._prompt: Seq = tuple(int(v) for v in prompt)
        self._policy = PyroProgramPolicy(self)
        self._reward = PyroFactorReward(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_target(cls, target: TiltedTarget, batch: int = _QUERY_BATCH) -> PyroProgram:
        r"""Tabulate an enumerable target into a program with the same law.

        Parameters
        ----------
        target
            A :class:`~tiltsample.target.TiltedTarget` whose policy answers ``next_logprobs`` on
            every EOS-free prefix shorter than ``L = target.max_new_tokens`` (tabular toys).
        batch
            Prefixes per ``next_logprobs`` call while tabulating.

        Returns
        -------
        PyroProgram
            ``table_t[idx(x_{<t})] = log p_ref(· | y, x_{<t})`` for EOS-free prefixes (absorbing
            rows otherwise) and, for every full index with response ``x``,
            ``tilt = log_tilt(x)`` if ``x`` is complete with ``p_ref(x) > 0``, ``0`` if complete
            but unreachable (the value never matters), ``-inf`` if not complete (only possible
            under ``truncation="condition"``).

        Raises
        ------
        ValueError
            If ``V^L`` exceeds :data:`MAX_INDEX`, or the policy lacks a prefix.
        """
        if not isinstance(target, TiltedTarget):
            raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
        validation.positive_int("batch", batch)
        tables, tilt = tabulate_target(target, batch)
        return cls(target.vocab_size, target.eos_id, tables, tilt, target.truncation, target.prompt)

    # ------------------------------------------------------------------ structure
    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def max_len(self) -> int:
        """``L``: the number of token sites ``x_0 .. x_{L-1}``."""
        return self._length

    @property
    def truncation(self) -> Truncation:
        return self._truncation

    @property
    def prompt(self) -> Seq:
        return self._prompt

    @property
    def tables(self) -> tuple[Tensor, ...]:
        """The per-position next-token tables (copies)."""
        return tuple(t.clone() for t in self._tables)

    @property
    def tilt_table(self) -> Tensor:
        """The ``[V^L]`` log-tilt table over full indices (a copy)."""
        return self._tilt.clone()

    @property
    def policy(self) -> PyroProgramPolicy:
        """``p_ref`` read off the program (:class:`PyroProgramPolicy`)."""
        return self._policy

    @property
    def reward(self) -> PyroFactorReward:
        """The summed ``pyro.factor`` sites, i.e. the log-tilt with ``lam = 1``."""
        return self._reward

    def as_target(self) -> TiltedTarget:
        """``TiltedTarget(policy, reward, lam=1, max_new_tokens=L, truncation=...)``."""
        return TiltedTarget(
            self._policy,
            self._reward,
            lam=1.0,
            prompt=self._prompt,
            max_new_tokens=self._length,
            truncation=self._truncation,
            meta={"kind": "pyro_program"},
        )

    def decode(self, index: int) -> Seq:
        """The response of a full index ``idx_{L-1}`` (cut after the first EOS)."""
        if not 0 <= int(index) < self._vocab**self._length:
            raise ValueError(f"index must lie in [0, V^L={self._vocab**self._length}), got {index}")
        row = index_digits(torch.tensor([int(index)]), self._length, self._vocab)[0]
        return cut_response(row.tolist(), self._eos)

    # ------------------------------------------------------------------ the Pyro model
    def model(self) -> None:
        r"""The Pyro model: ``x_t ~ Categorical(logits=table_t[idx_{t-1}])``, then the tilt factor.

        Sites ``"x_0" .. f"x_{L-1}"`` (long tensors) and the factor ``"tilt"``
        (``log G(x) = tilt[idx_{L-1}]``). Indexing broadcasts, so the model runs unchanged under
        parallel enumeration, with batched conditioned values, or inside a particle plate.
        """
        vocab = self._vocab
        idx = torch.zeros((), dtype=torch.long)
        for t, table in enumerate(self._tables):
            x = pyro.sample(f"x_{t}", dist.Categorical(logits=table[idx]))
            idx = idx * vocab + x.long()
        pyro.factor("tilt", self._tilt[idx])

    # ------------------------------------------------------------------ oracles
    def log_z(self) -> float:
        r"""Exact ``log Z = log Σ_x p_ref(x) G(x)`` by Pyro's enumeration.

        Every site is enumerated in parallel (``config_enumerate(model, "parallel")``), the guide is
        empty and ``max_plate_nesting = 0``, so ``TraceEnum_ELBO`` contracts the whole joint
        exactly: ``ELBO = log Z`` and ``log Z = -loss`` (float64; ``-inf`` if every response is
        outside the support). The log-space contraction clamps its shifts, so ``-inf`` entries
        never produce NaN.
        """
        return enumeration_log_z(self.model)

    def smc_filter(
        self,
        num_particles: int,
        generator: torch.Generator,
        *,
        ess_threshold: float = 0.5,
    ) -> SMCFilterResult:
        r"""Particles for the tilted target by ``pyro.infer.SMCFilter``.

        Target
            ``pi(x) ∝ p_ref(x) G(x)``.
        Proposal
            The guide draws ``x_t ~ p_ref(· | x_{<t})`` from the same tables; the model replays it,
            so the incremental weight is ``p/q = 1`` at every token step and ``G(x)`` (the
            ``"tilt"`` factor) at the last one. Adaptive (systematic) resampling when
            ``ESS < ess_threshold · N``.
        Weights
            Returned normalised, in float64. ``log_evidence`` is the standard SMC estimate
            ``log Ẑ = Σ_t log Σ_i W^i_{t-1} w^i_t`` (unbiased for ``Z``); with this proposal it is
            the importance-sampling estimate ``log mean_i G(x^i)``.

        Parameters
        ----------
        num_particles
            ``N >= 1``.
        generator
            Source of randomness. ``SMCFilter`` draws from torch's global RNG, so the run happens
            inside ``torch.random.fork_rng`` seeded from one draw of ``generator``: the global state
            is untouched afterwards and the same generator state gives identical particles.
        ess_threshold
            In ``(0, 1]``, as in ``SMCFilter``.

        Raises
        ------
        pyro.infer.smcfilter.SMCFailed
            If every particle leaves the support (e.g. no particle ends with EOS under
            ``truncation="condition"``).
        """
        n = validation.positive_int("num_particles", num_particles)
        validation.generator("generator", generator)
        ess_threshold = validation.unit_interval("ess_threshold", ess_threshold)
        if ess_threshold == 0.0:
            raise ValueError("ess_threshold must lie in (0, 1], got 0")
        index, log_w, log_evidence = run_smc_filter(
            self._tables, self._tilt, n, generator, ess_threshold
        )
        particles = [self.decode(i) for i in index.tolist()]
        return SMCFilterResult(particles, log_w, log_evidence)

    def __repr__(self) -> str:
        return (
            f"PyroProgram(V={self._vocab}, eos={self._eos}, L={self._length}, "
            f"truncation={self._truncation!r})"
        )
