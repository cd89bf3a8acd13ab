"""Toy targets and helpers shared by the SMC test modules (test_smc*, test_csmc, test_twists).

Imported by name (``from smc_toys import ...``): ``tests/conftest.py`` puts this folder on
``sys.path``, which ``--import-mode=importlib`` does not do by itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from scipy.stats import f as f_dist

from tiltsample import TiltedTarget
from tiltsample.samplers import smc
from tiltsample.samplers.smc.twists import PrefixTable, Twist
from tiltsample.target import Truncation, power_target
from tiltsample.targets.masked_diffusion import masked_diffusion_toy
from tiltsample.targets.rewards import ConstraintReward, CountFractionReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.targets.toys import tabular_toy
from tiltsample.theory import exact_distribution
from tiltsample.theory.smc_exact import twisted_proposal_law
from tiltsample.types import Seq

TRUNCATIONS: tuple[Truncation, ...] = ("stop", "condition")


def gen(seed: int) -> torch.Generator:
    """A fresh generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def smc_runs(target: TiltedTarget, n: int, r: int, seed: int, **params: Any) -> smc.SMCState:
    """``r`` independent SMC runs of ``n`` particles (generator seeded with ``seed``)."""
    return smc.run(target, num_particles=n, num_runs=r, generator=gen(seed), **params)


def constrained_toy(
    truncation: Truncation = "stop",
    lam: float = 0.5,
    seed: int = 0,
    concentration: float = 0.8,
) -> TiltedTarget:
    """V = 3 (EOS = 0), L = 4, reward = fraction of token 1, first token != 2 unless alone."""
    policy = random_tabular(gen(seed), 3, 4, concentration=concentration)
    target = TiltedTarget(policy, CountFractionReward(1, 0), lam, (), 4, truncation)
    return target.tilt(ConstraintReward(lambda x: not (len(x) > 1 and x[0] == 2)))


def masked_toy(order: str = "max-confidence", truncation: Truncation = "stop") -> TiltedTarget:
    """The exact masked-diffusion toy (seed 0) with unmasking ``order`` and ``truncation``."""
    target: TiltedTarget = masked_diffusion_toy(seed=0, order=order)
    return target if truncation == "stop" else replace(target, truncation=truncation)


def tri_toy() -> tuple[TiltedTarget, PrefixTable]:
    """The TRI-TSMC toy (V = 3, L = 4, lambda = 0.5) and its saturated prefix table."""
    target = tabular_toy(vocab_size=3, max_len=4, lam=0.5)
    return target, PrefixTable.from_target(target)


def twist_law(target: TiltedTarget, twist: Twist) -> dict[Seq, float]:
    """Exact law of the twist-induced proposal ``Q_psi`` of a deterministic twist."""
    out: dict[Seq, float] = twisted_proposal_law(
        target, lambda xs, lp: twist.log_twist(target, xs, lp, gen(0))[0]
    )
    return out


def checked_log_z_spreads(
    target: TiltedTarget, twists: Sequence[Twist], log_z: float
) -> list[float]:
    """Per twist: 300 runs of 8-particle twisted SMC (optimal proposal, seed 1); asserts that
    ``E[Ẑ]/Z = 1`` within 4 standard errors and returns the standard deviation of ``log Ẑ``."""
    spreads = []
    for tw in twists:
        state = smc.run(
            target, num_particles=8, num_runs=300, generator=gen(1), twist=tw, proposal="optimal"
        )
        runs = smc.log_evidence_runs(state)
        ratio = torch.exp(runs - log_z)
        assert abs(float(ratio.mean()) - 1) < 4 * float(ratio.std()) / math.sqrt(300)
        spreads.append(float(runs.std()))
    return spreads


def merge_rare(
    obs: Sequence[float], exp: Sequence[float], floor: float = 5.0
) -> tuple[list[float], list[float]]:
    """Merge the cells with expected count < ``floor`` into one (valid chi-square cells) and
    rescale the expected counts to the observed total."""
    keep_o, keep_e, rest_o, rest_e = [], [], 0.0, 0.0
    for o, e in zip(obs, exp, strict=True):
        if e < floor:
            rest_o += o
            rest_e += e
        else:
            keep_o.append(float(o))
            keep_e.append(e)
    if rest_e > 0:
        keep_o.append(rest_o)
        keep_e.append(rest_e)
    total_o, total_e = sum(keep_o), sum(keep_e)
    return keep_o, [e * total_o / total_e for e in keep_e]


def power_graded_toy(truncation: Truncation = "stop", seed: int = 3) -> TiltedTarget:
    """V = 3 (EOS = 0), L = 3: ``p_ref^1.5 · exp(fraction of token 1)``, ``p(EOS) = 0.4`` at
    every position.

    The power factor makes the prefix twist differ from no twist; the frequent EOS makes runs
    whose particles have all finished before the cap common, which is where a move schedule that
    depends on the particles' state goes wrong.
    """
    policy = random_tabular(gen(seed), 3, 3, concentration=1.0, eos_prob=0.4)
    base = power_target(policy, 1.5, max_new_tokens=3, truncation=truncation)
    return base.tilt(CountFractionReward(1, 0), lam=1.0)


