r"""Sequential Monte Carlo for tilted sequence targets (``specs/smc.md``).

Target
    ``pi(x) ∝ p_ref(x) G(x)``, ``G = exp(log_tilt)``, under the target's length convention
    (``truncation="stop"``: EOS or the cap ends a response; ``"condition"``: only EOS-terminated
    responses, EOS forced at the last position with the factor ``p_ref(EOS | x_<L)`` in the weight).
Intermediate targets
    ``gamma_t(x_{1:t}) = p_ref(x_{1:t}) psi(x_{1:t})`` with a twist ``psi`` from
    :mod:`tiltsample.samplers.twists` (``twist="none" | "prefix" | "lookahead"`` or any
    :class:`~tiltsample.samplers.twists.Twist`); ``psi = G`` on complete responses, always.
Proposal
    ``proposal="reference"``: ``q = softmax(log p_ref / temperature)`` over the full vocabulary
    (``temperature = 1`` is ``p_ref``). ``proposal="optimal"``: the twist-induced, locally optimal
    ``q(v | s) ∝ p_ref(v | s) psi(s + v)`` (it needs the vocabulary-wide twist vector); its
    incremental weight does not depend on the drawn token, so it is computed *before* the draw and
    resampling happens before the next token is drawn (fully adapted).
Weights
    Block steps of ``block_size = B`` tokens; per block and particle (log space)

    .. math::

        \log w \mathrel{+}= \sum_{\text{block}} (\log p - \log q) + \log\psi_{new} - \log\psi_{old}

    (reference proposal), or ``log sum_v p(v | s) psi(s + v) - log psi(s)`` per token (optimal
    proposal). Twist values are drawn once per particle and prefix and stored, so random twists
    telescope and the final target stays exact. Steps without resampling *accumulate* (the
    FK-steering pitfall of §10); finished particles keep their weight and take part in resampling.
Resampling
    Adaptive: in each run, when ``ESS < ess_threshold · N`` (``1`` = every block, ``0`` = never)
    with one of the schemes of :mod:`tiltsample.resampling`; ancestors reorder the decode session
    (``session.select``), so shared prefixes are never re-encoded.
Resample-move
    After every block (a schedule that depends on ``t`` only, whether or not the run resampled),
    ``num_moves`` Metropolis–Hastings moves per unfinished particle that leave the current
    intermediate target ``gamma_t`` invariant. ``gamma_t`` lives on the stopped states (complete
    responses of length ``<= t``, unfinished prefixes of length ``t``); the moves keep that
    status: a finished particle is left as it is, an unfinished one draws its own cut ``j``
    (``move_cut="uniform"``: uniform on ``[0, t)``, the same law for every unfinished particle, so
    it cancels; ``"entropy_jump"``: ``c_x(j) ∝ max(0, H_j - H_{j-1})^beta`` over its ``t``
    positions, ``H_j`` the entropy of ``p_ref(. | x_<j)``), regenerates ``x_{j:t}`` from
    ``q'`` = ``p_ref`` at ``move_temperature`` with EOS removed (renormalised), and accepts with
    ``min(1, gamma_t(x') q'(x_{j:t}) c_{x'}(j) / (gamma_t(x) q'(x'_{j:t}) c_x(j)))``; random
    twists enter as a pseudo-marginal ratio ``psi^(x')/psi^(x)`` with a fresh estimate for
    ``x'`` (§8). The kernel is ``gamma_t``-reversible on each class, so it is invariant whichever
    particles have finished, and since a finished particle never moves again, ending a run when
    all its particles have finished is exact. Moving only after an ESS-triggered resampling, or
    letting a move finish a particle that is then never moved back (the kernel and schedule
    before issue 13), ties the moves to the particles' state and biases the weighted law.
    Cuts and proposals are drawn per particle, so runs sharing a session are independent.
Evidence
    ``log Ẑ = sum_epochs (logsumexp(log w) - log N)``, unbiased for ``Z`` (Del Moral 2004) for any
    scheme, threshold and twist; ``-inf`` (not NaN) when every weight of a run is zero. Two
    equivalent bookkeeping conventions (§6): ``convention="reset"`` (A: add the epoch's log-mean to
    ``log Z`` and reset the weights) and ``"mean"`` (B: set every weight to the log-mean and read
    ``log Ẑ`` at the end).
Exactness
    Consistent (bias and MSE ``O(1/N)``) and unbiased for every configuration, moves included:
    ``E[Ẑ · W(x)] = Z pi(x)`` for every response ``x`` (``W`` the run's normalised weights), hence
    ``E[Ẑ] = Z`` (tested cell by cell on exact toys). With the exact
    twist and the optimal proposal every incremental weight is deterministic and ``log Ẑ = log Z``
    in every run (zero variance).
Cost per block
    ``B`` batched model calls plus, per move, one call per regenerated position for each distinct
    cut and one rewrite of the session from the smallest accepted cut; the twist's cost (per
    incomplete particle per block, per child with ``proposal="optimal"``) and one reward call per
    tilt term per finished particle (per EOS child with the optimal proposal). Resampling costs no
    forward tokens.

Many independent runs can share one session (``num_particles`` per run,
``num_samples / num_particles`` runs): the result then pools the runs with each run's weights
normalised, so its empirical law is the average of the runs' normalised histograms, and
``meta["log_evidence_runs"]`` holds each run's ``log Ẑ``. The runs share no random draw
(resampling uniforms, cuts and proposals are drawn per run or per particle) and never wait on
each other's state, so they are independent and standard errors over them are honest.

References
----------
Del Moral (2004), *Feynman–Kac formulae*; Chopin & Papaspiliopoulos (2020), *An Introduction to
Sequential Monte Carlo*; Naesseth, Lindsten & Schön (2019); Gilks & Berzuini (2001), resample-move;
Lew et al., arXiv 2306.03081 (2023); Zhao et al., arXiv 2404.17546 (2024); Markovic-Voronov et al.,
arXiv 2604.16453 (2026).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import entropy as _entropy
from tiltsample.decoding import rows_to_seqs
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.policy import DecodeSession, open_session
from tiltsample.resampling import SCHEMES, resample_indices
from tiltsample.results import SampleSet
from tiltsample.reward import PrefixPotential
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.mh import cut_log_probs
from tiltsample.samplers.twists import Twist, check_twist_output, make_twist
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "CONVENTIONS",
    "MOVE_CUTS",
    "PROPOSALS",
    "SMCConfig",
    "SMCInfo",
    "SMCState",
    "batched_resample",
    "build_kernel",
    "done",
    "ess_rows",
    "init",
    "kernel_from_config",
    "log_evidence_runs",
    "make_config",
    "rejuvenate",
    "result",
    "run",
    "sampler",
    "state_from_sequences",
]

PROPOSALS = ("reference", "optimal")
MOVE_CUTS = ("uniform", "entropy_jump")
CONVENTIONS = ("reset", "mean")


class SMCConfig(NamedTuple):
    """Validated SMC configuration (closed over by :func:`build_kernel`)."""

    twist: Twist
    proposal: str
    temperature: float
    block_size: int
    ess_threshold: float
    resampling: str
    num_moves: int
    move_temperature: float
    convention: str
    move_cut: str = "uniform"
    move_cut_power: float = 4.0


class SMCState(NamedTuple):
    """Particles of ``num_groups`` independent runs of ``num_particles`` each, in one session.

    Row ``g * num_particles + i`` is particle ``i`` of run ``g``. Every row holds its whole path
    (the session is reordered at each resampling), so no ancestry needs tracing back.
    """

    target: TiltedTarget
    num_particles: int
    num_groups: int
    session: DecodeSession
    finished: Tensor
    """``[M]`` bool: the particle is a complete response."""
    log_p: Tensor
    """``[M]`` ``log p_ref`` of the particle (temperature 1; a forced EOS included)."""
    tok_log_p: Tensor
    """``[M, t]`` per-token ``log p_ref`` (0 on padding)."""
    tok_log_q_move: Tensor
    """``[M, t]`` per-token log-prob under the moves' EOS-free proposal ``q'`` (0 on EOS, padding
    and a forced EOS)."""
    log_psi: Tensor
    """``[M]`` stored log-twist of the current prefix (the true log-tilt once finished)."""
    pending: Tensor | None
    """``[M, V]`` log-twists of the children (optimal proposal: drawn, not yet used)."""
    pending_reward: Tensor | None
    """``[M, V]`` primary reward of complete children (NaN elsewhere)."""
    log_next: Tensor | None
    """``[M]`` ``log sum_v p(v|s) psi(s+v)``: the potential of the fully adapted target."""
    reward: Tensor
    """``[M]`` primary reward of finished particles (NaN until finished)."""
    log_w: Tensor
    """``[M]`` current-epoch log-weights."""
    log_z: Tensor
    """``[G]`` accumulated ``log Ẑ`` of completed epochs (convention A)."""
    reference: Tensor | None
    """``[G, L]`` conditional-SMC reference paths (EOS-padded), particle 0 of each run."""
    steps: int
    resample_count: Tensor
    """``[G]`` number of resampling events per run."""
    ess_history: tuple[Tensor, ...]
    """``[G]`` ESS before each resampling decision (NaN for a run with nothing left to do)."""
    moves_proposed: int
    moves_accepted: int
    cost: Cost
    tok_entropy: Tensor | None = None
    """``[M, t]`` Shannon entropy of ``p_ref(. | x_<s)`` at every position (0 on padding): the
    entropy-jump cut law of the moves."""


class SMCInfo(NamedTuple):
    """What one block step reports."""

    cost: Cost
    ess: Tensor
    """``[G]`` ESS at the resampling decision (NaN when the run had finished)."""
    resampled: Tensor
    """``[G]`` bool."""


# --------------------------------------------------------------------------- configuration
def make_config(
    *,
    twist: str | Twist = "prefix",
    potential: PrefixPotential | None = None,
    num_rollouts: int | None = None,
    rollout_temperature: float = 1.0,
    proposal: str = "reference",
    temperature: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    num_moves: int = 0,
    move_temperature: float | None = None,
    convention: str = "reset",
    move_cut: str = "uniform",
    move_cut_power: float = 4.0,
) -> SMCConfig:
    """Validate the SMC parameters (see :func:`sampler`)."""
    tw = make_twist(twist, potential, num_rollouts, rollout_temperature)
    proposal = validation.one_of("proposal", proposal, PROPOSALS)
    temperature = validation.positive_float("temperature", temperature)
    if proposal == "optimal" and temperature != 1.0:
        raise ValueError(
            "temperature applies to proposal='reference' only; the optimal proposal is "
            f"p_ref·psi (got temperature={temperature})"
        )
    block_size = validation.positive_int("block_size", block_size)
    ess_threshold = validation.unit_interval("ess_threshold", ess_threshold)
    resampling = validation.one_of("resampling", resampling, SCHEMES)
    num_moves = validation.non_negative_int("num_moves", num_moves)
    if move_temperature is None:
        move_temperature = temperature
    move_temperature = validation.positive_float("move_temperature", move_temperature)
    convention = validation.one_of("convention", convention, CONVENTIONS)
    move_cut = validation.one_of("move_cut", move_cut, MOVE_CUTS)
    move_cut_power = validation.positive_float("move_cut_power", move_cut_power)
    return SMCConfig(
        tw,
        proposal,
        temperature,
        block_size,
        ess_threshold,
        resampling,
        num_moves,
        move_temperature,
        convention,
        move_cut,
        move_cut_power,
    )


# --------------------------------------------------------------------------- helpers
def _add_log(log_w: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """``log_w + numerator - denominator`` with zero weights kept at ``-inf`` (never NaN).

    A finite weight over a ``-inf`` denominator can only arise for a conditional-SMC reference path
    the proposal cannot produce; it is given weight zero.
    """
    out = log_w + numerator - denominator
    dead = torch.isneginf(log_w) | torch.isneginf(numerator) | torch.isneginf(denominator)
    return torch.where(dead, torch.full_like(out, -math.inf), out)


def _cost_delta(after: Cost, before: Cost) -> Cost:
    """``after - before`` for the monotone counters of one session."""
    return Cost(
        after.generated_tokens - before.generated_tokens,
        after.forward_tokens - before.forward_tokens,
        after.model_calls - before.model_calls,
        after.reward_calls - before.reward_calls,
    )


def ess_rows(log_w: Tensor) -> Tensor:
    """Kong's ESS of every row of ``[G, N]`` log-weights (0 for a row of zero weights)."""
    num = 2 * torch.logsumexp(log_w, dim=1)
    den = torch.logsumexp(2 * log_w, dim=1)
    out = torch.exp(num - den)
    return torch.where(torch.isfinite(num), out, torch.zeros_like(out))


