r"""Exact transition matrices of the suffix-resampling MH samplers on enumerable targets.

For a configuration of :mod:`tiltsample.samplers.mh` (cut law, proposal temperature, length mode,
support, max-swap) and a toy target, :func:`mh_kernel` builds the transition matrix ``P`` over
every response the chain can visit:

.. math::

    P(x, x') = \sum_{j < |x|} c_x(j)\, q_\tau(x'_{\ge j} \mid x_{<j})\, \min\{1, A(x, j, x')\}
    \quad (x' \ne x),

summing, for every cut ``j``, over the suffixes the proposal can produce from ``x_<j`` (the decode
trie of ``q_tau``, enumerated once with per-token ``l``, ``g`` and ``H``). The acceptance and the
cut and token laws are the sampler's own functions (:func:`~tiltsample.samplers.mh.mh_log_ratio`,
:func:`~tiltsample.samplers.mh.cut_log_probs`, :func:`~tiltsample.samplers.mh.token_law`), so this
is the kernel *as implemented*; its target law is computed independently of the kernel
(``log pi = a · log p_ref + rest``) and the tests compare it with
:func:`tiltsample.theory.exact_distribution`.

On top of the matrix: :func:`detailed_balance_error`, :func:`stationarity_error`, ``k``-step laws
and TV curves (:func:`tv_curve`), :func:`mixing_time`, :func:`spectral_gap`,
:func:`integrated_autocorrelation_time` (hence the exact ESS of a run); the exact output law of
the block-wise stage schedule (:func:`stage_schedule_law`); and the closed form of the
decision-trace toy (``specs/mcmc.md`` §3.5: :func:`decision_trace_rates`,
:func:`decision_trace_mixing_time`).

``length_mode="reference"`` (the published code's truncation) adds the responses it can wander
into that are not complete responses of the target (unterminated and shorter than the cap); they
have target probability 0, so the kernel is not stationary for ``pi`` (see :func:`leak_mass`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.samplers.mh import (
    MHConfig,
    cut_log_probs,
    decompose_target,
    evaluate_rest,
    log_density_from_parts,
    make_config,
    mh_log_ratio,
    stage_caps,
    token_law,
)
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = [
    "MHKernel",
    "SwitchingRates",
    "decision_trace_mixing_time",
    "decision_trace_rates",
    "decision_trace_tv",
    "detailed_balance_error",
    "integrated_autocorrelation_time",
    "law_after",
    "leak_mass",
    "mh_kernel",
    "mixing_time",
    "spectral_gap",
    "stage_schedule_law",
    "stationarity_error",
    "tv_curve",
]

DEFAULT_MAX_NODES = 200_000


# ============================================================================ decode trie
@dataclass
class _Trie:
    """Every prefix the proposal can produce, with per-token ``l``, ``g``, ``H`` (padded)."""

    nodes: list[Seq]
    index: dict[Seq, int]
    tokens: Tensor  # [N, L] long
    ell: Tensor  # [N, L] float64 (0 padded)
    g: Tensor
    entropy: Tensor
    length: Tensor  # [N] long
    terminal: Tensor  # [N] bool: ends with EOS or reaches the cap
    below: dict[Seq, list[int]]  # prefix -> terminal node ids strictly extending it
    below_all: dict[Seq, list[int]] | None  # prefix -> all node ids strictly extending it


def _build_trie(
    target: TiltedTarget, config: MHConfig, max_nodes: int, all_nodes: bool = False
) -> _Trie:
    policy, prompt, eos = target.policy, target.prompt, target.eos_id
    cap, condition = target.max_new_tokens, target.truncation == "condition"
    nodes: list[Seq] = []
    stats: list[tuple[list[float], list[float], list[float]]] = []
    terminal: list[bool] = []
    frontier: list[tuple[Seq, list[float], list[float], list[float]]] = [((), [], [], [])]
    for depth in range(cap):
        if not frontier:
            break
        lp = policy.next_logprobs(prompt, [f[0] for f in frontier]).to(torch.float64)
        law = token_law(lp, config.proposal_temperature, config.support, config.top_k)
        nxt: list[tuple[Seq, list[float], list[float], list[float]]] = []
        for r, (prefix, ell, g, ent) in enumerate(frontier):
            h = float(law.entropy[r])
            if condition and depth == cap - 1:
                children = [(eos, float(law.log_p[r, eos]), 0.0)]
            else:
                ok = torch.isfinite(law.log_q[r]).nonzero().flatten().tolist()
                children = [(v, float(law.log_p[r, v]), float(law.log_q[r, v])) for v in ok]
            for v, lv, gv in children:
                x = (*prefix, v)
                item = (x, [*ell, lv], [*g, gv], [*ent, h])
                done = v == eos or len(x) == cap
                nodes.append(x)
                stats.append(item[1:])
                terminal.append(done)
                if not done:
                    nxt.append(item)
            if len(nodes) > max_nodes:
                raise ValueError(
                    f"the decode trie exceeds max_nodes={max_nodes}; use a smaller toy"
                )
        frontier = nxt
    n = len(nodes)
    tokens = torch.full((n, cap), eos, dtype=torch.long)
    arrays = [torch.zeros((n, cap), dtype=torch.float64) for _ in range(3)]
    for i, (x, st) in enumerate(zip(nodes, stats, strict=True)):
        tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        for arr, values in zip(arrays, st, strict=True):
            arr[i, : len(x)] = torch.tensor(values, dtype=torch.float64)
    below: dict[Seq, list[int]] = {}
    below_all: dict[Seq, list[int]] | None = {} if all_nodes else None
    for i, (x, done) in enumerate(zip(nodes, terminal, strict=True)):
        if done or below_all is not None:
            for t in range(len(x)):
                if done:
                    below.setdefault(x[:t], []).append(i)
                if below_all is not None:
                    below_all.setdefault(x[:t], []).append(i)
    return _Trie(
        nodes,
        {x: i for i, x in enumerate(nodes)},
        tokens,
        arrays[0],
        arrays[1],
        arrays[2],
        torch.tensor([len(x) for x in nodes], dtype=torch.long),
        torch.tensor(terminal, dtype=torch.bool),
        below,
        below_all,
    )


# ============================================================================ the kernel
@dataclass(frozen=True)
class MHKernel:
    """The exact transition matrix of one MH configuration on one target.

    Attributes
    ----------
    states
        Every response the chain can occupy: all complete responses the proposal can produce
        (including zero-density ones a chain may start from), plus, in ``"reference"`` length mode,
        the incomplete responses it can wander into.
    matrix
        ``[S, S]`` float64 row-stochastic ``P``.
    target
        ``[S]`` float64: the target law ``pi`` on the states (0 off the support).
    log_density
        ``[S]`` float64 unnormalised ``log pi`` (``-inf`` off the support).
    initial
        ``[S]`` float64: the law of a chain's first state (a ``q_tau`` draw).
    complete
        ``[S]`` bool: the state is a complete response of the target.
    """

    states: list[Seq]
    matrix: Tensor
    target: Tensor
    log_density: Tensor
    initial: Tensor
    complete: Tensor

    def index(self, x: Seq) -> int:
        """Position of ``x`` in :attr:`states`."""
        return self.states.index(tuple(x))

    def as_dict(self, law: Tensor) -> dict[Seq, float]:
        """``{state: probability}`` of a law over the states (zeros dropped)."""
        return {x: float(p) for x, p in zip(self.states, law.tolist(), strict=True) if p > 0}


def mh_kernel(
    target: TiltedTarget,
    *,
    cut: str = "uniform",
    cut_power: float = 4.0,
    proposal_temperature: float = 1.0,
    length_mode: str = "exact",
    support: str = "full",
    top_k: int = 50,
    greedy: bool = False,
    max_nodes: int = DEFAULT_MAX_NODES,
) -> MHKernel:
    """The exact MH transition matrix of :mod:`tiltsample.samplers.mh` on an enumerable target.

    Parameters are those of :func:`tiltsample.samplers.mh.sampler` (``greedy`` is max-swap,
    ``alpha=inf``). Plain MH on the target's own cap and convention; use
    :func:`stage_schedule_law` for the stage schedule.
    """
    config = make_config(
        num_steps=1,
        cut=cut,
        cut_power=cut_power,
        proposal_temperature=proposal_temperature,
        length_mode=length_mode,
        support=support,
        top_k=top_k,
        greedy=greedy,
    )
    return _kernel(target, config, max_nodes)


def _kernel(target: TiltedTarget, config: MHConfig, max_nodes: int) -> MHKernel:
    parts = decompose_target(target)
    reference = config.length_mode == "reference"
    if reference and (target.truncation != "stop" or parts.rest):
        raise ValueError("length_mode='reference' needs truncation='stop' and a pure power target")
    trie = _build_trie(target, config, max_nodes, all_nodes=reference)
    lengths = trie.length.tolist()
    terminal = trie.terminal.tolist()
    cut_lp = cut_log_probs(trie.entropy, trie.length, config.cut, config.cut_power)
    zeros = torch.zeros((trie.ell.shape[0], 1), dtype=torch.float64)
    ell_cum = torch.cat([zeros, trie.ell.cumsum(1)], dim=1)  # ell_cum[:, j] = sum_{t<j}
    g_cum = torch.cat([zeros, trie.g.cumsum(1)], dim=1)
    # states: complete responses, closed under the moves (reference mode adds leak states)
    leaves = trie.terminal.nonzero().flatten().tolist()
    state_ids: list[int] = list(leaves)
    position = {u: k for k, u in enumerate(state_ids)}

    def candidates(u: int, j: int) -> list[int]:
        prefix = trie.nodes[u][:j]
        if trie.below_all is None:
            return trie.below.get(prefix, [])
        m = lengths[u]
        return [
            v
            for v in trie.below_all.get(prefix, [])
            if (terminal[v] and lengths[v] <= m) or (lengths[v] == m and not terminal[v])
        ]

    # rest terms and the target density of complete responses
    leaf_seqs = [trie.nodes[u] for u in leaves]
    log_ref = trie.ell.sum(1)
    rest = torch.zeros(len(trie.nodes), dtype=torch.float64)
    if leaves:
        idx = torch.tensor(leaves, dtype=torch.long)
        values, _, _ = evaluate_rest(target, parts, leaf_seqs, log_ref[idx])
        rest[idx] = values
    rows: list[list[tuple[int, float]]] = []
    k = 0
    while k < len(state_ids):
        u = state_ids[k]
        n = lengths[u]
        entries: list[tuple[int, float]] = []
        for j in range(n):
            log_c = float(cut_lp[u, j])
            if log_c == -math.inf:
                continue
            cand = candidates(u, j)
            cid = torch.tensor(cand, dtype=torch.long)
            # cumulative sums: a -inf token (a forced EOS of probability 0, always the last
            # token) makes the difference -inf, never NaN
            ell_prop = ell_cum[cid, -1] - ell_cum[cid, j]
            g_prop = g_cum[cid, -1] - g_cum[cid, j]
            if reference:  # the current suffix truncated to the proposal's length
                stop = trie.length[cid]
                ell_cur = ell_cum[u, stop] - ell_cum[u, j]
                g_cur = g_cum[u, stop] - g_cum[u, j]
            else:
                ell_cur = (ell_cum[u, -1] - ell_cum[u, j]).expand(len(cand))
                g_cur = (g_cum[u, -1] - g_cum[u, j]).expand(len(cand))
            if reference and config.cut == "uniform":
                fwd = torch.zeros(len(cand), dtype=torch.float64)
                rev = torch.zeros(len(cand), dtype=torch.float64)
            else:
                fwd = torch.full((len(cand),), log_c, dtype=torch.float64)
                rev = cut_lp[cid, j]
            ratio = mh_log_ratio(
                power=parts.power,
                ell_current=ell_cur,
                ell_proposal=ell_prop,
                g_current=g_cur,
                g_proposal=g_prop,
                rest_current=rest[u].expand(len(cand)),
                rest_proposal=rest[cid],
                log_cut_forward=fwd,
                log_cut_reverse=rev,
                greedy=config.greedy,
            )
            accept = torch.exp(ratio.total.clamp(max=0.0))
            move = torch.exp(log_c + g_prop) * accept
            for v, p in zip(cand, move.tolist(), strict=True):
                if p > 0.0:
                    if v not in position:
                        position[v] = len(state_ids)
                        state_ids.append(v)
                    entries.append((position[v], p))
        rows.append(entries)
        k += 1
    size = len(state_ids)
    matrix = torch.zeros((size, size), dtype=torch.float64)
    for i, entries in enumerate(rows):
        for col, p in entries:
            matrix[i, col] += p
        matrix[i, i] += 1.0 - float(matrix[i].sum())
    sid = torch.tensor(state_ids, dtype=torch.long)
    complete = trie.terminal[sid]
    log_density = log_density_from_parts(parts.power, log_ref[sid], rest[sid])
    log_density = torch.where(complete, log_density, torch.full_like(log_density, -math.inf))
    if not bool(torch.isfinite(log_density).any()):
        raise ValueError("the target has zero mass on the responses the proposal can produce")
    target_law = torch.softmax(log_density, 0)
    initial = torch.where(
        complete, torch.exp(g_cum[sid, -1]), torch.zeros(size, dtype=torch.float64)
    )
    return MHKernel(
        [trie.nodes[u] for u in state_ids], matrix, target_law, log_density, initial, complete
    )


# ============================================================================ kernel analysis
def detailed_balance_error(kernel: MHKernel, law: Tensor | None = None) -> float:
    """``max_{i,j} |pi_i P_ij - pi_j P_ji|`` (``law`` defaults to the kernel's target)."""
    pi = kernel.target if law is None else law
    flow = pi[:, None] * kernel.matrix
    return float((flow - flow.T).abs().max())


def stationarity_error(kernel: MHKernel, law: Tensor | None = None) -> float:
    """``max_j |(pi P)_j - pi_j|``."""
    pi = kernel.target if law is None else law
    return float((pi @ kernel.matrix - pi).abs().max())


def leak_mass(kernel: MHKernel) -> float:
    """Probability of leaving the target's complete responses in one step, started from ``pi``."""
    step = kernel.target @ kernel.matrix
    return float(step[~kernel.complete].sum())


def law_after(kernel: MHKernel, steps: int, initial: Tensor | None = None) -> Tensor:
    """The law of the chain after ``steps`` steps (``initial`` defaults to a ``q_tau`` draw)."""
    validation.non_negative_int("steps", steps)
    mu = kernel.initial if initial is None else initial.to(torch.float64)
    for _ in range(steps):
        mu = mu @ kernel.matrix
    return mu


def tv_curve(kernel: MHKernel, steps: int, initial: Tensor | None = None) -> Tensor:
    """``[steps + 1]``: ``TV(mu_0 P^n, pi)`` for ``n = 0..steps``."""
    validation.non_negative_int("steps", steps)
    mu = kernel.initial if initial is None else initial.to(torch.float64)
    out = torch.empty(steps + 1, dtype=torch.float64)
    for n in range(steps + 1):
        out[n] = 0.5 * (mu - kernel.target).abs().sum()
        mu = mu @ kernel.matrix
    return out


def mixing_time(
    kernel: MHKernel, eps: float = 0.1, initial: Tensor | None = None, max_steps: int = 1_000_000
) -> int:
    """The first ``n`` with ``TV(mu_0 P^n, pi) < eps`` (``ValueError`` beyond ``max_steps``)."""
    eps = validation.positive_float("eps", eps)
    mu = kernel.initial if initial is None else initial.to(torch.float64)
    for n in range(max_steps + 1):
        if 0.5 * float((mu - kernel.target).abs().sum()) < eps:
            return n
        mu = mu @ kernel.matrix
    raise ValueError(f"TV did not fall below eps={eps} within max_steps={max_steps}")


def spectral_gap(kernel: MHKernel) -> float:
    """``1 - |lambda_2|`` of the reversible kernel restricted to the target's support.

    Computed on the symmetrised matrix ``D^{1/2} P D^{-1/2}`` (``D = diag(pi)``), which has real
    eigenvalues when ``P`` is reversible; ``1/gap`` is the relaxation time.
    """
    keep = kernel.target > 0
    pi = kernel.target[keep]
    p = kernel.matrix[keep][:, keep]
    root = pi.sqrt()
    sym = root[:, None] * p / root[None, :]
    sym = 0.5 * (sym + sym.T)
    eig = torch.linalg.eigvalsh(sym)
    if eig.numel() < 2:
        return 1.0
    second = torch.sort(eig.abs(), descending=True).values[1]
    return float(1.0 - second)


def integrated_autocorrelation_time(kernel: MHKernel, values: Tensor) -> float:
    r"""Exact ``tau_f = 1 + 2 sum_{k>=1} corr_pi(f(X_0), f(X_k))`` of a stationary chain.

    With ``f̄ = f - E_pi f``, ``D = diag(pi)`` and the fundamental matrix
    ``Z = (I - P + 1 pi^T)^{-1}`` (so ``sum_{k>=0} P^k f̄ = Z f̄``),
    ``tau_f = (2 f̄^T D Z f̄ - f̄^T D f̄) / f̄^T D f̄``. ``N`` correlated draws then estimate
    ``E_pi f`` with the variance of ``N / tau_f`` independent ones (the effective sample size).
    Restricted to the target's support (a reversible, irreducible kernel there).
    """
    keep = kernel.target > 0
    pi = kernel.target[keep]
    p = kernel.matrix[keep][:, keep]
    f = torch.as_tensor(values, dtype=torch.float64)[keep]
    centred = f - (pi * f).sum()
    var = float((pi * centred * centred).sum())
    if var <= 0.0:
        return 1.0
    size = int(pi.numel())
    fundamental = torch.linalg.inv(torch.eye(size, dtype=torch.float64) - p + pi[None, :])
    summed = float((pi * centred * (fundamental @ centred)).sum())
    return (2.0 * summed - var) / var


# ============================================================================ stage schedule
def stage_schedule_law(
    target: TiltedTarget,
    *,
    block_size: int,
    num_steps: int,
    cut: str = "uniform",
    cut_power: float = 4.0,
    proposal_temperature: float = 1.0,
    support: str = "full",
    top_k: int = 50,
    greedy: bool = False,
    max_nodes: int = DEFAULT_MAX_NODES,
) -> dict[Seq, float]:
    r"""Exact output law of the block-wise schedule (Karan & Du, Algorithm 1), exact length mode.

    Stage ``k`` starts from the previous stage's law (stage 1 from ``q_tau`` capped at ``L_1``),
    applies ``num_steps`` steps of the stage-``k`` kernel (target ``p^a`` on stopped responses of
    cap ``L_k``; the target's own convention at the last stage), then responses ending with EOS are
    returned and the others are extended by ``q_tau`` to ``L_{k+1}``.
    """
    validation.positive_int("block_size", block_size)
    validation.non_negative_int("num_steps", num_steps)
    config = make_config(
        num_steps=num_steps,
        cut=cut,
        cut_power=cut_power,
        proposal_temperature=proposal_temperature,
        support=support,
        top_k=top_k,
        block_size=block_size,
        greedy=greedy,
    )
    if decompose_target(target).rest:
        raise ValueError("the stage schedule needs a target whose tilt is a power of p_ref")
    caps = stage_caps(target.max_new_tokens, block_size)
    finished: dict[Seq, float] = {}
    current: dict[Seq, float] = {}
    for k, cap in enumerate(caps):
        last = k == len(caps) - 1
        view = dataclasses.replace(
            target, max_new_tokens=cap, truncation=target.truncation if last else "stop"
        )
        kernel = _kernel(view, config, max_nodes)
        if k == 0:
            mu = kernel.initial.clone()
        else:
            trie = _build_trie(view, config, max_nodes)
            mu = torch.zeros(len(kernel.states), dtype=torch.float64)
            for x, p in current.items():
                for v in trie.below.get(x, []):
                    q = math.exp(float(trie.g[v, len(x) :].sum()))
                    mu[kernel.index(trie.nodes[v])] += p * q
        mu = law_after(kernel, num_steps, mu)
        current = {}
        for x, p in zip(kernel.states, mu.tolist(), strict=True):
            if p == 0.0:
                continue
            if last or x[-1] == target.eos_id:
                finished[x] = finished.get(x, 0.0) + p
            else:
                current[x] = current.get(x, 0.0) + p
    return finished


# ============================================================================ decision trace
class SwitchingRates(NamedTuple):
    """The two-state (A/B) lumped chain of the decision-trace toy (``specs/mcmc.md`` §3.5)."""

    a: float
    """``P(A_i -> B)`` per step."""
    b: float
    """``P(B -> A)`` per step."""
    initial_b: float
    """``P_0(B) = q_tau(B)`` (the chain starts from a ``q_tau`` draw)."""
    target_b: float
    """``pi(B)``."""
    trace_length: int
    """``T = 2L + 2``."""


def decision_trace_rates(
    filler_len: int,
    *,
    alpha: float = 4.0,
    cut: str = "uniform",
    cut_power: float = 4.0,
    first_probs: tuple[float, float] = (0.6, 0.4),
    branching: int = 4,
) -> SwitchingRates:
    r"""Closed form of the decision-trace chain: power target ``p^alpha``, ``q`` at ``1/alpha``.

    Only a cut at the first decision can switch branches. With ``K = branching``,
    ``a = c_A(0) q_tau(B) min(1, K^{alpha-1} c_B(0)/c_A(0))`` and
    ``b = c_B(0) q_tau(A) min(1, K^{1-alpha} c_A(0)/c_B(0))``; uniform cut ``c(0) = 1/T``; entropy
    cut ``c_B(0) = 1``, ``c_A(0) = H_0^beta / (H_0^beta + J^beta)`` with ``J`` the entropy jump at
    the second decision (``log K`` when ``L >= 1``, ``log K - H_0`` when ``L = 0``).
    """
    validation.non_negative_int("filler_len", filler_len)
    alpha = validation.positive_float("alpha", alpha)
    validation.one_of("cut", cut, ("uniform", "entropy_jump"))
    beta = validation.positive_float("cut_power", cut_power)
    validation.positive_int("branching", branching)
    pa, pb = first_probs
    if not (pa > 0 and pb > 0 and abs(pa + pb - 1.0) < 1e-12):
        raise ValueError(
            f"first_probs must be two positive probabilities summing to 1, got {first_probs}"
        )
    length = 2 * filler_len + 2
    qa = pa**alpha / (pa**alpha + pb**alpha)
    qb = 1.0 - qa
    log_pi_a = alpha * math.log(pa / branching)  # each of the K A-traces
    log_pi_b = alpha * math.log(pb)
    pi_b = 1.0 / (1.0 + branching * math.exp(log_pi_a - log_pi_b))
    if cut == "uniform":
        c_a = c_b = 1.0 / length
    else:
        h0 = -(pa * math.log(pa) + pb * math.log(pb))
        jump = math.log(branching) - (h0 if filler_len == 0 else 0.0)
        w_jump = max(jump, 0.0) ** beta
        c_a = h0**beta / (h0**beta + w_jump)
        c_b = 1.0
    ratio_ab = branching ** (alpha - 1.0) * c_b / c_a
    a = c_a * qb * min(1.0, ratio_ab)
    b = c_b * qa * min(1.0, 1.0 / ratio_ab)
    return SwitchingRates(a, b, qb, pi_b, length)


def decision_trace_tv(rates: SwitchingRates, steps: int) -> float:
    """``TV_n = |P_0(B) - pi(B)| (1 - a - b)^n``."""
    validation.non_negative_int("steps", steps)
    return abs(rates.initial_b - rates.target_b) * (1.0 - rates.a - rates.b) ** steps


def decision_trace_mixing_time(rates: SwitchingRates, eps: float = 0.1) -> int:
    """The first ``n`` with ``TV_n < eps`` from the closed form."""
    eps = validation.positive_float("eps", eps)
    tv0 = abs(rates.initial_b - rates.target_b)
    if tv0 < eps:
        return 0
    rho = 1.0 - rates.a - rates.b
    if not 0.0 < abs(rho) < 1.0:
        raise ValueError("the lumped chain does not converge geometrically")
    n = max(math.floor(math.log(eps / tv0) / math.log(abs(rho))) - 1, 0)
    while decision_trace_tv(rates, n) >= eps:
        n += 1
    return n
