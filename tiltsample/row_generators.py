r"""One random stream per group of rows: batching independent runs without mixing their draws.

Several independent runs (one per problem, each with its own seed) can share model calls when
their rows sit in one session (:func:`tiltsample.policy.open_session_multi`). For the batched
run to draw *exactly* what each run draws alone, each run's rows must draw from that run's own
generator, in the same order and the same shapes as alone. :class:`RowGenerators` is that
scheme: ``generators[g]`` owns the rows ``r`` with ``group[r] == g``; at every position the
decode engine (:func:`tiltsample.decode_engine.decode_step`) makes, for each group with a row
that needs a draw, one ``torch.multinomial`` over that group's rows with that group's generator —
what the run alone does at that position (one multinomial over its rows, none when none of its
rows needs a draw). A group's draws therefore depend only on its own generator and its own laws.

Only the randomness is per group; the laws come from the shared model calls, so a batched run
equals the runs alone up to the floating-point differences of a batched forward (none on the
exact toys).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.token_laws import draw_tokens

__all__ = ["RowGenerators"]


class RowGenerators:
    """``generators[g]`` draws for the rows ``r`` with ``group[r] == g`` (see the module
    docstring).

    Parameters
    ----------
    generators
        One ``torch.Generator`` per group.
    group
        ``[R]`` long: the group of every row (values in ``[0, len(generators))``).
    """

    def __init__(self, generators: Sequence[torch.Generator], group: Tensor) -> None:
        if not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError("generators must be torch.Generator objects")
        group = torch.as_tensor(group, dtype=torch.long)
        if group.dim() != 1:
            raise ValueError(
                f"group must be 1-D (one group per row), got shape {tuple(group.shape)}"
            )
        if group.numel() and (int(group.min()) < 0 or int(group.max()) >= len(generators)):
            raise ValueError(
                f"group values must lie in [0, {len(generators)}), got {group.tolist()}"
            )
        self.generators = list(generators)
        self.group = group
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=len(self.generators)).tolist()
        self._rows: list[Tensor] = list(torch.split(order, counts))
        """The rows of every group, in row order (computed once, used at every position)."""
        self._spans: list[slice | None] = [_span(rows) for rows in self._rows]
        """Each group's rows as a slice when they are consecutive (a multi-prompt session's
        layout): a view of the laws instead of an index copy."""

    @classmethod
    def of_sizes(cls, generators: Sequence[torch.Generator], sizes: Sequence[int]) -> RowGenerators:
        """Consecutive groups: the first ``sizes[0]`` rows draw from ``generators[0]``, the next
        ``sizes[1]`` from ``generators[1]``, ... (the row order of a multi-prompt session)."""
        if len(sizes) != len(generators):
            raise ValueError(
                f"sizes must give one size per generator ({len(generators)}), got {len(sizes)}"
            )
        if any(int(s) < 0 for s in sizes):
            raise ValueError(f"sizes must be >= 0, got {list(sizes)}")
        group = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(list(sizes)))
        return cls(generators, group)

    def rows_of(self, g: int) -> Tensor:
        """The rows of group ``g``, in row order."""
        return self._rows[g]

    @property
    def num_rows(self) -> int:
        return int(self.group.numel())

    def subset(self, rows: Tensor) -> RowGenerators:
        """The same generators for the rows ``rows`` of this batch (in that order)."""
        return RowGenerators(self.generators, self.group[rows])

    def draw(self, log_q: Tensor, need: Tensor, eos_id: int) -> Tensor:
        """``[R]`` tokens: for every group with a row in ``need``, one draw per row of the group
        from its normalised laws ``log_q[rows]`` with the group's generator (in group order);
        ``eos_id`` for the rows of the other groups (nothing drawn for them)."""
        rows = int(log_q.shape[0])
        if rows != self.num_rows:
            raise ValueError(f"log_q has {rows} rows, the row groups {self.num_rows}")
        tokens = torch.full((rows,), eos_id, dtype=torch.long)
        wanted = torch.bincount(self.group[need], minlength=len(self.generators)).tolist()
        for generator, mine, span, count in zip(
            self.generators, self._rows, self._spans, wanted, strict=True
        ):
            if count:
                at = mine if span is None else span
                tokens[at] = draw_tokens(generator, log_q[at])
        return tokens


def _span(rows: Tensor) -> slice | None:
    """``rows`` (ascending) as a slice when they are consecutive, else None."""
    n = int(rows.numel())
    if n == 0:
        return None
    first, last = int(rows[0]), int(rows[-1])
    return slice(first, last + 1) if last - first + 1 == n else None
