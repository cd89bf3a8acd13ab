"""The chains of continuous batching: each chain's own stream of uniforms (its draws are the
engine's inverse CDF, :func:`tiltsample.token_laws.inverse_cdf`, re-exported here), the
bookkeeping of one chain in flight, and the kinds of session rows."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tiltsample.policy import DecodeSession
from tiltsample.results import Selection
from tiltsample.token_laws import inverse_cdf  # re-exported: the engine's inverse-CDF draw
from tiltsample.types import Seq

__all__ = ["CAND", "DEAD", "DIRTY", "HOLD", "ROLL", "Chain", "ChainStream", "inverse_cdf"]

CAND, ROLL, DEAD, HOLD, DIRTY = 0, 1, 2, 3, 4
"""Kinds of session rows: a candidate, a rollout; DEAD: finished with EOS (padding only, never a
model input again); DIRTY: finished without EOS (its last token is pending: dropped at the next
tick); HOLD: a candidate at its block end."""


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


class Chain:
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
