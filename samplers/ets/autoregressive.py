"""One ETS guidance step on an autoregressive policy, for every running chain of a lock-step batch.

The ``M`` candidate blocks of every chain are decoded in one batched session (the chains'
prefixes expanded by ``select``, never re-encoded); complete candidates are scored exactly, the
incomplete ones by ``K`` rollouts (from ``p_ref`` or an ETS-IS proposal) or an oracle potential;
then one SIR draw per chain (:mod:`~tiltsample.samplers.ets.selection`).

Chains of several targets (independent runs batched across problems,
:mod:`~tiltsample.samplers.ets.many`) share the step: a
:class:`~tiltsample.row_generators.RowGenerators` over the batch's chains gives every row
(candidate, rollout, selection) its chain's generator, and a
:class:`~tiltsample.samplers.ets.scoring.GroupScorer` scores each chain under its own target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tiltsample.decoding import decode_until_complete, rows_to_seqs
from tiltsample.policy import DecodeSession
from tiltsample.row_generators import RowGenerators
from tiltsample.samplers.ets.config import ETSConfig, resolve_block_size
from tiltsample.samplers.ets.rollout import rollouts_from_sessions
from tiltsample.samplers.ets.scoring import GroupScorer, Scorer
from tiltsample.samplers.ets.selection import (
    Estimates,
    candidate_log_weights,
    score_candidates,
    select_and_update,
)
from tiltsample.samplers.ets.state import Batch, ETSInfo, cost_delta
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["autoregressive_step", "generator_of_rows"]


def generator_of_rows(
    gen: torch.Generator | RowGenerators, chains: Tensor
) -> torch.Generator | RowGenerators:
    """The generator(s) of rows that belong to the chains ``chains`` (one per row): ``gen``
    itself, or the chains' groups when ``gen`` is a ``RowGenerators`` over the batch's chains."""
    return gen if isinstance(gen, torch.Generator) else gen.subset(chains)


def autoregressive_step(
    cfg: ETSConfig,
    scorer: Scorer | GroupScorer,
    target: TiltedTarget,
    batch: Batch,
    gen: torch.Generator | RowGenerators,
) -> tuple[Batch, ETSInfo]:
    """One guidance step of every live chain of ``batch`` (autoregressive policy).

    ``gen``: one generator for all chains, or a ``RowGenerators`` with one row per chain of the
    batch (batch-local index): every draw of a chain then comes from its own group's generator,
    in the order and shapes of that group's run alone. ``target`` gives the length rules
    (shared by all chains); ``scorer`` the energies.
    """
    m = cfg.num_candidates
    d = target.max_new_tokens
    block = resolve_block_size(target, cfg.block_size)
    session = batch.session
    assert session is not None
    prop = batch.proposal_session
    s_before = session.cost
    p_before = Cost() if prop is None else prop.cost
    n_live = len(batch.live)
    t0 = session.length
    stop = min((batch.guidance_step + 1) * block, d)
    rep = torch.arange(n_live).repeat_interleave(m)
    live_chains = torch.tensor(batch.live, dtype=torch.long)
    cand_gen = generator_of_rows(gen, live_chains[rep])
    session.select(rep)
    dec = decode_until_complete(
        session,
        cand_gen,
        eos_id=target.eos_id,
        max_length=d,
        temperature=cfg.temperature,
        force_eos_at_cap=target.truncation == "condition",
        max_new=stop - t0,
    )
    cand_seqs = rows_to_seqs(session.tokens(), target.eos_id)
    log_a = torch.where(torch.isneginf(dec.log_p), dec.log_p, dec.log_p - dec.log_q)
    cand_ref = batch.log_reference[batch.live].repeat_interleave(m) + dec.log_p
    complete = torch.tensor([target.is_complete(x) for x in cand_seqs], dtype=torch.bool)
    if prop is not None:
        prop.select(rep)
        prop.extend(dec.tokens)
    inc = (~complete).nonzero().flatten()
    if len(inc) < len(complete):  # drop the complete candidates (scored exactly, no rollouts)
        session.select(inc)
        if prop is not None:
            prop.select(inc)
    inc_gen = generator_of_rows(cand_gen, inc)
    est = _estimate_incomplete(cfg, target, session, prop, cand_seqs, cand_ref, inc, inc_gen)
    scored = score_candidates(
        cfg,
        scorer,
        batch,
        list(cand_seqs),
        cand_ref,
        complete,
        est.rollout_seqs,
        est.rollout_ref,
        est.rollout_ratio,
        inc,
        est.potential_log_e,
    )
    log_w = candidate_log_weights(log_a, scored.log_e).view(n_live, m)
    new, probs, chosen, keep = select_and_update(
        cfg,
        batch,
        list(cand_seqs),
        list(cand_seqs),
        complete,
        log_w,
        cand_ref,
        scored,
        generator_of_rows(gen, live_chains),
    )
    pos = {int(j): p for p, j in enumerate(inc.tolist())}
    rows = torch.tensor([pos[f] for f in keep], dtype=torch.long)
    session.select(rows)
    if prop is not None:
        prop.select(rows)
    live = [batch.live[f // m] for f in keep]
    step_cost = (
        cost_delta(session.cost, s_before)
        + (Cost() if prop is None else cost_delta(prop.cost, p_before))
        + Cost(generated_tokens=dec.generated_tokens)
        + est.cost
        + scored.cost
    )
    counters = dict(batch.counters)
    counters["candidate_tokens"] += dec.generated_tokens
    counters["rollout_tokens"] += est.rollout_tokens
    counters["rollouts"] += len(est.rollout_seqs)
    counters["clipped"] += est.clipped
    new = new._replace(
        live=live,
        cost=batch.cost + step_cost,
        counters=counters,
        chain_counts=_chain_counts(batch, m, dec.new_lengths, inc, est),
    )
    info = ETSInfo(
        step_cost, new.guidance_step, probs, log_w, chosen, complete.view(n_live, m), est.clipped
    )
    return new, info


def _estimate_incomplete(
    cfg: ETSConfig,
    target: TiltedTarget,
    session: DecodeSession,
    prop: DecodeSession | None,
    cand_seqs: list[Seq],
    cand_ref: Tensor,
    inc: Tensor,
    gen: torch.Generator | RowGenerators,
) -> Estimates:
    """Energies of the incomplete candidates ``inc`` (the rows of ``session``): ``K`` rollouts
    each, or the oracle potential."""
    k = cfg.num_rollouts
    extra = Cost()
    rollout_seqs: list[Seq] = []
    rollout_ref = rollout_ratio = potential_log_e = row_tokens = None
    clipped = rollout_tokens = 0
    if len(inc):
        if cfg.potential is not None:
            if not isinstance(gen, torch.Generator):
                raise ValueError("potential= needs one torch.Generator for all chains")
            potential_log_e, pcost = cfg.potential.log_potential(
                target.prompt, [cand_seqs[j] for j in inc.tolist()], gen
            )
            potential_log_e = potential_log_e.to(torch.float64)
            extra = extra + pcost
        else:
            rb = rollouts_from_sessions(
                target,
                session,
                prop,
                k,
                gen,
                temperature=cfg.proposal_temperature,
                is_log_ratio_clip=cfg.is_log_ratio_clip,
            )
            rollout_seqs = rb.sequences
            rollout_ref = cand_ref[inc].repeat_interleave(k) + rb.log_reference
            rollout_ratio = rb.log_ratio
            clipped = rb.clipped
            rollout_tokens = rb.cost.generated_tokens
            row_tokens = rb.row_tokens
            extra = extra + rb.cost
    return Estimates(
        rollout_seqs,
        rollout_ref,
        rollout_ratio,
        potential_log_e,
        clipped,
        rollout_tokens,
        0,
        extra,
        row_tokens,
    )


def _chain_counts(
    batch: Batch, m: int, cand_tokens: Tensor, inc: Tensor, est: Estimates
) -> Tensor | None:
    """``batch.chain_counts`` after this step: per chain, ``+`` the generated tokens of its ``M``
    candidates (``cand_tokens`` ``[n_live·M]``), of its rollouts and their number."""
    if batch.chain_counts is None:
        return None
    counts = batch.chain_counts.clone()
    live = torch.tensor(batch.live, dtype=torch.long)
    counts[:, 0].index_add_(0, live, cand_tokens.view(-1, m).sum(1).to(torch.long))
    if est.row_tokens is not None and len(inc):
        k = est.row_tokens.numel() // len(inc)
        owner = live[inc // m].repeat_interleave(k)
        counts[:, 1].index_add_(0, owner, est.row_tokens.to(torch.long))
        counts[:, 2].index_add_(0, owner, torch.ones_like(owner))
    return counts
