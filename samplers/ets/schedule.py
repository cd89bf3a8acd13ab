"""Row scheduling of continuous batching: which chains' rows enter the shared session, and when.

Freed rows are refilled first come first served (a waiting item is never overtaken): the rollouts
of a chain whose candidate block ended, the next candidate block of a chain that has just
selected, a new chain. Structural changes of the session copy the whole KV cache, so they are
batched into at most one ``select`` and one ``append_rows`` per tick.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tiltsample.policy import DecodeSession, append_rows
from tiltsample.samplers.ets.chains import CAND, DEAD, DIRTY, HOLD, ROLL, Chain
from tiltsample.types import Cost

__all__ = ["RowScheduler"]


class RowScheduler:
    """The row bookkeeping of :class:`~tiltsample.samplers.ets.continuous.ContinuousETS`: the
    session's rows and their metadata, and :meth:`admit` / :meth:`flush`, run before each tick."""

    m: int
    k: int
    d: int
    block: int
    max_rows: int
    compact_at: int
    chains: list[Chain]
    next_new: int
    queue: list[tuple[str, int]]
    template: DecodeSession
    session: DecodeSession | None
    spent: Cost
    pieces: list[DecodeSession]
    # row metadata, aligned with the session's rows
    row_chain: list[int]
    row_kind: list[int]
    row_m: list[int]
    row_k: list[int]
    lp: Tensor
    lq: Tensor

    @property
    def rows(self) -> int:
        return len(self.row_chain)

    def _append(
        self, piece: DecodeSession, chain: int, kind: int, ms: list[int], ks: list[int]
    ) -> None:
        """Queue ``piece``'s rows for the next :meth:`flush` (one ``append_rows`` per tick)."""
        self.pieces.append(piece)
        n = len(ms)
        self.row_chain += [chain] * n
        self.row_kind += [kind] * n
        self.row_m += ms
        self.row_k += ks
        zeros = torch.zeros(n, dtype=torch.float64)
        self.lp = torch.cat([self.lp, zeros])
        self.lq = torch.cat([self.lq, zeros])

    def flush(self) -> None:
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

    def admit(self) -> None:
        """Fill the free rows, first come first served (a waiting item is never overtaken).

        Structural changes copy the whole KV cache, so they are batched into at most one
        ``select`` and one ``append_rows`` per tick. Finished rows stay in the session as dead
        rows (EOS padding, no model input) until a fraction of the budget is dead, nothing else is
        live, or a ``select`` happens anyway. The incomplete candidates of a chain whose block
        just ended are expanded to their rollout rows *in place* by that ``select`` when the rows
        fit; otherwise they are parked outside the session (a fork) and appended later.
        """
        kinds = self.row_kind
        dead, held, dirty = kinds.count(DEAD), kinds.count(HOLD), kinds.count(DIRTY)
        live = self.rows - dead - held - dirty
        compact = self.rows > 0 and (live == 0 or dirty > 0 or dead >= self.compact_at)
        if not (compact or held) and self.max_rows - live < self.compact_at:
            return  # wait until a batch of rows is free: appends copy the whole cache
        if self.queue and self.queue[0][0] == "hold":
            need = len(self.chains[self.queue[0][1]].inc) * self.k
            compact = compact or live + need <= self.max_rows
        base = live if compact else live + dead + held + dirty
        accepted = self._accept(compact, base)
        taken = {c for what, c in accepted if what == "hold"}
        compact = self._park_held() or compact
        if compact or taken:
            self._compact(accepted)
        self._start_accepted(accepted)

    def _accept(self, compact: bool, base: int) -> list[tuple[str, int]]:
        """Take the waiting items (then new chains) that fit, in order, off the queue."""
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
        return accepted

    def _park_held(self) -> bool:
        """Park the held candidates that do not fit now (their rows die in the session); return
        whether any were parked."""
        kinds = self.row_kind
        parked = False
        for i, (what, c) in enumerate(self.queue):
            if what == "hold":
                assert self.session is not None
                rows = [r for r in range(self.rows) if kinds[r] == HOLD and self.row_chain[r] == c]
                park = self.session.fork()
                park.select(torch.tensor(rows, dtype=torch.long))
                self.chains[c].park = park
                for r in rows:
                    kinds[r] = DIRTY
                self.queue[i] = ("expand", c)
                parked = True
        return parked

    def _compact(self, accepted: list[tuple[str, int]]) -> None:
        """One ``select``: drop the finished rows and expand the accepted held candidates to
        their rollout rows in place."""
        kinds = self.row_kind
        index = [r for r in range(self.rows) if kinds[r] in (CAND, ROLL)]
        meta = [(self.row_chain[r], kinds[r], self.row_m[r], self.row_k[r], False) for r in index]
        for what, c in accepted:
            if what != "hold":
                continue
            ch = self.chains[c]
            rows = [r for r in range(self.rows) if kinds[r] == HOLD and self.row_chain[r] == c]
            for r in rows:
                for j in range(self.k):
                    index.append(r)
                    meta.append((c, ROLL, self.row_m[r], j, True))
            ch.needs_park = True
            ch.live = len(rows) * self.k
        self._apply(index, meta)

    def _start_accepted(self, accepted: list[tuple[str, int]]) -> None:
        """Queue the rows of the accepted new chains, parked rollouts and next candidate blocks."""
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
                self._append(piece, c, ROLL, ms, ks)
            elif what == "cand":
                piece = ch.park  # type: ignore[assignment]
                assert piece is not None
                ch.park = None
                self._start_block(ch, piece)

    def _start_block(self, ch: Chain, piece: DecodeSession) -> None:
        ch.stop = min((ch.step + 1) * self.block, self.d)
        ch.live = self.m
        ch.cand = [None] * self.m
        ch.inc = []
        ch.rollouts = {}
        self._append(piece, ch.index, CAND, list(range(self.m)), [0] * self.m)
