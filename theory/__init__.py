"""Exact ground truth on enumerable toys (published as ``tiltsample.theory``).

* :mod:`~tiltsample.theory.enumerate` — the exact tilted target: support, ``log Z``, exact draws.
* :mod:`~tiltsample.theory.energies` — exact energies ``E[exp(log_tilt) | prefix]`` of every
  prefix, the exact twist as a prefix potential, and the optimal next-token kernel.
* :mod:`~tiltsample.theory.distances` — TV, KL, chi-square and the i.i.d. TV noise floor.
* :mod:`~tiltsample.theory.laws` — exact output laws of ancestral sampling, SIR / soft best-of-N
  (the 1-D quadrature of ``specs/ets.md`` §9) and argmax best-of-N, with brute-force checks.

Nothing here imports matplotlib or transformers.
"""

from __future__ import annotations

from tiltsample.theory.distances import (
    Law,
    as_law,
    chi2,
    expected_tv_iid,
    expected_tv_iid_bruteforce,
    kl,
    tv,
    tv_noise_floor,
)
from tiltsample.theory.energies import (
    ExactEnergies,
    ExactPotential,
    exact_energies,
    optimal_next_token_logprobs,
)
from tiltsample.theory.enumerate import ExactDistribution, exact_distribution
from tiltsample.theory.ets_laws import (
    EnergyEstimateLaw,
    ETSLaw,
    MeanLaw,
    StepLaw,
    energy_estimate_laws,
    ets_law,
    ets_law_reference,
    ets_law_sweep,
    ets_step_law,
    rao_blackwell_law,
    tilted_law,
)
from tiltsample.theory.laws import (
    ProposalLaw,
    ancestral_law,
    best_of_n_law,
    best_of_n_law_bruteforce,
    imh_law,
    importance_log_weights,
    proposal_law,
    sir_law,
    sir_law_bruteforce,
)
from tiltsample.theory.mh_kernels import (
    decision_trace_mixing_time,
    detailed_balance_error,
    law_after,
    mh_kernel,
    mixing_time,
    spectral_gap,
    stage_schedule_law,
    stationarity_error,
    tv_curve,
)

__all__ = [
    "ETSLaw",
    "EnergyEstimateLaw",
    "ExactDistribution",
    "ExactEnergies",
    "ExactPotential",
    "Law",
    "MeanLaw",
    "ProposalLaw",
    "StepLaw",
    "ancestral_law",
    "as_law",
    "best_of_n_law",
    "best_of_n_law_bruteforce",
    "chi2",
    "decision_trace_mixing_time",
    "detailed_balance_error",
    "energy_estimate_laws",
    "ets_law",
    "ets_law_reference",
    "ets_law_sweep",
    "ets_step_law",
    "exact_distribution",
    "exact_energies",
    "expected_tv_iid",
    "expected_tv_iid_bruteforce",
    "imh_law",
    "importance_log_weights",
    "kl",
    "law_after",
    "mh_kernel",
    "mixing_time",
    "optimal_next_token_logprobs",
    "proposal_law",
    "rao_blackwell_law",
    "sir_law",
    "sir_law_bruteforce",
    "spectral_gap",
    "stage_schedule_law",
    "stationarity_error",
    "tilted_law",
    "tv",
    "tv_curve",
    "tv_noise_floor",
]
