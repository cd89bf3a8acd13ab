"""The peers' loops, re-implemented from their algorithms with plain ``transformers`` calls.

Used by ``benchmarks/bench_peers.py`` (see its docstring for what each loop is and where it
differs from the published one). No peer code is copied; every loop re-encodes its context on
each call (no KV reuse across calls), which is what the peers' HF code does and what the
benchmark measures. Costs are counted like :class:`tiltsample.types.Cost`: ``forward_tokens``
are the tokens pushed through the model (every prefill of the full context, plus one token per
row per decode step, padded rows included), ``model_calls`` the forward passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "Decoded",
    "PeerRun",
    "generate_rows",
    "peer_ets",
    "peer_power_mh",
    "peer_smc",
    "systematic",
]


@dataclass(frozen=True)
class PeerRun:
    """The outcome of one peer loop: its responses (one for MH / ETS, the particles for SMC), their
    final log-weights (SMC; zeros otherwise) and the cost it spent."""

    sequences: list[Seq]
    log_weights: list[float]
    cost: Cost


@dataclass(frozen=True)
class Decoded:
    """One ``generate`` call: the new tokens of each row (cut after EOS), their log-probabilities
    under ``p_ref`` (raw logits, temperature 1, full vocabulary) and under the law sampled."""

    tokens: list[Seq]
    log_p: list[list[float]]
    log_q: list[list[float]]
    cost: Cost


def generate_rows(
    model: Any,
    contexts: list[Seq],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    scores: bool = True,
) -> Decoded:
    """One sample of up to ``max_new_tokens`` tokens after each of the equal-length ``contexts``:
    one HF ``generate`` call on the full contexts (re-encoded: a prefill of every context token),
    full vocabulary (``top_k=0``), ``log_q`` from the processed scores and ``log_p`` from the raw
    logits, as the Karan–Du reference loop reads them (``scores=False``: tokens only, empty
    log-probability lists)."""
    ids = torch.tensor([list(c) for c in contexts], dtype=torch.long, device=model.device)
    rows = ids.shape[0]
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        output_scores=scores,
        output_logits=scores,
        return_dict_in_generate=True,
    )
    new = out.sequences[:, ids.shape[1] :].cpu()
    steps = new.shape[1]
    if scores:
        log_q = torch.stack([torch.log_softmax(s.double(), -1) for s in out.scores], 1).cpu()
        log_p = torch.stack([torch.log_softmax(s.double(), -1) for s in out.logits], 1).cpu()
        lq = log_q.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        lp = log_p.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    tokens: list[Seq] = []
    p_rows: list[list[float]] = []
    q_rows: list[list[float]] = []
    for r in range(rows):
        row = new[r].tolist()
        n = row.index(eos_id) + 1 if eos_id in row else len(row)
        tokens.append(tuple(row[:n]))
        p_rows.append(lp[r, :n].tolist() if scores else [])
        q_rows.append(lq[r, :n].tolist() if scores else [])
    generated = sum(len(t) for t in tokens)
    cost = Cost(
        generated_tokens=generated,
        forward_tokens=rows * (ids.shape[1] + steps - 1),
        model_calls=steps,
    )
    return Decoded(tokens, p_rows, q_rows, cost)


def _complete(x: Seq, eos_id: int, cap: int) -> bool:
    return (len(x) > 0 and x[-1] == eos_id) or len(x) >= cap


def _context(target: TiltedTarget) -> Seq:
    return tuple(target.policy.context(target.prompt))  # type: ignore[attr-defined]


def peer_power_mh(target: TiltedTarget, alpha: float, num_steps: int, seed: int) -> PeerRun:
    """Karan–Du power sampling, one chain: an initial draw from ``q_tau`` (``tau = 1/alpha``), then
    ``num_steps`` MH steps, each a uniform cut ``j`` over the current response and ONE ``generate``
    on ``prompt + x[:j]`` (re-encoded) to EOS or the cap, accepted with the ``p^alpha`` ratio
    ``alpha·Δ log p + Δ log q`` plus the exact-length cut term ``log(n_x / n_x')``."""
    torch.manual_seed(seed)
    model, eos, cap = target.policy.model, target.eos_id, target.max_new_tokens  # type: ignore[attr-defined]
    pad = _pad_id(model, eos)
    ctx = _context(target)
    tau = 1.0 / alpha
    first = generate_rows(model, [ctx], max_new_tokens=cap, temperature=tau, eos_id=eos, pad_id=pad)
    cost = first.cost
    x, ell, g = first.tokens[0], first.log_p[0], first.log_q[0]
    for _ in range(num_steps):
        n = len(x)
        j = int(torch.randint(n, ()).item())
        d = generate_rows(
            model, [ctx + x[:j]], max_new_tokens=cap - j, temperature=tau, eos_id=eos, pad_id=pad
        )
        cost = cost + d.cost
        y, ell_y, g_y = d.tokens[0], d.log_p[0], d.log_q[0]
        log_a = alpha * (sum(ell_y) - sum(ell[j:])) + (sum(g[j:]) - sum(g_y))
        log_a += math.log(n / (j + len(y)))
        if math.log(float(torch.rand(()).item())) < log_a:
            x, ell, g = x[:j] + y, ell[:j] + ell_y, g[:j] + g_y
    return PeerRun([x], [0.0], cost)


def _log_tilt(target: TiltedTarget, xs: list[Seq]) -> tuple[Tensor, Cost]:
    scores = target.evaluate_tilt(xs)
    return scores.log_tilt.double(), scores.cost


def peer_ets(
    target: TiltedTarget,
    num_candidates: int,
    num_rollouts: int,
    block_size: int,
    seed: int,
    temperature: float = 1.0,
) -> PeerRun:
    """ETS with re-prefilling HF calls: per guidance step, one ``generate`` of ``M`` candidate
    blocks on ``prompt + prefix`` (``M`` identical rows, re-encoded), one ``generate`` of the
    ``M·K`` rollouts of the incomplete candidates on ``prompt + prefix + block`` (re-encoded) to
    the cap, ``log Ê_m = logsumexp_k r(z_k)/lam − log K`` (exact ``r/lam`` for complete
    candidates), and one draw of the survivor with probability ``∝ Ê_m``."""
    torch.manual_seed(seed)
    model, eos, cap = target.policy.model, target.eos_id, target.max_new_tokens  # type: ignore[attr-defined]
    pad = _pad_id(model, eos)
    ctx = _context(target)
    m, k = num_candidates, num_rollouts
    prefix: Seq = ()
    cost = Cost()
    while not _complete(prefix, eos, cap):
        budget = min(block_size, cap - len(prefix))
        cand = generate_rows(
            model, [ctx + prefix] * m, max_new_tokens=budget, temperature=temperature, eos_id=eos,
            pad_id=pad, scores=False,
        )  # fmt: skip
        cost = cost + cand.cost
        cands = [prefix + b for b in cand.tokens]
        log_e = torch.empty(m, dtype=torch.float64)
        done = [i for i, c in enumerate(cands) if _complete(c, eos, cap)]
        if done:
            tilt, c = _log_tilt(target, [cands[i] for i in done])
            log_e[done] = tilt
            cost = cost + c
        live = [i for i in range(m) if i not in done]
        if live:
            # incomplete candidates all have len(prefix) + block_size tokens: one batch, no padding
            roll = generate_rows(
                model, [ctx + cands[i] for i in live for _ in range(k)],
                max_new_tokens=cap - len(cands[live[0]]), temperature=temperature, eos_id=eos,
                pad_id=pad, scores=False,
            )  # fmt: skip
            cost = cost + roll.cost
            full = [cands[live[r // k]] + z for r, z in enumerate(roll.tokens)]
            tilt, c = _log_tilt(target, full)
            cost = cost + c
            per = tilt.view(len(live), k)
            log_e[live] = torch.logsumexp(per, 1) - math.log(k)
        pick = int(torch.multinomial(torch.softmax(log_e, 0), 1).item())
        prefix = cands[pick]
    return PeerRun([prefix], [0.0], cost)


def systematic(weights: Tensor, n: int) -> Tensor:
    """Systematic resampling: ``n`` ancestor indices for normalised ``weights``."""
    u = (torch.rand((), dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    cdf = torch.cumsum(weights, 0)
    cdf[-1] = 1.0
    return torch.searchsorted(cdf, u).clamp(max=len(weights) - 1)


@torch.no_grad()
def peer_smc(
    target: TiltedTarget, num_particles: int, seed: int, ess_threshold: float = 0.5
) -> PeerRun:
    """Token-level SMC with the reference proposal and the prefix twist of a terminal reward:
    for each step and each live particle, one forward of ``prompt + prefix`` WITHOUT a cache
    (``use_cache=False``) for the next-token law; a completed particle's log-weight gains
    ``r/lam``; systematic resampling when ``ESS < ess_threshold · N``."""
    torch.manual_seed(seed)
    model, eos, cap = target.policy.model, target.eos_id, target.max_new_tokens  # type: ignore[attr-defined]
    ctx = _context(target)
    n = num_particles
    xs: list[Seq] = [() for _ in range(n)]
    logw = torch.zeros(n, dtype=torch.float64)
    cost = Cost()
    while not all(_complete(x, eos, cap) for x in xs):
        finished: list[int] = []
        for i in range(n):
            if _complete(xs[i], eos, cap):
                continue
            ids = torch.tensor([list(ctx + xs[i])], device=model.device)
            logits = model(ids, use_cache=False).logits[0, -1].double()
            probs = torch.softmax(logits, -1).cpu()
            tok = int(torch.multinomial(probs, 1).item())
            xs[i] = (*xs[i], tok)
            cost = cost + Cost(generated_tokens=1, forward_tokens=ids.shape[1], model_calls=1)
            if _complete(xs[i], eos, cap):
                finished.append(i)
        if finished:
            tilt, c = _log_tilt(target, [xs[i] for i in finished])
            logw[finished] += tilt
            cost = cost + c
        w = torch.softmax(logw, 0)
        if 1.0 / float((w * w).sum()) < ess_threshold * n:
            anc = systematic(w, n).tolist()
            xs = [xs[a] for a in anc]
            logw = torch.zeros(n, dtype=torch.float64)
    return PeerRun(xs, logw.tolist(), cost)


def _pad_id(model: Any, eos: int) -> int:
    pad = getattr(model.generation_config, "pad_token_id", None)
    return eos if pad is None else int(pad)
