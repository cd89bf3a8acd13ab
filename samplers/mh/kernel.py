"""The MH kernel: one step of every running chain (cut, regenerate, accept or reject), the stage
move when a stage's steps are done, and the continuous engine's step."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample.policy import DecodeSession
from tiltsample.samplers.mh.acceptance import MHRatio, mh_log_ratio
from tiltsample.samplers.mh.config import config_from
from tiltsample.samplers.mh.continuous import continuous_step
from tiltsample.samplers.mh.cuts import cut_log_probs
from tiltsample.samplers.mh.decode import Slot, Suffix
from tiltsample.samplers.mh.parts import TargetParts, decompose_target
from tiltsample.samplers.mh.proposals import merge_root, regenerate, splice, suffix_sum
from tiltsample.samplers.mh.schedule import advance_stage
from tiltsample.samplers.mh.scoring import score_chains
from tiltsample.samplers.mh.state import (
    MHInfo,
    MHState,
    cost_diff,
    done,
    idle_info,
    is_final_stage,
    rows_force_eos,
)
from tiltsample.target import TiltedTarget
from tiltsample.token_laws import draw_tokens
from tiltsample.types import Cost

__all__ = ["build_kernel"]


def _all_targets(state: MHState) -> tuple[tuple[TiltedTarget, ...], list[TargetParts]]:
    targets = state.targets or (state.target,)
    parts = [state.parts] if not state.targets else [decompose_target(t) for t in targets]
    return targets, parts


class _Move(NamedTuple):
    """The proposals of the running chains ``rows`` in one step (``[R, ...]``, ``R = |rows|``)."""

    rows: Tensor
    cuts: Tensor
    log_c_fwd: Tensor
    """``log c_x(j)`` of the drawn cuts."""
    suffix: Suffix
    """The regenerated suffixes."""
    tokens: Tensor
    ell: Tensor
    g: Tensor
    entropy: Tensor
    length: Tensor
    """The proposed responses ``x'`` (kept prefix spliced with the suffix) and their lengths."""
    handles: tuple[tuple[Slot, int], ...] | None
    serial: int
    cost: Cost
    session: DecodeSession | None
    """Ragged batching: the session holding the proposals."""


def _propose(state: MHState, generator: torch.Generator, final: bool) -> _Move:
    """Steps 1–2: draw every running chain's cut from ``c_x`` and regenerate its suffix."""
    config = state.config
    rows = state.active.nonzero().flatten()
    log_c = cut_log_probs(state.entropy[rows], state.length[rows], config.cut, config.cut_power)
    cuts = draw_tokens(generator, log_c) if rows.numel() else torch.zeros(0, dtype=torch.long)
    log_c_fwd = log_c.gather(1, cuts[:, None]).squeeze(1) if rows.numel() else torch.zeros(0)
    reference = config.length_mode == "reference"
    caps = state.length[rows] if reference else state.chain_cap[rows]
    suf, handles, serial, cost, proposals = regenerate(
        state, generator, rows, cuts, caps, rows_force_eos(state, final)
    )
    return _Move(
        rows,
        cuts,
        log_c_fwd,
        suf,
        splice(state.tokens[rows], cuts, suf.tokens, state.target.eos_id),
        splice(state.ell[rows], cuts, suf.ell, 0.0),
        splice(state.g[rows], cuts, suf.g, 0.0),
        splice(state.entropy[rows], cuts, suf.entropy, 0.0),
        cuts + suf.length,
        handles,
        serial,
        cost,
        proposals,
    )


def _log_ratio(state: MHState, move: _Move, p_rest: Tensor) -> MHRatio:
    """Step 3: the MH log ratio of every move (the cut correction dropped for the published
    code's uniform-cut truncation)."""
    config = state.config
    rows, cuts, suf = move.rows, move.cuts, move.suffix
    reference = config.length_mode == "reference"
    stop_cur = cuts + suf.length if reference else state.length[rows]
    ell_cur = suffix_sum(state.ell[rows], cuts, stop_cur)
    g_cur = suffix_sum(state.g[rows], cuts, stop_cur)
    ell_prop = suf.ell.sum(dim=1)
    g_prop = suf.g.sum(dim=1)
    log_c_fwd = move.log_c_fwd
    if reference and config.cut == "uniform":
        log_c_fwd_used = torch.zeros_like(ell_cur)
        log_c_rev = torch.zeros_like(ell_cur)
    else:
        log_c_fwd_used = log_c_fwd
        log_c_rev = cut_log_probs(move.entropy, move.length, config.cut, config.cut_power)
        log_c_rev = log_c_rev.gather(1, cuts[:, None]).squeeze(1) if rows.numel() else log_c_fwd
    return mh_log_ratio(
        power=state.parts.power,
        ell_current=ell_cur,
        ell_proposal=ell_prop,
        g_current=g_cur,
        g_proposal=g_prop,
        rest_current=state.rest[rows],
        rest_proposal=p_rest,
        log_cut_forward=log_c_fwd_used,
        log_cut_reverse=log_c_rev,
        greedy=config.greedy,
    )


