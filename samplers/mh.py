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
    :mod:`tiltsample.samplers.mh_continuous`).
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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.policy import (
    DecodeSession,
    append_rows,
    open_session,
    open_session_multi,
    row_lengths,
    supports_ragged,
    truncate_rows,
)
from tiltsample.results import SampleSet
from tiltsample.reward import check_reward_output
from tiltsample.sampler import ChainRecord, SamplingAlgorithm
from tiltsample.target import TiltedTarget, TiltTerm
from tiltsample.types import Cost, Seq

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

CUTS: tuple[str, ...] = ("uniform", "entropy_jump")
LENGTH_MODES: tuple[str, ...] = ("exact", "reference")
SUPPORTS: tuple[str, ...] = ("full", "top_k")
BATCHINGS: tuple[str, ...] = ("auto", "ragged", "grouped", "aligned", "continuous")

DEFAULT_STEPS_PLAIN = 100
DEFAULT_STEPS_PER_STAGE = 10


# ============================================================================ configuration
@dataclass(frozen=True)
class MHConfig:
    """Validated configuration of the MH kernel (see :func:`sampler` for the meaning).

    ``greedy=True`` is max-swap (``alpha = inf``).
    """

    num_steps: int = DEFAULT_STEPS_PLAIN
    cut: str = "uniform"
    cut_power: float = 4.0
    proposal_temperature: float = 1.0
    length_mode: str = "exact"
    support: str = "full"
    top_k: int = 50
    block_size: int | None = None
    batching: str = "auto"
    greedy: bool = False
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.block_size is None:
            validation.positive_int("num_steps", self.num_steps)
        else:
            validation.positive_int("block_size", self.block_size)
            validation.non_negative_int("num_steps", self.num_steps)
        validation.one_of("cut", self.cut, CUTS)
        object.__setattr__(
            self, "cut_power", validation.positive_float("cut_power", self.cut_power)
        )
        object.__setattr__(
            self,
            "proposal_temperature",
            validation.positive_float("proposal_temperature", self.proposal_temperature),
        )
        validation.one_of("length_mode", self.length_mode, LENGTH_MODES)
        validation.one_of("support", self.support, SUPPORTS)
        validation.positive_int("top_k", self.top_k)
        validation.one_of("batching", self.batching, BATCHINGS)
        if self.batching == "continuous" and self.block_size is not None:
            raise ValueError(
                "batching='continuous' runs plain MH only: block_size must be None (the stage "
                "schedule synchronises all chains at every stage), got "
                f"block_size={self.block_size}"
            )
        if not isinstance(self.greedy, bool):
            raise TypeError(f"greedy must be a bool, got {type(self.greedy).__name__}")
        if self.max_rows is not None:
            validation.positive_int("max_rows", self.max_rows)
            if self.batching != "continuous":
                raise ValueError(
                    "max_rows (session rows, chains queued for a free row) needs "
                    f"batching='continuous', got batching={self.batching!r}"
                )

    def as_dict(self) -> dict[str, Any]:
        """The configuration as plain values (for ``meta`` and records)."""
        return {
            "num_steps": self.num_steps,
            "cut": self.cut,
            "cut_power": self.cut_power,
            "proposal_temperature": self.proposal_temperature,
            "length_mode": self.length_mode,
            "support": self.support,
            "top_k": self.top_k,
            "block_size": self.block_size,
            "batching": self.batching,
            "greedy": self.greedy,
            "max_rows": self.max_rows,
        }


def make_config(
    *,
    num_steps: int | None = None,
    cut: str = "uniform",
    cut_power: float = 4.0,
    proposal_temperature: float = 1.0,
    length_mode: str = "exact",
    support: str = "full",
    top_k: int = 50,
    block_size: int | None = None,
    batching: str = "auto",
    greedy: bool = False,
    max_rows: int | None = None,
) -> MHConfig:
    """An :class:`MHConfig`; ``num_steps=None`` means 100 (plain) or 10 per stage (staged)."""
    if num_steps is None:
        num_steps = DEFAULT_STEPS_PLAIN if block_size is None else DEFAULT_STEPS_PER_STAGE
    return MHConfig(
        num_steps,
        cut,
        cut_power,
        proposal_temperature,
        length_mode,
        support,
        top_k,
        block_size,
        batching,
        greedy,
        max_rows,
    )


def stage_caps(max_new_tokens: int, block_size: int | None) -> list[int]:
    """Caps ``L_k = min(k·B, L)`` of the stages ``k = 1..ceil(L/B)`` (``[L]`` without stages)."""
    validation.positive_int("max_new_tokens", max_new_tokens)
    if block_size is None:
        return [max_new_tokens]
    validation.positive_int("block_size", block_size)
    num = math.ceil(max_new_tokens / block_size)
    return [min((k + 1) * block_size, max_new_tokens) for k in range(num)]


# ============================================================================ target split
class TargetParts(NamedTuple):
    """``log pi(x) = power · log p_ref(x) + sum(rest terms)(x)``."""

    power: float
    """The exponent ``a`` of ``p_ref`` (``alpha`` for a power target, 1 for a reward tilt)."""
    rest: tuple[TiltTerm, ...]
    """Tilt terms that are not a multiple of ``log p_ref`` (rewards, constraints)."""


def _is_logprob_term(term: TiltTerm) -> bool:
    scale = getattr(term.reward, "scale", None)
    return (
        bool(getattr(term.reward, "uses_reference_logprob", False))
        and isinstance(scale, int | float)
        and not isinstance(scale, bool)
        and math.isfinite(float(scale))
    )


def decompose_target(target: TiltedTarget) -> TargetParts:
    """Fold reference-log-probability tilt terms into the exponent of ``p_ref``.

    A term ``s · (c · log p_ref)`` (a :class:`~tiltsample.target.LogProbReward` of scale ``c`` at
    tilt scale ``s = 1/lam``) adds ``s·c`` to the exponent; every other term stays a function of
    the complete response.
    """
    power = 1.0
    rest: list[TiltTerm] = []
    for term in target.terms:
        if _is_logprob_term(term):
            power += term.scale * float(term.reward.scale)  # type: ignore[attr-defined]
        else:
            rest.append(term)
    return TargetParts(power, tuple(rest))


def resolve_alpha(target: TiltedTarget, alpha: float | None) -> float:
    """The power ``alpha`` of a power target, or the explicit ``alpha`` for any other target.

    ``alpha`` is read from the target (its exponent of ``p_ref``, :func:`decompose_target`,
    consistent with ``target.meta["alpha"]``). An explicit ``alpha`` must agree with a power
    target's (``inf`` — max-swap — is always allowed); for a target that is not a power target it
    only sets the proposal temperature ``1/alpha``.
    """
    parts = decompose_target(target)
    is_power = target.meta.get("kind") == "power" or parts.power != 1.0
    if alpha is not None:
        alpha = validation.positive_float("alpha", alpha, allow_inf=True)
        if is_power and math.isfinite(alpha) and abs(alpha - parts.power) > 1e-12 * alpha:
            raise ValueError(
                f"alpha={alpha} disagrees with the target's alpha={parts.power} (the target is a "
                "power target; omit alpha to use its own, or pass alpha=inf for max-swap)"
            )
        return alpha
    if not is_power:
        raise ValueError(
            "alpha is required: the target is not a power target (build one with "
            "tiltsample.power_target(policy, alpha)) or pass alpha= to set the proposal "
            "temperature 1/alpha"
        )
    if not parts.power > 0:
        raise ValueError(
            f"the target's exponent of p_ref is {parts.power} <= 0; power sampling needs alpha > 0"
        )
    return parts.power


def _scale_keep_neginf(values: Tensor, scale: float) -> Tensor:
    return torch.where(torch.isneginf(values), values, values * scale)


def evaluate_rest(
    target: TiltedTarget, parts: TargetParts, xs: Sequence[Seq], log_reference: Tensor
) -> tuple[Tensor, Tensor | None, Cost]:
    """``rest(x)`` of complete responses, the primary reward (for reporting) and reward calls."""
    batch = len(xs)
    other = torch.zeros(batch, dtype=torch.float64)
    reward: Tensor | None = None
    calls = 0
    for term in parts.rest:
        if getattr(term.reward, "uses_reference_logprob", False):
            values = term.reward.from_reference(log_reference)  # type: ignore[attr-defined]
        else:
            values = term.reward(target.prompt, list(xs)) if batch else torch.zeros(0)
            calls += batch
        values = check_reward_output(values, batch, what=f"tilt term {term.name!r}")
        if term.name == "reward" and reward is None:
            reward = values
        other = other + _scale_keep_neginf(values, term.scale)
    primary = target.reward
    if primary is not None and reward is None:
        if getattr(primary, "uses_reference_logprob", False):
            reward = check_reward_output(primary.from_reference(log_reference), batch)  # type: ignore[attr-defined]
        else:  # lam = inf: reported, not tilted
            reward = check_reward_output(
                primary(target.prompt, list(xs)) if batch else torch.zeros(0), batch
            )
            calls += batch
    return other, reward, Cost(reward_calls=calls)


