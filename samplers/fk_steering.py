r"""Feynman–Kac steering of masked-diffusion LMs (Singhal et al., arXiv 2501.06848).

``specs/smc.md`` §10.

Target
    ``pi(x) ∝ p_ref(x) G(x)``, ``G = exp(log_tilt)``, where ``p_ref`` is the output law of the
    masked-diffusion base sampler (the network **and** its unmasking rule).
Proposal
    The base sampler itself: each particle runs ``denoise_step`` (``p/q = 1``), so the weights are
    made of the potentials alone. Length convention ``truncation="stop"`` only: a response has
    the fixed length ``L`` and is cut after its first EOS.
Potentials
    Every ``resample_every`` denoising steps each particle gets an intermediate log-reward estimate
    ``phi_k`` of its partially masked state (below) and the potential ``G_k``:

    ============== ===================================================================
    ``difference`` ``log G_k = phi_k - phi_{k-1}`` (telescopes; the paper's default)
    ``max``        ``log G_k = max_{j <= k} phi_j``
    ``sum``        ``log G_k = sum_{j <= k} phi_j``
    ``immediate``  ``log G_k = phi_k`` (the paper's "r_t")
    ``none``       ``log G_k = 0``: importance sampling, reweighted at the end
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
    (:class:`~tiltsample.samplers.ets_rollout.DiffusionRolloutPotential`; lookahead twists); or
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

POTENTIALS = ("difference", "max", "sum", "immediate", "none")
ESTIMATORS = ("greedy", "one-shot", "rollout")


class FKConfig(NamedTuple):
    potential: str
    estimator: str | StatePotential
    num_samples_phi: int
    resample_every: int
    ess_threshold: float
    resampling: str
    floor: float


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
) -> FKConfig:
    potential = validation.one_of("potential", potential, POTENTIALS)
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
    return FKConfig(potential, estimator, k, every, kappa, scheme, floor)


def _check_truncation(target: TiltedTarget) -> None:
    if target.truncation != "stop":
        raise ValueError(
            "fk-steering needs truncation='stop': a masked-diffusion response has the fixed "
            "length L, so a particle without EOS cannot be turned into a response of the "
            "conditioned target (truncation='condition')"
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
    _check_truncation(target)
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
        from tiltsample.samplers.ets_rollout import DiffusionRolloutPotential

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
) -> Any:
    """One interval of ``resample_every`` denoising steps, a potential and a resampling decision."""
    config = _config(
        potential, estimator, num_samples_phi, resample_every, ess_threshold, resampling, floor
    )

    def step(generator: torch.Generator, state: FKState) -> tuple[FKState, FKInfo]:
        return _step(config, generator, state)

    return step


def _step(config: FKConfig, generator: torch.Generator, state: FKState) -> tuple[FKState, FKInfo]:
    target = state.target
    policy: Any = target.policy
    total = int(policy.num_steps)
    n, groups = state.num_particles, state.num_groups
    m = n * groups
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
        }[config.potential]
        phi_prev = phi
        log_w = _add(log_w, log_g)
        log_psi = log_psi + log_g
    # resampling (never after the last step)
    log_z = state.log_z.clone()
    counts = state.resample_count.clone()
    lw = log_w.view(groups, n)
    ess_now = ess_rows(lw)
    resampled = torch.zeros(groups, dtype=torch.bool)
    if stop < total:
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
            log_w = log_w.clone()
            log_w.view(groups, n)[gs] = 0.0
            states = states[ancestors]
            log_psi, phi_prev = log_psi[ancestors], phi_prev[ancestors]
            phi_max, phi_sum = phi_max[ancestors], phi_sum[ancestors]
            counts[gs] += 1
    new = FKState(
        target,
        n,
        groups,
        states,
        stop,
        evaluations,
        phi_prev,
        phi_max,
        phi_sum,
        log_psi,
        log_w,
        log_z,
        log_tilt,
        reward,
        counts,
        state.cost + cost,
    )
    return new, FKInfo(cost, ess_now, resampled)


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
    """
    if not is_masked_diffusion(getattr(target, "policy", None)):
        raise TypeError("fk-steering needs a target over a masked-diffusion policy")
    _check_truncation(target)
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
    }
    step = build_kernel(**params)
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
