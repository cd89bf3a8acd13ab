"""Scoring of responses: ``rest`` (the non-reference tilt terms) and the reported reward, each
chain under its own target, with the reward calls spent per chain."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.samplers.mh.parts import TargetParts, evaluate_rest
from tiltsample.samplers.mh.state import to_seqs
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

__all__ = ["score_chains", "staged_reward"]


def _needs_calls(target: TiltedTarget, parts: TargetParts) -> bool:
    """Whether scoring a complete response needs anything beyond ``log p_ref``."""
    primary = target.reward
    return bool(parts.rest) or (
        primary is not None and not getattr(primary, "uses_reference_logprob", False)
    )


def _score(
    target: TiltedTarget,
    parts: TargetParts,
    complete: bool,
    tokens: Tensor,
    length: Tensor,
    log_ref: Tensor,
) -> tuple[Tensor, Tensor | None, Cost]:
    """``rest``, primary reward and reward cost of responses (complete ones: the final stage)."""
    if complete and _needs_calls(target, parts):
        return evaluate_rest(target, parts, to_seqs(tokens, length), log_ref)
    return torch.zeros_like(log_ref), staged_reward(target, log_ref), Cost()


def score_chains(
    targets: Sequence[TiltedTarget],
    parts_all: Sequence[TargetParts],
    owner: Tensor | None,
    chain_ids: Tensor,
    complete: bool,
    tokens: Tensor,
    length: Tensor,
    log_ref: Tensor,
) -> tuple[Tensor, Tensor | None, Cost, Tensor]:
    """:func:`_score` of the responses of chains ``chain_ids``, each under its own target; also
    the reward calls spent per response ``[R]``."""
    n = int(chain_ids.numel())
    if owner is None or len(targets) == 1:
        single = _score(targets[0], parts_all[0], complete, tokens, length, log_ref)
        calls = torch.full((n,), single[2].reward_calls // max(n, 1), dtype=torch.long)
        return single[0], single[1], single[2], calls
    rest = torch.zeros(n, dtype=torch.float64)
    reward: Tensor | None = None
    cost = Cost()
    per = torch.zeros(n, dtype=torch.long)
    mine = owner[chain_ids]
    for i in torch.unique(mine).tolist():  # only the targets with a response to score
        t, p = targets[i], parts_all[i]
        m = (mine == i).nonzero().flatten()
        r, w, c = _score(t, p, complete, tokens[m], length[m], log_ref[m])
        rest[m] = r
        if w is not None:
            if reward is None:
                reward = torch.zeros(n, dtype=torch.float64)
            reward[m] = w.to(torch.float64)
        cost = cost + c
        per[m] = c.reward_calls // int(m.numel())
    return rest, reward, cost, per


def staged_reward(target: TiltedTarget, log_ref: Tensor) -> Tensor | None:
    """The reported reward of a (possibly unfinished) response when it is a function of
    ``log p_ref`` alone (a power target), else None."""
    primary = target.reward
    if primary is None or not getattr(primary, "uses_reference_logprob", False):
        return None
    out: Tensor = primary.from_reference(log_ref)  # type: ignore[attr-defined]
    return out.to(torch.float64)