def batched_resample(scheme: str, generator: torch.Generator, weights: Tensor) -> Tensor:
    """Ancestors ``[G, N]`` for ``G`` runs at once (normalised ``weights [G, N]``).

    One run uses :func:`tiltsample.resampling.resample_indices` itself; several runs use the same
    rules vectorised (multinomial, stratified, systematic) or a loop over the core function
    (residual). Every scheme has ``E[#copies of i] = N W_i``.
    """
    groups, n = weights.shape
    if groups == 1 or scheme == "residual":
        return torch.stack([resample_indices(scheme, generator, w, n) for w in weights])
    if scheme == "multinomial":
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    if scheme == "stratified":
        u0 = torch.rand((groups, n), generator=generator, dtype=torch.float64)
    else:  # systematic
        u0 = torch.rand((groups, 1), generator=generator, dtype=torch.float64).expand(-1, n)
    u = (torch.arange(n, dtype=torch.float64)[None, :] + u0) / n
    cdf = torch.cumsum(weights.to(torch.float64), dim=1)
    cdf[:, -1] = 1.0  # guard against round-off
    return torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=n - 1)


def _conditional_resample(scheme: str, generator: torch.Generator, weights: Tensor) -> Tensor:
    """Conditional ancestors ``[G, N]``: particle 0 of each run keeps its lineage.

    Vectorised over the runs, with the laws of :mod:`tiltsample.resampling`'s conditional schemes
    (the symmetrised scheme given ``A_0 = 0``; a reference of weight 0 falls back to the
    conditional multinomial scheme): multinomial draws the other slots freely; systematic and
    stratified size-bias the stratum that hits particle 0's interval in a uniformly permuted input
    order; residual forces one residual draw of particle 0 unless the reference is one of its
    deterministic copies. The other ``N - 1`` slots are then a uniform arrangement of the
    multiset minus one copy of 0.
    """
    groups, n = weights.shape
    w = weights.to(torch.float64)
    w = w / w.sum(dim=1, keepdim=True)
    anc = torch.zeros((groups, n), dtype=torch.long)
    if n == 1:
        return anc
    if scheme == "multinomial":
        anc[:, 1:] = torch.multinomial(w, n - 1, replacement=True, generator=generator)
        return anc
    zero = w[:, 0] == 0.0
    if bool(zero.any()):  # no conditional law: the other slots draw freely
        anc[zero, 1:] = torch.multinomial(w[zero], n - 1, replacement=True, generator=generator)
    rest = (~zero).nonzero().flatten()
    if rest.numel():
        if scheme == "residual":
            picks = _conditional_residual_rows(generator, w[rest])
        else:
            picks = _conditional_inverse_cdf_rows(generator, w[rest], scheme == "systematic")
        anc[rest] = _arrange_after_reference(generator, picks)
    return anc


def _arrange_after_reference(generator: torch.Generator, picks: Tensor) -> Tensor:
    """``[0, uniform arrangement of the rest]`` for ancestor rows ``[G, N]`` whose column 0 holds
    a copy of ancestor 0."""
    groups, n = picks.shape
    order = torch.argsort(torch.rand((groups, n - 1), generator=generator), dim=1)
    out = torch.zeros_like(picks)
    out[:, 1:] = picks[:, 1:].gather(1, order)
    return out


