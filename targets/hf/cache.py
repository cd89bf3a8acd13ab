"""The KV-cache side of :class:`~tiltsample.targets.hf.HFSession`: prefill, forks, merges, tidying.

A session's cache is one ``DynamicCache`` of ``T`` columns shared by its ``B`` rows, with a
boolean ``[B, T]`` *live* mask saying which columns each row attends to (see the session's
docstring). The functions here act on the cache and the mask; the rows' tokens and laws stay in
the session.

Devices: the cache's tensors live on the policy's device; the live mask and column bookkeeping
stay on the CPU, and every index computed from them is moved to the device of the cache layer it
is applied to (:func:`select_rows`, :func:`tidy_columns`), so a model split over several devices
works too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from tiltsample.decoding import seqs_to_rows
from tiltsample.targets.hf import compat
from tiltsample.targets.hf.devices import to_host
from tiltsample.types import Seq

__all__ = [
    "LogitsModel",
    "Prefill",
    "concat_rows",
    "fork_cache",
    "pad_columns",
    "prefill",
    "select_rows",
    "tidy_columns",
]


class LogitsModel(Protocol):
    """What an :class:`~tiltsample.targets.hf.HFSession` needs of its policy
    (:class:`~tiltsample.targets.hf.HFPolicy` is one)."""

    @property
    def eos_id(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def context(self, prompt: Seq) -> Seq: ...

    def forward_logits(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Any]: ...


class Prefill(NamedTuple):
    """What :func:`prefill` returns."""

    cache: Any
    """The ``DynamicCache`` of the contexts, expanded to the rows."""
    live: Tensor
    """``[B, T]`` live mask (a row's context columns; padding columns dead)."""
    prompt_laws: Tensor
    """``[P, V]`` float64 next-token law after every context (``-inf`` rows for unused ones)."""
    forward_tokens: int
    """Context tokens pushed through the model (padding excluded)."""


def prefill(
    model: LogitsModel,
    contexts: Sequence[Seq],
    row_prompt: Tensor,
    eos_id: int,
    vocab_size: int,
    batch_size: int,
) -> Prefill:
    """Encode the distinct contexts used by the rows once (right-padded batch, one forward call)
    and expand the cache to the ``batch_size`` rows (row ``r`` after ``contexts[row_prompt[r]]``).
    """
    used = sorted(set(row_prompt.tolist()))
    sub = {p: i for i, p in enumerate(used)}
    rows, lengths = seqs_to_rows([contexts[p] for p in used], pad_id=eos_id)
    width = rows.shape[1]
    mask = torch.arange(width)[None, :] < lengths[:, None]
    cache = compat.new_dynamic_cache()
    positions = torch.arange(width)[None, :].expand(len(used), -1)
    kwargs: dict[str, Any] = {}
    if not bool(mask.all()):
        kwargs = {"attention_mask": mask.long(), "position_ids": positions}
    logits, _ = model.forward_logits(rows, cache=cache, **kwargs)  # inputs moved to the device
    at = logits.device
    last = logits[torch.arange(len(used), device=at), (lengths - 1).to(at)].to(torch.float64)
    laws = torch.full((len(contexts), vocab_size), -math.inf, dtype=torch.float64)
    laws[used] = to_host(torch.log_softmax(last, dim=-1))
    index = torch.tensor([sub[p] for p in row_prompt.tolist()], dtype=torch.long)
    if len(used) == 1 and batch_size > 1:
        cache.batch_repeat_interleave(batch_size)
    elif not (len(used) == 1 and batch_size == 1):
        select_rows(cache, index)
    return Prefill(cache, mask[index], laws, int(lengths.sum()))


def select_rows(cache: Any, index: Tensor) -> None:
    """Keep the cache rows ``index`` (a CPU ``[B']`` tensor; repeats allowed), in place.

    ``DynamicLayer`` caches: each layer gathers with the index moved to its own device, by
    ``index_select`` (the same values as the layer's own ``batch_select_indices``, which indexes
    with ``keys[index, ...]``: measured 5.4x slower on a CPU for a ``[64, 2, 50, 32]`` tensor,
    23 µs against 122 µs, and every beam step and SMC resampling pays it per layer). The tensors
    are rebound, never written in place, so forks sharing them are unaffected. Other layer
    types: their ``batch_select_indices`` with the index on the device of the first layer
    holding tensors (the CPU when none does).
    """
    layers = compat.dynamic_layers(cache)
    if layers is None:
        cache.batch_select_indices(index.to(_cache_device(cache)))
        return
    for layer in layers:
        keys = getattr(layer, "keys", None)
        values = getattr(layer, "values", None)
        if isinstance(keys, Tensor) and isinstance(values, Tensor):
            at = index.to(keys.device)
            layer.keys = keys.index_select(0, at)
            layer.values = values.index_select(0, at)


def _cache_device(cache: Any) -> torch.device:
    for layer in getattr(cache, "layers", ()):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, Tensor):
            return keys.device
    return torch.device("cpu")


