r"""Resample-move: Metropolis–Hastings suffix-regeneration moves that leave the current
intermediate target ``gamma_t`` invariant (``specs/smc.md`` §8; the schedule is in the module
docstring of :mod:`tiltsample.samplers.smc`). :func:`move` draws the cuts, proposes per cut
(regenerate the suffix, its potential, the acceptance ratio) and rewrites the session once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.decoding import rows_to_seqs
from tiltsample.policy import DecodeSession
from tiltsample.samplers.mh import cut_log_probs
from tiltsample.samplers.smc.config import SMCConfig
from tiltsample.samplers.smc.proposals import prefix_potential
from tiltsample.samplers.smc.regeneration import (
    Suffix,
    gather_move_log_q,
    move_log_q,
    regenerate,
)
from tiltsample.samplers.smc.state import ParticleRows
from tiltsample.target import TiltedTarget
from tiltsample.token_laws import draw_tokens
from tiltsample.types import Cost

__all__ = ["gather_move_log_q", "move", "move_log_q", "move_particles"]


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


def move_particles(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: ParticleRows,
    num_moves: int,
    generator: torch.Generator,
) -> tuple[ParticleRows, Cost, int, int]:
    """``num_moves`` moves (:func:`move`) of every particle in ``rows``; returns the rows, the
    cost and the numbers of accepted and proposed moves."""
    mask = torch.ones(rows.log_w.numel(), dtype=torch.bool)
    cost = Cost()
    accepted = proposed = 0
    for _ in range(num_moves):
        rows, c, a, p = move(config, target, session, rows, mask, generator)
        cost = cost + c
        accepted += a
        proposed += p
    return rows, cost, accepted, proposed


def move(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: ParticleRows,
    mask: Tensor,
    generator: torch.Generator,
) -> tuple[ParticleRows, Cost, int, int]:
    """One MH suffix-regeneration move on the unfinished rows in ``mask`` (``specs/smc.md`` §8).

    The state space of ``gamma_t`` (``t`` = the session length) is the stopped one: complete
    responses of length ``<= t`` and unfinished prefixes of length ``t``. The move keeps that
    status: a finished particle is left as it is (the identity is ``gamma_t``-invariant), and an
    unfinished one draws its own cut ``j`` (``move_cut="uniform"``: uniform on ``[0, t)``, the same
    law for every unfinished particle, so it cancels; ``"entropy_jump"``: ``c_x(j)`` over its
    ``t`` positions, corrected in the ratio), regenerates ``x_{j:t}`` from the EOS-free proposal
    ``q'`` (:func:`move_log_q`) and accepts with
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
        cuts = draw_tokens(generator, log_c)
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


