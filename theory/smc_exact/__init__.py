r"""Exact quantities of the SMC samplers on enumerable toys (``specs/smc.md`` §2, §8, §9).

* :func:`prefix_log_probs` — ``log p_ref(s)`` of every reachable prefix (incomplete and complete).
* :func:`intermediate_law` — the exact intermediate target ``gamma_t`` of SMC at length ``t``,
  over the *stopped* state space with cap ``t``: complete responses of length ``<= t`` weigh
  ``p(x) G(x)``, incomplete prefixes of length ``t`` weigh ``p(s) psi(s)``. Resample-move must
  leave it invariant.
* :func:`move_kernel` — the exact transition matrix of one resample-move MH move over the stopped
  states of ``gamma_t`` (uniform or entropy-jump cuts, with or without the cut-law correction;
  the sampler's status-keeping kernel or the EOS-reopening one it replaced).
* :func:`resample_move_law` — the exact weighted law ``E[Ẑ/Z · 1{x}]`` of one-particle SMC with
  moves after every block (``pi`` exactly when the schedule is invariant), and of the biased
  schedule of the past (``legacy=True``).
* :func:`twisted_proposal_law` — the path law of the twist-induced (locally optimal) proposal
  ``q_psi(v | s) ∝ p(v | s) psi(s + v)``, the sampler's law with one particle; with the exact twist
  it is ``pi``.
* :func:`evidence_weighted_law` — ``(1/R) sum_r (Ẑ_r/Z) W_r``: the particle law of ``R`` runs
  weighted by their evidence, **unbiased** for ``pi`` at every ``N`` (``E[Ẑ_N pî_N] = Z pi``), so
  its distance to ``pi`` is sampling noise only (no ``O(1/N)`` self-normalisation bias).
* :func:`diffusion_target_law`, :class:`ExactStatePotential` — the exact target and the exact
  state energies of a masked-diffusion toy (FK steering's optimal intermediate potentials).
* :func:`one_particle_bounds` — the two sides of the sandwich at ``N = 1``:
  ``E_SMC[log Ẑ] = log Z - KL(q ‖ pi)`` and ``E_pi[log Ẑ_CSMC] = log Z + KL(pi ‖ q)``, ``q`` the
  proposal's path law (twists telescope with one particle, so neither depends on the twist).

* :func:`best_of_n_law` — the exact law of the best-of-``N`` selection (first maximiser of the
  log-tilt among ``N`` i.i.d. draws of ``p_ref``), what FK steering's ``bon`` output follows.
* :func:`ancestor_law`, :func:`conditional_ancestor_law` — the exact law of the ancestor vector of
  every resampling scheme (symmetrised: uniform input order and output slots, as the conditional
  schemes of :mod:`tiltsample.resampling` require), and that law given ``A_0 = 0``.

* :func:`spec_toy`, :func:`modes_table`, :func:`sandwich_table` — the measurements of
  ``specs/smc.md`` §14 and §9 (``python -m tiltsample.theory.smc_exact`` prints them; the numbers
  are in ``docs/samplers/smc.md``).

All arithmetic is float64 log space; ``-inf`` marks impossible states, never NaN.

Modules: :mod:`~.prefixes` (prefix log-probs, ``gamma_t``, the twisted proposal's law),
:mod:`~.moves` (the move kernel), :mod:`~.resample_move` (the resample-move weighted law),
:mod:`~.evidence` (the ``N = 1`` sandwich, the evidence-weighted law), :mod:`~.diffusion`
(masked diffusion and best-of-``N``), :mod:`~.ancestors` (resampling laws), :mod:`~.tables`
(the spec's measurements).
"""

from __future__ import annotations

from tiltsample.theory.smc_exact.ancestors import (
    ancestor_law,
    conditional_ancestor_law,
)
from tiltsample.theory.smc_exact.diffusion import (
    ExactStatePotential,
    best_of_n_law,
    diffusion_target_law,
)
from tiltsample.theory.smc_exact.evidence import (
    OneParticleBounds,
    evidence_weighted_law,
    one_particle_bounds,
)
from tiltsample.theory.smc_exact.moves import (
    MoveKernel,
    move_kernel,
)
from tiltsample.theory.smc_exact.prefixes import (
    LogTwist,
    intermediate_law,
    prefix_log_probs,
    twist_log_values,
    twisted_proposal_law,
)
from tiltsample.theory.smc_exact.resample_move import (
    resample_move_law,
)
from tiltsample.theory.smc_exact.tables import (
    modes_table,
    sandwich_table,
    spec_toy,
)

__all__ = [
    "ExactStatePotential",
    "LogTwist",
    "MoveKernel",
    "OneParticleBounds",
    "ancestor_law",
    "best_of_n_law",
    "conditional_ancestor_law",
    "diffusion_target_law",
    "evidence_weighted_law",
    "intermediate_law",
    "modes_table",
    "move_kernel",
    "one_particle_bounds",
    "prefix_log_probs",
    "resample_move_law",
    "sandwich_table",
    "spec_toy",
    "twist_log_values",
    "twisted_proposal_law",
]