def log_density_from_parts(power: float, log_reference: Tensor, rest: Tensor) -> Tensor:
    """``power · log p_ref + rest`` with ``-inf`` wherever either part is ``-inf`` (never NaN)."""
    out = power * torch.where(torch.isneginf(log_reference), 0.0, log_reference) + rest
    off = torch.isneginf(log_reference) | torch.isneginf(rest)
    return torch.where(off, torch.full_like(out, -math.inf), out)


# ============================================================================ per-token laws
class TokenLaw(NamedTuple):
    """The laws at one decoding position, all ``[R, V]`` / ``[R]`` float64."""

    log_q: Tensor
    """``log q_tau``: the law tokens are drawn from (support-restricted, tempered)."""
    log_p: Tensor
    """``log p_ref`` at temperature 1 over the full vocabulary (the target's ``l``)."""
    entropy: Tensor
    """Shannon entropy of ``p_ref`` restricted and renormalised to the support (temperature 1)."""


def _log_normalise(x: Tensor) -> Tensor:
    """``x - logsumexp(x)`` over the last dimension (rows have a finite entry; ``-inf`` kept).

    Used instead of ``torch.log_softmax``, which costs ~10 ms per call on tiny tensors when the
    intra-op thread pool has to wake up on a loaded machine.
    """
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def token_law(log_p: Tensor, temperature: float, support: str, top_k: int) -> TokenLaw:
    """Proposal law, target log-probs and entropy from raw next-token log-probs ``[R, V]``.

    ``support="full"``: ``q = softmax(log p / tau)`` over the whole vocabulary (at ``tau = 1``
    exactly ``log p``, so the QAlign cancellation is exact; otherwise the same law as
    :func:`tiltsample.decoding.tempered_logprobs`). ``support="top_k"``: ``q`` is the
    tempered law renormalised on the ``top_k`` most likely tokens (``torch.topk``), ``l`` stays the
    full-softmax log-prob and ``H`` is the entropy of ``p`` renormalised on the same set.
    """
    log_p = log_p.to(torch.float64)
    if support == "full":
        log_q = log_p if temperature == 1.0 else _log_normalise(log_p / temperature)
        log_support = log_p
    else:
        k = min(top_k, log_p.shape[-1])
        keep = torch.zeros_like(log_p, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(log_p, k, dim=-1).indices, True)
        masked = torch.where(keep, log_p, torch.full_like(log_p, -math.inf))
        log_support = _log_normalise(masked)
        log_q = log_support if temperature == 1.0 else _log_normalise(masked / temperature)
    finite = torch.isfinite(log_support)
    plogp = torch.where(finite, torch.exp(log_support) * log_support, 0.0)
    entropy = -plogp.sum(dim=-1)
    return TokenLaw(log_q, log_p, entropy)


def cut_log_probs(entropy: Tensor, length: Tensor, cut: str, cut_power: float) -> Tensor:
    """``log c_x(j)`` ``[R, A]`` for states with per-token entropies ``[R, A]`` and lengths ``[R]``.

    ``-inf`` at ``j >= n``. The entropy-jump law falls back to uniform when all weights vanish.
    """
    rows, width = entropy.shape
    pos = torch.arange(width)[None, :]
    valid = pos < length[:, None]
    n = length.clamp(min=1).to(torch.float64)
    uniform = torch.where(valid, -torch.log(n)[:, None], torch.full((rows, width), -math.inf))
    if cut == "uniform":
        return uniform.to(torch.float64)
    prev = torch.cat([torch.zeros(rows, 1, dtype=torch.float64), entropy[:, :-1]], dim=1)
    jump = entropy.to(torch.float64) - prev
    ok = valid & (jump > 0)
    log_w = torch.where(ok, cut_power * torch.log(torch.where(ok, jump, 1.0)), -math.inf)
    log_total = torch.logsumexp(log_w, dim=1)
    has_mass = torch.isfinite(log_total)
    safe_total = torch.where(has_mass, log_total, 0.0)
    return torch.where(has_mass[:, None], log_w - safe_total[:, None], uniform)


class MHRatio(NamedTuple):
    """The terms of the log acceptance ratio (each ``[R]`` float64, never NaN)."""

    target: Tensor
    """``log pi(x') - log pi(x)`` restricted to the suffixes (``±inf`` off-support)."""
    proposal: Tensor
    """``sum_{S(x)} g - sum_{S(x')} g'``."""
    cut: Tensor
    """``log c_{x'}(j) - log c_x(j)`` (``-inf`` when the reverse cut is impossible)."""
    total: Tensor
    """``log A`` (``+inf``: always accept; ``-inf``: never)."""


def mh_log_ratio(
    *,
    power: float,
    ell_current: Tensor,
    ell_proposal: Tensor,
    g_current: Tensor,
    g_proposal: Tensor,
    rest_current: Tensor,
    rest_proposal: Tensor,
    log_cut_forward: Tensor,
    log_cut_reverse: Tensor,
    greedy: bool = False,
) -> MHRatio:
    """The MH log ratio of ``specs/mcmc.md`` §2.2 from suffix sums (all ``[R]``).

    A proposal outside the target's support (``-inf`` log-prob or tilt) is never accepted; a
    current state outside the support (possible only for an initial state) is left for any
    proposal inside it. ``greedy`` (max-swap): accept iff the suffix log-likelihood strictly
    increases.
    """
    prop_off = torch.isneginf(ell_proposal) | torch.isneginf(rest_proposal)
    cur_off = torch.isneginf(ell_current) | torch.isneginf(rest_current)
    zero = torch.zeros_like(ell_current)
    d_ell = torch.where(prop_off | cur_off, zero, ell_proposal) - torch.where(
        prop_off | cur_off, zero, ell_current
    )
    d_rest = torch.where(prop_off | cur_off, zero, rest_proposal) - torch.where(
        prop_off | cur_off, zero, rest_current
    )
    inf = torch.full_like(d_ell, math.inf)
    target = torch.where(d_ell > 0, inf, -inf) if greedy else power * d_ell + d_rest
    target = torch.where(cur_off, inf, target)
    target = torch.where(prop_off, -inf, target)
    proposal = g_current - g_proposal
    cut = log_cut_reverse - log_cut_forward
    if greedy:  # the alpha -> inf limit: the target term dominates every finite term
        return MHRatio(target, proposal, cut, target)
    finite_part = proposal + torch.where(torch.isfinite(cut), cut, zero)
    total = torch.where(torch.isfinite(target), target + finite_part, target)
    total = torch.where(torch.isneginf(cut) & ~cur_off, -inf, total)
    return MHRatio(target, proposal, cut, total)


def qalign_log_ratio(
    log_tilt_current: Tensor,
    log_tilt_proposal: Tensor,
    length_current: Tensor,
    length_proposal: Tensor,
) -> Tensor:
    r"""QAlign's shortcut ``log A = Δ log_tilt + log(|y| / |y'|)`` (rewards and lengths only).

    Equal to the full ratio when the proposal is ``p_ref`` at ``tau = 1`` on the full vocabulary,
    the cut is uniform and nothing is forced (``truncation="stop"``): the reference and proposal
    likelihoods cancel token by token. Under ``truncation="condition"`` the forced EOS has
    ``q = 1`` but ``p = p(EOS | x_<L)``, and the shortcut misses that factor.
    """
    d_tilt = torch.where(
        torch.isneginf(log_tilt_proposal),
        -math.inf,
        log_tilt_proposal - torch.where(torch.isneginf(log_tilt_current), 0.0, log_tilt_current),
    )
    d_tilt = torch.where(
        torch.isneginf(log_tilt_current) & ~torch.isneginf(log_tilt_proposal), math.inf, d_tilt
    )
    return d_tilt + torch.log(length_current.double()) - torch.log(length_proposal.double())


# ============================================================================ decode loop
class _Suffix(NamedTuple):
    tokens: Tensor  # [R, m] long, EOS-padded
    ell: Tensor  # [R, m] float64, 0-padded
    g: Tensor
    entropy: Tensor
    length: Tensor  # [R] tokens each row received
    generated: int  # sampled (and forced-EOS) tokens, teacher-forced ones excluded


class _Slot:
    """A decode session whose rows hold the current states of some chains (grouped batching)."""

    __slots__ = ("serial", "session")

    def __init__(self, session: DecodeSession, serial: int) -> None:
        self.session = session
        self.serial = serial


def _empty_suffix(rows: int) -> _Suffix:
    f = torch.zeros((rows, 0), dtype=torch.float64)
    return _Suffix(
        torch.zeros((rows, 0), dtype=torch.long), f, f, f, torch.zeros(rows, dtype=torch.long), 0
    )


