r"""The exact weighted law of one-particle SMC with resample-move (:func:`resample_move_law`):
the check of a move schedule without sampling noise."""

from __future__ import annotations

import math

import torch

from tiltsample.target import TiltedTarget
from tiltsample.theory.enumerate import exact_distribution
from tiltsample.theory.smc_exact.moves import move_kernel
from tiltsample.theory.smc_exact.prefixes import LogTwist, prefix_log_probs, twist_log_values
from tiltsample.types import Seq

__all__ = ["resample_move_law"]


def _log_psi(
    target: TiltedTarget, log_p: dict[Seq, float], states: list[Seq], log_twist: LogTwist | str
) -> dict[Seq, float]:
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
        psi = twist_log_values(target, inc, ref, log_twist)
        out.update(zip(inc, psi.tolist(), strict=True))
    return out


def _extend(
    target: TiltedTarget,
    log_p: dict[Seq, float],
    mu: dict[Seq, float],
    t: int,
    log_twist: LogTwist | str,
) -> dict[Seq, float]:
    """One token of every unfinished state of ``mu`` (finished states kept):
    ``mu_t(x v) += mu_{t-1}(x) p(v|x) psi(x v) / psi(x)``."""
    nxt: dict[Seq, float] = {}
    parents = [x for x in mu if not target.is_complete(x)]
    children = [c for c in log_p if len(c) == t and c[:-1] in mu]
    psi = _log_psi(target, log_p, parents + children, log_twist)
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
    return nxt


def _moved(
    target: TiltedTarget,
    mu: dict[Seq, float],
    t: int,
    log_twist: LogTwist | str,
    temperature: float,
    cut: str,
    cut_power: float,
    num_moves: int,
    legacy: bool,
) -> dict[Seq, float]:
    """``mu`` after ``num_moves`` moves (:func:`~tiltsample.theory.smc_exact.move_kernel`)."""
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
    return {x: v for x, v in zip(kernel.states, moved, strict=True) if v > 0.0}


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
    ``num_moves`` moves (:func:`~tiltsample.theory.smc_exact.move_kernel`) after every
    block. Exact invariance makes
    ``mu_t = gamma_t`` at every ``t``, so the result is ``pi`` itself: the check of a move
    schedule without sampling noise. ``legacy=True`` composes the schedule this library used
    before issue 13 instead (the ``keep_status=False`` kernel, applied only while the particle is
    unfinished), which over-weights early EOS. Twists as in
    :func:`~tiltsample.theory.smc_exact.intermediate_law`; one token
    per block. Tiny toys only.
    """
    log_p = prefix_log_probs(target)
    exact = exact_distribution(target)
    mu: dict[Seq, float] = {(): 1.0}  # E[W 1{x}], psi_0 = 1
    for t in range(1, target.max_new_tokens + 1):
        mu = _extend(target, log_p, mu, t, log_twist)
        if not any(not target.is_complete(x) for x in mu):
            continue  # every state finished: moves are the identity
        mu = _moved(target, mu, t, log_twist, temperature, cut, cut_power, num_moves, legacy)
    z = math.exp(exact.log_z)
    return {x: m / z for x, m in mu.items()}
