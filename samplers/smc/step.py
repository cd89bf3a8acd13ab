r"""One SMC block step (``specs/smc.md`` §4): extend every unfinished particle by up to ``B``
tokens from the proposal, reweight (the true tilt on completion, the stored twist otherwise, or
the fully adapted increment of the optimal proposal), resample each run whose ESS fell below the
threshold, then apply the resample-move schedule.

A state with several targets (:func:`~tiltsample.samplers.smc.many.sample_many`) is split into
sections (:func:`~tiltsample.samplers.smc.state.sections`), one per target: every per-target
computation (tilt, twists, the optimal proposal's children) and every draw (tokens, resampling)
is made per section with the section's target and generator, in the order of the run alone, and
a section whose rows have all finished computes and draws nothing.

On a :class:`~tiltsample.policy.RolloutSession` (a serving engine) the extension is one decode
request per block (:mod:`~tiltsample.samplers.smc.rollout_block`; configurations that need full
next-token laws are refused there); the reweighting and resampling are the same."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample.decode_engine import Step, decode_step
from tiltsample.decoding import entropy
from tiltsample.policy import RolloutSession
from tiltsample.samplers.smc.config import SMCConfig
from tiltsample.samplers.smc.moves import gather_move_log_q, move_particles
from tiltsample.samplers.smc.numerics import (
    add_log,
    cost_delta,
    log_normalise,
    row_seqs,
    safe_log_softmax,
    tempered,
)
from tiltsample.samplers.smc.proposals import adapt_sections, twist_values
from tiltsample.samplers.smc.resampling import batched_resample, conditional_resample, ess_rows
from tiltsample.samplers.smc.rollout_block import rollout_extend
from tiltsample.samplers.smc.state import (
    ParticleRows,
    Section,
    SMCInfo,
    SMCState,
    sections,
    with_rows,
)
from tiltsample.token_laws import TokenLaw, draw_tokens
from tiltsample.types import Cost

__all__ = ["Resampling", "block_step", "kernel_from_config", "resample_runs"]


class _Block:
    """The accumulators of one block step."""

    def __init__(self, rows: ParticleRows, parts: list[Section]) -> None:
        self.parts = parts
        self.costs = [Cost()] * len(parts)
        """Each section's own cost (twists, rewards; generated tokens added at the end)."""
        self.generated = [0] * len(parts)
        self.inc = torch.zeros(rows.log_w.numel(), dtype=torch.float64)
        """Reference proposal: the block's ``sum (log p - log q)`` per row."""
        self.tok_lp: list[Tensor] = [rows.tok_log_p]
        self.tok_lq: list[Tensor] = [rows.tok_log_q_move]
        self.tok_h: list[Tensor] = [rows.tok_entropy]

    def add(self, costs: list[Cost]) -> None:
        """Add each section's cost."""
        self.costs = [a + b for a, b in zip(self.costs, costs, strict=True)]


def _reference_rows(state: SMCState) -> Tensor:
    """Row of particle 0 (the reference path of a conditional SMC) of every run."""
    return torch.arange(state.num_groups) * state.num_particles


def _law_next(
    config: SMCConfig,
    state: SMCState,
    rows: ParticleRows,
    block: _Block,
    logp_all: Tensor,
    forced: bool,
) -> Tensor:
    """The proposal's log-law ``[M, V]`` of the next token (the optimal proposal adapts the rows
    first; at the cap under ``truncation="condition"`` its law is a point mass on EOS)."""
    target, session = state.target, state.session
    if config.proposal != "optimal":
        return tempered(logp_all, config.temperature)
    if rows.pending is None:
        rows, c = adapt_sections(config, session, rows, logp_all, session.length, block.parts)
        block.add(c)
    assert rows.pending is not None and rows.pending_reward is not None
    fallback = logp_all  # rows whose children all have weight 0 (dead particles)
    if forced:
        fallback = torch.full_like(logp_all, -math.inf)
        fallback[:, target.eos_id] = 0.0
    return safe_log_softmax(logp_all + rows.pending, fallback)


