r"""Suffix-resampling Metropolis–Hastings over whole responses, with a pluggable cut law.

One kernel covers power sampling (Karan & Du), entropy-cut MH (Zhou, Mehrotra & Liu) and QAlign
(Faria & Smith); they are configurations of :func:`sampler` (``specs/mcmc.md``).

Target
    The tilted target ``pi(x) ∝ p_ref(x) exp(log_tilt(x))`` of complete responses (the target's
    length convention, ``truncation="stop"`` or ``"condition"``). Reference-log-probability tilt
    terms (the power tilt ``(alpha - 1) log p_ref``) are folded into one exponent ``a``:
    ``log pi(x) = a · sum_t l_t + rest(x)``, with ``l_t = log p_ref(x_t | x_<t)`` and ``rest`` the
    other tilt terms (rewards, constraints) evaluated on complete responses. ``power_target(p, 4)``
    has ``a = 4`` and no rest. With ``support="top_k"`` the target is restricted to responses whose
    every *drawn* token lies in the top-``k`` set of its prefix (the law the proposal can reach);
    the EOS that ``truncation="condition"`` forces at ``L - 1`` is not drawn and is exempt (its
    factor ``p_ref(EOS | x_<L)^a`` stays in the target; ``docs/samplers/mcmc.md``, "Support").
Proposal
    Draw a cut ``j ~ c_x(.)`` over the positions ``0..n-1`` of the current state ``x`` (``n = |x|``,
    EOS included), keep ``x_<j`` and regenerate ``x_j..`` from ``q_tau`` (``p_ref`` at
    ``proposal_temperature``, full vocabulary unless ``support="top_k"``) until EOS or the cap
    ``L`` (``length_mode="exact"``; EOS is forced at ``L - 1`` under ``truncation="condition"``).
    Cut laws: ``"uniform"``, ``c_x(j) = 1/n``; ``"entropy_jump"``,
    ``c_x(j) = w_j / sum_i w_i`` with ``w_j = max(0, H_j - H_{j-1})^beta``, ``H_{-1} = 0``,
    ``H_j`` the Shannon entropy of ``p_ref(. | x_<j)`` (on the chosen support, temperature 1),
    and the uniform law when every ``w_j`` is zero.
Acceptance
    With ``S(x)`` the positions ``j..n-1`` and ``g_t = log q_tau(x_t | x_<t)``:

    .. math::

        \log A = a\Big(\sum_{S(x')} l' - \sum_{S(x)} l\Big) + \mathrm{rest}(x') - \mathrm{rest}(x)
                 + \Big(\sum_{S(x)} g - \sum_{S(x')} g'\Big)
                 + \log c_{x'}(j) - \log c_x(j).

    Accept with probability ``min(1, A)``. The per-token arrays ``l, g, H`` of the current state
    are stored, so a step scores only the new suffix. ``alpha = inf`` (max-swap, the greedy limit)
    accepts iff ``sum_{S(x')} l' > sum_{S(x)} l``.
Exactness
    ``length_mode="exact"`` (default): the move "cut ``j``, regenerate the suffix" with the cut
    correction satisfies detailed balance for ``pi`` (the reverse move uses the same ``j``, which
    is valid since ``|x'| >= j + 1``), so ``pi`` is stationary; the chain is irreducible whenever
    ``q_tau`` reaches every response of the support. ``length_mode="reference"`` reproduces the
    published code (proposals capped at the current length, the current suffix sums truncated to
    the proposal's length, no uniform length correction): **not** reversible; states may even
    leave the target's support (an unterminated response shorter than the cap). Those final
    states get log-weight ``-inf`` and are counted in ``meta["incomplete"]``. Checked on exact
    transition matrices in :mod:`tiltsample.theory.mh_kernels`.
Stages
    ``block_size = B`` runs the block-wise schedule of Karan & Du: stage ``k = 1..S``
    (``S = ceil(L / B)``) targets ``pi_k(x_{1:L_k}) ∝ p_ref(x_{1:L_k})^a`` over stopped responses
    of cap ``L_k = min(kB, L)`` (EOS-terminated or unterminated of length ``L_k``), runs
    ``num_steps`` MH steps, then extends unterminated chains by ``q_tau`` to ``L_{k+1}``; a chain
    whose state ends with EOS after a stage is finished. Only the last stage targets ``pi``: the
    schedule is a length-annealing heuristic, biased even as ``num_steps -> inf`` (a chain that
    returns at an intermediate EOS keeps ``pi_k``'s law, which over-weights early EOS;
    ``theory.mh_kernels.stage_schedule_law`` gives its exact output law on toys).
    ``block_size=None`` is plain MH on the full target.
Cost per step
    The regenerated suffix of every chain (rejected proposals included), ``sum_j c_x(j)(n - j)``
    tokens in expectation (``(n + 1)/2`` for a uniform cut); one reward call per proposal per
    non-reference tilt term. Batching (same kernel in every mode; randomness is drawn in a
    different order, so equal seeds give equal laws, not equal outputs):
    ``batching="ragged"`` (the default, ``"auto"``, whenever the session has ragged rows:
    :class:`~tiltsample.policy.RaggedDecodeSession`) keeps every chain's state in one session,
    cuts each row at its own cut (:func:`~tiltsample.policy.truncate_rows`; no re-encoding) and
    decodes all suffixes in lock-step in one batch — model calls per step = the longest suffix,
    forward tokens = the new tokens plus one re-fed token per chain (finished rows leave the batch
    once half of it has finished); accepted rows are merged into the next state session
    (:func:`~tiltsample.policy.append_rows` + ``select``). ``batching="grouped"`` (the fallback)
    groups chains by (session, cut): each group is forked, selected and truncated to its cut and
    decoded as one batch, so chains cut at different positions decode in separate batches.
    ``batching="aligned"`` decodes all chains in lock-step from the smallest cut, teacher-forcing
    each row's frozen tokens up to its cut (re-fed prefixes counted in ``forward_tokens``).
    ``batching="continuous"`` (plain MH only, ``block_size=None``; ragged sessions) drops the
    lock-step: a chain whose proposal ended is scored (with the other chains that ended in the
    same model call: one reward call), accepted or rejected, and starts its next step at once —
    new cut, its session row truncated to the longest prefix it shares with ``x_<j``, the rest of
    ``x_<j`` re-fed one token per call (after a rejection) — while the other chains keep
    decoding, so every model call has one token per running chain. Every chain makes exactly
    ``num_steps`` steps; each draws its tokens, acceptance uniforms and cuts (inverse CDF) from
    its own generator seeded ``chunk_seed(base, c)`` with ``base`` one draw of the caller's
    generator, so its trajectory does not depend on the scheduling (the engine lives in
    :mod:`~.engine`, its state glue in :mod:`~.continuous`).
Many prompts
    :func:`sample_many` / :func:`init_many` run chains of several targets (same policy, cap,
    truncation and tilt structure; different prompts and rewards) in one batch over a
    multi-prompt session (:func:`~tiltsample.policy.open_session_multi`); each target's chains
    follow exactly their own kernel, and :func:`results` returns one result per target.
References
    Karan & Du, arXiv 2510.14901 (power sampling, Algorithm 1); Zhou, Mehrotra & Liu,
    arXiv 2605.30327 (entropy-cut MH); Faria & Smith 2025, *Sample, Don't Search* (QAlign);
    Faria et al., NeurIPS 2024 (QUEST). ``specs/mcmc.md`` §2–§4.

``sample("mh", ...)`` returns the final state of ``num_samples`` independent chains;
``run_chains`` keeps every draw with the statistics ``log_density``, ``accepted``, ``cut``,
``proposal_length``, ``regenerated``, ``acceptance_prob``, ``length`` (and ``reward``).

Modules
    :mod:`~.config` (parameters), :mod:`~.parts` (the target split ``a · log p_ref + rest``),
    :mod:`~.laws` (per-token laws), :mod:`~.cuts` (cut laws), :mod:`~.acceptance` (the ratio),
    :mod:`~.decode` (suffix decoding), :mod:`~.proposals` (regenerate, splice, merge),
    :mod:`~.state` (state, info, ``done``), :mod:`~.scoring` (rest and rewards per chain),
    :mod:`~.chains` (``init``, ``init_many``), :mod:`~.schedule` (the stage schedule),
    :mod:`~.kernel` (``build_kernel``), :mod:`~.outputs` (``record``, ``result``, ``results``),
    :mod:`~.algorithm` (``sampler``, ``sample_many``), :mod:`~.engine` with :mod:`~.snapshot`
    and :mod:`~.continuous` (continuous batching), and the configurations :mod:`~.power`,
    :mod:`~.entropy_cut`, :mod:`~.qalign` (their registry entries).
"""

