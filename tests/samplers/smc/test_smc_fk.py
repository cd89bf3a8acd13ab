"""FK steering for masked diffusion (samplers/smc/fk_*.py) on the exact masked-diffusion toy.

Exact: without resampling every final log-weight equals the particle's log-tilt, for every
potential and estimator (the potentials telescope; weights accumulate between resamplings).
Statistical: E[Ẑ]/Z and the pooled particle law against the exact tilted output law of the base
sampler (theory.smc_exact.diffusion_target_law), with exact energies, rollouts and one-shot fills;
and the FK-steering pitfall of specs/smc.md §10 reproduced: discarding the potentials of steps
that do not resample biases the particle law.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from scipy.stats import chisquare
from smc_toys import gen, merge_rare
from smc_toys import masked_toy as toy

from tiltsample import TiltedTarget
from tiltsample.diffusion import denoise, initial_states, states_to_seqs
from tiltsample.samplers.smc import fk_steering as fk
from tiltsample.target import Truncation
from tiltsample.targets.toys import tabular_toy
from tiltsample.testing import check_sampler
from tiltsample.theory import tv
from tiltsample.theory.smc_exact import (
    ExactStatePotential,
    best_of_n_law,
    diffusion_target_law,
    evidence_weighted_law,
)

pytestmark = pytest.mark.usefixtures("serial_torch")


# ----------------------------------------------------------------------------- guided proposal
def guided_runs(
    target: TiltedTarget, n: int, r: int, seed: int, estimator: Any, **params: Any
) -> fk.FKState:
    """``r`` runs of ``n`` particles of FK with the guided proposal (resampling at ESS < n/2)."""
    return fk.run(
        target,
        num_particles=n,
        num_runs=r,
        generator=gen(seed),
        estimator=estimator,
        proposal="guided",
        ess_threshold=0.5,
        **params,
    )


@pytest.mark.parametrize("truncation", ["stop", "condition"])
@pytest.mark.parametrize("order", ["max-confidence", "drawn-confidence"])
def test_guided_proposal_with_exact_energies_has_zero_variance(
    order: str, truncation: Truncation
) -> None:
    """The twisted one-step proposal with the exact energies: log Ẑ = log Z in every run, equal
    weights, and the particles are exact draws of pi (chi-square)."""
    target = toy(order, truncation)
    law, log_z = diffusion_target_law(target)
    r, n = 300, 4
    state = guided_runs(target, n, r, 4, ExactStatePotential(target))
    runs = fk.log_evidence_runs(state)
    assert torch.allclose(runs, torch.full_like(runs, log_z), atol=1e-9, rtol=0)
    lw = state.log_w.view(r, n)
    assert torch.allclose(lw, lw[:, :1].expand(-1, n), atol=1e-9, rtol=0)
    out = fk.result(state)
    counts = Counter(out.sequences)
    assert set(counts) <= set(law)
    keys = list(law)
    obs, exp = merge_rare([counts.get(x, 0) for x in keys], [law[x] * r * n for x in keys])
    assert chisquare(obs, exp).pvalue > 1e-3


@pytest.mark.parametrize("truncation", ["stop", "condition"])
@pytest.mark.parametrize("estimator", ["greedy", "one-shot"])
def test_guided_proposal_with_estimated_twists_stays_exact(
    estimator: str, truncation: Truncation
) -> None:
    """Approximate (and random) twists: E[Ẑ] = Z and the evidence-weighted law is pi."""
    target = toy("max-confidence", truncation)
    law, log_z = diffusion_target_law(target)
    r, n = 400, 4
    state = guided_runs(target, n, r, 5, estimator, num_samples_phi=2)
    ratio = torch.exp(fk.log_evidence_runs(state) - log_z)
    assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(r)
    unbiased, noise = evidence_weighted_law(fk.result(state), log_z)
    assert tv(unbiased, law) < 3 * noise


def test_guided_proposal_lowers_the_evidence_variance() -> None:
    """Same estimator (greedy), same budget of particles: the guided proposal's log Ẑ varies less
    than the base sampler's."""
    target = toy("max-confidence")
    sds = []
    for proposal in ("base", "guided"):
        state = fk.run(
            target,
            num_particles=4,
            num_runs=300,
            generator=gen(6),
            estimator="greedy",
            proposal=proposal,
            ess_threshold=0.5,
        )
        sds.append(float(fk.log_evidence_runs(state).std()))
    assert sds[1] < 0.8 * sds[0], sds


