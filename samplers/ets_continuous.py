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

from tiltsample.decoding import tempered_logprobs
from tiltsample.policy import DecodeSession, append_rows, open_session, row_lengths
from tiltsample.results import SampleSet, Selection
from tiltsample.samplers.ets_rollout import clip_log_ratio, log_mean_energy, needs_reference
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["ChainStream", "ContinuousETS", "inverse_cdf"]

_CAND, _ROLL, _DEAD, _HOLD, _DIRTY = 0, 1, 2, 3, 4
# _DEAD: finished with EOS (padding only, never a model input again); _DIRTY: finished without
# EOS (its last token is pending: dropped at the next tick); _HOLD: candidate at its block end


class ChainStream:
    """Uniform ``[0, 1)`` float64 draws of one chain from its own generator, in fixed-size chunks.

    Chunking does not change the values: the ``i``-th uniform taken is the ``i``-th uniform of the
    generator's stream, whatever the sizes of the earlier requests.
    """

    def __init__(self, seed: int, chunk: int = 256) -> None:
        self.generator = torch.Generator().manual_seed(int(seed))
        self._chunk = chunk
        self._buf = torch.zeros(0, dtype=torch.float64)
        self._pos = 0

    def take(self, n: int) -> Tensor:
        """The next ``n`` uniforms of the stream."""
        if self._pos + n > self._buf.numel():
            fresh = torch.rand(max(self._chunk, n), generator=self.generator, dtype=torch.float64)
            self._buf = torch.cat([self._buf[self._pos :], fresh])
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out


def inverse_cdf(log_probs: Tensor, u: Tensor) -> Tensor:
    r"""``[R]`` draws from the rows of ``log_probs`` ``[R, V]`` by inversion with uniforms ``u``.

    Row ``r`` returns the index ``i`` with ``F_{i-1} <= u_r F_V < F_i`` (``F`` the cumulative
    probabilities), which has positive probability; a rounding overflow falls back to the last
    index of positive probability.
    """
    probs = torch.softmax(log_probs.to(torch.float64), dim=-1)
    cdf = probs.cumsum(dim=-1)
    point = (u.to(torch.float64) * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, point, right=True).squeeze(1)
    vocab = probs.shape[1]
    over = idx >= vocab
    if bool(over.any()):
        last = vocab - 1 - torch.flip(probs > 0, dims=[1]).long().argmax(dim=1)
        idx = torch.where(over, last, idx)
    return idx


class _Chain:
    """One ETS chain in flight."""

    def __init__(self, index: int, seed: int) -> None:
        self.index = index
        self.stream = ChainStream(seed)
        self.step = 0
        self.stop = 0
        self.log_ref = 0.0
        self.live = 0
        self.cand: list[tuple[Seq, float, float, bool] | None] = []
        self.inc: list[int] = []
        self.rollouts: dict[tuple[int, int], tuple[Seq, float, float]] = {}
        self.park: DecodeSession | None = None
        self.needs_park = False
        self.selections: list[Selection] = []
        self.first_log_w: Tensor | None = None
        self.failed_at: int | None = None
        self.output: Seq | None = None
        self.reward = math.nan
        self.out_ref = 0.0


