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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample.results import SampleSet
from tiltsample.target import TiltedTarget
from tiltsample.theory.energies import exact_energies
from tiltsample.theory.enumerate import exact_distribution
from tiltsample.theory.laws import importance_log_weights, proposal_law
from tiltsample.types import Cost, Seq

__all__ = [
    "ExactStatePotential",
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
    "twisted_proposal_law",
]

LogTwist = Callable[[list[Seq], Tensor], Tensor]
"""``log_twist(prefixes, log_p_prefixes) -> Tensor[B]`` for incomplete prefixes."""


def prefix_log_probs(target: TiltedTarget) -> dict[Seq, float]:
    """``{s: log p_ref(s)}`` for every prefix that ``p_ref`` reaches with positive probability.

    A breadth-first walk of the prefix trie with one batched ``next_logprobs`` call per depth;
    complete responses (EOS, or the cap under ``truncation="stop"``) are leaves. Under
    ``truncation="condition"`` the last position holds EOS only, with its probability.
    """
    policy, prompt, eos = target.policy, target.prompt, target.eos_id
    cap = target.max_new_tokens
    out: dict[Seq, float] = {(): 0.0}
    frontier: list[Seq] = [()]
    for depth in range(cap):
        if not frontier:
            break
        lp = policy.next_logprobs(prompt, frontier).to(torch.float64)
        nxt: list[Seq] = []
        for i, s in enumerate(frontier):
            base = out[s]
            for v in range(lp.shape[1]):
                value = float(lp[i, v])
                if value == -math.inf:
                    continue
                if target.truncation == "condition" and depth == cap - 1 and v != eos:
                    continue
                child = (*s, v)
                out[child] = base + value
                if not target.is_complete(child):
                    nxt.append(child)
        frontier = nxt
    return out


def intermediate_law(
    target: TiltedTarget, t: int, log_twist: LogTwist | str = "exact"
) -> dict[Seq, float]:
    r"""The normalised intermediate target ``gamma_t`` of SMC over stopped states with cap ``t``.

    .. math::

        \gamma_t(x) \propto
        \begin{cases} p(x)\, G(x) & x \text{ complete}, |x| \le t \\
                      p(x)\, \psi(x) & x \text{ incomplete}, |x| = t \end{cases}

    Parameters
    ----------
    target
        An enumerable target.
    t
        The current length, ``0 <= t <= max_new_tokens``.
    log_twist
        ``"exact"`` (the exact energies: ``gamma_t`` is then the time-``t`` marginal of ``pi``),
        ``"none"`` (``psi = 1``), or a callable ``(prefixes, log_p) -> log psi``.
    """
    if not 0 <= t <= target.max_new_tokens:
        raise ValueError(f"t must lie in [0, max_new_tokens={target.max_new_tokens}], got {t}")
    log_p = prefix_log_probs(target)
    complete = [s for s in log_p if target.is_complete(s) and len(s) <= t]
    incomplete = [s for s in log_p if not target.is_complete(s) and len(s) == t]
    values: dict[Seq, float] = {}
    if complete:
        ref = torch.tensor([log_p[s] for s in complete], dtype=torch.float64)
        tilt = target.evaluate_tilt(complete, log_reference=ref).log_tilt
        for s, a, b in zip(complete, ref.tolist(), tilt.tolist(), strict=True):
            values[s] = a + b
    if incomplete:
        ref = torch.tensor([log_p[s] for s in incomplete], dtype=torch.float64)
        if log_twist == "exact":
            energies = exact_energies(target)
            psi = energies.log_energies(incomplete)
        elif log_twist == "none":
            psi = torch.zeros(len(incomplete), dtype=torch.float64)
        elif callable(log_twist):
            psi = log_twist(incomplete, ref).to(torch.float64)
        else:
            raise ValueError(f"log_twist must be 'exact', 'none' or a callable, got {log_twist!r}")
        for s, a, b in zip(incomplete, ref.tolist(), psi.tolist(), strict=True):
            values[s] = a + b
    keys = [s for s, v in values.items() if v > -math.inf]
    if not keys:
        raise ValueError(f"gamma_{t} has zero mass")
    logs = torch.tensor([values[s] for s in keys], dtype=torch.float64)
    probs = torch.softmax(logs, dim=0)
    return dict(zip(keys, probs.tolist(), strict=True))


class MoveKernel(NamedTuple):
    """One MH move as a matrix: ``matrix[a, b] = P(x_b | x_a)`` over ``states``."""

    states: list[Seq]
    matrix: Tensor
    gamma: Tensor
    """The normalised intermediate target ``gamma_t`` on ``states``."""


