r"""Exact laws of ETS (one guidance step and the whole chain), and Rao–Blackwellised estimates.

One guidance step from a state ``x`` is SIR on the extended space (candidate ``c``, rollouts
``z_1..z_K``): ``M`` i.i.d. candidates ``c ~ q(· | x)``, each with the random positive weight

.. math::

    W_c = a_c\,\hat{\mathcal E}(c), \qquad a_c = \frac{p_{ref}(c \mid x)}{q(c \mid x)}, \qquad
    \hat{\mathcal E}(c) = \frac1K \sum_{k=1}^K Y_k,

    Y_k = \rho(z_k)\, e^{\mathrm{log\_tilt}(z_k)}, \qquad z_k \sim q_{roll}(\cdot \mid c),

and one index drawn with probability ``W_m / Σ_j W_j``. (A complete candidate has the point mass
``Y = e^{log_tilt(c)}``; with oracle energies ``Y = E(c)`` is a point mass too.) With
``1/(a + S) = ∫_0^∞ e^{-u(a + S)} du`` and independence of the ``M`` extended draws
(``specs/ets.md`` §9),

.. math::

    P(\text{select } c) = M\, q(c) \int_0^\infty \mathbb E\big[W_c e^{-u W_c}\big]\,
        \varphi(u)^{M-1}\, du,
    \qquad \varphi(u) = \sum_{c'} q(c')\, \mathbb E\big[e^{-u W_{c'}}\big].

Because ``Ŵ`` is a mean of ``K`` i.i.d. ``Y``, both expectations factorise through the Laplace
transform ``ψ_c(v) = E[e^{-v Y}]`` of one rollout (the analysis extension of §9: it replaces the
binomial sum of the spec, which only covers binary rewards, by an exact formula for any reward
and any IS ratio)

.. math::

    \mathbb E[e^{-u W_c}] = \psi_c(u a_c / K)^K, \qquad
    \mathbb E[W_c e^{-u W_c}] = a_c\, \psi_c(u a_c / K)^{K-1}\,
        \mathbb E\big[Y e^{-u a_c Y / K}\big].

The integral is taken in ``s = log u`` on a uniform grid (trapezoid; the integrand is entire
and decays like ``e^s`` on the left and doubly exponentially on the right, so the error is
``≈ e^{-π²/h}``), with all weights rescaled by their maximum and every transform in log space
(``log1p`` where ``1 − ψ`` is small), so ``lam = 1e-3`` neither overflows nor loses the mass
near ``u = 0``. The probabilities are those of a *successful* selection; the failure event (all
``M`` weights zero, probability ``P_0^M``) is returned separately, and the sum is checked against
``1 − P_0^M`` (``RuntimeError`` beyond ``1e-9``).

The chain's output law composes the steps over the prefix tree,
``q_i(x') = Σ_x q_{i−1}(x) P_x(select x')`` (§9), with no sampling noise; it is returned
conditional on success, the law :meth:`~tiltsample.results.SampleSet.empirical` estimates.

Everything is the law of the sampler **as implemented** in :mod:`tiltsample.samplers.ets`:
candidates from ``p_ref`` at ``temperature`` with EOS forced at the cap under
``truncation="condition"``, complete candidates scored exactly, rollouts from ``p_ref`` or from a
``proposal`` at ``proposal_temperature`` with the exact ratio over rollout tokens, optional
clipping of the log-ratio. Masked-diffusion targets need a toy policy with exact ``transitions``
and ``completion_law`` (:class:`~tiltsample.targets.masked_diffusion.MaskedDiffusionToy`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import tempered_logprobs
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.results import SampleSet
from tiltsample.target import TiltedTarget
from tiltsample.theory.energies import scatter_logsumexp
from tiltsample.types import Seq

__all__ = [
    "ENERGIES",
    "ETSLaw",
    "EnergyEstimateLaw",
    "MeanLaw",
    "StepLaw",
    "energy_estimate_laws",
    "ets_law",
    "ets_law_reference",
    "ets_law_sweep",
    "ets_step_law",
    "ets_step_law_bruteforce",
    "rao_blackwell_law",
    "sir_select_log_probs",
    "tilted_law",
]

ENERGIES: tuple[str, ...] = ("rollouts", "exact")
DEFAULT_GRID_STEP = 0.25
"""Step of the ``log u`` grid. The trapezoid error is ``≈ e^{-π²/h}`` (``7e-18`` at 0.25; measured
against ``h = 0.05`` on toys with ``lam`` down to ``1e-3`` and ``M`` up to 4096: ``< 1e-15``);
``h = 0.5`` already loses ``~3e-9`` and trips the accuracy check."""
MAX_BRUTEFORCE = 2_000_000
_CHUNK = 2_000_000

Key = Hashable


# ----------------------------------------------------------------------------- the quadrature
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


# ----------------------------------------------------------------------------- step models
class Expansion(NamedTuple):
    """The candidates of one state and the value laws of their energy estimates."""

    keys: list[Key]
    complete: list[bool]
    outputs: list[Seq | None]
    log_q: Tensor
    log_a: Tensor
    owner: Tensor
    log_pi: Tensor
    log_y: Tensor
    log_energy: Tensor
    """``[C]`` exact ``log E(c)`` under ``p_ref``."""


class _Config(NamedTuple):
    block: int
    num_steps: int
    temperature: float
    proposal: Any
    proposal_temperature: float
    clip: float | None
    energies: str


def _clip(log_ratio: Tensor, clip: float | None) -> Tensor:
    return log_ratio if clip is None else log_ratio.clamp(min=-clip, max=clip)


def _plus(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(torch.isneginf(a) | torch.isneginf(b), torch.full_like(a, -math.inf), a + b)


class _ArModel:
    """Exact candidate and rollout laws of an enumerable autoregressive target."""

    def __init__(self, target: TiltedTarget, cfg: _Config) -> None:
        self.target = target
        self.cfg = cfg
        self.d = target.max_new_tokens
        self._walk()

    def _walk(self) -> None:
        target, cfg = self.target, self.cfg
        policy, prompt, eos, d = target.policy, target.prompt, target.eos_id, self.d
        prop = cfg.proposal if cfg.proposal is not None else policy
        condition = target.truncation == "condition"
        leaves: list[Seq] = []
        rows_p: list[list[float]] = []
        rows_c: list[list[float]] = []
        rows_r: list[list[float]] = []
        frontier: list[tuple[Seq, list[float], list[float], list[float]]] = [((), [], [], [])]
        for t in range(d):
            if not frontier:
                break
            prefixes = [f[0] for f in frontier]
            lp = policy.next_logprobs(prompt, prefixes).to(torch.float64)
            lpr = lp if cfg.proposal is None else prop.next_logprobs(prompt, prefixes)
            lq_c = tempered_logprobs(lp, cfg.temperature)
            lq_r = tempered_logprobs(lpr.to(torch.float64), cfg.proposal_temperature)
            nxt = []
            for i, (x, ap, ac, ar) in enumerate(frontier):
                if condition and t == d - 1:
                    toks = [eos]
                else:
                    ok = (lq_c[i] > -math.inf) | (lq_r[i] > -math.inf)
                    toks = ok.nonzero().flatten().tolist()
                for v in toks:
                    forced = condition and t == d - 1
                    child = (*x, v)
                    np_ = [*ap, float(lp[i, v])]
                    nc = [*ac, 0.0 if forced else float(lq_c[i, v])]
                    nr = [*ar, 0.0 if forced else float(lq_r[i, v])]
                    if v == eos or len(child) == d:
                        leaves.append(child)
                        rows_p.append(np_)
                        rows_c.append(nc)
                        rows_r.append(nr)
                    else:
                        nxt.append((child, np_, nc, nr))
            frontier = nxt
        self.leaves = leaves
        self.index = {x: i for i, x in enumerate(leaves)}

        def pad(rows: list[list[float]]) -> Tensor:
            out = torch.zeros((len(rows), d), dtype=torch.float64)
            for i, r in enumerate(rows):
                out[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
            return out

        self.lp, self.lq_c, self.lq_r = pad(rows_p), pad(rows_c), pad(rows_r)
        log_ref = self.lp.sum(dim=1)
        self.log_tilt = target.evaluate_tilt(leaves, log_reference=log_ref).log_tilt
        self.lengths = torch.tensor([len(x) for x in leaves], dtype=torch.long)
        self._under: dict[Seq, list[int]] = {}

    def leaves_under(self, prefix: Seq) -> list[int]:
        got = self._under.get(prefix)
        if got is None:
            n = len(prefix)
            got = [i for i, z in enumerate(self.leaves) if len(z) > n and z[:n] == prefix]
            self._under[prefix] = got
        return got

    def root(self) -> Key:
        return ()

    def _block_log_factor(self, rep: int, t0: int, end: int) -> Tensor:
        """Extra log-factor of a candidate's weight (none for the sampler as implemented)."""
        return torch.zeros((), dtype=torch.float64)

    def _rollout_log_ratio(self, idt: Tensor, end: int, rest_p: Tensor, rest_r: Tensor) -> Tensor:
        """``log`` IS ratio of each rollout: ``p_ref/q_roll`` over the rollout tokens (clipped)."""
        return _clip(_plus(rest_p, -rest_r), self.cfg.clip)

    def expand(self, x: Key, i: int) -> Expansion:
        assert isinstance(x, tuple)
        cfg = self.cfg
        t0 = len(x)
        b = min(i * cfg.block, self.d)
        groups: dict[Seq, list[int]] = {}
        for z in self.leaves_under(x):
            leaf = self.leaves[z]
            key = leaf if len(leaf) <= b else leaf[:b]
            groups.setdefault(key, []).append(z)
        keys: list[Key] = []
        complete: list[bool] = []
        outputs: list[Seq | None] = []
        lq: list[Tensor] = []
        la: list[Tensor] = []
        owner: list[int] = []
        pis: list[Tensor] = []
        ys: list[Tensor] = []
        les: list[Tensor] = []
        for key, ids in groups.items():
            rep = ids[0]
            end = len(key)
            log_qc = self.lq_c[rep, t0:end].sum()
            if not bool(torch.isfinite(log_qc)):
                continue  # candidates are drawn from q_cand: unreachable block
            log_pb = self.lp[rep, t0:end].sum()
            c = len(keys)
            keys.append(key)
            lq.append(log_qc)
            log_a = _plus(log_pb[None], -log_qc[None])
            la.append(_plus(log_a, self._block_log_factor(rep, t0, end)[None])[0])
            idt = torch.tensor(ids, dtype=torch.long)
            if key in self.index:  # a complete candidate is a leaf of the tree
                complete.append(True)
                outputs.append(key)
                tilt = self.log_tilt[self.index[key]]
                owner.append(c)
                pis.append(torch.zeros(1, dtype=torch.float64))
                ys.append(tilt[None])
                les.append(tilt[None])
                continue
            complete.append(False)
            outputs.append(None)
            rest_p = self.lp[idt, end:].sum(dim=1)
            log_e = torch.logsumexp(_plus(rest_p, self.log_tilt[idt]), 0)
            les.append(log_e[None])
            if cfg.energies == "exact":
                owner.append(c)
                pis.append(torch.zeros(1, dtype=torch.float64))
                ys.append(log_e[None])
                continue
            rest_r = self.lq_r[idt, end:].sum(dim=1)
            keep = torch.isfinite(rest_r)
            ratio = self._rollout_log_ratio(idt, end, rest_p, rest_r)
            y = _plus(ratio, self.log_tilt[idt])
            owner.extend([c] * int(keep.sum()))
            pis.append(rest_r[keep])
            ys.append(y[keep])
        return Expansion(
            keys,
            complete,
            outputs,
            torch.stack(lq),
            torch.stack(la),
            torch.tensor(owner, dtype=torch.long),
            torch.cat(pis),
            torch.cat(ys),
            torch.cat(les),
        )


