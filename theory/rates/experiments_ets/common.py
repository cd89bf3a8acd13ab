"""The toys, exact quantities and plotting helpers shared by the ETS rate experiments."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tiltsample.target import TiltedTarget
from tiltsample.theory import bounds
from tiltsample.theory.rates.core import finite_or_inf
from tiltsample.types import Seq

__all__ = [
    "D_BINARY",
    "ar_target",
    "exact_tvs",
    "is_finite",
    "log_ticks",
    "min_over_eps",
    "partition_function",
    "perturbed",
    "prop3_rows",
    "rho_sum",
    "target_law",
    "tempered",
    "two_panels",
]

D_BINARY = 1.0
"""(A1) for the binary reward ``r ∈ {0, 1} ⊂ [−1, 1]``."""


# ----------------------------------------------------------------------------- toys and helpers
def ar_target(
    seed: int, vocab: int, length: int, lam: float, eos_prob: float | None = None
) -> TiltedTarget:
    """A random tabular policy (Dirichlet 0.7) tilted by ``r = 1{token 1 occurs}``, ``"stop"``."""
    from tiltsample.targets.rewards import ContainsTokenReward
    from tiltsample.targets.tabular import random_tabular

    policy = random_tabular(
        torch.Generator().manual_seed(seed), vocab, length, 0.7, eos_prob=eos_prob
    )
    return TiltedTarget(policy, ContainsTokenReward(1, 0), lam, (), length, "stop")


def perturbed(target: TiltedTarget, seed: int, scale: float) -> Any:
    """A proposal policy: every row of ``p_ref`` mixed with a random Dirichlet(1) row."""
    from tiltsample.targets.tabular import TabularPolicy, random_tabular

    policy: TabularPolicy = target.policy  # type: ignore[assignment]
    other = random_tabular(
        torch.Generator().manual_seed(seed), policy.vocab_size, policy.max_len, 1.0
    ).table
    rows = {}
    for key, row in policy.table.items():
        mix = torch.logaddexp(row + math.log(1 - scale), other[key] + math.log(scale))
        rows[key] = mix - torch.logsumexp(mix, 0)
    return TabularPolicy(policy.vocab_size, policy.eos_id, policy.max_len, rows)


def tempered(policy: Any, temperature: float) -> Any:
    """The full-vocabulary tempered tabular policy ``softmax(log p / t)``."""
    from tiltsample.targets.tabular import TabularPolicy

    rows = {k: torch.log_softmax(r / temperature, 0) for k, r in policy.table.items()}
    return TabularPolicy(policy.vocab_size, policy.eos_id, policy.max_len, rows)


def target_law(target: TiltedTarget) -> dict[Seq, float]:
    """The exact target ``pi`` of an enumerable toy, as a dict."""
    from tiltsample.theory import exact_distribution

    return exact_distribution(target).as_dict()


def partition_function(target: TiltedTarget) -> float:
    """The exact normaliser ``Z`` of the toy's target."""
    from tiltsample.theory import exact_distribution

    return math.exp(exact_distribution(target).log_z)


def exact_tvs(target: TiltedTarget, ms: list[int], **params: Any) -> list[float]:
    """Exact ``TV(ETS output law, pi)`` for every ``M`` of ``ms`` (one tree for all)."""
    from tiltsample.theory import tv
    from tiltsample.theory.ets_laws import ets_law_sweep

    pi = target_law(target)
    return [tv(law.law, pi) for law in ets_law_sweep(target, num_candidates=ms, **params)]


def rho_sum(target: TiltedTarget, **params: Any) -> float:
    r"""``Σ_i E_{x ~ p*(x_{t_i})}[ρ̂_i(x)]`` (``specs/ets.md`` §8.2): ``TV <= this / M``.

    The boundary states' law under ``p*`` is the composition of the exact kernels ``pi(c | x)``
    (:attr:`~tiltsample.theory.ets_laws.StepLaw.log_kernel`); ``ρ̂`` does not depend on ``M``.
    """
    from tiltsample.theory.ets_laws import ets_step_law

    layer: dict[Any, float] = {None: 1.0}
    total = 0.0
    step = 1
    while layer:
        nxt: dict[Any, float] = {}
        for x, p in layer.items():
            law = ets_step_law(target, x, guidance_step=step, num_candidates=1, **params)
            total += p * law.rho
            probs = torch.exp(law.log_kernel).tolist()
            for key, done, prob in zip(law.candidates, law.complete, probs, strict=True):
                if not done and prob > 0:
                    nxt[key] = nxt.get(key, 0.0) + p * prob
        layer = nxt
        step += 1
    return total


def min_over_eps(bound: Callable[[float], float]) -> float:
    """``min_{eps ∈ (0, 1)}`` of a bound on a log grid (``inf`` if vacuous everywhere)."""
    values = [bound(float(e)) for e in np.logspace(-12, -1e-3, 400)]
    return min(values)


def prop3_rows(i: int, m: int, lam: float, z: float) -> dict[str, float | str]:
    """ETS Prop. 3 at ``(I, M)``: as published (best ``eps``) and with the Lemma 2 slip
    corrected (energy floor ``e^(−D/lam)`` and 1), each minimised over ``eps``."""
    published, _ = bounds.ets_prop3_best_eps(i, m, D=D_BINARY, lam=lam, C=z)
    corrected = min_over_eps(lambda e: bounds.ets_prop3_corrected(i, m, D_BINARY, lam, e))
    corrected_floor1 = min_over_eps(
        lambda e: bounds.ets_prop3_corrected(i, m, D_BINARY, lam, e, energy_floor=1.0)
    )
    return {
        "prop3_published": finite_or_inf(min(published, math.inf)),
        "prop3_corrected": finite_or_inf(corrected),
        "prop3_corrected_floor1": finite_or_inf(corrected_floor1),
    }


def is_finite(value: float | str) -> bool:
    """Whether a table value is a finite number (``"inf"`` is stored as a string)."""
    return not isinstance(value, str) and math.isfinite(value)


def two_panels(
    left: tuple[str, str, str], right: tuple[str, str, str]
) -> tuple[Any, tuple[Any, Any]]:
    """A two-panel matplotlib figure (Agg backend); each panel ``(title, xlabel, ylabel)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (title, xlabel, ylabel) in zip(axes, (left, right), strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    return fig, (axes[0], axes[1])


def log_ticks(ticks: list[int], *axes: Any) -> None:
    """Label a log x-axis at ``ticks`` only (no crowded minor labels)."""
    from matplotlib.ticker import NullFormatter

    for ax in axes:
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ticks, [str(t) for t in ticks])