def _decode_rows(
    session: DecodeSession,
    generator: torch.Generator,
    *,
    caps: Tensor,
    eos_id: int,
    config: MHConfig,
    force_eos: Tensor | bool,
    forced: Tensor | None = None,
    forced_until: Tensor | None = None,
    start: Tensor | None = None,
    hard_cap: int | None = None,
) -> _Suffix:
    """Extend every row of ``session`` from its length to EOS or its own cap ``caps[r]``.

    ``start[r]`` is row ``r``'s length (ragged sessions; default: ``session.length`` for all).
    With ``hard_cap``, a row that reaches ``caps[r] == hard_cap`` without EOS while other rows
    still decode is fed EOS instead of its last token (the recorded suffix keeps the token): the
    session then never asks the policy for a law past the target's cap, which a policy need not
    define. That position of the session row is never read again (later cuts lie below it and a
    chain at the target's cap is never extended).

    Rows are teacher-forced with ``forced[r, t - start]`` while ``t < forced_until[r]`` (their
    stats are recorded, their tokens not counted as generated). A row with ``force_eos[r]`` (the
    ``truncation="condition"`` rule) reaching position ``cap - 1`` gets EOS with ``g = 0`` and
    ``l = log p(EOS | x_<cap)`` (a teacher-forced EOS there is treated the same way). A row that
    stops at its cap without EOS is padded with EOS in the session (its tokens past the cap are
    never read: the next use truncates below them).
    """
    rows = session.batch_size
    if rows == 0:
        return _empty_suffix(0)
    if start is None:
        start = torch.full((rows,), session.length, dtype=torch.long)
    live = caps > start
    steps = int((caps - start).max())
    force_rows = torch.as_tensor(force_eos, dtype=torch.bool).expand(rows)
    toks: list[Tensor] = []
    ells: list[Tensor] = []
    gs: list[Tensor] = []
    hs: list[Tensor] = []
    new_len = torch.zeros(rows, dtype=torch.long)
    generated = 0
    eos = torch.full((rows,), eos_id, dtype=torch.long)
    for step in range(steps):
        if not bool(live.any()):
            break
        t = start + step
        law = token_law(
            session.logprobs(), config.proposal_temperature, config.support, config.top_k
        )
        tok = _sample(generator, law.log_q)
        g = law.log_q.gather(1, tok[:, None]).squeeze(1)
        is_forced = torch.zeros(rows, dtype=torch.bool)
        if forced is not None and forced_until is not None:
            is_forced = t < forced_until
            if bool(is_forced.any()):
                col = min(step, forced.shape[1] - 1)
                tok = torch.where(is_forced, forced[:, col], tok)
                g = law.log_q.gather(1, tok[:, None]).squeeze(1)
        at_cap = force_rows & (t == caps - 1)
        if bool(at_cap.any()):
            # the forced EOS is the length convention, not a draw: exempt from support="top_k"
            # (l from the full softmax; the documented law, docs/samplers/mcmc.md "Support")
            tok = torch.where(at_cap & ~is_forced, eos, tok)
            g = torch.where(
                at_cap, torch.zeros_like(g), law.log_q.gather(1, tok[:, None]).squeeze(1)
            )
        ell = law.log_p.gather(1, tok[:, None]).squeeze(1)
        zero = torch.zeros_like(ell)
        toks.append(torch.where(live, tok, eos))
        ells.append(torch.where(live, ell, zero))
        gs.append(torch.where(live, g, zero))
        hs.append(torch.where(live, law.entropy, zero))
        new_len += live.long()
        generated += int((live & ~is_forced).sum())
        fed = torch.where(live, tok, eos)
        if hard_cap is not None:
            fed = torch.where(live & (t + 1 == caps) & (caps == hard_cap), eos, fed)
        session.extend(fed)
        live = live & (tok != eos_id) & (t + 1 < caps)
    if not toks:
        return _empty_suffix(rows)
    return _Suffix(
        torch.stack(toks, 1),
        torch.stack(ells, 1),
        torch.stack(gs, 1),
        torch.stack(hs, 1),
        new_len,
        generated,
    )


def _decode_ragged(
    session: DecodeSession,
    generator: torch.Generator,
    *,
    start: Tensor,
    caps: Tensor,
    eos_id: int,
    config: MHConfig,
    force_eos: bool,
    hard_cap: int,
    shrink_below: float = 0.5,
    min_rows: int = 8,
) -> tuple[_Suffix, DecodeSession]:
    """Ragged batching: extend row ``r`` (of length ``start[r]``) to EOS or ``caps[r]``, all rows
    in lock-step, and return the suffixes and the session holding the extended rows.

    Same law as :func:`_decode_rows` (one draw per live row and position from ``q_tau``; EOS
    forced at ``cap - 1`` with ``force_eos``). Finished rows leave the decoding batch: when at
    most ``shrink_below`` of its rows are live (and it has ``>= min_rows`` rows), the finished
    ones are parked in a fork (``select``) and come back at the end
    (:func:`~tiltsample.policy.append_rows`, then ``select`` to restore the row order), so forward
    calls push mostly new tokens instead of padding.
    """
    rows = session.batch_size
    if rows == 0:
        return _empty_suffix(0), session
    live = caps > start
    steps = int((caps - start).max())
    width = max(steps, 0)
    toks = torch.full((rows, width), eos_id, dtype=torch.long)
    ells = torch.zeros((rows, width), dtype=torch.float64)
    gs = torch.zeros((rows, width), dtype=torch.float64)
    hs = torch.zeros((rows, width), dtype=torch.float64)
    new_len = torch.zeros(rows, dtype=torch.long)
    generated = 0
    members = torch.arange(rows)  # original index of every row of the decoding session
    parked: list[tuple[DecodeSession, Tensor]] = []
    for step in range(steps):
        mine = live[members]
        if not bool(mine.any()):
            break
        n = int(members.numel())
        if n >= min_rows and int(mine.sum()) <= shrink_below * n:
            gone = (~mine).nonzero().flatten()
            piece = session.fork()
            piece.select(gone)
            parked.append((piece, members[gone]))
            session.select(mine.nonzero().flatten())
            members = members[mine]
            mine = live[members]
        t = start[members] + step
        cap = caps[members]
        law = token_law(
            session.logprobs(), config.proposal_temperature, config.support, config.top_k
        )
        tok = _sample(generator, law.log_q)
        g = law.log_q.gather(1, tok[:, None]).squeeze(1)
        if force_eos:
            at_cap = t == cap - 1
            tok = torch.where(at_cap, torch.full_like(tok, eos_id), tok)
            g = torch.where(at_cap, torch.zeros_like(g), g)
        ell = law.log_p.gather(1, tok[:, None]).squeeze(1)
        keep = mine
        idx = members[keep]
        toks[idx, step] = tok[keep]
        ells[idx, step] = ell[keep]
        gs[idx, step] = g[keep]
        hs[idx, step] = law.entropy[keep]
        new_len[idx] += 1
        generated += int(keep.sum())
        fed = torch.where(keep, tok, torch.full_like(tok, eos_id))
        # a row at the target's cap is fed EOS: the policy need not define a law past it (that
        # position of the session row is never read again)
        fed = torch.where(keep & (t + 1 == cap) & (cap == hard_cap), eos_id, fed)
        session.extend(fed)
        live[members] = keep & (tok != eos_id) & (t + 1 < cap)
    for piece, idx in parked:
        session = append_rows(session, piece)
        members = torch.cat([members, idx])
    if parked:
        session.select(torch.argsort(members))
    width = int(new_len.max()) if rows else 0
    suf = _Suffix(
        toks[:, :width], ells[:, :width], gs[:, :width], hs[:, :width], new_len, generated
    )
    return suf, session


def _sample(generator: torch.Generator, log_q: Tensor) -> Tensor:
    """One draw per row of normalised log-probs ``[R, V]`` (``exp``, not ``softmax``: see
    :func:`_log_normalise`)."""
    return torch.multinomial(torch.exp(log_q), 1, generator=generator).squeeze(1)


def _shift_rows(values: Tensor, offset: Tensor, fill: float | int) -> Tensor:
    """``out[r, i] = values[r, i + offset[r]]`` (``fill`` past the end)."""
    width = values.shape[1]
    if width == 0:
        return values
    idx = torch.arange(width)[None, :] + offset[:, None]
    inside = idx < width
    got = values.gather(1, idx.clamp(max=width - 1))
    return torch.where(inside, got, torch.full_like(got, fill))


def _pad_cat(parts: list[tuple[list[int], _Suffix]], rows: int, eos_id: int) -> _Suffix:
    """Scatter per-group suffixes back into ``[rows, m_max]`` arrays in row order."""
    width = max((s.tokens.shape[1] for _, s in parts), default=0)
    tokens = torch.full((rows, width), eos_id, dtype=torch.long)
    ell = torch.zeros((rows, width), dtype=torch.float64)
    g = torch.zeros((rows, width), dtype=torch.float64)
    ent = torch.zeros((rows, width), dtype=torch.float64)
    length = torch.zeros(rows, dtype=torch.long)
    generated = 0
    for idx, s in parts:
        w = s.tokens.shape[1]
        where = torch.tensor(idx, dtype=torch.long)
        tokens[where, :w] = s.tokens
        ell[where, :w] = s.ell
        g[where, :w] = s.g
        ent[where, :w] = s.entropy
        length[where] = s.length
        generated += s.generated
    return _Suffix(tokens, ell, g, ent, length, generated)