def move_kernel(
    target: TiltedTarget,
    t: int,
    log_twist: LogTwist | str = "none",
    *,
    temperature: float = 1.0,
    cut: str = "uniform",
    cut_power: float = 4.0,
    correct: bool = True,
    keep_status: bool = True,
) -> MoveKernel:
    r"""Exact transition matrix of one resample-move step of :mod:`tiltsample.samplers.smc`.

    States are the support of ``gamma_t`` (:func:`intermediate_law`): complete responses of
    length ``<= t`` and unfinished prefixes of length ``t``.

    ``keep_status=True`` (the sampler's kernel): a complete state stays where it is. From an
    unfinished ``x`` a cut ``j`` is drawn (``cut="uniform"``: uniform on ``[0, t)``;
    ``"entropy_jump"``: ``c_x(j) ∝ max(0, H_j - H_{j-1})^cut_power`` on ``[0, t)``, uniform when
    every jump is 0, ``H_j`` the entropy of ``p_ref(. | x_<j)``), ``x_{j:t}`` is regenerated from
    ``q'`` = ``p_ref`` at ``temperature`` with EOS removed and renormalised (a prefix where only
    EOS is possible ends the proposal: the move is rejected), and accepted with

    .. math::

        \min\Big(1, \frac{\gamma_t(x') q'(x_{j:}) c_{x'}(j)}{\gamma_t(x) q'(x'_{j:}) c_x(j)}\Big).

    The kernel is ``gamma_t``-reversible on each class (complete, unfinished).

    ``keep_status=False``: the kernel of the sampler before the fix of issue 13 (and the literal
    reading of ``specs/smc.md`` §8): every state moves; the cut is uniform on ``[0, t)`` with no
    move when ``j >= n_x`` (``n_x`` the state's length) or the entropy-jump law on ``[0, n_x)``;
    the suffix is regenerated from ``p_ref`` at ``temperature`` until EOS or length ``t`` (EOS
    forced at ``L - 1`` under ``truncation="condition"`` when ``t = L``), so a move can finish an
    unfinished particle and reopen a finished one. It is ``gamma_t``-reversible too, but a
    schedule that stops moving a particle once it has finished (:func:`resample_move_law` with
    ``legacy=True``) is not invariant.

    ``correct=False`` drops ``c_{x'}(j)/c_x(j)`` (the naive kernel, not ``gamma_t``-invariant for
    a particle-dependent cut law). Tiny toys only (one policy call per prefix).
    """
    from tiltsample.samplers.mh import cut_log_probs

    gamma = intermediate_law(target, t, log_twist)
    states = list(gamma)
    index = {x: i for i, x in enumerate(states)}
    eos, cap = target.eos_id, target.max_new_tokens
    condition = target.truncation == "condition"
    cache: dict[Seq, Tensor] = {}

    def logp(prefix: Seq) -> Tensor:
        if prefix not in cache:
            cache[prefix] = target.policy.next_logprobs(target.prompt, [prefix])[0].to(
                torch.float64
            )
        return cache[prefix]

    def log_q(prefix: Seq) -> Tensor:
        """The proposal's next-token law after ``prefix``."""
        lp = logp(prefix)
        lqs = lp if temperature == 1.0 else torch.log_softmax(lp / temperature, dim=0)
        if not keep_status:
            return lqs
        lqs = lqs.clone()
        lqs[eos] = -math.inf
        total = torch.logsumexp(lqs, dim=0)
        return lqs - total if bool(torch.isfinite(total)) else torch.full_like(lqs, -math.inf)

    def entropy(prefix: Seq) -> float:
        lp = logp(prefix)
        fin = torch.isfinite(lp)
        return float(-torch.where(fin, torch.exp(lp) * lp, torch.zeros_like(lp)).sum())

    def suffixes(prefix: Seq) -> list[tuple[Seq, float]]:
        """Continuations of ``prefix`` the proposal reaches and their ``log q``."""
        out: list[tuple[Seq, float]] = []
        stack: list[tuple[Seq, float]] = [(prefix, 0.0)]
        while stack:
            u, lq = stack.pop()
            if len(u) == t:
                out.append((u, lq))
                continue
            if condition and len(u) == cap - 1 and not keep_status:
                out.append(((*u, eos), lq))
                continue
            for v, value in enumerate(log_q(u).tolist()):
                if value == -math.inf:
                    continue
                child = (*u, v)
                if v == eos:
                    out.append((child, lq + value))
                else:
                    stack.append((child, lq + value))
        return out

    def length(x: Seq) -> int:
        return len(x) if target.is_complete(x) else t

    def log_cut(x: Seq) -> list[float]:
        n_x = length(x)
        if cut == "uniform":
            return [-math.log(t)] * t
        h = torch.tensor([[entropy(x[:k]) for k in range(n_x)]], dtype=torch.float64)
        values: list[float] = cut_log_probs(h, torch.tensor([n_x]), cut, cut_power)[0].tolist()
        return values

    def log_q_suffix(x: Seq, j: int) -> float:
        total = 0.0
        for k in range(j, len(x)):
            if condition and k == cap - 1:
                continue
            total += float(log_q(x[:k])[x[k]])
        return total

    size = len(states)
    matrix = torch.zeros((size, size), dtype=torch.float64)
    log_gamma = {x: math.log(p) for x, p in gamma.items()}
    for a, x in enumerate(states):
        if keep_status and target.is_complete(x):
            matrix[a, a] = 1.0
            continue
        cx = log_cut(x)
        for j, lc in enumerate(cx):
            if lc == -math.inf:
                continue
            pc = math.exp(lc)
            if j >= length(x):  # uniform cut past the end: no move
                matrix[a, a] += pc
                continue
            back = log_q_suffix(x, j)
            reached = 0.0
            for y, lq in suffixes(x[:j]):
                prob = pc * math.exp(lq)
                reached += prob
                if y not in index:
                    matrix[a, a] += prob
                    continue
                log_r = log_gamma[y] + back - log_gamma[x] - lq
                if correct and cut != "uniform":
                    log_r += log_cut(y)[j] - lc
                acc = 1.0 if log_r >= 0 else math.exp(log_r)
                matrix[a, index[y]] += prob * acc
                matrix[a, a] += prob * (1 - acc)
            matrix[a, a] += max(pc - reached, 0.0)  # proposals stuck before length t
    probs = torch.tensor([gamma[x] for x in states], dtype=torch.float64)
    return MoveKernel(states, matrix, probs)


