r"""FK steering's steps: one interval of the base sampler (:func:`base_step`) or of the guided
proposal (:func:`guided_step`), its potentials, and the resampling decision of every run
(:func:`resample_and_pack`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tiltsample.diffusion import denoise, states_to_seqs
from tiltsample.samplers.smc.fk_model import (
    FKConfig,
    FKInfo,
    FKState,
    add_log_weight,
    final_log_tilt,
    floored_log_reward,
    sort_by_tilt,
)
from tiltsample.samplers.smc.resampling import batched_resample, ess_rows
from tiltsample.types import Cost

__all__ = ["base_step", "guided_step", "resample_and_pack"]


def base_step(
    config: FKConfig, generator: torch.Generator, state: FKState
) -> tuple[FKState, FKInfo]:
    """``resample_every`` steps of the base sampler, the potential ``G_k`` (or the final
    ``G / prod_k G_k``), then the resampling decision."""
    target = state.target
    policy: Any = target.policy
    total = int(policy.num_steps)
    stop = min(state.step + config.resample_every, total)
    den = denoise(policy, target.prompt, state.states, state.step, stop, generator)
    states, cost = den.states, den.cost
    log_w, log_psi = state.log_w.clone(), state.log_psi.clone()
    phi_prev, phi_max, phi_sum = state.phi_prev, state.phi_max, state.phi_sum
    log_tilt, reward = state.log_tilt, state.reward
    evaluations = state.evaluations
    if stop == total:  # complete: the last potential is G / prod_k G_k
        seqs = states_to_seqs(states, target.eos_id, int(policy.mask_id))
        log_tilt, rew, c = final_log_tilt(target, seqs)
        cost = cost + c
        if rew is not None:
            reward = rew
        last = torch.where(torch.isneginf(log_psi), torch.zeros_like(log_psi), -log_psi)
        log_w = add_log_weight(log_w, add_log_weight(log_tilt, last))
        log_psi = log_tilt
    else:
        phi, c = floored_log_reward(config, target, states, stop, generator)
        cost = cost + c
        evaluations += 1
        phi_max = torch.maximum(phi_max, phi)
        phi_sum = phi_sum + phi
        log_g = {
            "difference": phi - phi_prev,
            "max": phi_max,
            "sum": phi_sum,
            "immediate": phi,
            "none": torch.zeros_like(phi),
            "bon": torch.zeros_like(phi),
        }[config.potential]
        phi_prev = phi
        log_w = add_log_weight(log_w, log_g)
        log_psi = log_psi + log_g
    moved = state._replace(
        states=states,
        step=stop,
        evaluations=evaluations,
        phi_prev=phi_prev,
        phi_max=phi_max,
        phi_sum=phi_sum,
        log_psi=log_psi,
        log_w=log_w,
        log_tilt=log_tilt,
        reward=reward,
    )
    return resample_and_pack(config, generator, moved, cost)


def resample_and_pack(
    config: FKConfig, generator: torch.Generator, moved: FKState, cost: Cost
) -> tuple[FKState, FKInfo]:
    """The resampling decision (never after the last step) and the new state.

    ``moved``: the state after an interval of denoising steps and its potentials, before
    resampling (``log_z``, ``resample_count`` and ``cost`` still those before the interval);
    ``cost``: the interval's cost.
    """
    total = int(moved.target.policy.num_steps)  # type: ignore[attr-defined]
    n, groups = moved.num_particles, moved.num_groups
    m = n * groups
    stop = moved.step
    if stop == total and config.potential == "bon":
        moved = sort_by_tilt(moved)
    # resampling (never after the last step)
    log_z = moved.log_z.clone()
    counts = moved.resample_count.clone()
    lw = moved.log_w.view(groups, n)
    ess_now = ess_rows(lw)
    resampled = torch.zeros(groups, dtype=torch.bool)
    if stop < total and config.potential not in ("none", "bon"):  # IS: equal weights until the end
        always = config.ess_threshold >= 1.0
        need = (
            torch.ones(groups, dtype=torch.bool) if always else ess_now < config.ess_threshold * n
        )
        level = torch.logsumexp(lw, dim=1) - math.log(n)
        ok = torch.isfinite(level)
        log_z = torch.where(need & ~ok, torch.full_like(log_z, -math.inf), log_z)
        resampled = need & ok
        if bool(resampled.any()):
            gs = resampled.nonzero().flatten()
            weights = torch.exp(lw[gs] - torch.logsumexp(lw[gs], dim=1, keepdim=True))
            anc = batched_resample(config.resampling, generator, weights)
            ancestors = torch.arange(m)
            ancestors.view(groups, n)[gs] = gs[:, None] * n + anc
            log_z[gs] = log_z[gs] + level[gs]
            log_w = moved.log_w.clone()
            log_w.view(groups, n)[gs] = 0.0
            moved = moved._replace(
                states=moved.states[ancestors],
                log_psi=moved.log_psi[ancestors],
                phi_prev=moved.phi_prev[ancestors],
                phi_max=moved.phi_max[ancestors],
                phi_sum=moved.phi_sum[ancestors],
                log_w=log_w,
            )
            counts[gs] += 1
    new = moved._replace(log_z=log_z, resample_count=counts, cost=moved.cost + cost)
    return new, FKInfo(cost, ess_now, resampled)


def _children(policy: Any, states: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every next state ``s'`` of every row at step ``k`` (``[C, L]``), its base-sampler
    ``log p(s'|s)`` and its row."""
    children: list[tuple[int, ...]] = []
    log_p: list[float] = []
    owner: list[int] = []
    for i, row in enumerate(states.tolist()):
        for child, lp in policy.transitions(tuple(row), k):
            children.append(child)
            log_p.append(lp)
            owner.append(i)
    kids = torch.tensor(children, dtype=torch.long).view(-1, states.shape[1])
    lp_t = torch.tensor(log_p, dtype=torch.float64)
    own = torch.tensor(owner, dtype=torch.long)
    return kids, lp_t, own