def pad_columns(t: Tensor, width: int) -> Tensor:
    """Pad a ``[B, H, T, D]`` cache tensor with zero columns up to ``width`` (they are masked).

    Returns ``t`` itself when it already has ``width`` columns (no copy).
    """
    if t.shape[2] == width:
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2]))


def fork_cache(cache: Any) -> Any:
    """An independent copy of a ``DynamicCache`` that shares tensors copy-on-write.

    ``DynamicLayer`` never writes its tensors in place (``update`` concatenates, ``crop`` slices,
    ``batch_select_indices`` / ``batch_repeat_interleave`` index), so copying the layer objects is
    enough; any other layer type is deep-copied.
    """
    layers = compat.dynamic_layers(cache)
    if layers is not None:
        twin = copy.copy(cache)
        twin.layers = [copy.copy(layer) for layer in layers]
        return twin
    return copy.deepcopy(cache)


def concat_rows(cache: Any, live: Tensor, other_cache: Any, other_live: Tensor) -> Tensor:
    """Append the rows of ``other_cache`` after those of ``cache`` (in place; ``DynamicLayer``
    caches only): the narrower one is padded with dead columns. Returns the merged live mask."""
    mine = compat.dynamic_layers(cache)
    theirs = compat.dynamic_layers(other_cache)
    if mine is None or theirs is None:
        raise TypeError("append_rows supports DynamicLayer caches only")
    width = max(live.shape[1], other_live.shape[1])
    for x, y in zip(mine, theirs, strict=True):
        x.keys = torch.cat([pad_columns(x.keys, width), pad_columns(y.keys, width)])
        x.values = torch.cat([pad_columns(x.values, width), pad_columns(y.values, width)])
    return torch.cat(
        [
            torch.nn.functional.pad(live, (0, width - live.shape[1])),
            torch.nn.functional.pad(other_live, (0, width - other_live.shape[1])),
        ]
    )


_MIN_HOLES = 8
"""Compaction waits for at least this many holes (dead columns beyond the longest live row)."""
_HOLE_SHARE = 0.25
"""... and for holes above this share of the longest live row (``need``): a compaction moves the
whole cache, holes cost attention and concatenation work in every later call; on the shipped
model (MH, 256 chains in 64 rows) these values were within noise of the best measured."""


def tidy_columns(cache: Any, live: Tensor, col: Tensor, cached: Tensor) -> tuple[Tensor, Tensor]:
    """Crop columns dead in every row at the end; compact when holes dominate.

    Compaction (more than ``max(_MIN_HOLES, need * _HOLE_SHARE)`` holes, ``DynamicLayer`` caches
    only) moves each row's live columns to the left (:func:`_gather_columns`); keys already carry
    their rotary positions, so moving them is exact. ``col[r, i]`` is the column of row ``r``'s
    response token ``i`` (meaningful for its ``cached[r]`` first tokens). Returns the new
    ``(live, col)``; ``cache`` changes in place.
    """
    if cache is None or live.shape[1] == 0:
        return live, col
    any_live = live.any(dim=0)
    width = live.shape[1]
    last = int(any_live.nonzero().max()) + 1 if bool(any_live.any()) else 0
    if last < width:
        cache.crop(-(width - last))
        live = live[:, :last]
    counts = live.sum(dim=1)
    need = int(counts.max()) if counts.numel() else 0
    if live.shape[1] - need <= max(_MIN_HOLES, int(need * _HOLE_SHARE)):
        return live, col
    layers = compat.dynamic_layers(cache)
    if layers is None:
        return live, col
    host_order = torch.sort((~live).long(), dim=1, stable=True).indices[:, :need]
    flat: dict[tuple[torch.device, int], Tensor] = {}
    for layer in layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None:
            continue
        layer.keys = _gather_columns(layer.keys, host_order, flat)
        layer.values = _gather_columns(layer.values, host_order, flat)
    rank = torch.cumsum(live.long(), dim=1) - 1
    kept = torch.arange(col.shape[1])[None, :] < cached[:, None]
    moved = rank.gather(1, col.clamp(max=live.shape[1] - 1))
    col = torch.where(kept, moved, torch.zeros_like(moved))
    live = torch.arange(need)[None, :] < counts[:, None]
    return live, col


def _gather_columns(
    t: Tensor, order: Tensor, flat: dict[tuple[torch.device, int], Tensor]
) -> Tensor:
    """``t[b, h, order[b, j]]`` for a ``[B, H, T, D]`` cache tensor, as one ``index_select`` of
    ``D``-vectors over the flattened ``[B * H * T, D]`` tensor (measured 9x faster on a CPU than
    ``gather`` with an expanded index for ``[64, 4, 70, 32]``). The flat index is built once per
    device and head count (``flat`` caches it across the layers)."""
    b, h, width, d = t.shape
    need = int(order.shape[1])
    key = (t.device, h)
    index = flat.get(key)
    if index is None:
        rows = torch.arange(b * h, dtype=torch.long).view(b, h, 1) * width
        index = (rows + order[:, None, :]).reshape(-1).to(t.device)
        flat[key] = index
    return t.reshape(b * h * width, d).index_select(0, index).view(b, h, need, d)
