r"""The masked-diffusion reference policy protocol, and the shared denoising loop.

A masked-diffusion LM generates a response of fixed length ``L`` by starting from the fully masked
state and committing masked positions over ``T = num_steps`` denoising steps. Its *base sampler*
(the predictive model **and** the unmasking rule: how many and which positions are committed at
each step, at which temperature) defines ``p_ref``: the target ``pi ∝ p_ref · exp(r/lam)`` tilts
the sampler's own output law, not the network's per-position conditionals (``specs/ets.md`` §1,
§3 "DLM toy"). The two agree only for unmasking rules that look at the revealed tokens alone and
commit one position per step with exact conditionals.

States
    ``LongTensor[B, L]`` with ``mask_id`` at masked positions (:func:`initial_states`). Step ``s``
    (``0 <= s < T``) maps the states reached after ``s`` steps to those after ``s + 1``; the
    schedule (how many positions a step commits) may depend on ``s``, so samplers carry the step
    index alongside the states. All rows of a batch are at the same step.
Responses
    A state is complete when no position is masked. As a :data:`~tiltsample.types.Seq` it is cut
    after its first EOS, like autoregressive responses (:func:`states_to_seqs`); a reward sees
    nothing past EOS. The target's ``max_new_tokens`` equals ``L``.

Required methods: ``vocab_size``, ``eos_id``, ``mask_id``, ``length``, ``num_steps``,
``position_logprobs`` and ``denoise_step`` (:class:`MaskedDiffusionPolicy`).

Optional methods, used when present (toys implement them exactly; a real DLM usually cannot):

``sequence_logprob(prompt, xs, per_token=False) -> Tensor[B]``
    ``log p_ref(x)`` of responses under the base sampler's output law (needed by
    :meth:`~tiltsample.target.TiltedTarget.log_reference` and by exact ground truth).
``completion_logprob(prompt, states, step, completions) -> Tensor[B]``
    ``log P(the base sampler, started from states[b] at step ``step``, ends at completions[b])``
    for complete ``completions`` ``[B, L]`` (the marginal over sampler paths). ETS-IS on a
    masked-diffusion policy needs it on both the reference and the proposal policy: it is the
    exact importance ratio of ``specs/ets.md`` §5; without it DLM-IS is only approximate.

Prefix potentials of autoregressive samplers take ``Seq`` prefixes; for masked-diffusion states
the analogue is :class:`StatePotential` (states plus the step index).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

from tiltsample.types import Cost, Seq

__all__ = [
    "Denoised",
    "MaskedDiffusionPolicy",
    "StatePotential",
    "check_states",
    "denoise",
    "initial_states",
    "is_masked_diffusion",
    "num_masked",
    "states_to_seqs",
]


@runtime_checkable
class MaskedDiffusionPolicy(Protocol):
    """A masked-diffusion base sampler (see the module docstring)."""

    @property
    def vocab_size(self) -> int:
        """Token ids lie in ``[0, vocab_size)``; ``mask_id`` is outside or reserved."""
        ...

    @property
    def eos_id(self) -> int: ...

    @property
    def mask_id(self) -> int:
        """The id that marks a masked position in a state (not a token a response contains)."""
        ...

    @property
    def length(self) -> int:
        """Response length ``L`` (positions)."""
        ...

    @property
    def num_steps(self) -> int:
        """Denoising steps ``T`` from the fully masked state to a complete response."""
        ...

    def position_logprobs(self, prompt: Seq, states: Tensor) -> Tensor:
        """``[B, L, V]`` predictive log-probs of every position given partially masked states.

        These are the network's (or the toy's exact) per-position conditionals at temperature 1;
        the base sampler's law also depends on the unmasking rule.
        """
        ...

    def denoise_step(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        """One step ``step`` (``0 <= step < T``) of the base sampler for every row.

        Returns the new states (a new tensor; the input is not modified) and the step's cost:
        ``generated_tokens`` = positions committed (over all rows), ``forward_tokens`` = tokens
        pushed through the denoiser (``B · (len(prompt) + L)`` for a full pass), ``model_calls``.
        All randomness comes from ``generator``.
        """
        ...


def is_masked_diffusion(policy: object) -> bool:
    """Whether ``policy`` implements :class:`MaskedDiffusionPolicy` (structurally)."""
    return all(
        hasattr(policy, a)
        for a in ("mask_id", "length", "num_steps", "position_logprobs", "denoise_step")
    )


@runtime_checkable
class StatePotential(Protocol):
    """An estimate of ``log E[exp(log_tilt(x_0)) | state, step]`` for masked-diffusion states.

    The masked-diffusion counterpart of :class:`~tiltsample.reward.PrefixPotential`: the energy of
    a partially masked state under the base sampler's completion law from step ``step``. Complete
    states have the exact value ``log_tilt(x_0)``.
    """

    def log_potential_states(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]: ...


def check_step(step: int, num_steps: int) -> int:
    """``step`` after checking it is an int in ``[0, num_steps)`` (a clear error otherwise)."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < num_steps:
        raise ValueError(f"step must be an int in [0, num_steps={num_steps}), got {step!r}")
    return step


