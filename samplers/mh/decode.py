"""Suffix decoding: extend the rows of a decode session from ``q_tau`` to EOS or each row's cap,
recording ``l``, ``g`` and ``H`` per token — in lock-step over equal-length rows (with teacher
forcing) or over ragged rows (finished rows parked out of the batch). Both are requests to the
decode engine (:mod:`tiltsample.decode_engine`) with the MH proposal law.

On a rollout-level session (:class:`~tiltsample.policy.RolloutSession`, a serving engine such as
vLLM) the request carries the same law as a plain :func:`~tiltsample.token_laws.tempered_law`
(``support="full"`` is ``softmax(log p / tau)``, which such an engine samples natively;
``support="top_k"`` is refused with a ``ValueError`` naming the option) and asks for entropies
only when the cut law reads them (``cut="entropy_jump"``); otherwise ``H`` is recorded as 0."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample.decode_engine import Decoded, DecodeRequest, Parking, decode
from tiltsample.policy import DecodeSession, RolloutSession
from tiltsample.samplers.mh.config import MHConfig
from tiltsample.samplers.mh.laws import proposal_law
from tiltsample.token_laws import Law, tempered_law

__all__ = ["Slot", "Suffix", "decode_ragged", "decode_rows", "empty_suffix", "engine_law"]


class Suffix(NamedTuple):
    """Suffixes decoded for ``R`` rows, with their per-token laws."""

    tokens: Tensor  # [R, m] long, EOS-padded
    ell: Tensor  # [R, m] float64, 0-padded
    g: Tensor
    entropy: Tensor
    length: Tensor  # [R] tokens each row received
    generated: int  # sampled (and forced-EOS) tokens, teacher-forced ones excluded


class Slot:
    """A decode session whose rows hold the current states of some chains (grouped batching)."""

    __slots__ = ("serial", "session")

    def __init__(self, session: DecodeSession, serial: int) -> None:
        self.session = session
        self.serial = serial


def empty_suffix(rows: int) -> Suffix:
    """``rows`` empty suffixes (nothing decoded)."""
    f = torch.zeros((rows, 0), dtype=torch.float64)
    return Suffix(
        torch.zeros((rows, 0), dtype=torch.long), f, f, f, torch.zeros(rows, dtype=torch.long), 0
    )


def decode_rows(
    session: DecodeSession,
    generator: torch.Generator,
    *,
    caps: Tensor,
    eos_id: int,
    config: MHConfig,
    force_eos: Tensor | bool,
    forced: Tensor | None = None,
    forced_until: Tensor | None = None,
    start: Tensor | None = None,
    hard_cap: int | None = None,
) -> Suffix:
    """Extend every row of ``session`` from its length to EOS or its own cap ``caps[r]``.

    ``start[r]`` is row ``r``'s length (ragged sessions; default: ``session.length`` for all).
    With ``hard_cap``, a row that reaches ``caps[r] == hard_cap`` without EOS while other rows
    still decode is fed EOS instead of its last token (the recorded suffix keeps the token): the
    session then never asks the policy for a law past the target's cap, which a policy need not
    define. That position of the session row is never read again (later cuts lie below it and a
    chain at the target's cap is never extended).

    Rows are teacher-forced with ``forced[r, t - start]`` while ``t < forced_until[r]`` (their
    stats are recorded, their tokens not counted as generated). A row with ``force_eos[r]`` (the
    ``truncation="condition"`` rule) reaching position ``cap - 1`` gets EOS with ``g = 0`` and
    ``l = log p(EOS | x_<cap)`` (a teacher-forced EOS there is treated the same way). A row that
    stops at its cap without EOS is padded with EOS in the session (its tokens past the cap are
    never read: the next use truncates below them). The loop is the decode engine's
    (:func:`tiltsample.decode_engine.decode`) with the law :func:`proposal_law` of ``config``.
    """
    rows = session.batch_size
    if rows == 0:
        return empty_suffix(0)
    law, record = engine_law(session, config)
    request = DecodeRequest(
        law=law,
        eos_id=eos_id,
        start=session.length if start is None else start,
        cap=caps,
        force_eos=force_eos,
        forced=forced,
        forced_until=forced_until,
        hard_cap=hard_cap,
        record_entropy=record,
    )
    decoded, _ = decode(session, generator, request)
    return _suffix(decoded)


def decode_ragged(
    session: DecodeSession,
    generator: torch.Generator,
    *,
    start: Tensor,
    caps: Tensor,
    eos_id: int,
    config: MHConfig,
    force_eos: bool,
    hard_cap: int,
    shrink_below: float = 0.5,
    min_rows: int = 8,
) -> tuple[Suffix, DecodeSession]:
    """Ragged batching: extend row ``r`` (of length ``start[r]``) to EOS or ``caps[r]``, all rows
    in lock-step, and return the suffixes and the session holding the extended rows.

    Same law as :func:`decode_rows` (one draw per live row and position from ``q_tau``; EOS
    forced at ``cap - 1`` with ``force_eos``). Finished rows leave the decoding batch: when at
    most ``shrink_below`` of its rows are live (and it has ``>= min_rows`` rows), the finished
    ones are parked in a fork (``select``) and come back at the end
    (:func:`~tiltsample.policy.append_rows`, then ``select`` to restore the row order), so forward
    calls push mostly new tokens instead of padding (the engine's
    :class:`~tiltsample.decode_engine.Parking`).
    """
    rows = session.batch_size
    if rows == 0:
        return empty_suffix(0), session
    law, record = engine_law(session, config)
    request = DecodeRequest(
        law=law,
        eos_id=eos_id,
        start=start,
        cap=caps,
        force_eos=force_eos,
        hard_cap=hard_cap,
        record_entropy=record,
        parking=Parking(shrink_below, min_rows),
    )
    decoded, session = decode(session, generator, request)
    return _suffix(decoded), session


def engine_law(session: DecodeSession, config: MHConfig) -> tuple[Law, bool]:
    """The law of the decode request for ``config`` on ``session`` and whether to record
    entropies: :func:`proposal_law` with entropies on a token-level session; on a
    :class:`~tiltsample.policy.RolloutSession` the same law as a plain tempered law, with
    entropies only for ``cut="entropy_jump"`` (``ValueError`` for ``support="top_k"``)."""
    if not isinstance(session, RolloutSession):
        return proposal_law(config), True
    if config.support != "full":
        raise ValueError(
            f"support={config.support!r} restricts the proposal to the top_k tokens with the "
            "entropy of p on that support, which needs token-level access; a rollout-level "
            "backend (vLLM) samples full-vocabulary tempered laws only: use support='full' or "
            "the transformers backend"
        )
    needs = config.cut == "entropy_jump"
    return tempered_law(config.proposal_temperature, with_entropy=needs), needs


def _suffix(decoded: Decoded) -> Suffix:
    entropy = decoded.token_entropy
    if entropy is None:  # not asked for (a rollout-level session with cut="uniform")
        entropy = torch.zeros_like(decoded.token_log_p)
    return Suffix(
        decoded.tokens,
        decoded.token_log_p,
        decoded.token_log_q,
        entropy,
        decoded.new_lengths,
        decoded.generated_tokens,
    )
