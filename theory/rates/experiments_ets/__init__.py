r"""Rate experiments of ETS (``specs/ets.md`` §8–§9, §11) on exact output laws.

Every TV below is between the **exact** output law of the sampler as implemented
(:func:`~tiltsample.theory.ets_laws.ets_law_sweep`: the guidance steps composed over the prefix
tree, each step a 1-D quadrature) and the exact target — no sampling noise, so rates are resolved
to ``1e-6`` and below. Keys follow issue 5:

``a``  TV vs ``M`` at fixed ``I`` with exact energies: fitted slope (paper needs ``<= −1/2``, SIR
       theory predicts ``−1``) against Prop. 3 as published (minimised over ``eps``), Prop. 3 with
       the Lemma 2 slip corrected, and the ``(1/M) Σ_i E_{p*}[ρ̂_i]`` bound of §8.2.
``b``  TV vs ``M`` at each ``K`` with Monte-Carlo energies, and TV vs ``K`` at the largest ``M``:
       is there a floor ``∝ I/√K`` (Prop. 3 with the Prop. 4 radius), or none?
``c``  TV vs ``I`` at fixed ``(M, K)``: linear (Remark 2), flat or non-monotone?
``d``  ETS-IS with perturbed proposals of known likelihood-ratio bound ``L``: TV vs ``K`` and ``L``
       against Theorem 1 (minimised over ``eps``) and the ``ρ̂/M`` bound.
``f``  The reference code's deviations (§11): clipping of the IS log-ratio (exact finite-``M``
       law), the IS ratio over the candidate block and the temperature mismatch (exact ``M → ∞``
       limit laws), the majority-vote reward (not a fixed target: not measurable as a TV).
``g``  Generated tokens of the ``ets`` sampler vs the cost formula ``M(1 + K(I − 1)/2)d``.

Modules: :mod:`~.common` (toys, exact quantities, plot helpers), :mod:`~.convergence` (a–c),
:mod:`~.importance` (d), :mod:`~.deviations` (f), :mod:`~.cost` (g).
"""

from __future__ import annotations

from tiltsample.theory.rates.experiments_ets.convergence import (
    ets_tv_vs_i,
    ets_tv_vs_k,
    ets_tv_vs_m_exact,
)
from tiltsample.theory.rates.experiments_ets.cost import ets_cost
from tiltsample.theory.rates.experiments_ets.deviations import ets_reference_deviations
from tiltsample.theory.rates.experiments_ets.importance import ets_is, likelihood_ratio_bound

__all__ = [
    "ets_cost",
    "ets_is",
    "ets_reference_deviations",
    "ets_tv_vs_i",
    "ets_tv_vs_k",
    "ets_tv_vs_m_exact",
    "likelihood_ratio_bound",
]
