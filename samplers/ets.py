r"""ETS: energy-guided test-time scaling (Algorithm 1), its importance-sampling variant ETS-IS, on
autoregressive and masked-diffusion policies.

Target
    The tilted target ``pi(x) ∝ p_ref(x) exp(log_tilt(x))`` (with ``log_tilt = r/lam`` plus any
    further terms). Its optimal next-block kernel is the Doob h-transform
    ``pi(c | s) = p_ref(c | s) E(c) / E(s)`` with the energy
    ``E(s) = E_{x ~ p_ref(·|s)}[exp(log_tilt(x))]`` (``specs/ets.md`` §2, Prop. 2).
Algorithm (one chain; ``num_samples`` chains run batched, independently)
    ``I = ceil(d / B)`` guidance steps (``d = max_new_tokens``, ``B = block_size``). At step ``i``
    from the current prefix ``s``:

    1. draw ``M = num_candidates`` candidate blocks ``c_1..c_M`` of ``B`` tokens from
       ``q(· | s)`` (``p_ref`` at ``temperature``; 1 by default) in one batched session whose
       prefix is shared (``select``/``fork``, never re-encoded); a block stops early at EOS;
    2. score each candidate by ``log Ê(c_m)``: exactly ``log_tilt(c_m)`` if it is complete
       (EOS, or the length cap), else from ``K = num_rollouts`` rollouts to completion
       (:mod:`~tiltsample.samplers.ets_rollout`, ``log Ê = logsumexp_k(log ρ_k + log_tilt_k) −
       log K``) or from an oracle ``potential``;
    3. draw **one** index with probability ``w_m / Σ_j w_j``,
       ``log w_m = log Ê(c_m) + log p_ref(c_m | s) − log q(c_m | s)`` (the last two cancel
       exactly at temperature 1) — a sampling-importance-resampling step, not argmax and not a
       softmax of the raw energies;
    4. continue from ``c_m``; stop when it is complete.

    Rollouts only score candidates and are thrown away.
Batching
    ``batching="lockstep"`` (default): the chains of a batch go through each phase together.
    ``batching="continuous"``: every row at its own phase in one ragged session, one generator
    stream per chain, the same law per chain (:mod:`~tiltsample.samplers.ets_continuous`).
Masked diffusion
    On a :class:`~tiltsample.diffusion.MaskedDiffusionPolicy` a guidance step runs
    ``B = block_size`` denoising steps of the base sampler for each of the ``M`` candidates
    (``I = ceil(T / B)``); rollouts run the same base sampler to step ``T``. Candidates are
    complete only at the last step.
ETS-IS
    ``proposal=`` a cheaper policy with the same vocabulary: rollouts come from it (at
    ``proposal_temperature``) and carry ``ρ = p_ref(z|c) / q(z|c)`` over the rollout tokens only,
    under the laws actually sampled (``specs/ets.md`` §5); ``p_ref`` scores the rollout tokens by
    teacher forcing. For masked diffusion the ratio is the exact path-marginal
    ``completion_logprob`` ratio (both policies must provide it). ``is_log_ratio_clip`` clips the
    log-ratio as the reference code does — biased, off by default, and reported.
Reward modes
    ``reward_mode="fixed"`` (default; the theory setting): the target's tilt.
    ``reward_mode="self-consistency"`` (paper §4.4): ``r = 1{answer(x) = majority}`` with the
    majority over a per-chain answer cache of every completion produced so far (complete
    candidates and rollouts of all steps) plus the step's new ones; ties go to the answer seen
    first; the cache lives in the sampler state and is reported in ``meta["answer_caches"]``.
    The reward depends on the samples, so the output is **not** a sampler of a fixed target.
Exactness
    Each step is SIR on the extended space (candidate, rollouts) whose candidate marginal is the
    exact kernel, so the per-step law converges to ``pi(· | s)`` as ``M → ∞`` at **any** fixed
    ``K`` (even ``K = 1``), with TV ``≤ ρ̂(s)/M`` (``specs/ets.md`` §8.2); the chain's law tends
    to ``pi`` as ``M → ∞``. With ``I = 1`` ETS is soft best-of-N (SIR over ``M`` complete
    responses), and ``lam → ∞`` gives ``p_ref`` exactly. Exact laws:
    :mod:`tiltsample.theory.ets_laws`.
Evidence
    ``log_evidence = log mean`` of the first step's candidate weights, an unbiased estimate of
    ``Z`` (in ``Z``, not in ``log Z``; fixed reward mode only).
Cost per chain (no early EOS, ``B | d``)
    ``N_tokens = Σ_i M (B + K (d − iB)) = M (1 + K (I − 1)/2) d`` generated tokens (paper,
    App. B.1): ``M·B`` candidate tokens and ``M·K·(d − iB)`` rollout tokens at step ``i``, none
    at the last. Complete candidates get no rollouts, so EOS only lowers the count. Forward
    tokens: each generated token once plus one prefill of the prompt (ETS-IS adds the proposal's
    forward tokens and ``p_ref``'s teacher-forced rollout tokens). Reward calls: one per complete
    candidate and rollout per tilt term. Masked diffusion: ``M`` rows × ``B`` denoiser passes for
    the candidates and ``M·K`` rows × the remaining passes for the rollouts
    (``meta["denoiser_passes"]``).
Reported per step (``ETSInfo``) and per draw (``meta["selections"]``)
    The candidates, the selection probabilities drawn from and the chosen index, for
    Rao–Blackwellised law estimates (:func:`tiltsample.theory.ets_laws.rao_blackwell_law`).

References
----------
Li, Zhang, Yi, Li, Wang, Wang, Fan, *ETS: Energy-Guided Test-Time Scaling for Training-Free RL
Alignment*, arXiv 2601.21484 (v3), Algorithms 1–2, Eqs. 8 and 11, App. B; ``specs/ets.md``.
Rubin (1988) and Skare, Bølviken & Holden (2003) for SIR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import iid, validation
from tiltsample.decoding import decode_until_complete, rows_to_seqs
from tiltsample.diffusion import denoise, initial_states, is_masked_diffusion, states_to_seqs
from tiltsample.policy import DecodeSession, ReferencePolicy, open_session
from tiltsample.results import SampleSet, Selection
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.ets_rollout import (
    DiffusionRolloutPotential,
    RolloutPotential,
    Scores,
    TiltScorer,
    check_proposal,
    check_reward_range,
    diffusion_rollouts,
    log_mean_energy,
    needs_reference,
    rollouts_from_sessions,
)
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "ANSWERS",
    "BATCHINGS",
    "OUTPUTS",
    "REWARD_MODES",
    "AnswerCache",
    "DiffusionRolloutPotential",
    "ETSConfig",
    "ETSInfo",
    "ETSState",
    "RolloutPotential",
    "build_kernel",
    "done",
    "init",
    "num_guidance_steps",
    "result",
    "sampler",
    "selection_probabilities",
]

REWARD_MODES: tuple[str, ...] = ("fixed", "self-consistency")
BATCHINGS: tuple[str, ...] = ("lockstep", "continuous")
"""``batching=``: chains in lock step (default) or continuous batching
(:mod:`~tiltsample.samplers.ets_continuous`)."""
OUTPUTS: tuple[str, ...] = ("chain", "vote")


def _answer_presets(eos_id: int) -> dict[str, Callable[[Seq], Hashable | None]]:
    def content(x: Seq) -> Hashable | None:
        return x[:-1] if x and x[-1] == eos_id else x

    def last_token(x: Seq) -> Hashable | None:
        body = x[:-1] if x and x[-1] == eos_id else x
        return body[-1] if body else None

    return {"last-token": last_token, "content": content}


ANSWERS: tuple[str, ...] = ("last-token", "content")
"""Answer extractors accepted by name (``answer=``): the last content token (None if empty), or
the whole content (the tokens before EOS)."""


# ----------------------------------------------------------------------------- answer cache
class AnswerCache(NamedTuple):
    """The self-consistency answer cache of one chain (``specs/ets.md`` §7).

    ``counts`` is insertion-ordered (first-seen order), which breaks majority ties
    deterministically; ``first`` keeps the first completion seen with each answer (the
    ``output="vote"`` rule).
    """

    counts: dict[Hashable, int]
    first: dict[Hashable, Seq]

    @classmethod
    def empty(cls) -> AnswerCache:
        return cls({}, {})

    @property
    def total(self) -> int:
        """Valid answers cached."""
        return sum(self.counts.values())

    def majority(self, new: Sequence[Hashable | None] = ()) -> tuple[Hashable | None, int]:
        """The most common answer in the cache ∪ ``new`` and its count (None, 0 if none).

        Ties go to the answer seen first (cache order, then ``new`` in order).
        """
        counts = dict(self.counts)
        for a in new:
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        best: Hashable | None = None
        top = 0
        for a, c in counts.items():
            if c > top:
                best, top = a, c
        return best, top

    def added(self, answers: Sequence[Hashable | None], seqs: Sequence[Seq]) -> AnswerCache:
        """A new cache with ``answers`` (of ``seqs``) added; None answers are not counted."""
        counts, first = dict(self.counts), dict(self.first)
        for a, x in zip(answers, seqs, strict=True):
            if a is None:
                continue
            counts[a] = counts.get(a, 0) + 1
            first.setdefault(a, x)
        return AnswerCache(counts, first)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly view: ``{"counts": [[answer, count], ...], "total": n}``."""
        return {"counts": [[_jsonable(a), c] for a, c in self.counts.items()], "total": self.total}


