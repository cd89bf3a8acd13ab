"""ETS parameters: the validated run configuration, the checks of a target against it, the
guidance horizon and block size, and the self-consistency answer extractors."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

from tiltsample import validation
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.samplers.ets.proposal import check_proposal
from tiltsample.samplers.ets.rollout import check_reward_range
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = [
    "ANSWERS",
    "BATCHINGS",
    "OUTPUTS",
    "REWARD_MODES",
    "ETSConfig",
    "check_target",
    "guidance_horizon",
    "make_config",
    "num_guidance_steps",
    "resolve_answer",
    "resolve_block_size",
]

REWARD_MODES: tuple[str, ...] = ("fixed", "self-consistency")
BATCHINGS: tuple[str, ...] = ("lockstep", "continuous")
"""``batching=``: chains in lock step (default) or continuous batching
(:mod:`~tiltsample.samplers.ets.continuous`)."""
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


def num_guidance_steps(target: TiltedTarget, block_size: int | None) -> int:
    """``I = ceil(d / B)`` (autoregressive) or ``ceil(T / B)`` (masked diffusion)."""
    horizon = guidance_horizon(target)
    return math.ceil(horizon / resolve_block_size(target, block_size))


def guidance_horizon(target: TiltedTarget) -> int:
    """The length guidance runs over: ``d = max_new_tokens`` (autoregressive) or the
    ``T = num_steps`` denoising steps of a masked-diffusion policy."""
    if is_masked_diffusion(target.policy):
        return int(target.policy.num_steps)  # type: ignore[attr-defined]
    return int(target.max_new_tokens)


def resolve_block_size(target: TiltedTarget, block_size: int | None) -> int:
    """The block size ``B`` of a run: ``ceil(horizon / 4)`` when ``block_size`` is None (the
    paper's ``I = 4``), else ``block_size`` checked to lie in ``[1, horizon]``
    (``ValueError`` otherwise)."""
    horizon = guidance_horizon(target)
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


def resolve_answer(cfg: ETSConfig, target: TiltedTarget) -> Callable[[Seq], Hashable | None] | None:
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


def check_target(target: TiltedTarget, cfg: ETSConfig) -> None:
    """Check that ``target`` accepts the run ``cfg`` (``TypeError``/``ValueError``)."""
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    resolve_block_size(target, cfg.block_size)
    check_proposal(target, cfg.proposal)
    resolve_answer(cfg, target)
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
