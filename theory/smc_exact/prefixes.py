r"""Exact prefix quantities of enumerable toys: ``log p_ref`` of every reachable prefix, the
intermediate targets ``gamma_t`` of SMC over stopped states, and the path law of the
twist-induced proposal (``specs/smc.md`` §2, §8)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tiltsample.target import TiltedTarget
from tiltsample.theory.energies import exact_energies
from tiltsample.types import Seq

__all__ = [
    "LogTwist",
    "intermediate_law",
    "prefix_log_probs",
    "twist_log_values",
    "twisted_proposal_law",
]


LogTwist = Callable[[list[Seq], Tensor], Tensor]
"""``log_twist(prefixes, log_p_prefixes) -> Tensor[B]`` for incomplete prefixes."""


def prefix_log_probs(target: TiltedTarget) -> dict[Seq, float]:
    """``{s: log p_ref(s)}`` for every prefix that ``p_ref`` reaches with positive probability.

    A breadth-first walk of the prefix trie with one batched ``next_logprobs`` call per depth;
    complete responses (EOS, or the cap under ``truncation="stop"``) are leaves. Under
    ``truncation="condition"`` the last position holds EOS only, with its probability.
    """
    policy, prompt, eos = target.policy, target.prompt, target.eos_id
    cap = target.max_new_tokens
    out: dict[Seq, float] = {(): 0.0}
    frontier: list[Seq] = [()]
    for depth in range(cap):
        if not frontier:
            break
        lp = policy.next_logprobs(prompt, frontier).to(torch.float64)
        nxt: list[Seq] = []
        for i, s in enumerate(frontier):
            base = out[s]
            for v in range(lp.shape[1]):
                value = float(lp[i, v])
                if value == -math.inf:
                    continue
                if target.truncation == "condition" and depth == cap - 1 and v != eos:
                    continue
                child = (*s, v)
                out[child] = base + value
                if not target.is_complete(child):
                    nxt.append(child)
        frontier = nxt
    return out


def twist_log_values(
    target: TiltedTarget, prefixes: list[Seq], log_reference: Tensor, log_twist: LogTwist | str
) -> Tensor:
    """``log psi`` of incomplete ``prefixes`` for a twist given as ``"exact"`` (the exact
    energies), ``"none"`` (``psi = 1``) or a callable ``(prefixes, log_p) -> log psi``."""
    if log_twist == "exact":
        return exact_energies(target).log_energies(prefixes)
    if log_twist == "none":
        return torch.zeros(len(prefixes), dtype=torch.float64)
    if callable(log_twist):
        return log_twist(prefixes, log_reference).to(torch.float64)
    raise ValueError(f"log_twist must be 'exact', 'none' or a callable, got {log_twist!r}")


def intermediate_law(
    target: TiltedTarget, t: int, log_twist: LogTwist | str = "exact"
) -> dict[Seq, float]:
    r"""The normalised intermediate target ``gamma_t`` of SMC over stopped states with cap ``t``.

    .. math::

        \gamma_t(x) \propto
        \begin{cases} p(x)\, G(x) & x \text{ complete}, |x| \le t \\
                      p(x)\, \psi(x) & x \text{ incomplete}, |x| = t \end{cases}

    Parameters
    ----------
    target
        An enumerable target.
    t
        The current length, ``0 <= t <= max_new_tokens``.
    log_twist
        ``"exact"`` (the exact energies: ``gamma_t`` is then the time-``t`` marginal of ``pi``),
        ``"none"`` (``psi = 1``), or a callable ``(prefixes, log_p) -> log psi``.
    """
    if not 0 <= t <= target.max_new_tokens:
        raise ValueError(f"t must lie in [0, max_new_tokens={target.max_new_tokens}], got {t}")
    log_p = prefix_log_probs(target)
    complete = [s for s in log_p if target.is_complete(s) and len(s) <= t]
    incomplete = [s for s in log_p if not target.is_complete(s) and len(s) == t]
    values: dict[Seq, float] = {}
    if complete:
        ref = torch.tensor([log_p[s] for s in complete], dtype=torch.float64)
        tilt = target.evaluate_tilt(complete, log_reference=ref).log_tilt
        for s, a, b in zip(complete, ref.tolist(), tilt.tolist(), strict=True):
            values[s] = a + b
    if incomplete:
        ref = torch.tensor([log_p[s] for s in incomplete], dtype=torch.float64)
        psi = twist_log_values(target, incomplete, ref, log_twist)
        for s, a, b in zip(incomplete, ref.tolist(), psi.tolist(), strict=True):
            values[s] = a + b
    keys = [s for s, v in values.items() if v > -math.inf]
    if not keys:
        raise ValueError(f"gamma_{t} has zero mass")
    logs = torch.tensor([values[s] for s in keys], dtype=torch.float64)
    probs = torch.softmax(logs, dim=0)
    return dict(zip(keys, probs.tolist(), strict=True))


def twisted_proposal_law(target: TiltedTarget, log_twist: LogTwist) -> dict[Seq, float]:
    r"""Path law of the twist-induced proposal ``q_psi(v | s) ∝ p(v | s) psi(s + v)``.

    Complete children use the true tilt ``G`` (as the SMC samplers do), incomplete ones
    ``log_twist``; under ``truncation="condition"`` only EOS may occupy the last position. A
    prefix whose children all have zero weight contributes nothing (its mass is lost, as the
    sampler's particle would get weight 0). With the exact twist this is ``pi`` itself.
    """
    log_p = prefix_log_probs(target)
    cap = target.max_new_tokens
    law: dict[Seq, float] = {}
    frontier: dict[Seq, float] = {(): 0.0}  # prefix -> log q_psi(prefix)
    for depth in range(cap):
        if not frontier:
            break
        by_parent: dict[Seq, list[Seq]] = {}
        for c in log_p:
            if len(c) == depth + 1 and c[:-1] in frontier:
                by_parent.setdefault(c[:-1], []).append(c)
        flat = [c for kids in by_parent.values() for c in kids]
        comp = [c for c in flat if target.is_complete(c)]
        inc = [c for c in flat if not target.is_complete(c)]
        score: dict[Seq, float] = {}
        if comp:
            ref = torch.tensor([log_p[c] for c in comp], dtype=torch.float64)
            tilt = target.evaluate_tilt(comp, log_reference=ref).log_tilt.tolist()
            score.update(zip(comp, tilt, strict=True))
        if inc:
            ref = torch.tensor([log_p[c] for c in inc], dtype=torch.float64)
            score.update(zip(inc, log_twist(inc, ref).to(torch.float64).tolist(), strict=True))
        nxt: dict[Seq, float] = {}
        for s, kids in by_parent.items():
            logits = torch.tensor(
                [log_p[c] - log_p[s] + score[c] for c in kids], dtype=torch.float64
            )
            if not bool(torch.isfinite(logits).any()):
                continue
            lq = torch.log_softmax(logits, dim=0).tolist()
            for c, v in zip(kids, lq, strict=True):
                if v == -math.inf:
                    continue
                if target.is_complete(c):
                    law[c] = math.exp(frontier[s] + v)
                else:
                    nxt[c] = frontier[s] + v
        frontier = nxt
    return law