def _next_tokens(
    config: SMCConfig,
    state: SMCState,
    rows: ParticleRows,
    block: _Block,
    logp_all: Tensor,
    forced: bool,
    generator: torch.Generator | None,
) -> Step:
    """One position of every row by the decode engine (:func:`decode_step`): drawn from the
    proposal, EOS at the cap under ``truncation="condition"`` (the optimal proposal's law is EOS
    there already, and it draws), the reference rows of a conditional SMC teacher-forced to their
    path, finished rows EOS padding."""
    target, session = state.target, state.session
    m, eos, cap = rows.log_w.numel(), target.eos_id, target.max_new_tokens
    optimal = config.proposal == "optimal"
    log_q_all = _law_next(config, state, rows, block, logp_all, forced)
    live = ~rows.finished
    forced_tok = is_forced = None
    if state.reference is not None:
        ref = _reference_rows(state)
        is_forced = torch.zeros(m, dtype=torch.bool)
        is_forced[ref] = True
        forced_tok = torch.full((m,), eos, dtype=torch.long)
        forced_tok[ref] = state.reference[:, session.length]
        if (optimal or not forced) and not bool((live & ~is_forced).any()):
            # only reference rows are live: the engine draws nothing, but SMC always drew one
            # token per row here; keep that draw so that the generator's stream is unchanged
            assert generator is not None
            draw_tokens(generator, log_q_all)
    return decode_step(
        logp_all,
        lambda lp: TokenLaw(log_q_all, lp, entropy(lp)),
        eos_id=eos,
        live=live,
        position=torch.full((m,), session.length, dtype=torch.long),
        cap=torch.full((m,), cap, dtype=torch.long),
        force_eos=target.truncation == "condition" and not optimal,
        forced=forced_tok,
        is_forced=is_forced,
        generator=generator if state.generators is None else state.generators,
        record_entropy=True,
    )


def _extend(
    config: SMCConfig,
    state: SMCState,
    rows: ParticleRows,
    block: _Block,
    generator: torch.Generator | None,
) -> None:
    """Extend every unfinished particle by one token and book its laws (``rows`` and ``block``
    updated in place)."""
    target, session = state.target, state.session
    m, cap = rows.log_w.numel(), target.max_new_tokens
    optimal = config.proposal == "optimal"
    live = ~rows.finished
    logp_all = session.logprobs().to(torch.float64)
    forced = target.truncation == "condition" and session.length == cap - 1
    out = _next_tokens(config, state, rows, block, logp_all, forced, generator)
    tok, lp = out.tokens, out.log_p
    if not optimal:
        step_inc = torch.where(torch.isneginf(lp), lp, lp - out.log_q)
        block.inc = block.inc + torch.where(live, step_inc, torch.zeros_like(step_inc))
    if forced:
        lq_move = torch.zeros(m, dtype=torch.float64)
    else:
        lq_move = gather_move_log_q(logp_all, tok, config.move_tau, target.eos_id)
    zero = torch.zeros(m, dtype=torch.float64)
    session.extend(out.fed)
    rows.log_p = rows.log_p + lp
    block.tok_lp.append(lp[:, None])
    block.tok_lq.append(torch.where(live, lq_move, zero)[:, None])
    assert out.entropy is not None
    block.tok_h.append(out.entropy[:, None])
    block.generated = [
        n + int(out.generated[part.rows].sum())
        for n, part in zip(block.generated, block.parts, strict=True)
    ]
    just = live & ~out.live
    if optimal:
        assert rows.pending is not None and rows.pending_reward is not None
        new_psi = rows.pending.gather(1, tok[:, None]).squeeze(1)
        rows.log_psi = torch.where(live, new_psi, rows.log_psi)
        new_rew = rows.pending_reward.gather(1, tok[:, None]).squeeze(1)
        rows.reward = torch.where(just, new_rew, rows.reward)
        rows.pending = rows.pending_reward = rows.log_next = None
    rows.finished = rows.finished | just


