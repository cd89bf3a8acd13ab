r"""Conditional SMC, particle Gibbs and the two-sided bounds on ``log Z`` (``specs/smc.md`` §9).

Conditional SMC (CSMC, ``csmc``)
    The SMC of :mod:`tiltsample.samplers.smc` with a *reference path* ``x*``: particle 0 of each
    run takes the tokens of ``x*`` instead of sampling them, and its weight is computed by the usual
    formula; at each resampling particles ``1..N-1`` draw their ancestors from all ``N`` particles
    while particle 0 keeps its own lineage: ``resampling=`` names the conditional version of an
    SMC scheme (:data:`tiltsample.resampling.CONDITIONAL_SCHEMES`: ``multinomial``, the default,
    and ``systematic``, ``stratified``, ``residual``, each the law of the symmetrised
    unconditional scheme given that slot 0 keeps ancestor 0; Chopin & Singh 2015).
    ``log Ẑ_CSMC`` uses the same formula as ``log Ẑ``. Resampling times follow the same (symmetric)
    ESS rule as SMC; ``ess_threshold=1`` fixes them to every block.
Particle Gibbs (``particle-gibbs``, a Markov sampler)
    Iterate: run CSMC with the current state as the reference; draw the new state among the final
    particles with probability proportional to their weights (every row already holds its whole
    path, so no ancestry is traced back). The kernel leaves ``pi`` invariant and is uniformly
    ergodic (Andrieu, Doucet & Holenstein 2010); it mixes better with more particles and degrades
    when ``N`` is much smaller than the number of steps (Andrieu, Lee & Vihola 2018). Random twists
    are auxiliary variables: they are redrawn along the reference path at every sweep, a valid
    Gibbs update of the extended state. All chains run in one batched session.
Bounds on ``log Z`` (Zhao et al. 2024; bidirectional Monte Carlo, Grosse et al. 2015)
    ``E_SMC[log Ẑ] <= log Z <= E_{x* ~ pi}[log Ẑ_CSMC(x*)]``; both gaps are KL divergences on the
    extended space and shrink as ``N`` grows; at ``N = 1`` they are ``-KL(q‖pi)`` and ``+KL(pi‖q)``
    for the proposal's path law ``q``. :func:`log_z_lower` and :func:`log_z_upper` estimate the two
    sides (the upper one needs exact draws of ``pi``: free on enumerable toys).
Cost
    As SMC, per sweep; the reference particle's tokens are not generated but still pushed through
    the model (its forward tokens count, its ``generated_tokens`` do not).

References
----------
Andrieu, Doucet & Holenstein (2010), *Particle Markov chain Monte Carlo methods*, JRSS B;
Andrieu, Lee & Vihola (2018), Bernoulli; Zhao, Brekelmans, Makhzani & Grosse, arXiv 2404.17546;
Grosse, Ghahramani & Adams (2015), arXiv 1511.02543; Dang et al., arXiv 2507.08390.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import rows_to_seqs
from tiltsample.enumeration import enumerate_target
from tiltsample.proposal import propose
from tiltsample.resampling import CONDITIONAL_SCHEMES
from tiltsample.results import SampleSet
from tiltsample.reward import PrefixPotential
from tiltsample.sampler import ChainRecord, SamplingAlgorithm
from tiltsample.samplers import smc
from tiltsample.samplers.twists import Twist
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "EvidenceEstimate",
    "PGInfo",
    "PGState",
    "build_kernel",
    "done",
    "exact_references",
    "init",
    "log_z_lower",
    "log_z_upper",
    "particle_gibbs_sampler",
    "record",
    "result",
    "sampler",
]

INITS = ("proposal", "smc")


def _check_conditional(params: dict[str, Any]) -> dict[str, Any]:
    params = dict(params)
    params.setdefault("resampling", "multinomial")
    validation.one_of("resampling", params["resampling"], CONDITIONAL_SCHEMES)
    if params.get("num_moves", 0):
        raise ValueError("num_moves must be 0 for conditional SMC (no resample-move)")
    return params


def exact_references(
    target: TiltedTarget, n: int, generator: torch.Generator, max_support: int = 200_000
) -> list[Seq]:
    """``n`` exact i.i.d. draws of ``pi`` by enumeration (enumerable toys only)."""
    validation.positive_int("n", n)
    enum = enumerate_target(target, max_support=max_support)
    log_density = enum.log_density
    if not bool(torch.isfinite(log_density).any()):
        raise ValueError("the target has zero total mass: no exact reference can be drawn")
    probs = torch.softmax(log_density, dim=0)
    idx = torch.multinomial(probs, n, replacement=True, generator=generator)
    return [enum.support[i] for i in idx.tolist()]


def _resolve_references(
    target: TiltedTarget,
    reference: str | Seq | Sequence[Seq],
    groups: int,
    generator: torch.Generator,
) -> list[Seq]:
    if isinstance(reference, str):
        validation.one_of("reference", reference, ("exact",))
        return exact_references(target, groups, generator)
    items: list[Any] = list(reference)
    if items and all(isinstance(t, int) for t in items):
        items = [tuple(items)] * groups  # one path given: the same reference for every run
    if len(items) != groups:
        raise ValueError(f"reference must give one path per run ({groups}), got {len(items)}")
    return [tuple(int(t) for t in x) for x in items]


# --------------------------------------------------------------------------- CSMC sampler
def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_particles: int,
    reference: str | Seq | Sequence[Seq] = "exact",
    num_groups: int = 1,
) -> smc.SMCState:
    """CSMC particles with particle 0 of each run pinned to its reference path.

    ``reference="exact"`` draws each run's reference exactly from ``pi`` (enumerable toys).
    """
    refs = _resolve_references(target, reference, num_groups, generator)
    return smc.init(
        target,
        generator=generator,
        num_particles=num_particles,
        num_groups=num_groups,
        reference=refs,
    )


def build_kernel(**params: Any) -> Any:
    """One block step of CSMC (parameters of :func:`tiltsample.samplers.smc.sampler`)."""
    return smc.build_kernel(**_check_conditional(params))


done = smc.done
result = smc.result


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_particles: int | None = None,
    reference: str | Seq | Sequence[Seq] = "exact",
    twist: str | Twist = "prefix",
    potential: PrefixPotential | None = None,
    proposal: str = "reference",
    temperature: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "multinomial",
    convention: str = "reset",
) -> SamplingAlgorithm:
    """Conditional SMC: ``num_samples / num_particles`` runs, each conditioned on a reference.

    ``reference``: ``"exact"`` (default: exact draws of ``pi``, enumerable toys only), one complete
    response (used by every run), or one per run. Other parameters as in
    :func:`tiltsample.samplers.smc.sampler`. ``log_evidence`` is ``log Ẑ_CSMC`` (pooled over runs
    as a log-mean); its expectation over exact references upper-bounds ``log Z``.
    """
    validation.positive_int("num_samples", num_samples)
    n = (
        num_samples
        if num_particles is None
        else validation.positive_int("num_particles", num_particles)
    )
    if num_samples % n:
        raise ValueError(f"num_particles={n} must divide num_samples={num_samples}")
    groups = num_samples // n
    params: dict[str, Any] = _check_conditional(
        {
            "twist": twist,
            "potential": potential,
            "proposal": proposal,
            "temperature": temperature,
            "block_size": block_size,
            "ess_threshold": ess_threshold,
            "resampling": resampling,
            "convention": convention,
        }
    )
    step = smc.build_kernel(**params)
    if isinstance(reference, str):  # validate eagerly
        validation.one_of("reference", reference, ("exact",))
    else:
        refs = _resolve_references(target, reference, groups, torch.Generator())
        target.check_sequences(refs, name="reference")
    return SamplingAlgorithm(
        name="csmc",
        kind="iid",
        init=lambda g: init(
            target, generator=g, num_particles=n, reference=reference, num_groups=groups
        ),
        step=step,
        done=done,
        result=result,
        params={"num_particles": n, "reference": reference, **params},
        total_steps=math.ceil(target.max_new_tokens / block_size),
    )


# --------------------------------------------------------------------------- particle Gibbs
class PGState(NamedTuple):
    """The current state of every chain."""

    target: TiltedTarget
    sequences: list[Seq]
    log_reference: Tensor
    log_tilt: Tensor
    reward: Tensor
    log_evidence: Tensor
    """``[C]`` ``log Ẑ_CSMC`` of the last sweep (NaN before the first)."""
    changed: Tensor
    """``[C]`` bool: the last sweep moved the chain to a different sequence."""
    steps_done: int
    num_steps: int
    cost: Cost


class PGInfo(NamedTuple):
    cost: Cost
    changed: Tensor
    log_evidence: Tensor


def _pg_state(
    target: TiltedTarget,
    seqs: list[Seq],
    log_ref: Tensor,
    log_tilt: Tensor,
    reward: Tensor,
    num_steps: int,
    cost: Cost,
) -> PGState:
    c = len(seqs)
    return PGState(
        target,
        seqs,
        log_ref,
        log_tilt,
        reward,
        torch.full((c,), math.nan, dtype=torch.float64),
        torch.ones(c, dtype=torch.bool),
        0,
        num_steps,
        cost,
    )


def particle_gibbs_init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    num_steps: int = 50,
    num_particles: int = 8,
    initial: str | Sequence[Seq] = "proposal",
    smc_params: dict[str, Any] | None = None,
) -> PGState:
    """Initial chain states.

    ``initial="proposal"``: one draw of ``p_ref`` (overdispersed; may lie outside the support,
    which the first sweeps leave); ``"smc"``: one particle ∝ weight from an unconditional SMC run
    per chain; or explicit complete responses, one per chain.
    """
    c = validation.positive_int("num_samples", num_samples)
    validation.positive_int("num_steps", num_steps)
    params = dict(smc_params or {})
    if isinstance(initial, str):
        validation.one_of("initial", initial, INITS)
        if initial == "proposal":
            props = propose(target, generator, c, float(params.get("temperature", 1.0)))
            reward = (
                props.reward
                if props.reward is not None
                else torch.full((c,), math.nan, dtype=torch.float64)
            )
            return _pg_state(
                target,
                props.sequences,
                props.log_reference,
                props.log_tilt,
                reward,
                num_steps,
                props.cost,
            )
        params.pop("resampling", None)
        state = smc.run(
            target, num_particles=num_particles, generator=generator, num_runs=c, **params
        )
        picked = _pick(state, generator)
        return _state_from_rows(target, state, picked, num_steps, state.cost)
    seqs = target.check_sequences(list(initial), name="initial")
    if len(seqs) != c:
        raise ValueError(f"initial must hold one response per chain ({c}), got {len(seqs)}")
    log_ref = target.log_reference(seqs)
    scores = target.evaluate_tilt(seqs, log_reference=log_ref)
    reward = (
        scores.reward
        if scores.reward is not None
        else torch.full((c,), math.nan, dtype=torch.float64)
    )
    return _pg_state(target, seqs, log_ref, scores.log_tilt, reward, num_steps, scores.cost)


def _pick(state: smc.SMCState, generator: torch.Generator) -> Tensor:
    """One row per run, drawn ∝ the final weights (the reference row if every weight is 0)."""
    n, groups = state.num_particles, state.num_groups
    picked = torch.empty(groups, dtype=torch.long)
    for g in range(groups):
        lw = state.log_w[g * n : (g + 1) * n]
        if not bool(torch.isfinite(lw).any()):
            picked[g] = g * n
            continue
        k = torch.multinomial(torch.exp(lw - torch.logsumexp(lw, 0)), 1, generator=generator)
        picked[g] = g * n + int(k)
    return picked


def _state_from_rows(
    target: TiltedTarget, state: smc.SMCState, picked: Tensor, num_steps: int, cost: Cost
) -> PGState:
    seqs_all = rows_to_seqs(state.session.tokens()[picked], target.eos_id)
    return _pg_state(
        target,
        seqs_all,
        state.log_p[picked],
        state.log_psi[picked],
        state.reward[picked],
        num_steps,
        cost,
    )


def particle_gibbs_kernel(num_particles: int = 8, **smc_params: Any) -> Any:
    """One particle-Gibbs sweep (a full CSMC run per chain, then a draw ∝ final weights)."""
    n = validation.positive_int("num_particles", num_particles)
    step = smc.build_kernel(**_check_conditional(smc_params))

    def pg_step(generator: torch.Generator, state: PGState) -> tuple[PGState, PGInfo]:
        c = len(state.sequences)
        inner = smc.init(
            state.target,
            generator=generator,
            num_particles=n,
            num_groups=c,
            reference=state.sequences,
        )
        while not smc.done(inner):
            inner, _ = step(generator, inner)
        picked = _pick(inner, generator)
        new = _state_from_rows(state.target, inner, picked, state.num_steps, inner.cost)
        changed = torch.tensor(
            [a != b for a, b in zip(new.sequences, state.sequences, strict=True)],
            dtype=torch.bool,
        )
        log_z = smc.log_evidence_runs(inner)
        out = new._replace(
            log_evidence=log_z,
            changed=changed,
            steps_done=state.steps_done + 1,
            cost=state.cost + inner.cost,
        )
        return out, PGInfo(inner.cost, changed, log_z)

    return pg_step


def pg_done(state: PGState) -> bool:
    """True after ``num_steps`` sweeps."""
    return state.steps_done >= state.num_steps


def record(state: PGState) -> ChainRecord:
    """Current states with ``log_density``, ``reward``, ``changed`` and ``log_evidence``."""
    log_density = torch.where(
        torch.isneginf(state.log_tilt), state.log_tilt, state.log_reference + state.log_tilt
    )
    stats = {
        "log_density": log_density,
        "reward": state.reward,
        "changed": state.changed.to(torch.float64),
        "log_evidence": state.log_evidence,
    }
    if bool(torch.isnan(state.reward).all()):
        del stats["reward"]
    return ChainRecord(list(state.sequences), stats)


def pg_result(state: PGState) -> SampleSet:
    """The final state of every chain (equally weighted); a chain still in a state of zero
    target density (it never found the support) is a failed draw (log-weight ``-inf``)."""
    reward = None if state.target.reward is None else state.reward
    failed = torch.isneginf(state.log_tilt) | torch.isneginf(state.log_reference)
    return SampleSet(
        list(state.sequences),
        torch.where(failed, -math.inf, 0.0).to(torch.float64),
        state.cost,
        reward,
        state.log_reference,
        None,
        {"num_steps": state.steps_done},
    )


def particle_gibbs_sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_steps: int = 50,
    num_particles: int = 8,
    initial: str | Sequence[Seq] = "proposal",
    twist: str | Twist = "prefix",
    potential: PrefixPotential | None = None,
    proposal: str = "reference",
    temperature: float = 1.0,
    block_size: int = 1,
    ess_threshold: float = 0.5,
    resampling: str = "multinomial",
) -> SamplingAlgorithm:
    """Particle Gibbs: ``num_samples`` chains of ``num_steps`` CSMC sweeps with ``num_particles``.

    ``sample("particle-gibbs", ...)`` returns the final states; ``run_chains`` keeps every sweep
    (statistics ``log_density``, ``reward``, ``changed``, ``log_evidence``). Other parameters as in
    :func:`tiltsample.samplers.smc.sampler`.
    """
    num_steps = validation.positive_int("num_steps", num_steps)
    validation.positive_int("num_samples", num_samples)
    smc_params: dict[str, Any] = {
        "twist": twist,
        "potential": potential,
        "proposal": proposal,
        "temperature": temperature,
        "block_size": block_size,
        "ess_threshold": ess_threshold,
        "resampling": resampling,
    }
    step = particle_gibbs_kernel(num_particles, **smc_params)
    if not isinstance(initial, str):
        target.check_sequences(list(initial), name="initial")
    else:
        validation.one_of("initial", initial, INITS)
    return SamplingAlgorithm(
        name="particle-gibbs",
        kind="markov",
        init=lambda g: particle_gibbs_init(
            target,
            generator=g,
            num_samples=num_samples,
            num_steps=num_steps,
            num_particles=num_particles,
            initial=initial,
            smc_params=smc_params,
        ),
        step=step,
        done=pg_done,
        result=pg_result,
        params={
            "num_steps": num_steps,
            "num_particles": num_particles,
            "initial": initial,
            **smc_params,
        },
        record=record,
        total_steps=num_steps,
    )


# --------------------------------------------------------------------------- bounds on log Z
class EvidenceEstimate(NamedTuple):
    """Monte Carlo estimate of ``E[log Ẑ]`` over independent runs."""

    mean: float
    stderr: float
    values: Tensor
    """``[R]`` ``log Ẑ`` of every run (``-inf`` for failed runs)."""
    cost: Cost


def _estimate(values: Tensor, cost: Cost) -> EvidenceEstimate:
    r = values.numel()
    mean = float(values.mean())
    se = float(values.std() / math.sqrt(r)) if r > 1 and math.isfinite(mean) else math.nan
    return EvidenceEstimate(mean, se, values, cost)


def log_z_lower(
    target: TiltedTarget,
    num_particles: int,
    *,
    generator: torch.Generator,
    num_runs: int = 100,
    **smc_params: Any,
) -> EvidenceEstimate:
    r"""Estimate ``E_SMC[log Ẑ] <= log Z`` from ``num_runs`` independent SMC runs.

    ``smc_params`` configure the SMC (:func:`tiltsample.samplers.smc.sampler`; a Power-SMC twist
    from :func:`tiltsample.samplers.power_smc.smc_params` works too). The gap
    ``log Z - E[log Ẑ]`` is a KL divergence on the sampler's extended space (``-KL(q‖pi)`` at
    ``N = 1``).
    """
    validation.positive_int("num_runs", num_runs)
    state = smc.run(
        target,
        num_particles=num_particles,
        generator=generator,
        num_runs=num_runs,
        **smc_params,
    )
    return _estimate(smc.log_evidence_runs(state), state.cost)


def log_z_upper(
    target: TiltedTarget,
    num_particles: int,
    exact_samples: Sequence[Seq],
    *,
    generator: torch.Generator,
    **smc_params: Any,
) -> EvidenceEstimate:
    r"""Estimate ``E_{x* ~ pi}[log Ẑ_CSMC(x*)] >= log Z``: one CSMC run per exact sample.

    ``exact_samples`` must be exact i.i.d. draws of ``pi`` (e.g. :func:`exact_references`,
    ``theory.exact_distribution(target).sample``); with other references the inequality does not
    hold. The CSMC uses the conditional version of ``resampling`` (default multinomial).
    """
    refs = target.check_sequences(list(exact_samples), name="exact_samples")
    if not refs:
        raise ValueError("exact_samples must not be empty")
    params = _check_conditional(smc_params)
    state = smc.run(
        target,
        num_particles=num_particles,
        generator=generator,
        num_runs=len(refs),
        reference=refs,
        **params,
    )
    return _estimate(smc.log_evidence_runs(state), state.cost)