def _jsonable(a: Hashable) -> Any:
    return list(a) if isinstance(a, tuple) else a


# ----------------------------------------------------------------------------- config, state
class ETSConfig(NamedTuple):
    """Validated parameters of one ETS run (closed over by ``build_kernel``)."""

    num_candidates: int
    num_rollouts: int
    block_size: int | None
    temperature: float
    proposal: Any
    proposal_temperature: float
    is_log_ratio_clip: float | None
    potential: Any
    reward_mode: str
    answer: Callable[[Seq], Hashable | None] | str | None
    sc_zero_if_unique: bool
    output: str
    reward_range: tuple[float, float] | None
    record_selections: bool
    batching: str = "lockstep"


class _Batch(NamedTuple):
    """The chains of one batch, in flight."""

    n: int
    live: list[int]
    """Batch-local indices of the running chains, in session-row / state-row order."""
    session: DecodeSession | None
    proposal_session: DecodeSession | None
    states: Tensor | None
    """Masked diffusion: ``[len(live), L]`` current states."""
    guidance_step: int
    log_reference: Tensor
    outputs: list[Seq | None]
    rewards: Tensor
    failed: Tensor
    failed_at: list[int | None]
    """Per chain: the 1-based guidance step of its first failure (all weights zero), or None."""
    selections: list[list[Selection]]
    caches: list[AnswerCache] | None
    first_log_weights: Tensor | None
    cost: Cost
    counters: dict[str, int]


class ETSState(NamedTuple):
    """Chains still to start, the batch in flight, and the finished batches."""

    target: TiltedTarget
    remaining: int
    batch_size: int
    batch: _Batch | None
    parts: tuple[SampleSet, ...]
    engine: Any = None
    """``batching="continuous"``: the :class:`~tiltsample.samplers.ets_continuous.ContinuousETS`
    engine in flight (None otherwise)."""


class ETSInfo(NamedTuple):
    """What one guidance step (of every running chain of the batch) reports."""

    cost: Cost
    guidance_step: int
    """1-based index of the step just taken."""
    selection_probs: Tensor
    """``[n_live, M]`` the probabilities each chain's index was drawn from."""
    log_weights: Tensor
    """``[n_live, M]`` candidate log-weights ``log Ê + log p/q`` (``-inf`` = weight 0)."""
    chosen: Tensor
    """``[n_live]`` chosen candidate per chain."""
    complete: Tensor
    """``[n_live, M]`` which candidates were complete (scored exactly)."""
    clipped: int
    """Rollouts whose IS log-ratio was clipped at this step."""


