r"""Complete responses drawn from ``p_ref`` at a temperature, with exact importance weights.

The proposal ``q_tau`` decodes until EOS or the length cap with full-vocabulary tempered sampling;
under ``truncation="condition"`` EOS is forced at the last position. For each response it returns
``log p_ref(x)`` (temperature 1, the forced EOS's probability included), ``log q_tau(x)`` (the law
actually sampled) and the target's log-tilt, so the importance weight towards the target is

.. math::  \log w(x) = \log p_{ref}(x) + \mathrm{log\_tilt}(x) - \log q_\tau(x).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.decoding import decode_until_complete, rows_to_seqs
from tiltsample.policy import open_session
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq


class Proposals(NamedTuple):
    """``n`` complete responses with their log-densities and the cost of producing them."""

    sequences: list[Seq]
    log_reference: Tensor
    log_proposal: Tensor
    log_tilt: Tensor
    reward: Tensor | None
    cost: Cost

    @property
    def log_weights(self) -> Tensor:
        """``[n]`` importance log-weights ``log p + log_tilt - log q`` (``-inf`` off-support)."""
        target_part = torch.where(
            torch.isneginf(self.log_tilt), self.log_tilt, self.log_reference + self.log_tilt
        )
        return target_part - self.log_proposal


def propose(
    target: TiltedTarget, generator: torch.Generator, n: int, temperature: float = 1.0
) -> Proposals:
    """Draw ``n`` complete responses from ``q_tau`` in one batched session (prompt encoded once)."""
    session = open_session(target.policy, target.prompt, n)
    decoded = decode_until_complete(
        session,
        generator,
        eos_id=target.eos_id,
        max_length=target.max_new_tokens,
        temperature=temperature,
        force_eos_at_cap=target.truncation == "condition",
    )
    seqs = rows_to_seqs(decoded.tokens, target.eos_id)
    log_p = decoded.log_p
    scores = target.evaluate_tilt(seqs, log_reference=log_p)
    cost = session.cost + Cost(generated_tokens=decoded.generated_tokens) + scores.cost
    return Proposals(seqs, log_p, decoded.log_q, scores.log_tilt, scores.reward, cost)
