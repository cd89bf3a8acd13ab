"""One ETS guidance step on an autoregressive policy, for every running chain of a lock-step batch.

The ``M`` candidate blocks of every chain are decoded in one batched session (the chains'
prefixes expanded by ``select``, never re-encoded); complete candidates are scored exactly, the
incomplete ones by ``K`` rollouts (from ``p_ref`` or an ETS-IS proposal) or an oracle potential;
then one SIR draw per chain (:mod:`~tiltsample.samplers.ets.selection`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tiltsample.decoding import decode_until_complete, rows_to_seqs
from tiltsample.policy import DecodeSession
from tiltsample.samplers.ets.config import ETSConfig, resolve_block_size
from tiltsample.samplers.ets.rollout import rollouts_from_sessions
from tiltsample.samplers.ets.scoring import Scorer
from tiltsample.samplers.ets.selection import (
    Estimates,
    candidate_log_weights,
    score_candidates,
    select_and_update,
)
from tiltsample.samplers.ets.state import Batch, ETSInfo, cost_delta
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["autoregressive_step"]


def autoregressive_step(
    cfg: ETSConfig, scorer: Scorer, target: TiltedTarget, batch: Batch, gen: torch.Generator
) -> tuple[Batch, ETSInfo]:
    """One guidance step of every live chain of ``batch`` (autoregressive policy)."""
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
    session.select(rep)
    dec = decode_until_complete(
        session,
        gen,
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
    est = _estimate_incomplete(cfg, target, session, prop, cand_seqs, cand_ref, inc, gen)
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
        cfg, batch, list(cand_seqs), list(cand_seqs), complete, log_w, cand_ref, scored, gen
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
    new = new._replace(live=live, cost=batch.cost + step_cost, counters=counters)
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
    gen: torch.Generator,
) -> Estimates:
    """Energies of the incomplete candidates ``inc`` (the rows of ``session``): ``K`` rollouts
    each, or the oracle potential."""
    k = cfg.num_rollouts
    extra = Cost()
    rollout_seqs: list[Seq] = []
    rollout_ref = rollout_ratio = potential_log_e = None
    clipped = rollout_tokens = 0
    if len(inc):
        if cfg.potential is not None:
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
    )