def _accept(
    state: MHState,
    move: _Move,
    acc: Tensor,
    p_log_ref: Tensor,
    p_rest: Tensor,
    p_reward: Tensor | None,
) -> dict[str, Any]:
    """Step 4: the state fields after the accepted moves (``acc`` ``[R]``) replace their chains."""
    rows = move.rows
    tokens, ell, g, ent = (
        state.tokens.clone(),
        state.ell.clone(),
        state.g.clone(),
        state.entropy.clone(),
    )
    length, log_ref, rest = state.length.clone(), state.log_reference.clone(), state.rest.clone()
    take = rows[acc]
    tokens[take] = move.tokens[acc]
    ell[take] = move.ell[acc]
    g[take] = move.g[acc]
    ent[take] = move.entropy[acc]
    length[take] = move.length[acc]
    log_ref[take] = p_log_ref[acc]
    rest[take] = p_rest[acc]
    reward: Tensor | None = None
    if state.reward is not None and p_reward is not None:
        reward = state.reward.clone()
        reward[take] = p_reward[acc]
    new_handles = state.handles
    if move.handles is not None and state.handles is not None:
        listed = list(state.handles)
        for k, c in enumerate(rows.tolist()):
            if bool(acc[k]):
                listed[c] = move.handles[k]
        new_handles = tuple(listed)
    return {
        "tokens": tokens,
        "ell": ell,
        "g": g,
        "entropy": ent,
        "length": length,
        "log_reference": log_ref,
        "rest": rest,
        "reward": reward,
        "handles": new_handles,
    }


def _step_info(state: MHState, move: _Move, acc: Tensor, ratio: MHRatio, cost: Cost) -> MHInfo:
    """Step 5: what the step reports, per chain (chains that did not move get the fill)."""
    chains, width = state.tokens.shape
    rows = move.rows

    def full(values: Tensor, fill: float | int | bool, dtype: torch.dtype) -> Tensor:
        out = torch.full((chains,), fill, dtype=dtype)
        out[rows] = values.to(dtype)
        return out

    prop_tokens = torch.full((chains, width), state.target.eos_id, dtype=torch.long)
    prop_tokens[rows] = move.tokens
    return MHInfo(
        cost=cost,
        accepted=full(acc, False, torch.bool),
        cut=full(move.cuts, -1, torch.long),
        proposal_length=full(move.length, 0, torch.long),
        regenerated=full(move.suffix.length, 0, torch.long),
        log_acceptance=full(ratio.total, 0.0, torch.float64),
        log_target_ratio=full(ratio.target, 0.0, torch.float64),
        log_proposal_ratio=full(ratio.proposal, 0.0, torch.float64),
        log_cut_ratio=full(ratio.cut, 0.0, torch.float64),
        moved=full(torch.ones_like(acc), False, torch.bool),
        proposal_tokens=prop_tokens,
        stage=state.stage,
    )


def _mh_step(state: MHState, generator: torch.Generator, ext_cost: Cost) -> tuple[MHState, MHInfo]:
    """One MH step of every running chain: cut, regenerate, score, accept or reject."""
    final = is_final_stage(state)
    move = _propose(state, generator, final)
    rows = move.rows
    p_log_ref = move.ell.sum(dim=1)
    targets, parts_all = _all_targets(state)
    p_rest, p_reward, rcost, per_calls = score_chains(
        targets, parts_all, state.owner, rows, final, move.tokens, move.length, p_log_ref
    )
    cost = move.cost + rcost
    ratio = _log_ratio(state, move, p_rest)
    log_u = torch.log(torch.rand(int(rows.numel()), generator=generator, dtype=torch.float64))
    acc = log_u < ratio.total
    root, merge_cost = merge_root(state, rows, acc, move.session)
    cost = cost + merge_cost
    chain_cost = state.chain_cost
    if chain_cost is not None:
        chain_cost = chain_cost.clone()
        chain_cost[rows, 0] += move.suffix.length
        chain_cost[rows, 1] += per_calls
    fields = _accept(state, move, acc, p_log_ref, p_rest, p_reward)
    info = _step_info(state, move, acc, ratio, ext_cost + cost)
    new_state = state._replace(
        **fields,
        step_in_stage=state.step_in_stage + 1,
        steps_done=state.steps_done + 1,
        accepted_count=state.accepted_count + info.accepted.long(),
        moved_count=state.moved_count + info.moved.long(),
        serial=move.serial,
        last=info,
        cost=state.cost + cost,
        root=root,
        chain_cost=chain_cost,
    )
    return new_state, info


def build_kernel(**config: Any) -> Any:
    """``step(generator, state) -> (state, info)``: one MH step of every running chain.

    When the current stage's ``num_steps`` steps are done, the step first opens the next stage
    (finishing chains that ended with EOS and extending the others), then makes its MH step.
    ``**config`` as in :func:`make_config`; it must equal the configuration ``init`` used.
    """
    cfg = config_from(config)

    def step(generator: torch.Generator, state: MHState) -> tuple[MHState, MHInfo]:
        if state.config != cfg:
            raise ValueError(
                "the state was initialised with a different MH configuration than this kernel: "
                f"{state.config} vs {cfg}"
            )
        if done(state):
            return state, idle_info(state, Cost())
        if state.engine is not None:
            return continuous_step(state)
        ext = Cost()
        if state.step_in_stage >= cfg.num_steps and not is_final_stage(state):
            before = state.cost
            state = advance_stage(state, generator)
            ext = cost_diff(state.cost, before)
        if cfg.num_steps == 0 or not bool(state.active.any()):
            info = idle_info(state, ext)
            return state._replace(last=info, steps_done=state.steps_done + 1), info
        return _mh_step(state, generator, ext)

    return step