# ----------------------------------------------------------------------------- best-of-N
def test_bon_potential_keeps_correct_weights_and_returns_the_best_first() -> None:
    target = toy("max-confidence")
    law, log_z = diffusion_target_law(target)
    r, n = 1500, 4
    state = fk.run(target, num_particles=n, num_runs=r, generator=gen(7), potential="bon")
    out = fk.result(state)
    assert int(state.resample_count.sum()) == 0  # importance sampling: i.i.d. particles
    log_g = target.evaluate_tilt(out.sequences).log_tilt
    ok = torch.tensor([target.is_complete(x) for x in out.sequences])
    log_g = torch.where(ok, log_g, torch.full_like(log_g, -math.inf))
    per_run = torch.exp(out.log_weights.view(r, n))  # normalised per run
    expected = torch.softmax(log_g.view(r, n), dim=1)
    assert torch.allclose(per_run, expected, atol=1e-12)
    # each run sorted best first; particle 0 is the best-of-N selection
    assert bool((log_g.view(r, n)[:, :-1] >= log_g.view(r, n)[:, 1:]).all())
    best = out.meta["best_of_n"]
    assert best == [out.sequences[g * n] for g in range(r)]
    exact = best_of_n_law(target, n)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-12)
    counts = Counter(best)
    keys = list(exact)
    obs, exp = merge_rare([counts.get(x, 0) for x in keys], [exact[x] * r for x in keys])
    assert chisquare(obs, exp).pvalue > 1e-3
    unbiased, noise = evidence_weighted_law(out, log_z)
    assert tv(unbiased, law) < 3 * noise  # the weighted particles target pi


# ----------------------------------------------------------------------------- condition
@pytest.mark.parametrize("estimator", ["exact", "one-shot"])
def test_condition_truncation_targets_the_conditioned_law(estimator: str) -> None:
    target = toy("max-confidence", "condition")
    law, log_z = diffusion_target_law(target)
    assert all(x[-1] == target.eos_id for x in law)
    est: Any = ExactStatePotential(target) if estimator == "exact" else estimator
    r, n = 400, 8
    state = fk.run(target, num_particles=n, num_runs=r, generator=gen(8), estimator=est)
    ratio = torch.exp(fk.log_evidence_runs(state) - log_z)
    assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(r)
    out = fk.result(state)
    alive = [x for x, w in zip(out.sequences, out.log_weights.tolist(), strict=True) if w > -1e300]
    assert all(x[-1] == target.eos_id for x in alive)
    unbiased, noise = evidence_weighted_law(out, log_z)
    assert tv(unbiased, law) < 3 * noise


# ----------------------------------------------------------------------------- exact
@pytest.mark.parametrize("order", ["random", "drawn-confidence"])
def test_without_resampling_the_potentials_telescope_to_the_tilt(order: str) -> None:
    target = toy(order)
    for potential in fk.POTENTIALS:
        for estimator in ("greedy", "one-shot", "rollout"):
            out = fk.result(
                fk.run(
                    target,
                    num_particles=24,
                    generator=gen(0),
                    potential=potential,
                    estimator=estimator,
                    ess_threshold=0.0,
                    num_samples_phi=2,
                )
            )
            log_g = target.evaluate_tilt(out.sequences).log_tilt
            ok = torch.tensor([target.is_complete(x) for x in out.sequences])
            log_g = torch.where(ok, log_g, torch.full_like(log_g, -math.inf))
            finite = torch.isfinite(log_g)
            assert torch.equal(finite, torch.isfinite(out.log_weights))
            assert torch.allclose(out.log_weights[finite], log_g[finite], atol=1e-9, rtol=0)


def test_conformance_and_costs() -> None:
    for order in ("max-confidence", "drawn-confidence"):
        target = toy(order)
        for params in ({}, {"estimator": "rollout", "resample_every": 2, "ess_threshold": 0.5}):
            out = check_sampler(
                fk.sampler(target, num_samples=6, num_particles=3, **params), target, num_samples=6
            )
            assert out.cost.generated_tokens >= 6 * target.max_new_tokens
            assert out.cost.reward_calls >= 6


