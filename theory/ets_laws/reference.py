r"""Exact laws of ETS-IS with the reference code's importance ratio (``specs/ets.md`` §11,
items 2–3): the ratio over the candidate block, and untempered ratios under tempered sampling."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.target import TiltedTarget
from tiltsample.theory.ets_laws.models import (
    ArLawModel,
    Expansion,
    Key,
    LawConfig,
    clip_ratio,
    law_model,
)
from tiltsample.theory.ets_laws.quadrature import DEFAULT_GRID_STEP
from tiltsample.theory.ets_laws.steps import ETSLaw, compose_law
from tiltsample.types import Seq

__all__ = ["ets_law_reference"]


def _per_token_logprobs(policy: Any, prompt: Seq, leaves: Sequence[Seq], d: int) -> Tensor:
    """``[len(leaves), d]`` per-token ``log policy(z_t | z_<t)`` (zero-padded past each leaf)."""
    prefixes = sorted({z[:t] for z in leaves for t in range(len(z))}, key=lambda s: (len(s), s))
    row = {s: j for j, s in enumerate(prefixes)}
    lp = policy.next_logprobs(prompt, prefixes).to(torch.float64)
    out = torch.zeros((len(leaves), d), dtype=torch.float64)
    for r, z in enumerate(leaves):
        for t, v in enumerate(z):
            out[r, t] = lp[row[z[:t]], v]
    return out


def _log_ratio(num: Tensor, den: Tensor) -> Tensor:
    if bool((torch.isneginf(den) & ~torch.isneginf(num)).any()):
        raise ValueError(
            "ratio_denominator gives probability zero where ratio_numerator does not: the "
            "reference-code ratio is infinite"
        )
    return torch.where(torch.isneginf(num), torch.full_like(num, -math.inf), num - den)


class _ReferenceArModel(ArLawModel):
    """:class:`ArLawModel` with the reference code's IS ratio (``specs/ets.md`` §11 items 2–3)."""

    def __init__(
        self, target: TiltedTarget, cfg: LawConfig, numerator: Any, denominator: Any, block: bool
    ) -> None:
        super().__init__(target, cfg)
        self.ln = _per_token_logprobs(numerator, target.prompt, self.leaves, self.d)
        self.ld = _per_token_logprobs(denominator, target.prompt, self.leaves, self.d)
        self.over_block = block

    def block_log_factor(self, rep: int, t0: int, end: int) -> Tensor:
        if not self.over_block:
            return torch.zeros((), dtype=torch.float64)
        return _log_ratio(self.ln[rep, t0:end].sum()[None], self.ld[rep, t0:end].sum()[None])[0]

    def rollout_log_ratio(self, idt: Tensor, end: int, rest_p: Tensor, rest_r: Tensor) -> Tensor:
        ratio = _log_ratio(self.ln[idt, end:].sum(dim=1), self.ld[idt, end:].sum(dim=1))
        return clip_ratio(ratio, self.cfg.clip)


def ets_law_reference(
    target: TiltedTarget,
    *,
    num_candidates: Sequence[int],
    num_rollouts: int = 3,
    block_size: int | None = None,
    proposal: Any = None,
    ratio_numerator: Any = None,
    ratio_denominator: Any = None,
    ratio_over_block: bool = False,
    is_log_ratio_clip: float | None = None,
    grid_step: float = DEFAULT_GRID_STEP,
) -> list[ETSLaw]:
    r"""Exact output laws (one per ``M``) of ETS-IS with the reference code's importance ratio.

    Candidates are drawn from ``target.policy`` (temperature 1: pass a tempered table as the
    policy to model sampling at temperature ``t``), rollouts from ``proposal`` (default the
    policy), and a rollout ``z`` of candidate ``c`` contributes

    .. math::

        Y = \frac{N(z \mid c)}{D(z \mid c)}\, e^{\mathrm{log\_tilt}(z)}, \qquad
        W_c = \Big[\frac{N(c \mid x)}{D(c \mid x)}\Big]^{\mathbb 1[\text{over block}]}
            \frac1K \sum_k Y_k,

    with ``N = ratio_numerator`` and ``D = ratio_denominator`` (defaults: the policy and the
    proposal, which is :func:`ets_law_sweep` exactly). The deviations of ``specs/ets.md`` §11:

    * item 2, the IS ratio over the candidate block: ``ratio_over_block=True`` (the committed
      prefix's factor is common to all ``M`` candidates and cancels);
    * item 3, the temperature mismatch: ``target.policy`` and ``proposal`` tempered at ``t``,
      ``ratio_numerator``/``ratio_denominator`` the untempered ``p_ref``/``p_small`` — the target is
      then the tilt of the tempered sampler, ``target`` itself.

    Autoregressive targets with ``truncation="stop"`` only. Each law is conditional on success,
    as in :func:`ets_law`.
    """
    if is_masked_diffusion(target.policy):
        raise ValueError("ets_law_reference models the autoregressive reference code only")
    if target.truncation != "stop":
        raise ValueError(f"ets_law_reference needs truncation='stop', got {target.truncation!r}")
    base = law_model(target, block_size, 1.0, proposal, None, is_log_ratio_clip, "rollouts")
    for name, policy in (
        ("ratio_numerator", ratio_numerator),
        ("ratio_denominator", ratio_denominator),
    ):
        if policy is not None and getattr(policy, "vocab_size", None) != target.vocab_size:
            raise ValueError(f"{name} must be a policy over the target's vocabulary")
    numerator = target.policy if ratio_numerator is None else ratio_numerator
    denominator = (
        (target.policy if proposal is None else proposal)
        if ratio_denominator is None
        else ratio_denominator
    )
    model = _ReferenceArModel(target, base.cfg, numerator, denominator, bool(ratio_over_block))
    k = validation.positive_int("num_rollouts", num_rollouts)
    memo: dict[tuple[Key, int], Expansion] = {}
    return [
        compose_law(model, memo, validation.positive_int("num_candidates", m), k, grid_step)
        for m in num_candidates
    ]
