r"""Sequential Monte Carlo for tilted sequence targets (``specs/smc.md``).

Target
    ``pi(x) ∝ p_ref(x) G(x)``, ``G = exp(log_tilt)``, under the target's length convention
    (``truncation="stop"``: EOS or the cap ends a response; ``"condition"``: only EOS-terminated
    responses, EOS forced at the last position with the factor ``p_ref(EOS | x_<L)`` in the weight).
Intermediate targets
    ``gamma_t(x_{1:t}) = p_ref(x_{1:t}) psi(x_{1:t})`` with a twist ``psi`` from
    :mod:`tiltsample.samplers.smc.twists` (``twist="none" | "prefix" | "lookahead"`` or any
    :class:`~tiltsample.samplers.smc.twists.Twist`); ``psi = G`` on complete responses, always.
Proposal
    ``proposal="reference"``: ``q = softmax(log p_ref / temperature)`` over the full vocabulary
    (``temperature = 1`` is ``p_ref``). ``proposal="optimal"``: the twist-induced, locally optimal
    ``q(v | s) ∝ p_ref(v | s) psi(s + v)`` (it needs the vocabulary-wide twist vector); its
    incremental weight does not depend on the drawn token, so it is computed *before* the draw and
    resampling happens before the next token is drawn (fully adapted).
Weights
    Block steps of ``block_size = B`` tokens; per block and particle (log space)

    .. math::

        \log w \mathrel{+}= \sum_{\text{block}} (\log p - \log q) + \log\psi_{new} - \log\psi_{old}

    (reference proposal), or ``log sum_v p(v | s) psi(s + v) - log psi(s)`` per token (optimal
    proposal). Twist values are drawn once per particle and prefix and stored, so random twists
    telescope and the final target stays exact. Steps without resampling *accumulate* (the
    FK-steering pitfall of §10); finished particles keep their weight and take part in resampling.
Resampling
    Adaptive: in each run, when ``ESS < ess_threshold · N`` (``1`` = every block, ``0`` = never)
    with one of the schemes of :mod:`tiltsample.resampling`; ancestors reorder the decode session
    (``session.select``), so shared prefixes are never re-encoded.
Resample-move
    After every block (a schedule that depends on ``t`` only, whether or not the run resampled),
    ``num_moves`` Metropolis–Hastings moves per unfinished particle that leave the current
    intermediate target ``gamma_t`` invariant. ``gamma_t`` lives on the stopped states (complete
    responses of length ``<= t``, unfinished prefixes of length ``t``); the moves keep that
    status: a finished particle is left as it is, an unfinished one draws its own cut ``j``
    (``move_cut="uniform"``: uniform on ``[0, t)``, the same law for every unfinished particle, so
    it cancels; ``"entropy_jump"``: ``c_x(j) ∝ max(0, H_j - H_{j-1})^beta`` over its ``t``
    positions, ``H_j`` the entropy of ``p_ref(. | x_<j)``), regenerates ``x_{j:t}`` from
    ``q'`` = ``p_ref`` at ``move_temperature`` with EOS removed (renormalised), and accepts with
    ``min(1, gamma_t(x') q'(x_{j:t}) c_{x'}(j) / (gamma_t(x) q'(x'_{j:t}) c_x(j)))``; random
    twists enter as a pseudo-marginal ratio ``psi^(x')/psi^(x)`` with a fresh estimate for
    ``x'`` (§8). The kernel is ``gamma_t``-reversible on each class, so it is invariant whichever
    particles have finished, and since a finished particle never moves again, ending a run when
    all its particles have finished is exact. Moving only after an ESS-triggered resampling, or
    letting a move finish a particle that is then never moved back (the kernel and schedule
    before issue 13), ties the moves to the particles' state and biases the weighted law.
    Cuts and proposals are drawn per particle, so runs sharing a session are independent.
Evidence
    ``log Ẑ = sum_epochs (logsumexp(log w) - log N)``, unbiased for ``Z`` (Del Moral 2004) for any
    scheme, threshold and twist; ``-inf`` (not NaN) when every weight of a run is zero. Two
    equivalent bookkeeping conventions (§6): ``convention="reset"`` (A: add the epoch's log-mean to
    ``log Z`` and reset the weights) and ``"mean"`` (B: set every weight to the log-mean and read
    ``log Ẑ`` at the end).
Exactness
    Consistent (bias and MSE ``O(1/N)``) and unbiased for every configuration, moves included:
    ``E[Ẑ · W(x)] = Z pi(x)`` for every response ``x`` (``W`` the run's normalised weights), hence
    ``E[Ẑ] = Z`` (tested cell by cell on exact toys). With the exact
    twist and the optimal proposal every incremental weight is deterministic and ``log Ẑ = log Z``
    in every run (zero variance).
Cost per block
    ``B`` batched model calls plus, per move, one call per regenerated position for each distinct
    cut and one rewrite of the session from the smallest accepted cut; the twist's cost (per
    incomplete particle per block, per child with ``proposal="optimal"``) and one reward call per
    tilt term per finished particle (per EOS child with the optimal proposal). Resampling costs no
    forward tokens.

Many independent runs can share one session (``num_particles`` per run,
``num_samples / num_particles`` runs): the result then pools the runs with each run's weights
normalised, so its empirical law is the average of the runs' normalised histograms, and
``meta["log_evidence_runs"]`` holds each run's ``log Ẑ``. The runs share no random draw
(resampling uniforms, cuts and proposals are drawn per run or per particle) and never wait on
each other's state, so they are independent and standard errors over them are honest.

The family
    Conditional SMC and particle Gibbs (:mod:`~.csmc`, :mod:`~.particle_gibbs`), the two-sided
    bounds on ``log Z`` (:mod:`~.bounds`), Power-SMC (:mod:`~.power_smc`) and TRI-TSMC as a
    sampler (:mod:`~.tri_tsmc`) are configurations of this engine and share its parameters
    (:class:`~.config.SMCConfig`); twist families, learned ones included, are in
    :mod:`~.twists`. FK steering of masked-diffusion LMs (:mod:`~.fk_steering`, with
    :mod:`~.fk_model` and :mod:`~.fk_steps`) is the same Feynman–Kac construction over
    denoising steps.
Modules
    :mod:`~.config` (the validated parameters), :mod:`~.state` (state, info, per-row arrays,
    ``init``/``done``), :mod:`~.step` (one block step and the resampling decision),
    :mod:`~.proposals` (twists and the locally optimal proposal inside a step), :mod:`~.moves`
    (resample-move), :mod:`~.resampling` (batched and conditional ancestors), :mod:`~.evidence`
    (``log Ẑ`` and the result), :mod:`~.particles` (SMC from given particles), :mod:`~.numerics`
    (log-space helpers), :mod:`~.algorithm` (``build_kernel``, ``run``, ``sampler``),
    :mod:`~.many` (``sample_many``: the runs of several targets batched in one session).

References
----------
Del Moral (2004), *Feynman–Kac formulae*; Chopin & Papaspiliopoulos (2020), *An Introduction to
Sequential Monte Carlo*; Naesseth, Lindsten & Schön (2019); Gilks & Berzuini (2001), resample-move;
Lew et al., arXiv 2306.03081 (2023); Zhao et al., arXiv 2404.17546 (2024); Markovic-Voronov et al.,
arXiv 2604.16453 (2026).
"""