from __future__ import annotations

from tiltsample.samplers.mh.acceptance import MHRatio, mh_log_ratio, qalign_log_ratio
from tiltsample.samplers.mh.algorithm import sample_many, sampler
from tiltsample.samplers.mh.chains import init, init_many
from tiltsample.samplers.mh.config import (
    BATCHINGS,
    CUTS,
    LENGTH_MODES,
    SUPPORTS,
    MHConfig,
    make_config,
)
from tiltsample.samplers.mh.cuts import cut_log_probs
from tiltsample.samplers.mh.entropy_cut import entropy_cut_sampler
from tiltsample.samplers.mh.kernel import build_kernel
from tiltsample.samplers.mh.laws import TokenLaw, token_law
from tiltsample.samplers.mh.outputs import current_log_density, record, result, results
from tiltsample.samplers.mh.parts import (
    TargetParts,
    decompose_target,
    evaluate_rest,
    log_density_from_parts,
    resolve_alpha,
)
from tiltsample.samplers.mh.power import power_sampler
from tiltsample.samplers.mh.qalign import qalign_sampler
from tiltsample.samplers.mh.schedule import stage_caps, total_steps
from tiltsample.samplers.mh.state import MHInfo, MHState, done

__all__ = [
    "BATCHINGS",
    "CUTS",
    "LENGTH_MODES",
    "SUPPORTS",
    "MHConfig",
    "MHInfo",
    "MHRatio",
    "MHState",
    "TargetParts",
    "TokenLaw",
    "build_kernel",
    "current_log_density",
    "cut_log_probs",
    "decompose_target",
    "done",
    "entropy_cut_sampler",
    "evaluate_rest",
    "init",
    "init_many",
    "log_density_from_parts",
    "make_config",
    "mh_log_ratio",
    "power_sampler",
    "qalign_log_ratio",
    "qalign_sampler",
    "record",
    "resolve_alpha",
    "result",
    "results",
    "sample_many",
    "sampler",
    "stage_caps",
    "token_law",
    "total_steps",
]