def _proposal_potential(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: ParticleRows,
    active: Tensor,
    j: int,
    sfx: Suffix,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor | None, Tensor | None, Cost]:
    """The proposals' potential ``[a]``: a fresh twist, or the fully adapted potential with its
    children ``[a, V]`` (optimal proposal); ``-inf`` for stuck proposals (marked in ``sfx``).
    The cost includes the twin session's."""
    eos = target.eos_id
    t = session.length
    a = active.numel()
    f64 = torch.float64
    tokens = session.tokens()
    prefix_lp = rows.tok_log_p[active, :j].sum(dim=1)
    new_log_p = prefix_lp + sfx.log_p.sum(dim=1)
    sfx.stuck.logical_or_(torch.isneginf(new_log_p))
    seqs = rows_to_seqs(torch.cat([tokens[active, :j], sfx.tokens], dim=1), eos)
    phi_new = torch.full((a,), -math.inf, dtype=f64)
    pend_new: Tensor | None = None
    pend_rew_new: Tensor | None = None
    if config.proposal == "optimal":
        vocab = target.vocab_size
        pend_new = torch.full((a, vocab), -math.inf, dtype=f64)
        pend_new[:, eos] = 0.0
        pend_rew_new = torch.full((a, vocab), math.nan, dtype=f64)
    cost = Cost()
    live = (~sfx.stuck).nonzero().flatten()
    if live.numel():
        twin = sfx.twin
        logp_twin = twin.logprobs().to(f64)[live] if config.proposal == "optimal" else None
        pot, child, crew, c = prefix_potential(
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
    return phi_new, pend_new, pend_rew_new, cost + sfx.twin.cost


def _log_acceptance(
    config: SMCConfig,
    rows: ParticleRows,
    active: Tensor,
    j: int,
    t: int,
    sfx: Suffix,
    phi_new: Tensor,
    log_cut_old: Tensor | None,
) -> Tensor:
    """``log`` of the MH ratio ``gamma_t(x') q'(x_{j:t}) c_{x'}(j) / (gamma_t(x) q'(x'_{j:t})
    c_x(j))`` of every proposal (``-inf`` for a stuck one)."""
    old_phi = rows.log_psi[active]
    if config.proposal == "optimal" and rows.log_next is not None:
        old_phi = rows.log_next[active]
    old_lp = rows.tok_log_p[active, j:].sum(dim=1)
    old_lq = rows.tok_log_q_move[active, j:].sum(dim=1)
    log_new = torch.where(
        sfx.stuck | torch.isneginf(phi_new), -math.inf, sfx.log_p.sum(dim=1) + phi_new
    )
    log_old = torch.where(torch.isneginf(old_phi), old_phi, old_lp + old_phi)
    log_ratio = torch.where(
        torch.isneginf(log_new),
        torch.full_like(log_new, -math.inf),
        torch.where(
            torch.isneginf(log_old),
            torch.full_like(log_new, math.inf),
            (log_new - sfx.log_q.sum(dim=1)) - (log_old - old_lq),
        ),
    )
    if log_cut_old is not None:  # the cut law's correction log c_{x'}(j) - log c_x(j)
        h_new = torch.cat([rows.tok_entropy[active, :j], sfx.entropy], dim=1)
        lengths = torch.full((active.numel(),), t, dtype=torch.long)
        log_cut_new = cut_log_probs(h_new, lengths, config.move_cut, config.move_cut_power)[:, j]
        log_ratio = torch.where(
            torch.isfinite(log_ratio), log_ratio + log_cut_new - log_cut_old, log_ratio
        )
        log_ratio = torch.where(torch.isneginf(log_cut_new), -math.inf, log_ratio)
    return log_ratio


def _propose(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: ParticleRows,
    active: Tensor,
    j: int,
    generator: torch.Generator,
    log_cut_old: Tensor | None,
) -> tuple[_Proposal, Cost]:
    """Propose ``x' = (x_<j, new suffix)`` for the unfinished rows ``active`` and decide.

    ``log_cut_old``: ``log c_x(j)`` of a particle-dependent cut law (``None``: a cut law that
    cancels). A proposal that reaches a prefix where only EOS is possible is rejected.
    """
    t = session.length
    a = active.numel()
    sfx = regenerate(session, active, j, config.move_tau, target.eos_id, generator)
    cost = Cost(generated_tokens=sfx.generated)
    phi_new, pend_new, pend_rew_new, c = _proposal_potential(
        config, target, session, rows, active, j, sfx, generator
    )
    cost = cost + c
    log_ratio = _log_acceptance(config, rows, active, j, t, sfx, phi_new, log_cut_old)
    log_u = torch.log(torch.rand(a, generator=generator, dtype=torch.float64))
    accepted = log_u < log_ratio
    proposal = _Proposal(
        active,
        j,
        accepted,
        sfx.tokens,
        sfx.log_p,
        sfx.log_q,
        sfx.entropy,
        phi_new,
        pend_new,
        pend_rew_new,
    )
    return proposal, cost


def _apply_moves(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: ParticleRows,
    proposals: Sequence[_Proposal],
) -> tuple[ParticleRows, Cost]:
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