def resample_move_law(
    target: TiltedTarget,
    log_twist: LogTwist | str = "none",
    *,
    temperature: float = 1.0,
    cut: str = "uniform",
    cut_power: float = 4.0,
    num_moves: int = 1,
    legacy: bool = False,
) -> dict[Seq, float]:
    r"""The exact weighted law ``E[Ẑ/Z · 1{x_T = x}]`` of one-particle SMC with resample-move.

    With ``N = 1`` resampling is the identity and ``Ẑ`` is the particle's weight, so the
    unnormalised measure ``mu_t(x) = E[Ẑ_t 1{x_t = x}]`` follows a linear recursion over the
    stopped states: an extension step (``mu_t(x v) += mu_{t-1}(x) p(v|x) psi(x v) / psi(x)``
    for an unfinished ``x``, finished states kept; it does not depend on the proposal) and
    ``num_moves`` moves (:func:`move_kernel`) after every block. Exact invariance makes
    ``mu_t = gamma_t`` at every ``t``, so the result is ``pi`` itself: the check of a move
    schedule without sampling noise. ``legacy=True`` composes the schedule this library used
    before issue 13 instead (the ``keep_status=False`` kernel, applied only while the particle is
    unfinished), which over-weights early EOS. Twists as in :func:`intermediate_law`; one token
    per block. Tiny toys only.
    """
    log_p = prefix_log_probs(target)
    cap = target.max_new_tokens
    exact = exact_distribution(target)

    def log_psi(states: list[Seq]) -> dict[Seq, float]:
        """``log gamma_t / p`` of states: ``log G`` when complete, the twist otherwise."""
        out: dict[Seq, float] = {}
        comp = [x for x in states if target.is_complete(x)]
        inc = [x for x in states if not target.is_complete(x)]
        if comp:
            ref = torch.tensor([log_p[x] for x in comp], dtype=torch.float64)
            tilt = target.evaluate_tilt(comp, log_reference=ref).log_tilt.tolist()
            out.update(zip(comp, tilt, strict=True))
        if inc:
            ref = torch.tensor([log_p[x] for x in inc], dtype=torch.float64)
            if log_twist == "exact":
                psi = exact_energies(target).log_energies(inc)
            elif log_twist == "none":
                psi = torch.zeros(len(inc), dtype=torch.float64)
            elif callable(log_twist):
                psi = log_twist(inc, ref).to(torch.float64)
            else:
                raise ValueError(
                    f"log_twist must be 'exact', 'none' or a callable, got {log_twist!r}"
                )
            out.update(zip(inc, psi.tolist(), strict=True))
        return out

    mu: dict[Seq, float] = {(): 1.0}  # E[W 1{x}], psi_0 = 1
    for t in range(1, cap + 1):
        nxt: dict[Seq, float] = {}
        parents = [x for x in mu if not target.is_complete(x)]
        children = [c for c in log_p if len(c) == t and c[:-1] in mu]
        psi = log_psi(parents + children)
        psi[()] = 0.0  # psi_0 = 1, whatever the twist says about the empty prefix
        for x, m in mu.items():
            if target.is_complete(x):
                nxt[x] = nxt.get(x, 0.0) + m
        for c in children:
            x = c[:-1]
            if target.is_complete(x) or psi[c] == -math.inf or mu[x] == 0.0:
                continue
            step = log_p[c] - log_p[x] + psi[c] - psi[x]
            nxt[c] = nxt.get(c, 0.0) + mu[x] * math.exp(step)
        mu = nxt
        if not any(not target.is_complete(x) for x in mu):
            continue  # every state finished: moves are the identity
        kernel = move_kernel(
            target,
            t,
            log_twist,
            temperature=temperature,
            cut=cut,
            cut_power=cut_power,
            keep_status=not legacy,
        )
        power = torch.linalg.matrix_power(kernel.matrix, num_moves)
        if legacy:  # the particle stops moving once it has finished
            done = torch.tensor([target.is_complete(x) for x in kernel.states])
            power[done] = torch.eye(len(kernel.states), dtype=torch.float64)[done]
        vec = torch.tensor([mu.get(x, 0.0) for x in kernel.states], dtype=torch.float64)
        if sum(mu.values()) - float(vec.sum()) > 1e-12 * max(1.0, sum(mu.values())):
            raise RuntimeError("mass outside the support of gamma_t")  # pragma: no cover
        moved = (vec @ power).tolist()
        mu = {x: v for x, v in zip(kernel.states, moved, strict=True) if v > 0.0}
    z = math.exp(exact.log_z)
    return {x: m / z for x, m in mu.items()}


