"""``init`` and ``init_many``: the chains' starting states (``q_tau`` draws capped at the first
stage, or given responses), one target or several sharing one batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.policy import (
    DecodeSession,
    RolloutSession,
    open_session,
    open_session_multi,
    supports_ragged,
)
from tiltsample.samplers.mh.config import MHConfig, config_from
from tiltsample.samplers.mh.continuous import init_continuous
from tiltsample.samplers.mh.decode import Slot, Suffix, decode_rows
from tiltsample.samplers.mh.parts import TargetParts, decompose_target
from tiltsample.samplers.mh.proposals import splice
from tiltsample.samplers.mh.schedule import stage_caps
from tiltsample.samplers.mh.scoring import score_chains
from tiltsample.samplers.mh.state import MHState, check_target
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["init", "init_many"]


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    initial: Sequence[Seq] | None = None,
    **config: Any,
) -> MHState:
    """``num_samples`` chains started from ``q_tau`` draws (capped at the first stage's cap).

    ``initial`` (plain mode only) starts chain ``c`` at the complete response ``initial[c]``
    instead; its per-token arrays are computed by teacher forcing (no generated tokens).
    ``**config`` as in :func:`make_config`.
    """
    cfg = config_from(config)
    validation.generator("generator", generator)
    chains = validation.positive_int("num_samples", num_samples)
    return _init_joint([target], chains, generator, initial, cfg)


def init_many(
    targets: Sequence[TiltedTarget],
    *,
    generator: torch.Generator | Sequence[torch.Generator],
    num_samples: int,
    **config: Any,
) -> MHState:
    """``num_samples`` chains for *each* of ``targets``, all in one batch (one joint state).

    The targets must share the policy, ``max_new_tokens``, the truncation convention and the
    tilt structure (the same exponent of ``p_ref`` and the same names of the other tilt terms);
    prompts, rewards and their temperatures may differ. Chains of target ``i`` are the rows
    ``i·num_samples .. (i+1)·num_samples - 1``; every chain follows exactly the kernel of its own
    target (the batch only shares model calls). The decode session holds the rows of all prompts
    (:func:`tiltsample.policy.open_session_multi`). Step with :func:`build_kernel`; split the
    result with :func:`results`.

    ``generator`` may also be one generator per target under ``batching="continuous"``: target
    ``i``'s chains then draw only from streams seeded by ``generator[i]``, exactly as when that
    target runs alone (see :func:`~tiltsample.samplers.mh.continuous.init_continuous`).
    """
    cfg = config_from(config)
    chains = validation.positive_int("num_samples", num_samples)
    listed = list(targets)
    if not listed:
        raise ValueError("targets must hold at least one TiltedTarget")
    if isinstance(generator, torch.Generator):
        return _init_joint(listed, chains, generator, None, cfg)
    gens = [validation.generator(f"generator[{i}]", g) for i, g in enumerate(generator)]
    if len(gens) != len(listed):
        raise ValueError(
            f"generator must be one torch.Generator or one per target ({len(listed)}), "
            f"got {len(gens)}"
        )
    if cfg.batching != "continuous":
        raise ValueError(
            "one generator per target needs batching='continuous' (per-chain random streams); "
            f"got batching={cfg.batching!r}"
        )
    return _init_joint(listed, chains, gens, None, cfg)


def _check_joint(targets: list[TiltedTarget], cfg: MHConfig) -> list[TargetParts]:
    parts_all = []
    for i, t in enumerate(targets):
        if not isinstance(t, TiltedTarget):
            raise TypeError(f"targets[{i}] must be a TiltedTarget, got {type(t).__name__}")
        parts = decompose_target(t)
        check_target(t, cfg, parts)
        parts_all.append(parts)
    first, p0 = targets[0], parts_all[0]
    for i, (t, p) in enumerate(zip(targets, parts_all, strict=True)):
        if t.policy is not first.policy:
            raise ValueError(
                f"targets[{i}] has another policy than targets[0]: one batch needs one"
            )
        if t.max_new_tokens != first.max_new_tokens or t.truncation != first.truncation:
            raise ValueError(
                f"targets[{i}] differs from targets[0] in max_new_tokens or truncation "
                f"({t.max_new_tokens}, {t.truncation!r} vs {first.max_new_tokens}, "
                f"{first.truncation!r})"
            )
        same_terms = [x.name for x in p.rest] == [x.name for x in p0.rest]
        if abs(p.power - p0.power) > 1e-12 * max(1.0, abs(p0.power)) or not same_terms:
            raise ValueError(
                f"targets[{i}] has another tilt structure than targets[0] (exponent of p_ref "
                f"{p.power} vs {p0.power}, terms {[x.name for x in p.rest]} vs "
                f"{[x.name for x in p0.rest]})"
            )
        if (t.reward is None) != (first.reward is None):
            raise ValueError(f"targets[{i}]: either every target has a reward or none has")
    return parts_all


def _initial_forcing(
    target: TiltedTarget,
    initial: Sequence[Seq] | None,
    chains: int,
    cfg: MHConfig,
    caps: tuple[int, ...],
) -> tuple[Tensor, Tensor | bool, Tensor | None]:
    """Caps, EOS forcing and teacher-forced tokens of the initial draw: ``q_tau`` to the first
    stage's cap, or the given responses ``initial`` (checked) teacher-forced to their lengths."""
    eos, width = target.eos_id, target.max_new_tokens
    condition = target.truncation == "condition"
    cap0 = torch.full((chains,), caps[0], dtype=torch.long)
    force: Tensor | bool = len(caps) == 1 and condition
    if initial is None:
        return cap0, force, None
    if cfg.block_size is not None:
        raise ValueError("initial= is supported for plain MH only (block_size=None)")
    if len(initial) != chains:
        raise ValueError(f"initial must hold num_samples={chains} responses, got {len(initial)}")
    xs = target.check_sequences(list(initial), name="initial")
    cap0 = torch.tensor([len(x) for x in xs], dtype=torch.long)
    if int(cap0.min()) == 0:
        raise ValueError("initial responses must have at least one token")
    forced = torch.full((chains, width), eos, dtype=torch.long)
    for c, x in enumerate(xs):
        forced[c, : len(x)] = torch.tensor(x, dtype=torch.long)
    force = (cap0 == width) & condition
    return cap0, force, forced


def _open_chains(
    targets: list[TiltedTarget], per_target: int, owner: Tensor | None, cfg: MHConfig
) -> tuple[DecodeSession, Slot | None, Cost, str]:
    """The session of the chains' rows, the aligned root session, their cost so far and the
    batching actually used (``"auto"`` resolved)."""
    policy = targets[0].policy
    prompts = [t.prompt for t in targets]
    joint = len(targets) > 1
    chains = per_target * len(targets)
    if cfg.batching == "aligned":
        base = (
            open_session_multi(policy, prompts, 1) if joint else open_session(policy, prompts[0], 1)
        )
        if not isinstance(base, RolloutSession):  # a serving engine caches prompts itself
            base.logprobs()  # encode the prompts once; every step forks this session
        session = base.fork()
        session.select(owner if owner is not None else torch.zeros(chains, dtype=torch.long))
        return session, Slot(base, 0), base.cost, "aligned"
    session = (
        open_session_multi(policy, prompts, per_target)
        if joint
        else open_session(policy, prompts[0], chains)
    )
    mode = cfg.batching
    if mode == "auto":
        mode = "ragged" if supports_ragged(session) else "grouped"
    return session, None, Cost(), mode


def _init_joint(
    targets: list[TiltedTarget],
    per_target: int,
    generator: torch.Generator | list[torch.Generator],
    initial: Sequence[Seq] | None,
    cfg: MHConfig,
) -> MHState:
    parts_all = _check_joint(targets, cfg)
    target = targets[0]
    joint = len(targets) > 1
    chains = per_target * len(targets)
    owner = torch.repeat_interleave(torch.arange(len(targets)), per_target) if joint else None
    caps = tuple(stage_caps(target.max_new_tokens, cfg.block_size))
    cap0, force, forced = _initial_forcing(target, initial, chains, cfg, caps)
    if cfg.batching == "continuous":
        if initial is not None:
            raise ValueError(
                "initial= is not supported with batching='continuous' (use another batching)"
            )
        return init_continuous(targets, parts_all, per_target, generator, cfg)
    assert isinstance(generator, torch.Generator)  # per-target generators: continuous only
    session, root, cost, mode = _open_chains(targets, per_target, owner, cfg)
    suf = decode_rows(
        session,
        generator,
        caps=cap0,
        eos_id=target.eos_id,
        config=cfg,
        force_eos=force,
        forced=forced,
        forced_until=None if forced is None else cap0,
    )
    if initial is not None and not bool(torch.isfinite(suf.g).all()):
        bad = int((~torch.isfinite(suf.g)).any(dim=1).nonzero()[0])
        raise ValueError(
            f"initial[{bad}] has a token the proposal cannot produce (q_tau = 0 with "
            f"proposal_temperature={cfg.proposal_temperature}, support={cfg.support!r})"
        )
    cost = cost + session.cost + Cost(generated_tokens=suf.generated)
    generated = suf.length if initial is None else torch.zeros(chains, dtype=torch.long)
    state = _start_state(targets, parts_all, owner, cfg, caps, suf, generated, cost, mode)
    slot = Slot(session, 1)
    return state._replace(
        handles=tuple((slot, c) for c in range(chains)) if mode == "grouped" else None,
        root=slot if mode == "ragged" else root,
    )


def _start_state(
    targets: list[TiltedTarget],
    parts_all: list[TargetParts],
    owner: Tensor | None,
    cfg: MHConfig,
    caps: tuple[int, ...],
    suf: Suffix,
    generated: Tensor,
    cost: Cost,
    mode: str,
) -> MHState:
    """The state whose chains hold the initial draws ``suf`` (scored; no sessions attached;
    ``generated`` ``[C]``: tokens each chain's draw cost)."""
    target = targets[0]
    chains = int(suf.length.numel())
    eos, width = target.eos_id, target.max_new_tokens
    zeros = torch.zeros(chains, dtype=torch.long)
    tokens = splice(torch.full((chains, width), eos, dtype=torch.long), zeros, suf.tokens, eos)
    blank = torch.zeros((chains, width), dtype=torch.float64)
    ell = splice(blank, zeros, suf.ell, 0.0)
    log_ref = ell.sum(dim=1)
    all_rows = torch.arange(chains)
    rest, reward, rcost, per_calls = score_chains(
        targets, parts_all, owner, all_rows, len(caps) == 1, tokens, suf.length, log_ref
    )
    return MHState(
        target=target,
        config=cfg,
        parts=parts_all[0],
        caps=caps,
        tokens=tokens,
        ell=ell,
        g=splice(blank, zeros, suf.g, 0.0),
        entropy=splice(blank, zeros, suf.entropy, 0.0),
        length=suf.length.clone(),
        log_reference=log_ref,
        rest=rest,
        reward=reward,
        chain_cap=torch.full((chains,), caps[0], dtype=torch.long),
        active=torch.ones(chains, dtype=torch.bool),
        stage=1,
        step_in_stage=0,
        steps_done=0,
        accepted_count=torch.zeros(chains, dtype=torch.long),
        moved_count=torch.zeros(chains, dtype=torch.long),
        handles=None,
        root=None,
        serial=1,
        last=None,
        cost=cost + rcost,
        batching=mode,
        targets=tuple(targets) if len(targets) > 1 else (),
        owner=owner,
        chain_cost=torch.stack([generated.long(), per_calls], dim=1),
    )
