"""MH state and per-step info, the checks of a target against a configuration, and ``done``."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample.diffusion import is_masked_diffusion
from tiltsample.samplers.mh.config import MHConfig
from tiltsample.samplers.mh.decode import Slot
from tiltsample.samplers.mh.parts import TargetParts
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "MHInfo",
    "MHState",
    "check_target",
    "cost_diff",
    "done",
    "idle_info",
    "is_complete",
    "is_final_stage",
    "rows_force_eos",
    "to_seqs",
]


class MHInfo(NamedTuple):
    """What one step reports (per chain ``[C]`` unless stated)."""

    cost: Cost
    """Compute of the step: every regenerated token (rejected proposals included), the stage
    extension when the step opened a new stage, forward tokens, model and reward calls."""
    accepted: Tensor
    """``[C]`` bool."""
    cut: Tensor
    """``[C]`` long: the cut position ``j`` (``-1`` for a chain that did not move)."""
    proposal_length: Tensor
    """``[C]`` long: ``|x'|`` (0 for a chain that did not move)."""
    regenerated: Tensor
    """``[C]`` long: tokens decoded for the proposal, ``|x'| - j``."""
    log_acceptance: Tensor
    """``[C]`` float64: ``log A`` (may be ``±inf``; 0 for a chain that did not move)."""
    log_target_ratio: Tensor
    """``[C]``: the target term of ``log A``."""
    log_proposal_ratio: Tensor
    """``[C]``: the proposal term ``sum_{S(x)} g - sum_{S(x')} g'``."""
    log_cut_ratio: Tensor
    """``[C]``: the cut-law correction ``log c_{x'}(j) - log c_x(j)``."""
    moved: Tensor
    """``[C]`` bool: the chain made an MH proposal this step (False once finished)."""
    proposal_tokens: Tensor
    """``[C, L]`` long: the proposed responses ``x'`` (EOS-padded past ``proposal_length``)."""
    stage: int
    """The stage (1-based) this step ran in."""


class MHState(NamedTuple):
    """``C`` chains: current responses with per-token ``l``, ``g``, ``H`` arrays, and sessions."""

    target: TiltedTarget
    config: MHConfig
    parts: TargetParts
    caps: tuple[int, ...]
    """Stage caps ``L_1..L_S``."""
    tokens: Tensor
    """``[C, L]`` long, EOS-padded past ``length``."""
    ell: Tensor
    """``[C, L]`` float64: ``log p_ref(x_t | x_<t)`` (0 past ``length``)."""
    g: Tensor
    """``[C, L]`` float64: ``log q_tau(x_t | x_<t)`` of the law that produced the token."""
    entropy: Tensor
    """``[C, L]`` float64: entropy of ``p_ref(. | x_<t)`` on the support."""
    length: Tensor
    """``[C]`` long."""
    log_reference: Tensor
    """``[C]``: ``sum_t l_t``."""
    rest: Tensor
    """``[C]``: non-reference tilt terms of the current response (0 while staged)."""
    reward: Tensor | None
    chain_cap: Tensor
    """``[C]`` long: the cap of the current stage (per chain in reference mode)."""
    active: Tensor
    """``[C]`` bool: chains still running (staged chains finish at EOS after a stage)."""
    stage: int
    step_in_stage: int
    steps_done: int
    accepted_count: Tensor
    moved_count: Tensor
    handles: tuple[tuple[Slot, int], ...] | None
    root: Slot | None
    serial: int
    last: MHInfo | None
    cost: Cost
    batching: str = "grouped"
    """The batching actually used (``"auto"`` resolved at :func:`init`)."""
    targets: tuple[TiltedTarget, ...] = ()
    """All targets of a joint run (:func:`init_many`; empty for a single target)."""
    owner: Tensor | None = None
    """``[C]`` long: the target of every chain in a joint run."""
    chain_cost: Tensor | None = None
    """``[C, 2]`` long: generated tokens and reward calls spent on each chain."""
    engine: Any = None
    """``batching="continuous"``: the engine (:mod:`tiltsample.samplers.mh.engine`) that runs
    the chains; the arrays above then hold every chain's state after ``steps_done`` steps."""