def _conditional_inverse_cdf_rows(generator: torch.Generator, w: Tensor, shared: bool) -> Tensor:
    """Systematic (``shared``) or stratified ancestors ``[G, N]`` given that particle 0 is drawn,
    with that draw in column 0 (weights ``[G, N]`` with ``w[:, 0] > 0``)."""
    groups, n = w.shape
    f64 = torch.float64
    tau = torch.argsort(torch.rand((groups, n), generator=generator), dim=1)  # input order
    wt = w.gather(1, tau)
    cdf = torch.cumsum(wt, dim=1)
    cdf[:, -1] = 1.0  # guard against round-off
    r = (tau == 0).to(torch.long).argmax(dim=1)  # where particle 0 sits in that order
    before = torch.cat([torch.zeros((groups, 1), dtype=f64), torch.cumsum(wt, dim=1)], dim=1)
    lo = n * before.gather(1, r[:, None]).squeeze(1)
    hi = lo + n * w[:, 0]
    strata = torch.arange(n, dtype=f64)[None, :]
    overlap = (torch.minimum(strata + 1.0, hi[:, None]) - torch.maximum(strata, lo[:, None])).clamp(
        min=0.0
    )
    k = torch.multinomial(overlap / overlap.sum(dim=1, keepdim=True), 1, generator=generator)
    k = k.squeeze(1)
    kf = k.to(f64)
    start, stop = torch.maximum(kf, lo), torch.minimum(kf + 1.0, hi)
    v = start + (stop - start) * torch.rand(groups, generator=generator, dtype=f64)
    u_k = (v - kf).clamp(min=0.0, max=math.nextafter(1.0, 0.0))
    if shared:
        offsets = u_k[:, None].expand(-1, n).clone()
    else:
        offsets = torch.rand((groups, n), generator=generator, dtype=f64)
        offsets.scatter_(1, k[:, None], u_k[:, None])
    u = (torch.arange(n, dtype=f64)[None, :] + offsets) / n
    pos = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=n - 1)
    pos.scatter_(1, k[:, None], r[:, None])  # point k lies in particle 0's interval
    picks = tau.gather(1, pos)
    # move the reference's draw (column k) to column 0
    first = picks[:, :1].clone()
    picks.scatter_(1, k[:, None], first)
    picks[:, 0] = 0
    return picks


def _conditional_residual_rows(generator: torch.Generator, w: Tensor) -> Tensor:
    """Residual ancestors ``[G, N]`` given that particle 0 is drawn, that draw in column 0
    (weights ``[G, N]`` with ``w[:, 0] > 0``)."""
    groups, n = w.shape
    scaled = n * w
    copies = torch.floor(scaled).long()
    rest = n - copies.sum(dim=1)
    resid = (scaled - copies.to(torch.float64)).clamp(min=0.0)
    u = torch.rand(groups, generator=generator, dtype=torch.float64)
    deterministic = u * scaled[:, 0] < copies[:, 0].to(torch.float64)
    forced = ~deterministic & (rest > 0)  # the reference is a residual draw of particle 0
    free = rest - forced.long()
    counts = copies.clone()
    counts[:, 0] += forced.long()
    width = int(free.max()) if free.numel() else 0
    if width > 0:
        has = rest > 0
        probs = torch.where(has[:, None], resid, torch.ones_like(resid))
        extra = torch.multinomial(
            probs / probs.sum(dim=1, keepdim=True), width, replacement=True, generator=generator
        )
        keep = torch.arange(width)[None, :] < free[:, None]
        counts.scatter_add_(1, extra, keep.long())
    flat = torch.repeat_interleave(torch.arange(n).repeat(groups), counts.reshape(-1))
    return flat.view(groups, n)  # sorted per row: column 0 is a copy of ancestor 0


def _log_mean(values: Tensor) -> Tensor:
    """``logsumexp(values) - log n`` (``-inf`` when every value is ``-inf``)."""
    return torch.logsumexp(values, 0) - math.log(values.numel())


def _seqs(session_tokens: Tensor, rows: Tensor, eos: int) -> list[Seq]:
    return rows_to_seqs(session_tokens[rows], eos)


def _log_normalise(logits: Tensor) -> Tensor:
    """Row-wise ``logits - logsumexp(logits)`` (a log-softmax written with ``logsumexp``, which
    stays serial on small batches; rows must have a finite entry)."""
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def _tempered(log_p: Tensor, temperature: float) -> Tensor:
    """``log softmax(log_p / tau)`` with ``-inf`` kept (same law as
    :func:`tiltsample.decoding.tempered_logprobs`)."""
    return log_p if temperature == 1.0 else _log_normalise(log_p / temperature)


def _draw(generator: torch.Generator, log_q: Tensor) -> Tensor:
    """One token per row of normalised ``log_q`` ``[B, V]`` with the caller's generator."""
    return torch.multinomial(torch.exp(log_q), 1, generator=generator).squeeze(1)


def _safe_log_softmax(logits: Tensor, fallback: Tensor) -> Tensor:
    """Row-wise log-softmax; rows that are all ``-inf`` use ``fallback`` instead (never NaN)."""
    ok = torch.isfinite(logits).any(dim=1, keepdim=True)
    safe = torch.where(ok, logits, fallback)
    return _log_normalise(safe)


def _complete_children(
    target: TiltedTarget,
    prefixes: Sequence[Seq],
    log_p: Tensor,
    logp_all: Tensor,
    complete: Tensor,
) -> tuple[Tensor, Tensor, Cost]:
    """``log G`` and the primary reward of the complete children ``s + v`` marked in ``complete``.

    Only children with ``p(v | s) > 0`` are scored.
    """
    batch, vocab = logp_all.shape
    log_g = torch.full((batch, vocab), -math.inf, dtype=torch.float64)
    rew = torch.full((batch, vocab), math.nan, dtype=torch.float64)
    rows, toks = (complete & (logp_all > -math.inf)).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return log_g, rew, Cost()
    children = [(*prefixes[r], v) for r, v in zip(rows.tolist(), toks.tolist(), strict=True)]
    scores = target.evaluate_tilt(children, log_reference=log_p[rows] + logp_all[rows, toks])
    log_g[rows, toks] = scores.log_tilt
    if scores.reward is not None:
        rew[rows, toks] = scores.reward
    return log_g, rew, scores.cost


def _twist_values(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: Tensor,
    prefixes: Sequence[Seq],
    log_p: Tensor,
    generator: torch.Generator,
) -> tuple[Tensor, Cost]:
    """``log psi`` of the incomplete prefixes held by ``session[rows]``.

    A session-aware twist continues a fork of ``session`` (no prefix is re-encoded).
    """
    twist = config.twist
    if twist.session_aware:
        fork = session.fork()
        fork.select(rows)
        values, cost = twist.log_twist_session(target, fork, log_p, generator)
        cost = cost + fork.cost
    else:
        values, cost = twist.log_twist(target, prefixes, log_p, generator)
    return check_twist_output(values, len(prefixes), f"{twist.name} twist"), cost


