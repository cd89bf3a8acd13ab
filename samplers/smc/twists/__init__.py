r"""Twist families for the SMC samplers (``specs/smc.md`` §2–§3, §11).

SMC for ``pi(x) ∝ p(x) G(x)`` moves through intermediate targets
``gamma_t(x_{1:t}) = p(x_{1:t}) · psi_t(x_{1:t})`` whose *twists* satisfy ``psi_0 = 1`` and
``psi = G`` on complete responses. The SMC samplers always replace the twist of a complete response
by the true tilt ``G`` (``specs/smc.md`` §6 rule 6), so a twist is only ever asked about
**incomplete** prefixes, and it can be anything positive: its quality changes the variance, never
the final target.

A :class:`Twist` answers two questions about a batch of incomplete prefixes ``s``:

``log_twist``
    ``log psi(s)`` (``[B]``).
``log_twist_children``
    ``log psi(s + v)`` for every token ``v`` at once (``[B, V]``), the vocabulary-wide twist vector
    needed by the twist-induced (locally optimal) proposal ``q(v | s) ∝ p(v | s) psi(s + v)``
    (``specs/smc.md`` §11). The default expands the children with ``p(v | s) > 0`` and calls
    ``log_twist`` on them; analytic twists override it. Entries of children that are complete
    (EOS, or the length cap) are ignored by the caller, which uses ``G`` there.

Both may be random (a particle stores the value it drew and reuses it in the next weight, so the
twists telescope and the final target stays exact, ``specs/smc.md`` §3) and report their
:class:`~tiltsample.types.Cost`.

Families
--------
:class:`NoTwist` (``twist="none"``)
    ``psi = 1`` until completion: importance sampling with a final reweighting.
:class:`PrefixTilt` (``twist="prefix"``)
    The tilt factors already determined by the prefix: every tilt term that is a multiple of
    ``log p_ref`` (the power tilt ``(alpha - 1) log p``, additive over tokens) contributes
    ``scale · log p_ref(s)``, plus an optional user :class:`~tiltsample.reward.PrefixPotential` of
    the reward seen so far. For a reward defined on complete responses only this is ``psi = 1``.
:class:`LookaheadTwist` (``twist="lookahead"``)
    Any :class:`~tiltsample.reward.PrefixPotential` estimate of ``log E_p[G | s]``: the exact one
    (``tiltsample.theory.ExactPotential``), ETS's K-rollout estimator, or a learned twist.
:class:`LogNormalNoise`
    Wraps a potential into a noisy but **unbiased** estimator
    ``V̂ = V · exp(sigma ε − sigma²/2)``, ``ε ~ N(0, 1)``: the test bed for random twists.
:class:`LinearTwist`, :func:`tri_tsmc` (learned twists)
    A parametric family ``log psi_theta(s) = theta · phi(s)`` and the TRI-TSMC iteration
    (tempered importance reweighting of the current twisted path measure, then a weighted
    maximum-likelihood projection onto the family).
:class:`LinearStateTwist`, :func:`learn_state_twist` (masked diffusion)
    The same for FK steering's partially masked states.

Modules
-------
:mod:`~.base` (the contract and shared helpers), :mod:`~.prefix`, :mod:`~.lookahead`,
:mod:`~.factory` (``twist=`` by name), :mod:`~.learned` (linear families), :mod:`~.tri` and
:mod:`~.tri_objective` (TRI-TSMC), :mod:`~.diffusion` (learned twists of masked-diffusion
states).

References
----------
Zhao, Brekelmans, Makhzani & Grosse, *Probabilistic Inference in Language Models via Twisted SMC*,
arXiv 2404.17546 (2024). Lew et al., arXiv 2306.03081 (2023). Wang, Yang, Deng & Xu (TRI-TSMC),
arXiv 2605.25123.
"""

from __future__ import annotations

from tiltsample.samplers.smc.twists.base import (
    Twist,
    apply_floor,
    check_floor,
    check_twist_output,
    power_exponent,
    power_log_tilt,
    scaled_log,
)
from tiltsample.samplers.smc.twists.diffusion import (
    LinearStateTwist,
    StateFeatures,
    StateTable,
    StateTwistResult,
    StateTwistStep,
    learn_state_twist,
)
from tiltsample.samplers.smc.twists.factory import (
    TWIST_NAMES,
    make_twist,
)
from tiltsample.samplers.smc.twists.learned import (
    FeatureMap,
    LinearFamily,
    LinearTwist,
    OneHotTable,
    PrefixTable,
)
from tiltsample.samplers.smc.twists.lookahead import (
    LogNormalNoise,
    LookaheadTwist,
    RolloutTwist,
)
from tiltsample.samplers.smc.twists.prefix import (
    NoTwist,
    PrefixTilt,
)
from tiltsample.samplers.smc.twists.tri import (
    NEGATIVE_PHASES,
    TRIParameters,
    TRIResult,
    TRIStep,
    ess_fraction,
    tempered_path_weights,
    tri_parameters,
    tri_tsmc,
)
from tiltsample.samplers.smc.twists.tri_objective import (
    NegativeSamples,
    PathStates,
    StateTables,
    negative_phase_samples,
    path_states,
    project_twist,
    state_tables,
)

__all__ = [
    "NEGATIVE_PHASES",
    "TWIST_NAMES",
    "FeatureMap",
    "LinearFamily",
    "LinearStateTwist",
    "LinearTwist",
    "LogNormalNoise",
    "LookaheadTwist",
    "NegativeSamples",
    "NoTwist",
    "OneHotTable",
    "PathStates",
    "PrefixTable",
    "PrefixTilt",
    "RolloutTwist",
    "StateFeatures",
    "StateTable",
    "StateTables",
    "StateTwistResult",
    "StateTwistStep",
    "TRIParameters",
    "TRIResult",
    "TRIStep",
    "Twist",
    "apply_floor",
    "check_floor",
    "check_twist_output",
    "ess_fraction",
    "learn_state_twist",
    "make_twist",
    "negative_phase_samples",
    "path_states",
    "power_exponent",
    "power_log_tilt",
    "project_twist",
    "scaled_log",
    "state_tables",
    "tempered_path_weights",
    "tri_parameters",
    "tri_tsmc",
]
