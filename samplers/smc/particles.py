"""SMC from given particles: :func:`state_from_sequences` (teacher-forced particles with their
twists, equal weights) and :func:`rejuvenate` (resample-move moves applied to a state, weights
unchanged); used to restart SMC and to test the moves against an exact intermediate target."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import entropy
from tiltsample.policy import DecodeSession
from tiltsample.samplers.smc.config import SMCConfig, make_config
from tiltsample.samplers.smc.moves import gather_move_log_q, move_particles
from tiltsample.samplers.smc.numerics import cost_delta
from tiltsample.samplers.smc.proposals import adapt, twist_values
from tiltsample.samplers.smc.state import ParticleRows, SMCState, init, with_rows
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["rejuvenate", "state_from_sequences"]


def _checked_particles(target: TiltedTarget, sequences: Sequence[Seq]) -> tuple[list[Seq], int]:
    """The particles as tuples and their common length ``t`` (``ValueError`` for an invalid
    response or an incomplete prefix shorter than ``t``)."""
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
    return xs, t


def _teacher_force(
    config: SMCConfig, target: TiltedTarget, session: DecodeSession, xs: list[Seq], t: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Push the particles (EOS-padded to ``t``) through ``session``; per-token ``log p_ref``,
    ``log q'`` of the moves and entropy ``[M, t]`` (0 on padding)."""
    eos, cap = target.eos_id, target.max_new_tokens
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
            lq = gather_move_log_q(logp_all, tok, config.move_tau, eos)
        tok_lp[:, pos] = torch.where(live, lp, torch.zeros_like(lp))
        tok_lq[:, pos] = torch.where(live, lq, torch.zeros_like(lq))
        tok_h[:, pos] = torch.where(live, entropy(logp_all), torch.zeros_like(lq))
        session.extend(tok)
    return tok_lp, tok_lq, tok_h


def _initial_twists(
    config: SMCConfig,
    target: TiltedTarget,
    session: DecodeSession,
    rows: ParticleRows,
    xs: list[Seq],
    generator: torch.Generator,
) -> Cost:
    """``G`` of the complete particles and the twist (or the fully adapted potential and its
    children) of the incomplete ones, written into ``rows``."""
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
            rows, c = adapt(config, target, session, rows, logp_all, session.length, generator)
            cost = cost + c
    elif live_idx.numel():
        values, c = twist_values(
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
    return cost


def state_from_sequences(
    target: TiltedTarget,
    sequences: Sequence[Seq],
    *,
    generator: torch.Generator,
    **params: Any,
) -> SMCState:
    """One run whose particles are the given prefixes, with equal weights.

    Every sequence must be a complete response or an incomplete prefix of the common length ``t``
    (the longest one). The particles are teacher-forced through one session (costed), their
    twists drawn as in a run configured by ``params`` (those of
    :func:`~tiltsample.samplers.smc.sampler`). Used to start SMC from given particles and to test
    :func:`rejuvenate` against an exact intermediate target.
    """
    config = make_config(**params)
    xs, t = _checked_particles(target, sequences)
    state = init(target, generator=generator, num_particles=len(xs))
    session = state.session
    tok_lp, tok_lq, tok_h = _teacher_force(config, target, session, xs, t)
    rows = ParticleRows(state)
    rows.tok_log_p, rows.tok_log_q_move, rows.tok_entropy = tok_lp, tok_lq, tok_h
    rows.log_p = tok_lp.sum(dim=1)
    rows.finished = torch.tensor([target.is_complete(x) for x in xs], dtype=torch.bool)
    cost = _initial_twists(config, target, session, rows, xs, generator)
    rows.log_w = torch.zeros(len(xs), dtype=torch.float64)
    return with_rows(state, rows, cost + session.cost, 0, 0)


def rejuvenate(
    state: SMCState, generator: torch.Generator, *, num_moves: int = 1, **params: Any
) -> SMCState:
    """Apply ``num_moves`` MH suffix-regeneration moves to every particle (weights unchanged).

    Each move leaves the current intermediate target ``gamma_t`` invariant (``specs/smc.md`` §8):
    unfinished particles are moved among unfinished prefixes of the current length, finished
    ones stay as they are (the kernel of :func:`~tiltsample.samplers.smc.moves.move`);
    ``params`` are those of :func:`~tiltsample.samplers.smc.sampler` (twist, proposal, move
    temperature, cut law).
    """
    validation.non_negative_int("num_moves", num_moves)
    config = make_config(**params)
    if state.reference is not None:
        raise ValueError("rejuvenate does not apply to conditional SMC states")
    rows = ParticleRows(state)
    before = state.session.cost
    rows, cost, accepted, proposed = move_particles(
        config, state.target, state.session, rows, num_moves, generator
    )
    cost = cost + cost_delta(state.session.cost, before)
    return with_rows(state, rows, cost, accepted, proposed)
