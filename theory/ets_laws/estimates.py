r"""The exact law of one rollout term of every energy estimate in the ETS tree, and certified bounds
on the law of the mean of ``K`` such terms (the tail of ETS-IS Proposition 4)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.target import TiltedTarget
from tiltsample.theory.energies import scatter_logsumexp
from tiltsample.theory.ets_laws.models import Key, law_model

__all__ = ["EnergyEstimateLaw", "MeanLaw", "energy_estimate_laws"]


class EnergyEstimateLaw(NamedTuple):
    r"""The law of one rollout term ``Y`` of a candidate's energy estimate ``Ê = mean_K(Y)``."""

    state: Key
    """The candidate (prefix or masked-diffusion state) whose energy is estimated."""
    guidance_step: int
    log_energy: float
    """Exact ``log E(c)`` under ``p_ref`` (``E[Y]`` when the IS ratio is exact and unclipped)."""
    probs: Tensor
    """``[Z]`` probabilities of the rollout values."""
    log_values: Tensor
    """``[Z]`` ``log Y`` (``-inf`` for ``Y = 0``)."""


def energy_estimate_laws(
    target: TiltedTarget,
    *,
    block_size: int | None = None,
    temperature: float = 1.0,
    proposal: Any = None,
    proposal_temperature: float | None = None,
    is_log_ratio_clip: float | None = None,
) -> list[EnergyEstimateLaw]:
    r"""The exact law of one rollout term ``Y`` for every incomplete candidate of the ETS tree.

    Walks every state the chain can reach (every guidance step) and returns, for each incomplete
    candidate ``c``, the finite law of ``Y = ρ(z) e^{log_tilt(z)}``, ``z ~ q_roll(·|c)``, and its
    exact energy — the input of ETS-IS Proposition 4's tail ``P(|E − Ê| > t)``, see
    :class:`MeanLaw`. Parameters as in :func:`ets_step_law`.
    """
    model = law_model(
        target,
        block_size,
        temperature,
        proposal,
        proposal_temperature,
        is_log_ratio_clip,
        "rollouts",
    )
    out: list[EnergyEstimateLaw] = []
    layer: list[Key] = [model.root()]
    for i in range(1, model.cfg.num_steps + 1):
        nxt: list[Key] = []
        for x in layer:
            exp = model.expand(x, i)
            n = len(exp.keys)
            log_pi = exp.log_pi - scatter_logsumexp(exp.log_pi, exp.owner, n)[exp.owner]
            for c, (key, done_) in enumerate(zip(exp.keys, exp.complete, strict=True)):
                if done_:
                    continue
                sel = exp.owner == c
                out.append(
                    EnergyEstimateLaw(
                        key,
                        i,
                        float(exp.log_energy[c]),
                        torch.exp(log_pi[sel]),
                        exp.log_y[sel].clone(),
                    )
                )
                nxt.append(key)
        layer = nxt
    return out


class MeanLaw:
    r"""Certified bounds on the law of the mean of ``K`` i.i.d. draws of a finite ``Y >= 0``.

    The values are rounded down and up to a grid of step ``h = max(Y)/cells``, so that
    ``S_down <= S = Σ_k Y_k <= S_up`` surely; the laws of ``S_down/h`` and ``S_up/h`` are exact
    ``K``-fold convolutions on the integers (direct sums, no FFT). Every tail probability of the
    mean is then bracketed: ``P(S > a) ∈ [P(S_down > a), P(S_up > a)]`` and
    ``P(S < b) ∈ [P(S_up < b), P(S_down < b)]``. The bracket's width is the numerical noise
    floor of the measurement (shrinks like ``1/cells``); it is exact, not a sampling error.
    """

    def __init__(
        self, probs: Tensor, log_values: Tensor, num_draws: int, cells: int = 2048
    ) -> None:
        import numpy as np

        self.k = validation.positive_int("num_draws", num_draws)
        cells = validation.positive_int("cells", cells)
        p = probs.to(torch.float64).numpy()
        if not (p.min() >= 0 and abs(p.sum() - 1.0) < 1e-9):
            raise ValueError("probs must be a probability vector")
        lv = log_values.to(torch.float64).numpy()
        top = float(lv.max())
        self.scale = math.exp(top) if top > -math.inf else 1.0
        v = np.exp(lv - top) if top > -math.inf else np.zeros_like(lv)  # in [0, 1]
        self.mean = float((p * v).sum()) * self.scale
        self.h = self.scale / cells
        lo = np.floor(v * cells).astype(np.int64)
        hi = np.ceil(v * cells).astype(np.int64)
        self.down = self._convolve(p, lo)
        self.up = self._convolve(p, hi)
        self._sf_down = np.cumsum(self.down[::-1])[::-1]
        self._sf_up = np.cumsum(self.up[::-1])[::-1]
        self._cdf_down = np.cumsum(self.down)
        self._cdf_up = np.cumsum(self.up)

    def _convolve(self, p: Any, idx: Any) -> Any:
        import numpy as np

        single: dict[int, float] = {}
        for j, pj in zip(idx.tolist(), p.tolist(), strict=True):
            if pj > 0:
                single[j] = single.get(j, 0.0) + pj
        pmf = np.ones(1)
        for _ in range(self.k):
            new = np.zeros(len(pmf) + max(single))
            for j, pj in single.items():
                new[j : j + len(pmf)] += pj * pmf
            pmf = new
        return pmf

    @staticmethod
    def _above(sf: Any, threshold: float) -> float:
        """``P(index > threshold)`` from a survival array."""
        first = max(0, math.floor(threshold) + 1)
        return float(sf[first]) if first < len(sf) else 0.0

    @staticmethod
    def _below(cdf: Any, threshold: float) -> float:
        """``P(index < threshold)`` from a cdf array."""
        last = math.ceil(threshold) - 1
        if last < 0:
            return 0.0
        return float(cdf[min(last, len(cdf) - 1)])

    def tail(self, center: float, radius: float) -> tuple[float, float]:
        """``[lower, upper]`` bounds on ``P(|mean_K(Y) − center| > radius)``."""
        if radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        a = self.k * (center + radius) / self.h
        b = self.k * (center - radius) / self.h
        lower = self._above(self._sf_down, a) + self._below(self._cdf_up, b)
        upper = self._above(self._sf_up, a) + self._below(self._cdf_down, b)
        return min(lower, 1.0), min(upper, 1.0)

    def radius(self, center: float, delta: float) -> tuple[float, float]:
        """Bracket of the exact ``(1 − δ)``-quantile ``inf{r: P(|mean − center| > r) <= δ}``."""
        delta = validation.unit_interval("delta", delta, closed=False)
        top = abs(center) + self.scale + self.h

        def search(side: int) -> float:
            lo, hi = 0.0, top
            if self.tail(center, 0.0)[side] <= delta:
                return 0.0
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                if self.tail(center, mid)[side] <= delta:
                    hi = mid
                else:
                    lo = mid
            return hi

        return search(0), search(1)