def _reweight(
    config: SMCConfig,
    state: SMCState,
    rows: ParticleRows,
    live0: Tensor,
    inc: Tensor,
    parts: list[Section],
    *,
    adapted: bool,
) -> list[Cost]:
    r"""The block's weight update of the rows unfinished before it (``live0``); each section's
    cost.

    Reference proposal (and every rollout-level block, ``adapted=False``):
    ``log w += inc + log psi_new - log psi_old`` with ``psi_new = G`` on completion and a fresh
    twist otherwise (one tilt and one twist call per section with such rows). Token-level optimal
    proposal (``adapted=True``): the next token's fully adapted increment (known before it is
    drawn, :func:`~tiltsample.samplers.smc.proposals.adapt_sections`).
    """
    session = state.session
    eos = state.target.eos_id
    if adapted:
        if not bool((~rows.finished).any()):
            return [Cost()] * len(parts)
        logp_all = session.logprobs().to(torch.float64)
        rows, costs = adapt_sections(config, session, rows, logp_all, session.length, parts)
        return costs
    tokens = session.tokens()
    new_psi = rows.log_psi.clone()
    costs = []
    for part in parts:
        mine = torch.zeros_like(live0)
        mine[part.rows] = True
        newly = (mine & live0 & rows.finished).nonzero().flatten()
        still = (mine & live0 & ~rows.finished).nonzero().flatten()
        cost = Cost()
        if newly.numel():
            seqs = row_seqs(tokens, newly, eos)
            scores = part.target.evaluate_tilt(seqs, log_reference=rows.log_p[newly])
            new_psi[newly] = scores.log_tilt
            if scores.reward is not None:
                rows.reward[newly] = scores.reward
            cost = cost + scores.cost
        if still.numel():
            seqs = row_seqs(tokens, still, eos)
            values, c = twist_values(
                config, part.target, session, still, seqs, rows.log_p[still], part.generator
            )
            new_psi[still] = values
            cost = cost + c
        costs.append(cost)
    updated = add_log(rows.log_w, inc + new_psi, rows.log_psi)
    rows.log_w = torch.where(live0, updated, rows.log_w)
    rows.log_psi = new_psi
    return costs


class Resampling(NamedTuple):
    """The resampling decision of every run after a block."""

    log_z: Tensor
    """``[G]`` accumulated ``log Ẑ`` (``-inf`` for a run that failed)."""
    counts: Tensor
    """``[G]`` resampling events so far."""
    ess: Tensor
    """``[G]`` ESS at the decision (NaN for a run with nothing left to do)."""
    resampled: Tensor
    """``[G]`` bool."""


def _ancestors(
    config: SMCConfig, state: SMCState, lw: Tensor, resampled: Tensor, parts: list[Section]
) -> Tensor:
    """``[M]`` ancestor rows: each run of ``resampled`` draws its ancestors with its section's
    generator (one vectorised draw per section, as alone); the other rows keep their own."""
    n, groups = state.num_particles, state.num_groups
    ancestors = torch.arange(n * groups)
    for part in parts:
        gs = resampled[part.runs].nonzero().flatten() + part.runs.start
        if not gs.numel():
            continue
        weights = torch.exp(log_normalise(lw[gs]))
        if state.reference is not None:
            anc = conditional_resample(config.resampling, part.generator, weights)
        else:
            anc = batched_resample(config.resampling, part.generator, weights)
        ancestors.view(groups, n)[gs] = gs[:, None] * n + anc
    return ancestors


