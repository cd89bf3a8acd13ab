r"""Exact laws of ETS (one guidance step and the whole chain), and Rao–Blackwellised estimates.

One guidance step from a state ``x`` is SIR on the extended space (candidate ``c``, rollouts
``z_1..z_K``): ``M`` i.i.d. candidates ``c ~ q(· | x)``, each with the random positive weight

.. math::

    W_c = a_c\,\hat{\mathcal E}(c), \qquad a_c = \frac{p_{ref}(c \mid x)}{q(c \mid x)}, \qquad
    \hat{\mathcal E}(c) = \frac1K \sum_{k=1}^K Y_k,

    Y_k = \rho(z_k)\, e^{\mathrm{log\_tilt}(z_k)}, \qquad z_k \sim q_{roll}(\cdot \mid c),

and one index drawn with probability ``W_m / Σ_j W_j``. (A complete candidate has the point mass
``Y = e^{log_tilt(c)}``; with oracle energies ``Y = E(c)`` is a point mass too.) With
``1/(a + S) = ∫_0^∞ e^{-u(a + S)} du`` and independence of the ``M`` extended draws
(``specs/ets.md`` §9),

.. math::

    P(\text{select } c) = M\, q(c) \int_0^\infty \mathbb E\big[W_c e^{-u W_c}\big]\,
        \varphi(u)^{M-1}\, du,
    \qquad \varphi(u) = \sum_{c'} q(c')\, \mathbb E\big[e^{-u W_{c'}}\big].

Because ``Ŵ`` is a mean of ``K`` i.i.d. ``Y``, both expectations factorise through the Laplace
transform ``ψ_c(v) = E[e^{-v Y}]`` of one rollout (the analysis extension of §9: it replaces the
binomial sum of the spec, which only covers binary rewards, by an exact formula for any reward
and any IS ratio)

.. math::

    \mathbb E[e^{-u W_c}] = \psi_c(u a_c / K)^K, \qquad
    \mathbb E[W_c e^{-u W_c}] = a_c\, \psi_c(u a_c / K)^{K-1}\,
        \mathbb E\big[Y e^{-u a_c Y / K}\big].

The integral is taken in ``s = log u`` on a uniform grid (trapezoid; the integrand is entire
and decays like ``e^s`` on the left and doubly exponentially on the right, so the error is
``≈ e^{-π²/h}``), with all weights rescaled by their maximum and every transform in log space
(``log1p`` where ``1 − ψ`` is small), so ``lam = 1e-3`` neither overflows nor loses the mass
near ``u = 0``. The probabilities are those of a *successful* selection; the failure event (all
``M`` weights zero, probability ``P_0^M``) is returned separately, and the sum is checked against
``1 − P_0^M`` (``RuntimeError`` beyond ``1e-9``).

The chain's output law composes the steps over the prefix tree,
``q_i(x') = Σ_x q_{i−1}(x) P_x(select x')`` (§9), with no sampling noise; it is returned
conditional on success, the law :meth:`~tiltsample.results.SampleSet.empirical` estimates.

Everything is the law of the sampler **as implemented** in :mod:`tiltsample.samplers.ets`:
candidates from ``p_ref`` at ``temperature`` with EOS forced at the cap under
``truncation="condition"``, complete candidates scored exactly, rollouts from ``p_ref`` or from a
``proposal`` at ``proposal_temperature`` with the exact ratio over rollout tokens, optional
clipping of the log-ratio. Masked-diffusion targets need a toy policy with exact ``transitions``
and ``completion_law`` (:class:`~tiltsample.targets.masked_diffusion.MaskedDiffusionToy`).

Modules: :mod:`~.quadrature` (the SIR selection integral), :mod:`~.models` (the exact one-step
models), :mod:`~.steps` (step and chain laws, brute force), :mod:`~.reference` (the reference
code's ratios), :mod:`~.estimates` (laws of the energy estimates), :mod:`~.comparison` (the target
law and the Rao–Blackwellised estimate).
"""

from __future__ import annotations

from tiltsample.theory.ets_laws.comparison import rao_blackwell_law, tilted_law
from tiltsample.theory.ets_laws.estimates import (
    EnergyEstimateLaw,
    MeanLaw,
    energy_estimate_laws,
)
from tiltsample.theory.ets_laws.models import ENERGIES
from tiltsample.theory.ets_laws.quadrature import DEFAULT_GRID_STEP, sir_select_log_probs
from tiltsample.theory.ets_laws.reference import ets_law_reference
from tiltsample.theory.ets_laws.steps import (
    MAX_BRUTEFORCE,
    ETSLaw,
    StepLaw,
    ets_law,
    ets_law_sweep,
    ets_step_law,
    ets_step_law_bruteforce,
)

__all__ = [
    "DEFAULT_GRID_STEP",
    "ENERGIES",
    "MAX_BRUTEFORCE",
    "ETSLaw",
    "EnergyEstimateLaw",
    "MeanLaw",
    "StepLaw",
    "energy_estimate_laws",
    "ets_law",
    "ets_law_reference",
    "ets_law_sweep",
    "ets_step_law",
    "ets_step_law_bruteforce",
    "rao_blackwell_law",
    "sir_select_log_probs",
    "tilted_law",
]
