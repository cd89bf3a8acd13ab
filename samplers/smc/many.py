r"""SMC batched across problems: :func:`sample_many`.

The SMC runs of several targets (one per problem; same policy, cap, truncation and EOS, different
prompts or rewards) run as one job: every target's particles are rows of one multi-prompt decode
session (:func:`~tiltsample.policy.open_session_multi`, rows grouped by target), so each model
call serves every problem. The state holds the targets and one generator per target
(:class:`~tiltsample.samplers.smc.state.SMCState` ``targets``/``generators``) and the step of
SMC alone (:func:`~tiltsample.samplers.smc.step.block_step`) treats each target's rows as a
section: per section, with the section's target and generator,

- the tokens are drawn (:class:`~tiltsample.row_generators.RowGenerators`: one multinomial over
  the section's rows, none when none of them is live),
- the tilt ``log G`` of completed particles, the twist ``log psi`` of incomplete ones and, for the
  optimal proposal ``q(v | s) ∝ p(v | s) psi(s + v)``, the children twists and the fully adapted
  increment ``log sum_v p(v | s) psi(s + v) - log psi(s)`` are computed,
- the runs whose ``ESS = (sum_i w_i)^2 / sum_i w_i^2`` fell below ``ess_threshold · N`` draw
  their ancestors,

all in the order of the run alone; a target whose particles have all finished computes and draws
nothing more (alone, its run would have stopped). So result ``i`` is the one
``tiltsample.sample(sampler, targets[i], num_samples, generator=generators[i], **params)``
returns, and ``generators[i]`` is left in the same state: bit-identical on an exact toy, the same
tokens (weights to float precision) on a real model, where a batched forward differs in the last
bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tiltsample.diffusion import is_masked_diffusion
from tiltsample.driver import mark_failed
from tiltsample.policy import RolloutSession, open_session_multi
from tiltsample.proposal import check_batchable
from tiltsample.results import SampleSet
from tiltsample.row_generators import RowGenerators
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.smc.algorithm import sampler as smc_sampler
from tiltsample.samplers.smc.config import SMCConfig, make_config
from tiltsample.samplers.smc.evidence import result
from tiltsample.samplers.smc.power_smc import sampler as power_sampler
from tiltsample.samplers.smc.power_smc import smc_params
from tiltsample.samplers.smc.state import SMCState, blank_state, done, sections
from tiltsample.samplers.smc.step import block_step
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

__all__ = ["SAMPLERS", "SUPPORTED", "sample_many"]

SAMPLERS = ("smc", "power-smc")
"""The samplers :func:`sample_many` batches."""

_COMMON = ("num_particles", "block_size", "ess_threshold", "resampling", "convention", "num_moves")
SUPPORTED: dict[str, tuple[str, ...]] = {
    "smc": (*_COMMON, "twist", "proposal", "temperature"),
    "power-smc": (*_COMMON, "alpha_ramp", "ramp_start"),
}
"""The parameters :func:`sample_many` accepts per sampler (``num_moves`` only as 0, ``twist``
only as ``"prefix"`` or ``"none"``); any other is refused."""


def check_params(sampler: str, params: dict[str, Any]) -> None:
    """Refuse a sampler or parameter :func:`sample_many` does not batch (``ValueError`` naming
    it): other samplers, resample-move, twists other than ``"prefix"``/``"none"`` (potentials,
    lookahead rollouts, learned twists), the moves' options."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS} for smc.sample_many, got {sampler!r}")
    for name in params:
        if name not in SUPPORTED[sampler]:
            raise ValueError(
                f"smc.sample_many does not support the parameter {name}= for {sampler!r} "
                f"(supported: {', '.join(SUPPORTED[sampler])}); run tiltsample.sample per target"
            )
    if params.get("num_moves", 0) != 0:
        raise ValueError(
            f"smc.sample_many does not support num_moves={params['num_moves']!r} "
            "(resample-move); only num_moves=0"
        )
    twist = params.get("twist", "prefix")
    if not (isinstance(twist, str) and twist in ("prefix", "none")):
        raise ValueError(
            f"smc.sample_many supports twist='prefix' or 'none' only, got twist={twist!r}"
        )


def check_targets(targets: Sequence[TiltedTarget], generators: Sequence[torch.Generator]) -> None:
    """Refuse targets that cannot share one session (policy, cap, truncation, EOS) and a wrong
    number of generators."""
    check_batchable(targets)
    first = targets[0]
    if is_masked_diffusion(first.policy):
        raise TypeError("smc.sample_many decodes autoregressively (no masked-diffusion policy)")
    if len(generators) != len(targets):
        raise ValueError(
            f"targets and generators must be of one length, got {len(targets)} targets and "
            f"{len(generators)} generators"
        )
    if not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError("generators must be torch.Generator objects")


