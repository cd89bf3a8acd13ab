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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SMCFilter, TraceEnum_ELBO, config_enumerate
from pyro.poutine.runtime import NonlocalExit
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from tiltsample import validation
from tiltsample.policy import DecodeSession, PrefixSession, sequence_logprob_from_next
from tiltsample.target import TRUNCATIONS, TiltedTarget, Truncation
from tiltsample.types import Seq

__all__ = [
    "MAX_INDEX",
    "PyroFactorReward",
    "PyroProgram",
    "PyroProgramPolicy",
    "SMCFilterResult",
]

MAX_INDEX = 200_000
"""Largest accepted ``V^L`` (number of full token tuples the dense tilt table covers)."""

_QUERY_BATCH = 4096
_NORMALISATION_TOL = 1e-9


def _digits(index: Tensor, length: int, vocab: int) -> Tensor:
    """Base-``vocab`` digits of flattened indices, most significant first: ``[N, length]``."""
    powers = vocab ** torch.arange(length - 1, -1, -1, dtype=torch.long)
    return (index[:, None] // powers) % vocab


def _cut(tokens: Sequence[int], eos_id: int) -> Seq:
    """The response a padded token tuple stands for: tokens up to and including the first EOS."""
    out = tuple(int(v) for v in tokens)
    if eos_id in out:
        return out[: out.index(eos_id) + 1]
    return out


def _empty_guide() -> None:
    """The empty guide of :meth:`PyroProgram.log_z`: every latent site is enumerated."""
    return None


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
        length = len(tables)
        if length < 1:
            raise ValueError("tables must hold at least one position (max_len >= 1)")
        _check_size(vocab, length)
        checked: list[Tensor] = []
        for t, table in enumerate(tables):
            table = torch.as_tensor(table, dtype=torch.float64)
            if tuple(table.shape) != (vocab**t, vocab):
                raise ValueError(
                    f"tables[{t}] must have shape (V^{t}={vocab**t}, V={vocab}), "
                    f"got {tuple(table.shape)}"
                )
            if bool(torch.isnan(table).any()) or bool((table == torch.inf).any()):
                raise ValueError(f"tables[{t}] contains NaN or +inf")
            worst = float((torch.logsumexp(table, dim=1)).abs().max())
            if not worst < _NORMALISATION_TOL:
                raise ValueError(
                    f"tables[{t}] has rows that are not normalised (|logsumexp|={worst:.3g})"
                )
            if t > 0:
                has_eos = (_digits(torch.arange(vocab**t), t, vocab) == eos).any(dim=1)
                absorbing = torch.full((vocab,), -torch.inf, dtype=torch.float64)
                absorbing[eos] = 0.0
                if not bool((table[has_eos] == absorbing).all()):
                    raise ValueError(
                        f"tables[{t}]: rows of prefixes that contain EOS must be the point mass "
                        "on EOS (the program is absorbing after EOS)"
                    )
            checked.append(table)
        tilt = torch.as_tensor(tilt, dtype=torch.float64)
        if tuple(tilt.shape) != (vocab**length,):
            raise ValueError(
                f"tilt must have shape (V^L={vocab**length},), got {tuple(tilt.shape)}"
            )
        if bool(torch.isnan(tilt).any()) or bool((tilt == torch.inf).any()):
            raise ValueError("tilt contains NaN or +inf (log-tilts are finite or -inf)")
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
        vocab, eos, length = target.vocab_size, target.eos_id, target.max_new_tokens
        _check_size(vocab, length)
        tables = [_tabulate_position(target, t, batch) for t in range(length)]

        # Tilt table: decode every full index, canonicalise (EOS after the first EOS), score once.
        n_full = vocab**length
        digits = _digits(torch.arange(n_full), length, vocab)
        is_eos = (digits == eos).long()
        after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
        canonical = torch.where(after_eos, torch.full_like(digits, eos), digits)
        powers = vocab ** torch.arange(length - 1, -1, -1, dtype=torch.long)
        unique, inverse = torch.unique((canonical * powers).sum(dim=1), return_inverse=True)
        responses = [_cut(row, eos) for row in _digits(unique, length, vocab).tolist()]
        values = torch.full((len(responses),), -torch.inf, dtype=torch.float64)
        complete = [i for i, x in enumerate(responses) if target.is_complete(x)]
        if complete:
            log_ref = target.log_reference([responses[i] for i in complete])
            reachable = log_ref > -torch.inf
            rows = torch.tensor(complete, dtype=torch.long)
            values[rows[~reachable]] = 0.0
            live = rows[reachable].tolist()
            if live:
                scores = target.evaluate_tilt(
                    [responses[i] for i in live], log_reference=log_ref[reachable]
                )
                values[live] = scores.log_tilt
        return cls(vocab, eos, tables, values[inverse], target.truncation, target.prompt)

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
        row = _digits(torch.tensor([int(index)]), self._length, self._vocab)[0]
        return _cut(row.tolist(), self._eos)

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

    def _site_before(self, t: int, data: dict[str, Tensor]) -> Any:
        """Run the program conditioned on ``data`` and stop at site ``x_t`` (nothing is sampled)."""
        name = f"x_{t}"

        def escape_fn(msg: Any) -> bool:
            return bool(msg["type"] == "sample" and msg["name"] == name)

        program = poutine.escape(poutine.condition(self.model, data=data), escape_fn=escape_fn)
        try:
            with poutine.block():
                program()
        except NonlocalExit as stop:
            return stop.site
        raise RuntimeError(f"the program finished without reaching site {name!r}")

    def _factor_sum(self, padded: Tensor) -> Tensor:
        """Sum of the factor sites of the program conditioned on full token rows ``[B, L]``."""
        batch = padded.shape[0]
        data = {f"x_{t}": padded[:, t] for t in range(self._length)}
        with poutine.block():
            trace = poutine.trace(poutine.condition(self.model, data=data)).get_trace()
        total = torch.zeros(batch, dtype=torch.float64)
        for site in trace.nodes.values():
            if site["type"] == "sample" and isinstance(site["fn"], dist.Unit):
                log_factor = site["fn"].log_prob(site["value"]).to(torch.float64)
                total = total + log_factor.expand(batch)
        return total

    # ------------------------------------------------------------------ oracles
    def log_z(self) -> float:
        r"""Exact ``log Z = log Σ_x p_ref(x) G(x)`` by Pyro's enumeration.

        Every site is enumerated in parallel (``config_enumerate(model, "parallel")``), the guide is
        empty and ``max_plate_nesting = 0``, so ``TraceEnum_ELBO`` contracts the whole joint
        exactly: ``ELBO = log Z`` and ``log Z = -loss`` (float64; ``-inf`` if every response is
        outside the support). The log-space contraction clamps its shifts, so ``-inf`` entries
        never produce NaN.
        """
        elbo = TraceEnum_ELBO(max_plate_nesting=0)
        loss = elbo.loss(config_enumerate(self.model, default="parallel"), _empty_guide)
        return -float(loss)

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
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            smc = _EvidenceSMCFilter(
                _SMCModel(self, n),
                _SMCGuide(self),
                n,
                max_plate_nesting=0,
                ess_threshold=ess_threshold,
            )
            smc.init()
            for t in range(self._length):
                smc.step(t)
            index = smc.state["idx"].clone()
            log_w = smc.get_empirical()["idx"].log_weights.to(torch.float64)
        log_w = log_w - torch.logsumexp(log_w, dim=0)
        particles = [self.decode(i) for i in index.tolist()]
        return SMCFilterResult(particles, log_w, smc.log_evidence)

    def __repr__(self) -> str:
        return (
            f"PyroProgram(V={self._vocab}, eos={self._eos}, L={self._length}, "
            f"truncation={self._truncation!r})"
        )


def _check_size(vocab: int, length: int) -> None:
    if vocab**length > MAX_INDEX:
        raise ValueError(
            f"a PyroProgram tabulates all V^L full token tuples; vocab_size={vocab}, "
            f"max_new_tokens={length} gives {vocab}^{length} = {vocab**length} > {MAX_INDEX}. "
            "Use a smaller toy."
        )


def _tabulate_position(target: TiltedTarget, t: int, batch: int) -> Tensor:
    """``table_t``: policy rows for EOS-free prefixes of length ``t``, absorbing rows otherwise."""
    vocab, eos = target.vocab_size, target.eos_id
    table = torch.full((vocab**t, vocab), -torch.inf, dtype=torch.float64)
    table[:, eos] = 0.0
    digits = _digits(torch.arange(vocab**t), t, vocab)
    free = (~(digits == eos).any(dim=1)).nonzero().flatten()
    for start in range(0, free.numel(), batch):
        rows = free[start : start + batch]
        prefixes = [tuple(p) for p in digits[rows].tolist()]
        try:
            lp = target.policy.next_logprobs(target.prompt, prefixes)
        except (KeyError, IndexError) as err:
            raise ValueError(
                "PyroProgram.from_target needs next_logprobs on every EOS-free prefix shorter "
                f"than max_new_tokens={target.max_new_tokens}; the policy failed at length {t}: "
                f"{err}"
            ) from err
        if tuple(lp.shape) != (len(prefixes), vocab):
            raise ValueError(
                f"policy.next_logprobs returned shape {tuple(lp.shape)}, "
                f"expected ({len(prefixes)}, {vocab})"
            )
        table[rows] = lp.to(torch.float64)
    return table


class PyroProgramPolicy:
    """The :class:`~tiltsample.policy.ReferencePolicy` of a :class:`PyroProgram`.

    ``next_logprobs`` runs the program conditioned on the prefix (``poutine.condition`` on
    ``x_0 .. x_{t-1}``), stops at site ``x_t`` (``poutine.escape``) and returns
    ``fn.log_prob(v)`` for every ``v`` in the support of that site's distribution. One program run
    serves all prefixes of one length (conditioned values are batched). Nothing is sampled; the
    prompt is ignored (a toy has one context). Prefixes may contain EOS (the program then reports
    the absorbing point mass on EOS) but must be shorter than ``max_len``.
    """

    def __init__(self, program: PyroProgram) -> None:
        self._program = program

    @property
    def vocab_size(self) -> int:
        return self._program.vocab_size

    @property
    def eos_id(self) -> int:
        return self._program.eos_id

    @property
    def max_len(self) -> int:
        return self._program.max_len

    @property
    def program(self) -> PyroProgram:
        return self._program

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        """``[B, V]`` float64 log-probabilities of site ``x_t`` given ``x_{<t} = prefix``."""
        vocab, length = self.vocab_size, self.max_len
        rows = [tuple(int(v) for v in p) for p in prefixes]
        groups: dict[int, list[int]] = {}
        for i, prefix in enumerate(rows):
            if len(prefix) >= length:
                raise ValueError(
                    f"prefixes[{i}] has {len(prefix)} tokens; the program has sites x_0..x_"
                    f"{length - 1}, so prefixes must be shorter than max_len={length}"
                )
            if any(not 0 <= v < vocab for v in prefix):
                raise ValueError(f"prefixes[{i}] has token ids outside [0, vocab_size={vocab})")
            groups.setdefault(len(prefix), []).append(i)
        out = torch.empty((len(rows), vocab), dtype=torch.float64)
        for t, members in groups.items():
            data = {
                f"x_{s}": torch.tensor([rows[i][s] for i in members], dtype=torch.long)
                for s in range(t)
            }
            fn = self._program._site_before(t, data)["fn"]
            support = fn.enumerate_support(expand=False)  # [V, 1, ...]
            lp = fn.log_prob(support).to(torch.float64)  # [V, *batch_shape]
            out[members] = lp.reshape(vocab, -1).T.expand(len(members), vocab)
        return out

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        """``Σ_t log p(x_t | x_<t)`` through :meth:`next_logprobs` (one program run per length)."""
        return sequence_logprob_from_next(self, prompt, xs, per_token)

    def session(self, prompt: Seq, batch: int) -> DecodeSession:
        """A stateless session with ideal-KV-cache accounting (the program is table-backed)."""
        return PrefixSession(self, prompt, batch, accounting="cached")

    def __repr__(self) -> str:
        return f"PyroProgramPolicy({self._program!r})"


class PyroFactorReward:
    """The :class:`~tiltsample.reward.Reward` of a :class:`PyroProgram`: its summed factors.

    For each complete response ``x`` (ending with EOS, or of ``max_len`` tokens) the program is
    conditioned on ``x`` padded with EOS to ``max_len`` tokens and traced; the reward is the sum of
    ``log_prob`` over the factor sites (``pyro.factor``, i.e. ``Unit`` sites), which is
    ``log G(x)`` — the log-tilt at ``lam = 1``. Returns ``[B]`` float64; nothing is sampled.
    """

    def __init__(self, program: PyroProgram) -> None:
        self._program = program

    @property
    def program(self) -> PyroProgram:
        return self._program

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        program = self._program
        vocab, eos, length = program.vocab_size, program.eos_id, program.max_len
        rows = [tuple(int(v) for v in x) for x in xs]
        if not rows:
            return torch.zeros(0, dtype=torch.float64)
        padded = torch.full((len(rows), length), eos, dtype=torch.long)
        for i, x in enumerate(rows):
            if len(x) > length:
                raise ValueError(f"xs[{i}] has {len(x)} tokens > max_len={length}")
            if any(not 0 <= v < vocab for v in x):
                raise ValueError(f"xs[{i}] has token ids outside [0, vocab_size={vocab})")
            if eos in x[:-1]:
                raise ValueError(f"xs[{i}] has tokens after EOS")
            if len(x) < length and (not x or x[-1] != eos):
                raise ValueError(
                    f"xs[{i}] is not a complete response (must end with EOS or have "
                    f"max_len={length} tokens)"
                )
            padded[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        return program._factor_sum(padded)

    def __repr__(self) -> str:
        return f"PyroFactorReward({self._program!r})"


# ---------------------------------------------------------------------- SMCFilter model / guide
class _SMCModel:
    """``SMCFilter`` model: state ``idx`` (flattened prefix index per particle)."""

    def __init__(self, program: PyroProgram, num_particles: int) -> None:
        self.program = program
        self.num_particles = num_particles

    def init(self, state: Any) -> None:
        state["idx"] = torch.zeros(self.num_particles, dtype=torch.long)

    def step(self, state: Any, t: int) -> None:
        program = self.program
        logits = program._tables[t][state["idx"]]
        x = pyro.sample(f"x_{t}", dist.Categorical(logits=logits))
        state["idx"] = state["idx"] * program.vocab_size + x.long()
        if t == program.max_len - 1:
            pyro.factor("tilt", program._tilt[state["idx"]])


class _SMCGuide:
    """``SMCFilter`` guide: proposes ``x_t`` from ``p_ref`` (reads the state, never writes)."""

    def __init__(self, program: PyroProgram) -> None:
        self.program = program

    def init(self, state: Any) -> None:
        return None

    def step(self, state: Any, t: int) -> None:
        logits = self.program._tables[t][state["idx"]]
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
