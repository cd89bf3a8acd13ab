"""Cut laws ``c_x(j)``: uniform over the positions of the current state, or the entropy-jump law
of entropy-cut MH (Zhou, Mehrotra & Liu)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cut_log_probs"]


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