def twisted_proposal_law(target: TiltedTarget, log_twist: LogTwist) -> dict[Seq, float]:
    r"""Path law of the twist-induced proposal ``q_psi(v | s) ∝ p(v | s) psi(s + v)``.

    Complete children use the true tilt ``G`` (as the SMC samplers do), incomplete ones
    ``log_twist``; under ``truncation="condition"`` only EOS may occupy the last position. A
    prefix whose children all have zero weight contributes nothing (its mass is lost, as the
    sampler's particle would get weight 0). With the exact twist this is ``pi`` itself.
    """
    log_p = prefix_log_probs(target)
    cap = target.max_new_tokens
    law: dict[Seq, float] = {}
    frontier: dict[Seq, float] = {(): 0.0}  # prefix -> log q_psi(prefix)
    for depth in range(cap):
        if not frontier:
            break
        by_parent: dict[Seq, list[Seq]] = {}
        for c in log_p:
            if len(c) == depth + 1 and c[:-1] in frontier:
                by_parent.setdefault(c[:-1], []).append(c)
        flat = [c for kids in by_parent.values() for c in kids]
        comp = [c for c in flat if target.is_complete(c)]
        inc = [c for c in flat if not target.is_complete(c)]
        score: dict[Seq, float] = {}
        if comp:
            ref = torch.tensor([log_p[c] for c in comp], dtype=torch.float64)
            tilt = target.evaluate_tilt(comp, log_reference=ref).log_tilt.tolist()
            score.update(zip(comp, tilt, strict=True))
        if inc:
            ref = torch.tensor([log_p[c] for c in inc], dtype=torch.float64)
            score.update(zip(inc, log_twist(inc, ref).to(torch.float64).tolist(), strict=True))
        nxt: dict[Seq, float] = {}
        for s, kids in by_parent.items():
            logits = torch.tensor(
                [log_p[c] - log_p[s] + score[c] for c in kids], dtype=torch.float64
            )
            if not bool(torch.isfinite(logits).any()):
                continue
            lq = torch.log_softmax(logits, dim=0).tolist()
            for c, v in zip(kids, lq, strict=True):
                if v == -math.inf:
                    continue
                if target.is_complete(c):
                    law[c] = math.exp(frontier[s] + v)
                else:
                    nxt[c] = frontier[s] + v
        frontier = nxt
    return law


class OneParticleBounds(NamedTuple):
    """The sandwich of ``specs/smc.md`` §9 at ``N = 1``."""

    log_z: float
    lower: float
    """``E_SMC[log Ẑ] = log Z - KL(q ‖ pi)`` (``-inf`` if ``q`` puts mass where ``pi`` has none)."""
    upper: float
    """``E_{x* ~ pi}[log Ẑ_CSMC(x*)] = log Z + KL(pi ‖ q)``."""


