r"""Feynman–Kac steering of masked-diffusion LMs (Singhal et al., arXiv 2501.06848).

``specs/smc.md`` §10.

Target
    ``pi(x) ∝ p_ref(x) G(x)``, ``G = exp(log_tilt)``, where ``p_ref`` is the output law of the
    masked-diffusion base sampler (the network **and** its unmasking rule).
Proposal
    ``proposal="base"``: the base sampler itself: each particle runs ``denoise_step``
    (``p/q = 1``), so the weights are made of the potentials alone. ``proposal="guided"``: the
    locally optimal proposal of the twisted model over the next denoising step,
    ``q(s'|s) ∝ p(s'|s) psi(s')`` with ``psi = exp(phi)`` (``G`` on complete states), for
    policies that enumerate a step (``transitions(state, step)``: the masked-diffusion toy); the
    weight gains ``log sum_{s'} p(s'|s) psi(s') - log psi(s)``, the difference potential's twist
    (required). With exact energies every increment is deterministic: ``log Ẑ = log Z`` in every
    run and the particles are exact draws of ``pi``.
Length conventions
    A response has the fixed length ``L`` and is cut after its first EOS. ``truncation="stop"``:
    every response counts; ``"condition"``: a response without EOS has ``G = 0`` (weight 0; the
    estimators' and the exact energies' ``G`` use the same convention), so the particles target
    ``pi(x) ∝ p_ref(x) G(x) 1{x ends with EOS}``.
Potentials
    Every ``resample_every`` denoising steps each particle gets an intermediate log-reward estimate
    ``phi_k`` of its partially masked state (below) and the potential ``G_k``:

    ============== ===================================================================
    ``difference`` ``log G_k = phi_k - phi_{k-1}`` (telescopes; the paper's default)
    ``max``        ``log G_k = max_{j <= k} phi_j``
    ``sum``        ``log G_k = sum_{j <= k} phi_j``
    ``immediate``  ``log G_k = phi_k`` (the paper's "r_t")
    ``none``       ``log G_k = 0``: importance sampling, reweighted at the end (no resampling)
    ``bon``        ``log G_k = 0`` (importance sampling: correct weights, i.i.d. particles) and
                   each run's particles returned best first (final log-tilt; ties: lower index):
                   particle 0 of a run is its best-of-``N`` selection, which is **not** a draw
                   of ``pi`` (its exact law: ``theory.smc_exact.best_of_n_law``). The reference
                   code's ``bon`` returns sorted particles likewise.
    ============== ===================================================================

    At the last step the potential is ``G(x) / prod_k G_k``, so the product of all potentials is
    ``G(x)`` and the final target is exact for every choice: the potentials are a twist
    ``psi_k = prod_{j<=k} G_j`` (:mod:`tiltsample.samplers.smc`). Weights accumulate over steps
    without resampling (the reference code discards them with adaptive resampling: the pitfall of
    §10) and live in log space (no clamp at 1e10).
Intermediate rewards ``phi``
    ``"greedy"``: ``log_tilt`` of the denoiser's most likely completion (the "expected x_0" of
    text diffusion); ``"one-shot"``: the log-mean-exp of ``log_tilt`` over ``num_samples_phi``
    completions that fill every masked position independently from the denoiser's marginals (FK
    steering's text setting; not the sampler's own completion law, so a biased log-energy);
    ``"rollout"``: ETS's unbiased estimate from ``num_samples_phi`` runs of the base sampler itself
    (:class:`~tiltsample.samplers.ets.potentials.DiffusionRolloutPotential`; lookahead twists); or
    any :class:`~tiltsample.diffusion.StatePotential`. A zero estimate becomes ``log(floor)`` so
    that no particle the target needs is killed (see
    :func:`tiltsample.samplers.twists.apply_floor`). Estimates are drawn once per particle and
    step and stored.
Resampling
    ``ess_threshold`` (default 1: at every potential evaluation, as FK steering's fixed interval)
    with any scheme of :mod:`tiltsample.resampling` (default multinomial, as the reference code).
Evidence
    ``log Ẑ = sum_epochs (logsumexp(log w) - log N)``, unbiased for ``Z = E_{p_ref}[G]``.
Cost per interval
    ``resample_every`` denoiser passes per particle (the base sampler), plus the estimator's:
    one pass and one reward call per particle (greedy), one pass and ``K`` reward calls
    (one-shot), ``K`` full rollouts (rollout); one reward call per particle at the end.

Paper defaults for text (paper and reference code): 4 particles, ``lambda = 10`` (multiplying
the reward; here ``1/lam``), resampling every 20 denoising steps, difference potential,
multinomial resampling.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.diffusion import (
    StatePotential,
    denoise,
    initial_states,
    is_masked_diffusion,
    states_to_seqs,
)
from tiltsample.resampling import SCHEMES
from tiltsample.results import SampleSet
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.samplers.smc import batched_resample, ess_rows
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "ESTIMATORS",
    "POTENTIALS",
    "PROPOSALS",
    "FKConfig",
    "FKInfo",
    "FKState",
    "build_kernel",
    "done",
    "init",
    "log_evidence_runs",
    "result",
    "run",
    "sampler",
]

POTENTIALS = ("difference", "max", "sum", "immediate", "none", "bon")
ESTIMATORS = ("greedy", "one-shot", "rollout")
PROPOSALS = ("base", "guided")


class FKConfig(NamedTuple):
    potential: str
    estimator: str | StatePotential
    num_samples_phi: int
    resample_every: int
    ess_threshold: float
    resampling: str
    floor: float
    proposal: str = "base"


class FKState(NamedTuple):
    """``num_groups`` runs of ``num_particles`` masked-diffusion particles (rows of ``states``)."""

    target: TiltedTarget
    num_particles: int
    num_groups: int
    states: Tensor
    step: int
    """Denoising steps done."""
    evaluations: int
    """Potential evaluations done (``k``)."""
    phi_prev: Tensor
    phi_max: Tensor
    phi_sum: Tensor
    log_psi: Tensor
    """``[M]`` ``sum_k log G_k`` so far (the twist)."""
    log_w: Tensor
    log_z: Tensor
    log_tilt: Tensor
    """``[M]`` final log-tilt (NaN until complete)."""
    reward: Tensor
    resample_count: Tensor
    cost: Cost


class FKInfo(NamedTuple):
    cost: Cost
    ess: Tensor
    resampled: Tensor


def _config(
    potential: str,
    estimator: str | StatePotential,
    num_samples_phi: int,
    resample_every: int,
    ess_threshold: float,
    resampling: str,
    floor: float,
    proposal: str = "base",
) -> FKConfig:
    potential = validation.one_of("potential", potential, POTENTIALS)
    proposal = validation.one_of("proposal", proposal, PROPOSALS)
    if proposal == "guided" and potential != "difference":
        raise ValueError(
            "proposal='guided' uses the twist psi = exp(phi) (the difference potential): "
            f"potential must be 'difference', got {potential!r}"
        )
    if isinstance(estimator, str):
        validation.one_of("estimator", estimator, ESTIMATORS)
    elif not callable(getattr(estimator, "log_potential_states", None)):
        raise TypeError(
            f"estimator must be one of {list(ESTIMATORS)} or a StatePotential, "
            f"got {type(estimator).__name__}"
        )
    k = validation.positive_int("num_samples_phi", num_samples_phi)
    every = validation.positive_int("resample_every", resample_every)
    kappa = validation.unit_interval("ess_threshold", ess_threshold)
    scheme = validation.one_of("resampling", resampling, SCHEMES)
    floor = validation.positive_float("floor", floor)
    return FKConfig(potential, estimator, k, every, kappa, scheme, floor, proposal)


def _check_guided(target: TiltedTarget, config: FKConfig) -> None:
    if config.proposal == "guided" and not callable(getattr(target.policy, "transitions", None)):
        raise TypeError(
            "proposal='guided' needs a policy that enumerates one denoising step "
            "(transitions(state, step), e.g. MaskedDiffusionToy)"
        )


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_particles: int,
    num_groups: int = 1,
) -> FKState:
    """Fully masked particles, equal weights, ``psi_0 = 1``."""
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    if not is_masked_diffusion(target.policy):
        raise TypeError(
            "fk-steering needs a masked-diffusion policy (MaskedDiffusionPolicy); for an "
            "autoregressive policy use tiltsample.samplers.smc"
        )
    validation.generator("generator", generator)
    n = validation.positive_int("num_particles", num_particles)
    g = validation.positive_int("num_groups", num_groups)
    m = n * g
    f64 = torch.float64
    zeros = torch.zeros(m, dtype=f64)
    return FKState(
        target,
        n,
        g,
        initial_states(target.policy, m),  # type: ignore[arg-type]
        0,
        0,
        zeros.clone(),
        torch.full((m,), -math.inf, dtype=f64),
        zeros.clone(),
        zeros.clone(),
        zeros.clone(),
        torch.zeros(g, dtype=f64),
        torch.full((m,), math.nan, dtype=f64),
        torch.full((m,), math.nan, dtype=f64),
        torch.zeros(g, dtype=torch.long),
        Cost(),
    )


def done(state: FKState) -> bool:
    """True once every particle is a complete response (after ``T`` denoising steps)."""
    return state.step >= int(state.target.policy.num_steps)  # type: ignore[attr-defined]


def _final_log_tilt(target: TiltedTarget, seqs: list[Seq]) -> tuple[Tensor, Tensor | None, Cost]:
    scores = target.evaluate_tilt(seqs)
    ok = torch.tensor([target.is_complete(x) for x in seqs], dtype=torch.bool)
    log_g = torch.where(ok, scores.log_tilt, torch.full_like(scores.log_tilt, -math.inf))
    return log_g, scores.reward, scores.cost


def _estimate(
    config: FKConfig,
    target: TiltedTarget,
    states: Tensor,
    step: int,
    generator: torch.Generator,
) -> tuple[Tensor, Cost]:
    """``phi`` of every (partially masked) state: an intermediate log-reward estimate."""
    policy: Any = target.policy
    mask = int(policy.mask_id)
    rows, length = states.shape
    estimator = config.estimator
    if not isinstance(estimator, str):
        values, cost = estimator.log_potential_states(target.prompt, states, step, generator)
        return values.to(torch.float64), cost
    if estimator == "rollout":
        from tiltsample.samplers.ets.potentials import DiffusionRolloutPotential

        pot = DiffusionRolloutPotential(target, config.num_samples_phi)
        values, cost = pot.log_potential_states(target.prompt, states, step, generator)
        return values.to(torch.float64), cost
    logp = policy.position_logprobs(target.prompt, states).to(torch.float64)  # [B, L, V]
    cost = Cost(forward_tokens=rows * (len(target.prompt) + length), model_calls=1)
    masked = states == mask
    if estimator == "greedy":
        filled = torch.where(masked, logp.argmax(dim=2), states)
        log_g, _, c = _final_log_tilt(target, states_to_seqs(filled, target.eos_id, mask))
        return log_g, cost + c
    k = config.num_samples_phi
    probs = torch.exp(logp).reshape(rows * length, -1)
    draws = torch.multinomial(probs, k, replacement=True, generator=generator)  # [B*L, K]
    draws = draws.view(rows, length, k).permute(0, 2, 1)  # [B, K, L]
    filled = torch.where(masked[:, None, :], draws, states[:, None, :]).reshape(rows * k, length)
    log_g, _, c = _final_log_tilt(target, states_to_seqs(filled, target.eos_id, mask))
    values = torch.logsumexp(log_g.view(rows, k), dim=1) - math.log(k)
    generated = int(masked.sum()) * k
    return values, cost + c + Cost(generated_tokens=generated)


def _add(log_w: Tensor, inc: Tensor) -> Tensor:
    out = log_w + inc
    return torch.where(
        torch.isneginf(log_w) | torch.isneginf(inc), torch.full_like(out, -math.inf), out
    )


def build_kernel(
    *,
    potential: str = "difference",
    estimator: str | StatePotential = "one-shot",
    num_samples_phi: int = 4,
    resample_every: int = 1,
    ess_threshold: float = 1.0,
    resampling: str = "multinomial",
    floor: float = 1.0,
    proposal: str = "base",
) -> Any:
    """One interval of ``resample_every`` denoising steps, a potential and a resampling decision."""
    config = _config(
        potential,
        estimator,
        num_samples_phi,
        resample_every,
        ess_threshold,
        resampling,
        floor,
        proposal,
    )

    def step(generator: torch.Generator, state: FKState) -> tuple[FKState, FKInfo]:
        _check_guided(state.target, config)
        if config.proposal == "guided":
            return _guided_step(config, generator, state)
        return _step(config, generator, state)

    return step


def _step(config: FKConfig, generator: torch.Generator, state: FKState) -> tuple[FKState, FKInfo]:
    target = state.target
    policy: Any = target.policy
    total = int(policy.num_steps)
    stop = min(state.step + config.resample_every, total)
    den = denoise(policy, target.prompt, state.states, state.step, stop, generator)
    states, cost = den.states, den.cost
    log_w, log_psi = state.log_w.clone(), state.log_psi.clone()
    phi_prev, phi_max, phi_sum = state.phi_prev, state.phi_max, state.phi_sum
    log_tilt, reward = state.log_tilt, state.reward
    evaluations = state.evaluations
    if stop == total:  # complete: the last potential is G / prod_k G_k
        seqs = states_to_seqs(states, target.eos_id, int(policy.mask_id))
        log_tilt, rew, c = _final_log_tilt(target, seqs)
        cost = cost + c
        if rew is not None:
            reward = rew
        last = torch.where(torch.isneginf(log_psi), torch.zeros_like(log_psi), -log_psi)
        log_w = _add(log_w, _add(log_tilt, last))
        log_psi = log_tilt
    else:
        phi, c = _estimate(config, target, states, stop, generator)
        cost = cost + c
        if bool(torch.isnan(phi).any()) or bool((phi == math.inf).any()):
            raise ValueError("the intermediate reward estimate returned NaN or +inf")
        phi = torch.where(torch.isneginf(phi), torch.full_like(phi, math.log(config.floor)), phi)
        evaluations += 1
        phi_max = torch.maximum(phi_max, phi)
        phi_sum = phi_sum + phi
        log_g = {
            "difference": phi - phi_prev,
            "max": phi_max,
            "sum": phi_sum,
            "immediate": phi,
            "none": torch.zeros_like(phi),
            "bon": torch.zeros_like(phi),
        }[config.potential]
        phi_prev = phi
        log_w = _add(log_w, log_g)
        log_psi = log_psi + log_g
    moved = state._replace(
        states=states,
        step=stop,
        evaluations=evaluations,
        phi_prev=phi_prev,
        phi_max=phi_max,
        phi_sum=phi_sum,
        log_psi=log_psi,
        log_w=log_w,
        log_tilt=log_tilt,
        reward=reward,
    )
    return _resample_and_pack(config, generator, moved, cost)


def _resample_and_pack(
    config: FKConfig, generator: torch.Generator, moved: FKState, cost: Cost
) -> tuple[FKState, FKInfo]:
    """The resampling decision (never after the last step) and the new state.

    ``moved``: the state after an interval of denoising steps and its potentials, before
    resampling (``log_z``, ``resample_count`` and ``cost`` still those before the interval);
    ``cost``: the interval's cost.
    """
    total = int(moved.target.policy.num_steps)  # type: ignore[attr-defined]
    n, groups = moved.num_particles, moved.num_groups
    m = n * groups
    stop = moved.step
    if stop == total and config.potential == "bon":
        moved = _sort_by_tilt(moved)
    # resampling (never after the last step)
    log_z = moved.log_z.clone()
    counts = moved.resample_count.clone()
    lw = moved.log_w.view(groups, n)
    ess_now = ess_rows(lw)
    resampled = torch.zeros(groups, dtype=torch.bool)
    if stop < total and config.potential not in ("none", "bon"):  # IS: equal weights until the end
        always = config.ess_threshold >= 1.0
        need = (
            torch.ones(groups, dtype=torch.bool) if always else ess_now < config.ess_threshold * n
        )
        level = torch.logsumexp(lw, dim=1) - math.log(n)
        ok = torch.isfinite(level)
        log_z = torch.where(need & ~ok, torch.full_like(log_z, -math.inf), log_z)
        resampled = need & ok
        if bool(resampled.any()):
            gs = resampled.nonzero().flatten()
            weights = torch.exp(lw[gs] - torch.logsumexp(lw[gs], dim=1, keepdim=True))
            anc = batched_resample(config.resampling, generator, weights)
            ancestors = torch.arange(m)
            ancestors.view(groups, n)[gs] = gs[:, None] * n + anc
            log_z[gs] = log_z[gs] + level[gs]
            log_w = moved.log_w.clone()
            log_w.view(groups, n)[gs] = 0.0
            moved = moved._replace(
                states=moved.states[ancestors],
                log_psi=moved.log_psi[ancestors],
                phi_prev=moved.phi_prev[ancestors],
                phi_max=moved.phi_max[ancestors],
                phi_sum=moved.phi_sum[ancestors],
                log_w=log_w,
            )
            counts[gs] += 1
    new = moved._replace(log_z=log_z, resample_count=counts, cost=moved.cost + cost)
    return new, FKInfo(cost, ess_now, resampled)


def _sort_by_tilt(state: FKState) -> FKState:
    """Order each run's particles by final log-tilt, best first (ties: lower index first).

    A permutation inside a run changes neither its weighted particle law nor its evidence; it
    makes particle 0 of each run the best-of-``N`` selection (FK steering's ``bon`` output).
    """
    n, groups, log_tilt = state.num_particles, state.num_groups, state.log_tilt
    key = torch.where(torch.isnan(log_tilt), torch.full_like(log_tilt, -math.inf), log_tilt)
    order = torch.sort(-key.view(groups, n), dim=1, stable=True).indices
    perm = (order + torch.arange(groups)[:, None] * n).flatten()
    return state._replace(
        states=state.states[perm],
        log_w=state.log_w[perm],
        log_psi=state.log_psi[perm],
        log_tilt=log_tilt[perm],
        reward=state.reward[perm],
    )


def _guided_step(
    config: FKConfig, generator: torch.Generator, state: FKState
) -> tuple[FKState, FKInfo]:
    r"""``resample_every`` steps of the guided proposal, then the resampling decision.

    From state ``s`` at step ``k`` the policy enumerates the next states ``s'`` with their
    base-sampler probabilities ``p(s'|s)``; with the twist ``psi(s') = exp(phi(s'))`` (``G`` for
    complete states) drawn once per child, the particle moves to ``s' ~ q(s'|s) ∝ p(s'|s)
    psi(s')`` and its weight gains ``log sum_{s'} p(s'|s) psi(s') - log psi(s)`` (the locally
    optimal proposal of the twisted Feynman–Kac model; the drawn child's twist is stored and
    reused as the next denominator, so random estimates telescope).
    """
    target = state.target
    policy: Any = target.policy
    total = int(policy.num_steps)
    mask = int(policy.mask_id)
    stop = min(state.step + config.resample_every, total)
    states = state.states.clone()
    log_w, log_psi = state.log_w.clone(), state.log_psi.clone()
    log_tilt, reward = state.log_tilt.clone(), state.reward.clone()
    evaluations = state.evaluations
    rows, length = states.shape
    cost = Cost()
    for k in range(state.step, stop):
        children: list[tuple[int, ...]] = []
        log_p: list[float] = []
        owner: list[int] = []
        for i, row in enumerate(states.tolist()):
            for child, lp in policy.transitions(tuple(row), k):
                children.append(child)
                log_p.append(lp)
                owner.append(i)
        kids = torch.tensor(children, dtype=torch.long).view(-1, length)
        lp_t = torch.tensor(log_p, dtype=torch.float64)
        own = torch.tensor(owner, dtype=torch.long)
        cost = cost + Cost(forward_tokens=rows * (len(target.prompt) + length), model_calls=1)
        last = k + 1 == total
        kid_reward = torch.full((kids.shape[0],), math.nan, dtype=torch.float64)
        if last:
            phi, rew, c = _final_log_tilt(target, states_to_seqs(kids, target.eos_id, mask))
            if rew is not None:
                kid_reward = rew
        else:
            phi, c = _estimate(config, target, kids, k + 1, generator)
            if bool(torch.isnan(phi).any()) or bool((phi == math.inf).any()):
                raise ValueError("the intermediate reward estimate returned NaN or +inf")
            phi = torch.where(
                torch.isneginf(phi), torch.full_like(phi, math.log(config.floor)), phi
            )
            evaluations += 1
        cost = cost + c
        logits = torch.where(torch.isneginf(phi), phi, lp_t + phi)
        chosen = torch.empty(rows, dtype=torch.long)
        for i in range(rows):
            idx = (own == i).nonzero().flatten()
            li = logits[idx]
            norm = torch.logsumexp(li, 0)
            if bool(torch.isfinite(norm)):
                q = torch.exp(li - norm)
            else:  # every child has zero twist: the particle is dead, move by p_ref
                q = torch.exp(lp_t[idx] - torch.logsumexp(lp_t[idx], 0))
            j = int(idx[int(torch.multinomial(q, 1, generator=generator))])
            chosen[i] = j
            log_w[i] = _add(log_w[i : i + 1], (norm - log_psi[i]).reshape(1))[0]
        new_states = kids[chosen]
        committed = int((states == mask).sum()) - int((new_states == mask).sum())
        cost = cost + Cost(generated_tokens=committed)
        states = new_states
        log_psi = phi[chosen]
        if last:
            log_tilt = phi[chosen]
            reward = kid_reward[chosen]
    moved = state._replace(
        states=states,
        step=stop,
        evaluations=evaluations,
        phi_prev=log_psi.clone(),
        log_psi=log_psi,
        log_w=log_w,
        log_tilt=log_tilt,
        reward=reward,
    )
    return _resample_and_pack(config, generator, moved, cost)


def log_evidence_runs(state: FKState) -> Tensor:
    """``[G]`` ``log Ẑ`` of every run (``-inf`` for a run whose weights all vanished)."""
    n, groups = state.num_particles, state.num_groups
    level = torch.logsumexp(state.log_w.view(groups, n), dim=1) - math.log(n)
    out = state.log_z + level
    return torch.where(torch.isnan(out), torch.full_like(out, -math.inf), out)


def result(state: FKState) -> SampleSet:
    """All particles (weights normalised per run when several runs share the state)."""
    target = state.target
    policy: Any = target.policy
    n, groups = state.num_particles, state.num_groups
    seqs = states_to_seqs(state.states, target.eos_id, int(policy.mask_id))
    runs = log_evidence_runs(state)
    log_w = state.log_w.clone()
    if groups > 1:
        for g in range(groups):
            sl = slice(g * n, (g + 1) * n)
            top = torch.logsumexp(log_w[sl], 0)
            if bool(torch.isfinite(top)):
                log_w[sl] = log_w[sl] - top
    pooled = float(torch.logsumexp(runs, 0) - math.log(groups)) if groups > 1 else float(runs[0])
    key = torch.where(
        torch.isnan(state.log_tilt), torch.full_like(state.log_tilt, -math.inf), state.log_tilt
    ).view(groups, n)
    best = torch.sort(-key, dim=1, stable=True).indices[:, 0] + torch.arange(groups) * n
    return SampleSet(
        seqs,
        log_w,
        state.cost,
        state.reward if target.reward is not None else None,
        None,
        pooled,
        {
            "num_particles": n,
            "num_runs": groups,
            "log_evidence_runs": runs.tolist(),
            "num_resampling": state.resample_count.tolist(),
            "potential_evaluations": state.evaluations,
            "best_of_n": [seqs[i] for i in best.tolist()],
        },
    )


def run(
    target: TiltedTarget,
    *,
    num_particles: int,
    generator: torch.Generator,
    num_runs: int = 1,
    **params: Any,
) -> FKState:
    """``num_runs`` independent FK-steering runs to completion (parameters of :func:`sampler`)."""
    step = build_kernel(**params)
    state = init(target, generator=generator, num_particles=num_particles, num_groups=num_runs)
    while not done(state):
        state, _ = step(generator, state)
    return state


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_particles: int | None = None,
    potential: str = "difference",
    estimator: str | StatePotential = "one-shot",
    num_samples_phi: int = 4,
    resample_every: int = 1,
    ess_threshold: float = 1.0,
    resampling: str = "multinomial",
    floor: float = 1.0,
    proposal: str = "base",
) -> SamplingAlgorithm:
    """FK steering (see the module docstring).

    Parameters
    ----------
    target
        A tilted target over a masked-diffusion policy.
    num_samples, num_particles
        ``num_samples / num_particles`` independent runs of ``num_particles`` (default: one run).
    potential
        One of :data:`POTENTIALS`.
    estimator, num_samples_phi
        Intermediate reward: ``"greedy"``, ``"one-shot"`` (``K = num_samples_phi`` independent
        fills), ``"rollout"`` (``K`` base-sampler rollouts) or a ``StatePotential``.
    resample_every
        Denoising steps between potential evaluations / resampling decisions.
    ess_threshold, resampling
        Resample when ``ESS < ess_threshold · N`` (default 1: every evaluation).
    floor
        A zero estimate becomes ``log(floor)`` (keeps the potentials positive).
    proposal
        ``"base"`` (the base sampler) or ``"guided"`` (the twisted one-step proposal
        ``q(s'|s) ∝ p(s'|s) exp(phi(s'))`` over the enumerated next states; difference
        potential only).
    """
    if not is_masked_diffusion(getattr(target, "policy", None)):
        raise TypeError("fk-steering needs a target over a masked-diffusion policy")
    validation.positive_int("num_samples", num_samples)
    n = (
        num_samples
        if num_particles is None
        else validation.positive_int("num_particles", num_particles)
    )
    if num_samples % n:
        raise ValueError(f"num_particles={n} must divide num_samples={num_samples}")
    params: dict[str, Any] = {
        "potential": potential,
        "estimator": estimator,
        "num_samples_phi": num_samples_phi,
        "resample_every": resample_every,
        "ess_threshold": ess_threshold,
        "resampling": resampling,
        "floor": floor,
        "proposal": proposal,
    }
    step = build_kernel(**params)
    _check_guided(target, _config(**params))
    groups = num_samples // n
    total = int(target.policy.num_steps)  # type: ignore[attr-defined]
    return SamplingAlgorithm(
        name="fk-steering",
        kind="iid",
        init=lambda g: init(target, generator=g, num_particles=n, num_groups=groups),
        step=step,
        done=done,
        result=result,
        params={"num_particles": n, **params},
        total_steps=math.ceil(total / resample_every),
    )
