"""Deterministic seeds of independent pieces of a run (chunks, cells, chains).

A piece's randomness depends only on the run seed and the piece's index, never on which worker ran
it or when, so a resumed or distributed run reproduces the serial one bit for bit.
"""

from __future__ import annotations

__all__ = ["chunk_seed"]


def chunk_seed(seed: int, chunk: int) -> int:
    """A deterministic per-chunk seed (SplitMix64-style mixing of ``seed`` and ``chunk``)."""
    z = (seed * 0x9E3779B97F4A7C15 + (chunk + 1) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**62 - 1)