def _children(
    config: SMCConfig,
    target: TiltedTarget,
    prefixes: Sequence[Seq],
    log_p: Tensor,
    logp_all: Tensor,
    position: int,
    generator: torch.Generator,
    session: DecodeSession | None = None,
    rows: Tensor | None = None,
) -> tuple[Tensor, Tensor, Cost]:
    """Log-twists ``[B, V]`` of every child ``s + v`` at ``position`` (``-inf`` where impossible).

    Complete children (EOS; every child at the cap) get the true ``log G``; under
    ``truncation="condition"`` only EOS may occupy the last position.
    """
    batch, vocab = logp_all.shape
    eos, cap = target.eos_id, target.max_new_tokens
    last = position == cap - 1
    complete = torch.zeros((batch, vocab), dtype=torch.bool)
    complete[:, eos] = True
    if last:
        complete[:] = True
    allowed = logp_all.clone()
    if last and target.truncation == "condition":
        allowed[:, [v for v in range(vocab) if v != eos]] = -math.inf
    log_g, rew, cost = _complete_children(target, prefixes, log_p, allowed, complete)
    child = log_g
    if not last:
        if config.twist.session_aware and session is not None and rows is not None:
            fork = session.fork()
            fork.select(rows)
            twist_vals, c2 = config.twist.log_twist_children_session(
                target, fork, log_p, logp_all, generator
            )
            c2 = c2 + fork.cost
        else:
            twist_vals, c2 = config.twist.log_twist_children(
                target, prefixes, log_p, logp_all, generator
            )
        twist_vals = check_twist_output(twist_vals, batch, f"{config.twist.name} twist children")
        if twist_vals.shape != (batch, vocab):
            raise ValueError(
                f"{config.twist.name} twist children must have shape ({batch}, {vocab}), "
                f"got {tuple(twist_vals.shape)}"
            )
        child = torch.where(complete, log_g, twist_vals)
        cost = cost + c2
    child = torch.where(allowed > -math.inf, child, torch.full_like(child, -math.inf))
    return child, rew, cost


def _potential(
    config: SMCConfig,
    target: TiltedTarget,
    prefixes: Sequence[Seq],
    log_p: Tensor,
    logp_all: Tensor | None,
    position: int,
    generator: torch.Generator,
    session: DecodeSession,
    rows: Tensor,
) -> tuple[Tensor, Tensor | None, Tensor | None, Cost]:
    """The potential of incomplete prefixes under the current intermediate target.

    Reference proposal: ``log psi(s)`` (a fresh draw). Optimal proposal: the fully adapted
    ``log sum_v p(v|s) psi(s+v)``, returned with the children it was computed from.
    """
    if config.proposal == "optimal":
        assert logp_all is not None
        child, rew, cost = _children(
            config, target, prefixes, log_p, logp_all, position, generator, session, rows
        )
        return torch.logsumexp(logp_all + child, dim=1), child, rew, cost
    values, cost = _twist_values(config, target, session, rows, prefixes, log_p, generator)
    return values, None, None, cost


def _validate_reference(target: TiltedTarget, reference: Sequence[Seq], groups: int) -> Tensor:
    refs = target.check_sequences(list(reference), name="reference")
    if len(refs) != groups:
        raise ValueError(f"reference must hold one path per run ({groups}), got {len(refs)}")
    out = torch.full((groups, target.max_new_tokens), target.eos_id, dtype=torch.long)
    for g, x in enumerate(refs):
        if x:
            out[g, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out


# --------------------------------------------------------------------------- init / step
def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_particles: int,
    num_groups: int = 1,
    reference: Sequence[Seq] | None = None,
) -> SMCState:
    """Empty particles (``psi_0 = 1``, weights 1) for ``num_groups`` runs of ``num_particles``.

    ``reference`` (one complete response per run) makes each run a conditional SMC whose particle 0
    follows the reference path (:mod:`tiltsample.samplers.csmc`).
    """
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    if is_masked_diffusion(target.policy):
        raise TypeError(
            "smc decodes autoregressively; for a masked-diffusion policy use "
            "tiltsample.samplers.fk_steering"
        )
    validation.generator("generator", generator)
    n = validation.positive_int("num_particles", num_particles)
    g = validation.positive_int("num_groups", num_groups)
    ref = None if reference is None else _validate_reference(target, reference, g)
    m = n * g
    session = open_session(target.policy, target.prompt, m)
    f64 = torch.float64
    return SMCState(
        target=target,
        num_particles=n,
        num_groups=g,
        session=session,
        finished=torch.zeros(m, dtype=torch.bool),
        log_p=torch.zeros(m, dtype=f64),
        tok_log_p=torch.zeros((m, 0), dtype=f64),
        tok_log_q_move=torch.zeros((m, 0), dtype=f64),
        log_psi=torch.zeros(m, dtype=f64),
        pending=None,
        pending_reward=None,
        log_next=None,
        reward=torch.full((m,), math.nan, dtype=f64),
        log_w=torch.zeros(m, dtype=f64),
        log_z=torch.zeros(g, dtype=f64),
        reference=ref,
        steps=0,
        resample_count=torch.zeros(g, dtype=torch.long),
        ess_history=(),
        moves_proposed=0,
        moves_accepted=0,
        cost=Cost(),
        tok_entropy=torch.zeros((m, 0), dtype=f64),
    )


def done(state: SMCState) -> bool:
    """True when every particle of every run is a complete response."""
    return bool(state.finished.all())


class _Rows:
    """Mutable per-row arrays of a step (the state is immutable)."""

    def __init__(self, state: SMCState) -> None:
        self.finished = state.finished.clone()
        self.log_p = state.log_p.clone()
        self.tok_log_p = state.tok_log_p
        self.tok_log_q_move = state.tok_log_q_move
        self.tok_entropy = (
            state.tok_entropy
            if state.tok_entropy is not None
            else torch.zeros_like(state.tok_log_p)
        )
        self.log_psi = state.log_psi.clone()
        self.pending = state.pending
        self.pending_reward = state.pending_reward
        self.log_next = state.log_next
        self.reward = state.reward.clone()
        self.log_w = state.log_w.clone()

    def select(self, idx: Tensor) -> None:
        for name in (
            "finished",
            "log_p",
            "tok_log_p",
            "tok_log_q_move",
            "tok_entropy",
            "log_psi",
            "pending",
            "pending_reward",
            "log_next",
            "reward",
            "log_w",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[idx])


def build_kernel(
    *,
    twist: str | Twist = "prefix",
    potential: PrefixPotential | None = None,
    num_rollouts: int | None = None,
    rollout_temperature: float = 1.0,
    proposal: str = "reference",
    temperature: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    num_moves: int = 0,
    move_temperature: float | None = None,
    convention: str = "reset",
    move_cut: str = "uniform",
    move_cut_power: float = 4.0,
) -> Any:
    """One block step of SMC for every run (parameters as in :func:`sampler`)."""
    config = make_config(
        twist=twist,
        potential=potential,
        num_rollouts=num_rollouts,
        rollout_temperature=rollout_temperature,
        proposal=proposal,
        temperature=temperature,
        block_size=block_size,
        ess_threshold=ess_threshold,
        resampling=resampling,
        num_moves=num_moves,
        move_temperature=move_temperature,
        convention=convention,
        move_cut=move_cut,
        move_cut_power=move_cut_power,
    )
    return kernel_from_config(config)


def kernel_from_config(config: SMCConfig) -> Any:
    """The step function for an already validated :class:`SMCConfig`."""

    def step(generator: torch.Generator, state: SMCState) -> tuple[SMCState, SMCInfo]:
        return _step(config, generator, state)

    return step