def block_quota(step: int, block_length: int, steps_per_block: int) -> int:
    """Positions the semi-autoregressive schedule commits at ``step``: the block's
    ``block_length`` positions split evenly over its ``steps_per_block`` steps, the earlier
    steps taking the remainder."""
    base, rem = divmod(block_length, steps_per_block)
    return base + (1 if step % steps_per_block < rem else 0)


def block_positions(step: int, block_length: int, steps_per_block: int) -> range:
    """Positions eligible at ``step`` under the semi-autoregressive schedule (its block)."""
    b = step // steps_per_block
    return range(b * block_length, (b + 1) * block_length)


def initial_states(policy: MaskedDiffusionPolicy, batch: int) -> Tensor:
    """``LongTensor[batch, L]`` of fully masked states."""
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    return torch.full((batch, int(policy.length)), int(policy.mask_id), dtype=torch.long)


def num_masked(states: Tensor, mask_id: int) -> Tensor:
    """``LongTensor[B]``: masked positions per row."""
    return (states == mask_id).sum(dim=1)


def check_states(policy: MaskedDiffusionPolicy, states: Tensor, name: str = "states") -> Tensor:
    """Validate a ``[B, L]`` state tensor: shape, dtype and ids in ``[0, V)`` or ``mask_id``."""
    if not isinstance(states, Tensor):
        raise TypeError(f"{name} must be a LongTensor [B, L], got {type(states).__name__}")
    states = states.to(torch.long)
    length = int(policy.length)
    if states.dim() != 2 or states.shape[1] != length:
        raise ValueError(f"{name} must have shape [B, L={length}], got {tuple(states.shape)}")
    ok = ((states >= 0) & (states < policy.vocab_size)) | (states == policy.mask_id)
    if not bool(ok.all()):
        raise ValueError(f"{name} has ids outside [0, vocab_size) that are not mask_id")
    return states


def states_to_seqs(states: Tensor, eos_id: int, mask_id: int) -> list[Seq]:
    """Complete states as :data:`Seq`, cut after the first EOS (``ValueError`` if masked)."""
    if states.numel() and bool((states == mask_id).any()):
        raise ValueError("states_to_seqs needs complete states (no masked position)")
    out: list[Seq] = []
    for row in states.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        out.append(tuple(row))
    return out


class Denoised(NamedTuple):
    """Result of :func:`denoise`."""

    states: Tensor
    """``LongTensor[B, L]`` after the steps."""
    cost: Cost
    """Summed cost: the policy's forward tokens and model calls, and ``generated_tokens`` =
    positions committed (counted from the states, whatever the policy reports)."""
    row_passes: int
    """Denoiser forward passes counted per row (``B`` per step): the cost unit of
    ``specs/ets.md`` §6 for masked-diffusion ETS."""


def denoise(
    policy: MaskedDiffusionPolicy,
    prompt: Seq,
    states: Tensor,
    start: int,
    stop: int,
    generator: torch.Generator,
) -> Denoised:
    """Run steps ``start, ..., stop - 1`` of the base sampler on every row (one batch per step).

    The one denoising loop shared by the masked-diffusion samplers, as
    :func:`tiltsample.decoding.decode_until_complete` is for autoregressive ones.
    """
    total = int(policy.num_steps)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"need 0 <= start <= stop <= num_steps={total}, got {start}, {stop}")
    cost = Cost()
    passes = 0
    batch = int(states.shape[0])
    mask = int(policy.mask_id)
    for step in range(start, stop):
        if batch == 0:
            break
        before = int(num_masked(states, mask).sum())
        states, step_cost = policy.denoise_step(prompt, states, step, generator)
        committed = before - int(num_masked(states, mask).sum())
        # generated tokens are read off the states (a policy may leave the field at 0)
        cost = cost + Cost(
            committed, step_cost.forward_tokens, step_cost.model_calls, step_cost.reward_calls
        )
        passes += batch
    return Denoised(states, cost, passes)
