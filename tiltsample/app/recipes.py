"""The recipes of ``tiltsample compare`` (how each sampler enters at a budget) and its profiles.

Re-exported by :mod:`tiltsample.app.compare`; see its docstring for the table of recipes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tiltsample import validation

RESPONSE_TOKENS = 34
"""Typical response length of the default task (tokens), used to turn budgets into parameters."""
POWER_ALPHA = 4.0


@dataclass(frozen=True)
class Recipe:
    """How one sampler enters the comparison.

    ``configure(k)`` returns ``(num_samples, params)`` for budget ``k`` or None when the budget
    does not apply (e.g. ancestral beyond ``k = 1``); ``target`` is ``"verifier"``, ``"power"`` or
    ``"self-consistency"``.
    """

    label: str
    name: str
    configure: Callable[[int], tuple[int, dict[str, Any]] | None]
    target: str = "verifier"
    summary: str = ""


def _only_one(params: dict[str, Any]) -> Callable[[int], tuple[int, dict[str, Any]] | None]:
    return lambda k: (1, dict(params)) if k == 1 else None


def _ets(k: int) -> tuple[int, dict[str, Any]] | None:
    # measured on the task with K = 1, I = 4: one candidate costs about two responses of tokens
    if k < 4:
        return None
    return 1, {"num_candidates": k // 2, "num_rollouts": 1}


def _mh_steps(k: int) -> tuple[int, dict[str, Any]] | None:
    # continuous batching: each chain draws from its own stream seeded by the cell's generator,
    # so compare can run the cells of many problems as one batched job with the records of
    # cells run alone (tiltsample.samplers.mh.sample_many with generators=)
    if k < 2:
        return None
    return 1, {"num_steps": 2 * (k - 1), "batching": "continuous"}


def _mh_steps_rollout(k: int) -> tuple[int, dict[str, Any]] | None:
    conf = _mh_steps(k)
    if conf is None:
        return None
    n, params = conf
    return n, {key: v for key, v in params.items() if key != "batching"}


def for_rollout_engine(recipe: Recipe) -> Recipe:
    """``recipe`` as it runs on a rollout-only engine (vLLM): the MH recipes with the default
    batching (continuous batching needs ragged token-level sessions); others unchanged."""
    if recipe.configure is _mh_steps:
        return replace(recipe, configure=_mh_steps_rollout)
    return recipe


RECIPES: tuple[Recipe, ...] = (
    Recipe("ancestral", "ancestral", _only_one({}), summary="one draw, temperature 1"),
    Recipe(
        "low-temperature",
        "ancestral",
        _only_one({"temperature": 1.0 / POWER_ALPHA}),
        summary="one draw, temperature 0.25",
    ),
    Recipe(
        "majority",
        "best-of-n",
        lambda k: (1, {"num_candidates": k, "selection": "argmax"}),
        target="self-consistency",
        summary="majority vote over k draws",
    ),
    Recipe(
        "best-of-n",
        "best-of-n",
        lambda k: (1, {"num_candidates": k, "selection": "argmax"}),
        summary="verifier argmax over k draws",
    ),
    Recipe("beam", "beam", lambda k: (1, {"num_beams": k}), summary="k beams"),
    Recipe("ets", "ets", _ets, summary="M=k/2 candidates, K=1, I=4"),
    Recipe(
        "smc",
        "smc",
        lambda k: (k, {"num_particles": k}) if k >= 2 else None,
        summary="k particles",
    ),
    Recipe(
        "power-smc",
        "power-smc",
        lambda k: (k, {"num_particles": k}) if k >= 2 else None,
        target="power",
        summary="p^4, k particles",
    ),
    Recipe("power", "power", _mh_steps, target="power", summary="p^4, 2(k-1) MH steps"),
    Recipe("entropy-cut", "entropy-cut", _mh_steps, target="power", summary="p^4, 2(k-1) MH steps"),
    Recipe("qalign", "qalign", _mh_steps, summary="verifier target, 2(k-1) MH steps"),
)


TOKEN_LEVEL = frozenset({"beam", "entropy-cut"})
"""Samplers of the recipes that read full next-token laws (``logprobs()`` ``[B, V]``: beam
scores every token, entropy-cut MH reads per-token entropies): on an engine that returns only
rollouts and scores (a vLLM engine with ``max_logprobs < V``) they raise
:class:`~tiltsample.capabilities.TokenLevelAccessError`, so ``compare`` leaves them out there.
The vLLM tests check this set against the samplers' behaviour."""