def _step(
    config: SMCConfig, generator: torch.Generator, state: SMCState
) -> tuple[SMCState, SMCInfo]:
    target = state.target
    n, groups = state.num_particles, state.num_groups
    m = n * groups
    eos, cap = target.eos_id, target.max_new_tokens
    condition = target.truncation == "condition"
    optimal = config.proposal == "optimal"
    session = state.session
    session_before = session.cost
    rows = _Rows(state)
    cost = Cost()
    generated = 0
    ref_rows = torch.arange(groups) * n
    live0 = ~rows.finished
    inc = torch.zeros(m, dtype=torch.float64)  # reference proposal: sum of log p - log q
    tok_lp: list[Tensor] = [rows.tok_log_p]
    tok_lq: list[Tensor] = [rows.tok_log_q_move]
    tok_h: list[Tensor] = [rows.tok_entropy]

    for _ in range(config.block_size):
        live = ~rows.finished
        if not bool(live.any()):
            break
        position = session.length
        logp_all = session.logprobs().to(torch.float64)
        forced = condition and position == cap - 1
        if optimal:
            if rows.pending is None:
                rows, c = _adapt(config, target, session, rows, logp_all, position, generator)
                cost = cost + c
            assert rows.pending is not None and rows.pending_reward is not None
            fallback = logp_all  # rows whose children all have weight 0 (dead particles)
            if forced:
                fallback = torch.full_like(logp_all, -math.inf)
                fallback[:, eos] = 0.0
            log_q_all = _safe_log_softmax(logp_all + rows.pending, fallback)
            tok = _draw(generator, log_q_all)
            lq = torch.zeros(m, dtype=torch.float64)
        elif forced:
            log_q_all = torch.full_like(logp_all, -math.inf)
            log_q_all[:, eos] = 0.0
            tok = torch.full((m,), eos, dtype=torch.long)
        else:
            log_q_all = _tempered(logp_all, config.temperature)
            tok = _draw(generator, log_q_all)
        if state.reference is not None:
            tok[ref_rows] = state.reference[:, position]
        tok = torch.where(live, tok, torch.full_like(tok, eos))
        lp = logp_all.gather(1, tok[:, None]).squeeze(1)
        if not optimal:
            lq = log_q_all.gather(1, tok[:, None]).squeeze(1)
            step_inc = torch.where(torch.isneginf(lp), lp, lp - lq)
            inc = inc + torch.where(live, step_inc, torch.zeros_like(step_inc))
        if forced:
            lq_move = torch.zeros(m, dtype=torch.float64)
        else:
            lq_move = _gather_move_log_q(logp_all, tok, config.move_temperature, eos)
        zero = torch.zeros(m, dtype=torch.float64)
        session.extend(tok)
        rows.log_p = rows.log_p + torch.where(live, lp, zero)
        tok_lp.append(torch.where(live, lp, zero)[:, None])
        tok_lq.append(torch.where(live, lq_move, zero)[:, None])
        tok_h.append(torch.where(live, _entropy(logp_all), zero)[:, None])
        generated += int(live.sum())
        if state.reference is not None:  # the reference's tokens are given, not generated
            generated -= int(live[ref_rows].sum())
        just = live & ((tok == eos) | (position + 1 == cap))
        if optimal:
            assert rows.pending is not None and rows.pending_reward is not None
            new_psi = rows.pending.gather(1, tok[:, None]).squeeze(1)
            rows.log_psi = torch.where(live, new_psi, rows.log_psi)
            new_rew = rows.pending_reward.gather(1, tok[:, None]).squeeze(1)
            rows.reward = torch.where(just, new_rew, rows.reward)
            rows.pending = rows.pending_reward = rows.log_next = None
        rows.finished = rows.finished | just

    rows.tok_log_p = torch.cat(tok_lp, dim=1)
    rows.tok_log_q_move = torch.cat(tok_lq, dim=1)
    rows.tok_entropy = torch.cat(tok_h, dim=1)
    tokens = session.tokens()

    if not optimal:
        newly = (live0 & rows.finished).nonzero().flatten()
        still = (live0 & ~rows.finished).nonzero().flatten()
        new_psi = rows.log_psi.clone()
        if newly.numel():
            scores = target.evaluate_tilt(
                _seqs(tokens, newly, eos), log_reference=rows.log_p[newly]
            )
            new_psi[newly] = scores.log_tilt
            if scores.reward is not None:
                rows.reward[newly] = scores.reward
            cost = cost + scores.cost
        if still.numel():
            values, c = _twist_values(
                config,
                target,
                session,
                still,
                _seqs(tokens, still, eos),
                rows.log_p[still],
                generator,
            )
            new_psi[still] = values
            cost = cost + c
        updated = _add_log(rows.log_w, inc + new_psi, rows.log_psi)
        rows.log_w = torch.where(live0, updated, rows.log_w)
        rows.log_psi = new_psi
    elif bool((~rows.finished).any()):
        # fully adapted: the next token's incremental weight is known before it is drawn
        logp_all = session.logprobs().to(torch.float64)
        rows, c = _adapt(config, target, session, rows, logp_all, session.length, generator)
        cost = cost + c

    # ---------------------------------------------------------------- resampling, per run
    log_z = state.log_z.clone()
    counts = state.resample_count.clone()
    lw = rows.log_w.view(groups, n)
    active = ~rows.finished.view(groups, n).all(dim=1)  # never resample after the last block
    ess_now = torch.where(active, ess_rows(lw), torch.full((groups,), math.nan, dtype=lw.dtype))
    always = config.ess_threshold >= 1.0  # kappa = 1: every block; kappa = 0: never
    need = active if always else active & (ess_now < config.ess_threshold * n)
    level = torch.logsumexp(lw, dim=1) - math.log(n)
    ok = torch.isfinite(level)
    log_z = torch.where(need & ~ok, torch.full_like(log_z, -math.inf), log_z)  # run failed
    resampled = need & ok
    ancestors = torch.arange(m)
    if bool(resampled.any()):
        gs = resampled.nonzero().flatten()
        weights = torch.exp(_log_normalise(lw[gs]))
        if state.reference is not None:
            anc = _conditional_resample(config.resampling, generator, weights)
        else:
            anc = batched_resample(config.resampling, generator, weights)
        ancestors.view(groups, n)[gs] = gs[:, None] * n + anc
        if config.convention == "reset":
            log_z[gs] = log_z[gs] + level[gs]
            rows.log_w.view(groups, n)[gs] = 0.0
        else:
            rows.log_w.view(groups, n)[gs] = level[gs][:, None].expand(-1, n).clone()
        counts[gs] += 1
    proposed = accepted = 0
    if bool(resampled.any()):
        session.select(ancestors)
        rows.select(ancestors)
    if config.num_moves and state.reference is None:
        # after every block, in every run, resampled or not: a schedule that depends on t only
        # (moving only after an ESS-triggered resampling would tie the moves to the weights)
        mask = torch.ones(m, dtype=torch.bool)
        for _ in range(config.num_moves):
            rows, c, a, p = _move(config, target, session, rows, mask, generator)
            cost = cost + c
            accepted += a
            proposed += p
    cost = cost + Cost(generated_tokens=generated) + _cost_delta(session.cost, session_before)
    new_state = SMCState(
        target=target,
        num_particles=n,
        num_groups=groups,
        session=session,
        finished=rows.finished,
        log_p=rows.log_p,
        tok_log_p=rows.tok_log_p,
        tok_log_q_move=rows.tok_log_q_move,
        log_psi=rows.log_psi,
        pending=rows.pending,
        pending_reward=rows.pending_reward,
        log_next=rows.log_next,
        reward=rows.reward,
        log_w=rows.log_w,
        log_z=log_z,
        reference=state.reference,
        steps=state.steps + 1,
        resample_count=counts,
        ess_history=(*state.ess_history, ess_now),
        moves_proposed=state.moves_proposed + proposed,
        moves_accepted=state.moves_accepted + accepted,
        cost=state.cost + cost,
        tok_entropy=rows.tok_entropy,
    )
    return new_state, SMCInfo(cost, ess_now, resampled)


def _adapt(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: _Rows,
    logp_all: Tensor,
    position: int,
    generator: torch.Generator,
) -> tuple[_Rows, Cost]:
    """Draw the children twists of every live particle and add the pre-draw weight increment."""
    m, vocab = logp_all.shape
    live_idx = (~rows.finished).nonzero().flatten()
    pending = torch.full((m, vocab), -math.inf, dtype=torch.float64)
    pending[:, target.eos_id] = 0.0  # finished rows: a point mass on EOS padding
    pending_reward = torch.full((m, vocab), math.nan, dtype=torch.float64)
    log_next = rows.log_psi.clone()
    cost = Cost()
    if live_idx.numel():
        prefixes = _seqs(session.tokens(), live_idx, target.eos_id)
        pot, child, rew, cost = _potential(
            config,
            target,
            prefixes,
            rows.log_p[live_idx],
            logp_all[live_idx],
            position,
            generator,
            session,
            live_idx,
        )
        assert child is not None and rew is not None
        pending[live_idx] = child
        pending_reward[live_idx] = rew
        log_next[live_idx] = pot
        live = ~rows.finished
        updated = _add_log(rows.log_w, log_next, rows.log_psi)
        rows.log_w = torch.where(live, updated, rows.log_w)
    rows.pending, rows.pending_reward, rows.log_next = pending, pending_reward, log_next
    return rows, cost


