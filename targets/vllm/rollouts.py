r"""The rollout level of the decode engine, natively on vLLM: :func:`decode_rollouts`.

It implements the rules of :mod:`tiltsample.decode_engine` for a whole
:class:`~tiltsample.decode_engine.DecodeRequest` with (at most) two engine calls:

1. **Plan** (no model call). Row ``r`` decodes the positions ``start[r] <= t < end[r]``,
   ``end[r] = min(cap[r], start[r] + n)`` with ``n = min(max_r(cap - start), max_new)`` (the
   token-level loop's step count). Teacher-forced tokens (``t < forced_until[r]``) become part
   of the prompt; a forced EOS ends the row. With ``force_eos[r]`` and ``end[r] = cap[r]`` the
   row generates up to ``cap - 1`` and receives EOS at ``cap - 1`` (``log q = 0``). A row that
   already ended (or is not live) decodes nothing; an ended live row receives EOS with
   ``log p = log q = 0`` (the session's point mass), as in the token-level loop.
2. **Generate**: one ``generate`` call for every row with tokens to draw: prompt = context +
   prefix + forced tokens, ``max_tokens = end - position`` (``cap - 1 - position`` under the
   forced EOS), ``stop_token_ids=[EOS]`` (``ignore_eos=True``: the policy's EOS is the only
   stop), ``temperature = tau[r]`` from the law, and a per-request ``seed`` drawn from the
   caller's ``torch.Generator`` (``R`` seeds per call, row ``r`` gets the ``r``-th), so the same
   generator state gives the same rollouts and a row's draw does not depend on the other rows
   of the batch. With :class:`~tiltsample.row_generators.RowGenerators` each group's rows get
   their seeds from the group's generator (one call per group with tokens to draw), so runs
   batched across problems get the rollouts they get alone.
3. **Score** (only when needed): one call with ``prompt_logprobs`` on prompt + new tokens.

``log p`` and ``log q`` (the rules of the decode engine: ``log p`` at temperature 1, ``log q``
under the law drawn from; both exact up to the engine's float32 arithmetic):

* ``tau = 1``: the generated tokens' log-probs are both (``log p = log q``, so ``log p - log q``
  is exactly 0); forced tokens and the forced EOS get ``log p`` from the scoring call.
* ``tau != 1``: ``log q`` is the engine's *processed* log-prob of the token (the tempered law it
  sampled; the engine must run with ``logprobs_mode="processed_logprobs"``), ``log p`` comes from
  the scoring call (prompt log-probs are raw, temperature 1). A teacher-forced token's ``log q``
  needs the tempered law's normaliser, hence the full law at that position.
* ``record_entropy``: the entropy of ``p`` at every new position needs the full laws; the scoring
  call then asks for all ``V`` prompt log-probs.

Full laws exist only when the engine returns ``V`` log-probs per position (``max_logprobs >=
V``); otherwise those requests raise :class:`~tiltsample.policy.TokenLevelAccessError`. Laws
other than a plain :class:`~tiltsample.token_laws.TemperedLaw` (a custom ``proposal``: top-k,
top-p, the MH family's ``support="top_k"``) are refused with a ``ValueError``. ``parking`` is
ignored: vLLM schedules finished requests out of the batch itself.

Afterwards every row is extended by the ``[B, n]`` tokens returned (EOS-padded; with
``hard_cap`` a row reaching ``cap == hard_cap`` is fed EOS instead of its last token), as after
the token-level loop.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from tiltsample.decode_engine import Decoded, DecodeRequest
from tiltsample.row_generators import RowGenerators
from tiltsample.targets.vllm.engine import Engine, sampling_params, token_level_error
from tiltsample.token_laws import TemperedLaw, tempered_law
from tiltsample.types import Cost, Seq

__all__ = ["MIN_TEMPERATURE", "RolloutRows", "decode_rollouts", "law_temperatures"]

MIN_TEMPERATURE = 1e-5
"""vLLM samples greedily below this temperature (its ``_SAMPLING_EPS``): refused."""


class RolloutRows(Protocol):
    """What :func:`decode_rollouts` needs of a session (a
    :class:`~tiltsample.targets.vllm.VLLMSession`)."""

    @property
    def engine(self) -> Engine: ...

    @property
    def batch_size(self) -> int: ...

    def prompts(self) -> list[Seq]: ...

    def ended(self) -> list[bool]: ...

    def charge(self, cost: Cost) -> None: ...

    def extend(self, tokens: Tensor) -> None: ...


def law_temperatures(law: Any, rows: int) -> list[float]:
    """Per-row temperatures of a plain tempered law; ``ValueError`` for any other law."""
    if not isinstance(law, TemperedLaw) or not law.expressible:
        raise ValueError(
            f"the vLLM backend samples plain tempered laws only (q = softmax(log p / tau) over "
            f"the full vocabulary), got {law!r}: use the sampler's full-vocabulary settings "
            "(no top_k / top_p; support='full' for the MH family) or the transformers backend "
            "(tiltsample.targets.hf.HFPolicy), which samples any law"
        )
    tau = law.temperature
    taus = tau.tolist() if isinstance(tau, Tensor) else [float(tau)] * rows
    if len(taus) != rows:
        raise ValueError(f"the law has {len(taus)} temperatures for {rows} rows")
    low = [t for t in taus if not t >= MIN_TEMPERATURE]
    if low:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE} on the vLLM backend (it samples greedily "
            f"below), got {low[0]}"
        )
    return [float(t) for t in taus]


class _Plan:
    """Row ``r``'s new tokens with their log-probs (None: to be scored) and what to generate."""

    __slots__ = ("budget", "eos_at_cap", "lp", "lq", "teacher", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.lp: list[float | None] = []
        self.lq: list[float | None] = []
        self.teacher = 0
        self.budget = 0
        self.eos_at_cap = False

    def add(self, token: int, lp: float | None, lq: float | None) -> None:
        self.tokens.append(token)
        self.lp.append(lp)
        self.lq.append(lq)


def _per_row(value: Tensor | int | bool, rows: int, dtype: torch.dtype) -> list[Any]:
    return torch.as_tensor(value, dtype=dtype).expand(rows).tolist()


def _plan(rows: int, request: DecodeRequest, ended: list[bool]) -> list[_Plan]:
    """Teacher-forced tokens, generation budgets and forced EOS of every row (step 1)."""
    eos = request.eos_id
    start = _per_row(request.start, rows, torch.long)
    cap = _per_row(request.cap, rows, torch.long)
    force = _per_row(request.force_eos, rows, torch.bool)
    live = [c > s for c, s in zip(cap, start, strict=True)]
    if request.live is not None:
        live = [a and bool(b) for a, b in zip(live, request.live.tolist(), strict=True)]
    steps = max([c - s for c, s in zip(cap, start, strict=True)] + [0])
    if request.max_new is not None:
        steps = min(steps, request.max_new)
    forced = None if request.forced is None else request.forced.tolist()
    until = None if request.forced_until is None else request.forced_until.tolist()
    plans = [_Plan() for _ in range(rows)]
    for r, p in enumerate(plans):
        if not live[r] or steps == 0:
            continue
        end = min(cap[r], start[r] + steps)
        if ended[r]:  # the session's point mass on EOS
            p.add(eos, 0.0, 0.0)
            continue
        pos = start[r]
        stop = pos if forced is None or until is None else min(until[r], end)
        while pos < stop and not (p.tokens and p.tokens[-1] == eos):
            row = forced[r]  # type: ignore[index]
            at_cap = force[r] and pos == cap[r] - 1
            p.add(int(row[min(pos - start[r], len(row) - 1)]), None, 0.0 if at_cap else None)
            p.teacher += 1
            pos += 1
        if (p.tokens and p.tokens[-1] == eos) or pos >= end:
            continue
        p.eos_at_cap = force[r] and end == cap[r]
        p.budget = (cap[r] - 1 if p.eos_at_cap else end) - pos
    return plans


def _seeds(generator: torch.Generator | RowGenerators, plans: list[_Plan]) -> list[int]:
    """One engine seed per row: ``R`` draws from ``generator`` in one call; with
    :class:`~tiltsample.row_generators.RowGenerators`, each group's rows draw theirs from the
    group's generator, only when one of them has tokens to draw (what the group's run does
    alone)."""
    if not isinstance(generator, RowGenerators):
        return [int(x) for x in torch.randint(0, 2**62, (len(plans),), generator=generator)]
    seeds = [0] * len(plans)
    for g, gen in enumerate(generator.generators):
        mine = generator.rows_of(g).tolist()
        if any(plans[r].budget > 0 for r in mine):
            drawn = torch.randint(0, 2**62, (len(mine),), generator=gen).tolist()
            for r, seed in zip(mine, drawn, strict=True):
                seeds[r] = int(seed)
    return seeds


def _generate(
    session: RolloutRows,
    plans: list[_Plan],
    taus: list[float],
    generator: torch.Generator | RowGenerators,
    eos: int,
) -> None:
    """Step 2: draw every row's tokens in one engine call; record their log-probs."""
    engine = session.engine
    todo = [r for r, p in enumerate(plans) if p.budget > 0]
    if not todo:
        return
    seeds = _seeds(generator, plans)
    if not engine.processed and any(taus[r] != 1.0 for r in todo):
        raise ValueError(
            "this vLLM engine returns raw log-probs (logprobs_mode="
            f"{engine.logprobs_mode!r}), so log q at a temperature other than 1 is not "
            "available: start it with logprobs_mode='processed_logprobs' "
            "(VLLMPolicy.from_pretrained does)"
        )
    base = session.prompts()
    prompts = [base[r] + tuple(plans[r].tokens) for r in todo]
    params = [
        sampling_params(
            temperature=taus[r],
            max_tokens=plans[r].budget,
            seed=int(seeds[r]),
            stop_token_ids=[eos],
            ignore_eos=True,
            logprobs=0,
        )
        for r in todo
    ]
    outs = engine.generate(prompts, params, [plans[r].budget for r in todo])
    forward = 0
    for r, prompt, out in zip(todo, prompts, outs, strict=True):
        got = out.outputs[0]
        ids = [int(t) for t in got.token_ids]
        forward += len(prompt) + len(ids) - 1
        for t, table in zip(ids, got.logprobs, strict=True):
            value = float(table[t].logprob)
            plans[r].add(t, value if taus[r] == 1.0 else None, value)
    session.charge(Cost(forward_tokens=forward, model_calls=1))


def _score(
    session: RolloutRows, plans: list[_Plan], taus: list[float], record_entropy: bool
) -> list[list[float]]:
    """Step 3: fill the missing ``log p`` (and teacher-forced ``log q``, entropies) from one
    scoring call; return the per-row entropies (empty lists without ``record_entropy``)."""
    engine = session.engine
    entropies: list[list[float]] = [[0.0] * len(p.tokens) for p in plans]
    full = [
        bool(p.tokens) and (record_entropy or (p.teacher > 0 and taus[r] != 1.0))
        for r, p in enumerate(plans)
    ]
    need = [
        r for r, p in enumerate(plans) if p.tokens and (full[r] or any(v is None for v in p.lp))
    ]
    if not need:
        return entropies
    base = session.prompts()
    prompts = [base[r] + tuple(plans[r].tokens) for r in need]
    starts = [len(base[r]) for r in need]
    if any(full):
        laws = engine.prompt_laws(prompts, starts)
        for r, law_block in zip(need, laws, strict=True):
            _fill_from_laws(plans[r], law_block, taus[r], entropies[r])
    else:
        for r, values in zip(need, engine.prompt_scores(prompts, starts), strict=True):
            p = plans[r]
            p.lp = [v if old is None else old for old, v in zip(p.lp, values, strict=True)]
            # no full law needed: every teacher-forced token is at tau = 1, where log q = log p
            p.lq = [lp if lq is None else lq for lp, lq in zip(p.lp, p.lq, strict=True)]
    session.charge(Cost(forward_tokens=sum(len(q) for q in prompts), model_calls=1))
    return entropies


def _fill_from_laws(p: _Plan, laws: Tensor, tau: float, entropies: list[float]) -> None:
    """Missing ``log p`` / ``log q`` and the entropies of one row from its full laws."""
    law = tempered_law(tau, with_entropy=True)(laws)
    tok = torch.tensor(p.tokens, dtype=torch.long)[:, None]
    lp = law.log_p.gather(1, tok).squeeze(1).tolist()
    lq = law.log_q.gather(1, tok).squeeze(1).tolist()
    assert law.entropy is not None
    entropies[:] = law.entropy.tolist()
    p.lp = [new if old is None else old for old, new in zip(p.lp, lp, strict=True)]
    p.lq = [new if old is None else old for old, new in zip(p.lq, lq, strict=True)]


def decode_rollouts(
    session: RolloutRows, generator: torch.Generator | RowGenerators, request: DecodeRequest
) -> Decoded:
    """Extend the rows of ``session`` as ``request`` says (see the module docstring); return
    the continuations (:class:`~tiltsample.decode_engine.Decoded`, float64 on the CPU)."""
    rows = session.batch_size
    taus = law_temperatures(request.law, rows)
    engine = session.engine
    if request.record_entropy and not engine.full_vocabulary:
        raise token_level_error(
            "record_entropy (per-token entropies, e.g. the MH family's cut='entropy_jump')", engine
        )
    eos = request.eos_id
    plans = _plan(rows, request, session.ended())
    bad = next((r for r, p in enumerate(plans) if p.teacher and taus[r] != 1.0), None)
    if bad is not None and not engine.full_vocabulary:
        raise token_level_error(
            f"teacher forcing at temperature {taus[bad]} (log q of a forced token needs the "
            "tempered law's normaliser)",
            engine,
        )
    _generate(session, plans, taus, generator, eos)
    for p in plans:
        if p.eos_at_cap and (not p.tokens or p.tokens[-1] != eos):
            p.add(eos, None, 0.0)
    entropies = _score(session, plans, taus, request.record_entropy)
    width = max((len(p.tokens) for p in plans), default=0)
    tokens = torch.full((rows, width), eos, dtype=torch.long)
    values = torch.zeros((3, rows, width), dtype=torch.float64)
    for r, p in enumerate(plans):
        k = len(p.tokens)
        if k:
            tokens[r, :k] = torch.tensor(p.tokens, dtype=torch.long)
            values[0, r, :k] = torch.tensor(p.lp, dtype=torch.float64)
            values[1, r, :k] = torch.tensor(p.lq, dtype=torch.float64)
            values[2, r, :k] = torch.tensor(entropies[r], dtype=torch.float64)
    lengths = torch.tensor([len(p.tokens) for p in plans], dtype=torch.long)
    generated = sum(len(p.tokens) - p.teacher for p in plans)
    if width:
        session.extend(_fed(tokens, lengths, request, eos))
    return Decoded(
        tokens,
        values[0],
        values[1],
        lengths,
        generated,
        values[2] if request.record_entropy else None,
    )


def _fed(tokens: Tensor, lengths: Tensor, request: DecodeRequest, eos: int) -> Tensor:
    """The block the session receives: ``tokens``, with EOS fed instead of the last token of a
    row that reached ``cap == hard_cap`` (the decode engine's hard-cap rule)."""
    if request.hard_cap is None:
        return tokens
    rows = tokens.shape[0]
    start = torch.as_tensor(request.start, dtype=torch.long).expand(rows)
    cap = torch.as_tensor(request.cap, dtype=torch.long).expand(rows)
    hit = (lengths > 0) & (start + lengths == cap) & (cap == request.hard_cap)
    fed = tokens.clone()
    last = (lengths - 1).clamp(min=0)
    fed[hit, last[hit]] = eos
    return fed