# ============================================================================ state and info
class MHInfo(NamedTuple):
    """What one step reports (per chain ``[C]`` unless stated)."""

    cost: Cost
    """Compute of the step: every regenerated token (rejected proposals included), the stage
    extension when the step opened a new stage, forward tokens, model and reward calls."""
    accepted: Tensor
    """``[C]`` bool."""
    cut: Tensor
    """``[C]`` long: the cut position ``j`` (``-1`` for a chain that did not move)."""
    proposal_length: Tensor
    """``[C]`` long: ``|x'|`` (0 for a chain that did not move)."""
    regenerated: Tensor
    """``[C]`` long: tokens decoded for the proposal, ``|x'| - j``."""
    log_acceptance: Tensor
    """``[C]`` float64: ``log A`` (may be ``±inf``; 0 for a chain that did not move)."""
    log_target_ratio: Tensor
    """``[C]``: the target term of ``log A``."""
    log_proposal_ratio: Tensor
    """``[C]``: the proposal term ``sum_{S(x)} g - sum_{S(x')} g'``."""
    log_cut_ratio: Tensor
    """``[C]``: the cut-law correction ``log c_{x'}(j) - log c_x(j)``."""
    moved: Tensor
    """``[C]`` bool: the chain made an MH proposal this step (False once finished)."""
    proposal_tokens: Tensor
    """``[C, L]`` long: the proposed responses ``x'`` (EOS-padded past ``proposal_length``)."""
    stage: int
    """The stage (1-based) this step ran in."""


class MHState(NamedTuple):
    """``C`` chains: current responses with per-token ``l``, ``g``, ``H`` arrays, and sessions."""

    target: TiltedTarget
    config: MHConfig
    parts: TargetParts
    caps: tuple[int, ...]
    """Stage caps ``L_1..L_S``."""
    tokens: Tensor
    """``[C, L]`` long, EOS-padded past ``length``."""
    ell: Tensor
    """``[C, L]`` float64: ``log p_ref(x_t | x_<t)`` (0 past ``length``)."""
    g: Tensor
    """``[C, L]`` float64: ``log q_tau(x_t | x_<t)`` of the law that produced the token."""
    entropy: Tensor
    """``[C, L]`` float64: entropy of ``p_ref(. | x_<t)`` on the support."""
    length: Tensor
    """``[C]`` long."""
    log_reference: Tensor
    """``[C]``: ``sum_t l_t``."""
    rest: Tensor
    """``[C]``: non-reference tilt terms of the current response (0 while staged)."""
    reward: Tensor | None
    chain_cap: Tensor
    """``[C]`` long: the cap of the current stage (per chain in reference mode)."""
    active: Tensor
    """``[C]`` bool: chains still running (staged chains finish at EOS after a stage)."""
    stage: int
    step_in_stage: int
    steps_done: int
    accepted_count: Tensor
    moved_count: Tensor
    handles: tuple[tuple[_Slot, int], ...] | None
    root: _Slot | None
    serial: int
    last: MHInfo | None
    cost: Cost
    batching: str = "grouped"
    """The batching actually used (``"auto"`` resolved at :func:`init`)."""
    targets: tuple[TiltedTarget, ...] = ()
    """All targets of a joint run (:func:`init_many`; empty for a single target)."""
    owner: Tensor | None = None
    """``[C]`` long: the target of every chain in a joint run."""
    chain_cost: Tensor | None = None
    """``[C, 2]`` long: generated tokens and reward calls spent on each chain."""
    engine: Any = None
    """``batching="continuous"``: the engine (:mod:`tiltsample.samplers.mh_continuous`) that runs
    the chains; the arrays above then hold every chain's state after ``steps_done`` steps."""


def _check_target(target: TiltedTarget, config: MHConfig, parts: TargetParts) -> None:
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    if is_masked_diffusion(target.policy):
        raise TypeError(
            "the MH samplers need an autoregressive ReferencePolicy; got a masked-diffusion "
            "policy (use ETS, SMC or best-of-N)"
        )
    pure = not parts.rest
    if config.block_size is not None and not pure:
        raise ValueError(
            "block_size (the stage schedule) needs a target whose tilt is a power of p_ref "
            "(intermediate stages score prefixes); got reward terms "
            f"{[t.name for t in parts.rest]}. Use block_size=None for plain MH."
        )
    if config.length_mode == "reference":
        if target.truncation != "stop":
            raise ValueError(
                "length_mode='reference' reproduces the published code, which has no "
                "conditioned cap: it needs truncation='stop'"
            )
        if not pure:
            raise ValueError(
                "length_mode='reference' truncates suffix sums token by token; it needs a "
                "target whose tilt is a power of p_ref"
            )
    if config.greedy and not pure:
        raise ValueError("alpha=inf (max-swap) maximises log p_ref; the target has reward terms")


def _complete(state: MHState) -> Tensor:
    """``[C]`` bool: the current response ends with EOS."""
    last = state.tokens.gather(1, (state.length - 1).clamp(min=0)[:, None]).squeeze(1)
    return (last == state.target.eos_id) & (state.length > 0)


def _seqs(tokens: Tensor, length: Tensor) -> list[Seq]:
    return [tuple(row[:n]) for row, n in zip(tokens.tolist(), length.tolist(), strict=True)]


def _final_stage(state: MHState) -> bool:
    return state.stage == len(state.caps)


def _rows_force_eos(state: MHState, final_stage: bool) -> bool:
    return final_stage and state.target.truncation == "condition"


# ============================================================================ proposals
def _regenerate(
    state: MHState,
    generator: torch.Generator,
    rows: Tensor,
    cuts: Tensor,
    caps: Tensor,
    force_eos: bool,
) -> tuple[_Suffix, tuple[tuple[_Slot, int], ...] | None, int, Cost, DecodeSession | None]:
    """Decode new suffixes of ``rows`` from ``cuts`` to ``caps``; return them, their handles
    (grouped), the serial counter, the cost and (ragged) the session holding the proposals."""
    config, eos = state.config, state.target.eos_id
    n = int(rows.numel())
    serial = state.serial
    cost = Cost()
    if n == 0:
        return _empty_suffix(0), (), serial, cost, None
    if state.batching == "ragged":
        # every chain cut at its own position, all suffixes decoded in lock-step in one batch
        assert state.root is not None
        session = state.root.session.fork()
        session.select(rows)
        session = truncate_rows(session, row_lengths(session) - cuts)
        suf, session = _decode_ragged(
            session,
            generator,
            start=cuts,
            caps=caps,
            eos_id=eos,
            config=config,
            force_eos=force_eos,
            hard_cap=state.target.max_new_tokens,
        )
        # the session's cost moves with its rows into the merged state session (_merge_root)
        return suf, None, serial, Cost(generated_tokens=suf.generated), session
    if state.batching == "aligned":
        assert state.root is not None
        session = state.root.session.fork()
        session.select(_root_rows(state, rows))
        j_min = int(cuts.min())
        if j_min > 0:
            session.extend(state.tokens[rows, :j_min])
        j_max = int(cuts.max())
        forced = state.tokens[rows, j_min : max(j_max, j_min + 1)]
        suf = _decode_rows(
            session,
            generator,
            caps=caps,
            eos_id=eos,
            config=config,
            force_eos=force_eos,
            forced=forced,
            forced_until=cuts,
        )
        offset = cuts - j_min
        suf = _Suffix(
            _shift_rows(suf.tokens, offset, eos),
            _shift_rows(suf.ell, offset, 0.0),
            _shift_rows(suf.g, offset, 0.0),
            _shift_rows(suf.entropy, offset, 0.0),
            suf.length - offset,
            suf.generated,
        )
        cost = cost + session.cost + Cost(generated_tokens=suf.generated)
        return suf, None, serial, cost, None
    assert state.handles is not None
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (c, j) in enumerate(zip(rows.tolist(), cuts.tolist(), strict=True)):
        groups.setdefault((state.handles[c][0].serial, j), []).append(k)
    parts: list[tuple[list[int], _Suffix]] = []
    new_handles: list[tuple[_Slot, int] | None] = [None] * n
    for (_, j), members in sorted(groups.items()):
        chains = [int(rows[k]) for k in members]
        source = state.handles[chains[0]][0].session
        session = source.fork()
        session.select(torch.tensor([state.handles[c][1] for c in chains], dtype=torch.long))
        session.truncate(session.length - j)
        suf = _decode_rows(
            session,
            generator,
            caps=caps[members],
            eos_id=eos,
            config=config,
            force_eos=force_eos,
        )
        serial += 1
        slot = _Slot(session, serial)
        for i, k in enumerate(members):
            new_handles[k] = (slot, i)
        parts.append((members, suf))
        cost = cost + session.cost + Cost(generated_tokens=suf.generated)
    handles = tuple(h for h in new_handles if h is not None)
    return _pad_cat(parts, n, eos), handles, serial, cost, None


def _root_rows(state: MHState, rows: Tensor) -> Tensor:
    """Rows of the aligned root session (one per prompt) that the chains ``rows`` continue."""
    if state.owner is None:
        return torch.zeros(int(rows.numel()), dtype=torch.long)
    return state.owner[rows]


def _merge_root(
    state: MHState, rows: Tensor, take: Tensor, proposals: DecodeSession | None
) -> tuple[_Slot | None, Cost]:
    """Ragged batching: the session of the new states (chain ``c`` = row ``c``): proposal rows
    for the chains ``rows[take]``, the old rows otherwise. Returns it and its cost (the
    proposals' decoding included)."""
    if proposals is None or state.root is None:
        return state.root, Cost()
    chains = state.tokens.shape[0]
    merged = append_rows(state.root.session.fork(), proposals)
    index = torch.arange(chains)
    index[rows[take]] = chains + take.nonzero().flatten()
    merged.select(index)
    return _Slot(merged, state.root.serial + 1), merged.cost