def _move_log_q(logp_all: Tensor, temperature: float, eos: int) -> Tensor:
    """``log q'`` ``[B, V]`` of the moves' proposal: ``p_ref`` at ``temperature`` with EOS removed
    and the rest renormalised (rows where only EOS is possible are all ``-inf``).

    A move keeps an unfinished particle unfinished, so it regenerates from this law; the stored
    ``tok_log_q_move`` holds it for every token of an unfinished prefix (the reverse move).
    """
    log_q = _tempered(logp_all, temperature).clone()
    log_q[:, eos] = -math.inf
    total = torch.logsumexp(log_q, dim=1, keepdim=True)
    return torch.where(torch.isfinite(total), log_q - total, torch.full_like(log_q, -math.inf))


def _gather_move_log_q(logp_all: Tensor, tok: Tensor, temperature: float, eos: int) -> Tensor:
    """``log q'(tok)`` per row (0 for EOS, which a move never proposes)."""
    lq = _move_log_q(logp_all, temperature, eos).gather(1, tok[:, None]).squeeze(1)
    return torch.where(tok == eos, torch.zeros_like(lq), lq)


class _Proposal(NamedTuple):
    """The outcome of one batch of move proposals (rows ``rows``, all cut at ``j``)."""

    rows: Tensor
    j: int
    accepted: Tensor
    """``[a]`` bool."""
    suffix: Tensor
    """``[a, t - j]`` proposed tokens (never EOS)."""
    log_p: Tensor
    log_q: Tensor
    entropy: Tensor
    """``[a, t - j]`` per-token ``log p_ref``, ``log q'`` and entropy of the proposals."""
    phi: Tensor
    """``[a]`` the proposals' potential (a fresh twist, or the fully adapted potential)."""
    pending: Tensor | None
    pending_reward: Tensor | None
    """``[a, V]`` the proposals' children (optimal proposal only)."""


def _move(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: _Rows,
    mask: Tensor,
    generator: torch.Generator,
) -> tuple[_Rows, Cost, int, int]:
    """One MH suffix-regeneration move on the unfinished rows in ``mask`` (``specs/smc.md`` §8).

    The state space of ``gamma_t`` (``t`` = the session length) is the stopped one: complete
    responses of length ``<= t`` and unfinished prefixes of length ``t``. The move keeps that
    status: a finished particle is left as it is (the identity is ``gamma_t``-invariant), and an
    unfinished one draws its own cut ``j`` (``move_cut="uniform"``: uniform on ``[0, t)``, the same
    law for every unfinished particle, so it cancels; ``"entropy_jump"``: ``c_x(j)`` over its
    ``t`` positions, corrected in the ratio), regenerates ``x_{j:t}`` from the EOS-free proposal
    ``q'`` (:func:`_move_log_q`) and accepts with
    ``min(1, gamma_t(x') q'(x_{j:t}) c_{x'}(j) / (gamma_t(x) q'(x'_{j:t}) c_x(j)))``. The kernel
    is ``gamma_t``-reversible on each of the two classes, hence ``gamma_t``-invariant whichever
    particles are finished, and a finished particle never changes again, so stopping a run once
    every particle has finished is exact. Cuts are drawn per particle, so runs sharing the
    session stay independent. Rows with the same cut are proposed as one batch; the session is
    rewritten once, from the smallest accepted cut.
    """
    t = session.length
    idx = (mask & ~rows.finished).nonzero().flatten()
    if t == 0 or idx.numel() == 0:
        return rows, Cost(), 0, 0
    if config.move_cut == "uniform":
        cuts = torch.randint(t, (idx.numel(),), generator=generator)
        log_c: Tensor | None = None
    else:
        lengths = torch.full((idx.numel(),), t, dtype=torch.long)
        log_c = cut_log_probs(
            rows.tok_entropy[idx], lengths, config.move_cut, config.move_cut_power
        )
        cuts = torch.multinomial(torch.exp(log_c), 1, generator=generator).squeeze(1)
    cost = Cost()
    proposals: list[_Proposal] = []
    for j in sorted(set(cuts.tolist())):
        sel = cuts == j
        prop, c = _propose(
            config,
            target,
            session,
            rows,
            idx[sel],
            j,
            generator,
            None if log_c is None else log_c[sel, j],
        )
        proposals.append(prop)
        cost = cost + c
    n_acc = sum(int(p.accepted.sum()) for p in proposals)
    if n_acc:
        rows, c = _apply_moves(config, target, session, rows, proposals)
        cost = cost + c
    return rows, cost, n_acc, int(idx.numel())


def _propose(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: _Rows,
    active: Tensor,
    j: int,
    generator: torch.Generator,
    log_cut_old: Tensor | None,
) -> tuple[_Proposal, Cost]:
    """Propose ``x' = (x_<j, new suffix)`` for the unfinished rows ``active`` and decide.

    ``log_cut_old``: ``log c_x(j)`` of a particle-dependent cut law (``None``: a cut law that
    cancels). A proposal that reaches a prefix where only EOS is possible is rejected.
    """
    eos = target.eos_id
    t = session.length
    a, width = active.numel(), t - j
    f64 = torch.float64
    twin = session.fork()
    twin.select(active)
    twin.truncate(width)
    suffix = torch.empty((a, width), dtype=torch.long)
    new_lp = torch.zeros((a, width), dtype=f64)
    new_lq = torch.zeros((a, width), dtype=f64)
    new_h = torch.zeros((a, width), dtype=f64)
    stuck = torch.zeros(a, dtype=torch.bool)
    for s in range(width):
        logp_all = twin.logprobs().to(f64)
        law = _move_log_q(logp_all, config.move_temperature, eos)
        ok = torch.isfinite(law).any(dim=1)
        stuck |= ~ok
        fallback = torch.full_like(law, -math.inf)
        fallback[:, (eos + 1) % law.shape[1]] = 0.0  # any non-EOS token: the row is rejected
        tok = _draw(generator, torch.where(ok[:, None], law, fallback))
        suffix[:, s] = tok
        new_lp[:, s] = logp_all.gather(1, tok[:, None]).squeeze(1)
        new_lq[:, s] = torch.where(ok, law.gather(1, tok[:, None]).squeeze(1), 0.0)
        new_h[:, s] = _entropy(logp_all)
        twin.extend(tok)
    cost = Cost(generated_tokens=a * width)
    tokens = session.tokens()
    prefix_lp = rows.tok_log_p[active, :j].sum(dim=1)
    new_log_p = prefix_lp + new_lp.sum(dim=1)
    stuck |= torch.isneginf(new_log_p)
    seqs = rows_to_seqs(torch.cat([tokens[active, :j], suffix], dim=1), eos)
    # the proposals' potential: a fresh twist (or the fully adapted potential and its children)
    phi_new = torch.full((a,), -math.inf, dtype=f64)
    pend_new: Tensor | None = None
    pend_rew_new: Tensor | None = None
    if config.proposal == "optimal":
        vocab = target.vocab_size
        pend_new = torch.full((a, vocab), -math.inf, dtype=f64)
        pend_new[:, eos] = 0.0
        pend_rew_new = torch.full((a, vocab), math.nan, dtype=f64)
    live = (~stuck).nonzero().flatten()
    if live.numel():
        logp_twin = twin.logprobs().to(f64)[live] if config.proposal == "optimal" else None
        pot, child, crew, c = _potential(
            config,
            target,
            [seqs[i] for i in live.tolist()],
            new_log_p[live],
            logp_twin,
            t,
            generator,
            twin,
            live,
        )
        phi_new[live] = pot
        if pend_new is not None and pend_rew_new is not None:
            assert child is not None and crew is not None  # the optimal proposal's children
            pend_new[live] = child
            pend_rew_new[live] = crew
        cost = cost + c
    cost = cost + twin.cost
    # the current particles' potential
    old_phi = rows.log_psi[active]
    if config.proposal == "optimal" and rows.log_next is not None:
        old_phi = rows.log_next[active]
    old_lp = rows.tok_log_p[active, j:].sum(dim=1)
    old_lq = rows.tok_log_q_move[active, j:].sum(dim=1)
    log_new = torch.where(stuck | torch.isneginf(phi_new), -math.inf, new_lp.sum(dim=1) + phi_new)
    log_old = torch.where(torch.isneginf(old_phi), old_phi, old_lp + old_phi)
    log_ratio = torch.where(
        torch.isneginf(log_new),
        torch.full_like(log_new, -math.inf),
        torch.where(
            torch.isneginf(log_old),
            torch.full_like(log_new, math.inf),
            (log_new - new_lq.sum(dim=1)) - (log_old - old_lq),
        ),
    )
    if log_cut_old is not None:  # the cut law's correction log c_{x'}(j) - log c_x(j)
        h_new = torch.cat([rows.tok_entropy[active, :j], new_h], dim=1)
        lengths = torch.full((a,), t, dtype=torch.long)
        log_cut_new = cut_log_probs(h_new, lengths, config.move_cut, config.move_cut_power)[:, j]
        log_ratio = torch.where(
            torch.isfinite(log_ratio), log_ratio + log_cut_new - log_cut_old, log_ratio
        )
        log_ratio = torch.where(torch.isneginf(log_cut_new), -math.inf, log_ratio)
    log_u = torch.log(torch.rand(a, generator=generator, dtype=f64))
    accepted = log_u < log_ratio
    return (
        _Proposal(
            active, j, accepted, suffix, new_lp, new_lq, new_h, phi_new, pend_new, pend_rew_new
        ),
        cost,
    )


