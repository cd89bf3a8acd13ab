"""One ETS guidance step on a masked-diffusion policy, for every running chain of a batch.

A guidance step runs ``B`` denoising steps of the base sampler for each of the ``M`` candidates
of every chain; the candidates are complete only at the last step (scored exactly), before it
their energies come from ``K`` rollouts of the base sampler (or an exact-ratio ETS-IS proposal)
to step ``T``, or from an oracle state potential; then one SIR draw per chain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tiltsample.diffusion import denoise, states_to_seqs
from tiltsample.samplers.ets.config import ETSConfig, resolve_block_size
from tiltsample.samplers.ets.rollout import diffusion_rollouts, needs_reference
from tiltsample.samplers.ets.scoring import Scorer
from tiltsample.samplers.ets.selection import (
    Estimates,
    candidate_log_weights,
    score_candidates,
    select_and_update,
)
from tiltsample.samplers.ets.state import Batch, ETSInfo
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["masked_diffusion_step"]


def masked_diffusion_step(
    cfg: ETSConfig, scorer: Scorer, target: TiltedTarget, batch: Batch, gen: torch.Generator
) -> tuple[Batch, ETSInfo]:
    """One guidance step of every live chain of ``batch`` (masked-diffusion policy)."""
    policy: Any = target.policy
    m = cfg.num_candidates
    total_steps = int(policy.num_steps)
    block = resolve_block_size(target, cfg.block_size)
    assert batch.states is not None
    n_live = len(batch.live)
    s0 = batch.guidance_step * block
    s1 = min(s0 + block, total_steps)
    cands = batch.states.repeat_interleave(m, dim=0)
    den = denoise(policy, target.prompt, cands, s0, s1, gen)
    cand_states = den.states
    finished = s1 == total_steps
    rows_total = n_live * m
    complete = torch.full((rows_total,), finished, dtype=torch.bool)
    cand_keys: list[Seq] = [tuple(r) for r in cand_states.tolist()]
    cand_out: list[Seq | None] = [None] * rows_total
    if finished:
        cand_out = list(states_to_seqs(cand_states, target.eos_id, int(policy.mask_id)))
        cand_keys = [x for x in cand_out if x is not None]
    cand_ref = (
        target.log_reference(cand_out)  # type: ignore[arg-type]
        if finished and needs_reference(target)
        else torch.zeros(rows_total, dtype=torch.float64)
    )
    inc = torch.arange(rows_total) if not finished else torch.zeros(0, dtype=torch.long)
    est = _estimate_incomplete(cfg, target, cand_states, s1, finished, gen)
    scored = score_candidates(
        cfg,
        scorer,
        batch,
        cand_out,
        cand_ref,
        complete,
        est.rollout_seqs,
        est.rollout_ref,
        est.rollout_ratio,
        inc,
        est.potential_log_e,
    )
    log_a = torch.zeros(rows_total, dtype=torch.float64)
    log_w = candidate_log_weights(log_a, scored.log_e).view(n_live, m)
    new, probs, chosen, keep = select_and_update(
        cfg, batch, cand_keys, cand_out, complete, log_w, cand_ref, scored, gen
    )
    states = cand_states[torch.tensor(keep, dtype=torch.long)] if keep else cand_states[:0]
    live = [batch.live[f // m] for f in keep]
    step_cost = den.cost + est.cost + scored.cost
    counters = dict(batch.counters)
    counters["candidate_tokens"] += den.cost.generated_tokens
    counters["rollout_tokens"] += est.rollout_tokens
    counters["rollouts"] += len(est.rollout_seqs)
    counters["clipped"] += est.clipped
    counters["denoiser_passes"] += den.row_passes + est.passes
    new = new._replace(live=live, states=states, cost=batch.cost + step_cost, counters=counters)
    info = ETSInfo(
        step_cost, new.guidance_step, probs, log_w, chosen, complete.view(n_live, m), est.clipped
    )
    return new, info


def _estimate_incomplete(
    cfg: ETSConfig,
    target: TiltedTarget,
    cand_states: Tensor,
    step: int,
    finished: bool,
    gen: torch.Generator,
) -> Estimates:
    """Energies of the candidate states (all incomplete unless ``finished``) at denoising step
    ``step``: ``K`` rollouts each, or the oracle state potential."""
    extra = Cost()
    rollout_seqs: list[Seq] = []
    rollout_ref = rollout_ratio = potential_log_e = None
    clipped = rollout_tokens = passes = 0
    if not finished:
        if cfg.potential is not None:
            potential_log_e, pcost = cfg.potential.log_potential_states(
                target.prompt, cand_states, step, gen
            )
            potential_log_e = potential_log_e.to(torch.float64)
            extra = extra + pcost
        else:
            rb = diffusion_rollouts(
                target,
                cand_states,
                step,
                cfg.num_rollouts,
                gen,
                proposal=cfg.proposal,
                is_log_ratio_clip=cfg.is_log_ratio_clip,
            )
            rollout_seqs = rb.sequences
            rollout_ref = rb.log_reference
            rollout_ratio = rb.log_ratio
            clipped = rb.clipped
            rollout_tokens = rb.cost.generated_tokens
            passes = rb.row_passes
            extra = extra + rb.cost
    return Estimates(
        rollout_seqs,
        rollout_ref,
        rollout_ratio,
        potential_log_e,
        clipped,
        rollout_tokens,
        passes,
        extra,
    )
