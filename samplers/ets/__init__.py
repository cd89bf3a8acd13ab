r"""ETS: energy-guided test-time scaling (Algorithm 1), its importance-sampling variant ETS-IS, on
autoregressive and masked-diffusion policies.

Target
    The tilted target ``pi(x) ∝ p_ref(x) exp(log_tilt(x))`` (with ``log_tilt = r/lam`` plus any
    further terms). Its optimal next-block kernel is the Doob h-transform
    ``pi(c | s) = p_ref(c | s) E(c) / E(s)`` with the energy
    ``E(s) = E_{x ~ p_ref(·|s)}[exp(log_tilt(x))]`` (``specs/ets.md`` §2, Prop. 2).
Algorithm (one chain; ``num_samples`` chains run batched, independently)
    ``I = ceil(d / B)`` guidance steps (``d = max_new_tokens``, ``B = block_size``). At step ``i``
    from the current prefix ``s``:

    1. draw ``M = num_candidates`` candidate blocks ``c_1..c_M`` of ``B`` tokens from
       ``q(· | s)`` (``p_ref`` at ``temperature``; 1 by default) in one batched session whose
       prefix is shared (``select``/``fork``, never re-encoded); a block stops early at EOS;
    2. score each candidate by ``log Ê(c_m)``: exactly ``log_tilt(c_m)`` if it is complete
       (EOS, or the length cap), else from ``K = num_rollouts`` rollouts to completion
       (:mod:`~tiltsample.samplers.ets.rollout`, ``log Ê = logsumexp_k(log ρ_k + log_tilt_k) −
       log K``) or from an oracle ``potential``;
    3. draw **one** index with probability ``w_m / Σ_j w_j``,
       ``log w_m = log Ê(c_m) + log p_ref(c_m | s) − log q(c_m | s)`` (the last two cancel
       exactly at temperature 1) — a sampling-importance-resampling step, not argmax and not a
       softmax of the raw energies;
    4. continue from ``c_m``; stop when it is complete.

    Rollouts only score candidates and are thrown away.
Batching
    ``batching="lockstep"`` (default): the chains of a batch go through each phase together.
    ``batching="continuous"``: every row at its own phase in one ragged session, one generator
    stream per chain, the same law per chain (:mod:`~tiltsample.samplers.ets.continuous`).
Masked diffusion
    On a :class:`~tiltsample.diffusion.MaskedDiffusionPolicy` a guidance step runs
    ``B = block_size`` denoising steps of the base sampler for each of the ``M`` candidates
    (``I = ceil(T / B)``); rollouts run the same base sampler to step ``T``. Candidates are
    complete only at the last step.
ETS-IS
    ``proposal=`` a cheaper policy with the same vocabulary: rollouts come from it (at
    ``proposal_temperature``) and carry ``ρ = p_ref(z|c) / q(z|c)`` over the rollout tokens only,
    under the laws actually sampled (``specs/ets.md`` §5); ``p_ref`` scores the rollout tokens by
    teacher forcing. For masked diffusion the ratio is the exact path-marginal
    ``completion_logprob`` ratio (both policies must provide it). ``is_log_ratio_clip`` clips the
    log-ratio as the reference code does — biased, off by default, and reported.
Reward modes
    ``reward_mode="fixed"`` (default; the theory setting): the target's tilt.
    ``reward_mode="self-consistency"`` (paper §4.4): ``r = 1{answer(x) = majority}`` with the
    majority over a per-chain answer cache of every completion produced so far (complete
    candidates and rollouts of all steps) plus the step's new ones; ties go to the answer seen
    first; the cache lives in the sampler state and is reported in ``meta["answer_caches"]``.
    The reward depends on the samples, so the output is **not** a sampler of a fixed target.
Exactness
    Each step is SIR on the extended space (candidate, rollouts) whose candidate marginal is the
    exact kernel, so the per-step law converges to ``pi(· | s)`` as ``M → ∞`` at **any** fixed
    ``K`` (even ``K = 1``), with TV ``≤ ρ̂(s)/M`` (``specs/ets.md`` §8.2); the chain's law tends
    to ``pi`` as ``M → ∞``. With ``I = 1`` ETS is soft best-of-N (SIR over ``M`` complete
    responses), and ``lam → ∞`` gives ``p_ref`` exactly. Exact laws:
    :mod:`tiltsample.theory.ets_laws`.
Evidence
    ``log_evidence = log mean`` of the first step's candidate weights, an unbiased estimate of
    ``Z`` (in ``Z``, not in ``log Z``; fixed reward mode only).
Cost per chain (no early EOS, ``B | d``)
    ``N_tokens = Σ_i M (B + K (d − iB)) = M (1 + K (I − 1)/2) d`` generated tokens (paper,
    App. B.1): ``M·B`` candidate tokens and ``M·K·(d − iB)`` rollout tokens at step ``i``, none
    at the last. Complete candidates get no rollouts, so EOS only lowers the count. Forward
    tokens: each generated token once plus one prefill of the prompt (ETS-IS adds the proposal's
    forward tokens and ``p_ref``'s teacher-forced rollout tokens). Reward calls: one per complete
    candidate and rollout per tilt term. Masked diffusion: ``M`` rows × ``B`` denoiser passes for
    the candidates and ``M·K`` rows × the remaining passes for the rollouts
    (``meta["denoiser_passes"]``).
Reported per step (``ETSInfo``) and per draw (``meta["selections"]``)
    The candidates, the selection probabilities drawn from and the chosen index, for
    Rao–Blackwellised law estimates (:func:`tiltsample.theory.ets_laws.rao_blackwell_law`).
Modules
    :mod:`~.config` (parameters and their checks), :mod:`~.state` (state, info, batches,
    ``init``/``done``/``result``), :mod:`~.scoring` (reward modes, answer cache),
    :mod:`~.selection` (energies, SIR weights and draw), :mod:`~.autoregressive` and
    :mod:`~.masked_diffusion` (one guidance step), :mod:`~.continuous` with :mod:`~.chains` and
    :mod:`~.schedule` (continuous batching), :mod:`~.rollout` (the K-rollout estimator),
    :mod:`~.proposal` (ETS-IS), :mod:`~.potentials` (the estimator as a reusable potential),
    :mod:`~.algorithm` (``build_kernel``, ``sampler``), :mod:`~.many` (``sample_many``: the
    runs of several targets, one per problem, as one batched job).

References
----------
Li, Zhang, Yi, Li, Wang, Wang, Fan, *ETS: Energy-Guided Test-Time Scaling for Training-Free RL
Alignment*, arXiv 2601.21484 (v3), Algorithms 1–2, Eqs. 8 and 11, App. B; ``specs/ets.md``.
Rubin (1988) and Skare, Bølviken & Holden (2003) for SIR.
"""

from __future__ import annotations

from tiltsample.samplers.ets.algorithm import build_kernel, sampler
from tiltsample.samplers.ets.config import (
    ANSWERS,
    BATCHINGS,
    OUTPUTS,
    REWARD_MODES,
    ETSConfig,
    make_config,
    num_guidance_steps,
)
from tiltsample.samplers.ets.many import sample_many
from tiltsample.samplers.ets.potentials import DiffusionRolloutPotential, RolloutPotential
from tiltsample.samplers.ets.scoring import AnswerCache
from tiltsample.samplers.ets.selection import selection_probabilities
from tiltsample.samplers.ets.state import ETSInfo, ETSState, done, init, result

__all__ = [
    "ANSWERS",
    "BATCHINGS",
    "OUTPUTS",
    "REWARD_MODES",
    "AnswerCache",
    "DiffusionRolloutPotential",
    "ETSConfig",
    "ETSInfo",
    "ETSState",
    "RolloutPotential",
    "build_kernel",
    "done",
    "init",
    "make_config",
    "num_guidance_steps",
    "result",
    "sample_many",
    "sampler",
    "selection_probabilities",
]