def resample_runs(
    config: SMCConfig,
    state: SMCState,
    rows: ParticleRows,
    generator: torch.Generator | None,
) -> Resampling:
    """Resample each run whose ESS is below ``ess_threshold · N`` (never after its last block),
    conditionally when the state has reference paths; the evidence bookkeeping follows
    ``config.convention``. ``rows`` and the session are reordered by the ancestors. The draws
    come from ``generator`` or, for a state with several targets, from each section's own
    (``generator`` may then be ``None``)."""
    n, groups = state.num_particles, state.num_groups
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
    if bool(resampled.any()):
        ancestors = _ancestors(config, state, lw, resampled, sections(state, generator))
        gs = resampled.nonzero().flatten()
        if config.convention == "reset":
            log_z[gs] = log_z[gs] + level[gs]
            rows.log_w.view(groups, n)[gs] = 0.0
        else:
            rows.log_w.view(groups, n)[gs] = level[gs][:, None].expand(-1, n).clone()
        counts[gs] += 1
        state.session.select(ancestors)
        rows.select(ancestors)
    return Resampling(log_z, counts, ess_now, resampled)


def _check_sections(config: SMCConfig, state: SMCState, rollout: bool) -> None:
    """Refuse what a state with several targets does not support (``ValueError``)."""
    if state.targets is None:
        return
    if rollout:
        raise ValueError("several targets in one SMC state need a token-level decode session")
    if config.num_moves:
        raise ValueError("num_moves must be 0 for several targets in one SMC state")
    if state.reference is not None:
        raise ValueError("conditional SMC (reference paths) takes one target per state")


def block_step(
    config: SMCConfig, generator: torch.Generator | None, state: SMCState
) -> tuple[SMCState, SMCInfo]:
    """One block step of every run (the kernel of :func:`kernel_from_config`).

    ``generator`` draws everything for a one-target state; a state with several targets draws
    from its own per-section generators and ignores it (it may be ``None``)."""
    session = state.session
    session_before = session.cost
    rows = ParticleRows(state)
    live0 = ~rows.finished
    rollout = isinstance(session, RolloutSession)
    _check_sections(config, state, rollout)
    parts = sections(state, generator)
    costs = [Cost()] * len(parts)
    if rollout:  # one decode request for the block (refuses what needs full laws)
        assert generator is not None
        ext = rollout_extend(config, state, rows, generator)
        inc, generated = ext.inc, [ext.generated]
    else:
        block = _Block(rows, parts)
        for _ in range(config.block_size):
            if not bool((~rows.finished).any()):
                break
            _extend(config, state, rows, block, generator)
        rows.tok_log_p = torch.cat(block.tok_lp, dim=1)
        rows.tok_log_q_move = torch.cat(block.tok_lq, dim=1)
        rows.tok_entropy = torch.cat(block.tok_h, dim=1)
        inc, generated, costs = block.inc, block.generated, block.costs
    adapted = config.proposal == "optimal" and not rollout
    extra = _reweight(config, state, rows, live0, inc, parts, adapted=adapted)
    own = tuple(
        c + e + Cost(generated_tokens=g) for c, e, g in zip(costs, extra, generated, strict=True)
    )
    res = resample_runs(config, state, rows, generator)
    cost = sum(own, Cost())
    accepted = proposed = 0
    if config.num_moves and state.reference is None:
        # after every block, in every run, resampled or not: a schedule that depends on t only
        # (moving only after an ESS-triggered resampling would tie the moves to the weights)
        assert generator is not None
        rows, c, accepted, proposed = move_particles(
            config, state.target, session, rows, config.num_moves, generator
        )
        cost = cost + c
    cost = cost + cost_delta(session.cost, session_before)
    new_state = with_rows(state, rows, cost, accepted, proposed)._replace(
        log_z=res.log_z,
        steps=state.steps + 1,
        resample_count=res.counts,
        ess_history=(*state.ess_history, res.ess),
    )
    return new_state, SMCInfo(cost, res.ess, res.resampled, own)


def kernel_from_config(config: SMCConfig) -> Any:
    """The step function ``step(generator, state) -> (state, info)`` of a validated
    :class:`~tiltsample.samplers.smc.config.SMCConfig`."""

    def step(generator: torch.Generator, state: SMCState) -> tuple[SMCState, SMCInfo]:
        return block_step(config, generator, state)

    return step