# ----------------------------------------------------------------------------- helpers
def selection_probabilities(log_weights: Tensor) -> tuple[Tensor, Tensor]:
    """``[n, M]`` SIR probabilities ``w_m / Σ_j w_j`` from log-weights, and ``failed [n]``.

    A row whose weights are all zero (``-inf``) has no valid candidate: it gets uniform
    probabilities and is marked failed (its draw then carries log-weight ``-inf``).
    """
    lw = log_weights.to(torch.float64)
    valid = torch.isfinite(lw).any(dim=1, keepdim=True)
    safe = torch.where(valid, lw, torch.zeros_like(lw))
    return torch.softmax(safe, dim=1), ~valid.squeeze(1)


def num_guidance_steps(target: TiltedTarget, block_size: int | None) -> int:
    """``I = ceil(d / B)`` (autoregressive) or ``ceil(T / B)`` (masked diffusion)."""
    horizon = _horizon(target)
    return math.ceil(horizon / _block(target, block_size))


def _horizon(target: TiltedTarget) -> int:
    if is_masked_diffusion(target.policy):
        return int(target.policy.num_steps)  # type: ignore[attr-defined]
    return int(target.max_new_tokens)


def _block(target: TiltedTarget, block_size: int | None) -> int:
    horizon = _horizon(target)
    if block_size is None:
        return max(1, math.ceil(horizon / 4))
    block = validation.positive_int("block_size", block_size)
    if block > horizon:
        what = (
            f"num_steps={horizon} of the masked-diffusion policy"
            if is_masked_diffusion(target.policy)
            else f"max_new_tokens={horizon}"
        )
        raise ValueError(f"block_size must lie in [1, {what}], got {block}")
    return block


def _delta(after: Cost, before: Cost) -> Cost:
    return Cost(
        after.generated_tokens - before.generated_tokens,
        after.forward_tokens - before.forward_tokens,
        after.model_calls - before.model_calls,
        after.reward_calls - before.reward_calls,
    )


def _log_weights(log_a: Tensor, log_e: Tensor) -> Tensor:
    zero = torch.isneginf(log_a) | torch.isneginf(log_e)
    return torch.where(zero, torch.full_like(log_e, -math.inf), log_a + log_e)


def _untilted(target: TiltedTarget) -> TiltedTarget:
    """The target without its primary reward (only the extra terms remain)."""
    return TiltedTarget(
        target.policy,
        None,
        1.0,
        target.prompt,
        target.max_new_tokens,
        target.truncation,
        target.extra_terms,
    )


def _resolve_answer(
    cfg: ETSConfig, target: TiltedTarget
) -> Callable[[Seq], Hashable | None] | None:
    """The answer extractor of self-consistency mode (None in fixed mode)."""
    if cfg.reward_mode != "self-consistency":
        return None
    answer = cfg.answer
    if isinstance(answer, str):
        return _answer_presets(target.eos_id)[answer]
    if answer is None:
        extract = getattr(target.reward, "extract", None)
        if callable(extract):
            return extract  # type: ignore[no-any-return]
        raise ValueError(
            "reward_mode='self-consistency' needs answer=: a callable Seq -> answer (None for "
            f"an invalid answer) or one of {list(ANSWERS)}, unless the target's reward is a "
            "SelfConsistencyReward (its extract is used)"
        )
    return answer


class _Scorer:
    """Scores the complete sequences of a step (fixed reward or self-consistency)."""

    def __init__(self, cfg: ETSConfig, target: TiltedTarget) -> None:
        self.cfg = cfg
        self.target = target
        self.fixed = TiltScorer(target, cfg.reward_range)
        self.extras = _untilted(target) if target.extra_terms else None
        self.answer = _resolve_answer(cfg, target)
        self.zero_if_unique = cfg.sc_zero_if_unique or bool(
            getattr(target.reward, "require_repeat", False)
        )

    def __call__(
        self,
        seqs: list[Seq],
        log_reference: Tensor | None,
        owners: list[int],
        caches: list[AnswerCache] | None,
    ) -> tuple[Scores, list[AnswerCache] | None]:
        if self.cfg.reward_mode == "fixed":
            return self.fixed(seqs, log_reference), caches
        assert caches is not None and self.answer is not None
        caches = list(caches)
        answers = [self.answer(x) for x in seqs]
        reward = torch.zeros(len(seqs), dtype=torch.float64)
        by_owner: dict[int, list[int]] = {}
        for j, c in enumerate(owners):
            by_owner.setdefault(c, []).append(j)
        for c, idx in by_owner.items():
            new = [answers[j] for j in idx]
            best, top = caches[c].majority(new)
            zero = self.zero_if_unique and top <= 1
            for j in idx:
                if not zero and answers[j] is not None and answers[j] == best:
                    reward[j] = 1.0
            caches[c] = caches[c].added(new, [seqs[j] for j in idx])
        lam = self.target.lam
        log_tilt = reward / lam if math.isfinite(lam) else torch.zeros_like(reward)
        cost = Cost(reward_calls=len(seqs))
        if self.extras is not None and seqs:
            extra = self.extras.evaluate_tilt(seqs, log_reference=log_reference)
            log_tilt = torch.where(
                torch.isneginf(extra.log_tilt), extra.log_tilt, log_tilt + extra.log_tilt
            )
            cost = cost + extra.cost
        return Scores(log_tilt, reward, cost), caches


# ----------------------------------------------------------------------------- init / batches
def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    batch_size: int | None = None,
) -> ETSState:
    """No chain started yet (chains start batch by batch in ``step``)."""
    validation.generator("generator", generator)
    validation.positive_int("num_samples", num_samples)
    size = num_samples if batch_size is None else validation.positive_int("batch_size", batch_size)
    return ETSState(target, num_samples, min(size, num_samples), None, ())


