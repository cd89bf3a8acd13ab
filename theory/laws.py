r"""Exact output laws of the baseline samplers (ancestral, soft best-of-N / SIR, argmax best-of-N).

Every law is that of the sampler *as implemented*, so a seeded run of the sampler can be compared
with it (``tests/theory/test_theory_laws.py``):

Proposal ``q_tau`` (:func:`proposal_law`)
    :func:`tiltsample.proposal.propose`: at each step ``softmax(log p_ref(· | s) / tau)`` over the
    full vocabulary (no top-k/top-p), stopping at EOS or at ``max_new_tokens``; under
    ``truncation="condition"`` EOS is *forced* at the last position with ``log q = 0``. A forced
    EOS can have ``p_ref(EOS | s) = 0``: such a response has ``q > 0`` but ``p_ref = 0``, so the
    support of ``q`` may be larger than that of ``p_ref``; it is a zero-weight candidate.
Importance weights (:func:`importance_log_weights`)
    ``log w = log p_ref + log_tilt − log q`` (``−inf`` where ``p_ref = 0`` or a constraint fails).
SIR / soft best-of-N (:func:`sir_law`)
    ``M`` i.i.d. candidates from ``q``, one returned with probability ``w_m / Σ_j w_j``. The exact
    law is the 1-D quadrature of ``specs/ets.md`` §9.
Argmax best-of-N (:func:`best_of_n_law`)
    The candidate with the largest log-tilt among those with finite weight; a closed form over
    tilt levels.

A draw whose ``M`` candidates all have zero weight fails (the samplers give it log-weight ``−inf``
and :meth:`~tiltsample.results.SampleSet.empirical` drops it), so the SIR and argmax laws are
returned **conditional on success**. The ``*_bruteforce`` versions enumerate every ordered
``M``-tuple of candidates; they exist to check the closed forms on tiny toys.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.enumeration import DEFAULT_MAX_SUPPORT, decode_tree
from tiltsample.target import TiltedTarget
from tiltsample.theory.energies import scatter_logsumexp
from tiltsample.types import Seq

__all__ = [
    "ProposalLaw",
    "ancestral_law",
    "best_of_n_law",
    "best_of_n_law_bruteforce",
    "importance_log_weights",
    "proposal_law",
    "sir_law",
    "sir_law_bruteforce",
]

_BATCH = 4096
MAX_BRUTEFORCE_TUPLES = 2_000_000
DEFAULT_GRID_STEP = 0.1
"""Step of the uniform ``s = log u`` grid of :func:`sir_law` (trapezoid error ``~exp(-π²/h)``)."""


class ProposalLaw(NamedTuple):
    """The exact law ``q_tau`` of :func:`tiltsample.proposal.propose` over its whole support."""

    support: list[Seq]
    """Every response with ``q_tau(x) > 0``."""
    log_q: Tensor
    """``[S]`` float64 ``log q_tau(x)`` (finite, normalised)."""
    log_reference: Tensor
    """``[S]`` float64 ``log p_ref(x)`` at temperature 1, the forced EOS included (may be
    ``-inf`` for a forced EOS of probability 0)."""
    log_tilt: Tensor
    """``[S]`` float64 summed log-tilt; ``-inf`` where a constraint fails. It is not evaluated
    (set to ``-inf``) where ``p_ref(x) = 0``, since such a candidate can never be chosen."""

    @property
    def log_weights(self) -> Tensor:
        """``[S]`` importance log-weights (see :func:`importance_log_weights`)."""
        return importance_log_weights(self)

    def as_dict(self) -> dict[Seq, float]:
        """``{x: q_tau(x)}`` (entries that underflow to 0 are dropped)."""
        probs = torch.exp(self.log_q).tolist()
        return {x: p for x, p in zip(self.support, probs, strict=True) if p > 0.0}


def proposal_law(
    target: TiltedTarget, temperature: float = 1.0, max_support: int = DEFAULT_MAX_SUPPORT
) -> ProposalLaw:
    r"""Enumerate the decode law ``q_tau`` of :func:`tiltsample.proposal.propose`.

    .. math::

        q_\tau(x) = \prod_t \mathrm{softmax}\big(\log p_{ref}(\cdot \mid x_{<t}) / \tau\big)[x_t],

    with the factor of a forced EOS (last position, ``truncation="condition"``) equal to 1. The
    trie walk is :func:`tiltsample.enumeration.decode_tree`, shared with the enumerator.

    Parameters
    ----------
    target
        An enumerable target.
    temperature
        The proposal temperature ``tau > 0``.
    max_support
        Refuse (``ValueError``) to enumerate more responses than this.
    """
    tree = decode_tree(target, temperature, max_support, _BATCH)
    done, log_ref, log_q_all = tree.support, tree.log_reference, tree.log_proposal
    log_tilt = torch.full_like(log_ref, -math.inf)
    ok = (log_ref > -math.inf).nonzero().flatten()
    if len(ok):
        seqs = [done[i] for i in ok.tolist()]
        log_tilt[ok] = target.evaluate_tilt(seqs, log_reference=log_ref[ok]).log_tilt
    return ProposalLaw(done, log_q_all, log_ref, log_tilt)


def importance_log_weights(proposal: ProposalLaw) -> Tensor:
    r"""``[S]`` ``log w(x) = log p_ref(x) + log_tilt(x) − log q_tau(x)``.

    ``−inf`` (weight 0) where ``p_ref(x) = 0`` or a constraint fails; never NaN (the same rule as
    :attr:`tiltsample.proposal.Proposals.log_weights`).
    """
    zero = torch.isneginf(proposal.log_reference) | torch.isneginf(proposal.log_tilt)
    value = proposal.log_reference + proposal.log_tilt - proposal.log_q
    return torch.where(zero, torch.full_like(value, -math.inf), value)


def ancestral_law(target: TiltedTarget, temperature: float = 1.0) -> dict[Seq, float]:
    """Exact law of the ``ancestral`` sampler: ``q_tau`` itself (no tilt, no failures)."""
    return proposal_law(target, temperature).as_dict()


def _success_setup(
    target: TiltedTarget, num_candidates: int, temperature: float, proposal: ProposalLaw | None
) -> tuple[int, ProposalLaw, Tensor, Tensor]:
    m = validation.positive_int("num_candidates", num_candidates)
    prop = proposal_law(target, temperature) if proposal is None else proposal
    log_w = importance_log_weights(prop)
    valid = torch.isfinite(log_w)
    if not bool(valid.any()):
        raise ValueError(
            "no proposal candidate has positive weight (every response violates a constraint or "
            "has p_ref = 0): every draw fails and the conditional law is undefined"
        )
    return m, prop, log_w, valid


def _log_invalid_mass(log_q: Tensor, valid: Tensor) -> float:
    if bool(valid.all()):
        return -math.inf
    return float(torch.logsumexp(log_q[~valid], 0))


def _log_success(m: int, log_q0: float) -> float:
    """``log(1 − Q0^M)``: probability that at least one of ``M`` candidates is valid."""
    if log_q0 == -math.inf:
        return 0.0
    return math.log(-math.expm1(m * log_q0))


def _to_dict(support: list[Seq], idx: Tensor, log_probs: Tensor) -> dict[Seq, float]:
    probs = torch.exp(log_probs).tolist()
    return {support[i]: p for i, p in zip(idx.tolist(), probs, strict=True) if p > 0.0}


def sir_law(
    target: TiltedTarget,
    num_candidates: int,
    temperature: float = 1.0,
    *,
    proposal: ProposalLaw | None = None,
    grid_step: float = DEFAULT_GRID_STEP,
) -> dict[Seq, float]:
    r"""Exact law of one SIR / soft best-of-N draw from ``M`` candidates, given success.

    ``specs/ets.md`` §9: with ``1/(a + S) = ∫_0^∞ e^{−u(a+S)} du``,

    .. math::

        P(\text{select } x) = M\, q(x) \int_0^\infty w(x)\, e^{-u w(x)}\, \varphi(u)^{M-1}\, du,
        \qquad \varphi(u) = \sum_{x''} q(x'')\, e^{-u\, w(x'')},

    for ``w(x) > 0``; zero-weight candidates enter only through ``φ`` (with ``e^0 = 1``). The
    result is divided by ``P(success) = 1 − Q_0^M`` (``Q_0`` = ``q``-mass of zero weights).

    Numerics: weights are rescaled by their maximum (``ℓ = log w − max log w ≤ 0``; the law is
    invariant), and the integral is taken in ``s = log u``,

    .. math::

        \int_{-\infty}^{\infty} \exp\big(ℓ + s − e^{s+ℓ} + (M−1)\log\varphi(e^s)\big)\, ds,

    whose integrand is entire and decays like ``e^{s+ℓ}`` as ``s → −∞`` and doubly exponentially
    as ``s → ∞``; the trapezoid rule on a uniform grid therefore converges exponentially fast
    (error ``≈ e^{−π²/h}``). The grid runs from ``−40 − log M`` (below ``1/max w``) to
    ``5 − min ℓ`` (above ``1/min w``), ``log φ`` is a logsumexp, and equal weights are grouped
    (exact equality), so the cost is ``O(grid × distinct weights)`` and ``lam = 1e-3`` neither
    overflows nor underflows. The sum of the result is checked against ``1 − Q_0^M``
    (``RuntimeError`` beyond ``1e-9`` relative).

    Parameters
    ----------
    target
        An enumerable target.
    num_candidates
        ``M >= 1``.
    temperature
        Proposal temperature ``tau``.
    proposal
        Reuse a precomputed :func:`proposal_law` (for sweeps over ``M``); it must have been built
        for this ``target``, and its temperature takes the place of ``temperature``.
    grid_step
        Step ``h`` of the ``log u`` grid.

    Returns
    -------
    dict[Seq, float]
        ``{x: P(output = x | success)}`` over the candidates with positive weight.
    """
    m, prop, log_w, valid = _success_setup(target, num_candidates, temperature, proposal)
    h = validation.positive_float("grid_step", grid_step)
    idx = valid.nonzero().flatten()
    log_q = prop.log_q - torch.logsumexp(prop.log_q, 0)
    log_q0 = _log_invalid_mass(log_q, valid)
    uniq, inverse = torch.unique(log_w[idx], return_inverse=True)
    ell = uniq - uniq.max()  # [U], max 0
    num_groups = int(ell.shape[0])
    log_q_group = scatter_logsumexp(log_q[idx], inverse, num_groups)
    if m == 1:
        log_j = torch.zeros(num_groups, dtype=torch.float64)  # ∫ w e^{-uw} du = 1
    else:
        s_lo = -40.0 - math.log(m)
        s_hi = 5.0 - float(ell.min())
        grid = torch.arange(s_lo, s_hi + h, h, dtype=torch.float64)
        chunk = max(1, 4_000_000 // len(grid))
        # log φ(e^s) = logsumexp( log Q0, logsumexp_g(log Q_g − e^{s + ℓ_g}) ), or, where the
        # lost mass 1 − φ = Σ_g Q_g (1 − e^{−e^{s+ℓ_g}}) is small, log1p(−(1 − φ)): φ(0) = 1
        # exactly, so (M − 1) log φ does not amplify the rounding of the total mass.
        log_phi = torch.full_like(grid, log_q0)
        log_lost = torch.full_like(grid, -math.inf)
        for a in range(0, num_groups, chunk):
            e = torch.exp(grid[:, None] + ell[None, a : a + chunk])
            lq = log_q_group[None, a : a + chunk]
            log_phi = torch.logaddexp(log_phi, torch.logsumexp(lq - e, dim=1))
            lost = torch.logsumexp(lq + torch.log(-torch.expm1(-e)), dim=1)
            log_lost = torch.logaddexp(log_lost, lost)
        small = log_lost < -math.log(2.0)
        log_phi = torch.where(small, torch.log1p(-torch.exp(log_lost)), log_phi)
        tail = (m - 1) * log_phi
        pieces = []
        for a in range(0, num_groups, chunk):
            sl = ell[None, a : a + chunk] + grid[:, None]
            pieces.append(torch.logsumexp(sl - torch.exp(sl) + tail[:, None], dim=0))
        log_j = torch.cat(pieces) + math.log(m) + math.log(h)
    log_p = log_q[idx] + log_j[inverse]
    log_total = float(torch.logsumexp(log_p, 0))
    expected = _log_success(m, log_q0)
    if not abs(log_total - expected) < 1e-9:
        raise RuntimeError(
            f"SIR quadrature lost accuracy: total {math.exp(log_total):.12g} vs P(success) "
            f"{math.exp(expected):.12g}; decrease grid_step (now {h})"
        )
    return _to_dict(prop.support, idx, log_p - log_total)


def best_of_n_law(
    target: TiltedTarget,
    num_candidates: int,
    temperature: float = 1.0,
    *,
    proposal: ProposalLaw | None = None,
) -> dict[Seq, float]:
    r"""Exact law of argmax best-of-N (largest log-tilt among valid candidates), given success.

    Group the valid candidates (finite weight) by tilt level ``r``. With ``f(r)`` the ``q``-mass
    of valid candidates at level ``r`` and ``F(r)`` the mass of everything strictly below
    (invalid candidates count as below every level),

    .. math::

        P(\text{select } x) = \frac{q(x)}{f(r)}\Big[(F(r) + f(r))^N - F(r)^N\Big],
        \qquad r = \mathrm{log\_tilt}(x):

    the best level is ``r`` with probability ``(F + f)^N − F^N``, and by exchangeability the
    winner is uniform-by-``q`` within the level, which is the law of the sampler's first-index
    tie-break. Divided by ``P(success) = 1 − Q_0^N``. Computed in log space as
    ``N log a + log(−expm1(N log1p(−f/a)))``, ``a = F + f`` (no cancellation).

    Levels are grouped by **exact** float equality of ``log_tilt``: equal rewards are computed by
    the same code path, so they are bitwise equal (as they are for the sampler's ``argmax``, which
    also compares exactly).

    Parameters
    ----------
    target, num_candidates, temperature, proposal
        As in :func:`sir_law`.

    Returns
    -------
    dict[Seq, float]
        ``{x: P(output = x | success)}`` over the valid candidates.
    """
    n, prop, _log_w, valid = _success_setup(target, num_candidates, temperature, proposal)
    idx = valid.nonzero().flatten()
    log_q = prop.log_q - torch.logsumexp(prop.log_q, 0)
    log_q0 = _log_invalid_mass(log_q, valid)
    levels, inverse = torch.unique(prop.log_tilt[idx], return_inverse=True)  # ascending
    log_f = scatter_logsumexp(log_q[idx], inverse, int(levels.shape[0]))
    minus_inf = torch.tensor([-math.inf], dtype=torch.float64)
    inclusive = torch.logcumsumexp(log_f, 0)
    below = torch.cat([minus_inf, inclusive[:-1]])
    log_below = torch.logaddexp(below, torch.tensor(log_q0, dtype=torch.float64))
    # a = F + f; where the mass strictly above is small, a = 1 - above is the accurate form (the
    # top level gets a = 1 exactly, so N log a does not amplify the rounding of the total mass)
    above = torch.cat([torch.logcumsumexp(log_f.flip(0), 0).flip(0)[1:], minus_inf])
    log_a = torch.where(
        above < -math.log(2.0),
        torch.log1p(-torch.exp(above)),
        torch.logaddexp(log_below, log_f),
    )
    ratio = torch.clamp(torch.exp(log_f - log_a), max=1.0)  # f / a in (0, 1]
    log_level = n * log_a + torch.log(-torch.expm1(n * torch.log1p(-ratio)))
    log_p = log_q[idx] - log_f[inverse] + log_level[inverse] - _log_success(n, log_q0)
    return _to_dict(prop.support, idx, log_p)


def _tuples(num_support: int, m: int) -> Tensor:
    total = num_support**m
    if total > MAX_BRUTEFORCE_TUPLES:
        raise ValueError(
            f"brute force needs support**M = {num_support}**{m} = {total} candidate tuples "
            f"> {MAX_BRUTEFORCE_TUPLES}; use a smaller toy"
        )
    base = torch.arange(num_support)
    if m == 1:
        return base[:, None]
    return torch.cartesian_prod(*([base] * m))


def sir_law_bruteforce(
    target: TiltedTarget, num_candidates: int, temperature: float = 1.0
) -> dict[Seq, float]:
    """SIR law given success by summing over all ordered ``M``-tuples (tiny toys only).

    Each tuple has probability ``Π_m q(x_m)``; a valid tuple returns ``x_m`` with probability
    ``softmax(log w)_m``. Raises ``ValueError`` if ``|support|**M > 2e6``.
    """
    m, prop, log_w, _valid = _success_setup(target, num_candidates, temperature, None)
    tup = _tuples(len(prop.support), m)
    log_tuple = prop.log_q[tup].sum(dim=1)
    lw = log_w[tup]
    ok = torch.isfinite(lw).any(dim=1)
    tup, lw, log_tuple = tup[ok], lw[ok], log_tuple[ok]
    sel = torch.softmax(lw, dim=1)
    contrib = torch.exp(log_tuple)[:, None] * sel
    out = torch.zeros(len(prop.support), dtype=torch.float64)
    out.index_add_(0, tup.flatten(), contrib.flatten())
    out = out / out.sum()
    return {x: p for x, p in zip(prop.support, out.tolist(), strict=True) if p > 0.0}


def best_of_n_law_bruteforce(
    target: TiltedTarget, num_candidates: int, temperature: float = 1.0
) -> dict[Seq, float]:
    """Argmax best-of-N law given success over all ordered ``N``-tuples (tiny toys only).

    Applies the sampler's literal rule: the *first* index of the largest log-tilt among
    candidates with finite weight. Raises ``ValueError`` if ``|support|**N > 2e6``.
    """
    n, prop, log_w, _valid = _success_setup(target, num_candidates, temperature, None)
    tup = _tuples(len(prop.support), n)
    log_tuple = prop.log_q[tup].sum(dim=1)
    lw = log_w[tup]
    ok = torch.isfinite(lw).any(dim=1)
    tup, lw, log_tuple = tup[ok], lw[ok], log_tuple[ok]
    score = torch.where(torch.isfinite(lw), prop.log_tilt[tup], torch.full_like(lw, -math.inf))
    best = torch.argmax(score, dim=1)  # first index among ties
    winners = tup.gather(1, best[:, None]).squeeze(1)
    out = torch.zeros(len(prop.support), dtype=torch.float64)
    out.index_add_(0, winners, torch.exp(log_tuple))
    out = out / out.sum()
    return {x: p for x, p in zip(prop.support, out.tolist(), strict=True) if p > 0.0}


def imh_law(q: Mapping[Seq, float], pi: Mapping[Seq, float], steps: int) -> dict[Seq, float]:
    r"""Exact law of independence MH after ``steps`` steps from a draw of the proposal ``q``.

    The kernel of :mod:`tiltsample.samplers.imh`: from ``x`` propose ``y ~ q`` and accept with
    probability ``min(1, w(y)/w(x))``, ``w = pi/q`` (a state of weight zero is left at the first
    proposal of positive weight). One dense ``|support|²`` matrix: toys only. ``q`` is the
    proposal law (:func:`ancestral_law` at the sampler's temperature) and ``pi`` the target law;
    ``pi`` must be supported inside ``q``. Mengersen & Tweedie (1996):
    ``TV(law_n, pi) <= (1 - 1/w*)^n`` with ``w* = max_x pi(x)/q(x)``.
    """
    import numpy as np

    states = list(q)
    qv = np.array([q[x] for x in states], dtype=np.float64)
    qv = qv / qv.sum()
    w = np.array([pi.get(x, 0.0) for x in states], dtype=np.float64) / np.where(qv > 0, qv, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = w[None, :] / w[:, None]
    accept = np.where(w[:, None] > 0, np.minimum(1.0, ratio), (w[None, :] > 0).astype(float))
    kernel = qv[None, :] * np.nan_to_num(accept, nan=0.0)
    np.fill_diagonal(kernel, 0.0)
    np.fill_diagonal(kernel, 1.0 - kernel.sum(axis=1))
    law = qv
    for _ in range(steps):
        law = law @ kernel
    return {x: float(p) for x, p in zip(states, law, strict=True) if p > 0}