DLM_STEPS = 48
"""Denoising steps of the shipped ``arith-dlm`` sampler (one committed token per step)."""


def _dlm_ets(k: int) -> tuple[int, dict[str, Any]] | None:
    # K = 1, I = 4 blocks of 12 steps: a candidate costs its 48 tokens plus rollouts of 36, 24, 12
    # (2.5 responses), so M = round(2k / 5) candidates match k responses of tokens
    if k < 4:
        return None
    return 1, {"num_candidates": max(2, round(2 * k / 5)), "num_rollouts": 1}


def _dlm_fk(k: int) -> tuple[int, dict[str, Any]] | None:
    # one-shot fills every 12 steps: a particle costs 48 + 36 + 24 + 12 tokens (2.5 responses)
    n = max(2, round(2 * k / 5))
    return (n, {"num_particles": n, "resample_every": 12, "num_samples_phi": 1}) if k > 3 else None


DLM_RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "dlm-base",
        "ets",
        lambda k: (1, {"num_candidates": 1, "block_size": DLM_STEPS}) if k == 1 else None,
        target="dlm-verifier",
        summary="arith-dlm base sampler (ETS with M = 1, I = 1 is the base sampler itself)",
    ),
    Recipe(
        "dlm-best-of-n",
        "ets",
        lambda k: (1, {"num_candidates": k, "block_size": DLM_STEPS}) if k >= 2 else None,
        target="dlm-verifier",
        summary="arith-dlm, soft best-of-N (ETS with I = 1: SIR over k complete responses)",
    ),
    Recipe(
        "dlm-ets",
        "ets",
        _dlm_ets,
        target="dlm-verifier",
        summary="arith-dlm, ETS for masked diffusion: M=round(2k/5), K=1, I=4",
    ),
    Recipe(
        "dlm-fk-steering",
        "fk-steering",
        _dlm_fk,
        target="dlm-verifier",
        summary="arith-dlm, FK steering: N=round(2k/5) particles, one-shot fills every 12 steps",
    ),
)
"""Optional recipes on the shipped masked-diffusion model ``arith-dlm`` (run them by label, e.g.
``--samplers dlm-base,dlm-best-of-n,dlm-ets``; they are not in the default set). Budgets count
generated tokens the same way: a response is the 48 committed positions."""

ALL_RECIPES: tuple[Recipe, ...] = RECIPES + DLM_RECIPES


@dataclass(frozen=True)
class Profile:
    """Sizes of a comparison run."""

    num_problems: int
    budgets: tuple[int, ...]
    repeats: int = 1


PROFILES: dict[str, Profile] = {
    "test": Profile(num_problems=2, budgets=(1, 2)),
    "demo": Profile(num_problems=20, budgets=(1, 4, 8)),
    "full": Profile(num_problems=200, budgets=(1, 2, 4, 8, 16)),
}


def available_recipes(
    only: Sequence[str] | None = None,
) -> tuple[list[Recipe], dict[str, str]]:
    """The recipes whose sampler is registered now, and the reasons others are left out.

    Without ``only``: the default set :data:`RECIPES`; ``only`` may also name the optional
    masked-diffusion recipes :data:`DLM_RECIPES`.
    """
    from tiltsample import registry

    names = {e.name for e in registry.samplers()}
    labels = [r.label for r in ALL_RECIPES]
    if only is not None:
        for label in only:
            validation.one_of("sampler", label, labels)
    chosen, skipped = [], {}
    for r in RECIPES if only is None else ALL_RECIPES:
        if only is not None and r.label not in only:
            continue
        if r.name in names:
            chosen.append(r)
        else:
            skipped[r.label] = f"sampler {r.name!r} is not registered"
    return chosen, skipped
