"""Scalable TRI-TSMC negative phase (samplers/smc/twists/tri*.py, negative="smc").

Statistical: SMC particles with the current twist estimate the twisted marginals' feature
expectations (the negative phase) without bias beyond O(1/N); the projection with sampled
normalisers converges to the enumerated solution (the value function) as N grows; and the full
iteration learns a twist that cuts the variance of twisted SMC, without ever enumerating.
"""

from __future__ import annotations

import math

import pytest
import torch
from smc_toys import checked_log_z_spreads, gen, tri_toy, twist_law

from tiltsample.samplers.smc.twists import (
    LinearTwist,
    negative_phase_samples,
    path_states,
    project_twist,
    state_tables,
    tri_tsmc,
)
from tiltsample.samplers.smc.twists import tri as tri_module
from tiltsample.theory import exact_distribution, tv
from tiltsample.theory.energies import exact_energies

pytestmark = pytest.mark.usefixtures("serial_torch")


def test_sampled_negative_phase_matches_the_enumerated_one() -> None:
    """E_{sigma_t^theta}[phi 1{incomplete}] at a nonzero theta: the mean of R independent SMC
    estimates is within 4 standard errors (plus an O(1/N) allowance) of the exact value."""
    target, table = tri_toy()
    theta = 0.5 * exact_energies(target).log_energies(table.prefixes)
    twist = LinearTwist(table, theta)
    tables = state_tables(target, table)
    r, n = 40, 200
    g = gen(0)
    estimates = []
    for _ in range(r):
        negatives, cost = negative_phase_samples(target, twist, n, g)
        assert cost.generated_tokens > 0
        estimates.append(torch.stack([torch.exp(lw) @ phi for lw, phi in negatives]))
    est = torch.stack(estimates)  # [R, L, F]
    for t, (phi_all, lp_all, comp) in enumerate(tables):
        if phi_all.shape[0] == 0:
            continue
        log_mass = torch.cat([lp_all + phi_all @ theta, comp])
        probs = torch.softmax(log_mass, 0)[: phi_all.shape[0]]
        exact = probs @ phi_all
        mean, se = est[:, t].mean(0), est[:, t].std(0) / math.sqrt(r)
        assert bool(((mean - exact).abs() <= 4 * se + 2.0 / n).all()), t


def _projection_error(n: int, seed: int, iterations: int = 10) -> float:
    """pi-weighted mean |theta - log V| after iterating the sampled projection, positives = pi."""
    target, table = tri_toy()
    pi = exact_distribution(target)
    states = path_states(target, pi.support, table)
    exact = exact_energies(target).log_energies(table.prefixes)
    mass = torch.zeros(table.num_features, dtype=torch.float64)
    for x, p in zip(pi.support, pi.probs.tolist(), strict=True):
        for t in range(1, len(x)):
            if x[:t] in table.index:
                mass[table.index[x[:t]]] += p
    theta = torch.zeros(table.num_features, dtype=torch.float64)
    g = gen(seed)
    for _ in range(iterations):
        negatives, _ = negative_phase_samples(target, LinearTwist(table, theta), n, g)
        theta, _ = project_twist(theta, states, None, pi.probs, 0.0, 200, negatives)
    return float((mass * (theta - exact).abs()).sum() / mass.sum())


def test_sampled_projection_converges_to_the_enumerated_solution() -> None:
    """Fed the exact target law as positives, the enumerated projection returns log V
    (test_twists.py); with sampled normalisers the error shrinks as N grows."""
    small = _projection_error(256, 1)
    large = _projection_error(4096, 1)
    assert large < 0.6 * small, (small, large)
    assert large < 0.1, large


def test_tri_tsmc_with_sampled_negative_phase_cuts_the_variance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, table = tri_toy()
    pi = exact_distribution(target)

    def no_enumeration(*args: object, **kwargs: object) -> None:
        raise AssertionError("negative='smc' must not enumerate the normalisers")

    monkeypatch.setattr(tri_module, "state_tables", no_enumeration)
    start = LinearTwist(table)
    result = tri_tsmc(
        target,
        start,
        generator=gen(0),
        num_iterations=8,
        num_paths=384,
        step_size=0.5,
        negative="smc",
    )
    assert result.history[-1].ess_fraction > 3 * result.history[0].ess_fraction

    tv0, tv1 = tv(twist_law(target, start), pi), tv(twist_law(target, result.twist), pi)
    assert tv1 < tv0 / 2.5, (tv0, tv1)
    spreads = checked_log_z_spreads(target, (start, result.twist), pi.log_z)
    assert spreads[1] < spreads[0] / 2.5, spreads


def test_bad_negative_phase_parameters_name_themselves() -> None:
    target, table = tri_toy()
    for kwargs, name in (
        ({"negative": "sampled"}, "negative"),
        ({"negative": "smc", "prox": 0.0}, "prox"),
        ({"negative": "smc", "num_negative": 0}, "num_negative"),
    ):
        with pytest.raises(ValueError, match=name):
            tri_tsmc(target, LinearTwist(table), generator=gen(0), **kwargs)