def one_particle_bounds(target: TiltedTarget, temperature: float = 1.0) -> OneParticleBounds:
    r"""Exact ``E[log Ẑ]`` of SMC and of CSMC (exact references) with one particle.

    With ``N = 1`` resampling is the identity and any twist telescopes, so
    ``log Ẑ = log w(x) = log p(x) + log G(x) - log q_tau(x)`` for the path ``x``: drawn from
    ``q_tau`` (SMC) or from ``pi`` (CSMC). The proposal is ``p_ref`` at ``temperature``.
    """
    prop = proposal_law(target, temperature)
    log_w = importance_log_weights(prop)
    exact = exact_distribution(target)
    q = torch.exp(prop.log_q)
    lower = float((q * log_w).sum()) if bool(torch.isfinite(log_w).all()) else -math.inf
    idx = {x: i for i, x in enumerate(prop.support)}
    pi_lw = torch.tensor([float(log_w[idx[x]]) for x in exact.support], dtype=torch.float64)
    upper = float((exact.probs * pi_lw).sum())
    return OneParticleBounds(exact.log_z, lower, upper)


# --------------------------------------------------------------------------- masked diffusion
def diffusion_target_law(target: TiltedTarget) -> tuple[dict[Seq, float], float]:
    r"""``(pi, log Z)`` of a tilted masked-diffusion toy (a policy with ``output_logprobs``).

    ``p_ref`` is the base sampler's exact output law; the tilt follows the target's length
    convention (``truncation="condition"``: responses without EOS have ``G = 0``).
    """
    policy = target.policy
    law = policy.output_logprobs()  # type: ignore[attr-defined]
    seqs = list(law)
    log_ref = torch.tensor([law[x] for x in seqs], dtype=torch.float64)
    tilt = target.evaluate_tilt(seqs, log_reference=log_ref).log_tilt
    ok = torch.tensor([target.is_complete(x) for x in seqs], dtype=torch.bool)
    dens = torch.where(ok & torch.isfinite(tilt), log_ref + tilt, torch.full_like(tilt, -math.inf))
    log_z = float(torch.logsumexp(dens, 0))
    probs = torch.exp(dens - log_z).tolist()
    return {x: p for x, p in zip(seqs, probs, strict=True) if p > 0}, log_z


def best_of_n_law(target: TiltedTarget, n: int) -> dict[Seq, float]:
    r"""Exact law of the best of ``n`` i.i.d. draws of ``p_ref`` (first maximiser of the log-tilt).

    .. math::

        P(\text{best} = x) = p(x) \sum_{k=0}^{n-1} a(x)^k\, b(x)^{n-1-k},

    with ``a = P(score < score(x))`` (the draws before ``x``) and ``b = P(score <= score(x))``
    (after it); ``score`` is the log-tilt, ``-inf`` off the target's support. ``p_ref`` is the
    output law of a masked-diffusion toy (``output_logprobs``) or the enumerated responses of an
    autoregressive one.
    """
    policy = target.policy
    if callable(getattr(policy, "output_logprobs", None)):
        ref = policy.output_logprobs()  # type: ignore[attr-defined]
    else:
        ref = {s: v for s, v in prefix_log_probs(target).items() if target.is_complete(s)}
    seqs = list(ref)
    log_ref = torch.tensor([ref[x] for x in seqs], dtype=torch.float64)
    tilt = target.evaluate_tilt(seqs, log_reference=log_ref).log_tilt
    ok = torch.tensor([target.is_complete(x) for x in seqs], dtype=torch.bool)
    score = torch.where(ok, tilt, torch.full_like(tilt, -math.inf)).tolist()
    probs = torch.exp(log_ref).tolist()
    out: dict[Seq, float] = {}
    for x, sx, px in zip(seqs, score, probs, strict=True):
        a = sum(p for s, p in zip(score, probs, strict=True) if s < sx)
        b = sum(p for s, p in zip(score, probs, strict=True) if s <= sx)
        value = px * sum(a**k * b ** (n - 1 - k) for k in range(n))
        if value > 0:
            out[x] = value
    return out


