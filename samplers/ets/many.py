r"""ETS on several targets at once (one per problem): every chain, candidate and rollout of all
targets as rows of shared decode sessions, so each model call serves all problems.

Setting
    Targets ``pi_i(x) ∝ p_ref(x | y_i) exp(log_tilt_i(x))``, ``i = 1..P``, with one policy
    ``p_ref``, one cap ``d``, one truncation rule and one EOS; the prompts ``y_i`` and the tilts
    differ. Target ``i`` runs ``n = num_samples`` chains of Algorithm 1 (lock step, see
    :mod:`tiltsample.samplers.ets`) with its own generator ``g_i``.
Batching
    All ``P·n`` chains are one lock-step batch of
    :func:`~tiltsample.samplers.ets.autoregressive.autoregressive_step` over a multi-prompt
    session (:func:`~tiltsample.policy.open_session_multi`: target ``i``'s chains are rows after
    ``y_i``, each prompt encoded once). Since ``d`` and the block size ``B = ceil(d/4)`` (or the
    given one) are shared, every chain is at the same guidance step ``s`` and position
    ``t_s = min(sB, d)``; a chain whose output is complete leaves the session as it does alone.
Randomness
    A :class:`~tiltsample.row_generators.RowGenerators` over the chains gives every row its
    chain's target's generator: at every position, one multinomial per target over that target's
    candidate (or rollout) rows, only when one of them needs a draw; one multinomial per target
    over its live chains for the SIR selection ``P(m) = w_m / Σ_j w_j``. These are exactly the
    calls, shapes and laws of target ``i``'s run alone (the laws come from shared model calls:
    equal on exact toys, equal up to the float differences of a batched forward on a network),
    so result ``i`` is ``tiltsample.sample("ets", targets[i], n, generator=g_i, **params)`` and
    ``g_i`` ends in the same state.
Scoring
    A :class:`~tiltsample.samplers.ets.scoring.GroupScorer`: the complete candidates and rollouts
    of target ``i`` are scored by target ``i``'s tilt, in one call per step, in the order alone.
Cost
    Result ``i``'s ``cost`` holds its own generated tokens (candidates and rollouts) and scoring
    cost (reward calls): what its run alone reports for them. Model calls and forward tokens serve
    all targets at once: ``meta["joint_cost"]`` holds the whole job's :class:`Cost` (the same
    object in every result).
Scope
    Autoregressive token-level sessions (tabular toys, HF), fixed reward mode, rollouts from
    ``p_ref``: the parameters of :data:`SUPPORTED`; every other ETS parameter must keep its
    default (``ValueError`` naming it otherwise).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from tiltsample import validation
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.driver import mark_failed
from tiltsample.policy import RolloutSession, open_session_multi
from tiltsample.proposal import check_batchable
from tiltsample.results import SampleSet
from tiltsample.row_generators import RowGenerators
from tiltsample.samplers.ets.algorithm import sampler
from tiltsample.samplers.ets.autoregressive import autoregressive_step
from tiltsample.samplers.ets.config import ETSConfig, make_config
from tiltsample.samplers.ets.rollout import needs_reference
from tiltsample.samplers.ets.scoring import GroupScorer, Scorer
from tiltsample.samplers.ets.state import Batch, ETSState, finish_batch, result, start_batch
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

__all__ = ["SUPPORTED", "sample_many"]

SUPPORTED: tuple[str, ...] = (
    "num_candidates",
    "num_rollouts",
    "block_size",
    "temperature",
    "proposal_temperature",
    "reward_range",
    "record_selections",
)
"""The ETS parameters :func:`sample_many` accepts with any value; the others must keep their
defaults (``proposal``, ``potential``, ``reward_mode``, ``batching``, ``batch_size``, ...)."""


def sample_many(
    targets: Sequence[TiltedTarget],
    num_samples: int,
    generators: Sequence[torch.Generator],
    **params: Any,
) -> list[SampleSet]:
    """ETS on every target of ``targets`` as one batched job (module docstring).

    Parameters
    ----------
    targets
        Autoregressive tilted targets sharing the policy (the same object), ``max_new_tokens``,
        truncation and EOS; one per problem (prompts and tilts may differ).
    num_samples
        Chains (draws) per target.
    generators
        One ``torch.Generator`` per target: target ``i`` draws from ``generators[i]`` only.
    **params
        ETS parameters (:func:`tiltsample.samplers.ets.sampler`); those outside
        :data:`SUPPORTED` must keep their defaults.

    Returns
    -------
    list of SampleSet
        Result ``i`` equals ``tiltsample.sample("ets", targets[i], num_samples,
        generator=generators[i], **params)`` (sequences, log-weights, rewards, evidence,
        selections, generated tokens and reward calls; ``generators[i]`` left in the same
        state), with ``meta["joint_cost"]`` the cost of the whole job.
    """
    n = validation.positive_int("num_samples", num_samples)
    targets, generators = list(targets), list(generators)
    check_targets(targets, generators)
    cfg = many_config(params)
    meta_params = [dict(sampler(t, num_samples=n, **params).params) for t in targets]
    policy = targets[0].policy
    session = open_session_multi(policy, [t.prompt for t in targets], n)
    if isinstance(session, RolloutSession):
        raise ValueError(
            "ETS sample_many needs a token-level decode session; the policy's session is "
            "rollout-level (a serving engine): run tiltsample.sample per target instead"
        )
    total = n * len(targets)
    batch = start_batch(ETSState(targets[0], total, total, None, ()), cfg, session)
    group = torch.arange(len(targets)).repeat_interleave(n)
    rows = RowGenerators(generators, group)
    scorer = GroupScorer([Scorer(cfg, t) for t in targets], group.tolist())
    while batch.live:
        batch, _ = autoregressive_step(cfg, scorer, targets[0], batch, rows)
    out = []
    for i, target in enumerate(targets):
        chains = list(range(i * n, (i + 1) * n))
        res = target_result(cfg, scorer.scorers[i], target, batch, chains, scorer.costs[i])
        mark_failed(res)
        res.meta.update({"sampler": "ets", "params": meta_params[i], "joint_cost": batch.cost})
        out.append(res)
    return out


def check_targets(targets: list[TiltedTarget], generators: list[torch.Generator]) -> None:
    """Targets that can share one batched ETS job, one generator each (``ValueError``)."""
    if len(targets) != len(generators) or not targets:
        raise ValueError(
            f"targets and generators must be non-empty and of one length, got {len(targets)} "
            f"targets and {len(generators)} generators"
        )
    first = targets[0]
    for i, (t, g) in enumerate(zip(targets, generators, strict=True)):
        if not isinstance(t, TiltedTarget):
            raise TypeError(f"targets[{i}] must be a TiltedTarget, got {type(t).__name__}")
        validation.generator(f"generators[{i}]", g)
        if is_masked_diffusion(t.policy):
            raise ValueError(
                f"targets[{i}]: ETS sample_many supports autoregressive policies only, not "
                "masked diffusion (run tiltsample.sample per target)"
            )
        if needs_reference(t) != needs_reference(first):
            raise ValueError(
                f"targets[{i}] differs from targets[0] in whether a tilt term reads log p_ref "
                "(batched targets share it)"
            )
    check_batchable(targets)


def many_config(params: dict[str, Any]) -> ETSConfig:
    """The validated configuration of a batched job: ``ValueError`` naming any parameter outside
    :data:`SUPPORTED` that does not keep its default."""
    signature = inspect.signature(sampler).parameters
    defaults = {
        name: p.default
        for name, p in signature.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "num_samples"
    }
    for name, value in params.items():
        if name not in defaults:
            raise ValueError(f"ETS has no parameter {name!r}")
        default = defaults[name]
        if name not in SUPPORTED and value is not default and value != default:
            raise ValueError(
                f"ETS sample_many does not support {name}={value!r} (only its default "
                f"{default!r}); supported parameters: {', '.join(SUPPORTED)}"
            )
    config = {k: v for k, v in {**defaults, **params}.items() if k != "batch_size"}
    return make_config(**config)


def target_result(
    cfg: ETSConfig,
    scorer: Scorer,
    target: TiltedTarget,
    batch: Batch,
    chains: list[int],
    scoring_cost: Cost,
) -> SampleSet:
    """The finished ``chains`` of a batched job (one target's) as that target's result alone:
    its cost is its own generated tokens plus ``scoring_cost``; its counters are its chains'."""
    idx = torch.tensor(chains, dtype=torch.long)
    assert batch.chain_counts is not None
    counts = batch.chain_counts[idx]
    cand_tokens, roll_tokens, rollouts = (int(v) for v in counts.sum(0).tolist())
    counters = dict.fromkeys(batch.counters, 0)
    counters.update(candidate_tokens=cand_tokens, rollout_tokens=roll_tokens, rollouts=rollouts)
    first = batch.first_log_weights
    mine = batch._replace(
        n=len(chains),
        live=[],
        session=None,
        proposal_session=None,
        log_reference=batch.log_reference[idx],
        outputs=[batch.outputs[c] for c in chains],
        rewards=batch.rewards[idx],
        failed=batch.failed[idx],
        failed_at=[batch.failed_at[c] for c in chains],
        selections=[batch.selections[c] for c in chains],
        first_log_weights=None if first is None else first[idx],
        cost=Cost(generated_tokens=cand_tokens + roll_tokens) + scoring_cost,
        counters=counters,
        chain_counts=counts,
    )
    part = finish_batch(cfg, scorer, target, mine)
    return result(ETSState(target, 0, len(chains), None, (part,)))
