r"""The exact selection law of one SIR step with random weights ``W_c = a_c · mean_K(Y)``: a
1-D quadrature in ``s = log u`` of the Laplace-transform formula (derivation in
:mod:`tiltsample.theory.ets_laws`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.theory.energies import scatter_logsumexp

__all__ = ["DEFAULT_GRID_STEP", "sir_select_log_probs"]

DEFAULT_GRID_STEP = 0.25
"""Step of the ``log u`` grid. The trapezoid error is ``≈ e^{-π²/h}`` (``7e-18`` at 0.25; measured
against ``h = 0.05`` on toys with ``lam`` down to ``1e-3`` and ``M`` up to 4096: ``< 1e-15``);
``h = 0.5`` already loses ``~3e-9`` and trips the accuracy check."""
_CHUNK = 2_000_000


def _scatter_lse_rows(values: Tensor, owner: Tensor, size: int) -> Tensor:
    """``out[g, c] = logsumexp(values[g, owner == c])`` for ``values [G, Z]``."""
    rows = values.shape[0]
    idx = owner[None, :].expand(rows, -1)
    top = torch.full((rows, size), -math.inf, dtype=torch.float64)
    top = top.scatter_reduce(1, idx, values, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros((rows, size), dtype=torch.float64).scatter_add(
        1, idx, torch.exp(values - shift.gather(1, idx))
    )
    return torch.log(total) + shift


def sir_select_log_probs(
    log_q: Tensor,
    log_a: Tensor,
    owner: Tensor,
    log_pi: Tensor,
    log_y: Tensor,
    num_candidates: int,
    num_rollouts: int,
    grid_step: float = DEFAULT_GRID_STEP,
) -> tuple[Tensor, float]:
    r"""Exact selection law of one SIR step with random weights ``W_c = a_c · mean_K(Y)``.

    Parameters
    ----------
    log_q
        ``[C]`` candidate law ``log q(c)`` (renormalised here).
    log_a
        ``[C]`` ``log a_c`` (``-inf`` for a candidate of weight zero).
    owner, log_pi, log_y
        ``[Z]`` the value law of one rollout of each candidate: candidate index, ``log π(z|c)``
        (renormalised per candidate) and ``log Y(z)`` (``-inf`` = zero).
    num_candidates, num_rollouts
        ``M`` and ``K``.
    grid_step
        Step ``h`` of the ``log u`` grid.

    Returns
    -------
    (Tensor, float)
        ``[C]`` ``log P(select c, success)`` and ``log P(failure) = M log P_0``.
    """
    m = validation.positive_int("num_candidates", num_candidates)
    k = validation.positive_int("num_rollouts", num_rollouts)
    h = validation.positive_float("grid_step", grid_step)
    log_q = log_q.to(torch.float64)
    log_q = log_q - torch.logsumexp(log_q, 0)
    n_cand = int(log_q.shape[0])
    owner = owner.to(torch.long)
    log_pi = log_pi.to(torch.float64)
    log_pi = log_pi - scatter_logsumexp(log_pi, owner, n_cand)[owner]
    ell = log_a.to(torch.float64)[owner] + log_y.to(torch.float64)
    ell = torch.where(torch.isnan(ell), torch.full_like(ell, -math.inf), ell)  # -inf + -inf
    pos = torch.isfinite(ell)
    zero_pi = torch.where(pos, torch.full_like(log_pi, -math.inf), log_pi)
    log_zero_c = k * scatter_logsumexp(zero_pi, owner, n_cand)  # log P(W_c = 0)
    log_p0 = float(torch.logsumexp(log_q + log_zero_c, 0))
    log_fail = m * log_p0
    if not bool(pos.any()):
        return torch.full((n_cand,), -math.inf, dtype=torch.float64), 0.0
    ell = ell - ell[pos].max()
    if m == 1:
        log_sel = log_q + torch.log(-torch.expm1(log_zero_c))
    else:
        s_lo = -40.0 - math.log(m)
        s_hi = 5.0 + math.log(k) - float(ell[pos].min())
        grid = torch.arange(s_lo, s_hi + h, h, dtype=torch.float64)
        acc = torch.full((n_cand,), -math.inf, dtype=torch.float64)
        rows_per_chunk = max(1, _CHUNK // max(1, int(ell.shape[0]) + n_cand))
        log_k = math.log(k)
        for a in range(0, len(grid), rows_per_chunk):
            s = grid[a : a + rows_per_chunk]
            e = torch.exp(s[:, None] + ell[None, :] - log_k)  # u·X/K
            lost = _scatter_lse_rows(log_pi[None, :] + torch.log(-torch.expm1(-e)), owner, n_cand)
            direct = _scatter_lse_rows(log_pi[None, :] - e, owner, n_cand)
            log_psi = torch.where(lost < -math.log(2.0), torch.log1p(-torch.exp(lost)), direct)
            mom = _scatter_lse_rows(log_pi[None, :] + ell[None, :] - e, owner, n_cand)
            log_l = k * log_psi
            log_1ml = torch.log(-torch.expm1(log_l))
            lost_phi = torch.logsumexp(log_q[None, :] + log_1ml, dim=1)
            log_phi = torch.where(
                lost_phi < -math.log(2.0),
                torch.log1p(-torch.exp(lost_phi)),
                torch.logsumexp(log_q[None, :] + log_l, dim=1),
            )
            log_n = mom if k == 1 else (k - 1) * log_psi + mom
            integrand = s[:, None] + log_n + (m - 1) * log_phi[:, None]
            acc = torch.logaddexp(acc, torch.logsumexp(integrand, dim=0))
        log_sel = math.log(m) + log_q + acc + math.log(h)
    log_total = float(torch.logsumexp(log_sel, 0))
    expected = 0.0 if log_fail == -math.inf else math.log(-math.expm1(log_fail))
    if not abs(math.exp(log_total) - math.exp(expected)) < 1e-9:
        raise RuntimeError(
            f"ETS quadrature lost accuracy: total {math.exp(log_total):.12g} vs P(success) "
            f"{math.exp(expected):.12g}; decrease grid_step (now {h})"
        )
    return log_sel, log_fail