class WeightedLawCheck(NamedTuple):
    """The evidence-weighted particle law of ``R`` runs against ``pi`` (see
    :func:`weighted_law_check`)."""

    statistic: float
    """Hotelling's ``T² = R d' S⁻¹ d`` of the cell deviations ``d`` (``inf`` off-support)."""
    critical: float
    """Its ``1 - alpha`` quantile under ``E[Ẑ/Z · W(x)] = pi(x)`` (scaled F law)."""
    dof: int
    worst: str
    """The cell with the largest ``|z|`` (a sequence, or ``"rest"`` for the merged rare cells)."""
    estimate: float
    exact: float
    z: float
    resolution: float
    """Relative bias of the heaviest cell this sample resolves at 4 standard errors."""
    outside: int
    """Particles off the support of ``pi`` (must be 0)."""

    @property
    def ok(self) -> bool:
        return self.outside == 0 and self.statistic < self.critical

    def __str__(self) -> str:
        return (
            f"T2={self.statistic:.1f} (crit {self.critical:.1f}, dof {self.dof}); worst "
            f"{self.worst}: {self.estimate:.4f} vs {self.exact:.4f} (z={self.z:.1f}); "
            f"resolution {self.resolution:.3f}; outside {self.outside}"
        )


def weighted_law_check(
    state: smc.SMCState, *, alpha: float = 1e-3, floor: float = 0.01
) -> WeightedLawCheck:
    """Test ``E[Ẑ/Z · W(x)] = pi(x)`` for every sequence from the runs of ``state``.

    SMC's unnormalised particle measure is unbiased at every ``N`` (Del Moral 2004), so the
    per-run vectors ``v_r(x) = (Ẑ_r/Z) W_r(x)`` have mean exactly ``pi``. Cells with
    ``pi(x) < floor`` are merged into one; Hotelling's ``T²`` with the runs' own covariance
    (pseudo-inverse: an exact linear constraint such as a deterministic ``Ẑ`` removes a degree of
    freedom) is compared with its ``F`` quantile.
    """
    target = state.target
    pi = exact_distribution(target)
    keys = list(pi.support)
    probs = torch.tensor([pi.prob(x) for x in keys], dtype=torch.float64)
    big = [i for i, p in enumerate(probs.tolist()) if p >= floor]
    names = [str(keys[i]) for i in big]
    cell_of = {keys[i]: c for c, i in enumerate(big)}
    rare = len(big) < len(keys)
    if rare:
        names.append("rest")
    k = len(names)
    exact = torch.zeros(k, dtype=torch.float64)
    for x, p in zip(keys, probs.tolist(), strict=True):
        exact[cell_of.get(x, k - 1)] += p
    n, r = state.num_particles, state.num_groups
    result = smc.result(state)
    support = set(keys)
    outside = sum(1 for x in result.sequences if x not in support)
    col = torch.tensor([cell_of.get(x, k - 1) for x in result.sequences]).view(r, n)
    lw = result.log_weights.view(r, n)
    top = torch.logsumexp(lw, dim=1, keepdim=True)
    w = torch.where(torch.isfinite(top), torch.exp(lw - top), torch.zeros_like(lw))
    per_run = torch.zeros((r, k), dtype=torch.float64).scatter_add_(1, col, w)
    scale = torch.exp(smc.log_evidence_runs(state) - pi.log_z)
    values = scale[:, None] * per_run
    mean = values.mean(dim=0)
    dev = mean - exact
    evals, evecs = torch.linalg.eigh(torch.cov(values.T))
    keep = evals > 1e-12 * float(evals.max().clamp(min=1e-300))
    proj = evecs.T @ dev
    if bool((proj[~keep].abs() > 1e-9).any()):
        statistic = math.inf  # a deviation along a direction the runs never vary in
    else:
        statistic = float(r * (proj[keep] ** 2 / evals[keep]).sum())
    dof = int(keep.sum())
    critical = dof * (r - 1) / (r - dof) * float(f_dist.ppf(1 - alpha, dof, r - dof))
    se = values.std(dim=0) / math.sqrt(r)
    z = torch.where(se > 0, dev / se.clamp(min=1e-300), torch.where(dev == 0, 0.0, math.inf))
    worst = int(torch.argmax(z.abs()))
    heavy = int(torch.argmax(exact))
    return WeightedLawCheck(
        statistic,
        critical,
        dof,
        names[worst],
        float(mean[worst]),
        float(exact[worst]),
        float(z[worst]),
        float(4 * se[heavy] / exact[heavy]),
        outside,
    )