def _choose(
    generator: torch.Generator,
    logits: Tensor,
    lp_t: Tensor,
    own: Tensor,
    log_w: Tensor,
    log_psi: Tensor,
) -> Tensor:
    """Draw one child per row from ``q ∝ p psi`` (by ``p_ref`` for a dead particle) and add
    ``log sum_{s'} p(s'|s) psi(s') - log psi(s)`` to its weight (``log_w`` updated in place)."""
    rows = log_w.numel()
    chosen = torch.empty(rows, dtype=torch.long)
    for i in range(rows):
        idx = (own == i).nonzero().flatten()
        li = logits[idx]
        norm = torch.logsumexp(li, 0)
        if bool(torch.isfinite(norm)):
            q = torch.exp(li - norm)
        else:  # every child has zero twist: the particle is dead, move by p_ref
            q = torch.exp(lp_t[idx] - torch.logsumexp(lp_t[idx], 0))
        j = int(idx[int(torch.multinomial(q, 1, generator=generator))])
        chosen[i] = j
        log_w[i] = add_log_weight(log_w[i : i + 1], (norm - log_psi[i]).reshape(1))[0]
    return chosen


def guided_step(
    config: FKConfig, generator: torch.Generator, state: FKState
) -> tuple[FKState, FKInfo]:
    r"""``resample_every`` steps of the guided proposal, then the resampling decision.

    From state ``s`` at step ``k`` the policy enumerates the next states ``s'`` with their
    base-sampler probabilities ``p(s'|s)``; with the twist ``psi(s') = exp(phi(s'))`` (``G`` for
    complete states) drawn once per child, the particle moves to ``s' ~ q(s'|s) ∝ p(s'|s)
    psi(s')`` and its weight gains ``log sum_{s'} p(s'|s) psi(s') - log psi(s)`` (the locally
    optimal proposal of the twisted Feynman–Kac model; the drawn child's twist is stored and
    reused as the next denominator, so random estimates telescope).
    """
    target = state.target
    policy: Any = target.policy
    total = int(policy.num_steps)
    mask = int(policy.mask_id)
    stop = min(state.step + config.resample_every, total)
    states = state.states.clone()
    log_w, log_psi = state.log_w.clone(), state.log_psi.clone()
    log_tilt, reward = state.log_tilt.clone(), state.reward.clone()
    evaluations = state.evaluations
    rows, length = states.shape
    cost = Cost()
    for k in range(state.step, stop):
        kids, lp_t, own = _children(policy, states, k)
        cost = cost + Cost(forward_tokens=rows * (len(target.prompt) + length), model_calls=1)
        last = k + 1 == total
        kid_reward = torch.full((kids.shape[0],), math.nan, dtype=torch.float64)
        if last:
            phi, rew, c = final_log_tilt(target, states_to_seqs(kids, target.eos_id, mask))
            if rew is not None:
                kid_reward = rew
        else:
            phi, c = floored_log_reward(config, target, kids, k + 1, generator)
            evaluations += 1
        cost = cost + c
        logits = torch.where(torch.isneginf(phi), phi, lp_t + phi)
        chosen = _choose(generator, logits, lp_t, own, log_w, log_psi)
        new_states = kids[chosen]
        committed = int((states == mask).sum()) - int((new_states == mask).sum())
        cost = cost + Cost(generated_tokens=committed)
        states = new_states
        log_psi = phi[chosen]
        if last:
            log_tilt = phi[chosen]
            reward = kid_reward[chosen]
    moved = state._replace(
        states=states,
        step=stop,
        evaluations=evaluations,
        phi_prev=log_psi.clone(),
        log_psi=log_psi,
        log_w=log_w,
        log_tilt=log_tilt,
        reward=reward,
    )
    return resample_and_pack(config, generator, moved, cost)
