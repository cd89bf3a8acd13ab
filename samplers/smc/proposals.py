r"""Twists and proposals inside an SMC step: the true tilt of complete children, the stored twist
of incomplete prefixes, the vocabulary-wide children twists of the locally optimal proposal
``q(v | s) ∝ p(v | s) psi(s + v)`` and its fully adapted weight increment (:func:`adapt`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.policy import DecodeSession
from tiltsample.samplers.smc.config import SMCConfig
from tiltsample.samplers.smc.numerics import add_log, row_seqs
from tiltsample.samplers.smc.state import ParticleRows, Section
from tiltsample.samplers.smc.twists.base import check_twist_output
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "adapt",
    "adapt_sections",
    "children",
    "complete_children",
    "prefix_potential",
    "twist_values",
]


def complete_children(
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


def twist_values(
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
    twist = config.psi
    if twist.session_aware:
        fork = session.fork()
        fork.select(rows)
        values, cost = twist.log_twist_session(target, fork, log_p, generator)
        cost = cost + fork.cost
    else:
        values, cost = twist.log_twist(target, prefixes, log_p, generator)
    return check_twist_output(values, len(prefixes), f"{twist.name} twist"), cost


def children(
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
    log_g, rew, cost = complete_children(target, prefixes, log_p, allowed, complete)
    child = log_g
    if not last:
        if config.psi.session_aware and session is not None and rows is not None:
            fork = session.fork()
            fork.select(rows)
            twist_vals, c2 = config.psi.log_twist_children_session(
                target, fork, log_p, logp_all, generator
            )
            c2 = c2 + fork.cost
        else:
            twist_vals, c2 = config.psi.log_twist_children(
                target, prefixes, log_p, logp_all, generator
            )
        twist_vals = check_twist_output(twist_vals, batch, f"{config.psi.name} twist children")
        if twist_vals.shape != (batch, vocab):
            raise ValueError(
                f"{config.psi.name} twist children must have shape ({batch}, {vocab}), "
                f"got {tuple(twist_vals.shape)}"
            )
        child = torch.where(complete, log_g, twist_vals)
        cost = cost + c2
    child = torch.where(allowed > -math.inf, child, torch.full_like(child, -math.inf))
    return child, rew, cost


def prefix_potential(
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
        child, rew, cost = children(
            config, target, prefixes, log_p, logp_all, position, generator, session, rows
        )
        return torch.logsumexp(logp_all + child, dim=1), child, rew, cost
    values, cost = twist_values(config, target, session, rows, prefixes, log_p, generator)
    return values, None, None, cost


def adapt(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: ParticleRows,
    logp_all: Tensor,
    position: int,
    generator: torch.Generator,
) -> tuple[ParticleRows, Cost]:
    """Draw the children twists of every live particle and add the pre-draw weight increment
    (:func:`adapt_sections` with one section: every row, ``target``, ``generator``)."""
    whole = Section(target, generator, slice(0, 0), slice(0, int(logp_all.shape[0])))
    rows, costs = adapt_sections(config, session, rows, logp_all, position, [whole])
    return rows, costs[0]


def adapt_sections(
    config: SMCConfig,
    session: DecodeSession,
    rows: ParticleRows,
    logp_all: Tensor,
    position: int,
    parts: Sequence[Section],
) -> tuple[ParticleRows, list[Cost]]:
    r"""Draw the children twists of every live particle and add the pre-draw weight increment.

    For every live row ``s`` (its section's target and generator)

    .. math::

        \log w_s \mathrel{+}= \log \sum_v p(v \mid s)\, \psi(s + v) - \log \psi(s),

    and the children log-twists ``log psi(s + v)`` are kept in ``rows.pending`` for the draw.
    One :func:`prefix_potential` call per section with a live row (none for a section whose
    rows have all finished), so a section draws exactly what it draws alone. Returns the rows
    and each section's cost.
    """
    m, vocab = logp_all.shape
    eos = parts[0].target.eos_id
    pending = torch.full((m, vocab), -math.inf, dtype=torch.float64)
    pending[:, eos] = 0.0  # finished rows: a point mass on EOS padding
    pending_reward = torch.full((m, vocab), math.nan, dtype=torch.float64)
    log_next = rows.log_psi.clone()
    live = ~rows.finished
    costs: list[Cost] = []
    for part in parts:
        mine = torch.zeros(m, dtype=torch.bool)
        mine[part.rows] = True
        live_idx = (live & mine).nonzero().flatten()
        cost = Cost()
        if live_idx.numel():
            prefixes = row_seqs(session.tokens(), live_idx, eos)
            pot, child, rew, cost = prefix_potential(
                config,
                part.target,
                prefixes,
                rows.log_p[live_idx],
                logp_all[live_idx],
                position,
                part.generator,
                session,
                live_idx,
            )
            assert child is not None and rew is not None
            pending[live_idx] = child
            pending_reward[live_idx] = rew
            log_next[live_idx] = pot
        costs.append(cost)
    if bool(live.any()):
        updated = add_log(rows.log_w, log_next, rows.log_psi)
        rows.log_w = torch.where(live, updated, rows.log_w)
    rows.pending, rows.pending_reward, rows.log_next = pending, pending_reward, log_next
    return rows, costs
