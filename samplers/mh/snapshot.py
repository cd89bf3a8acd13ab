"""What the continuous engine records per MH step: every chain's state and move statistics after
that step, filled as the chains reach it."""

from __future__ import annotations

import torch

__all__ = ["StepSnapshot"]


class StepSnapshot:
    """Every chain's state and move statistics after one MH step (``[C, ...]``, filled as the
    chains reach that step)."""

    __slots__ = (
        "acc",
        "cut",
        "ell",
        "ent",
        "filled",
        "g",
        "lacc",
        "length",
        "log_ref",
        "p_len",
        "p_tokens",
        "r_cut",
        "r_prop",
        "r_target",
        "rest",
        "reward",
        "tokens",
    )

    def __init__(self, chains: int, width: int, eos: int, with_reward: bool) -> None:
        f = torch.zeros((chains, width), dtype=torch.float64)
        self.tokens = torch.full((chains, width), eos, dtype=torch.long)
        self.p_tokens = self.tokens.clone()
        self.ell, self.g, self.ent = f, f.clone(), f.clone()
        z = torch.zeros(chains, dtype=torch.float64)
        self.log_ref, self.rest = z, z.clone()
        self.reward = z.clone() if with_reward else None
        self.lacc, self.r_target = z.clone(), z.clone()
        self.r_prop, self.r_cut = z.clone(), z.clone()
        zl = torch.zeros(chains, dtype=torch.long)
        self.length, self.cut, self.p_len = zl, zl.clone(), zl.clone()
        self.acc = torch.zeros(chains, dtype=torch.bool)
        self.filled = torch.zeros(chains, dtype=torch.bool)
