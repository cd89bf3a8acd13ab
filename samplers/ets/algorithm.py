"""The ETS kernel (one guidance step of every running chain, in lock step or continuous batching)
and :func:`sampler`, the :class:`~tiltsample.sampler.SamplingAlgorithm` of the one-call API."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any

import torch

from tiltsample import validation
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.policy import ReferencePolicy
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.ets.autoregressive import autoregressive_step
from tiltsample.samplers.ets.config import (
    ETSConfig,
    check_target,
    make_config,
    num_guidance_steps,
    resolve_block_size,
)
from tiltsample.samplers.ets.continuous import continuous_step
from tiltsample.samplers.ets.masked_diffusion import masked_diffusion_step
from tiltsample.samplers.ets.scoring import Scorer
from tiltsample.samplers.ets.state import (
    ETSInfo,
    ETSState,
    done,
    finish_batch,
    init,
    result,
    start_batch,
)
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = ["build_kernel", "sampler"]


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
    scorers: dict[int, Scorer] = {}

    def step(generator: torch.Generator, state: ETSState) -> tuple[ETSState, ETSInfo]:
        target = state.target
        scorer = scorers.get(id(target))
        if scorer is None or scorer.target is not target:
            scorer = scorers[id(target)] = Scorer(cfg, target)
        if cfg.batching == "continuous":
            return continuous_step(cfg, scorer, generator, state)
        remaining = state.remaining
        batch = state.batch
        if batch is None:
            if remaining <= 0:
                raise ValueError("ETS step called on a finished state")
            batch = start_batch(state, cfg)
            remaining -= batch.n
        if is_masked_diffusion(target.policy):
            batch, info = masked_diffusion_step(cfg, scorer, target, batch, generator)
        else:
            batch, info = autoregressive_step(cfg, scorer, target, batch, generator)
        parts = state.parts
        if not batch.live:
            parts = (*parts, finish_batch(cfg, scorer, target, batch))
            next_batch = None
        else:
            next_batch = batch
        return state._replace(remaining=remaining, batch=next_batch, parts=parts), info

    return step


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
        only) — :mod:`~tiltsample.samplers.ets.continuous`.
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
    check_target(target, cfg)
    step = _kernel(cfg)
    size = num_samples if batch_size is None else validation.positive_int("batch_size", batch_size)
    steps = math.ceil(num_samples / size) * num_guidance_steps(target, block_size)
    params: dict[str, Any] = {
        "num_candidates": num_candidates,
        "num_rollouts": cfg.num_rollouts if potential is None else None,
        "block_size": resolve_block_size(target, block_size),
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
