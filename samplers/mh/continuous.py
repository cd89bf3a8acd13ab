"""Continuous batching for the sequence MH sampler (``batching="continuous"``): the kernel's state
over the engine (:class:`~tiltsample.samplers.mh.engine.ContinuousEngine`).

Chains are independent Markov chains, so they need not move in lock step: every model call draws
one token for each running chain; a chain whose proposal suffix ended is scored (with the other
chains that ended in the same call, one reward call), accepted or rejected with the same ratio as
the lock-step modes (:func:`tiltsample.samplers.mh.mh_log_ratio`, cut-law correction included),
and starts its next step at once: a new cut, its row truncated to the longest prefix it shares
with the new state (ragged session rows, :func:`tiltsample.policy.truncate_rows`). Chain ``c``
draws its tokens, cuts and acceptances from its own generator, seeded with
``chunk_seed(base, c)`` from one draw of the caller's generator, so its trajectory does not
depend on the schedule, and every chain makes exactly ``num_steps`` steps. Plain MH only
(``block_size=None``). The kernel's state, info and results are those of the lock-step modes
(:mod:`~tiltsample.samplers.mh.state`); this module turns the engine's per-step snapshots into
them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tiltsample.samplers.mh.config import MHConfig
from tiltsample.samplers.mh.engine import ContinuousEngine
from tiltsample.samplers.mh.parts import TargetParts
from tiltsample.samplers.mh.state import MHInfo, MHState, cost_diff
from tiltsample.seeds import chunk_seed
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

__all__ = ["continuous_step", "init_continuous"]


def init_continuous(
    targets: list[TiltedTarget],
    parts_all: list[TargetParts],
    per_target: int,
    generator: torch.Generator | Sequence[torch.Generator],
    cfg: MHConfig,
) -> MHState:
    """The state of a continuous run: the engine, its chains seeded from one draw of
    ``generator``; the chains' initial ``q_tau`` draws are made inside the engine (per-chain
    streams).

    ``generator`` is one generator (chain ``c`` of the batch gets ``chunk_seed(base, c)``) or one
    per target (:func:`~tiltsample.samplers.mh.sample_many` with ``generators=``): target ``i``
    draws its own ``base_i`` from ``generator[i]`` and its ``k``-th chain gets
    ``chunk_seed(base_i, k)`` — exactly the seeds of that target run alone, so each target's
    chains follow their alone trajectories.
    """
    if isinstance(generator, torch.Generator):
        base = _base_seed(generator)
        seeds = [chunk_seed(base, c) for c in range(per_target * len(targets))]
    else:
        if len(generator) != len(targets):
            raise ValueError(
                f"generators must hold one generator per target ({len(targets)}), "
                f"got {len(generator)}"
            )
        seeds = []
        for g in generator:
            base = _base_seed(g)
            seeds += [chunk_seed(base, c) for c in range(per_target)]
    engine = ContinuousEngine(targets, parts_all, per_target, seeds, cfg)
    chains, width = engine.chains, engine.width
    target = targets[0]
    blank = torch.zeros((chains, width), dtype=torch.float64)
    return MHState(
        target=target,
        config=cfg,
        parts=parts_all[0],
        caps=(width,),
        tokens=torch.full((chains, width), target.eos_id, dtype=torch.long),
        ell=blank,
        g=blank.clone(),
        entropy=blank.clone(),
        length=torch.zeros(chains, dtype=torch.long),
        log_reference=torch.zeros(chains, dtype=torch.float64),
        rest=torch.zeros(chains, dtype=torch.float64),
        reward=None,
        chain_cap=torch.full((chains,), width, dtype=torch.long),
        active=torch.ones(chains, dtype=torch.bool),
        stage=1,
        step_in_stage=0,
        steps_done=0,
        accepted_count=torch.zeros(chains, dtype=torch.long),
        moved_count=torch.zeros(chains, dtype=torch.long),
        handles=None,
        root=None,
        serial=0,
        last=None,
        cost=Cost(),
        batching="continuous",
        targets=tuple(targets) if len(targets) > 1 else (),
        owner=engine.owner,
        chain_cost=engine.chain_cost.clone(),
        engine=engine,
    )


def _base_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, dtype=torch.long))


def continuous_step(state: MHState) -> tuple[MHState, MHInfo]:
    """Advance the engine until every chain has made step ``steps_done + 1``; return the chains'
    states after that step (faster chains have gone further; their later steps are kept)."""
    engine: ContinuousEngine = state.engine
    k = state.steps_done + 1
    engine.run_until(k)
    snap = engine.snapshots.pop(k)
    assert bool(snap.filled.all())
    cost = engine.cost
    has_reward = engine.reward is not None
    info = MHInfo(
        cost=cost_diff(cost, state.cost),
        accepted=snap.acc.clone(),
        cut=snap.cut.clone(),
        proposal_length=snap.p_len.clone(),
        regenerated=snap.p_len - snap.cut,
        log_acceptance=snap.lacc,
        log_target_ratio=snap.r_target,
        log_proposal_ratio=snap.r_prop,
        log_cut_ratio=snap.r_cut,
        moved=torch.ones_like(snap.acc),
        proposal_tokens=snap.p_tokens,
        stage=1,
    )
    new = state._replace(
        tokens=snap.tokens,
        ell=snap.ell,
        g=snap.g,
        entropy=snap.ent,
        length=snap.length,
        log_reference=snap.log_ref,
        rest=snap.rest,
        reward=snap.reward if has_reward else None,
        step_in_stage=k,
        steps_done=k,
        accepted_count=state.accepted_count + snap.acc.long(),
        moved_count=state.moved_count + 1,
        last=info,
        cost=cost,
        chain_cost=engine.chain_cost.clone(),
    )
    return new, info