def _splice(prefix: Tensor, cuts: Tensor, suffix: Tensor, fill: float | int) -> Tensor:
    """Rows of ``prefix`` ``[R, L]`` up to ``cuts``, then ``suffix`` ``[R, m]``, then ``fill``."""
    width = prefix.shape[1]
    m = suffix.shape[1]
    rel = torch.arange(width)[None, :] - cuts[:, None]
    if m == 0:
        body = torch.full_like(prefix, fill)
    else:
        body = suffix.gather(1, rel.clamp(0, m - 1))
        body = torch.where(rel < m, body, torch.full_like(body, fill))
    return torch.where(rel >= 0, body, prefix)


def _suffix_sum(values: Tensor, start: Tensor, stop: Tensor) -> Tensor:
    pos = torch.arange(values.shape[1])[None, :]
    mask = (pos >= start[:, None]) & (pos < stop[:, None])
    return torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)


# ============================================================================ init
def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_samples: int,
    initial: Sequence[Seq] | None = None,
    **config: Any,
) -> MHState:
    """``num_samples`` chains started from ``q_tau`` draws (capped at the first stage's cap).

    ``initial`` (plain mode only) starts chain ``c`` at the complete response ``initial[c]``
    instead; its per-token arrays are computed by teacher forcing (no generated tokens).
    ``**config`` as in :func:`make_config`.
    """
    cfg = _config_from(config)
    validation.generator("generator", generator)
    chains = validation.positive_int("num_samples", num_samples)
    return _init_joint([target], chains, generator, initial, cfg)


def init_many(
    targets: Sequence[TiltedTarget],
    *,
    generator: torch.Generator,
    num_samples: int,
    **config: Any,
) -> MHState:
    """``num_samples`` chains for *each* of ``targets``, all in one batch (one joint state).

    The targets must share the policy, ``max_new_tokens``, the truncation convention and the
    tilt structure (the same exponent of ``p_ref`` and the same names of the other tilt terms);
    prompts, rewards and their temperatures may differ. Chains of target ``i`` are the rows
    ``i·num_samples .. (i+1)·num_samples - 1``; every chain follows exactly the kernel of its own
    target (the batch only shares model calls). The decode session holds the rows of all prompts
    (:func:`tiltsample.policy.open_session_multi`). Step with :func:`build_kernel`; split the
    result with :func:`results`.
    """
    cfg = _config_from(config)
    validation.generator("generator", generator)
    chains = validation.positive_int("num_samples", num_samples)
    listed = list(targets)
    if not listed:
        raise ValueError("targets must hold at least one TiltedTarget")
    return _init_joint(listed, chains, generator, None, cfg)


def _check_joint(targets: list[TiltedTarget], cfg: MHConfig) -> list[TargetParts]:
    parts_all = []
    for i, t in enumerate(targets):
        if not isinstance(t, TiltedTarget):
            raise TypeError(f"targets[{i}] must be a TiltedTarget, got {type(t).__name__}")
        parts = decompose_target(t)
        _check_target(t, cfg, parts)
        parts_all.append(parts)
    first, p0 = targets[0], parts_all[0]
    for i, (t, p) in enumerate(zip(targets, parts_all, strict=True)):
        if t.policy is not first.policy:
            raise ValueError(
                f"targets[{i}] has another policy than targets[0]: one batch needs one"
            )
        if t.max_new_tokens != first.max_new_tokens or t.truncation != first.truncation:
            raise ValueError(
                f"targets[{i}] differs from targets[0] in max_new_tokens or truncation "
                f"({t.max_new_tokens}, {t.truncation!r} vs {first.max_new_tokens}, "
                f"{first.truncation!r})"
            )
        same_terms = [x.name for x in p.rest] == [x.name for x in p0.rest]
        if abs(p.power - p0.power) > 1e-12 * max(1.0, abs(p0.power)) or not same_terms:
            raise ValueError(
                f"targets[{i}] has another tilt structure than targets[0] (exponent of p_ref "
                f"{p.power} vs {p0.power}, terms {[x.name for x in p.rest]} vs "
                f"{[x.name for x in p0.rest]})"
            )
        if (t.reward is None) != (first.reward is None):
            raise ValueError(f"targets[{i}]: either every target has a reward or none has")
    return parts_all


def _init_joint(
    targets: list[TiltedTarget],
    per_target: int,
    generator: torch.Generator,
    initial: Sequence[Seq] | None,
    cfg: MHConfig,
) -> MHState:
    parts_all = _check_joint(targets, cfg)
    target, parts = targets[0], parts_all[0]
    joint = len(targets) > 1
    chains = per_target * len(targets)
    owner = torch.repeat_interleave(torch.arange(len(targets)), per_target) if joint else None
    prompts = [t.prompt for t in targets]
    caps = tuple(stage_caps(target.max_new_tokens, cfg.block_size))
    eos, width = target.eos_id, target.max_new_tokens
    condition = target.truncation == "condition"
    cap0 = torch.full((chains,), caps[0], dtype=torch.long)
    force: Tensor | bool = len(caps) == 1 and condition
    forced: Tensor | None = None
    if initial is not None:
        if cfg.block_size is not None:
            raise ValueError("initial= is supported for plain MH only (block_size=None)")
        if len(initial) != chains:
            raise ValueError(
                f"initial must hold num_samples={chains} responses, got {len(initial)}"
            )
        xs = target.check_sequences(list(initial), name="initial")
        cap0 = torch.tensor([len(x) for x in xs], dtype=torch.long)
        if int(cap0.min()) == 0:
            raise ValueError("initial responses must have at least one token")
        forced = torch.full((chains, width), eos, dtype=torch.long)
        for c, x in enumerate(xs):
            forced[c, : len(x)] = torch.tensor(x, dtype=torch.long)
        force = (cap0 == width) & condition
    if cfg.batching == "continuous":
        if initial is not None:
            raise ValueError(
                "initial= is not supported with batching='continuous' (use another batching)"
            )
        from tiltsample.samplers.mh_continuous import _init_continuous

        return _init_continuous(targets, parts_all, per_target, generator, cfg)
    root: _Slot | None = None
    policy = target.policy
    if cfg.batching == "aligned":
        base = (
            open_session_multi(policy, prompts, 1) if joint else open_session(policy, prompts[0], 1)
        )
        base.logprobs()  # encode the prompts once; every step forks this session
        root = _Slot(base, 0)
        session = base.fork()
        session.select(owner if owner is not None else torch.zeros(chains, dtype=torch.long))
        cost = base.cost
        mode = "aligned"
    else:
        session = (
            open_session_multi(policy, prompts, per_target)
            if joint
            else open_session(policy, prompts[0], chains)
        )
        cost = Cost()
        mode = cfg.batching
        if mode == "auto":
            mode = "ragged" if supports_ragged(session) else "grouped"
    suf = _decode_rows(
        session,
        generator,
        caps=cap0,
        eos_id=eos,
        config=cfg,
        force_eos=force,
        forced=forced,
        forced_until=None if forced is None else cap0,
    )
    if initial is not None and not bool(torch.isfinite(suf.g).all()):
        bad = int((~torch.isfinite(suf.g)).any(dim=1).nonzero()[0])
        raise ValueError(
            f"initial[{bad}] has a token the proposal cannot produce (q_tau = 0 with "
            f"proposal_temperature={cfg.proposal_temperature}, support={cfg.support!r})"
        )
    zeros = torch.zeros(chains, dtype=torch.long)
    tokens = _splice(torch.full((chains, width), eos, dtype=torch.long), zeros, suf.tokens, eos)
    blank = torch.zeros((chains, width), dtype=torch.float64)
    ell = _splice(blank, zeros, suf.ell, 0.0)
    log_ref = ell.sum(dim=1)
    cost = cost + session.cost + Cost(generated_tokens=suf.generated)
    all_rows = torch.arange(chains)
    rest, reward, rcost, per_calls = _score_chains(
        targets, parts_all, owner, all_rows, len(caps) == 1, tokens, suf.length, log_ref
    )
    slot = _Slot(session, 1)
    if mode == "ragged":
        root = slot
    generated = suf.length if initial is None else torch.zeros(chains, dtype=torch.long)
    return MHState(
        target=target,
        config=cfg,
        parts=parts,
        caps=caps,
        tokens=tokens,
        ell=ell,
        g=_splice(blank, zeros, suf.g, 0.0),
        entropy=_splice(blank, zeros, suf.entropy, 0.0),
        length=suf.length.clone(),
        log_reference=log_ref,
        rest=rest,
        reward=reward,
        chain_cap=torch.full((chains,), caps[0], dtype=torch.long),
        active=torch.ones(chains, dtype=torch.bool),
        stage=1,
        step_in_stage=0,
        steps_done=0,
        accepted_count=torch.zeros(chains, dtype=torch.long),
        moved_count=torch.zeros(chains, dtype=torch.long),
        handles=tuple((slot, c) for c in range(chains)) if mode == "grouped" else None,
        root=root,
        serial=1,
        last=None,
        cost=cost + rcost,
        batching=mode,
        targets=tuple(targets) if joint else (),
        owner=owner,
        chain_cost=torch.stack([generated.long(), per_calls], dim=1),
    )