class _DlmModel:
    """Exact candidate and rollout laws of a masked-diffusion toy target."""

    def __init__(self, target: TiltedTarget, cfg: _Config) -> None:
        policy: Any = target.policy
        for attr in ("transitions", "completion_law", "to_seq"):
            if not callable(getattr(policy, attr, None)):
                raise TypeError(
                    "exact ETS laws on a masked-diffusion target need a toy policy with exact "
                    f"transitions/completion_law/to_seq (MaskedDiffusionToy); missing {attr!r}"
                )
        if cfg.proposal is not None and not callable(getattr(cfg.proposal, "completion_law", None)):
            raise TypeError("the masked-diffusion proposal needs an exact completion_law")
        self.target = target
        self.policy = policy
        self.runner: Any = policy if cfg.proposal is None else cfg.proposal
        self.cfg = cfg
        self._tilt: dict[Seq, float] = {}

    def root(self) -> Key:
        return (int(self.policy.mask_id),) * int(self.policy.length)

    def log_tilts(self, seqs: Sequence[Seq]) -> Tensor:
        missing = sorted({x for x in seqs if x not in self._tilt})
        if missing:
            log_ref = self.target.log_reference(missing)
            vals = self.target.evaluate_tilt(missing, log_reference=log_ref).log_tilt
            self._tilt.update(zip(missing, vals.tolist(), strict=True))
        return torch.tensor([self._tilt[x] for x in seqs], dtype=torch.float64)

    def expand(self, x: Key, i: int) -> Expansion:
        assert isinstance(x, tuple)
        policy, cfg = self.policy, self.cfg
        total = int(policy.num_steps)
        s0, s1 = (i - 1) * cfg.block, min(i * cfg.block, total)
        layer: dict[Key, float] = {x: 0.0}
        for s in range(s0, s1):
            nxt: dict[Key, list[float]] = {}
            for st, lp in layer.items():
                for child, lq in policy.transitions(st, s):
                    nxt.setdefault(child, []).append(lp + lq)
            layer = {
                k: float(torch.logsumexp(torch.tensor(v, dtype=torch.float64), 0))
                for k, v in nxt.items()
            }
        keys = list(layer)
        finished = s1 == total
        owner: list[int] = []
        pis: list[Tensor] = []
        ys: list[Tensor] = []
        les: list[Tensor] = []
        outputs: list[Seq | None] = []
        for c, key in enumerate(keys):
            if finished:
                out = policy.to_seq(key)
                outputs.append(out)
                tilt = self.log_tilts([out])
                owner.append(c)
                pis.append(torch.zeros(1, dtype=torch.float64))
                ys.append(tilt)
                les.append(tilt)
                continue
            outputs.append(None)
            ref = policy.completion_law(key, s1)
            zs = list(ref)
            lp_z = torch.tensor([ref[z] for z in zs], dtype=torch.float64)
            tilt = self.log_tilts([policy.to_seq(z) for z in zs])
            log_e = torch.logsumexp(_plus(lp_z, tilt), 0)
            les.append(log_e[None])
            if cfg.energies == "exact":
                owner.append(c)
                pis.append(torch.zeros(1, dtype=torch.float64))
                ys.append(log_e[None])
                continue
            roll = ref if cfg.proposal is None else self.runner.completion_law(key, s1)
            zr = list(roll)
            lr = torch.tensor([roll[z] for z in zr], dtype=torch.float64)
            lpz = torch.tensor([ref.get(z, -math.inf) for z in zr], dtype=torch.float64)
            ratio = _clip(_plus(lpz, -lr), cfg.clip) if cfg.proposal is not None else None
            tz = self.log_tilts([policy.to_seq(z) for z in zr])
            y = tz if ratio is None else _plus(ratio, tz)
            owner.extend([c] * len(zr))
            pis.append(lr)
            ys.append(y)
        log_q = torch.tensor([layer[k] for k in keys], dtype=torch.float64)
        return Expansion(
            keys,
            [finished] * len(keys),
            outputs,
            log_q,
            torch.zeros(len(keys), dtype=torch.float64),
            torch.tensor(owner, dtype=torch.long),
            torch.cat(pis),
            torch.cat(ys),
            torch.cat(les),
        )


