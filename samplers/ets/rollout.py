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
masked-diffusion counterpart (:class:`~tiltsample.diffusion.StatePotential`); both live in
:mod:`~tiltsample.samplers.ets.potentials`. The checks of an ETS-IS proposal and the clipping
of the log-ratio are in :mod:`~tiltsample.samplers.ets.proposal`.

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

from tiltsample.decode_engine import score_continuations
from tiltsample.decoding import decode_until_complete, rows_to_seqs
from tiltsample.diffusion import MaskedDiffusionPolicy, denoise, states_to_seqs
from tiltsample.policy import DecodeSession, RolloutSession
from tiltsample.row_generators import RowGenerators
from tiltsample.samplers.ets.proposal import clip_log_ratio
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "RolloutBatch",
    "Scores",
    "TiltScorer",
    "check_reward_range",
    "diffusion_rollouts",
    "log_mean_energy",
    "needs_reference",
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
    row_tokens: Tensor | None = None
    """Autoregressive only: ``[R·K]`` generated tokens of every rollout (EOS included)."""


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
    generator: torch.Generator | RowGenerators,
    *,
    temperature: float = 1.0,
    is_log_ratio_clip: float | None = None,
) -> RolloutBatch:
    """``K`` rollouts of every row of ``session`` (incomplete prefixes of one length).

    ``session`` (``p_ref``) and ``proposal_session`` (the proposal policy, same rows, or None)
    are not modified beyond a ``logprobs()`` call (whose cost, if any, is the caller's; none on
    a :class:`~tiltsample.policy.RolloutSession`): the
    rollouts run on forks expanded by ``select``, so each prefix is encoded once however many
    rollouts it gets. Without a proposal the rollouts are decoded by ``p_ref``
    at ``temperature``; with one, by the proposal at ``temperature``, and ``p_ref`` scores the
    rollout tokens by teacher forcing on its fork (one model call for all of them when the session
    has ``extend_and_score``).

    ``generator`` may give every row of ``session`` its own generator
    (:class:`~tiltsample.row_generators.RowGenerators`, one group per independent run): the
    ``K`` rollouts of a row then draw from the row's generator.
    """
    rows = session.batch_size
    rep = torch.arange(rows).repeat_interleave(num_rollouts)
    if isinstance(generator, RowGenerators) and num_rollouts > 1:
        generator = generator.subset(rep)
    # the prefixes are pushed through the model once, before expansion (a rollout-level session,
    # i.e. a serving engine with prefix caching, shares them without it)
    for s in (session, proposal_session):
        if s is not None and not isinstance(s, RolloutSession):
            s.logprobs()
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
            drop_finished=True,  # a throw-away session
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
            drop_finished=True,  # a throw-away session
        )
        token_lq = dec.token_log_q
        # teacher forcing: p_ref of all rollout tokens, in one model call when the session can
        # score given tokens (extend_and_score), else one call per position
        token_lp = score_continuations(ref, dec.tokens, dec.new_lengths)
        extra = prop.cost
    log_ref = token_lp.sum(dim=1)
    log_q = token_lq.sum(dim=1)
    log_ratio = torch.where(
        torch.isneginf(log_ref), torch.full_like(log_ref, -math.inf), log_ref - log_q
    )
    log_ratio, clipped = clip_log_ratio(log_ratio, is_log_ratio_clip)
    seqs = rows_to_seqs(torch.cat([prefix_rows, dec.tokens], dim=1), target.eos_id)
    cost = ref.cost + extra + Cost(generated_tokens=dec.generated_tokens)
    return RolloutBatch(seqs, log_ratio, log_ref, clipped, cost, row_tokens=dec.new_lengths)


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
    policies must provide ``completion_logprob``;
    :func:`~tiltsample.samplers.ets.proposal.check_proposal`).
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