def _apply_moves(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: _Rows,
    proposals: Sequence[_Proposal],
) -> tuple[_Rows, Cost]:
    """Write the accepted proposals into ``rows`` and rewrite the session once, from the smallest
    accepted cut (the other rows get their own tokens back)."""
    t = session.length
    j0 = min(p.j for p in proposals if bool(p.accepted.any()))
    tokens = session.tokens()[:, j0:].clone()
    rows.tok_log_p = rows.tok_log_p.clone()
    rows.tok_log_q_move = rows.tok_log_q_move.clone()
    rows.tok_entropy = rows.tok_entropy.clone()
    rows.log_p = rows.log_p.clone()
    rows.log_psi = rows.log_psi.clone()
    optimal = config.proposal == "optimal"
    if optimal:
        if rows.pending is None or rows.pending_reward is None or rows.log_next is None:
            raise RuntimeError("the optimal proposal's children must be drawn before a move")
        rows.pending = rows.pending.clone()
        rows.pending_reward = rows.pending_reward.clone()
        rows.log_next = rows.log_next.clone()
    for p in proposals:
        acc = p.accepted
        if not bool(acc.any()):
            continue
        hit = p.rows[acc]
        tokens[hit, p.j - j0 :] = p.suffix[acc]
        rows.tok_log_p[hit, p.j :] = p.log_p[acc]
        rows.tok_log_q_move[hit, p.j :] = p.log_q[acc]
        rows.tok_entropy[hit, p.j :] = p.entropy[acc]
        rows.log_p[hit] = rows.tok_log_p[hit].sum(dim=1)
        if optimal:
            assert rows.pending is not None and rows.pending_reward is not None
            assert rows.log_next is not None
            assert p.pending is not None and p.pending_reward is not None
            # the stored twist of the prefix is not read again before the next draw
            # overwrites it; the fully adapted potential and the children are the fresh ones
            rows.log_next[hit] = p.phi[acc]
            rows.pending[hit] = p.pending[acc]
            rows.pending_reward[hit] = p.pending_reward[acc]
        else:
            rows.log_psi[hit] = p.phi[acc]
    session.truncate(t - j0)  # its forward tokens are counted by the caller's session delta
    session.extend(tokens)
    return rows, Cost()


def _replace_rows(
    state: SMCState, rows: _Rows, cost: Cost, accepted: int, proposed: int
) -> SMCState:
    return state._replace(
        finished=rows.finished,
        log_p=rows.log_p,
        tok_log_p=rows.tok_log_p,
        tok_log_q_move=rows.tok_log_q_move,
        tok_entropy=rows.tok_entropy,
        log_psi=rows.log_psi,
        pending=rows.pending,
        pending_reward=rows.pending_reward,
        log_next=rows.log_next,
        reward=rows.reward,
        log_w=rows.log_w,
        moves_proposed=state.moves_proposed + proposed,
        moves_accepted=state.moves_accepted + accepted,
        cost=state.cost + cost,
    )


