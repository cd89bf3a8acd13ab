r"""The projection step of TRI-TSMC: the weighted maximum likelihood of the twisted intermediate
marginals over a linear twist family, with exact normalisers (enumeration) or the sampled
surrogate (one SMC run per iteration), minimised by L-BFGS (:func:`project_twist`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.samplers.smc.twists.learned import FeatureMap, LinearTwist
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "NegativeSamples",
    "PathStates",
    "StateTables",
    "negative_phase_samples",
    "path_states",
    "project_twist",
    "state_tables",
]

StateTables = list[tuple[Tensor, Tensor, Tensor]]
"""Per length ``t``: features and ``log p`` of the incomplete states, ``log p G`` of the complete
ones (:func:`state_tables`)."""
PathStates = list[tuple[Tensor, Tensor]]
"""Per length ``t``: rows of the paths still incomplete at ``t`` and their features
(:func:`path_states`)."""


def state_tables(target: TiltedTarget, features: FeatureMap) -> StateTables:
    """Per length ``t``: (features of incomplete states, their log p, log p G of complete states).

    The exact normaliser ``Z_t(theta)`` of the twisted marginal at ``t`` sums ``p(s) psi(s)`` over
    incomplete prefixes of length ``t`` and ``p(x) G(x)`` over complete responses of length
    ``<= t`` (enumerable toys only).
    """
    from tiltsample.enumeration import enumerate_target

    enum = enumerate_target(target)
    support = enum.support
    per = target.policy.sequence_logprob(target.prompt, support, per_token=True).to(torch.float64)
    cum = torch.cumsum(per, dim=1)
    log_p: dict[Seq, float] = {}
    for i, x in enumerate(support):
        for t in range(1, len(x)):
            log_p.setdefault(x[:t], float(cum[i, t - 1]))
    complete_lengths = torch.tensor([len(x) for x in support], dtype=torch.long)
    complete_logd = enum.log_density
    out = []
    for t in range(1, target.max_new_tokens + 1):
        inc = [s for s in log_p if len(s) == t and not target.is_complete(s)]
        lp = torch.tensor([log_p[s] for s in inc], dtype=torch.float64)
        phi = (
            features(inc, lp).to(torch.float64) if inc else torch.zeros((0, 0), dtype=torch.float64)
        )
        comp = complete_logd[complete_lengths <= t]
        out.append((phi, lp, comp))
    return out


def path_states(target: TiltedTarget, paths: Sequence[Seq], features: FeatureMap) -> PathStates:
    """Per length ``t``: (rows of the paths still incomplete at ``t``, their features).

    The features get the prefixes' true ``log p_ref`` (one teacher-forced call for all paths).
    """
    out = []
    cum = torch.zeros((len(paths), 0), dtype=torch.float64)
    if paths:
        per = target.policy.sequence_logprob(target.prompt, list(paths), per_token=True)
        cum = torch.cumsum(per.to(torch.float64), dim=1)
    for t in range(1, target.max_new_tokens + 1):
        rows = [
            i
            for i, x in enumerate(paths)
            if len(x) > t or (len(x) == t and not target.is_complete(x))
        ]
        prefixes = [paths[i][:t] for i in rows]
        lp = cum[rows, t - 1] if rows else torch.zeros(0, dtype=torch.float64)
        phi = (
            features(prefixes, lp).to(torch.float64)
            if rows
            else torch.zeros((0, 0), dtype=torch.float64)
        )
        out.append((torch.tensor(rows, dtype=torch.long), phi))
    return out


def _objective(
    theta: Tensor,
    states: PathStates,
    tables: StateTables,
    weights: Tensor,
    l2: float,
) -> Tensor:
    """Weighted negative log-likelihood of the twisted marginals (plus the ridge penalty)."""
    total = l2 * (theta * theta).sum()
    for (rows, phi_paths), (phi_all, lp_all, comp) in zip(states, tables, strict=True):
        if phi_all.shape[0] == 0:
            continue  # no incomplete state at this length: Z_t does not depend on theta
        log_z_t = torch.logsumexp(torch.cat([lp_all + phi_all @ theta, comp]), 0)
        if rows.numel():
            total = total - (weights[rows] * (phi_paths @ theta)).sum()
        total = total + log_z_t  # the weights sum to one
    return total


NegativeSamples = list[tuple[Tensor, Tensor]]
"""Per length ``t``: (``[n]`` normalised log-weights of SMC particles targeting the twisted
marginal ``sigma_t^{theta_k}``, ``[n, F]`` their features, zero rows for complete particles)."""


def negative_phase_samples(
    target: TiltedTarget,
    twist: LinearTwist,
    num_particles: int,
    generator: torch.Generator,
    ess_threshold: float = 0.5,
) -> tuple[NegativeSamples, Cost]:
    r"""Weighted particles of every twisted marginal ``sigma_t^theta`` from one SMC run.

    SMC with the twist ``psi_theta``, the ``p_ref`` proposal, one token per step and adaptive
    resampling has the intermediate target ``gamma_t = p(s) psi_theta(s)`` (incomplete ``s`` of
    length ``t``) / ``p(x) G(x)`` (complete ``|x| <= t``), i.e. ``sigma_t^theta`` up to its
    normaliser: after step ``t`` its weighted particles (equally weighted right after a
    resampling) estimate ``E_{sigma_t}[f]`` consistently, with ``O(1/N)`` bias. No enumeration:
    the cost is one SMC run, whatever the size of the state space.
    """
    from tiltsample.samplers.smc.algorithm import build_kernel
    from tiltsample.samplers.smc.state import done, init

    state = init(target, generator=generator, num_particles=num_particles)
    step = build_kernel(twist=twist, ess_threshold=ess_threshold)
    out: NegativeSamples = []
    width = twist.theta.numel()
    while not done(state):
        state, _ = step(generator, state)
        log_w = state.log_w - torch.logsumexp(state.log_w, 0)
        live = (~state.finished).nonzero().flatten()
        phi = torch.zeros((num_particles, width), dtype=torch.float64)
        if live.numel():
            tokens = state.session.tokens()[live]
            prefixes = [tuple(int(v) for v in row) for row in tokens.tolist()]
            phi[live] = twist.features(prefixes, state.log_p[live]).to(torch.float64)
        out.append((log_w, phi))
    while len(out) < target.max_new_tokens:  # every particle finished early: constant terms
        out.append((out[-1][0], torch.zeros((num_particles, width), dtype=torch.float64)))
    return out, state.cost


def _objective_sampled(
    theta: Tensor,
    theta_k: Tensor,
    states: PathStates,
    negatives: NegativeSamples,
    weights: Tensor,
    l2: float,
    prox: float,
) -> Tensor:
    """:func:`_objective` with ``log Z_t(theta) - log Z_t(theta_k)`` replaced by its
    self-normalised importance estimate ``log sum_i W_i^t exp((theta - theta_k) · phi_i^t)``
    over particles of ``sigma_t^{theta_k}`` (its gradient is the sampled negative phase), plus
    the proximal term ``prox |theta - theta_k|^2`` that keeps the step where the importance
    estimate holds (it vanishes at a fixed point)."""
    delta = theta - theta_k
    total = l2 * (theta * theta).sum() + prox * (delta * delta).sum()
    for (rows, phi_paths), (log_w, phi_neg) in zip(states, negatives, strict=True):
        if rows.numel():
            total = total - (weights[rows] * (phi_paths @ theta)).sum()
        total = total + torch.logsumexp(log_w + phi_neg @ delta, 0)
    return total


def project_twist(
    theta0: Tensor,
    states: PathStates,
    tables: StateTables | None,
    weights: Tensor,
    l2: float,
    max_iter: int,
    negatives: NegativeSamples | None = None,
    prox: float = 0.05,
) -> tuple[Tensor, float]:
    """``argmin_theta`` of :func:`_objective` by L-BFGS (strong Wolfe line search, float64).

    With ``negatives`` (and ``tables=None``) the normalisers are the sampled surrogate of
    :func:`_objective_sampled` around ``theta0``.
    """
    theta_k = theta0.detach().clone()

    def objective(th: Tensor) -> Tensor:
        if negatives is not None:
            return _objective_sampled(th, theta_k, states, negatives, weights, l2, prox)
        assert tables is not None
        return _objective(th, states, tables, weights, l2)

    theta = theta0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [theta],
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        value = float(objective(theta))
    return theta.detach().clone(), value
