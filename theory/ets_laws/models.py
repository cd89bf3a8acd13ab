"""Exact one-step models of ETS: for a state and a guidance step, the candidates, their laws and
weights ``a_c = p_ref/q``, and the finite value law of one rollout term ``Y`` of each energy
estimate — on an enumerable autoregressive target or a masked-diffusion toy."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import tempered_logprobs
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = [
    "ENERGIES",
    "ArLawModel",
    "DlmLawModel",
    "Expansion",
    "Key",
    "LawConfig",
    "clip_ratio",
    "law_model",
    "log_mul",
]

ENERGIES: tuple[str, ...] = ("rollouts", "exact")

Key = Hashable
"""A state or candidate: a prefix/response (autoregressive) or a state tuple (masked diffusion)."""


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


class LawConfig(NamedTuple):
    """The run parameters the exact laws need (validated by :func:`law_model`)."""

    block: int
    num_steps: int
    temperature: float
    proposal: Any
    proposal_temperature: float
    clip: float | None
    energies: str


def clip_ratio(log_ratio: Tensor, clip: float | None) -> Tensor:
    """Clip a log-ratio to ``[-clip, clip]`` as the sampler does (None: unchanged)."""
    return log_ratio if clip is None else log_ratio.clamp(min=-clip, max=clip)


def log_mul(a: Tensor, b: Tensor) -> Tensor:
    """``log(e^a · e^b)``: ``a + b`` with ``-inf`` absorbing (no NaN from ``-inf + inf``)."""
    return torch.where(torch.isneginf(a) | torch.isneginf(b), torch.full_like(a, -math.inf), a + b)


class ArLawModel:
    """Exact candidate and rollout laws of an enumerable autoregressive target."""

    def __init__(self, target: TiltedTarget, cfg: LawConfig) -> None:
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

    def block_log_factor(self, rep: int, t0: int, end: int) -> Tensor:
        """Extra log-factor of a candidate's weight (none for the sampler as implemented)."""
        return torch.zeros((), dtype=torch.float64)

    def rollout_log_ratio(self, idt: Tensor, end: int, rest_p: Tensor, rest_r: Tensor) -> Tensor:
        """``log`` IS ratio of each rollout: ``p_ref/q_roll`` over the rollout tokens (clipped)."""
        return clip_ratio(log_mul(rest_p, -rest_r), self.cfg.clip)

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
            log_a = log_mul(log_pb[None], -log_qc[None])
            la.append(log_mul(log_a, self.block_log_factor(rep, t0, end)[None])[0])
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
            log_e = torch.logsumexp(log_mul(rest_p, self.log_tilt[idt]), 0)
            les.append(log_e[None])
            if cfg.energies == "exact":
                owner.append(c)
                pis.append(torch.zeros(1, dtype=torch.float64))
                ys.append(log_e[None])
                continue
            rest_r = self.lq_r[idt, end:].sum(dim=1)
            keep = torch.isfinite(rest_r)
            ratio = self.rollout_log_ratio(idt, end, rest_p, rest_r)
            y = log_mul(ratio, self.log_tilt[idt])
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


class DlmLawModel:
    """Exact candidate and rollout laws of a masked-diffusion toy target."""

    def __init__(self, target: TiltedTarget, cfg: LawConfig) -> None:
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
            log_e = torch.logsumexp(log_mul(lp_z, tilt), 0)
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
            ratio = clip_ratio(log_mul(lpz, -lr), cfg.clip) if cfg.proposal is not None else None
            tz = self.log_tilts([policy.to_seq(z) for z in zr])
            y = tz if ratio is None else log_mul(ratio, tz)
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


def law_model(
    target: TiltedTarget,
    block_size: int | None,
    temperature: float,
    proposal: Any,
    proposal_temperature: float | None,
    is_log_ratio_clip: float | None,
    energies: str,
) -> ArLawModel | DlmLawModel:
    """The exact law model of ``target`` for one ETS configuration (parameters as in
    :func:`~tiltsample.theory.ets_laws.ets_step_law`), its parameters validated."""
    from tiltsample.samplers.ets.config import guidance_horizon, resolve_block_size
    from tiltsample.samplers.ets.proposal import check_proposal

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
    block = resolve_block_size(target, block_size)
    steps = math.ceil(guidance_horizon(target) / block)
    cfg = LawConfig(block, steps, tau, proposal, ptau, clip, energies)
    if is_masked_diffusion(target.policy):
        if tau != 1.0 or ptau != 1.0:
            raise ValueError("temperatures apply to autoregressive targets only")
        return DlmLawModel(target, cfg)
    return ArLawModel(target, cfg)
