r"""One SMC block at the *rollout level* (``DESIGN.md``, "Beyond one machine"): the extension of
:func:`~tiltsample.samplers.smc.step.block_step` when the particles' session is a
:class:`~tiltsample.policy.RolloutSession` (a serving engine such as vLLM, which decodes whole
continuations natively and may not give full next-token laws).

Block
    Every unfinished particle is extended by **one** request to the decode engine,
    ``decode(session, DecodeRequest(...), generator)``: up to ``B = block_size`` new tokens per
    live row from the proposal ``q_tau = softmax(log p_ref / tau)`` over the full vocabulary,
    stopping at EOS or the target's cap ``L``; under ``truncation="condition"`` EOS is forced at
    position ``L - 1`` (``log q = 0``, ``log p = log p_ref(EOS | x_<L)``), exactly the rules of the
    token-level path. The engine returns the per-token ``log p`` (temperature 1) and ``log q`` of
    the tokens it drew, and nothing else is needed:

    .. math::

        \Delta_i = \sum_{s \in \text{block}} \big(\log p(x_s \mid x_{<s})
            - \log q_\tau(x_s \mid x_{<s})\big),

    after which the step reweights as with the reference proposal (``specs/smc.md`` §4):
    ``log w_i += Δ_i + log psi_new - log psi_old``, ``psi_new = G`` on completion (truncation rule
    §7) and a fresh twist value of the new prefix otherwise. The twist sees only sequences (or a
    fork of the session, which a rollout twist continues with further decode requests).

Proposal temperature
    ``proposal="reference"``: ``tau = temperature``. Power-SMC (``proposal="optimal"`` with a
    :class:`TemperedProposalTwist`, the power twist ``psi(s) = p_ref(s)^{alpha_|s| - 1}``): its
    locally optimal proposal away from completion is ``q ∝ p^{alpha_{t+1}}``, i.e.
    ``tau = 1 / alpha_{t+1}`` for a block starting at length ``t``. At the rollout level that
    law is drawn without the fully adapted weight ``sum_v p(v | s)^alpha`` (which needs the whole
    law); the weight above is computed after the draw instead. Both are exact SMC for the same
    target: ``psi`` telescopes and ``psi = G`` at completion, so
    ``E[Ẑ · W(x)] = Z pi(x)``. With an exponent ramp the block keeps one temperature (that of its
    first token), which changes the proposal, not the exactness.
Exactness
    As token-level SMC with the reference proposal: unbiased ``Ẑ``, consistent particle law.
    With ``tau = 1`` and an ordinary session wrapped as a rollout session the blocks draw the same
    tokens from the same random stream as the token-level path (one ``torch.multinomial`` per
    position with a live row), so both give bit-identical runs.
Refused (:class:`~tiltsample.policy.TokenLevelAccessError`, naming the parameter)
    ``num_moves > 0`` (resample-move needs the moves' per-token ``log q'`` and, for
    ``move_cut="entropy_jump"``, the entropies of ``p_ref``: full laws); ``proposal="optimal"``
    with a twist whose optimal proposal is not a tempered law (it needs ``psi`` of every child,
    ``[N, V]``); a conditional-SMC ``reference`` path (``csmc``, particle Gibbs,
    ``log_z_upper``). Not available, hence stored as NaN: the per-token ``tok_log_q_move`` and
    ``tok_entropy`` of the state. Their only reader is the resample-move kernel
    (:mod:`~tiltsample.samplers.smc.moves`: ``block_step`` with ``num_moves > 0``, refused here, and
    :func:`~tiltsample.samplers.smc.rejuvenate`, which regenerates from full laws and so fails
    with ``TokenLevelAccessError`` at the session before it uses them).
Cost per block
    One decode request (the engine's model calls and forward tokens are counted by the session),
    the generated tokens it reports (forced EOS included), plus the twist and the reward calls
    of the reweighting.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from tiltsample.capabilities import TokenLevelAccessError
from tiltsample.decode_engine import DecodeRequest, decode
from tiltsample.samplers.smc.config import SMCConfig
from tiltsample.samplers.smc.state import ParticleRows, SMCState
from tiltsample.target import TiltedTarget
from tiltsample.token_laws import tempered_law

__all__ = [
    "RolloutBlock",
    "TemperedProposalTwist",
    "block_temperature",
    "check_rollout_config",
    "rollout_extend",
]

_WAYS_OUT = (
    "a rollout-level session (a serving engine such as vLLM) decodes whole continuations and "
    "gives no full next-token laws; use a token-level backend (tiltsample.targets.hf.HFPolicy "
    "or a toy policy) for this configuration"
)


@runtime_checkable
class TemperedProposalTwist(Protocol):
    r"""A twist whose locally optimal proposal ``q(v | s) ∝ p(v | s) psi(s + v)`` is, away from
    completion, a tempered reference law ``softmax(log p / tau)`` (the power twist
    ``psi(s) = p_ref(s)^{alpha - 1}``: ``tau = 1/alpha``). With it ``proposal="optimal"`` runs at
    the rollout level, drawing from that tempered law and weighting after the draw."""

    def proposal_temperature(self, target: TiltedTarget, length: int) -> float:
        """``tau > 0`` of the optimal proposal of the token that makes a prefix of length
        ``length`` (``ValueError`` when no positive temperature expresses it)."""
        ...


class RolloutBlock(NamedTuple):
    """What one rollout-level block hands back to the step."""

    inc: Tensor
    """``[M]`` float64: ``sum_block (log p - log q)`` of the rows live at the block's start (0 on
    the others; ``-inf`` where a forced EOS has ``p = 0``)."""
    generated: int
    """Tokens the engine generated (sampled ones and forced EOS)."""


def check_rollout_config(config: SMCConfig, state: SMCState) -> None:
    """Refuse (:class:`~tiltsample.policy.TokenLevelAccessError`) the configurations that need
    full next-token laws: ``num_moves > 0``, ``proposal="optimal"`` with a twist that is not a
    :class:`TemperedProposalTwist`, and conditional-SMC reference paths."""
    if config.num_moves:
        raise TokenLevelAccessError(
            f"num_moves={config.num_moves}: resample-move regenerates suffixes from the "
            "EOS-free proposal q' and needs its per-token log q' (and, for "
            "move_cut='entropy_jump', the entropies of p_ref), i.e. token-level access; use "
            f"num_moves=0 at the rollout level. {_WAYS_OUT}"
        )
    if config.proposal == "optimal" and not isinstance(config.psi, TemperedProposalTwist):
        raise TokenLevelAccessError(
            f"proposal='optimal' with the {config.psi.name!r} twist draws from "
            "p_ref(v|s) psi(s+v) and needs the twist of every child token, i.e. token-level "
            "access (full next-token laws); use proposal='reference' (at any temperature) at "
            f"the rollout level. {_WAYS_OUT}"
        )
    if state.reference is not None:
        raise TokenLevelAccessError(
            "reference paths (conditional SMC: csmc, particle-gibbs, log_z_upper) are not "
            "supported on a rollout-level session: the conditional step needs token-level "
            f"access. {_WAYS_OUT}"
        )


def block_temperature(config: SMCConfig, target: TiltedTarget, length: int) -> float:
    """The proposal temperature of a block that starts at prefix length ``length``:
    ``temperature`` (reference proposal) or the twist's optimal-proposal temperature of the
    block's first token (:class:`TemperedProposalTwist`)."""
    psi = config.psi
    if config.proposal == "optimal" and isinstance(psi, TemperedProposalTwist):
        return float(psi.proposal_temperature(target, length + 1))
    return float(config.temperature)


