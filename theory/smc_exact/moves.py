r"""The exact transition matrix of one resample-move MH move of
:mod:`tiltsample.samplers.smc` over the stopped states of ``gamma_t`` (:func:`move_kernel`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.target import TiltedTarget
from tiltsample.theory.smc_exact.prefixes import LogTwist, intermediate_law
from tiltsample.types import Seq

__all__ = ["MoveKernel", "move_kernel"]


class MoveKernel(NamedTuple):
    """One MH move as a matrix: ``matrix[a, b] = P(x_b | x_a)`` over ``states``."""

    states: list[Seq]
    matrix: Tensor
    gamma: Tensor
    """The normalised intermediate target ``gamma_t`` on ``states``."""


class _MoveModel:
    """The laws one move needs on a tiny toy (one cached policy call per prefix)."""

    def __init__(
        self,
        target: TiltedTarget,
        t: int,
        temperature: float,
        cut: str,
        cut_power: float,
        keep_status: bool,
    ) -> None:
        self.target, self.t = target, t
        self.temperature, self.cut, self.cut_power = temperature, cut, cut_power
        self.keep_status = keep_status
        self.eos, self.cap = target.eos_id, target.max_new_tokens
        self.condition = target.truncation == "condition"
        self.cache: dict[Seq, Tensor] = {}

    def logp(self, prefix: Seq) -> Tensor:
        """``log p_ref(. | prefix)``."""
        if prefix not in self.cache:
            target = self.target
            self.cache[prefix] = target.policy.next_logprobs(target.prompt, [prefix])[0].to(
                torch.float64
            )
        return self.cache[prefix]

    def log_q(self, prefix: Seq) -> Tensor:
        """The proposal's next-token law after ``prefix``."""
        lp = self.logp(prefix)
        temperature = self.temperature
        lqs = lp if temperature == 1.0 else torch.log_softmax(lp / temperature, dim=0)
        if not self.keep_status:
            return lqs
        lqs = lqs.clone()
        lqs[self.eos] = -math.inf
        total = torch.logsumexp(lqs, dim=0)
        return lqs - total if bool(torch.isfinite(total)) else torch.full_like(lqs, -math.inf)

    def entropy(self, prefix: Seq) -> float:
        """The entropy of ``p_ref(. | prefix)``."""
        lp = self.logp(prefix)
        fin = torch.isfinite(lp)
        return float(-torch.where(fin, torch.exp(lp) * lp, torch.zeros_like(lp)).sum())

    def suffixes(self, prefix: Seq) -> list[tuple[Seq, float]]:
        """Continuations of ``prefix`` the proposal reaches and their ``log q``."""
        t, eos = self.t, self.eos
        out: list[tuple[Seq, float]] = []
        stack: list[tuple[Seq, float]] = [(prefix, 0.0)]
        while stack:
            u, lq = stack.pop()
            if len(u) == t:
                out.append((u, lq))
                continue
            if self.condition and len(u) == self.cap - 1 and not self.keep_status:
                out.append(((*u, eos), lq))
                continue
            for v, value in enumerate(self.log_q(u).tolist()):
                if value == -math.inf:
                    continue
                child = (*u, v)
                if v == eos:
                    out.append((child, lq + value))
                else:
                    stack.append((child, lq + value))
        return out

    def length(self, x: Seq) -> int:
        """The state's length: ``|x|`` when complete, ``t`` otherwise."""
        return len(x) if self.target.is_complete(x) else self.t

    def log_cut(self, x: Seq) -> list[float]:
        """``log c_x(j)`` for every cut ``j`` of ``x``."""
        from tiltsample.samplers.mh import cut_log_probs

        n_x = self.length(x)
        if self.cut == "uniform":
            return [-math.log(self.t)] * self.t
        h = torch.tensor([[self.entropy(x[:k]) for k in range(n_x)]], dtype=torch.float64)
        values: list[float] = cut_log_probs(h, torch.tensor([n_x]), self.cut, self.cut_power)[
            0
        ].tolist()
        return values

    def log_q_suffix(self, x: Seq, j: int) -> float:
        """``log q'(x_{j:})`` (a forced EOS excluded)."""
        total = 0.0
        for k in range(j, len(x)):
            if self.condition and k == self.cap - 1:
                continue
            total += float(self.log_q(x[:k])[x[k]])
        return total


def _fill_row(
    model: _MoveModel,
    matrix: Tensor,
    a: int,
    x: Seq,
    index: dict[Seq, int],
    log_gamma: dict[Seq, float],
    correct: bool,
) -> None:
    """Row ``a`` (state ``x``) of the move's transition matrix."""
    if model.keep_status and model.target.is_complete(x):
        matrix[a, a] = 1.0
        return
    cx = model.log_cut(x)
    for j, lc in enumerate(cx):
        if lc == -math.inf:
            continue
        pc = math.exp(lc)
        if j >= model.length(x):  # uniform cut past the end: no move
            matrix[a, a] += pc
            continue
        back = model.log_q_suffix(x, j)
        reached = 0.0
        for y, lq in model.suffixes(x[:j]):
            prob = pc * math.exp(lq)
            reached += prob
            if y not in index:
                matrix[a, a] += prob
                continue
            log_r = log_gamma[y] + back - log_gamma[x] - lq
            if correct and model.cut != "uniform":
                log_r += model.log_cut(y)[j] - lc
            acc = 1.0 if log_r >= 0 else math.exp(log_r)
            matrix[a, index[y]] += prob * acc
            matrix[a, a] += prob * (1 - acc)
        matrix[a, a] += max(pc - reached, 0.0)  # proposals stuck before length t


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
    gamma = intermediate_law(target, t, log_twist)
    states = list(gamma)
    index = {x: i for i, x in enumerate(states)}
    model = _MoveModel(target, t, temperature, cut, cut_power, keep_status)
    size = len(states)
    matrix = torch.zeros((size, size), dtype=torch.float64)
    log_gamma = {x: math.log(p) for x, p in gamma.items()}
    for a, x in enumerate(states):
        _fill_row(model, matrix, a, x, index, log_gamma, correct)
    probs = torch.tensor([gamma[x] for x in states], dtype=torch.float64)
    return MoveKernel(states, matrix, probs)