def _start_batch(state: ETSState, cfg: ETSConfig) -> _Batch:
    target = state.target
    n = min(state.batch_size, state.remaining)
    session = proposal_session = states = None
    if is_masked_diffusion(target.policy):
        states = initial_states(target.policy, n)  # type: ignore[arg-type]
    else:
        session = open_session(target.policy, target.prompt, n)
        if cfg.proposal is not None and cfg.potential is None:
            proposal_session = open_session(cfg.proposal, target.prompt, n)
    sc = cfg.reward_mode == "self-consistency"
    return _Batch(
        n=n,
        live=list(range(n)),
        session=session,
        proposal_session=proposal_session,
        states=states,
        guidance_step=0,
        log_reference=torch.zeros(n, dtype=torch.float64),
        outputs=[None] * n,
        rewards=torch.full((n,), math.nan, dtype=torch.float64),
        failed=torch.zeros(n, dtype=torch.bool),
        failed_at=[None] * n,
        selections=[[] for _ in range(n)],
        caches=[AnswerCache.empty() for _ in range(n)] if sc else None,
        first_log_weights=None,
        cost=Cost(),
        counters={
            "candidate_tokens": 0,
            "rollout_tokens": 0,
            "rollouts": 0,
            "clipped": 0,
            "denoiser_passes": 0,
        },
    )


class _Scored(NamedTuple):
    log_e: Tensor
    reward_of: dict[int, float]
    caches: list[AnswerCache] | None
    cost: Cost


def _select_and_update(
    cfg: ETSConfig,
    batch: _Batch,
    cand_keys: list[Seq],
    cand_out: list[Seq | None],
    complete: Tensor,
    log_w: Tensor,
    cand_ref: Tensor,
    scored: _Scored,
    generator: torch.Generator,
) -> tuple[_Batch, Tensor, Tensor, list[int]]:
    """Draw one candidate per live chain; return the updated batch fields and which rows go on."""
    m = cfg.num_candidates
    n_live = len(batch.live)
    probs, failed_now = selection_probabilities(log_w)
    chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    outputs = list(batch.outputs)
    rewards = batch.rewards.clone()
    failed = batch.failed.clone()
    failed_at = list(batch.failed_at)
    log_ref = batch.log_reference.clone()
    selections = [list(s) for s in batch.selections]
    keep: list[int] = []
    flat = (torch.arange(n_live) * m + chosen).tolist()
    for r, chain in enumerate(batch.live):
        f = flat[r]
        if bool(failed_now[r]) and not bool(failed[chain]):
            failed[chain] = True
            failed_at[chain] = batch.guidance_step + 1
        if cfg.record_selections:
            selections[chain].append(
                Selection(tuple(cand_keys[r * m : (r + 1) * m]), probs[r].clone(), int(chosen[r]))
            )
        log_ref[chain] = cand_ref[f]
        if bool(complete[f]):
            outputs[chain] = cand_out[f]
            rewards[chain] = scored.reward_of.get(f, math.nan)
        else:
            keep.append(f)
    new = batch._replace(
        outputs=outputs,
        rewards=rewards,
        failed=failed,
        failed_at=failed_at,
        log_reference=log_ref,
        selections=selections,
        caches=scored.caches,
        guidance_step=batch.guidance_step + 1,
        first_log_weights=log_w if batch.guidance_step == 0 else batch.first_log_weights,
    )
    return new, probs, chosen, keep


