"""Batched ancestral decoding on a :class:`~tiltsample.policy.DecodeSession`.

The one decode loop every sampler shares: it samples with the caller's ``torch.Generator`` from
``q_tau(v | x_<t) = softmax(log p(v | x_<t) / tau)`` (full vocabulary: no top-k, no top-p) and
returns, per token, ``log p`` at temperature 1 and ``log q`` of the law the token was actually drawn
from, so that importance weights ``p/q`` are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.policy import DecodeSession
from tiltsample.types import Seq


class Decoded(NamedTuple):
    """Result of :func:`decode_until_complete` for the rows of a session."""

    tokens: Tensor
    """``LongTensor[B, n]``: the new tokens (EOS-padded after a row ended)."""
    token_log_p: Tensor
    """``[B, n]`` float64: ``log p(x_t | x_<t)`` at temperature 1 (0 on padding)."""
    token_log_q: Tensor
    """``[B, n]`` float64: log-prob under the law that produced the token (0 on padding and
    on a forced EOS)."""
    new_lengths: Tensor
    """``LongTensor[B]``: tokens each row actually received (EOS included)."""
    generated_tokens: int
    """Tokens emitted by the loop (sampled ones plus forced EOS), padding excluded."""
    token_entropy: Tensor | None = None
    """``[B, n]`` float64: entropy of ``p(. | x_<t)`` at temperature 1 at every new position (0 on
    padding), when asked for with ``record_entropy=True``; otherwise ``None``."""

    @property
    def log_p(self) -> Tensor:
        """``[B]``: summed temperature-1 log-prob of the new tokens."""
        return self.token_log_p.sum(dim=1)

    @property
    def log_q(self) -> Tensor:
        """``[B]``: summed proposal log-prob of the new tokens."""
        return self.token_log_q.sum(dim=1)


def tempered_logprobs(log_p: Tensor, temperature: float) -> Tensor:
    """``log softmax(log_p / tau)`` with ``-inf`` entries kept at ``-inf`` (no NaN)."""
    if temperature == 1.0:
        return log_p
    return torch.log_softmax(log_p / temperature, dim=-1)


def entropy(log_p: Tensor) -> Tensor:
    """Row-wise Shannon entropy ``-sum_v p_v log p_v`` of normalised ``log_p`` ``[B, V]``
    (``0 log 0 = 0``)."""
    finite = torch.isfinite(log_p)
    return -torch.where(finite, torch.exp(log_p) * log_p, torch.zeros_like(log_p)).sum(dim=1)


def check_law(log_probs: Tensor, what: str = "next-token log-probs") -> None:
    """Raise ``ValueError`` if a row of ``log_probs`` ``[B, V]`` is not a law: NaN, ``+inf`` or
    no finite entry. The message names the rows (at most eight) and what went wrong."""
    bad_value = torch.isnan(log_probs) | (log_probs == math.inf)
    empty = ~torch.isfinite(log_probs).any(dim=-1)
    rows = bad_value.any(dim=-1) | empty
    if not bool(rows.any()):
        return
    index = torch.nonzero(rows).flatten().tolist()
    shown = ", ".join(str(i) for i in index[:8]) + (" ..." if len(index) > 8 else "")
    first = index[0]
    if bool(torch.isnan(log_probs[first]).any()):
        cause = "NaN"
    elif bool((log_probs[first] == math.inf).any()):
        cause = "+inf"
    else:
        cause = "no token of finite log-probability"
    raise ValueError(
        f"the policy returned invalid {what} for {len(index)} of {log_probs.shape[0]} rows "
        f"(rows {shown}; row {first} has {cause}): check the model's outputs (dtype overflow, "
        "a broken checkpoint) or the policy's masking"
    )


def sample_categorical(generator: torch.Generator, log_probs: Tensor) -> Tensor:
    """One draw per row of ``log_probs`` ``[B, V]`` with the caller's generator.

    Raises ``ValueError`` naming the rows if a row holds NaN or no finite entry (a policy that
    returned an invalid law), instead of torch's "probability tensor contains inf, nan".
    """
    check_law(log_probs)
    probs = torch.softmax(log_probs.to(torch.float64), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def decode_until_complete(
    session: DecodeSession,
    generator: torch.Generator,
    *,
    eos_id: int,
    max_length: int,
    temperature: float = 1.0,
    force_eos_at_cap: bool = False,
    max_new: int | None = None,
    record_entropy: bool = False,
    proposal: Callable[[Tensor], Tensor] | None = None,
) -> Decoded:
    """Extend every row of ``session`` until EOS, ``max_length`` total tokens, or ``max_new`` new.

    Parameters
    ----------
    session
        Rows to continue; rows that already ended receive EOS padding only.
    generator
        The caller's generator; nothing else is random.
    eos_id
        End-of-sequence id.
    max_length
        The response-length cap ``L`` (EOS included), measured from the start of the response.
    temperature
        Proposal temperature ``tau > 0`` (``q = softmax(log p / tau)``, full vocabulary).
    force_eos_at_cap
        The ``truncation="condition"`` rule: a row that reaches position ``L - 1`` without EOS gets
        EOS there, with ``log q = 0`` and ``log p = log p(EOS | x_<L)``.
    max_new
        Stop after this many new tokens even before ``max_length`` (block-wise decoding).
    record_entropy
        Also return :attr:`Decoded.token_entropy`, the entropy ``H(p(. | x_<t))`` of the
        temperature-1 law at every new position (e.g. for entropy-jump cut laws); draws from
        ``generator`` are the same either way.
    proposal
        The sampled law as a function of the temperature-1 log-probs ``[B, V]`` (normalised
        log-probs out), e.g. a top-k / top-p filter; default ``softmax(log p / temperature)``.
        ``temperature`` is ignored when it is given. ``log q`` is recorded under it, so
        ``log p - log q`` stays an exact importance log-weight.
    """
    batch = session.batch_size
    start = session.length
    live = (
        ~(session.tokens() == eos_id).any(dim=1) if start else torch.ones(batch, dtype=torch.bool)
    )
    steps = max(max_length - start, 0)
    if max_new is not None:
        steps = min(steps, max_new)
    toks: list[Tensor] = []
    lps: list[Tensor] = []
    lqs: list[Tensor] = []
    hs: list[Tensor] = []
    new_len = torch.zeros(batch, dtype=torch.long)
    generated = 0
    for step in range(steps):
        if not bool(live.any()):
            break
        position = start + step
        log_p = session.logprobs().to(torch.float64)
        if force_eos_at_cap and position == max_length - 1:
            tok = torch.full((batch,), eos_id, dtype=torch.long)
            lq = torch.zeros(batch, dtype=torch.float64)
        else:
            log_q_all = (
                tempered_logprobs(log_p, temperature) if proposal is None else proposal(log_p)
            )
            tok = sample_categorical(generator, log_q_all)
            lq = log_q_all.gather(1, tok[:, None]).squeeze(1)
        lp = log_p.gather(1, tok[:, None]).squeeze(1)
        tok = torch.where(live, tok, torch.full_like(tok, eos_id))
        zero = torch.zeros_like(lp)
        toks.append(tok)
        lps.append(torch.where(live, lp, zero))
        lqs.append(torch.where(live, lq, zero))
        if record_entropy:
            hs.append(torch.where(live, entropy(log_p), zero))
        new_len += live.long()
        generated += int(live.sum())
        session.extend(tok)
        live = live & (tok != eos_id)
    if toks:
        return Decoded(
            torch.stack(toks, 1),
            torch.stack(lps, 1),
            torch.stack(lqs, 1),
            new_len,
            generated,
            torch.stack(hs, 1) if record_entropy else None,
        )
    empty = torch.zeros((batch, 0), dtype=torch.float64)
    return Decoded(
        torch.zeros((batch, 0), dtype=torch.long),
        empty,
        empty,
        new_len,
        0,
        empty if record_entropy else None,
    )


def rows_to_seqs(tokens: Tensor, eos_id: int) -> list[Seq]:
    """Convert ``LongTensor[B, n]`` rows to :data:`Seq`, cutting after the first EOS."""
    out: list[Seq] = []
    for row in tokens.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id) + 1]
        out.append(tuple(row))
    return out


def seqs_to_rows(xs: Sequence[Seq], pad_id: int) -> tuple[Tensor, Tensor]:
    """Pad :data:`Seq` to ``LongTensor[B, n]`` with ``pad_id``; also return their lengths."""
    length = max((len(x) for x in xs), default=0)
    rows = torch.full((len(xs), length), pad_id, dtype=torch.long)
    for i, x in enumerate(xs):
        if x:
            rows[i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return rows, torch.tensor([len(x) for x in xs], dtype=torch.long)