def state_from_sequences(
    target: TiltedTarget,
    sequences: Sequence[Seq],
    *,
    generator: torch.Generator,
    **params: Any,
) -> SMCState:
    """One run whose particles are the given prefixes, with equal weights.

    Every sequence must be a complete response or an incomplete prefix of the common length ``t``
    (the longest one). The particles are teacher-forced through one session (costed), their twists
    drawn as in a run configured by ``params`` (those of :func:`sampler`). Used to start SMC from
    given particles and to test :func:`rejuvenate` against an exact intermediate target.
    """
    config = make_config(**params)
    eos, cap = target.eos_id, target.max_new_tokens
    xs = [tuple(int(v) for v in x) for x in sequences]
    if not xs:
        raise ValueError("sequences must not be empty")
    t = max(len(x) for x in xs)
    for i, x in enumerate(xs):
        if any(not 0 <= v < target.vocab_size for v in x) or eos in x[:-1] or len(x) > cap:
            raise ValueError(f"sequences[{i}] is not a valid (partial) response: {x}")
        if not target.is_complete(x) and len(x) != t:
            raise ValueError(
                f"sequences[{i}] is incomplete with length {len(x)}; incomplete prefixes must "
                f"all have the common length t={t}"
            )
    state = init(target, generator=generator, num_particles=len(xs))
    session = state.session
    m = len(xs)
    padded = torch.full((m, t), eos, dtype=torch.long)
    for i, x in enumerate(xs):
        if x:
            padded[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    tok_lp = torch.zeros((m, t), dtype=torch.float64)
    tok_lq = torch.zeros((m, t), dtype=torch.float64)
    tok_h = torch.zeros((m, t), dtype=torch.float64)
    lengths = torch.tensor([len(x) for x in xs], dtype=torch.long)
    for pos in range(t):
        logp_all = session.logprobs().to(torch.float64)
        tok = padded[:, pos]
        live = pos < lengths
        lp = logp_all.gather(1, tok[:, None]).squeeze(1)
        if target.truncation == "condition" and pos == cap - 1:
            lq = torch.zeros(m, dtype=torch.float64)
        else:
            lq = _gather_move_log_q(logp_all, tok, config.move_temperature, eos)
        tok_lp[:, pos] = torch.where(live, lp, torch.zeros_like(lp))
        tok_lq[:, pos] = torch.where(live, lq, torch.zeros_like(lq))
        tok_h[:, pos] = torch.where(live, _entropy(logp_all), torch.zeros_like(lq))
        session.extend(tok)
    rows = _Rows(state)
    rows.tok_log_p, rows.tok_log_q_move, rows.tok_entropy = tok_lp, tok_lq, tok_h
    rows.log_p = tok_lp.sum(dim=1)
    rows.finished = torch.tensor([target.is_complete(x) for x in xs], dtype=torch.bool)
    cost = Cost()
    done_idx = rows.finished.nonzero().flatten()
    live_idx = (~rows.finished).nonzero().flatten()
    if done_idx.numel():
        scores = target.evaluate_tilt(
            [xs[i] for i in done_idx.tolist()], log_reference=rows.log_p[done_idx]
        )
        rows.log_psi[done_idx] = scores.log_tilt
        if scores.reward is not None:
            rows.reward[done_idx] = scores.reward
        cost = cost + scores.cost
    if config.proposal == "optimal":
        if live_idx.numel():
            logp_all = session.logprobs().to(torch.float64)
            rows, c = _adapt(config, target, session, rows, logp_all, t, generator)
            cost = cost + c
    elif live_idx.numel():
        values, c = _twist_values(
            config,
            target,
            session,
            live_idx,
            [xs[i] for i in live_idx.tolist()],
            rows.log_p[live_idx],
            generator,
        )
        rows.log_psi[live_idx] = values
        cost = cost + c
    rows.log_w = torch.zeros(m, dtype=torch.float64)
    return _replace_rows(state, rows, cost + session.cost, 0, 0)


def rejuvenate(
    state: SMCState, generator: torch.Generator, *, num_moves: int = 1, **params: Any
) -> SMCState:
    """Apply ``num_moves`` MH suffix-regeneration moves to every particle (weights unchanged).

    Each move leaves the current intermediate target ``gamma_t`` invariant (``specs/smc.md`` §8):
    unfinished particles are moved among unfinished prefixes of the current length, finished
    ones stay as they are (the kernel of :func:`_move`); ``params`` are those of :func:`sampler`
    (twist, proposal, move temperature, cut law).
    """
    validation.non_negative_int("num_moves", num_moves)
    config = make_config(**params)
    if state.reference is not None:
        raise ValueError("rejuvenate does not apply to conditional SMC states")
    rows = _Rows(state)
    before = state.session.cost
    mask = torch.ones(rows.log_w.numel(), dtype=torch.bool)
    cost = Cost()
    accepted = proposed = 0
    for _ in range(num_moves):
        rows, c, a, p = _move(config, state.target, state.session, rows, mask, generator)
        cost = cost + c
        accepted += a
        proposed += p
    cost = cost + _cost_delta(state.session.cost, before)
    return _replace_rows(state, rows, cost, accepted, proposed)


# --------------------------------------------------------------------------- result
def log_evidence_runs(state: SMCState) -> Tensor:
    """``[G]`` ``log Ẑ`` of every run (``-inf`` for a failed run, never NaN)."""
    n, groups = state.num_particles, state.num_groups
    level = torch.logsumexp(state.log_w.view(groups, n), dim=1) - math.log(n)
    out = state.log_z + level
    return torch.where(torch.isnan(out), torch.full_like(out, -math.inf), out)


def result(state: SMCState) -> SampleSet:
    """All particles; weights normalised per run when several runs share the state."""
    target = state.target
    n, groups = state.num_particles, state.num_groups
    seqs = rows_to_seqs(state.session.tokens(), target.eos_id)
    runs = log_evidence_runs(state)
    log_w = state.log_w.clone()
    if groups > 1:
        lw = log_w.view(groups, n)
        top = torch.logsumexp(lw, dim=1, keepdim=True)
        log_w = torch.where(torch.isfinite(top), lw - top, lw).reshape(-1)
    pooled = float(_log_mean(runs)) if groups > 1 else float(runs[0])
    meta: dict[str, Any] = {
        "num_particles": n,
        "num_runs": groups,
        "log_evidence_runs": runs.tolist(),
        "num_resampling": state.resample_count.tolist(),
        "num_steps": state.steps,
    }
    if state.moves_proposed:
        meta["move_acceptance"] = state.moves_accepted / state.moves_proposed
    return SampleSet(
        seqs,
        log_w,
        state.cost,
        state.reward if target.reward is not None else None,
        state.log_p.clone(),
        pooled,
        meta,
    )


def run(
    target: TiltedTarget,
    *,
    num_particles: int,
    generator: torch.Generator,
    num_runs: int = 1,
    reference: Sequence[Seq] | None = None,
    **params: Any,
) -> SMCState:
    """Run ``num_runs`` independent SMC runs (batched in one session) to completion.

    Returns the final :class:`SMCState`; :func:`result` and :func:`log_evidence_runs` read it.
    ``params`` are those of :func:`sampler`.
    """
    step = build_kernel(**params)
    state = init(
        target,
        generator=generator,
        num_particles=num_particles,
        num_groups=num_runs,
        reference=reference,
    )
    while not done(state):
        state, _ = step(generator, state)
    return state


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_particles: int | None = None,
    twist: str | Twist = "prefix",
    potential: PrefixPotential | None = None,
    num_rollouts: int | None = None,
    rollout_temperature: float = 1.0,
    proposal: str = "reference",
    temperature: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "systematic",
    num_moves: int = 0,
    move_temperature: float | None = None,
    convention: str = "reset",
    move_cut: str = "uniform",
    move_cut_power: float = 4.0,
) -> SamplingAlgorithm:
    """SMC (see the module docstring).

    Parameters
    ----------
    target
        The tilted target (autoregressive policy).
    num_samples
        Particles returned: ``num_samples / num_particles`` independent runs of ``num_particles``.
    num_particles
        ``N`` per run (default: ``num_samples``, one run); must divide ``num_samples``.
    twist, potential, num_rollouts, rollout_temperature
        ``"none"``, ``"prefix"`` (default; optional ``potential`` for the reward seen so far),
        ``"lookahead"`` with a ``potential`` (any :class:`~tiltsample.reward.PrefixPotential`) or
        ``num_rollouts = K`` (ETS's K-rollout estimate at ``rollout_temperature``, continued from
        the particles' own session), or a :class:`~tiltsample.samplers.twists.Twist`.
    proposal, temperature
        ``"reference"`` (``p_ref`` at ``temperature``) or ``"optimal"`` (``p_ref · psi``).
    block_size
        Tokens per SMC step ``B`` (``B >= max_new_tokens``: importance sampling of completions).
    ess_threshold
        Resample when ``ESS < ess_threshold · N`` (``1``: every block; ``0``: never).
    resampling
        ``"systematic"`` (default), ``"stratified"``, ``"residual"`` or ``"multinomial"``.
    num_moves, move_temperature
        MH rejuvenation moves per unfinished particle after every block (resampled or not; see
        the module docstring) and their proposal temperature (default: the proposal's
        temperature).
    move_cut, move_cut_power
        The moves' cut law: ``"uniform"`` (default) or ``"entropy_jump"``
        (``c_x(j) ∝ max(0, H_j - H_{j-1})^move_cut_power``, uniform when every jump vanishes; the
        law of :func:`tiltsample.samplers.mh.cut_log_probs`, corrected in the acceptance ratio).
    convention
        ``"reset"`` (A) or ``"mean"`` (B) evidence bookkeeping; identical results.
    """
    validation.positive_int("num_samples", num_samples)
    n = (
        num_samples
        if num_particles is None
        else validation.positive_int("num_particles", num_particles)
    )
    if num_samples % n:
        raise ValueError(
            f"num_particles={n} must divide num_samples={num_samples} (runs of equal size)"
        )
    params: dict[str, Any] = {
        "twist": twist,
        "potential": potential,
        "num_rollouts": num_rollouts,
        "rollout_temperature": rollout_temperature,
        "proposal": proposal,
        "temperature": temperature,
        "block_size": block_size,
        "ess_threshold": ess_threshold,
        "resampling": resampling,
        "num_moves": num_moves,
        "move_temperature": move_temperature,
        "convention": convention,
        "move_cut": move_cut,
        "move_cut_power": move_cut_power,
    }
    step = build_kernel(**params)
    groups = num_samples // n
    return SamplingAlgorithm(
        name="smc",
        kind="iid",
        init=lambda g: init(target, generator=g, num_particles=n, num_groups=groups),
        step=step,
        done=done,
        result=result,
        params={"num_particles": n, **params},
        total_steps=math.ceil(target.max_new_tokens / block_size),
    )