# ----------------------------------------------------------------------------- statistical
@pytest.mark.parametrize("order", ["max-confidence", "drawn-confidence"])
@pytest.mark.parametrize(
    "params",
    [
        {"estimator": "exact"},
        {"estimator": "exact", "potential": "max", "resampling": "systematic"},
        {"estimator": "rollout", "num_samples_phi": 2},
        {"estimator": "one-shot", "ess_threshold": 0.5, "resample_every": 2},
    ],
    ids=["exact-difference", "exact-max", "rollout", "one-shot-adaptive"],
)
def test_evidence_unbiased_and_particles_reach_the_target(
    order: str, params: dict[str, Any]
) -> None:
    target = toy(order)
    law, log_z = diffusion_target_law(target)
    params = dict(params)
    if params.get("estimator") == "exact":
        params["estimator"] = ExactStatePotential(target)
    r, n = 400, 8
    state = fk.run(target, num_particles=n, num_runs=r, generator=gen(1), **params)
    ratio = torch.exp(fk.log_evidence_runs(state) - log_z)
    assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(r)
    unbiased, noise = evidence_weighted_law(fk.result(state), log_z)
    assert tv(unbiased, law) < 3 * noise


def test_the_discarded_potential_pitfall_biases_the_particle_law() -> None:
    """specs/smc.md §10 (reference code, unconfirmed until reproduced on a toy): with adaptive
    resampling, a step that does not resample *discards* its potential. Reproduced here with a
    minimal re-implementation of that rule (difference potential, exact energies): the pooled law
    ends far from pi, while fk_steering (which accumulates) is within its sampling noise."""
    target = toy("max-confidence")
    law, _ = diffusion_target_law(target)
    exact = ExactStatePotential(target)
    policy: Any = target.policy
    n, runs = 8, 600
    g = gen(2)
    pooled: dict[tuple[int, ...], float] = {}
    for _ in range(runs):
        states = initial_states(policy, n)
        log_w = torch.zeros(n, dtype=torch.float64)
        prev = torch.zeros(n, dtype=torch.float64)
        for step in range(policy.num_steps):
            states = denoise(policy, (), states, step, step + 1, g).states
            if step + 1 == policy.num_steps:
                phi = target.evaluate_tilt(states_to_seqs(states, 0, policy.mask_id)).log_tilt
            else:
                phi, _ = exact.log_potential_states((), states, step + 1, g)
            potential = phi - prev  # this step's potential
            prev = phi
            w = torch.exp(potential - torch.logsumexp(potential, 0))
            if float(1 / (w * w).sum()) < 0.5 * n:
                anc = torch.multinomial(w, n, replacement=True, generator=g)
                states, prev = states[anc], prev[anc]
                log_w = torch.zeros(n, dtype=torch.float64)
            else:
                log_w = potential  # the bug: earlier unresampled potentials are dropped
        probs = torch.exp(log_w - torch.logsumexp(log_w, 0)).tolist()
        for x, p in zip(states_to_seqs(states, 0, policy.mask_id), probs, strict=True):
            pooled[x] = pooled.get(x, 0.0) + p / runs
    correct = fk.run(
        target, num_particles=n, num_runs=runs, generator=gen(3), estimator=exact, ess_threshold=0.5
    )
    tv_bug, tv_ok = tv(pooled, law), tv(fk.result(correct).empirical(), law)
    assert tv_ok < 0.06
    assert tv_bug > 2 * tv_ok, (tv_bug, tv_ok)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("params", "error", "name"),
    [
        ({"potential": "product"}, ValueError, "potential"),
        ({"estimator": "mean"}, ValueError, "estimator"),
        ({"estimator": object()}, TypeError, "estimator"),
        ({"resample_every": 0}, ValueError, "resample_every"),
        ({"num_samples_phi": 0}, ValueError, "num_samples_phi"),
        ({"ess_threshold": -0.1}, ValueError, "ess_threshold"),
        ({"resampling": "best"}, ValueError, "resampling"),
        ({"floor": 0.0}, ValueError, "floor"),
        ({"proposal": "twisted"}, ValueError, "proposal"),
        ({"proposal": "guided", "potential": "max"}, ValueError, "potential"),
        ({"num_particles": 4}, ValueError, "num_particles"),
    ],
)
def test_bad_parameters_name_themselves(params: dict[str, Any], error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        fk.sampler(toy(), num_samples=6, **params)


def test_autoregressive_targets_are_refused_with_a_pointer() -> None:
    with pytest.raises(TypeError, match="masked-diffusion"):
        fk.sampler(tabular_toy(), num_samples=4)