def check_target(target: TiltedTarget, config: MHConfig, parts: TargetParts) -> None:
    """Raise if ``target`` (split into ``parts``) cannot be run with ``config``: not an
    autoregressive tilted target, or a stage schedule, reference length mode or max-swap on a
    target with reward terms."""
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    if is_masked_diffusion(target.policy):
        raise TypeError(
            "the MH samplers need an autoregressive ReferencePolicy; got a masked-diffusion "
            "policy (use ETS, SMC or best-of-N)"
        )
    pure = not parts.rest
    if config.block_size is not None and not pure:
        raise ValueError(
            "block_size (the stage schedule) needs a target whose tilt is a power of p_ref "
            "(intermediate stages score prefixes); got reward terms "
            f"{[t.name for t in parts.rest]}. Use block_size=None for plain MH."
        )
    if config.length_mode == "reference":
        if target.truncation != "stop":
            raise ValueError(
                "length_mode='reference' reproduces the published code, which has no "
                "conditioned cap: it needs truncation='stop'"
            )
        if not pure:
            raise ValueError(
                "length_mode='reference' truncates suffix sums token by token; it needs a "
                "target whose tilt is a power of p_ref"
            )
    if config.greedy and not pure:
        raise ValueError("alpha=inf (max-swap) maximises log p_ref; the target has reward terms")


def is_complete(state: MHState) -> Tensor:
    """``[C]`` bool: the current response ends with EOS."""
    last = state.tokens.gather(1, (state.length - 1).clamp(min=0)[:, None]).squeeze(1)
    return (last == state.target.eos_id) & (state.length > 0)


def to_seqs(tokens: Tensor, length: Tensor) -> list[Seq]:
    """The responses ``tokens[r, :length[r]]`` as :data:`~tiltsample.types.Seq`."""
    return [tuple(row[:n]) for row, n in zip(tokens.tolist(), length.tolist(), strict=True)]


def is_final_stage(state: MHState) -> bool:
    """Whether the state is in the last stage (the one that targets ``pi``)."""
    return state.stage == len(state.caps)


def rows_force_eos(state: MHState, final_stage: bool) -> bool:
    """Whether decoding forces EOS at ``L - 1`` (``truncation="condition"``, final stage)."""
    return final_stage and state.target.truncation == "condition"


def idle_info(state: MHState, cost: Cost) -> MHInfo:
    """The info of a step in which no chain moved (it may still have spent ``cost``)."""
    chains, width = state.tokens.shape
    zl = torch.zeros(chains, dtype=torch.long)
    zf = torch.zeros(chains, dtype=torch.float64)
    zb = torch.zeros(chains, dtype=torch.bool)
    return MHInfo(
        cost,
        zb,
        torch.full((chains,), -1, dtype=torch.long),
        zl,
        zl,
        zf,
        zf,
        zf,
        zf,
        zb,
        torch.full((chains, width), state.target.eos_id, dtype=torch.long),
        state.stage,
    )


def cost_diff(after: Cost, before: Cost) -> Cost:
    """``after - before``, element-wise: the cost spent between two snapshots."""
    return Cost(
        after.generated_tokens - before.generated_tokens,
        after.forward_tokens - before.forward_tokens,
        after.model_calls - before.model_calls,
        after.reward_calls - before.reward_calls,
    )


def done(state: MHState) -> bool:
    """True after the last stage's ``num_steps`` steps, or when every chain has finished."""
    if not bool(state.active.any()):
        return True
    if state.step_in_stage < state.config.num_steps:
        return False
    if is_final_stage(state):
        return True
    return not bool((state.active & ~is_complete(state)).any())
