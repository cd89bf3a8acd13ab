"""Toy targets and helpers shared by the SMC test modules (test_smc*, test_csmc, test_twists).

Imported by name (``from smc_toys import ...``): ``tests/conftest.py`` puts this folder on
``sys.path``, which ``--import-mode=importlib`` does not do by itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from tiltsample import TiltedTarget
from tiltsample.samplers import smc
from tiltsample.samplers.twists import PrefixTable, Twist
from tiltsample.target import Truncation
from tiltsample.targets.masked_diffusion import masked_diffusion_toy
from tiltsample.targets.rewards import ConstraintReward, CountFractionReward
from tiltsample.targets.tabular import random_tabular
from tiltsample.targets.toys import tabular_toy
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