def _config_from(config: dict[str, Any]) -> MHConfig:
    cfg = config.pop("_config", None)
    if cfg is None:
        return make_config(**config)
    if config:
        raise TypeError(f"unexpected parameters {sorted(config)}")
    if not isinstance(cfg, MHConfig):
        raise TypeError("_config must be an MHConfig")
    return cfg


def _needs_calls(target: TiltedTarget, parts: TargetParts) -> bool:
    """Whether scoring a complete response needs anything beyond ``log p_ref``."""
    primary = target.reward
    return bool(parts.rest) or (
        primary is not None and not getattr(primary, "uses_reference_logprob", False)
    )


def _score(
    target: TiltedTarget,
    parts: TargetParts,
    complete: bool,
    tokens: Tensor,
    length: Tensor,
    log_ref: Tensor,
) -> tuple[Tensor, Tensor | None, Cost]:
    """``rest``, primary reward and reward cost of responses (complete ones: the final stage)."""
    if complete and _needs_calls(target, parts):
        return evaluate_rest(target, parts, _seqs(tokens, length), log_ref)
    return torch.zeros_like(log_ref), _staged_reward(target, log_ref), Cost()


def _score_chains(
    targets: Sequence[TiltedTarget],
    parts_all: Sequence[TargetParts],
    owner: Tensor | None,
    chain_ids: Tensor,
    complete: bool,
    tokens: Tensor,
    length: Tensor,
    log_ref: Tensor,
) -> tuple[Tensor, Tensor | None, Cost, Tensor]:
    """:func:`_score` of the responses of chains ``chain_ids``, each under its own target; also
    the reward calls spent per response ``[R]``."""
    n = int(chain_ids.numel())
    if owner is None or len(targets) == 1:
        single = _score(targets[0], parts_all[0], complete, tokens, length, log_ref)
        calls = torch.full((n,), single[2].reward_calls // max(n, 1), dtype=torch.long)
        return single[0], single[1], single[2], calls
    rest = torch.zeros(n, dtype=torch.float64)
    reward: Tensor | None = None
    cost = Cost()
    per = torch.zeros(n, dtype=torch.long)
    mine = owner[chain_ids]
    for i, (t, p) in enumerate(zip(targets, parts_all, strict=True)):
        m = (mine == i).nonzero().flatten()
        if m.numel() == 0:
            continue
        r, w, c = _score(t, p, complete, tokens[m], length[m], log_ref[m])
        rest[m] = r
        if w is not None:
            if reward is None:
                reward = torch.zeros(n, dtype=torch.float64)
            reward[m] = w.to(torch.float64)
        cost = cost + c
        per[m] = c.reward_calls // int(m.numel())
    return rest, reward, cost, per


def _all_targets(state: MHState) -> tuple[tuple[TiltedTarget, ...], list[TargetParts]]:
    targets = state.targets or (state.target,)
    parts = [state.parts] if not state.targets else [decompose_target(t) for t in targets]
    return targets, parts


def _staged_reward(target: TiltedTarget, log_ref: Tensor) -> Tensor | None:
    primary = target.reward
    if primary is None or not getattr(primary, "uses_reference_logprob", False):
        return None
    out: Tensor = primary.from_reference(log_ref)  # type: ignore[attr-defined]
    return out.to(torch.float64)


# ============================================================================ kernel
def _advance_stage(state: MHState, generator: torch.Generator) -> MHState:
    """Finish chains whose state ends with EOS; extend the others to the next stage's cap."""
    complete = _complete(state)
    active = state.active & ~complete
    stage = state.stage + 1
    final = stage == len(state.caps)
    if state.config.length_mode == "reference":
        new_cap = (state.length + (state.config.block_size or 0)).clamp(
            max=state.target.max_new_tokens
        )
    else:
        new_cap = torch.full_like(state.length, state.caps[stage - 1])
    chain_cap = torch.where(active, new_cap, state.chain_cap)
    rows = active.nonzero().flatten()
    suf, handles, serial, cost, proposals = _regenerate(
        state._replace(active=active),
        generator,
        rows,
        state.length[rows],
        chain_cap[rows],
        _rows_force_eos(state, final),
    )
    tokens, ell, g, ent = (
        state.tokens.clone(),
        state.ell.clone(),
        state.g.clone(),
        state.entropy.clone(),
    )
    cuts = state.length[rows]
    tokens[rows] = _splice(tokens[rows], cuts, suf.tokens, state.target.eos_id)
    ell[rows] = _splice(ell[rows], cuts, suf.ell, 0.0)
    g[rows] = _splice(g[rows], cuts, suf.g, 0.0)
    ent[rows] = _splice(ent[rows], cuts, suf.entropy, 0.0)
    length = state.length.clone()
    length[rows] = cuts + suf.length
    log_ref = ell.sum(dim=1)
    root, merge_cost = _merge_root(
        state, rows, torch.ones(int(rows.numel()), dtype=torch.bool), proposals
    )
    cost = cost + merge_cost
    chain_cost = state.chain_cost
    if chain_cost is not None:
        chain_cost = chain_cost.clone()
        chain_cost[rows, 0] += suf.length
    new_handles = state.handles
    if handles is not None and state.handles is not None:
        listed = list(state.handles)
        for k, c in enumerate(rows.tolist()):
            listed[c] = handles[k]
        new_handles = tuple(listed)
    return state._replace(
        tokens=tokens,
        ell=ell,
        g=g,
        entropy=ent,
        length=length,
        log_reference=log_ref,
        reward=_staged_reward(state.target, log_ref),
        chain_cap=chain_cap,
        active=active,
        stage=stage,
        step_in_stage=0,
        handles=new_handles,
        serial=serial,
        cost=state.cost + cost,
        root=root,
        chain_cost=chain_cost,
    )


def _mh_step(state: MHState, generator: torch.Generator, ext_cost: Cost) -> tuple[MHState, MHInfo]:
    config, target = state.config, state.target
    chains, width = state.tokens.shape
    eos = target.eos_id
    rows = state.active.nonzero().flatten()
    final = _final_stage(state)
    reference = config.length_mode == "reference"
    # 1. cuts
    log_c = cut_log_probs(state.entropy[rows], state.length[rows], config.cut, config.cut_power)
    if rows.numel():
        cuts = torch.multinomial(torch.exp(log_c), 1, generator=generator).squeeze(1)
    else:
        cuts = torch.zeros(0, dtype=torch.long)
    log_c_fwd = log_c.gather(1, cuts[:, None]).squeeze(1) if rows.numel() else torch.zeros(0)
    # 2. proposals
    caps = state.length[rows] if reference else state.chain_cap[rows]
    suf, handles, serial, cost, proposals = _regenerate(
        state, generator, rows, cuts, caps, _rows_force_eos(state, final)
    )
    p_tokens = _splice(state.tokens[rows], cuts, suf.tokens, eos)
    p_ell = _splice(state.ell[rows], cuts, suf.ell, 0.0)
    p_g = _splice(state.g[rows], cuts, suf.g, 0.0)
    p_ent = _splice(state.entropy[rows], cuts, suf.entropy, 0.0)
    p_len = cuts + suf.length
    # 3. ratio
    stop_cur = cuts + suf.length if reference else state.length[rows]
    ell_cur = _suffix_sum(state.ell[rows], cuts, stop_cur)
    g_cur = _suffix_sum(state.g[rows], cuts, stop_cur)
    ell_prop = suf.ell.sum(dim=1)
    g_prop = suf.g.sum(dim=1)
    if reference and config.cut == "uniform":
        log_c_fwd_used = torch.zeros_like(ell_cur)
        log_c_rev = torch.zeros_like(ell_cur)
    else:
        log_c_fwd_used = log_c_fwd
        log_c_rev = cut_log_probs(p_ent, p_len, config.cut, config.cut_power)
        log_c_rev = log_c_rev.gather(1, cuts[:, None]).squeeze(1) if rows.numel() else log_c_fwd
    p_log_ref = p_ell.sum(dim=1)
    targets, parts_all = _all_targets(state)
    p_rest, p_reward, rcost, per_calls = _score_chains(
        targets, parts_all, state.owner, rows, final, p_tokens, p_len, p_log_ref
    )
    cost = cost + rcost
    ratio = mh_log_ratio(
        power=state.parts.power,
        ell_current=ell_cur,
        ell_proposal=ell_prop,
        g_current=g_cur,
        g_proposal=g_prop,
        rest_current=state.rest[rows],
        rest_proposal=p_rest,
        log_cut_forward=log_c_fwd_used,
        log_cut_reverse=log_c_rev,
        greedy=config.greedy,
    )
    log_u = torch.log(torch.rand(int(rows.numel()), generator=generator, dtype=torch.float64))
    acc = log_u < ratio.total
    root, merge_cost = _merge_root(state, rows, acc, proposals)
    cost = cost + merge_cost
    chain_cost = state.chain_cost
    if chain_cost is not None:
        chain_cost = chain_cost.clone()
        chain_cost[rows, 0] += suf.length
        chain_cost[rows, 1] += per_calls
    # 4. update
    tokens, ell, g, ent = (
        state.tokens.clone(),
        state.ell.clone(),
        state.g.clone(),
        state.entropy.clone(),
    )
    length, log_ref, rest = state.length.clone(), state.log_reference.clone(), state.rest.clone()
    take = rows[acc]
    tokens[take] = p_tokens[acc]
    ell[take] = p_ell[acc]
    g[take] = p_g[acc]
    ent[take] = p_ent[acc]
    length[take] = p_len[acc]
    log_ref[take] = p_log_ref[acc]
    rest[take] = p_rest[acc]
    reward: Tensor | None = None
    if state.reward is not None and p_reward is not None:
        reward = state.reward.clone()
        reward[take] = p_reward[acc]
    new_handles = state.handles
    if handles is not None and state.handles is not None:
        listed = list(state.handles)
        for k, c in enumerate(rows.tolist()):
            if bool(acc[k]):
                listed[c] = handles[k]
        new_handles = tuple(listed)

    # 5. info
    def full(values: Tensor, fill: float | int | bool, dtype: torch.dtype) -> Tensor:
        out = torch.full((chains,), fill, dtype=dtype)
        out[rows] = values.to(dtype)
        return out

    prop_tokens = torch.full((chains, width), eos, dtype=torch.long)
    prop_tokens[rows] = p_tokens
    step_cost = ext_cost + cost
    info = MHInfo(
        cost=step_cost,
        accepted=full(acc, False, torch.bool),
        cut=full(cuts, -1, torch.long),
        proposal_length=full(p_len, 0, torch.long),
        regenerated=full(suf.length, 0, torch.long),
        log_acceptance=full(ratio.total, 0.0, torch.float64),
        log_target_ratio=full(ratio.target, 0.0, torch.float64),
        log_proposal_ratio=full(ratio.proposal, 0.0, torch.float64),
        log_cut_ratio=full(ratio.cut, 0.0, torch.float64),
        moved=full(torch.ones_like(acc), False, torch.bool),
        proposal_tokens=prop_tokens,
        stage=state.stage,
    )
    new_state = state._replace(
        tokens=tokens,
        ell=ell,
        g=g,
        entropy=ent,
        length=length,
        log_reference=log_ref,
        rest=rest,
        reward=reward,
        step_in_stage=state.step_in_stage + 1,
        steps_done=state.steps_done + 1,
        accepted_count=state.accepted_count + info.accepted.long(),
        moved_count=state.moved_count + info.moved.long(),
        handles=new_handles,
        serial=serial,
        last=info,
        cost=state.cost + cost,
        root=root,
        chain_cost=chain_cost,
    )
    return new_state, info


def _idle_info(state: MHState, cost: Cost) -> MHInfo:
    chains, width = state.tokens.shape
    zl = torch.zeros(chains, dtype=torch.long)
    zf = torch.zeros(chains, dtype=torch.float64)
    zb = torch.zeros(chains, dtype=torch.bool)
    return MHInfo(
        cost,
        zb,
        torch.full((chains,), -1, dtype=torch.long),
        zl,
        zl,
        zf,
        zf,
        zf,
        zf,
        zb,
        torch.full((chains, width), state.target.eos_id, dtype=torch.long),
        state.stage,
    )


def build_kernel(**config: Any) -> Any:
    """``step(generator, state) -> (state, info)``: one MH step of every running chain.

    When the current stage's ``num_steps`` steps are done, the step first opens the next stage
    (finishing chains that ended with EOS and extending the others), then makes its MH step.
    ``**config`` as in :func:`make_config`; it must equal the configuration ``init`` used.
    """
    cfg = _config_from(config)

    def step(generator: torch.Generator, state: MHState) -> tuple[MHState, MHInfo]:
        if state.config != cfg:
            raise ValueError(
                "the state was initialised with a different MH configuration than this kernel: "
                f"{state.config} vs {cfg}"
            )
        if done(state):
            return state, _idle_info(state, Cost())
        if state.engine is not None:
            from tiltsample.samplers.mh_continuous import _continuous_step

            return _continuous_step(state)
        ext = Cost()
        if state.step_in_stage >= cfg.num_steps and not _final_stage(state):
            before = state.cost
            state = _advance_stage(state, generator)
            ext = _cost_diff(state.cost, before)
        if cfg.num_steps == 0 or not bool(state.active.any()):
            info = _idle_info(state, ext)
            return state._replace(last=info, steps_done=state.steps_done + 1), info
        return _mh_step(state, generator, ext)

    return step


def _cost_diff(after: Cost, before: Cost) -> Cost:
    return Cost(
        after.generated_tokens - before.generated_tokens,
        after.forward_tokens - before.forward_tokens,
        after.model_calls - before.model_calls,
        after.reward_calls - before.reward_calls,
    )


def done(state: MHState) -> bool:
    """True after the last stage's ``num_steps`` steps, or when every chain has finished."""
    if not bool(state.active.any()):
        return True
    if state.step_in_stage < state.config.num_steps:
        return False
    if _final_stage(state):
        return True
    return not bool((state.active & ~_complete(state)).any())


def total_steps(max_new_tokens: int, config: MHConfig) -> int:
    """Steps of a full run (an upper bound when staged chains can finish early)."""
    stages = len(stage_caps(max_new_tokens, config.block_size))
    if config.num_steps == 0:
        return stages - 1
    return stages * config.num_steps


def current_log_density(state: MHState) -> Tensor:
    """``[C]`` unnormalised log density of every chain's state under its current stage target."""
    return log_density_from_parts(state.parts.power, state.log_reference, state.rest)


def record(state: MHState) -> ChainRecord:
    """Current responses and per-chain statistics of the last step."""
    chains = state.tokens.shape[0]
    last = state.last if state.last is not None else _idle_info(state, Cost())
    stats = {
        "log_density": current_log_density(state),
        "accepted": last.accepted.to(torch.float64),
        "cut": last.cut.to(torch.float64),
        "proposal_length": last.proposal_length.to(torch.float64),
        "regenerated": last.regenerated.to(torch.float64),
        "acceptance_prob": torch.where(
            last.moved, torch.exp(last.log_acceptance.clamp(max=0.0)), torch.zeros(chains)
        ).to(torch.float64),
        "length": state.length.to(torch.float64),
    }
    if state.reward is not None:
        stats["reward"] = state.reward
    return ChainRecord(_seqs(state.tokens, state.length), stats)


def result(state: MHState) -> SampleSet:
    """The current response of every chain.

    Log-weights are 0, or ``-inf`` for a response outside the target's support: one that is not a
    complete response of the target (possible in ``length_mode="reference"``) or has zero target
    density (an initial draw the chain never left). ``meta["failed"]`` counts them.
    """
    target = state.target
    seqs = _seqs(state.tokens, state.length)
    complete = _complete(state) | (
        (state.length == target.max_new_tokens) & (target.truncation == "stop")
    )
    ok = complete & torch.isfinite(current_log_density(state))
    log_w = torch.where(ok, 0.0, -math.inf).to(torch.float64)
    moved = state.moved_count.clamp(min=1).to(torch.float64)
    meta: dict[str, Any] = {
        "num_steps": state.steps_done,
        "stages": len(state.caps),
        "stage_reached": state.stage,
        "acceptance_rate": (state.accepted_count.to(torch.float64) / moved).tolist(),
        "incomplete": int((~complete).sum()),
        "failed": int((~ok).sum()),
        "power": state.parts.power,
        "config": state.config.as_dict(),
        "batching": state.batching,
    }
    return SampleSet(
        seqs,
        log_w,
        state.cost,
        state.reward,
        state.log_reference.clone(),
        None,
        meta,
    )


def results(state: MHState) -> list[SampleSet]:
    """One :class:`SampleSet` per target of a joint state (:func:`init_many`), in target order.

    Each holds its target's chains (``num_samples`` of them) exactly as :func:`result` would.
    Cost: ``generated_tokens`` and ``reward_calls`` are those of the target's own chains;
    ``forward_tokens`` is the joint run's, apportioned in proportion to generated tokens (the
    rows share every forward call); ``model_calls`` is the joint run's (every call served all
    targets). ``meta["joint_cost"]`` is the joint run's cost and ``meta["joint_targets"]`` the
    number of targets. A single-target state gives ``[result(state)]``.
    """
    if not state.targets or state.owner is None:
        return [result(state)]
    total = state.cost
    chain_cost = state.chain_cost
    assert chain_cost is not None
    gen = [int(chain_cost[state.owner == i, 0].sum()) for i in range(len(state.targets))]
    forward = _apportion(total.forward_tokens, gen)
    out = []
    for i, t in enumerate(state.targets):
        m = (state.owner == i).nonzero().flatten()
        cost = Cost(
            generated_tokens=gen[i],
            forward_tokens=forward[i],
            model_calls=total.model_calls,
            reward_calls=int(chain_cost[m, 1].sum()),
        )
        sub = state._replace(
            target=t,
            parts=decompose_target(t),
            tokens=state.tokens[m],
            ell=state.ell[m],
            g=state.g[m],
            entropy=state.entropy[m],
            length=state.length[m],
            log_reference=state.log_reference[m],
            rest=state.rest[m],
            reward=None if state.reward is None else state.reward[m],
            accepted_count=state.accepted_count[m],
            moved_count=state.moved_count[m],
            cost=cost,
        )
        res = result(sub)
        res.meta["joint_cost"] = total
        res.meta["joint_targets"] = len(state.targets)
        out.append(res)
    return out


def _apportion(total: int, shares: list[int]) -> list[int]:
    """``total`` split in proportion to ``shares`` (largest remainder; sums to ``total``)."""
    weight = sum(shares)
    if weight == 0:
        base = [total // len(shares)] * len(shares)
        base[0] += total - sum(base)
        return base
    exact = [total * s / weight for s in shares]
    out = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (out[i] - exact[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def sample_many(
    targets: Sequence[TiltedTarget],
    num_samples: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    sampler: str = "mh",
    alpha: float | None = None,
    **params: Any,
) -> list[SampleSet]:
    """Run ``num_samples`` chains for each of ``targets`` in one batch; one result per target.

    ``sampler`` picks the configuration as the registered names do: ``"mh"`` (``params`` as in
    :func:`make_config`), ``"power"`` and ``"entropy-cut"`` (proposal temperature ``1/alpha``,
    ``alpha`` read from the targets' common exponent of ``p_ref`` unless given), ``"qalign"``
    (temperature 1, uniform cut). Targets must share the policy, cap, truncation and tilt
    structure (:func:`init_many`); each target's chains follow exactly the kernel they would
    follow alone — only the model calls are shared. Returns :func:`results`.
    """
    if generator is None:
        if seed is None:
            raise ValueError("sample_many needs seed= or generator=")
        generator = torch.Generator().manual_seed(validation.non_negative_int("seed", seed))
    validation.generator("generator", generator)
    listed = list(targets)
    if not listed:
        raise ValueError("targets must hold at least one TiltedTarget")
    validation.one_of("sampler", sampler, ("mh", "power", "entropy-cut", "qalign"))
    cfg_params = dict(params)
    if sampler in ("power", "entropy-cut"):
        a = resolve_alpha(listed[0], alpha)
        greedy = math.isinf(a)
        if "proposal_temperature" not in cfg_params:
            if greedy:
                raise ValueError("alpha=inf (max-swap) needs an explicit proposal_temperature")
            cfg_params["proposal_temperature"] = 1.0 / a
        cfg_params["greedy"] = greedy
        if sampler == "entropy-cut":
            cfg_params["cut"] = "entropy_jump"
    elif sampler == "qalign":
        cfg_params["proposal_temperature"] = 1.0
    elif alpha is not None:
        raise TypeError("alpha= applies to sampler='power' or 'entropy-cut'")
    cfg = make_config(**cfg_params)
    state = init_many(listed, generator=generator, num_samples=num_samples, _config=cfg)
    step = build_kernel(_config=cfg)
    while not done(state):
        state, _ = step(generator, state)
    return results(state)


# ============================================================================ factories
def _algorithm(
    name: str,
    target: TiltedTarget,
    num_samples: int,
    cfg: MHConfig,
    initial: Sequence[Seq] | None,
    params: dict[str, Any],
) -> SamplingAlgorithm:
    validation.positive_int("num_samples", num_samples)
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    _check_target(target, cfg, decompose_target(target))
    if initial is not None and len(initial) != num_samples:
        raise ValueError(f"initial must hold num_samples={num_samples} responses")
    return SamplingAlgorithm(
        name=name,
        kind="markov",
        init=lambda g: init(
            target, generator=g, num_samples=num_samples, initial=initial, _config=cfg
        ),
        step=build_kernel(_config=cfg),
        done=done,
        result=result,
        params=params,
        record=record,
        total_steps=total_steps(target.max_new_tokens, cfg),
    )


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_steps: int | None = None,
    cut: str = "uniform",
    cut_power: float = 4.0,
    proposal_temperature: float = 1.0,
    length_mode: str = "exact",
    support: str = "full",
    top_k: int = 50,
    block_size: int | None = None,
    batching: str = "auto",
    initial: Sequence[Seq] | None = None,
    max_rows: int | None = None,
) -> SamplingAlgorithm:
    """Suffix-resampling MH on any autoregressive target (see the module docstring).

    Parameters
    ----------
    target
        The target ``pi``; ``num_samples`` independent chains are run.
    num_steps
        MH steps per stage (the whole run is one stage when ``block_size`` is None). Default
        100 for plain MH, 10 per stage (the paper's ``N_MCMC``) when staged; 0 is allowed when
        staged (pure block-wise low-temperature decoding).
    cut
        ``"uniform"`` or ``"entropy_jump"`` (``cut_power`` = ``beta``, default 4).
    proposal_temperature
        ``tau`` of the suffix proposal (1 = QAlign; ``1/alpha`` = power sampling).
    length_mode
        ``"exact"`` (reversible, default) or ``"reference"`` (the published code's truncation;
        not reversible, for reproducing published numbers; ``truncation="stop"`` only).
    support
        ``"full"`` (no truncation anywhere) or ``"top_k"`` (target and proposal restricted to the
        ``top_k`` most likely tokens at every prefix; ``l`` from the full softmax).
    block_size
        ``B`` of the stage schedule (None: plain MH on the full target).
    batching
        ``"auto"`` (default: ``"ragged"`` when the policy's session has ragged rows, else
        ``"grouped"``), ``"ragged"`` (all chains cut at their own positions and decoded in one
        batch; nothing re-encoded), ``"grouped"`` (one batch per (session, cut) group) or
        ``"aligned"`` (one batch per step, re-feeds frozen prefixes above the smallest cut) or
        ``"continuous"`` (chains leave the lock-step: a chain whose proposal ended starts its next
        step at once; plain MH only, no ``initial``; per-chain random streams).
    initial
        Optional starting responses, one per chain (plain mode).
    max_rows
        ``batching="continuous"`` only: decode at most this many chains at once (the session's
        rows); the other chains wait and take the row of a chain that has made all its steps.
        Default: one row per chain.
    """
    cfg = make_config(
        num_steps=num_steps,
        cut=cut,
        cut_power=cut_power,
        proposal_temperature=proposal_temperature,
        length_mode=length_mode,
        support=support,
        top_k=top_k,
        block_size=block_size,
        batching=batching,
        max_rows=max_rows,
    )
    return _algorithm("mh", target, num_samples, cfg, initial, cfg.as_dict())


def power_sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    alpha: float | None = None,
    num_steps: int | None = None,
    proposal_temperature: float | None = None,
    cut: str = "uniform",
    cut_power: float = 4.0,
    length_mode: str = "exact",
    support: str = "full",
    top_k: int = 50,
    block_size: int | None = None,
    batching: str = "auto",
    initial: Sequence[Seq] | None = None,
    name: str = "power",
    max_rows: int | None = None,
) -> SamplingAlgorithm:
    """Power sampling (Karan & Du): MH on ``p_ref^alpha``, suffix proposals at ``tau = 1/alpha``.

    ``alpha`` is read from a power target (``tiltsample.power_target(policy, alpha)``); for any
    other target it must be given and only sets ``tau``. ``alpha=inf`` is max-swap (accept iff the
    suffix log-likelihood strictly increases) and needs an explicit ``proposal_temperature``.
    Other parameters as in :func:`sampler`.
    """
    a = resolve_alpha(target, alpha)
    greedy = math.isinf(a)
    if proposal_temperature is None:
        if greedy:
            raise ValueError(
                "alpha=inf (max-swap) needs an explicit proposal_temperature (1/alpha = 0 would "
                "be greedy decoding)"
            )
        proposal_temperature = 1.0 / a
    cfg = make_config(
        num_steps=num_steps,
        cut=cut,
        cut_power=cut_power,
        proposal_temperature=proposal_temperature,
        length_mode=length_mode,
        support=support,
        top_k=top_k,
        block_size=block_size,
        batching=batching,
        greedy=greedy,
        max_rows=max_rows,
    )
    params = {"alpha": a, **cfg.as_dict()}
    return _algorithm(name, target, num_samples, cfg, initial, params)


def entropy_cut_sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    alpha: float | None = None,
    cut_power: float = 4.0,
    **params: Any,
) -> SamplingAlgorithm:
    """Entropy-cut MH (Zhou, Mehrotra & Liu): :func:`power_sampler` with the entropy-jump cut."""
    if "cut" in params:
        raise TypeError("entropy-cut fixes cut='entropy_jump'; use the 'mh' sampler to change it")
    return power_sampler(
        target,
        num_samples=num_samples,
        alpha=alpha,
        cut="entropy_jump",
        cut_power=cut_power,
        name="entropy-cut",
        **params,
    )


def qalign_sampler(
    target: TiltedTarget,
    *,
    num_samples: int,
    num_steps: int | None = None,
    batching: str = "auto",
    initial: Sequence[Seq] | None = None,
    max_rows: int | None = None,
) -> SamplingAlgorithm:
    """QAlign (Faria & Smith): uniform-cut suffix MH with ``p_ref`` at ``tau = 1`` as proposal.

    The likelihoods cancel, so ``log A = Δ log_tilt + log(|y|/|y'|)`` (:func:`qalign_log_ratio`);
    the kernel computes the full ratio, which equals the shortcut up to rounding (and stays exact
    under ``truncation="condition"``, where the shortcut misses the forced EOS's probability).
    """
    cfg = make_config(
        num_steps=num_steps, proposal_temperature=1.0, batching=batching, max_rows=max_rows
    )
    return _algorithm("qalign", target, num_samples, cfg, initial, cfg.as_dict())
