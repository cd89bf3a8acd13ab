r"""The K-rollout energy estimator of ETS, as a prefix potential that SMC and beam can reuse.

The energy of a partial response ``s`` (``specs/ets.md`` §2) is
``E(s) = E_{x ~ p_ref(· | s)}[exp(log_tilt(x))]``. With ``K`` completions ``z_1..z_K`` of ``s``
drawn from a rollout law ``q`` (``p_ref`` itself, ``p_ref`` at a temperature, or a cheaper
``proposal`` policy: ETS-IS, §5),

.. math::

    \hat{\mathcal E}(s) = \frac1K \sum_{k=1}^K
        \frac{p_{ref}(z_k \mid s)}{q(z_k \mid s)}\, e^{\mathrm{log\_tilt}(s \oplus z_k)},
    \qquad
    \log \hat{\mathcal E}(s) = \operatorname{logsumexp}_k\big(\log\rho_k
        + \mathrm{log\_tilt}_k\big) - \log K,

is unbiased and non-negative, provided that

* the ratio ``rho_k`` runs over the **rollout tokens only** (not the committed prefix, not the
  candidate block: pitfall 2 of ``specs/ets.md`` §11),
* both of its terms are the laws actually sampled: ``q`` is the proposal at the temperature it
  was sampled at (full vocabulary, no top-k/top-p), with the same EOS/length rule (under
  ``truncation="condition"`` EOS is forced at the cap: factor 1 in ``q``, ``p_ref(EOS | ·)`` in
  ``p_ref``), and ``p_ref`` is the target's policy at temperature 1 (pitfall 3),
* ``q > 0`` wherever ``p_ref > 0`` (a full-vocabulary proposal of positive temperature has it).

A complete ``s`` is scored exactly (``log E = log_tilt(s)``, no rollouts). All arithmetic is in log
space: ``lam = 1e-3`` with rewards in ``[0, 1]`` neither overflows nor produces NaN.

``is_log_ratio_clip`` (off by default) clips every rollout's summed log-ratio to
``[-c, c]`` as the reference code does (±10); this **biases** the estimator, and the fraction of
clipped rollouts is reported.

Shared prefixes: :func:`rollouts_from_sessions` expands a session whose rows are the prefixes by
``select`` (repeat-interleave) and never re-encodes them; :class:`RolloutPotential` is the
:class:`~tiltsample.reward.PrefixPotential` wrapper for callers that hold only ``Seq`` prefixes
(it encodes each distinct prefix once). :class:`DiffusionRolloutPotential` is the
masked-diffusion counterpart (:class:`~tiltsample.diffusion.StatePotential`).

Cost: ``K`` rollouts per incomplete prefix (generated tokens = rollout tokens, EOS included), one
reward call per rollout and tilt term, and the forward tokens of the sessions involved (for
ETS-IS, the proposal generates and ``p_ref`` scores the rollout tokens by teacher forcing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import decode_until_complete, rows_to_seqs
from tiltsample.diffusion import (
    MaskedDiffusionPolicy,
    denoise,
    is_masked_diffusion,
    states_to_seqs,
)
from tiltsample.policy import DecodeSession, ReferencePolicy, extend_and_score, open_session
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "DiffusionRolloutPotential",
    "RolloutBatch",
    "RolloutPotential",
    "Scores",
    "TiltScorer",
    "check_proposal",
    "diffusion_rollouts",
    "log_mean_energy",
    "rollouts_from_sessions",
]


class RolloutBatch(NamedTuple):
    """``R·K`` rollouts of ``R`` prefixes (row-major: the ``K`` rollouts of row 0 first)."""

    sequences: list[Seq]
    """Complete responses ``prefix ⊕ rollout`` (cut after EOS)."""
    log_ratio: Tensor
    """``[R·K]`` ``log p_ref(z | s) − log q(z | s)`` over the rollout tokens (clipped if asked;
    exactly 0 when the rollouts come from ``p_ref`` at temperature 1)."""
    log_reference: Tensor
    """``[R·K]`` ``log p_ref(z | s)`` of the rollout tokens (temperature 1)."""
    clipped: int
    """Rollouts whose log-ratio was clipped."""
    cost: Cost
    row_passes: int = 0
    """Masked diffusion only: denoiser passes counted per row."""


class Scores(NamedTuple):
    """What a scorer returns for complete responses."""

    log_tilt: Tensor
    reward: Tensor | None
    cost: Cost


class TiltScorer:
    """The fixed-reward scorer: the target's summed log-tilt (``specs/ets.md`` §7, default).

    Parameters
    ----------
    target
        The tilted target.
    reward_range
        ``(lo, hi)``: the bound ``r ∈ [lo, hi]`` that the theory of ``specs/ets.md`` §8 assumes
        (A1). When given, a primary reward outside it raises ``ValueError`` instead of passing
        silently.
    """

    def __init__(
        self, target: TiltedTarget, reward_range: tuple[float, float] | None = None
    ) -> None:
        self.target = target
        self.reward_range = check_reward_range(reward_range)

    def __call__(self, xs: Sequence[Seq], log_reference: Tensor | None) -> Scores:
        xs = list(xs)
        if not xs:
            empty = torch.zeros(0, dtype=torch.float64)
            return Scores(empty, None if self.target.reward is None else empty, Cost())
        scores = self.target.evaluate_tilt(xs, log_reference=log_reference)
        if self.reward_range is not None and scores.reward is not None:
            lo, hi = self.reward_range
            bad = (scores.reward < lo) | (scores.reward > hi)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"reward_range=({lo}, {hi}): the reward of {xs[i]} is "
                    f"{float(scores.reward[i])}, outside the declared range"
                )
        return Scores(scores.log_tilt, scores.reward, scores.cost)


def check_reward_range(reward_range: Any) -> tuple[float, float] | None:
    """Validate ``reward_range``: None or a pair of finite numbers ``lo <= hi``."""
    if reward_range is None:
        return None
    try:
        lo, hi = (float(v) for v in reward_range)
    except (TypeError, ValueError):
        raise TypeError(
            f"reward_range must be None or a pair (lo, hi), got {reward_range!r}"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"reward_range must be finite numbers with lo <= hi, got {reward_range}")
    return lo, hi


def needs_reference(target: TiltedTarget) -> bool:
    """Whether a tilt term of ``target`` reads ``log p_ref`` (the power tilt)."""
    return any(getattr(t.reward, "uses_reference_logprob", False) for t in target.terms)


def check_proposal(target: TiltedTarget, proposal: Any) -> None:
    """A rollout proposal must be the same kind of policy with the same vocabulary and EOS."""
    if proposal is None:
        return
    diffusion = is_masked_diffusion(target.policy)
    if diffusion != is_masked_diffusion(proposal):
        kind = "MaskedDiffusionPolicy" if diffusion else "ReferencePolicy"
        raise TypeError(f"proposal must be a {kind} like the target's policy")
    if not diffusion:
        for attr in ("vocab_size", "eos_id", "next_logprobs"):
            if not hasattr(proposal, attr):
                raise TypeError(f"proposal must implement ReferencePolicy; missing {attr!r}")
    if proposal.vocab_size != target.vocab_size:
        raise ValueError(
            f"proposal has vocab_size={proposal.vocab_size} but the target's policy has "
            f"{target.vocab_size}: the importance ratio p_ref/p_proposal needs one vocabulary"
        )
    if proposal.eos_id != target.eos_id:
        raise ValueError(
            f"proposal has eos_id={proposal.eos_id} but the target's policy has {target.eos_id}"
        )
    if diffusion:
        pol = target.policy
        for attr in ("mask_id", "length", "num_steps"):
            if getattr(proposal, attr) != getattr(pol, attr):
                raise ValueError(
                    f"a masked-diffusion proposal must have the same {attr} as the target's "
                    f"policy ({getattr(pol, attr)}), got {getattr(proposal, attr)}"
                )
        for who, obj in (("the target's policy", pol), ("proposal", proposal)):
            if not callable(getattr(obj, "completion_logprob", None)):
                raise ValueError(
                    f"exact ETS-IS on a masked-diffusion policy needs completion_logprob on "
                    f"{who} (the sampler's path-marginal law, specs/ets.md §5); without it "
                    "the importance ratio is intractable"
                )


def clip_log_ratio(log_ratio: Tensor, clip: float | None) -> tuple[Tensor, int]:
    """Clip to ``[-clip, clip]`` (None: unchanged); also return how many entries were clipped."""
    if clip is None:
        return log_ratio, 0
    hit = (log_ratio > clip) | (log_ratio < -clip)
    return log_ratio.clamp(min=-clip, max=clip), int(hit.sum())


def log_mean_energy(log_ratio: Tensor, log_tilt: Tensor, num_rollouts: int) -> Tensor:
    r"""``[R]`` ``log((1/K) Σ_k ρ_k e^{tilt_k})`` from ``[R·K]`` values (``-inf`` if all zero)."""
    values = torch.where(
        torch.isneginf(log_ratio) | torch.isneginf(log_tilt),
        torch.full_like(log_tilt, -math.inf),
        log_ratio + log_tilt,
    ).view(-1, num_rollouts)
    return torch.logsumexp(values, dim=1) - math.log(num_rollouts)


def rollouts_from_sessions(
    target: TiltedTarget,
    session: DecodeSession,
    proposal_session: DecodeSession | None,
    num_rollouts: int,
    generator: torch.Generator,
    *,
    temperature: float = 1.0,
    is_log_ratio_clip: float | None = None,
) -> RolloutBatch:
    """``K`` rollouts of every row of ``session`` (incomplete prefixes of one length).

    ``session`` (``p_ref``) and ``proposal_session`` (the proposal policy, same rows, or None)
    are not modified beyond a ``logprobs()`` call (whose cost, if any, is the caller's): the
    rollouts run on forks expanded by ``select``, so each prefix is encoded once however many
    rollouts it gets. Without a proposal the rollouts are decoded by ``p_ref``
    at ``temperature``; with one, by the proposal at ``temperature``, and ``p_ref`` scores the
    rollout tokens by teacher forcing on its fork (one model call for all of them when the session
    has ``extend_and_score``).
    """
    rows = session.batch_size
    rep = torch.arange(rows).repeat_interleave(num_rollouts)
    session.logprobs()  # the prefixes are pushed through the model once, before expansion
    if proposal_session is not None:
        proposal_session.logprobs()
    ref = session.fork()
    if num_rollouts > 1:  # K = 1: the rows are already the rollout rows (no cache copy)
        ref.select(rep)
    prefix_rows = ref.tokens()
    condition = target.truncation == "condition"
    extra = Cost()
    if proposal_session is None:
        dec = decode_until_complete(
            ref,
            generator,
            eos_id=target.eos_id,
            max_length=target.max_new_tokens,
            temperature=temperature,
            force_eos_at_cap=condition,
        )
        token_lp, token_lq = dec.token_log_p, dec.token_log_q
    else:
        prop = proposal_session.fork()
        if num_rollouts > 1:
            prop.select(rep)
        dec = decode_until_complete(
            prop,
            generator,
            eos_id=target.eos_id,
            max_length=target.max_new_tokens,
            temperature=temperature,
            force_eos_at_cap=condition,
        )
        token_lq = dec.token_log_q
        # teacher forcing: p_ref of all rollout tokens, in one model call when the session can
        # score given tokens (extend_and_score), else one call per position
        token_lp = extend_and_score(ref, dec.tokens).to(torch.float64)
        live = torch.arange(dec.tokens.shape[1])[None, :] < dec.new_lengths[:, None]
        token_lp = torch.where(live, token_lp, torch.zeros_like(token_lp))
        extra = prop.cost
    log_ref = token_lp.sum(dim=1)
    log_q = token_lq.sum(dim=1)
    log_ratio = torch.where(
        torch.isneginf(log_ref), torch.full_like(log_ref, -math.inf), log_ref - log_q
    )
    log_ratio, clipped = clip_log_ratio(log_ratio, is_log_ratio_clip)
    seqs = rows_to_seqs(torch.cat([prefix_rows, dec.tokens], dim=1), target.eos_id)
    cost = ref.cost + extra + Cost(generated_tokens=dec.generated_tokens)
    return RolloutBatch(seqs, log_ratio, log_ref, clipped, cost)


def diffusion_rollouts(
    target: TiltedTarget,
    states: Tensor,
    step: int,
    num_rollouts: int,
    generator: torch.Generator,
    *,
    proposal: MaskedDiffusionPolicy | None = None,
    is_log_ratio_clip: float | None = None,
) -> RolloutBatch:
    """``K`` completions of every masked-diffusion state (all at step ``step``).

    Without a proposal the base sampler of the target's policy runs to the end (ratio 0).
    With one, the proposal runs and the exact ratio is
    ``completion_logprob_ref − completion_logprob_proposal`` on the complete states (both
    policies must provide ``completion_logprob``; :func:`check_proposal`).
    """
    policy: Any = target.policy
    runner: Any = policy if proposal is None else proposal
    rep = states.repeat_interleave(num_rollouts, dim=0)
    den = denoise(runner, target.prompt, rep, step, int(policy.num_steps), generator)
    final = den.states
    seqs = states_to_seqs(final, target.eos_id, int(policy.mask_id))
    if proposal is None:
        log_ratio = torch.zeros(len(seqs), dtype=torch.float64)
    else:
        lp = policy.completion_logprob(target.prompt, rep, step, final).to(torch.float64)
        lq = proposal.completion_logprob(target.prompt, rep, step, final).to(torch.float64)  # type: ignore[attr-defined]
        log_ratio = torch.where(torch.isneginf(lp), lp, lp - lq)
    log_ratio, clipped = clip_log_ratio(log_ratio, is_log_ratio_clip)
    log_ref = (
        target.log_reference(seqs)
        if needs_reference(target)
        else torch.zeros(len(seqs), dtype=torch.float64)
    )
    return RolloutBatch(seqs, log_ratio, log_ref, clipped, den.cost, den.row_passes)


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
