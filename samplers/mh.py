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
    every token lies in the top-``k`` set of its prefix (the law the proposal can reach).
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
    non-reference tilt term. Sessions never re-encode a frozen prefix with
    ``batching="grouped"`` (default): chains are grouped by (session, cut), each group is forked,
    selected and truncated to its cut and decoded as one batch; a rejected proposal costs nothing
    to undo; but chains cut at different positions decode in separate batches.
    ``batching="aligned"`` decodes all chains in lock-step in one batch per step: a prefill up to
    the smallest cut, then every row teacher-forced with its own frozen tokens up to its cut (far
    fewer model calls, 5-7x faster on the embedded tiny LM; the re-encoded prefixes are counted in
    ``forward_tokens``). Same kernel either way.
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
from tiltsample.policy import DecodeSession, open_session
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
    "log_density_from_parts",
    "make_config",
    "mh_log_ratio",
    "power_sampler",
    "qalign_log_ratio",
    "qalign_sampler",
    "record",
    "resolve_alpha",
    "result",
    "sampler",
    "stage_caps",
    "token_law",
    "total_steps",
]

CUTS: tuple[str, ...] = ("uniform", "entropy_jump")
LENGTH_MODES: tuple[str, ...] = ("exact", "reference")
SUPPORTS: tuple[str, ...] = ("full", "top_k")
BATCHINGS: tuple[str, ...] = ("grouped", "aligned")

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
    batching: str = "grouped"
    greedy: bool = False

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
        if not isinstance(self.greedy, bool):
            raise TypeError(f"greedy must be a bool, got {type(self.greedy).__name__}")

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
    batching: str = "grouped",
    greedy: bool = False,
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
) -> _Suffix:
    """Extend every row of ``session`` from its length to EOS or its own cap ``caps[r]``.

    Rows are teacher-forced with ``forced[r, t - start]`` while ``t < forced_until[r]`` (their
    stats are recorded, their tokens not counted as generated). A row with ``force_eos[r]`` (the
    ``truncation="condition"`` rule) reaching position ``cap - 1`` gets EOS with ``g = 0`` and
    ``l = log p(EOS | x_<cap)`` (a teacher-forced EOS there is treated the same way). A row that
    stops at its cap without EOS is padded with EOS in the session (its tokens past the cap are
    never read: the next use truncates below them).
    """
    rows = session.batch_size
    start = session.length
    if rows == 0:
        return _empty_suffix(0)
    live = caps > start
    steps = int(caps.max()) - start
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
        session.extend(torch.where(live, tok, eos))
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
) -> tuple[_Suffix, tuple[tuple[_Slot, int], ...] | None, int, Cost]:
    """Decode new suffixes of ``rows`` from ``cuts`` to ``caps``; return them and their handles."""
    config, eos = state.config, state.target.eos_id
    n = int(rows.numel())
    serial = state.serial
    cost = Cost()
    if n == 0:
        return _empty_suffix(0), (), serial, cost
    if config.batching == "aligned":
        assert state.root is not None
        session = state.root.session.fork()
        session.select(torch.zeros(n, dtype=torch.long))
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
        return suf, None, serial, cost
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
    return _pad_cat(parts, n, eos), handles, serial, cost


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
    parts = decompose_target(target)
    _check_target(target, cfg, parts)
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
    root: _Slot | None = None
    if cfg.batching == "aligned":
        base = open_session(target.policy, target.prompt, 1)
        base.logprobs()  # encode the prompt once; every step forks this session
        root = _Slot(base, 0)
        session = base.fork()
        session.select(torch.zeros(chains, dtype=torch.long))
        cost = base.cost
    else:
        session = open_session(target.policy, target.prompt, chains)
        cost = Cost()
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
    rest, reward, rcost = _score(target, parts, len(caps) == 1, tokens, suf.length, log_ref)
    slot = _Slot(session, 1)
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
        handles=None if root is not None else tuple((slot, c) for c in range(chains)),
        root=root,
        serial=1,
        last=None,
        cost=cost + rcost,
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
    suf, handles, serial, cost = _regenerate(
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
    suf, handles, serial, cost = _regenerate(
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
    p_rest, p_reward, rcost = _score(target, state.parts, final, p_tokens, p_len, p_log_ref)
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


# ============================================================================ outputs
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
    batching: str = "grouped",
    initial: Sequence[Seq] | None = None,
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
        ``"grouped"`` (default; no frozen prefix is ever re-encoded) or ``"aligned"`` (one batch
        per step; fewer model calls, re-feeds frozen prefixes above the smallest cut).
    initial
        Optional starting responses, one per chain (plain mode).
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
    batching: str = "grouped",
    initial: Sequence[Seq] | None = None,
    name: str = "power",
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
    batching: str = "grouped",
    initial: Sequence[Seq] | None = None,
) -> SamplingAlgorithm:
    """QAlign (Faria & Smith): uniform-cut suffix MH with ``p_ref`` at ``tau = 1`` as proposal.

    The likelihoods cancel, so ``log A = Δ log_tilt + log(|y|/|y'|)`` (:func:`qalign_log_ratio`);
    the kernel computes the full ratio, which equals the shortcut up to rounding (and stays exact
    under ``truncation="condition"``, where the shortcut misses the forced EOS's probability).
    """
    cfg = make_config(num_steps=num_steps, proposal_temperature=1.0, batching=batching)
    return _algorithm("qalign", target, num_samples, cfg, initial, cfg.as_dict())