def _model(
    target: TiltedTarget,
    block_size: int | None,
    temperature: float,
    proposal: Any,
    proposal_temperature: float | None,
    is_log_ratio_clip: float | None,
    energies: str,
) -> _ArModel | _DlmModel:
    from tiltsample.samplers.ets import _block, _horizon
    from tiltsample.samplers.ets_rollout import check_proposal

    energies = validation.one_of("energies", energies, ENERGIES)
    tau = validation.positive_float("temperature", temperature)
    ptau = (
        tau
        if proposal_temperature is None
        else validation.positive_float("proposal_temperature", proposal_temperature)
    )
    clip = (
        None
        if is_log_ratio_clip is None
        else validation.positive_float("is_log_ratio_clip", is_log_ratio_clip)
    )
    check_proposal(target, proposal)
    block = _block(target, block_size)
    cfg = _Config(block, math.ceil(_horizon(target) / block), tau, proposal, ptau, clip, energies)
    if is_masked_diffusion(target.policy):
        if tau != 1.0 or ptau != 1.0:
            raise ValueError("temperatures apply to autoregressive targets only")
        return _DlmModel(target, cfg)
    return _ArModel(target, cfg)


# ----------------------------------------------------------------------------- public laws
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
    log_pref = _plus(exp.log_q, exp.log_a)  # log p_ref(c | x)
    joint = _plus(log_pref, exp.log_energy)
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
    model = _model(
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
    model = _model(
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
        out.append(_compose(model, memo, m, k, grid_step))
    return out


def _compose(
    model: _ArModel | _DlmModel,
    memo: dict[tuple[Key, int], Expansion],
    m: int,
    k: int,
    grid_step: float,
) -> ETSLaw:
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

    model = _model(
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


# ----------------------------------------------------------------------------- reference deviations
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


class _ReferenceArModel(_ArModel):
    """:class:`_ArModel` with the reference code's IS ratio (``specs/ets.md`` §11 items 2–3)."""

    def __init__(
        self, target: TiltedTarget, cfg: _Config, numerator: Any, denominator: Any, block: bool
    ) -> None:
        super().__init__(target, cfg)
        self.ln = _per_token_logprobs(numerator, target.prompt, self.leaves, self.d)
        self.ld = _per_token_logprobs(denominator, target.prompt, self.leaves, self.d)
        self.over_block = block

    def _block_log_factor(self, rep: int, t0: int, end: int) -> Tensor:
        if not self.over_block:
            return torch.zeros((), dtype=torch.float64)
        return _log_ratio(self.ln[rep, t0:end].sum()[None], self.ld[rep, t0:end].sum()[None])[0]

    def _rollout_log_ratio(self, idt: Tensor, end: int, rest_p: Tensor, rest_r: Tensor) -> Tensor:
        ratio = _log_ratio(self.ln[idt, end:].sum(dim=1), self.ld[idt, end:].sum(dim=1))
        return _clip(ratio, self.cfg.clip)


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
    base = _model(target, block_size, 1.0, proposal, None, is_log_ratio_clip, "rollouts")
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
        _compose(model, memo, validation.positive_int("num_candidates", m), k, grid_step)
        for m in num_candidates
    ]


# ----------------------------------------------------------------------------- energy estimates
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
    model = _model(
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


def rao_blackwell_law(samples: SampleSet, target: TiltedTarget) -> dict[Seq, float]:
    r"""Rao–Blackwellised estimate of ETS's output law from the recorded selections.

    At every guidance step ``i`` a running chain ends with output ``c`` with probability
    ``Σ_{m: c_m = c complete} p_{i,m}`` given everything before the draw; summing these over the
    steps a chain actually ran (before any failed step) is an unbiased estimate of
    ``P(output = c, success)``. The estimate averages it over the draws and divides by the
    fraction of successful draws (the law given success). Needs ``meta["selections"]`` (run the
    sampler with ``record_selections=True``, the default).
    """
    selections = samples.meta.get("selections")
    if selections is None:
        raise ValueError("rao_blackwell_law needs meta['selections'] (record_selections=True)")
    failed_at = samples.meta.get("failed_at") or [None] * len(selections)
    diffusion = is_masked_diffusion(target.policy)
    mask = int(target.policy.mask_id) if diffusion else None  # type: ignore[attr-defined]
    out: dict[Seq, float] = {}
    n = len(selections)
    successes = sum(1 for f in failed_at if f is None)
    if successes == 0:
        raise ValueError("every draw failed: no law to estimate")
    for steps, fail in zip(selections, failed_at, strict=True):
        for i, sel in enumerate(steps, start=1):
            if fail is not None and i >= fail:
                break
            for cand, p in zip(sel.candidates, sel.probs.tolist(), strict=True):
                done_ = (mask not in cand) if diffusion else target.is_complete(cand)
                if done_ and p > 0:
                    out[cand] = out.get(cand, 0.0) + p / n
    scale = n / successes
    return {x: v * scale for x, v in out.items()}


def tilted_law(target: TiltedTarget) -> dict[Seq, float]:
    """The exact target ``pi`` of an autoregressive toy or a masked-diffusion toy target.

    For autoregressive targets this is :func:`tiltsample.theory.exact_distribution`; for a
    masked-diffusion toy the support is the toy's output law (``output_logprobs``), tilted.
    """
    if not is_masked_diffusion(target.policy):
        from tiltsample.theory.enumerate import exact_distribution

        return exact_distribution(target).as_dict()
    policy: Any = target.policy
    law = policy.output_logprobs()
    seqs = list(law)
    log_ref = torch.tensor([law[x] for x in seqs], dtype=torch.float64)
    tilt = target.evaluate_tilt(seqs, log_reference=log_ref).log_tilt
    dens = _plus(log_ref, tilt)
    probs = torch.exp(dens - torch.logsumexp(dens, 0)).tolist()
    return {x: p for x, p in zip(seqs, probs, strict=True) if p > 0}
