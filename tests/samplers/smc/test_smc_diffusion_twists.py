"""Learned twists on the masked-diffusion toy (samplers/smc/twists/diffusion.py).

Exact: a twist that is the exact energy shifted by a constant per step gives the same
zero-variance guided FK as the exact energy (the per-step scale is irrelevant). Statistical:
TRI-TSMC on masked states (sampled negative phase) raises the path ESS, learns log psi close to
log V up to per-step constants, and cuts the variance of guided FK against psi = 1 with the
evidence still unbiased.
"""

from __future__ import annotations

import math

import pytest
import torch
from smc_toys import gen

from tiltsample.samplers.smc import fk_steering as fk
from tiltsample.samplers.smc.twists.diffusion import LinearStateTwist, StateTable, learn_state_twist
from tiltsample.targets.masked_diffusion import masked_diffusion_toy
from tiltsample.targets.toys import tabular_toy
from tiltsample.theory.smc_exact import ExactStatePotential, diffusion_target_law

pytestmark = pytest.mark.usefixtures("serial_torch")


def test_a_per_step_constant_does_not_change_guided_fk() -> None:
    target = masked_diffusion_toy(seed=0)
    _, log_z = diffusion_target_law(target)
    table = StateTable.from_target(target)
    exact = ExactStatePotential(target)
    mask = target.policy.mask_id
    theta = torch.tensor(
        [
            exact.log_energy(s, sum(v != mask for v in s)) + 0.7 * sum(v != mask for v in s)
            for s in table.states
        ],
        dtype=torch.float64,
    )
    state = fk.run(
        target,
        num_particles=4,
        num_runs=50,
        generator=gen(0),
        estimator=LinearStateTwist(table, theta),
        proposal="guided",
    )
    runs = fk.log_evidence_runs(state)
    assert torch.allclose(runs, torch.full_like(runs, log_z), atol=1e-9, rtol=0)


def test_learned_state_twist_approaches_the_energies_and_cuts_the_variance() -> None:
    target = masked_diffusion_toy(seed=0)
    law, log_z = diffusion_target_law(target)
    table = StateTable.from_target(target)
    start = LinearStateTwist(table)
    result = learn_state_twist(target, start, generator=gen(0), num_iterations=4, num_paths=256)
    assert result.history[-1].ess_fraction > result.history[0].ess_fraction + 0.05
    assert result.cost.model_calls > 0
    # log psi - log V is nearly constant within a step where the energies vary
    exact = ExactStatePotential(target)
    mask = target.policy.mask_id
    two = [s for s in table.states if sum(v != mask for v in s) == 2]
    learned = torch.tensor([float(result.twist.theta[table.index[s]]) for s in two])
    energies = torch.tensor([exact.log_energy(s, 2) for s in two])
    assert float((learned - energies).std()) < 0.5 * float(energies.std())
    spreads = []
    for tw in (start, result.twist):
        state = fk.run(
            target,
            num_particles=4,
            num_runs=400,
            generator=gen(1),
            estimator=tw,
            proposal="guided",
            ess_threshold=0.5,
        )
        runs = fk.log_evidence_runs(state)
        ratio = torch.exp(runs - log_z)
        assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(400)
        spreads.append(float(runs.std()))
    assert spreads[1] < 0.75 * spreads[0], spreads
    assert law  # the target is non-trivial


def test_bad_inputs_name_themselves() -> None:
    target = masked_diffusion_toy(seed=0)
    table = StateTable.from_target(target)
    with pytest.raises(TypeError, match="LinearStateTwist"):
        learn_state_twist(target, object(), generator=gen(0))
    with pytest.raises(ValueError, match="step_size"):
        learn_state_twist(target, LinearStateTwist(table), generator=gen(0), step_size=0.0)
    with pytest.raises(ValueError, match="theta"):
        LinearStateTwist(table, torch.tensor([math.nan]))
    with pytest.raises(TypeError, match="transitions"):
        StateTable.from_target(tabular_toy())