def build_one(
    sampler: str, target: TiltedTarget, num_samples: int, params: dict[str, Any]
) -> tuple[SamplingAlgorithm, SMCConfig]:
    """The sampler alone on ``target`` (its validation and its ``params`` meta) and the
    :class:`~tiltsample.samplers.smc.config.SMCConfig` its step runs."""
    rest = {k: v for k, v in params.items() if k != "num_particles"}
    if sampler == "smc":
        alone = smc_sampler(target, num_samples=num_samples, **params)
        return alone, make_config(**rest)
    alone = power_sampler(target, num_samples=num_samples, **params)
    return alone, make_config(**smc_params(**rest))


def target_state(state: SMCState, s: int, steps: int, cost: Cost) -> SMCState:
    """Target ``s``'s runs of a batched state, as its run alone ends (``steps`` block steps,
    its own ``cost``); the session is the shared one (pass the rows' tokens to ``result``)."""
    assert state.targets is not None
    part = sections(state, None)[s]
    rows, runs = part.rows, part.runs
    return state._replace(
        target=part.target,
        num_groups=runs.stop - runs.start,
        finished=state.finished[rows],
        log_p=state.log_p[rows],
        tok_log_p=state.tok_log_p[rows],
        tok_log_q_move=state.tok_log_q_move[rows],
        log_psi=state.log_psi[rows],
        pending=None,
        pending_reward=None,
        log_next=None,
        reward=state.reward[rows],
        log_w=state.log_w[rows],
        log_z=state.log_z[runs],
        resample_count=state.resample_count[runs],
        ess_history=tuple(e[runs] for e in state.ess_history[:steps]),
        steps=steps,
        cost=cost,
        tok_entropy=None if state.tok_entropy is None else state.tok_entropy[rows],
        targets=None,
        generators=None,
    )


def sample_many(
    targets: Sequence[TiltedTarget],
    num_samples: int,
    generators: Sequence[torch.Generator],
    *,
    sampler: str = "smc",
    **params: Any,
) -> list[SampleSet]:
    """SMC (or Power-SMC) on several targets at once, as one batched job (module docstring).

    Parameters
    ----------
    targets
        The targets (one per problem), sharing policy, ``max_new_tokens``, truncation and EOS.
    num_samples
        Particles returned per target (``num_samples / num_particles`` runs per target).
    generators
        One per target: target ``i`` draws from ``generators[i]`` exactly what its run alone
        draws, and leaves it in the same state.
    sampler
        ``"smc"`` or ``"power-smc"``.
    **params
        The sampler's parameters among :data:`SUPPORTED` (``ValueError`` for any other, for
        ``num_moves > 0`` and for twists other than ``"prefix"``/``"none"``).

    Returns
    -------
    list of SampleSet
        Result ``i`` is ``tiltsample.sample(sampler, targets[i], num_samples,
        generator=generators[i], **params)`` (sequences, weights, ``log Ẑ`` and its meta); its
        ``cost`` counts its own generated tokens, twist and reward calls,
        ``meta["joint_cost"]`` the whole job's (model calls and forward tokens are shared).
    """
    check_params(sampler, params)
    targets, generators = list(targets), list(generators)
    check_targets(targets, generators)
    built = [build_one(sampler, t, num_samples, params) for t in targets]
    alone, config = built[0]
    n = int(alone.params["num_particles"])
    runs = num_samples // n
    sizes = [num_samples] * len(targets)
    session = open_session_multi(targets[0].policy, [t.prompt for t in targets], sizes)
    if isinstance(session, RolloutSession):
        raise ValueError(
            "smc.sample_many needs a token-level decode session; this policy's multi-prompt "
            "session is rollout-level (run tiltsample.sample per target)"
        )
    state = blank_state(targets[0], session, n, runs * len(targets))._replace(
        targets=tuple(targets), generators=RowGenerators.of_sizes(generators, sizes)
    )
    steps = torch.zeros(len(targets), dtype=torch.long)
    costs = [Cost()] * len(targets)
    while not done(state):
        steps += ~state.finished.view(len(targets), -1).all(dim=1)
        state, info = block_step(config, None, state)
        costs = [c + own for c, own in zip(costs, info.section_costs, strict=True)]
    tokens = state.session.tokens()
    out = []
    for s, (algo, _) in enumerate(built):
        mine = target_state(state, s, int(steps[s]), costs[s])
        res = result(mine, tokens[sections(state, None)[s].rows])
        mark_failed(res)
        res.meta.setdefault("sampler", algo.name)
        res.meta.setdefault("params", dict(algo.params))
        res.meta["joint_cost"] = state.cost
        out.append(res)
    return out
