r"""The K-rollout energy estimator as a potential that SMC, FK steering and beam can reuse:
:class:`RolloutPotential` (a :class:`~tiltsample.reward.PrefixPotential` over ``Seq`` prefixes) and
:class:`DiffusionRolloutPotential` (a :class:`~tiltsample.diffusion.StatePotential` over
masked-diffusion states). The estimator and its conditions are in
:mod:`~tiltsample.samplers.ets.rollout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.diffusion import MaskedDiffusionPolicy, is_masked_diffusion, states_to_seqs
from tiltsample.policy import DecodeSession, ReferencePolicy, open_session
from tiltsample.samplers.ets.proposal import check_proposal
from tiltsample.samplers.ets.rollout import (
    TiltScorer,
    diffusion_rollouts,
    log_mean_energy,
    needs_reference,
    rollouts_from_sessions,
)
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["DiffusionRolloutPotential", "RolloutPotential"]


def _check_common(
    target: TiltedTarget,
    num_rollouts: int,
    proposal: Any,
    temperature: float,
    is_log_ratio_clip: float | None,
) -> tuple[int, float, float | None]:
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    k = validation.positive_int("num_rollouts", num_rollouts)
    tau = validation.positive_float("proposal_temperature", temperature)
    clip = (
        None
        if is_log_ratio_clip is None
        else validation.positive_float("is_log_ratio_clip", is_log_ratio_clip)
    )
    check_proposal(target, proposal)
    return k, tau, clip


class RolloutPotential:
    r"""``log Ê(prefix)`` from ``K`` rollouts: a :class:`~tiltsample.reward.PrefixPotential`.

    Parameters
    ----------
    target
        An autoregressive tilted target.
    num_rollouts
        ``K >= 1``.
    proposal
        A cheaper rollout policy with the same vocabulary (ETS-IS); None rolls out with ``p_ref``.
    proposal_temperature
        Temperature of the rollout law (ratios use the tempered law, so the estimate stays
        unbiased).
    is_log_ratio_clip
        Clip each rollout's summed log-ratio to ``±c`` (biased; off by default).
    reward_range
        Declared reward bounds (see :class:`TiltScorer`).

    Unbiased for ``E(prefix)`` (not for its log). Each call encodes every distinct prefix once
    and expands it to ``K`` rows; complete prefixes are scored exactly. The estimates of
    duplicate prefixes are independent.
    """

    def __init__(
        self,
        target: TiltedTarget,
        num_rollouts: int,
        *,
        proposal: ReferencePolicy | None = None,
        proposal_temperature: float = 1.0,
        is_log_ratio_clip: float | None = None,
        reward_range: tuple[float, float] | None = None,
    ) -> None:
        if is_masked_diffusion(getattr(target, "policy", None)):
            raise TypeError(
                "RolloutPotential is for autoregressive policies; use DiffusionRolloutPotential"
            )
        self.num_rollouts, self.temperature, self.clip = _check_common(
            target, num_rollouts, proposal, proposal_temperature, is_log_ratio_clip
        )
        self.target = target
        self.proposal = proposal
        self.scorer = TiltScorer(target, reward_range)
        self.clipped = 0
        """Rollouts clipped so far (with ``is_log_ratio_clip``)."""
        self.rollouts = 0
        """Rollouts drawn so far."""

    def log_potential(
        self, prompt: Seq, prefixes: Sequence[Seq], generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        """``[B]`` float64 ``log Ê`` of each prefix and the cost spent."""
        target = self.target
        if tuple(prompt) != target.prompt:
            raise ValueError(f"RolloutPotential was built for prompt {target.prompt}, got {prompt}")
        xs = [tuple(int(t) for t in p) for p in prefixes]
        out = torch.zeros(len(xs), dtype=torch.float64)
        cost = Cost()
        complete = [i for i, x in enumerate(xs) if target.is_complete(x)]
        if complete:
            done = [xs[i] for i in complete]
            log_ref = target.log_reference(done) if needs_reference(target) else None
            sc = self.scorer(done, log_ref)
            out[complete] = sc.log_tilt
            cost = cost + sc.cost
        by_length: dict[int, list[int]] = {}
        for i, x in enumerate(xs):
            if not target.is_complete(x):
                by_length.setdefault(len(x), []).append(i)
        for length, idx in sorted(by_length.items()):
            values, c = self._estimate_group([xs[i] for i in idx], length, generator)
            out[idx] = values
            cost = cost + c
        return out, cost

    def _estimate_group(
        self, group: list[Seq], length: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        target = self.target
        distinct = sorted(set(group))
        where = {x: i for i, x in enumerate(distinct)}
        inverse = torch.tensor([where[x] for x in group], dtype=torch.long)
        tokens = torch.tensor(distinct, dtype=torch.long).view(len(distinct), length)
        session, log_prefix = _encode(target.policy, target.prompt, tokens, needs_reference(target))
        session.select(inverse)
        log_prefix = log_prefix[inverse]
        prop = None
        if self.proposal is not None:
            prop, _ = _encode(self.proposal, target.prompt, tokens, False)
            prop.select(inverse)
        batch = rollouts_from_sessions(
            target,
            session,
            prop,
            self.num_rollouts,
            generator,
            temperature=self.temperature,
            is_log_ratio_clip=self.clip,
        )
        k = self.num_rollouts
        full_ref = log_prefix.repeat_interleave(k) + batch.log_reference
        sc = self.scorer(batch.sequences, full_ref)
        self.clipped += batch.clipped
        self.rollouts += len(batch.sequences)
        cost = session.cost + (Cost() if prop is None else prop.cost) + batch.cost
        return log_mean_energy(batch.log_ratio, sc.log_tilt, k), cost + sc.cost

    def __repr__(self) -> str:
        return (
            f"RolloutPotential(K={self.num_rollouts}, proposal={self.proposal!r}, "
            f"temperature={self.temperature}, clip={self.clip})"
        )


def _encode(
    policy: Any, prompt: Seq, tokens: Tensor, with_logprob: bool
) -> tuple[DecodeSession, Tensor]:
    """A prefilled session whose rows are ``tokens`` (one row per distinct prefix).

    With ``with_logprob`` the tokens are teacher-forced one position at a time (the same forward
    tokens as a prefill, one model call per position) so that ``log p(prefix)`` comes for free;
    otherwise they are appended in one ``extend``. The session's ``logprobs()`` is called before
    returning, so expanding its rows later does not re-encode the prefixes.
    """
    rows, length = int(tokens.shape[0]), int(tokens.shape[1])
    session = open_session(policy, prompt, rows)
    log_p = torch.zeros(rows, dtype=torch.float64)
    if with_logprob:
        for j in range(length):
            lp = session.logprobs().to(torch.float64)
            log_p = log_p + lp.gather(1, tokens[:, j : j + 1]).squeeze(1)
            session.extend(tokens[:, j])
    elif length:
        session.extend(tokens)
    session.logprobs()
    return session, log_p


class DiffusionRolloutPotential:
    r"""``log Ê(state)`` from ``K`` completions of masked-diffusion states: a
    :class:`~tiltsample.diffusion.StatePotential`.

    The base sampler of the target's policy (or an exact-ratio ``proposal``, ETS-IS) runs from
    each state at ``step`` to the end; ``log Ê = logsumexp_k(log ρ_k + log_tilt_k) − log K``.
    Complete states are scored exactly. Parameters as in :class:`RolloutPotential`.
    """

    def __init__(
        self,
        target: TiltedTarget,
        num_rollouts: int,
        *,
        proposal: MaskedDiffusionPolicy | None = None,
        is_log_ratio_clip: float | None = None,
        reward_range: tuple[float, float] | None = None,
    ) -> None:
        if not is_masked_diffusion(getattr(target, "policy", None)):
            raise TypeError("DiffusionRolloutPotential needs a masked-diffusion target")
        self.num_rollouts, _, self.clip = _check_common(
            target, num_rollouts, proposal, 1.0, is_log_ratio_clip
        )
        self.target = target
        self.proposal = proposal
        self.scorer = TiltScorer(target, reward_range)
        self.clipped = 0
        self.rollouts = 0

    def log_potential_states(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        """``[B]`` float64 ``log Ê`` of each state (all at ``step``) and the cost spent."""
        target = self.target
        policy: Any = target.policy
        if tuple(prompt) != target.prompt:
            raise ValueError(f"potential was built for prompt {target.prompt}, got {prompt}")
        complete = ~(states == policy.mask_id).any(dim=1)
        out = torch.zeros(int(states.shape[0]), dtype=torch.float64)
        cost = Cost()
        if bool(complete.any()):
            seqs = states_to_seqs(states[complete], target.eos_id, int(policy.mask_id))
            log_ref = target.log_reference(seqs) if needs_reference(target) else None
            sc = self.scorer(seqs, log_ref)
            out[complete] = sc.log_tilt
            cost = cost + sc.cost
        if bool((~complete).any()):
            batch = diffusion_rollouts(
                target,
                states[~complete],
                step,
                self.num_rollouts,
                generator,
                proposal=self.proposal,
                is_log_ratio_clip=self.clip,
            )
            sc = self.scorer(
                batch.sequences, batch.log_reference if needs_reference(target) else None
            )
            out[~complete] = log_mean_energy(batch.log_ratio, sc.log_tilt, self.num_rollouts)
            self.clipped += batch.clipped
            self.rollouts += len(batch.sequences)
            cost = cost + batch.cost + sc.cost
        return out, cost
