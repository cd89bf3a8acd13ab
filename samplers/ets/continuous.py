r"""Continuous batching for ETS (``batching="continuous"``): chains at different phases share
every model call.

The lock-step schedule of :mod:`~tiltsample.samplers.ets` runs a batch of chains through the same
phase at the same time: ``B`` candidate calls at ``n·M`` rows, then the rollouts at ``n·M·K``
rows to the end of the response, and the next batch starts only when the last chain of this one
has finished. Here every *row* is at its own phase instead. One ragged
:class:`~tiltsample.policy.DecodeSession` holds the candidate rows of some chains and the rollout
rows of others; every tick makes **one** model call over all of them and gives every row one
token. A row leaves the session as soon as it is finished (EOS, the length cap, or the end of its
candidate block), and the freed rows are refilled, in first-come order, by

1. the rollouts of a chain whose candidate block ended (``M'·K`` rows, ``M'`` the incomplete
   candidates; the candidates wait outside the session meanwhile, at no cost),
2. the next candidate block of a chain that has just selected (``M`` copies of the chosen row),
3. a new chain (``M`` copies of the prompt row, prefilled once for all chains),

while the session holds at most ``max_rows`` rows (a waiting item is never overtaken, so nothing
starves). Nothing is generated speculatively: every token is a candidate or rollout token that
the lock-step schedule also generates, and the number of tokens of a chain is a function of the
chain's own draws.

Randomness
    Every chain owns a ``torch.Generator`` seeded from the caller's generator when the run starts
    (one draw per chain) and consumes uniforms from it in a fixed order: per tick, one per row of
    the chain in canonical order (candidate ``m``, or rollout ``(m, k)``), and one per selection.
    Tokens and selections are drawn by inversion of the CDF (exact for the full-vocabulary
    categorical). The output of a chain is therefore a function of its own seed only: the
    schedule (``max_rows``, the other chains) does not change it, but the draws differ from the
    lock-step schedule's (which shares one generator between chains).
Law
    Per chain, exactly the kernel of Algorithm 1 (the same candidates law, the same rollouts, the
    same SIR weights, the same selection probabilities): only the order of the model calls changes.
Cost
    Generated tokens are the same formula as lock step. Forward tokens: each prompt prefix is
    encoded once; the last token of an incomplete candidate is pushed through the model by each of
    its ``K`` rollout rows (lock step pushes it once in an extra model call before expanding), so
    forward tokens exceed lock step's by ``(K − 1)`` per incomplete candidate while model calls are
    fewer. ETS-IS (``proposal``) and oracle ``potential`` are not supported in this schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tiltsample.decode_engine import decode_step
from tiltsample.policy import DecodeSession, open_session, row_lengths
from tiltsample.results import SampleSet, Selection
from tiltsample.samplers.ets.chains import CAND, DEAD, DIRTY, HOLD, ROLL, Chain
from tiltsample.samplers.ets.config import ETSConfig, resolve_block_size
from tiltsample.samplers.ets.proposal import clip_log_ratio
from tiltsample.samplers.ets.rollout import log_mean_energy, needs_reference
from tiltsample.samplers.ets.schedule import RowScheduler
from tiltsample.samplers.ets.scoring import AnswerCache, Scorer
from tiltsample.samplers.ets.selection import candidate_log_weights, selection_probabilities
from tiltsample.samplers.ets.state import Batch, ETSInfo, ETSState, cost_delta, finish_batch
from tiltsample.target import TiltedTarget
from tiltsample.token_laws import Law, inverse_cdf, tempered_law
from tiltsample.types import Cost, Seq

__all__ = ["ContinuousETS", "continuous_step"]


class ContinuousETS(RowScheduler):
    """The continuous-batching engine (module docstring); ``advance`` runs it tick by tick."""

    def __init__(
        self,
        cfg: Any,
        scorer: Any,
        target: TiltedTarget,
        num_chains: int,
        max_rows: int,
        generator: torch.Generator,
    ) -> None:
        self.cfg = cfg
        self.scorer = scorer
        self.target = target
        self.m = int(cfg.num_candidates)
        self.k = int(cfg.num_rollouts)
        self.d = int(target.max_new_tokens)
        self.block = resolve_block_size(target, cfg.block_size)
        self.max_rows = int(max_rows)
        seeds = torch.randint(0, 2**62, (num_chains,), generator=generator).tolist()
        self.chains = [Chain(i, s) for i, s in enumerate(seeds)]
        self.next_new = 0
        self.queue: list[tuple[str, int]] = []
        self.caches: list[Any] | None = None
        if cfg.reward_mode == "self-consistency":
            self.caches = [AnswerCache.empty() for _ in range(num_chains)]
        self.template = open_session(target.policy, target.prompt, 1)
        self.template.logprobs()  # the prompt is encoded once for all chains
        self.session: DecodeSession | None = None
        self.spent = Cost()
        self.generated = 0
        self.extra = Cost()
        self.counters = {
            "candidate_tokens": 0,
            "rollout_tokens": 0,
            "rollouts": 0,
            "clipped": 0,
            "denoiser_passes": 0,
        }
        self.finished = 0
        # row metadata, aligned with the session's rows
        self.row_chain: list[int] = []
        self.row_kind: list[int] = []
        self.row_m: list[int] = []
        self.row_k: list[int] = []
        self.lp = torch.zeros(0, dtype=torch.float64)
        self.lq = torch.zeros(0, dtype=torch.float64)
        self.peak_rows = 0
        self.pieces: list[DecodeSession] = []
        self.compact_at = max(self.m, self.max_rows // 8)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def done(self) -> bool:
        return self.finished == len(self.chains)

    def cost(self) -> Cost:
        live = Cost() if self.session is None else self.session.cost
        return (
            self.spent
            + live
            + self.template.cost
            + Cost(generated_tokens=self.generated)
            + self.extra
        )

    # ------------------------------------------------------------------ one tick
    def advance(self) -> list[tuple[int, Tensor, Tensor, int, Tensor]]:
        """Run ticks until at least one chain selects (or all are done); return the selections
        ``(chain, probs [M], log_w [M], chosen, complete [M])`` made."""
        events: list[tuple[int, Tensor, Tensor, int, Tensor]] = []
        while not events and not self.done:
            self.admit()
            self.peak_rows = max(self.peak_rows, self.rows)
            self.flush()
            events += self._tick()
        return events

    def _tick(self) -> list[tuple[int, Tensor, Tensor, int, Tensor]]:
        """One model call over every row: one token per row, then the rows that finished."""
        target = self.target
        session = self.session
        assert session is not None
        lens = row_lengths(session)
        logp = session.logprobs()
        n = self.rows
        self._park_rollout_prefixes(session, n)
        kind = torch.tensor(self.row_kind, dtype=torch.long)
        assert not bool((kind >= HOLD).any())  # resolved by admit before every tick
        # one position of every row under the decode engine's rules (the candidates' or the
        # rollouts' tempered law, EOS forced at the cap under truncation="condition", dead rows
        # padded with EOS), each token by inverse CDF of its chain's next uniform
        out = decode_step(
            logp,
            self._row_laws(kind),
            eos_id=target.eos_id,
            live=kind != DEAD,
            position=lens,
            cap=torch.full((n,), self.d, dtype=torch.long),
            force_eos=target.truncation == "condition",
            uniforms=self._uniforms(n),
        )
        session.extend(out.tokens)  # dead rows get EOS padding: never pushed through the model
        n_cand = int((kind == CAND).sum())
        n_roll = int((kind == ROLL).sum())
        self.generated += n_cand + n_roll
        self.counters["candidate_tokens"] += n_cand
        self.counters["rollout_tokens"] += n_roll
        self.lp = self.lp + out.log_p
        self.lq = self.lq + out.log_q
        closed = self._close_rows(session, lens, out.tokens, out.live)
        events = []
        for ch in closed:
            if ch.rollouts or not ch.inc:
                events.append(self._select(ch))
            else:
                self.queue.append(("hold", ch.index))
        return events

    def _park_rollout_prefixes(self, session: DecodeSession, n: int) -> None:
        """Park the chosen-candidate prefixes of chains whose rollouts just started (law known)."""
        for ch in self.chains:
            if ch.needs_park:
                rows = [
                    r
                    for r in range(n)
                    if self.row_chain[r] == ch.index
                    and self.row_kind[r] == ROLL
                    and self.row_k[r] == 0
                ]
                park = session.fork()
                park.select(torch.tensor(rows, dtype=torch.long))
                ch.park = park
                ch.needs_park = False

    def _row_laws(self, kind: Tensor) -> Law:
        """The law of every row: the candidates' temperature or the rollouts' proposal
        temperature."""
        cfg = self.cfg
        if cfg.temperature == cfg.proposal_temperature:
            return tempered_law(cfg.temperature)
        tau = torch.full(kind.shape, cfg.proposal_temperature, dtype=torch.float64)
        tau[kind == CAND] = cfg.temperature
        return tempered_law(tau)

    def _uniforms(self, n: int) -> Tensor:
        """The uniforms of a tick: per chain, one per live row in canonical (session) order."""
        by_chain: dict[int, list[int]] = {}
        for r, c in enumerate(self.row_chain):
            if self.row_kind[r] != DEAD:
                by_chain.setdefault(c, []).append(r)
        u = torch.zeros(n, dtype=torch.float64)
        for c, rows in by_chain.items():
            u[rows] = self.chains[c].stream.take(len(rows))
        return u

    def _close_rows(
        self, session: DecodeSession, lens: Tensor, tok: Tensor, live: Tensor
    ) -> list[Chain]:
        """Record the rows that finished this tick (EOS, the cap, or a candidate block's end);
        return the chains whose rows have all finished."""
        target = self.target
        eos = target.eos_id
        n = self.rows
        new_len = (lens + 1).tolist()
        tok_l = tok.tolist()
        ended = (~live).tolist()
        toks: list[list[int]] | None = None
        closed: list[Chain] = []
        lp_l, lq_l = self.lp.tolist(), self.lq.tolist()
        for r in range(n):
            if self.row_kind[r] == DEAD:
                continue
            ch = self.chains[self.row_chain[r]]
            is_cand = self.row_kind[r] == CAND
            block_end = is_cand and new_len[r] >= ch.stop
            if not (ended[r] or block_end):
                continue
            self.row_kind[r] = DEAD if tok_l[r] == eos else DIRTY
            if toks is None:
                toks = session.tokens().tolist()
            row = toks[r][: new_len[r]]
            seq: Seq = tuple(row[: row.index(eos) + 1] if eos in row else row)
            if is_cand:
                complete = target.is_complete(seq)
                ch.cand[self.row_m[r]] = (seq, lp_l[r], lq_l[r], complete)
                if not complete:
                    self.row_kind[r] = HOLD
                    ch.inc.append(self.row_m[r])
            else:
                ch.rollouts[(self.row_m[r], self.row_k[r])] = (seq, lp_l[r], lq_l[r])
            ch.live -= 1
            if ch.live == 0:
                closed.append(ch)
        return closed

    # ------------------------------------------------------------------ selection
    def _select(self, ch: Chain) -> tuple[int, Tensor, Tensor, int, Tensor]:
        """The SIR draw of a chain whose candidates (and their rollouts) have all finished."""
        cfg, target = self.cfg, self.target
        m, k = self.m, self.k
        cand = [x for x in ch.cand if x is not None]
        assert len(cand) == m
        comp = [j for j in range(m) if cand[j][3]]
        inc = sorted(ch.inc)
        rolls = [ch.rollouts[(j, i)] for j in inc for i in range(k)]
        seqs = [cand[j][0] for j in comp] + [x[0] for x in rolls]
        refs = None
        if needs_reference(target):
            refs = torch.tensor(
                [ch.log_ref + cand[j][1] for j in comp]
                + [
                    ch.log_ref + cand[j][1] + rolls[p][1]
                    for p, j in enumerate(jj for jj in inc for _ in range(k))
                ],
                dtype=torch.float64,
            )
        scores, caches = self.scorer(seqs, refs, [ch.index] * len(seqs), self.caches)
        self.caches = caches
        self.extra = self.extra + scores.cost
        log_e = torch.full((m,), -math.inf, dtype=torch.float64)
        if comp:
            log_e[comp] = scores.log_tilt[: len(comp)]
        clipped = 0
        if inc:
            lr = torch.tensor([x[1] for x in rolls], dtype=torch.float64)
            lqr = torch.tensor([x[2] for x in rolls], dtype=torch.float64)
            ratio = torch.where(torch.isneginf(lr), lr, lr - lqr)
            ratio, clipped = clip_log_ratio(ratio, cfg.is_log_ratio_clip)
            log_e[inc] = log_mean_energy(ratio, scores.log_tilt[len(comp) :], k)
        self.counters["rollouts"] += len(rolls)
        self.counters["clipped"] += clipped
        c_lp = torch.tensor([x[1] for x in cand], dtype=torch.float64)
        c_lq = torch.tensor([x[2] for x in cand], dtype=torch.float64)
        log_a = torch.where(torch.isneginf(c_lp), c_lp, c_lp - c_lq)
        log_w = candidate_log_weights(log_a, log_e)[None, :]
        probs, failed = selection_probabilities(log_w)
        chosen = int(inverse_cdf(probs.log(), ch.stream.take(1))[0])
        ch.step += 1
        if bool(failed[0]) and ch.failed_at is None:
            ch.failed_at = ch.step
        if ch.first_log_w is None:
            ch.first_log_w = log_w[0]
        if cfg.record_selections:
            ch.selections.append(Selection(tuple(x[0] for x in cand), probs[0].clone(), chosen))
        seq, c_lp_ch, _, complete = cand[chosen]
        complete_mask = torch.tensor([x[3] for x in cand], dtype=torch.bool)
        if complete:
            ch.output = seq
            ch.out_ref = ch.log_ref + c_lp_ch
            if scores.reward is not None:
                ch.reward = float(scores.reward[comp.index(chosen)])
            ch.park = None
            self.finished += 1
        else:
            assert ch.park is not None
            pos = ch.inc.index(chosen)
            ch.park.select(torch.full((m,), pos, dtype=torch.long))
            ch.log_ref += c_lp_ch
            self.queue.append(("cand", ch.index))
        return ch.index, probs[0], log_w[0], chosen, complete_mask

    # ------------------------------------------------------------------ result
    def finish(self, finish_batch: Callable[[Any], SampleSet], batch_type: Any) -> SampleSet:
        """The draws as a :class:`SampleSet` (through the lock-step
        :func:`~tiltsample.samplers.ets.state.finish_batch`)."""
        n = len(self.chains)
        counters = dict(self.counters)
        counters["peak_rows"] = self.peak_rows
        batch = batch_type(
            n=n,
            live=[],
            session=None,
            proposal_session=None,
            states=None,
            guidance_step=0,
            log_reference=torch.tensor([c.out_ref for c in self.chains], dtype=torch.float64),
            outputs=[c.output for c in self.chains],
            rewards=torch.tensor([c.reward for c in self.chains], dtype=torch.float64),
            failed=torch.tensor([c.failed_at is not None for c in self.chains], dtype=torch.bool),
            failed_at=[c.failed_at for c in self.chains],
            selections=[c.selections for c in self.chains],
            caches=self.caches if self.cfg.reward_mode == "self-consistency" else None,
            first_log_weights=torch.stack(
                [c.first_log_w for c in self.chains if c.first_log_w is not None]
            ),
            cost=self.cost(),
            counters=counters,
        )
        return finish_batch(batch)


def continuous_step(
    cfg: ETSConfig, scorer: Scorer, generator: torch.Generator, state: ETSState
) -> tuple[ETSState, ETSInfo]:
    """Ticks of the continuous engine until some chain selects (one ``ETSInfo`` row each):
    the ``step`` of ``batching="continuous"``."""
    target = state.target
    engine = state.engine
    if engine is None:
        if state.remaining <= 0:
            raise ValueError("ETS step called on a finished state")
        rows = state.batch_size * cfg.num_candidates * cfg.num_rollouts
        engine = ContinuousETS(cfg, scorer, target, state.remaining, rows, generator)
    before = engine.cost()
    events = engine.advance()
    m = cfg.num_candidates
    probs = torch.stack([e[1] for e in events]) if events else torch.zeros((0, m))
    log_w = torch.stack([e[2] for e in events]) if events else torch.zeros((0, m))
    chosen = torch.tensor([e[3] for e in events], dtype=torch.long)
    complete = (
        torch.stack([e[4] for e in events]) if events else torch.zeros((0, m), dtype=torch.bool)
    )
    info = ETSInfo(
        cost_delta(engine.cost(), before),
        max((engine.chains[e[0]].step for e in events), default=0),
        probs,
        log_w,
        chosen,
        complete,
        0,
    )
    parts = state.parts
    if engine.done:
        parts = (*parts, engine.finish(lambda b: finish_batch(cfg, scorer, target, b), Batch))
        engine = None
    return state._replace(remaining=0, parts=parts, engine=engine), info