from __future__ import annotations

from tiltsample.samplers.smc.algorithm import (
    build_kernel,
    particles_per_run,
    run,
    sampler,
)
from tiltsample.samplers.smc.config import (
    CONVENTIONS,
    MOVE_CUTS,
    PARAMETERS,
    PROPOSALS,
    SMCConfig,
    conditional_config,
    make_config,
)
from tiltsample.samplers.smc.evidence import (
    log_evidence_runs,
    result,
)
from tiltsample.samplers.smc.many import sample_many
from tiltsample.samplers.smc.particles import (
    rejuvenate,
    state_from_sequences,
)
from tiltsample.samplers.smc.resampling import (
    batched_resample,
    conditional_resample,
    ess_rows,
)
from tiltsample.samplers.smc.state import (
    SMCInfo,
    SMCState,
    done,
    init,
)
from tiltsample.samplers.smc.step import (
    kernel_from_config,
)

__all__ = [
    "CONVENTIONS",
    "MOVE_CUTS",
    "PARAMETERS",
    "PROPOSALS",
    "SMCConfig",
    "SMCInfo",
    "SMCState",
    "batched_resample",
    "build_kernel",
    "conditional_config",
    "conditional_resample",
    "done",
    "ess_rows",
    "init",
    "kernel_from_config",
    "log_evidence_runs",
    "make_config",
    "particles_per_run",
    "rejuvenate",
    "result",
    "run",
    "sample_many",
    "sampler",
    "state_from_sequences",
]
