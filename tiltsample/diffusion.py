"""The masked-diffusion reference policy protocol.

A masked-diffusion LM generates a response of fixed length ``L`` by starting from the fully masked
state and committing masked positions over ``T = num_steps`` denoising steps. Its *base sampler*
(the predictive model **and** the unmasking rule: how many and which positions are committed per
step) defines ``p_ref``: the target ``pi ∝ p_ref · exp(r/lam)`` tilts the sampler's own output law
(``specs/ets.md`` §1, §3 "DLM toy").

States are ``LongTensor[B, L]`` with ``mask_id`` at masked positions. ``denoise_step`` advances a
batch by one step of the base sampler with the caller's generator; ``position_logprobs`` exposes the
predictive laws. A response is complete when no position is masked; as a
:data:`~tiltsample.types.Seq` it is cut after its first EOS, like autoregressive responses.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from tiltsample.types import Cost, Seq


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
    def mask_id(self) -> int: ...

    @property
    def length(self) -> int:
        """Response length ``L`` (positions)."""
        ...

    @property
    def num_steps(self) -> int:
        """Denoising steps ``T`` from the fully masked state to a complete response."""
        ...

    def position_logprobs(self, prompt: Seq, states: Tensor) -> Tensor:
        """``[B, L, V]`` predictive log-probs of every position given partially masked states."""
        ...

    def denoise_step(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        """One step ``step`` (``0 <= step < T``) of the base sampler for every row."""
        ...


def is_masked_diffusion(policy: object) -> bool:
    """Whether ``policy`` implements :class:`MaskedDiffusionPolicy` (structurally)."""
    return all(
        hasattr(policy, a)
        for a in ("mask_id", "length", "num_steps", "position_logprobs", "denoise_step")
    )