class ContinuousETS:
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
        from tiltsample.samplers.ets import _block

        self.cfg = cfg
        self.scorer = scorer
        self.target = target
        self.m = int(cfg.num_candidates)
        self.k = int(cfg.num_rollouts)
        self.d = int(target.max_new_tokens)
        self.block = _block(target, cfg.block_size)
        self.max_rows = int(max_rows)
        seeds = torch.randint(0, 2**62, (num_chains,), generator=generator).tolist()
        self.chains = [_Chain(i, s) for i, s in enumerate(seeds)]
        self.next_new = 0
        self.queue: list[tuple[str, int]] = []
        self.caches: list[Any] | None = None
        if cfg.reward_mode == "self-consistency":
            from tiltsample.samplers.ets import AnswerCache

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

    @property
    def rows(self) -> int:
        return len(self.row_chain)

    def cost(self) -> Cost:
        live = Cost() if self.session is None else self.session.cost
        return (
            self.spent
            + live
            + self.template.cost
            + Cost(generated_tokens=self.generated)
            + self.extra
        )

    def _append(
        self, piece: DecodeSession, chain: int, kind: int, ms: list[int], ks: list[int]
    ) -> None:
        """Queue ``piece``'s rows for the next :meth:`_flush` (one ``append_rows`` per tick)."""
        self.pieces.append(piece)
        n = len(ms)
        self.row_chain += [chain] * n
        self.row_kind += [kind] * n
        self.row_m += ms
        self.row_k += ks
        zeros = torch.zeros(n, dtype=torch.float64)
        self.lp = torch.cat([self.lp, zeros])
        self.lq = torch.cat([self.lq, zeros])

    def _flush(self) -> None:
        """Append the pieces admitted this tick to the session: merged first (small caches), then
        one ``append_rows`` on the big session."""
        if not self.pieces:
            return
        merged = self.pieces[0]
        for piece in self.pieces[1:]:
            merged = append_rows(merged, piece)
        self.pieces = []
        self.session = merged if self.session is None else append_rows(self.session, merged)

    def _apply(self, index: list[int], meta: list[tuple[int, int, int, int, bool]]) -> None:
        """``session.select(index)``; ``meta[i] = (chain, kind, m, k, reset)`` of new row ``i``."""
        assert self.session is not None
        if not index:
            self.spent = self.spent + self.session.cost
            self.session = None
        else:
            self.session.select(torch.tensor(index, dtype=torch.long))
        self.row_chain = [x[0] for x in meta]
        self.row_kind = [x[1] for x in meta]
        self.row_m = [x[2] for x in meta]
        self.row_k = [x[3] for x in meta]
        idx = torch.tensor(index, dtype=torch.long)
        reset = torch.tensor([x[4] for x in meta], dtype=torch.bool)
        zero = torch.zeros(len(index), dtype=torch.float64)
        self.lp = torch.where(reset, zero, self.lp[idx])
        self.lq = torch.where(reset, zero, self.lq[idx])

    def _admit(self) -> None:
        """Fill the free rows, first come first served (a waiting item is never overtaken).

        Structural changes copy the whole KV cache, so they are batched into at most one
        ``select`` and one ``append_rows`` per tick. Finished rows stay in the session as dead
        rows (EOS padding, no model input) until a fraction of the budget is dead, nothing else is
        live, or a ``select`` happens anyway. The incomplete candidates of a chain whose block
        just ended are expanded to their rollout rows *in place* by that ``select`` when the rows
        fit; otherwise they are parked outside the session (a fork) and appended later.
        """
        kinds = self.row_kind
        dead, held, dirty = kinds.count(_DEAD), kinds.count(_HOLD), kinds.count(_DIRTY)
        live = self.rows - dead - held - dirty
        compact = self.rows > 0 and (live == 0 or dirty > 0 or dead >= self.compact_at)
        if not (compact or held) and self.max_rows - live < self.compact_at:
            return  # wait until a batch of rows is free: appends copy the whole cache
        if self.queue and self.queue[0][0] == "hold":
            need = len(self.chains[self.queue[0][1]].inc) * self.k
            compact = compact or live + need <= self.max_rows
        base = live if compact else live + dead + held + dirty
        accepted: list[tuple[str, int]] = []
        pos = 0
        while True:
            if pos < len(self.queue):
                what, c = self.queue[pos]
                inc = len(self.chains[c].inc)
                need = inc * self.k if what in ("hold", "expand") else self.m
            elif self.next_new < len(self.chains):
                what, c, need = "new", self.next_new, self.m
            else:
                break
            if (what == "hold" and not compact) or (base and base + need > self.max_rows):
                break
            accepted.append((what, c))
            base += need
            if what == "new":
                self.next_new += 1
            else:
                pos += 1
        del self.queue[:pos]
        taken = {c for what, c in accepted if what == "hold"}
        # held candidates that do not fit now: park them (their rows die in the session)
        for i, (what, c) in enumerate(self.queue):
            if what == "hold":
                assert self.session is not None
                rows = [r for r in range(self.rows) if kinds[r] == _HOLD and self.row_chain[r] == c]
                park = self.session.fork()
                park.select(torch.tensor(rows, dtype=torch.long))
                self.chains[c].park = park
                for r in rows:
                    kinds[r] = _DIRTY
                self.queue[i] = ("expand", c)
                compact = True
        if compact or taken:
            index = [r for r in range(self.rows) if kinds[r] in (_CAND, _ROLL)]
            meta = [
                (self.row_chain[r], kinds[r], self.row_m[r], self.row_k[r], False) for r in index
            ]
            for what, c in accepted:
                if what != "hold":
                    continue
                ch = self.chains[c]
                rows = [r for r in range(self.rows) if kinds[r] == _HOLD and self.row_chain[r] == c]
                for r in rows:
                    for j in range(self.k):
                        index.append(r)
                        meta.append((c, _ROLL, self.row_m[r], j, True))
                ch.needs_park = True
                ch.live = len(rows) * self.k
            self._apply(index, meta)
        for what, c in accepted:
            ch = self.chains[c]
            if what == "new":
                piece = self.template.fork()
                piece.select(torch.zeros(self.m, dtype=torch.long))
                self._start_block(ch, piece)
            elif what == "expand":
                piece = ch.park  # type: ignore[assignment]
                assert piece is not None
                if self.k > 1:
                    piece.select(torch.arange(len(ch.inc)).repeat_interleave(self.k))
                ch.park = None
                ch.needs_park = True
                ch.live = len(ch.inc) * self.k
                ms = [m for m in ch.inc for _ in range(self.k)]
                ks = [j for _ in ch.inc for j in range(self.k)]
                self._append(piece, c, _ROLL, ms, ks)
            elif what == "cand":
                piece = ch.park  # type: ignore[assignment]
                assert piece is not None
                ch.park = None
                self._start_block(ch, piece)

    def _start_block(self, ch: _Chain, piece: DecodeSession) -> None:
        ch.stop = min((ch.step + 1) * self.block, self.d)
        ch.live = self.m
        ch.cand = [None] * self.m
        ch.inc = []
        ch.rollouts = {}
        self._append(piece, ch.index, _CAND, list(range(self.m)), [0] * self.m)

    # ------------------------------------------------------------------ one tick
    def advance(self) -> list[tuple[int, Tensor, Tensor, int, Tensor]]:
        """Run ticks until at least one chain selects (or all are done); return the selections
        ``(chain, probs [M], log_w [M], chosen, complete [M])`` made."""
        events: list[tuple[int, Tensor, Tensor, int, Tensor]] = []
        while not events and not self.done:
            self._admit()
            self.peak_rows = max(self.peak_rows, self.rows)
            self._flush()
            events += self._tick()
        return events

    def _tick(self) -> list[tuple[int, Tensor, Tensor, int, Tensor]]:
        cfg, target = self.cfg, self.target
        session = self.session
        assert session is not None
        eos = target.eos_id
        lens = row_lengths(session)
        logp = session.logprobs().to(torch.float64)
        n = self.rows
        # park the chosen-candidate prefixes of chains whose rollouts just started (law known)
        for ch in self.chains:
            if ch.needs_park:
                rows = [
                    r
                    for r in range(n)
                    if self.row_chain[r] == ch.index
                    and self.row_kind[r] == _ROLL
                    and self.row_k[r] == 0
                ]
                park = session.fork()
                park.select(torch.tensor(rows, dtype=torch.long))
                ch.park = park
                ch.needs_park = False
        # uniforms: per chain, one per row in canonical (session) order
        by_chain: dict[int, list[int]] = {}
        for r, c in enumerate(self.row_chain):
            if self.row_kind[r] != _DEAD:
                by_chain.setdefault(c, []).append(r)
        u = torch.zeros(n, dtype=torch.float64)
        for c, rows in by_chain.items():
            u[rows] = self.chains[c].stream.take(len(rows))
        kind = torch.tensor(self.row_kind, dtype=torch.long)
        tok = torch.empty(n, dtype=torch.long)
        lq = torch.empty(n, dtype=torch.float64)
        groups = (
            [(cfg.temperature, torch.ones(n, dtype=torch.bool))]
            if cfg.temperature == cfg.proposal_temperature
            else [(cfg.temperature, kind == _CAND), (cfg.proposal_temperature, kind == _ROLL)]
        )
        for tau, mask in groups:
            if not bool(mask.any()):
                continue
            law = tempered_logprobs(logp[mask], tau)
            t = inverse_cdf(law, u[mask])
            tok[mask] = t
            lq[mask] = law.gather(1, t[:, None]).squeeze(1)
        dead = kind == _DEAD
        assert not bool((kind >= _HOLD).any())  # resolved by _admit before every tick
        forced = dead
        if target.truncation == "condition":
            forced = forced | (lens == self.d - 1)
        tok = torch.where(forced, torch.full_like(tok, eos), tok)
        lq = torch.where(forced, torch.zeros_like(lq), lq)
        lp = logp.gather(1, tok[:, None]).squeeze(1)
        session.extend(tok)  # dead rows get EOS padding: never pushed through the model again
        n_cand = int((kind == _CAND).sum())
        n_roll = int((kind == _ROLL).sum())
        self.generated += n_cand + n_roll
        self.counters["candidate_tokens"] += n_cand
        self.counters["rollout_tokens"] += n_roll
        zero = torch.zeros_like(lp)
        self.lp = self.lp + torch.where(dead, zero, lp)
        self.lq = self.lq + torch.where(dead, zero, lq)
        new_len = (lens + 1).tolist()
        tok_l = tok.tolist()
        ended = ((tok == eos) | (lens + 1 >= self.d)).tolist()
        toks: list[list[int]] | None = None
        closed: list[_Chain] = []
        lp_l, lq_l = self.lp.tolist(), self.lq.tolist()
        for r in range(n):
            if self.row_kind[r] == _DEAD:
                continue
            ch = self.chains[self.row_chain[r]]
            is_cand = self.row_kind[r] == _CAND
            block_end = is_cand and new_len[r] >= ch.stop
            if not (ended[r] or block_end):
                continue
            self.row_kind[r] = _DEAD if tok_l[r] == eos else _DIRTY
            if toks is None:
                toks = session.tokens().tolist()
            row = toks[r][: new_len[r]]
            seq: Seq = tuple(row[: row.index(eos) + 1] if eos in row else row)
            if is_cand:
                complete = target.is_complete(seq)
                ch.cand[self.row_m[r]] = (seq, lp_l[r], lq_l[r], complete)
                if not complete:
                    self.row_kind[r] = _HOLD
                    ch.inc.append(self.row_m[r])
            else:
                ch.rollouts[(self.row_m[r], self.row_k[r])] = (seq, lp_l[r], lq_l[r])
            ch.live -= 1
            if ch.live == 0:
                closed.append(ch)
        events = []
        for ch in closed:
            if ch.rollouts or not ch.inc:
                events.append(self._select(ch))
            else:
                self.queue.append(("hold", ch.index))
        return events

    # ------------------------------------------------------------------ selection
    def _select(self, ch: _Chain) -> tuple[int, Tensor, Tensor, int, Tensor]:
        from tiltsample.samplers.ets import _log_weights, selection_probabilities

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
        log_w = _log_weights(log_a, log_e)[None, :]
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
        """The draws as a :class:`SampleSet` (through the lock-step ``_finish``)."""
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
