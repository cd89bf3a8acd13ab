"""The MH acceptance ratio from suffix sums (``specs/mcmc.md`` §2.2) and QAlign's shortcut."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["MHRatio", "mh_log_ratio", "qalign_log_ratio"]


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
