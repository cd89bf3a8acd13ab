"""The SIR selection of a guidance step: candidate energies (exact for complete candidates, from
rollouts or an oracle potential otherwise), log-weights ``log Ê + log p/q``, the selection
probabilities ``w_m / Σ_j w_j``, and one draw per chain."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.results import Selection
from tiltsample.row_generators import RowGenerators
from tiltsample.samplers.ets.config import ETSConfig
from tiltsample.samplers.ets.rollout import log_mean_energy, needs_reference
from tiltsample.samplers.ets.scoring import AnswerCache, GroupScorer, Scorer
from tiltsample.samplers.ets.state import Batch
from tiltsample.types import Cost, Seq

__all__ = [
    "Estimates",
    "Scored",
    "candidate_log_weights",
    "draw_choices",
    "score_candidates",
    "select_and_update",
    "selection_probabilities",
]


class Estimates(NamedTuple):
    """What the incomplete candidates of a step got: rollouts, or oracle energies."""

    rollout_seqs: list[Seq]
    rollout_ref: Tensor | None
    rollout_ratio: Tensor | None
    potential_log_e: Tensor | None
    clipped: int
    rollout_tokens: int
    passes: int
    """Masked diffusion: the rollouts' denoiser passes, counted per row."""
    cost: Cost
    row_tokens: Tensor | None = None
    """Autoregressive rollouts: ``[R·K]`` generated tokens of every rollout."""


def selection_probabilities(log_weights: Tensor) -> tuple[Tensor, Tensor]:
    """``[n, M]`` SIR probabilities ``w_m / Σ_j w_j`` from log-weights, and ``failed [n]``.

    A row whose weights are all zero (``-inf``) has no valid candidate: it gets uniform
    probabilities and is marked failed (its draw then carries log-weight ``-inf``).
    """
    lw = log_weights.to(torch.float64)
    valid = torch.isfinite(lw).any(dim=1, keepdim=True)
    safe = torch.where(valid, lw, torch.zeros_like(lw))
    return torch.softmax(safe, dim=1), ~valid.squeeze(1)


def draw_choices(probs: Tensor, generator: torch.Generator | RowGenerators) -> Tensor:
    """``[n]`` one index per row of ``probs`` ``[n, M]``: ``torch.multinomial`` over all rows
    with ``generator``, or, with :class:`~tiltsample.row_generators.RowGenerators`, one
    multinomial over the rows of each group (that has rows) with the group's generator — the draw
    each independent run makes alone."""
    if isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    chosen = torch.zeros(probs.shape[0], dtype=torch.long)
    for g, gen in enumerate(generator.generators):
        rows = generator.rows_of(g)
        if rows.numel():
            chosen[rows] = torch.multinomial(probs[rows], 1, generator=gen).squeeze(1)
    return chosen


def candidate_log_weights(log_a: Tensor, log_e: Tensor) -> Tensor:
    """SIR log-weights ``log a + log Ê`` (``log a = log p_ref/q`` of the candidate block);
    ``-inf`` (weight zero) when either factor is zero."""
    zero = torch.isneginf(log_a) | torch.isneginf(log_e)
    return torch.where(zero, torch.full_like(log_e, -math.inf), log_a + log_e)


class Scored(NamedTuple):
    """The energies of a step's candidates (what :func:`score_candidates` returns)."""

    log_e: Tensor
    reward_of: dict[int, float]
    caches: list[AnswerCache] | None
    cost: Cost


def select_and_update(
    cfg: ETSConfig,
    batch: Batch,
    cand_keys: list[Seq],
    cand_out: list[Seq | None],
    complete: Tensor,
    log_w: Tensor,
    cand_ref: Tensor,
    scored: Scored,
    generator: torch.Generator | RowGenerators,
) -> tuple[Batch, Tensor, Tensor, list[int]]:
    """Draw one candidate per live chain (:func:`draw_choices`; a ``RowGenerators`` has one row
    per live chain); return the updated batch fields and which rows go on."""
    m = cfg.num_candidates
    n_live = len(batch.live)
    probs, failed_now = selection_probabilities(log_w)
    chosen = draw_choices(probs, generator)
    outputs = list(batch.outputs)
    rewards = batch.rewards.clone()
    failed = batch.failed.clone()
    failed_at = list(batch.failed_at)
    log_ref = batch.log_reference.clone()
    selections = [list(s) for s in batch.selections]
    keep: list[int] = []
    flat = (torch.arange(n_live) * m + chosen).tolist()
    for r, chain in enumerate(batch.live):
        f = flat[r]
        if bool(failed_now[r]) and not bool(failed[chain]):
            failed[chain] = True
            failed_at[chain] = batch.guidance_step + 1
        if cfg.record_selections:
            selections[chain].append(
                Selection(tuple(cand_keys[r * m : (r + 1) * m]), probs[r].clone(), int(chosen[r]))
            )
        log_ref[chain] = cand_ref[f]
        if bool(complete[f]):
            outputs[chain] = cand_out[f]
            rewards[chain] = scored.reward_of.get(f, math.nan)
        else:
            keep.append(f)
    new = batch._replace(
        outputs=outputs,
        rewards=rewards,
        failed=failed,
        failed_at=failed_at,
        log_reference=log_ref,
        selections=selections,
        caches=scored.caches,
        guidance_step=batch.guidance_step + 1,
        first_log_weights=log_w if batch.guidance_step == 0 else batch.first_log_weights,
    )
    return new, probs, chosen, keep


def score_candidates(
    cfg: ETSConfig,
    scorer: Scorer | GroupScorer,
    batch: Batch,
    cand_seqs: list[Seq | None],
    cand_ref: Tensor,
    complete: Tensor,
    rollout_seqs: list[Seq],
    rollout_ref: Tensor | None,
    rollout_log_ratio: Tensor | None,
    rollout_rows: Tensor,
    potential_log_e: Tensor | None,
) -> Scored:
    """Energies of all candidates: exact for complete ones, rollouts (or a potential) otherwise."""
    m = cfg.num_candidates
    total = len(cand_seqs)
    comp = complete.nonzero().flatten().tolist()
    seqs: list[Seq] = [x for x in (cand_seqs[j] for j in comp) if x is not None]
    seqs = seqs + rollout_seqs
    refs: Tensor | None = None
    if needs_reference(scorer.target):
        parts = [cand_ref[comp]]
        if rollout_ref is not None:
            parts.append(rollout_ref)
        refs = torch.cat(parts)
    k = cfg.num_rollouts
    owners = [batch.live[j // m] for j in comp] + [
        batch.live[int(j) // m] for j in rollout_rows.repeat_interleave(k).tolist()
    ][: len(rollout_seqs)]
    scores, caches = scorer(seqs, refs, owners, batch.caches)
    log_e = torch.full((total,), -math.inf, dtype=torch.float64)
    if comp:
        log_e[comp] = scores.log_tilt[: len(comp)]
    if potential_log_e is not None:
        log_e[rollout_rows] = potential_log_e
    elif rollout_seqs:
        assert rollout_log_ratio is not None
        log_e[rollout_rows] = log_mean_energy(rollout_log_ratio, scores.log_tilt[len(comp) :], k)
    reward_of: dict[int, float] = {}
    if scores.reward is not None:
        for pos, j in enumerate(comp):
            reward_of[j] = float(scores.reward[pos])
    return Scored(log_e, reward_of, caches, scores.cost)
