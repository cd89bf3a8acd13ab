r"""Complete responses drawn from ``p_ref`` at a temperature, with exact importance weights.

The proposal ``q_tau`` decodes until EOS or the length cap with full-vocabulary tempered sampling;
under ``truncation="condition"`` EOS is forced at the last position. For each response it returns
``log p_ref(x)`` (temperature 1, the forced EOS's probability included), ``log q_tau(x)`` (the law
actually sampled) and the target's log-tilt, so the importance weight towards the target is

.. math::  \log w(x) = \log p_{ref}(x) + \mathrm{log\_tilt}(x) - \log q_\tau(x).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.decoding import decode_until_complete, rows_to_seqs
from tiltsample.policy import open_session, open_session_multi
from tiltsample.row_generators import RowGenerators
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
        drop_finished=True,  # a throw-away session
    )
    seqs = rows_to_seqs(decoded.tokens, target.eos_id)
    log_p = decoded.log_p
    scores = target.evaluate_tilt(seqs, log_reference=log_p)
    cost = session.cost + Cost(generated_tokens=decoded.generated_tokens) + scores.cost
    return Proposals(seqs, log_p, decoded.log_q, scores.log_tilt, scores.reward, cost)


def check_batchable(targets: Sequence[TiltedTarget]) -> None:
    """Refuse targets that cannot share one multi-prompt session: ``TypeError`` for a
    non-target, ``ValueError`` when there are none or when the policy, ``max_new_tokens``,
    truncation or EOS differ from ``targets[0]``'s (the batched runs across problems share them).
    """
    if not targets:
        raise ValueError("targets must be non-empty")
    first = targets[0]
    for i, t in enumerate(targets):
        if not isinstance(t, TiltedTarget):
            raise TypeError(f"targets[{i}] must be a TiltedTarget, got {type(t).__name__}")
        if t.policy is not first.policy:
            raise ValueError(f"targets[{i}] has another policy: batched targets share one policy")
        same = (t.max_new_tokens, t.truncation, t.eos_id)
        if same != (first.max_new_tokens, first.truncation, first.eos_id):
            raise ValueError(
                f"targets[{i}] differs from targets[0] in max_new_tokens, truncation or eos_id "
                "(batched targets share them)"
            )


def propose_many(
    targets: Sequence[TiltedTarget],
    generators: Sequence[torch.Generator],
    n: int,
    temperature: float = 1.0,
) -> tuple[list[Proposals], Cost]:
    """:func:`propose` for several targets in one batched session: ``n`` responses per target.

    The targets share the policy, the cap ``L`` and the truncation rule; their prompts (and
    tilts) may differ. All ``len(targets) · n`` rows decode in one multi-prompt session
    (:func:`~tiltsample.policy.open_session_multi`: each prompt encoded once), target ``i``'s rows
    drawing from ``generators[i]`` only (:class:`~tiltsample.row_generators.RowGenerators`), so
    ``propose_many(ts, gs, n)[0][i]`` holds the responses ``propose(ts[i], gs[i], n)`` draws alone
    (up to the float differences of a batched forward) and leaves ``gs[i]`` in the same state.

    Returns
    -------
    list of Proposals, Cost
        One :class:`Proposals` per target, whose ``cost`` counts its own generated tokens and
        reward calls, and the cost of the whole job (the shared model calls and forward tokens
        included): model calls serve every target at once, so they are not split.
    """
    if len(targets) != len(generators) or not targets:
        raise ValueError(
            f"targets and generators must be non-empty and of one length, got {len(targets)} "
            f"targets and {len(generators)} generators"
        )
    check_batchable(targets)
    first = targets[0]
    session = open_session_multi(first.policy, [t.prompt for t in targets], n)
    decoded = decode_until_complete(
        session,
        RowGenerators.of_sizes(generators, [n] * len(targets)),
        eos_id=first.eos_id,
        max_length=first.max_new_tokens,
        temperature=temperature,
        force_eos_at_cap=first.truncation == "condition",
        drop_finished=True,  # a throw-away session
    )
    seqs = rows_to_seqs(decoded.tokens, first.eos_id)
    out, total = [], session.cost + Cost(generated_tokens=decoded.generated_tokens)
    for i, t in enumerate(targets):
        rows = slice(i * n, (i + 1) * n)
        mine = seqs[rows]
        log_p = decoded.log_p[rows]
        scores = t.evaluate_tilt(mine, log_reference=log_p)
        cost = Cost(generated_tokens=int(decoded.new_lengths[rows].sum())) + scores.cost
        out.append(
            Proposals(mine, log_p, decoded.log_q[rows], scores.log_tilt, scores.reward, cost)
        )
        total = total + scores.cost
    return out, total