class ExactStatePotential:
    r"""The exact energy ``log E[G(x_0) | state, step]`` of masked-diffusion states.

    A :class:`~tiltsample.diffusion.StatePotential` for toys with an exact ``completion_law``
    (:class:`~tiltsample.targets.masked_diffusion.MaskedDiffusionToy`): the sum over the base
    sampler's completions of ``P(completion) G(completion)``, with the target's length
    convention. Deterministic and free (``Cost()``); plugged into FK steering with the difference
    potential it makes every intermediate target the exact marginal of ``pi``.
    """

    def __init__(self, target: TiltedTarget) -> None:
        self.target = target
        self._cache: dict[tuple[tuple[int, ...], int], float] = {}

    def log_energy(self, state: tuple[int, ...], step: int) -> float:
        key = (tuple(int(t) for t in state), int(step))
        value = self._cache.get(key)
        if value is None:
            target, policy = self.target, self.target.policy
            law = policy.completion_law(key[0], key[1])  # type: ignore[attr-defined]
            fulls = list(law)
            seqs = [policy.to_seq(c) for c in fulls]  # type: ignore[attr-defined]
            lp = torch.tensor([law[c] for c in fulls], dtype=torch.float64)
            tilt = target.evaluate_tilt(seqs).log_tilt
            ok = torch.tensor([target.is_complete(x) for x in seqs], dtype=torch.bool)
            dens = torch.where(ok & torch.isfinite(tilt), lp + tilt, torch.full_like(lp, -math.inf))
            value = float(torch.logsumexp(dens, 0))
            self._cache[key] = value
        return value

    def log_potential_states(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        values = [self.log_energy(tuple(row), step) for row in states.tolist()]
        return torch.tensor(values, dtype=torch.float64), Cost()


def evidence_weighted_law(result: SampleSet, log_z: float) -> tuple[dict[Seq, float], float]:
    r"""The evidence-weighted particle law of ``R`` SMC runs and its expected sampling noise.

    .. math::

        \hat\pi(x) = \frac1R \sum_{r=1}^R \frac{\hat Z_r}{Z}\, \hat\pi_r(x),

    where ``pî_r`` is run ``r``'s normalised weighted histogram. SMC's unnormalised particle
    measure is unbiased, ``E[Ẑ pî_N(f)] = Z pi(f)`` (Del Moral 2004), so ``E[pî(x)] = pi(x)`` at
    every ``N``: a test of ``TV(pî, pi)`` against the returned noise level
    ``½ Σ_x sd_r / sqrt(R) · sqrt(2/pi)`` (from the runs' own spread) checks the sampler's law
    with no ``O(1/N)`` bias to allow for.

    Parameters
    ----------
    result
        A pooled SMC-family result (``meta["num_particles"]``, ``meta["log_evidence_runs"]``,
        weights normalised per run), e.g. ``smc.result(state)``.
    log_z
        The exact ``log Z``.
    """
    n = int(result.meta["num_particles"])
    runs = torch.tensor(result.meta["log_evidence_runs"], dtype=torch.float64)
    r = runs.numel()
    if len(result) != n * r:
        raise ValueError("result must pool num_runs runs of num_particles particles")
    scale = torch.exp(runs - log_z)
    lw = result.log_weights.view(r, n)
    top = torch.logsumexp(lw, dim=1, keepdim=True)
    w = torch.where(torch.isfinite(top), torch.exp(lw - top), torch.zeros_like(lw))
    keys = sorted(set(result.sequences))
    index = {x: i for i, x in enumerate(keys)}
    col = torch.tensor([index[x] for x in result.sequences], dtype=torch.long).view(r, n)
    per_run = torch.zeros((r, len(keys)), dtype=torch.float64).scatter_add_(1, col, w)
    values = scale[:, None] * per_run
    law = dict(zip(keys, values.mean(dim=0).tolist(), strict=True))
    noise = 0.5 * float((values.std(dim=0) / math.sqrt(r)).sum()) * math.sqrt(2 / math.pi)
    return law, noise


# --------------------------------------------------------------------------- reference tables
# --------------------------------------------------------------------------- resampling laws
def _interval_outcomes(cdf: list[float], k: int, n: int) -> list[tuple[int, float]]:
    """``[(ancestor, probability)]`` of the point ``(k + U)/n``, ``U ~ U[0, 1)``, under ``cdf``."""
    cuts = sorted({0.0, 1.0, *(n * c - k for c in cdf if 0.0 < n * c - k < 1.0)})
    out: dict[int, float] = {}
    for a, b in itertools.pairwise(cuts):
        u = (k + 0.5 * (a + b)) / n
        idx = next((i for i, c in enumerate(cdf) if u < c), len(cdf) - 1)
        out[idx] = out.get(idx, 0.0) + (b - a)
    return list(out.items())


def _multiset_law(scheme: str, w: list[float], n: int) -> dict[tuple[int, ...], float]:
    """Exact law of the sorted multiset of ancestors (averaged over input orders)."""
    size = len(w)
    law: dict[tuple[int, ...], float] = {}

    def add(key: Sequence[int], prob: float) -> None:
        k = tuple(sorted(key))
        law[k] = law.get(k, 0.0) + prob

    if scheme == "multinomial":
        for draw in itertools.product(range(size), repeat=n):
            add(draw, math.prod(w[i] for i in draw))
    elif scheme == "residual":
        copies = [math.floor(n * x) for x in w]
        rest = n - sum(copies)
        resid = [n * x - c for x, c in zip(w, copies, strict=True)]
        base = [i for i, c in enumerate(copies) for _ in range(c)]
        total = sum(resid)
        for draw in itertools.product(range(size), repeat=rest):
            add(base + list(draw), math.prod(resid[i] / total for i in draw))
    else:
        orders = list(itertools.permutations(range(size)))
        for tau in orders:
            cdf = list(itertools.accumulate(w[i] for i in tau))
            cdf[-1] = 1.0
            if scheme == "systematic":
                cuts = sorted(
                    {0.0, 1.0} | {n * c - k for c in cdf for k in range(n) if 0.0 < n * c - k < 1.0}
                )
                for a, b in itertools.pairwise(cuts):
                    u = 0.5 * (a + b)
                    picks = [
                        tau[next((i for i, c in enumerate(cdf) if (k + u) / n < c), size - 1)]
                        for k in range(n)
                    ]
                    add(picks, (b - a) / len(orders))
            else:  # stratified: independent strata
                per = [_interval_outcomes(cdf, k, n) for k in range(n)]
                for combo in itertools.product(*per):
                    add([tau[i] for i, _ in combo], math.prod(p for _, p in combo) / len(orders))
    return law


def ancestor_law(scheme: str, weights: Sequence[float], n: int) -> dict[tuple[int, ...], float]:
    """Exact law of the ancestor vector ``A`` (length ``n``) of the symmetrised scheme.

    The multiset ``S`` of ancestors follows the scheme (stratified/systematic averaged over the
    ``K!`` input orders); the output slots are a uniform arrangement of ``S``:
    ``P(A = a) = P(S) prod_i c_i! / n!``. Every slot then has ``P(A_k = i) = W_i``. Tiny ``K``
    and ``n`` only (``K^n`` ancestor vectors).
    """
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    law: dict[tuple[int, ...], float] = {}
    for multiset, prob in _multiset_law(scheme, w, n).items():
        arrangements = set(itertools.permutations(multiset))
        for a in arrangements:
            law[a] = law.get(a, 0.0) + prob / len(arrangements)
    return law


def conditional_ancestor_law(
    scheme: str, weights: Sequence[float], n: int
) -> dict[tuple[int, ...], float]:
    """``P(A = a | A_0 = 0)`` for the symmetrised scheme (:func:`ancestor_law`), the law a
    conditional scheme must sample."""
    law = ancestor_law(scheme, weights, n)
    mass = sum(p for a, p in law.items() if a[0] == 0)
    return {a: p / mass for a, p in law.items() if a[0] == 0}


class _CountReward:
    """``r(x) = #{token 1 in x}`` (the tilt ``1.5 · #token`` of ``specs/smc.md`` §14)."""

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        return torch.tensor([float(x.count(1)) for x in xs], dtype=torch.float64)


def spec_toy(seed: int = 0) -> TiltedTarget:
    """The toy of ``specs/smc.md`` §14: 3 content tokens, length 5 (243 responses, EOS impossible),
    a random context-dependent policy and the tilt ``r/lam = 1.5 · #{token 1}``."""
    from tiltsample.targets.tabular import random_tabular

    policy = random_tabular(torch.Generator().manual_seed(seed), 4, 5, eos_prob=0.0)
    return TiltedTarget(policy, _CountReward(), 1 / 1.5, (), 5)


def modes_table(
    target: TiltedTarget, ns: tuple[int, ...] = (8, 32, 128, 512), runs: int = 400
) -> list[dict[str, float | int | str]]:
    """``specs/smc.md`` §14: prefix / lookahead (exact twists) / opt (exact twists + optimal
    proposal) SMC with adaptive systematic resampling, ``runs`` runs per cell.

    The particles of a run are weighted and, after resampling, duplicated: not ``N`` i.i.d.
    draws, so each TV column comes with two references, both the exact expected TV
    (:func:`~tiltsample.theory.distances.expected_tv_iid`) of an i.i.d. sample of ``pi``: of size
    ``N`` (``R·N`` for the histogram pooled over the ``R`` runs), what exact draws would give, and
    of size ESS (**the ESS floor**), ESS the Kong ESS ``(Σw)²/Σw²`` of a run's final weights
    (column ``"ESS"``: the mean over runs; per run for ``"TV(run)"``, summed over runs for the
    pooled histogram). Neither is a bound for weighted particles: Kong's ESS summarises weight
    degeneracy, not the per-response variance of a weighted histogram, and counts resampled
    copies as distinct. A TV far above both is bias.
    """
    from tiltsample.samplers import smc
    from tiltsample.theory.distances import expected_tv_iid, tv
    from tiltsample.theory.energies import ExactPotential

    exact = exact_distribution(target)
    pot = ExactPotential(target)
    modes: dict[str, dict[str, Any]] = {
        "prefix": {},
        "lookahead": {"twist": "lookahead", "potential": pot},
        "opt": {"twist": "lookahead", "potential": pot, "proposal": "optimal"},
    }
    rows: list[dict[str, float | int | str]] = []
    for mode, params in modes.items():
        for n in ns:
            state = smc.run(
                target,
                num_particles=n,
                num_runs=runs,
                generator=torch.Generator().manual_seed(n),
                **params,
            )
            log_z = smc.log_evidence_runs(state)
            out = smc.result(state)
            w = (out.normalized_weights() * runs).tolist()
            per_run, ess, ess_floor = [], [], []
            for r in range(runs):
                law: dict[Seq, float] = {}
                for i in range(r * n, (r + 1) * n):
                    law[out.sequences[i]] = law.get(out.sequences[i], 0.0) + w[i]
                per_run.append(tv(law, exact))
                lw = out.log_weights[r * n : (r + 1) * n]
                log_ess = 2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)
                ess.append(float(torch.exp(log_ess)))
                ess_floor.append(expected_tv_iid(exact, max(1, round(ess[-1]))))
            rows.append(
                {
                    "mode": mode,
                    "N": n,
                    "E[Z]/Z": float(torch.exp(log_z - exact.log_z).mean()),
                    "E[logZ]-logZ": float(log_z.mean()) - exact.log_z,
                    "sd(logZ)": float(log_z.std()),
                    "ESS": sum(ess) / runs,
                    "TV(run)": sum(per_run) / runs,
                    "iid floor(run)": expected_tv_iid(exact, n),
                    "ESS floor(run)": sum(ess_floor) / runs,
                    "TV(mean hist)": tv(out.empirical(), exact),
                    "iid floor(hist)": expected_tv_iid(exact, runs * n),
                    "ESS floor(hist)": expected_tv_iid(exact, max(1, round(sum(ess)))),
                }
            )
    return rows


