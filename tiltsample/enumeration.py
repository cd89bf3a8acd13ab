"""Exhaustive enumeration of a target's support (toy targets only).

A batched breadth-first walk of the prefix trie through ``policy.next_logprobs``, honouring the
target's length convention. It lives in the core because both the ``exact`` sampler and
:mod:`tiltsample.theory` need it, and samplers may not import theory (DESIGN.md, "Layout").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

DEFAULT_MAX_SUPPORT = 200_000


class Enumeration(NamedTuple):
    """Every complete response of positive reference probability, with its log-densities."""

    support: list[Seq]
    log_reference: Tensor
    """``[S]`` float64 ``log p_ref(x)``."""
    log_tilt: Tensor
    """``[S]`` float64 summed log-tilt (``-inf`` where a constraint fails)."""

    @property
    def log_density(self) -> Tensor:
        """``[S]`` unnormalised ``log pi(x)``."""
        return torch.where(
            torch.isneginf(self.log_tilt), self.log_tilt, self.log_reference + self.log_tilt
        )


def enumerate_target(
    target: TiltedTarget, max_support: int = DEFAULT_MAX_SUPPORT, batch: int = 4096
) -> Enumeration:
    """Enumerate all complete responses with ``p_ref(x) > 0`` under the target's convention.

    Raises ``ValueError`` when the support would exceed ``max_support`` sequences.
    """
    policy, prompt, eos = target.policy, target.prompt, target.eos_id
    cap, condition = target.max_new_tokens, target.truncation == "condition"
    done: list[Seq] = []
    done_lp: list[float] = []
    frontier: list[Seq] = [()]
    frontier_lp = torch.zeros(1, dtype=torch.float64)
    for t in range(cap):
        if not frontier:
            break
        nxt: list[Seq] = []
        nxt_lp: list[float] = []
        for start in range(0, len(frontier), batch):
            chunk = frontier[start : start + batch]
            lp = policy.next_logprobs(prompt, chunk).to(torch.float64)
            total = frontier_lp[start : start + batch, None] + lp
            if condition and t == cap - 1:  # only EOS may occupy the last position
                keep = torch.zeros_like(total, dtype=torch.bool)
                keep[:, eos] = True
                keep &= total > -torch.inf
            else:
                keep = total > -torch.inf
            rows, toks = keep.nonzero(as_tuple=True)
            for r, v, value in zip(
                rows.tolist(), toks.tolist(), total[rows, toks].tolist(), strict=True
            ):
                x = (*chunk[r], v)
                if v == eos or len(x) == cap:
                    done.append(x)
                    done_lp.append(value)
                else:
                    nxt.append(x)
                    nxt_lp.append(value)
            if len(done) + len(nxt) > max_support:
                raise ValueError(
                    f"support exceeds max_support={max_support}; enumerate a smaller toy"
                )
        frontier = nxt
        frontier_lp = torch.tensor(nxt_lp, dtype=torch.float64)
    log_ref = torch.tensor(done_lp, dtype=torch.float64)
    scores = target.evaluate_tilt(done, log_reference=log_ref)
    return Enumeration(done, log_ref, scores.log_tilt)