def _score(
    cfg: ETSConfig,
    scorer: _Scorer,
    batch: _Batch,
    cand_seqs: list[Seq | None],
    cand_ref: Tensor,
    complete: Tensor,
    rollout_seqs: list[Seq],
    rollout_ref: Tensor | None,
    rollout_log_ratio: Tensor | None,
    rollout_rows: Tensor,
    potential_log_e: Tensor | None,
) -> _Scored:
    """Energies of all candidates: exact for complete ones, rollouts (or a potential) otherwise."""
    m = cfg.num_candidates
    total = len(cand_seqs)
    comp = complete.nonzero().flatten().tolist()
    seqs: list[Seq] = [x for x in (cand_seqs[j] for j in comp) if x is not None]
    seqs = seqs + rollout_seqs
    refs: Tensor | None = None
    if needs_reference(scorer.target):
        parts = [cand_ref[comp]]
        if rollout_ref is not None:
            parts.append(rollout_ref)
        refs = torch.cat(parts)
    k = cfg.num_rollouts
    owners = [batch.live[j // m] for j in comp] + [
        batch.live[int(j) // m] for j in rollout_rows.repeat_interleave(k).tolist()
    ][: len(rollout_seqs)]
    scores, caches = scorer(seqs, refs, owners, batch.caches)
    log_e = torch.full((total,), -math.inf, dtype=torch.float64)
    if comp:
        log_e[comp] = scores.log_tilt[: len(comp)]
    if potential_log_e is not None:
        log_e[rollout_rows] = potential_log_e
    elif rollout_seqs:
        assert rollout_log_ratio is not None
        log_e[rollout_rows] = log_mean_energy(rollout_log_ratio, scores.log_tilt[len(comp) :], k)
    reward_of: dict[int, float] = {}
    if scores.reward is not None:
        for pos, j in enumerate(comp):
            reward_of[j] = float(scores.reward[pos])
    return _Scored(log_e, reward_of, caches, scores.cost)


def _ar_step(
    cfg: ETSConfig, scorer: _Scorer, target: TiltedTarget, batch: _Batch, gen: torch.Generator
) -> tuple[_Batch, ETSInfo]:
    m, k = cfg.num_candidates, cfg.num_rollouts
    d = target.max_new_tokens
    block = _block(target, cfg.block_size)
    session = batch.session
    assert session is not None
    prop = batch.proposal_session
    s_before = session.cost
    p_before = Cost() if prop is None else prop.cost
    n_live = len(batch.live)
    t0 = session.length
    stop = min((batch.guidance_step + 1) * block, d)
    rep = torch.arange(n_live).repeat_interleave(m)
    session.select(rep)
    dec = decode_until_complete(
        session,
        gen,
        eos_id=target.eos_id,
        max_length=d,
        temperature=cfg.temperature,
        force_eos_at_cap=target.truncation == "condition",
        max_new=stop - t0,
    )
    cand_seqs = rows_to_seqs(session.tokens(), target.eos_id)
    log_a = torch.where(torch.isneginf(dec.log_p), dec.log_p, dec.log_p - dec.log_q)
    cand_ref = batch.log_reference[batch.live].repeat_interleave(m) + dec.log_p
    complete = torch.tensor([target.is_complete(x) for x in cand_seqs], dtype=torch.bool)
    if prop is not None:
        prop.select(rep)
        prop.extend(dec.tokens)
    inc = (~complete).nonzero().flatten()
    if len(inc) < len(complete):  # drop the complete candidates (scored exactly, no rollouts)
        session.select(inc)
        if prop is not None:
            prop.select(inc)
    extra = Cost()
    rollout_seqs: list[Seq] = []
    rollout_ref = rollout_ratio = potential_log_e = None
    clipped = rollout_tokens = 0
    if len(inc):
        if cfg.potential is not None:
            potential_log_e, pcost = cfg.potential.log_potential(
                target.prompt, [cand_seqs[j] for j in inc.tolist()], gen
            )
            potential_log_e = potential_log_e.to(torch.float64)
            extra = extra + pcost
        else:
            rb = rollouts_from_sessions(
                target,
                session,
                prop,
                k,
                gen,
                temperature=cfg.proposal_temperature,
                is_log_ratio_clip=cfg.is_log_ratio_clip,
            )
            rollout_seqs = rb.sequences
            rollout_ref = cand_ref[inc].repeat_interleave(k) + rb.log_reference
            rollout_ratio = rb.log_ratio
            clipped = rb.clipped
            rollout_tokens = rb.cost.generated_tokens
            extra = extra + rb.cost
    scored = _score(
        cfg,
        scorer,
        batch,
        list(cand_seqs),
        cand_ref,
        complete,
        rollout_seqs,
        rollout_ref,
        rollout_ratio,
        inc,
        potential_log_e,
    )
    log_w = _log_weights(log_a, scored.log_e).view(n_live, m)
    new, probs, chosen, keep = _select_and_update(
        cfg, batch, list(cand_seqs), list(cand_seqs), complete, log_w, cand_ref, scored, gen
    )
    pos = {int(j): p for p, j in enumerate(inc.tolist())}
    rows = torch.tensor([pos[f] for f in keep], dtype=torch.long)
    session.select(rows)
    if prop is not None:
        prop.select(rows)
    live = [batch.live[f // m] for f in keep]
    step_cost = (
        _delta(session.cost, s_before)
        + (Cost() if prop is None else _delta(prop.cost, p_before))
        + Cost(generated_tokens=dec.generated_tokens)
        + extra
        + scored.cost
    )
    counters = dict(batch.counters)
    counters["candidate_tokens"] += dec.generated_tokens
    counters["rollout_tokens"] += rollout_tokens
    counters["rollouts"] += len(rollout_seqs)
    counters["clipped"] += clipped
    new = new._replace(live=live, cost=batch.cost + step_cost, counters=counters)
    info = ETSInfo(
        step_cost, new.guidance_step, probs, log_w, chosen, complete.view(n_live, m), clipped
    )
    return new, info


def _dlm_step(
    cfg: ETSConfig, scorer: _Scorer, target: TiltedTarget, batch: _Batch, gen: torch.Generator
) -> tuple[_Batch, ETSInfo]:
    policy: Any = target.policy
    m, k = cfg.num_candidates, cfg.num_rollouts
    total_steps = int(policy.num_steps)
    block = _block(target, cfg.block_size)
    assert batch.states is not None
    n_live = len(batch.live)
    s0 = batch.guidance_step * block
    s1 = min(s0 + block, total_steps)
    cands = batch.states.repeat_interleave(m, dim=0)
    den = denoise(policy, target.prompt, cands, s0, s1, gen)
    cand_states = den.states
    finished = s1 == total_steps
    rows_total = n_live * m
    complete = torch.full((rows_total,), finished, dtype=torch.bool)
    cand_keys: list[Seq] = [tuple(r) for r in cand_states.tolist()]
    cand_out: list[Seq | None] = [None] * rows_total
    if finished:
        cand_out = list(states_to_seqs(cand_states, target.eos_id, int(policy.mask_id)))
        cand_keys = [x for x in cand_out if x is not None]
    cand_ref = (
        target.log_reference(cand_out)  # type: ignore[arg-type]
        if finished and needs_reference(target)
        else torch.zeros(rows_total, dtype=torch.float64)
    )
    extra = Cost()
    rollout_seqs: list[Seq] = []
    rollout_ref = rollout_ratio = potential_log_e = None
    clipped = rollout_tokens = passes = 0
    inc = torch.arange(rows_total) if not finished else torch.zeros(0, dtype=torch.long)
    if not finished:
        if cfg.potential is not None:
            potential_log_e, pcost = cfg.potential.log_potential_states(
                target.prompt, cand_states, s1, gen
            )
            potential_log_e = potential_log_e.to(torch.float64)
            extra = extra + pcost
        else:
            rb = diffusion_rollouts(
                target,
                cand_states,
                s1,
                k,
                gen,
                proposal=cfg.proposal,
                is_log_ratio_clip=cfg.is_log_ratio_clip,
            )
            rollout_seqs = rb.sequences
            rollout_ref = rb.log_reference
            rollout_ratio = rb.log_ratio
            clipped = rb.clipped
            rollout_tokens = rb.cost.generated_tokens
            passes = rb.row_passes
            extra = extra + rb.cost
    scored = _score(
        cfg,
        scorer,
        batch,
        cand_out,
        cand_ref,
        complete,
        rollout_seqs,
        rollout_ref,
        rollout_ratio,
        inc,
        potential_log_e,
    )
    log_a = torch.zeros(rows_total, dtype=torch.float64)
    log_w = _log_weights(log_a, scored.log_e).view(n_live, m)
    new, probs, chosen, keep = _select_and_update(
        cfg, batch, cand_keys, cand_out, complete, log_w, cand_ref, scored, gen
    )
    states = cand_states[torch.tensor(keep, dtype=torch.long)] if keep else cand_states[:0]
    live = [batch.live[f // m] for f in keep]
    step_cost = den.cost + extra + scored.cost
    counters = dict(batch.counters)
    counters["candidate_tokens"] += den.cost.generated_tokens
    counters["rollout_tokens"] += rollout_tokens
    counters["rollouts"] += len(rollout_seqs)
    counters["clipped"] += clipped
    counters["denoiser_passes"] += den.row_passes + passes
    new = new._replace(live=live, states=states, cost=batch.cost + step_cost, counters=counters)
    info = ETSInfo(
        step_cost, new.guidance_step, probs, log_w, chosen, complete.view(n_live, m), clipped
    )
    return new, info


def _finish(cfg: ETSConfig, scorer: _Scorer, target: TiltedTarget, batch: _Batch) -> SampleSet:
    """The batch's draws as a SampleSet."""
    n, m = batch.n, cfg.num_candidates
    outputs: list[Seq] = [x for x in batch.outputs if x is not None]
    if len(outputs) != n:
        raise RuntimeError("ETS batch finished with a chain that has no complete output")
    rewards: Tensor | None = batch.rewards
    log_ref: Tensor | None = batch.log_reference
    diffusion = is_masked_diffusion(target.policy)
    cost = batch.cost
    if cfg.output == "vote":
        assert batch.caches is not None
        voted = []
        for x, cache in zip(outputs, batch.caches, strict=True):
            best, _ = cache.majority()
            voted.append(cache.first[best] if best is not None else x)
        outputs = voted
        log_ref = None
    if diffusion or log_ref is None:
        log_ref = (
            target.log_reference(outputs)
            if callable(getattr(target.policy, "sequence_logprob", None))
            else None
        )
    if cfg.reward_mode == "fixed" and target.reward is None:
        rewards = None
    log_w = torch.where(batch.failed, -math.inf, 0.0).to(torch.float64)
    log_z = None
    if cfg.reward_mode == "fixed" and batch.first_log_weights is not None:
        lw = batch.first_log_weights
        log_z = float(torch.logsumexp(lw.flatten(), 0) - math.log(lw.numel()))
    num_steps = math.ceil(_horizon(target) / _block(target, cfg.block_size))
    meta: dict[str, Any] = {
        "num_proposals": n * m,
        "failed": int(batch.failed.sum()),
        "failed_at": batch.failed_at,
        "num_guidance_steps": num_steps,
        "guidance_steps": [len(s) for s in batch.selections] if cfg.record_selections else None,
        **batch.counters,
    }
    if cfg.record_selections:
        meta["selections"] = batch.selections
    if batch.caches is not None:
        meta["answer_caches"] = [c.as_dict() for c in batch.caches]
    final = None
    if cfg.record_selections and num_steps == 1 and cfg.output == "chain":
        final = [s[-1] for s in batch.selections]
    return SampleSet(outputs, log_w, cost, rewards, log_ref, log_z, meta, final)


# ----------------------------------------------------------------------------- kernel
def build_kernel(
    num_candidates: int = 3,
    num_rollouts: int | None = None,
    block_size: int | None = None,
    temperature: float = 1.0,
    proposal: Any = None,
    proposal_temperature: float | None = None,
    is_log_ratio_clip: float | None = None,
    potential: Any = None,
    reward_mode: str = "fixed",
    answer: Callable[[Seq], Hashable | None] | str | None = None,
    sc_zero_if_unique: bool = False,
    output: str = "chain",
    reward_range: tuple[float, float] | None = None,
    record_selections: bool = True,
    batching: str = "lockstep",
) -> Callable[[torch.Generator, ETSState], tuple[ETSState, ETSInfo]]:
    """One guidance step of every running chain (see :func:`sampler` for the parameters)."""
    return _kernel(
        make_config(
            num_candidates=num_candidates,
            num_rollouts=num_rollouts,
            block_size=block_size,
            temperature=temperature,
            proposal=proposal,
            proposal_temperature=proposal_temperature,
            is_log_ratio_clip=is_log_ratio_clip,
            potential=potential,
            reward_mode=reward_mode,
            answer=answer,
            sc_zero_if_unique=sc_zero_if_unique,
            output=output,
            reward_range=reward_range,
            record_selections=record_selections,
            batching=batching,
        )
    )


def _kernel(cfg: ETSConfig) -> Callable[[torch.Generator, ETSState], tuple[ETSState, ETSInfo]]:
    scorers: dict[int, _Scorer] = {}

    def step(generator: torch.Generator, state: ETSState) -> tuple[ETSState, ETSInfo]:
        target = state.target
        scorer = scorers.get(id(target))
        if scorer is None or scorer.target is not target:
            scorer = scorers[id(target)] = _Scorer(cfg, target)
        if cfg.batching == "continuous":
            return _continuous_step(cfg, scorer, generator, state)
        remaining = state.remaining
        batch = state.batch
        if batch is None:
            if remaining <= 0:
                raise ValueError("ETS step called on a finished state")
            batch = _start_batch(state, cfg)
            remaining -= batch.n
        if is_masked_diffusion(target.policy):
            batch, info = _dlm_step(cfg, scorer, target, batch, generator)
        else:
            batch, info = _ar_step(cfg, scorer, target, batch, generator)
        parts = state.parts
        if not batch.live:
            parts = (*parts, _finish(cfg, scorer, target, batch))
            next_batch = None
        else:
            next_batch = batch
        return state._replace(remaining=remaining, batch=next_batch, parts=parts), info

    return step


def _continuous_step(
    cfg: ETSConfig, scorer: _Scorer, generator: torch.Generator, state: ETSState
) -> tuple[ETSState, ETSInfo]:
    """Ticks of the continuous engine until some chain selects (one ``ETSInfo`` row each)."""
    from tiltsample.samplers.ets_continuous import ContinuousETS

    target = state.target
    engine = state.engine
    if engine is None:
        if state.remaining <= 0:
            raise ValueError("ETS step called on a finished state")
        rows = state.batch_size * cfg.num_candidates * cfg.num_rollouts
        engine = ContinuousETS(cfg, scorer, target, state.remaining, rows, generator)
    before = engine.cost()
    events = engine.advance()
    m = cfg.num_candidates
    probs = torch.stack([e[1] for e in events]) if events else torch.zeros((0, m))
    log_w = torch.stack([e[2] for e in events]) if events else torch.zeros((0, m))
    chosen = torch.tensor([e[3] for e in events], dtype=torch.long)
    complete = (
        torch.stack([e[4] for e in events]) if events else torch.zeros((0, m), dtype=torch.bool)
    )
    info = ETSInfo(
        _delta(engine.cost(), before),
        max((engine.chains[e[0]].step for e in events), default=0),
        probs,
        log_w,
        chosen,
        complete,
        0,
    )
    parts = state.parts
    if engine.done:
        parts = (*parts, engine.finish(lambda b: _finish(cfg, scorer, target, b), _Batch))
        engine = None
    return state._replace(remaining=0, parts=parts, engine=engine), info


def make_config(**params: Any) -> ETSConfig:
    """Validate the target-independent parameters (``ValueError``/``TypeError`` naming them)."""
    m = validation.positive_int("num_candidates", params["num_candidates"])
    potential = params["potential"]
    k_raw = params["num_rollouts"]
    if potential is not None:
        if k_raw is not None:
            raise ValueError("pass either potential= (oracle energies) or num_rollouts=, not both")
        if params["proposal"] is not None:
            raise ValueError("proposal= applies to rollouts; it cannot be combined with potential=")
        if not (
            callable(getattr(potential, "log_potential", None))
            or callable(getattr(potential, "log_potential_states", None))
        ):
            raise TypeError(
                "potential must implement PrefixPotential.log_potential (autoregressive) or "
                "StatePotential.log_potential_states (masked diffusion)"
            )
        k = 1
    else:
        k = 3 if k_raw is None else validation.positive_int("num_rollouts", k_raw)
    block = params["block_size"]
    if block is not None:
        validation.positive_int("block_size", block)
    tau = validation.positive_float("temperature", params["temperature"])
    ptau = params["proposal_temperature"]
    ptau = tau if ptau is None else validation.positive_float("proposal_temperature", ptau)
    clip = params["is_log_ratio_clip"]
    if clip is not None:
        clip = validation.positive_float("is_log_ratio_clip", clip)
    mode = validation.one_of("reward_mode", params["reward_mode"], REWARD_MODES)
    answer = params["answer"]
    if mode == "self-consistency" and potential is not None:
        raise ValueError("reward_mode='self-consistency' scores rollouts; potential= is fixed")
    if isinstance(answer, str):
        validation.one_of("answer", answer, ANSWERS)
    elif answer is not None and not callable(answer):
        raise TypeError(f"answer must be a callable or one of {list(ANSWERS)}, got {answer!r}")
    output = validation.one_of("output", params["output"], OUTPUTS)
    if output == "vote" and mode != "self-consistency":
        raise ValueError("output='vote' needs reward_mode='self-consistency' (an answer cache)")
    zero_unique = params["sc_zero_if_unique"]
    if not isinstance(zero_unique, bool):
        raise TypeError(f"sc_zero_if_unique must be a bool, got {zero_unique!r}")
    record = params["record_selections"]
    if not isinstance(record, bool):
        raise TypeError(f"record_selections must be a bool, got {record!r}")
    batching = validation.one_of("batching", params.get("batching", "lockstep"), BATCHINGS)
    if batching == "continuous" and (potential is not None or params["proposal"] is not None):
        raise ValueError(
            "batching='continuous' supports rollouts from p_ref only: it cannot be combined "
            "with proposal= (ETS-IS) or potential= (use batching='lockstep')"
        )
    return ETSConfig(
        num_candidates=m,
        num_rollouts=k,
        block_size=block,
        temperature=tau,
        proposal=params["proposal"],
        proposal_temperature=ptau,
        is_log_ratio_clip=clip,
        potential=potential,
        reward_mode=mode,
        answer=answer,
        sc_zero_if_unique=zero_unique,
        output=output,
        reward_range=check_reward_range(params["reward_range"]),
        record_selections=record,
        batching=batching,
    )


def _check_target(target: TiltedTarget, cfg: ETSConfig) -> None:
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    _block(target, cfg.block_size)
    check_proposal(target, cfg.proposal)
    _resolve_answer(cfg, target)
    if is_masked_diffusion(target.policy) and cfg.batching == "continuous":
        raise ValueError(
            "batching='continuous' is for autoregressive policies (a masked-diffusion ETS step "
            "is already one batch of denoiser passes)"
        )
    if is_masked_diffusion(target.policy):
        if target.truncation != "stop":
            raise ValueError(
                "ETS on a masked-diffusion policy supports truncation='stop' only (a response "
                "is complete when no position is masked); to require EOS, tilt the target by "
                "a ConstraintReward"
            )
        if cfg.temperature != 1.0 or cfg.proposal_temperature != 1.0:
            raise ValueError(
                "temperature/proposal_temperature apply to autoregressive policies; a "
                "masked-diffusion base sampler carries its own temperature"
            )
        if cfg.potential is not None and not callable(
            getattr(cfg.potential, "log_potential_states", None)
        ):
            raise TypeError(
                "on a masked-diffusion target, potential must implement "
                "StatePotential.log_potential_states(prompt, states, step, generator)"
            )
    elif cfg.potential is not None and not callable(getattr(cfg.potential, "log_potential", None)):
        raise TypeError("on an autoregressive target, potential must implement log_potential")


def done(state: ETSState) -> bool:
    """True when every chain has finished."""
    return state.remaining <= 0 and state.batch is None and state.engine is None


def result(state: ETSState) -> SampleSet:
    """All draws; per-draw lists in ``meta`` are concatenated and counters summed."""
    if not state.parts:
        raise ValueError("no chain has finished yet")
    out = iid.concat(state.parts)
    meta = dict(out.meta)
    for key in ("candidate_tokens", "rollout_tokens", "rollouts", "clipped", "denoiser_passes"):
        meta[key] = sum(int(p.meta.get(key, 0)) for p in state.parts)
    meta["failed"] = sum(int(p.meta.get("failed", 0)) for p in state.parts)
    for key in ("selections", "answer_caches", "guidance_steps", "failed_at"):
        if all(p.meta.get(key) is not None for p in state.parts):
            meta[key] = [v for p in state.parts for v in p.meta[key]]
    meta["clipped_fraction"] = meta["clipped"] / meta["rollouts"] if meta["rollouts"] else 0.0
    return SampleSet(
        out.sequences,
        out.log_weights,
        out.cost,
        out.rewards,
        out.log_reference,
        out.log_evidence,
        meta,
        out.selections,
    )


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_candidates: int = 3,
    num_rollouts: int | None = None,
    block_size: int | None = None,
    temperature: float = 1.0,
    proposal: ReferencePolicy | Any = None,
    proposal_temperature: float | None = None,
    is_log_ratio_clip: float | None = None,
    potential: Any = None,
    reward_mode: str = "fixed",
    answer: Callable[[Seq], Hashable | None] | str | None = None,
    sc_zero_if_unique: bool = False,
    output: str = "chain",
    reward_range: tuple[float, float] | None = None,
    record_selections: bool = True,
    batch_size: int | None = None,
    batching: str = "lockstep",
) -> SamplingAlgorithm:
    """ETS (see the module docstring): ``num_samples`` independent chains of Algorithm 1.

    Parameters
    ----------
    target
        An autoregressive or masked-diffusion tilted target.
    num_samples
        Independent ETS runs (draws).
    num_candidates
        ``M >= 1`` candidate blocks per guidance step (paper's reference default 3).
    num_rollouts
        ``K >= 1`` rollouts per incomplete candidate (default 3; not with ``potential``).
    block_size
        ``B``: tokens per guidance step (autoregressive) or denoising steps per guidance step
        (masked diffusion), in ``[1, d]`` (``[1, T]``); ``I = ceil(d / B)``. Default
        ``ceil(d / 4)`` (``I = 4``, the paper's recommendation). ``B = d`` is soft best-of-N.
    temperature
        Candidate law ``q = softmax(log p_ref / temperature)`` (autoregressive). The selection
        weights carry ``p_ref/q`` of the block, so the target stays ``pi``. To sample the tilt of
        a *tempered* base sampler as the paper does, make the target's policy the tempered one.
    proposal
        ETS-IS rollout policy (same vocabulary and EOS; masked diffusion: exact
        ``completion_logprob`` on both policies).
    proposal_temperature
        Temperature of the rollout law (default: ``temperature``); ratios use it exactly.
    is_log_ratio_clip
        Clip each rollout's IS log-ratio to ``±c`` (reference code: 10). Biased; off by default;
        ``meta["clipped_fraction"]`` reports it.
    potential
        Oracle energies instead of rollouts: a :class:`~tiltsample.reward.PrefixPotential`
        (autoregressive) or :class:`~tiltsample.diffusion.StatePotential`, e.g.
        :class:`tiltsample.theory.ExactPotential` (``specs/ets.md`` §9 (a)).
    reward_mode
        ``"fixed"`` or ``"self-consistency"`` (module docstring).
    answer
        Self-consistency answer extractor: a callable ``Seq -> hashable`` (None = invalid, no
        vote) or one of :data:`ANSWERS`. Validity rules are the task's, explicitly. Default: the
        ``extract`` of the target's reward when it is a
        :class:`~tiltsample.targets.rewards.SelfConsistencyReward` (its ``require_repeat`` then
        also switches on ``sc_zero_if_unique``; its own cache is not used: the sampler keeps one
        per chain).
    sc_zero_if_unique
        Self-consistency option of the LLaDA reference code: all rewards are 0 while the top
        answer occurs only once (``specs/ets.md`` §11, pitfall 7).
    output
        ``"chain"`` (Algorithm 1, default) or ``"vote"``: the first cached completion whose
        answer is the majority of the whole cache (LLaDA reference rule, pitfall 6).
    reward_range
        Declared ``(lo, hi)`` bounds of the reward (A1); a reward outside raises ``ValueError``.
    record_selections
        Keep every step's candidates and selection probabilities in ``meta["selections"]``.
    batch_size
        Chains run concurrently (default: all). With ``batching="continuous"`` it sets the row
        budget instead: at most ``batch_size · M · K`` rows per model call (the peak width of
        lock step), filled by as many chains as fit.
    batching
        ``"lockstep"`` (default): the chains of a batch run through the same phase together.
        ``"continuous"``: continuous batching, every row at its own phase, one generator stream
        per chain (same law per chain, different draws; autoregressive rollouts from ``p_ref``
        only) — :mod:`~tiltsample.samplers.ets_continuous`.
    """
    validation.positive_int("num_samples", num_samples)
    cfg = make_config(
        num_candidates=num_candidates,
        num_rollouts=num_rollouts,
        block_size=block_size,
        temperature=temperature,
        proposal=proposal,
        proposal_temperature=proposal_temperature,
        is_log_ratio_clip=is_log_ratio_clip,
        potential=potential,
        reward_mode=reward_mode,
        answer=answer,
        sc_zero_if_unique=sc_zero_if_unique,
        output=output,
        reward_range=reward_range,
        record_selections=record_selections,
        batching=batching,
    )
    _check_target(target, cfg)
    step = _kernel(cfg)
    size = num_samples if batch_size is None else validation.positive_int("batch_size", batch_size)
    steps = math.ceil(num_samples / size) * num_guidance_steps(target, block_size)
    params: dict[str, Any] = {
        "num_candidates": num_candidates,
        "num_rollouts": cfg.num_rollouts if potential is None else None,
        "block_size": _block(target, block_size),
        "num_guidance_steps": num_guidance_steps(target, block_size),
        "temperature": temperature,
        "proposal": None if proposal is None else repr(proposal),
        "proposal_temperature": cfg.proposal_temperature,
        "is_log_ratio_clip": is_log_ratio_clip,
        "potential": None if potential is None else type(potential).__name__,
        "reward_mode": reward_mode,
        "output": output,
        "batch_size": batch_size,
        "batching": cfg.batching,
    }
    return SamplingAlgorithm(
        name="ets",
        kind="iid",
        init=lambda g: init(target, generator=g, num_samples=num_samples, batch_size=batch_size),
        step=step,
        done=done,
        result=result,
        params=params,
        total_steps=steps if cfg.batching == "lockstep" else None,
    )
