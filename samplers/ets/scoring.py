"""Scoring of the complete responses of a step in the two reward modes: the target's fixed tilt,
or self-consistency, a majority vote over a per-chain answer cache (``specs/ets.md`` §7)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample.samplers.ets.config import ETSConfig, resolve_answer
from tiltsample.samplers.ets.rollout import Scores, TiltScorer
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["AnswerCache", "GroupScorer", "Scorer"]


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


class Scorer:
    """Scores the complete sequences of a step (fixed reward or self-consistency)."""

    def __init__(self, cfg: ETSConfig, target: TiltedTarget) -> None:
        self.cfg = cfg
        self.target = target
        self.fixed = TiltScorer(target, cfg.reward_range)
        self.extras = _untilted(target) if target.extra_terms else None
        self.answer = resolve_answer(cfg, target)
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


class GroupScorer:
    """Scores the complete sequences of chains of several targets (independent runs batched in
    one session): the sequences owned by the chains of group ``g`` go, in their order, to
    ``scorers[g]`` — one call per group, as the run of target ``g`` makes alone.

    Parameters
    ----------
    scorers
        One :class:`Scorer` per group (target); they must agree on whether a tilt term reads
        ``log p_ref`` (the caller checks it): ``target`` is the first scorer's.
    group
        The group of every chain (indexed by the batch-local chain index that callers pass as
        ``owners``).

    Attributes
    ----------
    costs
        The scoring cost of every group so far (reward calls), summed over the calls.
    """

    def __init__(self, scorers: Sequence[Scorer], group: Sequence[int]) -> None:
        self.scorers = list(scorers)
        self.group = [int(g) for g in group]
        self.target = self.scorers[0].target
        self.costs = [Cost() for _ in self.scorers]

    def __call__(
        self,
        seqs: list[Seq],
        log_reference: Tensor | None,
        owners: list[int],
        caches: list[AnswerCache] | None,
    ) -> tuple[Scores, list[AnswerCache] | None]:
        by_group: dict[int, list[int]] = {}
        for j, c in enumerate(owners):
            by_group.setdefault(self.group[c], []).append(j)
        log_tilt = torch.zeros(len(seqs), dtype=torch.float64)
        reward = torch.full((len(seqs),), math.nan, dtype=torch.float64)
        has_reward = False
        total = Cost()
        for g, idx in sorted(by_group.items()):
            refs = None if log_reference is None else log_reference[idx]
            scores, caches = self.scorers[g](
                [seqs[j] for j in idx], refs, [owners[j] for j in idx], caches
            )
            log_tilt[idx] = scores.log_tilt.to(torch.float64)
            if scores.reward is not None:
                reward[idx] = scores.reward.to(torch.float64)
                has_reward = True
            self.costs[g] = self.costs[g] + scores.cost
            total = total + scores.cost
        return Scores(log_tilt, reward if has_reward else None, total), caches