def rollout_extend(
    config: SMCConfig, state: SMCState, rows: ParticleRows, generator: torch.Generator
) -> RolloutBlock:
    """Extend every unfinished particle by one block with **one** decode request and book it in
    ``rows`` (in place): ``log_p``, ``finished``, ``tok_log_p`` (``tok_log_q_move`` and
    ``tok_entropy`` as NaN: see the module docstring). Refused configurations raise first
    (:func:`check_rollout_config`)."""
    check_rollout_config(config, state)
    target, session = state.target, state.session
    eos, cap = target.eos_id, target.max_new_tokens
    m = rows.log_w.numel()
    start = session.length
    live = ~rows.finished
    request = DecodeRequest(
        law=tempered_law(block_temperature(config, target, start)),
        eos_id=eos,
        start=start,
        cap=cap,
        force_eos=target.truncation == "condition",
        max_new=config.block_size,
        live=live,
    )
    out, same = decode(session, generator, request)
    if same is not session:  # pragma: no cover - a RolloutSession decodes in place
        raise RuntimeError("a rollout-level session must extend its own rows")
    n = int(out.tokens.shape[1])
    zero = torch.zeros(m, dtype=torch.float64)
    inc = zero.clone()
    log_p = rows.log_p
    for j in range(n):  # position by position: the token-level path's order of additions
        lp, lq = out.token_log_p[:, j], out.token_log_q[:, j]
        step = torch.where(torch.isneginf(lp), lp, lp - lq)
        inc = inc + torch.where(live, step, zero)
        log_p = log_p + lp
    rows.log_p = log_p
    real = torch.arange(n)[None, :] < out.new_lengths[:, None]
    got_eos = ((out.tokens == eos) & real).any(dim=1)
    at_cap = start + out.new_lengths >= cap
    rows.finished = rows.finished | (live & (got_eos | at_cap))
    missing = torch.full((m, n), math.nan, dtype=torch.float64)
    rows.tok_log_p = torch.cat([rows.tok_log_p, out.token_log_p.to(torch.float64)], dim=1)
    rows.tok_log_q_move = torch.cat([rows.tok_log_q_move, missing], dim=1)
    rows.tok_entropy = torch.cat([rows.tok_entropy, missing.clone()], dim=1)
    return RolloutBlock(inc, int(out.generated_tokens))
