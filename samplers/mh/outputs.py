"""What a run returns: ``record`` (per-draw statistics for ``run_chains``), ``result`` (the
chains' current responses) and ``results`` (one result per target of a joint run)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tiltsample.results import SampleSet
from tiltsample.sampler import ChainRecord
from tiltsample.samplers.mh.parts import decompose_target, log_density_from_parts
from tiltsample.samplers.mh.state import MHState, idle_info, is_complete, to_seqs
from tiltsample.types import Cost

__all__ = ["current_log_density", "record", "result", "results"]


def current_log_density(state: MHState) -> Tensor:
    """``[C]`` unnormalised log density of every chain's state under its current stage target."""
    return log_density_from_parts(state.parts.power, state.log_reference, state.rest)


def record(state: MHState) -> ChainRecord:
    """Current responses and per-chain statistics of the last step."""
    chains = state.tokens.shape[0]
    last = state.last if state.last is not None else idle_info(state, Cost())
    stats = {
        "log_density": current_log_density(state),
        "accepted": last.accepted.to(torch.float64),
        "cut": last.cut.to(torch.float64),
        "proposal_length": last.proposal_length.to(torch.float64),
        "regenerated": last.regenerated.to(torch.float64),
        "acceptance_prob": torch.where(
            last.moved, torch.exp(last.log_acceptance.clamp(max=0.0)), torch.zeros(chains)
        ).to(torch.float64),
        "length": state.length.to(torch.float64),
    }
    if state.reward is not None:
        stats["reward"] = state.reward
    return ChainRecord(to_seqs(state.tokens, state.length), stats)


def result(state: MHState) -> SampleSet:
    """The current response of every chain.

    Log-weights are 0, or ``-inf`` for a response outside the target's support: one that is not a
    complete response of the target (possible in ``length_mode="reference"``) or has zero target
    density (an initial draw the chain never left). ``meta["failed"]`` counts them.
    """
    target = state.target
    seqs = to_seqs(state.tokens, state.length)
    complete = is_complete(state) | (
        (state.length == target.max_new_tokens) & (target.truncation == "stop")
    )
    ok = complete & torch.isfinite(current_log_density(state))
    log_w = torch.where(ok, 0.0, -math.inf).to(torch.float64)
    moved = state.moved_count.clamp(min=1).to(torch.float64)
    meta: dict[str, Any] = {
        "num_steps": state.steps_done,
        "stages": len(state.caps),
        "stage_reached": state.stage,
        "acceptance_rate": (state.accepted_count.to(torch.float64) / moved).tolist(),
        "incomplete": int((~complete).sum()),
        "failed": int((~ok).sum()),
        "power": state.parts.power,
        "config": state.config.as_dict(),
        "batching": state.batching,
    }
    return SampleSet(
        seqs,
        log_w,
        state.cost,
        state.reward,
        state.log_reference.clone(),
        None,
        meta,
    )


def results(state: MHState) -> list[SampleSet]:
    """One :class:`SampleSet` per target of a joint state (:func:`init_many`), in target order.

    Each holds its target's chains (``num_samples`` of them) exactly as :func:`result` would.
    Cost: ``generated_tokens`` and ``reward_calls`` are those of the target's own chains;
    ``forward_tokens`` is the joint run's, apportioned in proportion to generated tokens (the
    rows share every forward call); ``model_calls`` is the joint run's (every call served all
    targets). ``meta["joint_cost"]`` is the joint run's cost and ``meta["joint_targets"]`` the
    number of targets. A single-target state gives ``[result(state)]``.
    """
    if not state.targets or state.owner is None:
        return [result(state)]
    total = state.cost
    chain_cost = state.chain_cost
    assert chain_cost is not None
    gen = [int(chain_cost[state.owner == i, 0].sum()) for i in range(len(state.targets))]
    forward = _apportion(total.forward_tokens, gen)
    out = []
    for i, t in enumerate(state.targets):
        m = (state.owner == i).nonzero().flatten()
        cost = Cost(
            generated_tokens=gen[i],
            forward_tokens=forward[i],
            model_calls=total.model_calls,
            reward_calls=int(chain_cost[m, 1].sum()),
        )
        sub = state._replace(
            target=t,
            parts=decompose_target(t),
            tokens=state.tokens[m],
            ell=state.ell[m],
            g=state.g[m],
            entropy=state.entropy[m],
            length=state.length[m],
            log_reference=state.log_reference[m],
            rest=state.rest[m],
            reward=None if state.reward is None else state.reward[m],
            accepted_count=state.accepted_count[m],
            moved_count=state.moved_count[m],
            cost=cost,
        )
        res = result(sub)
        res.meta["joint_cost"] = total
        res.meta["joint_targets"] = len(state.targets)
        out.append(res)
    return out


def _apportion(total: int, shares: list[int]) -> list[int]:
    """``total`` split in proportion to ``shares`` (largest remainder; sums to ``total``)."""
    weight = sum(shares)
    if weight == 0:
        base = [total // len(shares)] * len(shares)
        base[0] += total - sum(base)
        return base
    exact = [total * s / weight for s in shares]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (out[i] - exact[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out
