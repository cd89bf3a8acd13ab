"""The stage schedule of Karan & Du (``block_size = B``): stage caps ``L_k = min(kB, L)``, the
move to the next stage (finish chains at EOS, extend the others by ``q_tau``), and the length of
a run."""

from __future__ import annotations

import math

import torch

from tiltsample import validation
from tiltsample.samplers.mh.config import MHConfig
from tiltsample.samplers.mh.proposals import merge_root, regenerate, splice
from tiltsample.samplers.mh.scoring import staged_reward
from tiltsample.samplers.mh.state import MHState, is_complete, rows_force_eos

__all__ = ["advance_stage", "stage_caps", "total_steps"]


def stage_caps(max_new_tokens: int, block_size: int | None) -> list[int]:
    """Caps ``L_k = min(k·B, L)`` of the stages ``k = 1..ceil(L/B)`` (``[L]`` without stages)."""
    validation.positive_int("max_new_tokens", max_new_tokens)
    if block_size is None:
        return [max_new_tokens]
    validation.positive_int("block_size", block_size)
    num = math.ceil(max_new_tokens / block_size)
    return [min((k + 1) * block_size, max_new_tokens) for k in range(num)]


def advance_stage(state: MHState, generator: torch.Generator) -> MHState:
    """Finish chains whose state ends with EOS; extend the others to the next stage's cap."""
    complete = is_complete(state)
    active = state.active & ~complete
    stage = state.stage + 1
    final = stage == len(state.caps)
    if state.config.length_mode == "reference":
        new_cap = (state.length + (state.config.block_size or 0)).clamp(
            max=state.target.max_new_tokens
        )
    else:
        new_cap = torch.full_like(state.length, state.caps[stage - 1])
    chain_cap = torch.where(active, new_cap, state.chain_cap)
    rows = active.nonzero().flatten()
    suf, handles, serial, cost, proposals = regenerate(
        state._replace(active=active),
        generator,
        rows,
        state.length[rows],
        chain_cap[rows],
        rows_force_eos(state, final),
    )
    tokens, ell, g, ent = (
        state.tokens.clone(),
        state.ell.clone(),
        state.g.clone(),
        state.entropy.clone(),
    )
    cuts = state.length[rows]
    tokens[rows] = splice(tokens[rows], cuts, suf.tokens, state.target.eos_id)
    ell[rows] = splice(ell[rows], cuts, suf.ell, 0.0)
    g[rows] = splice(g[rows], cuts, suf.g, 0.0)
    ent[rows] = splice(ent[rows], cuts, suf.entropy, 0.0)
    length = state.length.clone()
    length[rows] = cuts + suf.length
    log_ref = ell.sum(dim=1)
    root, merge_cost = merge_root(
        state, rows, torch.ones(int(rows.numel()), dtype=torch.bool), proposals
    )
    cost = cost + merge_cost
    chain_cost = state.chain_cost
    if chain_cost is not None:
        chain_cost = chain_cost.clone()
        chain_cost[rows, 0] += suf.length
    new_handles = state.handles
    if handles is not None and state.handles is not None:
        listed = list(state.handles)
        for k, c in enumerate(rows.tolist()):
            listed[c] = handles[k]
        new_handles = tuple(listed)
    return state._replace(
        tokens=tokens,
        ell=ell,
        g=g,
        entropy=ent,
        length=length,
        log_reference=log_ref,
        reward=staged_reward(state.target, log_ref),
        chain_cap=chain_cap,
        active=active,
        stage=stage,
        step_in_stage=0,
        handles=new_handles,
        serial=serial,
        cost=state.cost + cost,
        root=root,
        chain_cost=chain_cost,
    )


def total_steps(max_new_tokens: int, config: MHConfig) -> int:
    """Steps of a full run (an upper bound when staged chains can finish early)."""
    stages = len(stage_caps(max_new_tokens, config.block_size))
    if config.num_steps == 0:
        return stages - 1
    return stages * config.num_steps
