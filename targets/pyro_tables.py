r"""The dense tabular encoding of a :class:`~tiltsample.targets.pyro_program.PyroProgram`.

Sites are read through a flattened prefix index ``idx_t = idx_{t-1} · V + x_t`` (``idx_{-1} = 0``),
and position ``t`` holds a dense table ``table_t`` of shape ``[V^t, V]`` so that the logits of site
``x_t`` are ``table_t[idx_{t-1}]``. After EOS the program is *absorbing* (a prefix that contains
EOS puts a point mass on EOS). The tilt is a table over the ``V^L`` full indices. This module
decodes indices, checks tables and tabulates an enumerable target; only toys with
``V^L <= MAX_INDEX`` are accepted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = [
    "MAX_INDEX",
    "check_size",
    "check_tables",
    "cut_response",
    "index_digits",
    "tabulate_target",
]

MAX_INDEX = 200_000
"""Largest accepted ``V^L`` (number of full token tuples the dense tilt table covers)."""

_NORMALISATION_TOL = 1e-9


def index_digits(index: Tensor, length: int, vocab: int) -> Tensor:
    """Base-``vocab`` digits of flattened indices, most significant first: ``[N, length]``."""
    powers = vocab ** torch.arange(length - 1, -1, -1, dtype=torch.long)
    return (index[:, None] // powers) % vocab


def cut_response(tokens: Sequence[int], eos_id: int) -> Seq:
    """The response a padded token tuple stands for: tokens up to and including the first EOS."""
    out = tuple(int(v) for v in tokens)
    if eos_id in out:
        return out[: out.index(eos_id) + 1]
    return out


def check_size(vocab: int, length: int) -> None:
    """Reject a toy whose ``V^L`` full token tuples exceed :data:`MAX_INDEX`."""
    if vocab**length > MAX_INDEX:
        raise ValueError(
            f"a PyroProgram tabulates all V^L full token tuples; vocab_size={vocab}, "
            f"max_new_tokens={length} gives {vocab}^{length} = {vocab**length} > {MAX_INDEX}. "
            "Use a smaller toy."
        )


def check_tables(
    vocab: int, eos: int, tables: Sequence[Tensor], tilt: Tensor
) -> tuple[list[Tensor], Tensor]:
    """Check the per-position tables and the tilt table of a program (shapes, normalisation,
    absorbing rows after EOS, no NaN or ``+inf``); return them as float64 tensors."""
    length = len(tables)
    if length < 1:
        raise ValueError("tables must hold at least one position (max_len >= 1)")
    check_size(vocab, length)
    checked: list[Tensor] = []
    for t, table in enumerate(tables):
        table = torch.as_tensor(table, dtype=torch.float64)
        if tuple(table.shape) != (vocab**t, vocab):
            raise ValueError(
                f"tables[{t}] must have shape (V^{t}={vocab**t}, V={vocab}), "
                f"got {tuple(table.shape)}"
            )
        if bool(torch.isnan(table).any()) or bool((table == torch.inf).any()):
            raise ValueError(f"tables[{t}] contains NaN or +inf")
        worst = float((torch.logsumexp(table, dim=1)).abs().max())
        if not worst < _NORMALISATION_TOL:
            raise ValueError(
                f"tables[{t}] has rows that are not normalised (|logsumexp|={worst:.3g})"
            )
        if t > 0:
            has_eos = (index_digits(torch.arange(vocab**t), t, vocab) == eos).any(dim=1)
            absorbing = torch.full((vocab,), -torch.inf, dtype=torch.float64)
            absorbing[eos] = 0.0
            if not bool((table[has_eos] == absorbing).all()):
                raise ValueError(
                    f"tables[{t}]: rows of prefixes that contain EOS must be the point mass "
                    "on EOS (the program is absorbing after EOS)"
                )
        checked.append(table)
    tilt = torch.as_tensor(tilt, dtype=torch.float64)
    if tuple(tilt.shape) != (vocab**length,):
        raise ValueError(f"tilt must have shape (V^L={vocab**length},), got {tuple(tilt.shape)}")
    if bool(torch.isnan(tilt).any()) or bool((tilt == torch.inf).any()):
        raise ValueError("tilt contains NaN or +inf (log-tilts are finite or -inf)")
    return checked, tilt


def tabulate_target(target: TiltedTarget, batch: int) -> tuple[list[Tensor], Tensor]:
    """The tables and the tilt table of an enumerable target (see
    :meth:`~tiltsample.targets.pyro_program.PyroProgram.from_target`), ``batch`` prefixes per
    ``next_logprobs`` call."""
    vocab, eos, length = target.vocab_size, target.eos_id, target.max_new_tokens
    check_size(vocab, length)
    tables = [_tabulate_position(target, t, batch) for t in range(length)]

    # Tilt table: decode every full index, canonicalise (EOS after the first EOS), score once.
    n_full = vocab**length
    digits = index_digits(torch.arange(n_full), length, vocab)
    is_eos = (digits == eos).long()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0
    canonical = torch.where(after_eos, torch.full_like(digits, eos), digits)
    powers = vocab ** torch.arange(length - 1, -1, -1, dtype=torch.long)
    unique, inverse = torch.unique((canonical * powers).sum(dim=1), return_inverse=True)
    responses = [cut_response(row, eos) for row in index_digits(unique, length, vocab).tolist()]
    values = torch.full((len(responses),), -torch.inf, dtype=torch.float64)
    complete = [i for i, x in enumerate(responses) if target.is_complete(x)]
    if complete:
        log_ref = target.log_reference([responses[i] for i in complete])
        reachable = log_ref > -torch.inf
        rows = torch.tensor(complete, dtype=torch.long)
        values[rows[~reachable]] = 0.0
        live = rows[reachable].tolist()
        if live:
            scores = target.evaluate_tilt(
                [responses[i] for i in live], log_reference=log_ref[reachable]
            )
            values[live] = scores.log_tilt
    return tables, values[inverse]


def _tabulate_position(target: TiltedTarget, t: int, batch: int) -> Tensor:
    """``table_t``: policy rows for EOS-free prefixes of length ``t``, absorbing rows otherwise."""
    vocab, eos = target.vocab_size, target.eos_id
    table = torch.full((vocab**t, vocab), -torch.inf, dtype=torch.float64)
    table[:, eos] = 0.0
    digits = index_digits(torch.arange(vocab**t), t, vocab)
    free = (~(digits == eos).any(dim=1)).nonzero().flatten()
    for start in range(0, free.numel(), batch):
        rows = free[start : start + batch]
        prefixes = [tuple(p) for p in digits[rows].tolist()]
        try:
            lp = target.policy.next_logprobs(target.prompt, prefixes)
        except (KeyError, IndexError) as err:
            raise ValueError(
                "PyroProgram.from_target needs next_logprobs on every EOS-free prefix shorter "
                f"than max_new_tokens={target.max_new_tokens}; the policy failed at length {t}: "
                f"{err}"
            ) from err
        if tuple(lp.shape) != (len(prefixes), vocab):
            raise ValueError(
                f"policy.next_logprobs returned shape {tuple(lp.shape)}, "
                f"expected ({len(prefixes)}, {vocab})"
            )
        table[rows] = lp.to(torch.float64)
    return table
