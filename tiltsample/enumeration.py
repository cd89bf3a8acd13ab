"""Exhaustive enumeration of a target's support (toy targets only).

A batched breadth-first walk of the prefix trie through ``policy.next_logprobs``, honouring the
target's length convention. It lives in the core because both the ``exact`` sampler and
:mod:`tiltsample.theory` need it, and samplers may not import theory (DESIGN.md, "Layout").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import tempered_logprobs
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

DEFAULT_MAX_SUPPORT = 200_000


class DecodeTree(NamedTuple):
    """Every response the decoder can produce, with its reference and proposal log-probs."""

    support: list[Seq]
    log_reference: Tensor
    """``[S]`` float64 ``log p_ref(x)`` at temperature 1 (a forced EOS contributes
    ``log p_ref(EOS | x_<L)``, possibly ``-inf``)."""
    log_proposal: Tensor
    """``[S]`` float64 ``log q_tau(x)`` of the decode law (finite; a forced EOS contributes 0)."""


def decode_tree(
    target: TiltedTarget,
    temperature: float = 1.0,
    max_support: int = DEFAULT_MAX_SUPPORT,
    batch: int = 4096,
) -> DecodeTree:
    r"""Enumerate the decode law ``q_tau`` of :func:`tiltsample.proposal.propose`.

    .. math::

        q_\tau(x) = \prod_t \mathrm{softmax}\big(\log p_{ref}(\cdot \mid x_{<t}) / \tau\big)[x_t],

    stopping at EOS or at ``max_new_tokens``; under ``truncation="condition"`` EOS is forced at the
    last position with factor 1 in ``q`` and ``p_ref(EOS | x_<L)`` in ``p_ref`` (which may be 0:
    such a response has ``q > 0`` but ``p_ref = 0``). Raises ``ValueError`` beyond ``max_support``.
    """
    tau = validation.positive_float("temperature", temperature)
    policy, prompt, eos = target.policy, target.prompt, target.eos_id
    cap, condition = target.max_new_tokens, target.truncation == "condition"
    done: list[Seq] = []
    done_lp: list[float] = []
    done_lq: list[float] = []
    frontier: list[Seq] = [()]
    f_lp = torch.zeros(1, dtype=torch.float64)
    f_lq = torch.zeros(1, dtype=torch.float64)
    for t in range(cap):
        if not frontier:
            break
        nxt: list[Seq] = []
        n_lp: list[float] = []
        n_lq: list[float] = []
        for start in range(0, len(frontier), batch):
            chunk = frontier[start : start + batch]
            log_p = policy.next_logprobs(prompt, chunk).to(torch.float64)
            if condition and t == cap - 1:  # forced EOS
                rows = torch.arange(len(chunk))
                toks = torch.full((len(chunk),), eos, dtype=torch.long)
                step_q = torch.zeros(len(chunk), dtype=torch.float64)
            else:
                log_q = tempered_logprobs(log_p, tau)
                rows, toks = (log_q > -math.inf).nonzero(as_tuple=True)
                step_q = log_q[rows, toks]
            tot_p = (f_lp[start : start + batch][rows] + log_p[rows, toks]).tolist()
            tot_q = (f_lq[start : start + batch][rows] + step_q).tolist()
            for r, v, lp, lq in zip(rows.tolist(), toks.tolist(), tot_p, tot_q, strict=True):
                x = (*chunk[r], v)
                if v == eos or len(x) == cap:
                    done.append(x)
                    done_lp.append(lp)
                    done_lq.append(lq)
                else:
                    nxt.append(x)
                    n_lp.append(lp)
                    n_lq.append(lq)
            if len(done) + len(nxt) > max_support:
                raise ValueError(
                    f"support exceeds max_support={max_support}; enumerate a smaller toy"
                )
        frontier = nxt
        f_lp = torch.tensor(n_lp, dtype=torch.float64)
        f_lq = torch.tensor(n_lq, dtype=torch.float64)
    return DecodeTree(
        done,
        torch.tensor(done_lp, dtype=torch.float64),
        torch.tensor(done_lq, dtype=torch.float64),
    )


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
    tree = decode_tree(target, 1.0, max_support, batch)
    keep = (tree.log_reference > -math.inf).nonzero().flatten().tolist()
    support = [tree.support[i] for i in keep]
    log_ref = tree.log_reference[keep]
    scores = target.evaluate_tilt(support, log_reference=log_ref)
    return Enumeration(support, log_ref, scores.log_tilt)
