"""Exact laws of one ETS guidance step (by quadrature, and by brute-force enumeration on tiny toys)
and of the whole chain, composed over the prefix tree (``specs/ets.md`` §9)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.target import TiltedTarget
from tiltsample.theory.energies import scatter_logsumexp
from tiltsample.theory.ets_laws.models import (
    ArLawModel,
    DlmLawModel,
    Expansion,
    Key,
    law_model,
    log_mul,
)
from tiltsample.theory.ets_laws.quadrature import DEFAULT_GRID_STEP, sir_select_log_probs
from tiltsample.types import Seq

__all__ = [
    "MAX_BRUTEFORCE",
    "ETSLaw",
    "StepLaw",
    "compose_law",
    "ets_law",
    "ets_law_sweep",
    "ets_step_law",
    "ets_step_law_bruteforce",
]

MAX_BRUTEFORCE = 2_000_000


class StepLaw(NamedTuple):
    """Exact law of one guidance step from a state."""

    candidates: list[Key]
    """Candidate keys: prefixes/responses (autoregressive) or state tuples (masked diffusion)."""
    complete: list[bool]
    outputs: list[Seq | None]
    """The response of each complete candidate (None for incomplete ones)."""
    log_probs: Tensor
    """``[C]`` ``log P(select c, success)``."""
    log_failure: float
    """``log P(all M weights are zero)``."""
    log_kernel: Tensor
    """``[C]`` the exact kernel ``log pi(c | x) = log p_ref(c|x) + log E(c) − log E(x)``."""
    rho: float
    r"""``ρ̂(x) = E_q[W²] / E(x)²`` of ``specs/ets.md`` §8.2 (``TV ≤ ρ̂/M``)."""

    def as_dict(self) -> dict[Key, float]:
        """``{candidate: P(select, success)}``."""
        probs = torch.exp(self.log_probs).tolist()
        return {k: p for k, p in zip(self.candidates, probs, strict=True) if p > 0}

    def kernel(self) -> dict[Key, float]:
        """``{candidate: pi(c | x)}``."""
        probs = torch.exp(self.log_kernel).tolist()
        return {k: p for k, p in zip(self.candidates, probs, strict=True) if p > 0}


def _step_from_expansion(
    exp: Expansion, m: int, k: int, grid_step: float, energies: str
) -> StepLaw:
    kk = 1 if energies == "exact" else k
    log_probs, log_fail = sir_select_log_probs(
        exp.log_q, exp.log_a, exp.owner, exp.log_pi, exp.log_y, m, kk, grid_step
    )
    log_pref = log_mul(exp.log_q, exp.log_a)  # log p_ref(c | x)
    joint = log_mul(log_pref, exp.log_energy)
    log_ex = torch.logsumexp(joint, 0)
    if not bool(torch.isfinite(log_ex)):  # E(x) = 0: no kernel
        kernel = torch.full_like(joint, -math.inf)
        return StepLaw(exp.keys, exp.complete, exp.outputs, log_probs, log_fail, kernel, math.inf)
    kernel = joint - log_ex
    # rho = E_q[W^2]/E(x)^2, W = a (E[Y] + noise): E[W^2] = a^2 (E[Y]^2 + Var(Y)/K)
    n = len(exp.keys)
    log_pi = exp.log_pi - scatter_logsumexp(exp.log_pi, exp.owner, n)[exp.owner]
    mean = torch.exp(scatter_logsumexp(log_pi + exp.log_y, exp.owner, n) - log_ex)
    second = torch.exp(scatter_logsumexp(log_pi + 2 * exp.log_y, exp.owner, n) - 2 * log_ex)
    var = torch.clamp(second - mean * mean, min=0.0)
    a2q = torch.exp(2 * exp.log_a + exp.log_q - torch.logsumexp(exp.log_q, 0))
    a2q = torch.where(torch.isnan(a2q), torch.zeros_like(a2q), a2q)
    rho = float((a2q * (mean * mean + var / kk)).sum())
    return StepLaw(exp.keys, exp.complete, exp.outputs, log_probs, log_fail, kernel, rho)


def ets_step_law(
    target: TiltedTarget,
    state: Key | None = None,
    *,
    guidance_step: int = 1,
    num_candidates: int,
    num_rollouts: int = 3,
    block_size: int | None = None,
    temperature: float = 1.0,
    proposal: Any = None,
    proposal_temperature: float | None = None,
    is_log_ratio_clip: float | None = None,
    energies: str = "rollouts",
    grid_step: float = DEFAULT_GRID_STEP,
) -> StepLaw:
    """Exact law of one ETS guidance step (number ``guidance_step``) from ``state``.

    ``state`` is the current prefix (autoregressive; length ``(guidance_step − 1)·B``) or the
    current state tuple (masked diffusion; after ``(guidance_step − 1)·B`` denoising steps);
    None is the initial state. ``energies="exact"`` uses oracle energies (a point-mass ``Ŵ``,
    the sampler with ``potential=ExactPotential(target)``). Other parameters as in
    :func:`tiltsample.samplers.ets.sampler`.
    """
    model = law_model(
        target,
        block_size,
        temperature,
        proposal,
        proposal_temperature,
        is_log_ratio_clip,
        energies,
    )
    m = validation.positive_int("num_candidates", num_candidates)
    k = validation.positive_int("num_rollouts", num_rollouts)
    i = validation.positive_int("guidance_step", guidance_step)
    x = model.root() if state is None else tuple(state)  # type: ignore[arg-type]
    return _step_from_expansion(model.expand(x, i), m, k, grid_step, model.cfg.energies)


class ETSLaw(NamedTuple):
    """Exact output law of ETS."""

    law: dict[Seq, float]
    """``{response: P(output = response | success)}``."""
    success: float
    """``P(no guidance step failed)`` (1 unless some candidates can have weight zero)."""
    steps: int
    """Guidance steps ``I``."""


def ets_law(
    target: TiltedTarget,
    *,
    num_candidates: int,
    num_rollouts: int = 3,
    block_size: int | None = None,
    temperature: float = 1.0,
    proposal: Any = None,
    proposal_temperature: float | None = None,
    is_log_ratio_clip: float | None = None,
    energies: str = "rollouts",
    grid_step: float = DEFAULT_GRID_STEP,
) -> ETSLaw:
    """Exact output law of the ETS chain, composed over the prefix tree (``specs/ets.md`` §9).

    ``q_i(x') = Σ_x q_{i−1}(x) P_x(select x', success)``; complete candidates leave the chain
    as outputs. Parameters as in :func:`ets_step_law`.
    """
    return ets_law_sweep(
        target,
        num_candidates=[num_candidates],
        num_rollouts=num_rollouts,
        block_size=block_size,
        temperature=temperature,
        proposal=proposal,
        proposal_temperature=proposal_temperature,
        is_log_ratio_clip=is_log_ratio_clip,
        energies=energies,
        grid_step=grid_step,
    )[0]


def ets_law_sweep(
    target: TiltedTarget,
    *,
    num_candidates: Sequence[int],
    num_rollouts: int = 3,
    block_size: int | None = None,
    temperature: float = 1.0,
    proposal: Any = None,
    proposal_temperature: float | None = None,
    is_log_ratio_clip: float | None = None,
    energies: str = "rollouts",
    grid_step: float = DEFAULT_GRID_STEP,
) -> list[ETSLaw]:
    """:func:`ets_law` for several ``M`` at once (the tree and every value law built once)."""
    model = law_model(
        target,
        block_size,
        temperature,
        proposal,
        proposal_temperature,
        is_log_ratio_clip,
        energies,
    )
    k = validation.positive_int("num_rollouts", num_rollouts)
    memo: dict[tuple[Key, int], Expansion] = {}
    out = []
    for m in num_candidates:
        m = validation.positive_int("num_candidates", m)
        out.append(compose_law(model, memo, m, k, grid_step))
    return out


def compose_law(
    model: ArLawModel | DlmLawModel,
    memo: dict[tuple[Key, int], Expansion],
    m: int,
    k: int,
    grid_step: float,
) -> ETSLaw:
    """The chain's output law given success: the step laws of ``model`` composed over the states
    (``q_i(x') = Σ_x q_{i−1}(x) P_x(select x')``); ``memo`` caches expansions across ``M``."""
    layer: dict[Key, float] = {model.root(): 0.0}
    out: dict[Seq, list[float]] = {}
    for i in range(1, model.cfg.num_steps + 1):
        nxt: dict[Key, list[float]] = {}
        for x, lx in layer.items():
            exp = memo.get((x, i))
            if exp is None:
                exp = memo[(x, i)] = model.expand(x, i)
            law = _step_from_expansion(exp, m, k, grid_step, model.cfg.energies)
            for key, done_, output, lp in zip(
                law.candidates, law.complete, law.outputs, law.log_probs.tolist(), strict=True
            ):
                if lp == -math.inf:
                    continue
                if done_:
                    assert output is not None
                    out.setdefault(output, []).append(lx + lp)
                else:
                    nxt.setdefault(key, []).append(lx + lp)
        layer = {key: _lse(v) for key, v in nxt.items()}
    if layer:
        raise RuntimeError("ETS chain did not finish within I guidance steps")
    log_out = {x: _lse(v) for x, v in out.items()}
    log_success = _lse(list(log_out.values())) if log_out else -math.inf
    if log_success == -math.inf:
        raise ValueError("every ETS path fails (all candidate weights zero): no output law")
    probs = {x: math.exp(v - log_success) for x, v in log_out.items()}
    return ETSLaw(probs, math.exp(log_success), model.cfg.num_steps)


def _lse(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def ets_step_law_bruteforce(
    target: TiltedTarget,
    state: Key | None = None,
    *,
    guidance_step: int = 1,
    num_candidates: int,
    num_rollouts: int = 3,
    block_size: int | None = None,
    temperature: float = 1.0,
    proposal: Any = None,
    proposal_temperature: float | None = None,
    is_log_ratio_clip: float | None = None,
    energies: str = "rollouts",
) -> dict[Key, float]:
    """The step law by enumerating every ordered ``M``-tuple of (candidate, ``K`` rollouts).

    Each tuple has probability ``Π_m q(c_m) Π_k π(z_mk | c_m)`` and selects with the sampler's
    own rule (:func:`tiltsample.samplers.ets.selection_probabilities`); failed tuples are
    dropped, so the result is ``P(select c, success)``. Tiny toys only (``ValueError`` beyond
    ``2e6`` tuples).
    """
    from tiltsample.samplers.ets import selection_probabilities

    model = law_model(
        target,
        block_size,
        temperature,
        proposal,
        proposal_temperature,
        is_log_ratio_clip,
        energies,
    )
    m = validation.positive_int("num_candidates", num_candidates)
    k = 1 if energies == "exact" else validation.positive_int("num_rollouts", num_rollouts)
    x = model.root() if state is None else tuple(state)  # type: ignore[arg-type]
    exp = model.expand(x, validation.positive_int("guidance_step", guidance_step))
    n = len(exp.keys)
    log_q = exp.log_q - torch.logsumexp(exp.log_q, 0)
    log_pi = exp.log_pi - scatter_logsumexp(exp.log_pi, exp.owner, n)[exp.owner]
    ext_c: list[int] = []
    ext_lp: list[float] = []
    ext_lw: list[float] = []
    for c in range(n):
        idx = (exp.owner == c).nonzero().flatten().tolist()
        for combo in itertools.product(idx, repeat=k):
            lp = float(log_q[c]) + sum(float(log_pi[z]) for z in combo)
            ys = torch.tensor([float(exp.log_y[z]) for z in combo], dtype=torch.float64)
            lw = float(torch.logsumexp(ys, 0)) - math.log(k)
            ext_c.append(c)
            ext_lp.append(lp)
            la = float(exp.log_a[c])
            ext_lw.append(-math.inf if -math.inf in (la, lw) else la + lw)
    total = len(ext_c) ** m
    if total > MAX_BRUTEFORCE:
        raise ValueError(f"brute force needs {total} tuples > {MAX_BRUTEFORCE}; use a smaller toy")
    base = torch.arange(len(ext_c))
    tup = base[:, None] if m == 1 else torch.cartesian_prod(*([base] * m))
    lp_t = torch.tensor(ext_lp, dtype=torch.float64)[tup].sum(dim=1)
    lw_t = torch.tensor(ext_lw, dtype=torch.float64)[tup]
    probs, failed = selection_probabilities(lw_t)
    ok = ~failed
    contrib = torch.exp(lp_t[ok])[:, None] * probs[ok]
    owner_t = torch.tensor(ext_c, dtype=torch.long)[tup[ok]]
    out = torch.zeros(n, dtype=torch.float64).index_add_(0, owner_t.flatten(), contrib.flatten())
    return {key: p for key, p in zip(exp.keys, out.tolist(), strict=True) if p > 0}
