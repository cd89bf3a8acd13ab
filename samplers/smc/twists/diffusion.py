r"""Learned twists for masked-diffusion FK steering (``specs/smc.md`` §10, TRI-TSMC).

The masked-diffusion counterpart of :class:`~tiltsample.samplers.smc.twists.LinearTwist` and
:func:`~tiltsample.samplers.smc.twists.tri_tsmc`.

Family
    :class:`LinearStateTwist`: ``log psi_theta(s) = theta · phi(s)`` for partially masked states
    ``s`` (a :class:`~tiltsample.diffusion.StatePotential`, deterministic and free), plugged into
    :mod:`tiltsample.samplers.smc.fk_steering` as the
    ``estimator`` with the difference potential, so
    the FK twist is ``psi_k = psi_theta(s_k)`` and ``G`` at the end. :class:`StateTable` is the
    saturated (one-hot) family over every state the base sampler reaches on an enumerable toy.
Twisted marginals
    After step ``k < T`` the FK model's intermediate target is
    ``sigma_k^theta(s) ∝ p_k(s) psi_theta(s)``, ``p_k`` the base sampler's law of the state after
    ``k`` steps. Unlike the autoregressive case no complete state exists before ``T``, so the
    scale of ``psi`` at each ``k`` is free — and irrelevant: a constant ``c_k`` multiplies every
    particle's weight at step ``k`` and the constants telescope in ``Ẑ`` (``psi_0 = 1``,
    ``psi_T = G``). The ridge ``l2`` fixes it. The optimum over a saturated family is
    ``psi ∝ V_k = E[G | s_k]`` (the exact state energies).
Iteration (:func:`learn_state_twist`)
    1. ``M`` paths of the twisted path measure ``Q_k`` (FK's guided proposal with the current
       twist, no resampling), their log-weights ``log p G / Q_k`` and every intermediate state;
    2. tempered weights ``W ∝ w^beta`` (the trust-region step of TRI-TSMC);
    3. weighted maximum likelihood of the twisted marginals, with the normalisers replaced by the
       sampled surrogate of :func:`tiltsample.samplers.smc.twists.tri_tsmc` (``negative="smc"``):
       one FK run with the base proposal and the current twist gives weighted particles of every
       ``sigma_k^{theta_k}``; the objective uses ``log sum_i W_i^k exp((theta - theta_k)·phi_i^k)``
       plus ``prox |theta - theta_k|^2``. Nothing is enumerated (beyond the guided proposal's
       one-step transitions, which need ``transitions(state, step)``).

Analysis, not from the paper: TRI-TSMC's parameterisation on masked states is unconfirmed
(``specs/smc.md`` §10); this is our construction, verified on the toy against the exact energies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample.diffusion import initial_states
from tiltsample.samplers.smc.twists.learned import LinearFamily, OneHotTable
from tiltsample.samplers.smc.twists.tri import (
    ess_fraction,
    tempered_path_weights,
    tri_parameters,
)
from tiltsample.samplers.smc.twists.tri_objective import project_twist
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "LinearStateTwist",
    "StateTable",
    "StateTwistResult",
    "learn_state_twist",
]

StateFeatures = Callable[[Tensor], Tensor]
"""``features(states [B, L]) -> Tensor[B, F]`` (float64)."""


class StateTable(OneHotTable):
    """One-hot features over a fixed list of partially masked states (the saturated family)."""

    unit = "states"

    def __init__(self, states: Sequence[Seq]) -> None:
        keys = sorted({tuple(int(t) for t in s) for s in states})
        super().__init__(keys)
        self.states: list[Seq] = keys

    @classmethod
    def from_target(cls, target: TiltedTarget) -> StateTable:
        """Every state the base sampler reaches after ``1..T-1`` steps (enumerable toys)."""
        policy: Any = target.policy
        if not callable(getattr(policy, "transitions", None)):
            raise TypeError("StateTable.from_target needs a policy with transitions(state, step)")
        layer = {tuple(int(t) for t in initial_states(policy, 1)[0].tolist())}
        found: set[Seq] = set()
        for step in range(int(policy.num_steps) - 1):
            nxt: set[Seq] = set()
            for s in layer:
                for child, lp in policy.transitions(s, step):
                    if lp > -math.inf:
                        nxt.add(tuple(child))
            found |= nxt
            layer = nxt
        return cls(sorted(found))

    def __call__(self, states: Tensor) -> Tensor:
        return self.one_hot(states.tolist())


class LinearStateTwist(LinearFamily):
    """``log psi_theta(s) = theta · phi(s)``: a deterministic, free ``StatePotential``.

    Parameters (checked by :class:`~tiltsample.samplers.smc.twists.LinearFamily`): ``features``, a
    :data:`StateFeatures` map (e.g. :class:`StateTable`), and ``theta`` (default zeros).
    """

    features_call = "features(states)"
    features: StateFeatures

    def log_potential_states(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        return self._linear(self.features(states), int(states.shape[0])), Cost()


class StateTwistStep(NamedTuple):
    iteration: int
    ess_fraction: float
    """Kong ESS / M of the untempered path weights ``pi / Q_theta``."""
    objective: float


class StateTwistResult(NamedTuple):
    twist: LinearStateTwist
    history: list[StateTwistStep]
    cost: Cost


def _trajectories(
    target: TiltedTarget,
    twist: LinearStateTwist,
    m: int,
    generator: torch.Generator,
    proposal: str,
    ess_threshold: float,
) -> tuple[list[Tensor], list[Tensor], Tensor, Cost]:
    """Run FK one step at a time: per intermediate step the states and normalised log-weights;
    the final log-weights; the cost."""
    from tiltsample.samplers.smc.fk_model import done, init
    from tiltsample.samplers.smc.fk_steering import build_kernel

    step = build_kernel(estimator=twist, proposal=proposal, ess_threshold=ess_threshold)
    state = init(target, generator=generator, num_particles=m)
    states: list[Tensor] = []
    log_ws: list[Tensor] = []
    while not done(state):
        state, _ = step(generator, state)
        if not done(state):
            states.append(state.states.clone())
            log_ws.append(state.log_w - torch.logsumexp(state.log_w, 0))
    return states, log_ws, state.log_w.clone(), state.cost


def learn_state_twist(
    target: TiltedTarget,
    twist: LinearStateTwist,
    *,
    generator: torch.Generator,
    num_iterations: int = 5,
    num_paths: int = 256,
    step_size: float = 0.5,
    l2: float = 1e-3,
    num_negative: int | None = None,
    prox: float = 0.05,
    max_iter: int = 200,
) -> StateTwistResult:
    """TRI-TSMC on masked-diffusion states (module docstring); returns the learned twist.

    Parameters as in :func:`tiltsample.samplers.smc.twists.tri_tsmc` with ``negative="smc"``; the
    policy must enumerate one denoising step (the guided proposal draws the paths).
    """
    if not isinstance(twist, LinearStateTwist):
        raise TypeError(f"twist must be a LinearStateTwist, got {type(twist).__name__}")
    iterations, m, beta, l2, max_iter, m_neg, prox = tri_parameters(
        generator, num_iterations, num_paths, step_size, l2, max_iter, num_negative, prox
    )
    history: list[StateTwistStep] = []
    cost = Cost()
    current = twist
    for k in range(iterations):
        paths, _, log_w, c1 = _trajectories(target, current, m, generator, "guided", 0.0)
        weights = tempered_path_weights(log_w, beta)
        rows = torch.arange(m)
        positives = [(rows, current.features(s).to(torch.float64)) for s in paths]
        neg_states, neg_w, _, c2 = _trajectories(target, current, m_neg, generator, "base", 0.5)
        negatives = [
            (lw, current.features(s).to(torch.float64))
            for s, lw in zip(neg_states, neg_w, strict=True)
        ]
        cost = cost + c1 + c2
        theta, value = project_twist(
            current.theta, positives, None, weights, float(l2), max_iter, negatives, prox
        )
        history.append(StateTwistStep(k, ess_fraction(log_w), value))
        current = current.with_theta(theta)
    return StateTwistResult(current, history, cost)
