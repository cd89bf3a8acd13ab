r"""Exact laws for FK steering: the tilted target of a masked-diffusion toy
(:func:`diffusion_target_law`), its exact state energies (:class:`ExactStatePotential`, the
optimal intermediate potentials) and the law of the best-of-``N`` selection
(:func:`best_of_n_law`, FK steering's ``bon`` output)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tiltsample.target import TiltedTarget
from tiltsample.theory.smc_exact.prefixes import prefix_log_probs
from tiltsample.types import Cost, Seq

__all__ = ["ExactStatePotential", "best_of_n_law", "diffusion_target_law"]


def diffusion_target_law(target: TiltedTarget) -> tuple[dict[Seq, float], float]:
    r"""``(pi, log Z)`` of a tilted masked-diffusion toy (a policy with ``output_logprobs``).

    ``p_ref`` is the base sampler's exact output law; the tilt follows the target's length
    convention (``truncation="condition"``: responses without EOS have ``G = 0``).
    """
    policy = target.policy
    law = policy.output_logprobs()  # type: ignore[attr-defined]
    seqs = list(law)
    log_ref = torch.tensor([law[x] for x in seqs], dtype=torch.float64)
    tilt = target.evaluate_tilt(seqs, log_reference=log_ref).log_tilt
    ok = torch.tensor([target.is_complete(x) for x in seqs], dtype=torch.bool)
    dens = torch.where(ok & torch.isfinite(tilt), log_ref + tilt, torch.full_like(tilt, -math.inf))
    log_z = float(torch.logsumexp(dens, 0))
    probs = torch.exp(dens - log_z).tolist()
    return {x: p for x, p in zip(seqs, probs, strict=True) if p > 0}, log_z


def best_of_n_law(target: TiltedTarget, n: int) -> dict[Seq, float]:
    r"""Exact law of the best of ``n`` i.i.d. draws of ``p_ref`` (first maximiser of the log-tilt).

    .. math::

        P(\text{best} = x) = p(x) \sum_{k=0}^{n-1} a(x)^k\, b(x)^{n-1-k},

    with ``a = P(score < score(x))`` (the draws before ``x``) and ``b = P(score <= score(x))``
    (after it); ``score`` is the log-tilt, ``-inf`` off the target's support. ``p_ref`` is the
    output law of a masked-diffusion toy (``output_logprobs``) or the enumerated responses of an
    autoregressive one.
    """
    policy = target.policy
    if callable(getattr(policy, "output_logprobs", None)):
        ref = policy.output_logprobs()  # type: ignore[attr-defined]
    else:
        ref = {s: v for s, v in prefix_log_probs(target).items() if target.is_complete(s)}
    seqs = list(ref)
    log_ref = torch.tensor([ref[x] for x in seqs], dtype=torch.float64)
    tilt = target.evaluate_tilt(seqs, log_reference=log_ref).log_tilt
    ok = torch.tensor([target.is_complete(x) for x in seqs], dtype=torch.bool)
    score = torch.where(ok, tilt, torch.full_like(tilt, -math.inf)).tolist()
    probs = torch.exp(log_ref).tolist()
    out: dict[Seq, float] = {}
    for x, sx, px in zip(seqs, score, probs, strict=True):
        a = sum(p for s, p in zip(score, probs, strict=True) if s < sx)
        b = sum(p for s, p in zip(score, probs, strict=True) if s <= sx)
        value = px * sum(a**k * b ** (n - 1 - k) for k in range(n))
        if value > 0:
            out[x] = value
    return out


class ExactStatePotential:
    r"""The exact energy ``log E[G(x_0) | state, step]`` of masked-diffusion states.

    A :class:`~tiltsample.diffusion.StatePotential` for toys with an exact ``completion_law``
    (:class:`~tiltsample.targets.masked_diffusion.MaskedDiffusionToy`): the sum over the base
    sampler's completions of ``P(completion) G(completion)``, with the target's length
    convention. Deterministic and free (``Cost()``); plugged into FK steering with the difference
    potential it makes every intermediate target the exact marginal of ``pi``.
    """

    def __init__(self, target: TiltedTarget) -> None:
        self.target = target
        self._cache: dict[tuple[tuple[int, ...], int], float] = {}

    def log_energy(self, state: tuple[int, ...], step: int) -> float:
        key = (tuple(int(t) for t in state), int(step))
        value = self._cache.get(key)
        if value is None:
            target, policy = self.target, self.target.policy
            law = policy.completion_law(key[0], key[1])  # type: ignore[attr-defined]
            fulls = list(law)
            seqs = [policy.to_seq(c) for c in fulls]  # type: ignore[attr-defined]
            lp = torch.tensor([law[c] for c in fulls], dtype=torch.float64)
            tilt = target.evaluate_tilt(seqs).log_tilt
            ok = torch.tensor([target.is_complete(x) for x in seqs], dtype=torch.bool)
            dens = torch.where(ok & torch.isfinite(tilt), lp + tilt, torch.full_like(lp, -math.inf))
            value = float(torch.logsumexp(dens, 0))
            self._cache[key] = value
        return value

    def log_potential_states(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        values = [self.log_energy(tuple(row), step) for row in states.tolist()]
        return torch.tensor(values, dtype=torch.float64), Cost()