def sandwich_table(
    target: TiltedTarget, ns: tuple[int, ...] = (1, 4, 16, 64, 256)
) -> list[dict[str, float | int]]:
    """``specs/smc.md`` §9: ``E[log Ẑ_SMC] - log Z`` and ``E_pi[log Ẑ_CSMC] - log Z`` (prefix
    twist, multinomial resampling at every step; 2,000 runs up to ``N = 16``, 500 beyond)."""
    from tiltsample.samplers import csmc

    exact = exact_distribution(target)
    rows: list[dict[str, float | int]] = []
    for n in ns:
        r = 2000 if n <= 16 else 500
        lo = csmc.log_z_lower(
            target,
            n,
            generator=torch.Generator().manual_seed(n),
            num_runs=r,
            ess_threshold=1.0,
            resampling="multinomial",
        )
        refs = exact.sample(r, torch.Generator().manual_seed(1000 + n))
        up = csmc.log_z_upper(
            target, n, refs, generator=torch.Generator().manual_seed(n), ess_threshold=1.0
        )
        rows.append(
            {
                "N": n,
                "lower": lo.mean - exact.log_z,
                "lower_se": lo.stderr,
                "upper": up.mean - exact.log_z,
                "upper_se": up.stderr,
                "gap": up.mean - lo.mean,
            }
        )
    return rows


def _main() -> None:  # pragma: no cover - the documentation's measurement
    torch.set_num_threads(1)
    target = spec_toy()
    exact = exact_distribution(target)
    print(f"spec toy: |support| = {len(exact)}, log Z = {exact.log_z:.3f}")
    for row in modes_table(target):
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    for srow in sandwich_table(target):
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in srow.values()))
    b = one_particle_bounds(target)
    print(f"exact N = 1: lower {b.lower - b.log_z:+.4f}, upper {b.upper - b.log_z:+.4f}")


if __name__ == "__main__":  # pragma: no cover
    _main()
