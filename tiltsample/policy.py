"""Reference-policy and decode-session protocols, the default session, and capability helpers.

A *reference policy* is the model ``p_ref(x | y)`` that every target tilts. Any object with the
attributes of :class:`ReferencePolicy` works (structural typing; no subclassing of project classes).
A policy that also has ``session(prompt, batch)`` supplies its own fast, stateful
:class:`DecodeSession` (the HF backend wraps a KV cache); otherwise :func:`open_session` builds a
:class:`PrefixSession` from ``next_logprobs`` so that a new policy works before it is fast.

Optional session capabilities, each with a helper that falls back for sessions lacking it:

* ragged rows (:class:`RaggedDecodeSession`): :func:`truncate_rows` cuts every row by its own
  amount, :func:`row_lengths` reads the lengths (fallback: the :class:`RaggedGroups` adapter);
* :func:`extend_and_score`: append ``[B, k]`` given tokens and return their log-probs ``[B, k]``
  in one model call (fallback: :func:`score_token_by_token`);
* several prompts in one session: :func:`open_session_multi` (``policy.session_multi``; fallback: a
  :class:`PrefixSession` with one prompt per row);
* :func:`append_rows`: move the rows of one session after those of another (fallback:
  :class:`RaggedGroups`);
* the rollout level natively (:class:`RolloutSession`: ``decode_rollouts`` and
  ``score_continuations``, a serving engine's session): :func:`tiltsample.decode_engine.decode`
  and :func:`~tiltsample.decode_engine.score_continuations` dispatch to it.

This module is the public home of all of these names. It defines :func:`open_session`,
:func:`open_session_multi` and :func:`sequence_logprob_from_next` and re-exports the rest from
:mod:`tiltsample.policy_protocols` (the protocols), :mod:`tiltsample.capabilities` (the capability
helpers and :class:`RaggedGroups`) and :mod:`tiltsample.prefix_session` (:class:`PrefixSession`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.capabilities import (
    RaggedGroups,
    TokenLevelAccessError,
    append_rows,
    check_row_indices,
    check_token_block,
    extend_and_score,
    row_lengths,
    score_token_by_token,
    supports_ragged,
    truncate_rows,
)
from tiltsample.policy_protocols import (
    DecodeSession,
    RaggedDecodeSession,
    ReferencePolicy,
    RolloutSession,
)
from tiltsample.prefix_session import PrefixSession, prompt_counts
from tiltsample.types import Seq

__all__ = [
    "DecodeSession",
    "PrefixSession",
    "RaggedDecodeSession",
    "RaggedGroups",
    "ReferencePolicy",
    "RolloutSession",
    "TokenLevelAccessError",
    "append_rows",
    "check_row_indices",
    "check_token_block",
    "extend_and_score",
    "open_session",
    "open_session_multi",
    "response_context",
    "row_lengths",
    "score_token_by_token",
    "sequence_logprob_from_next",
    "supports_ragged",
    "truncate_rows",
]


def response_context(prompt: Seq, bos_id: int | None) -> Seq:
    """The ids a causal model sees before the response: ``prompt``, or ``(bos_id,)`` when the
    prompt is empty (``ValueError`` when there is no ``bos_id`` either)."""
    prompt = tuple(int(t) for t in prompt)
    if prompt:
        return prompt
    if bos_id is None:
        raise ValueError(
            "prompt is empty and the model has no bos_token_id: pass a non-empty prompt or bos_id="
        )
    return (bos_id,)


def open_session(policy: ReferencePolicy, prompt: Seq, batch: int) -> DecodeSession:
    """A decode session of ``batch`` empty rows after ``prompt``.

    Uses ``policy.session`` when the policy provides one, else a recomputing
    :class:`PrefixSession` built from ``next_logprobs``.
    """
    factory = getattr(policy, "session", None)
    if callable(factory):
        session: DecodeSession = factory(prompt, batch)
        return session
    return PrefixSession(policy, prompt, batch, accounting="recompute")


def open_session_multi(
    policy: ReferencePolicy, prompts: Sequence[Seq], rows_per_prompt: int | Sequence[int]
) -> DecodeSession:
    """One session over several prompts: ``rows_per_prompt[i]`` empty rows after ``prompts[i]``.

    Rows are ordered by prompt (prompt 0's rows first). Every method then acts on all rows at
    once, so chains or particles of many prompts decode in one batch; the session is ragged
    (:class:`RaggedDecodeSession`) when it comes from ``policy.session_multi`` (the HF backend:
    the prompts are prefilled once each, side by side, with per-row positions) or from the
    fallback. Fallbacks: all prompts equal → :func:`open_session`; otherwise a recomputing
    :class:`PrefixSession` with one prompt per row (one ``next_logprobs`` call per prompt per step).
    """
    listed, counts = prompt_counts(prompts, rows_per_prompt)
    factory = getattr(policy, "session_multi", None)
    if callable(factory):
        session: DecodeSession = factory(listed, counts)
        return session
    if len(set(listed)) <= 1:
        return open_session(policy, listed[0] if listed else (), sum(counts))
    return PrefixSession.multi(policy, listed, counts, accounting="recompute")


def sequence_logprob_from_next(
    policy: ReferencePolicy, prompt: Seq, xs: Sequence[Seq], per_token: bool = False
) -> Tensor:
    """Reference implementation of ``sequence_logprob`` through batched ``next_logprobs`` calls.

    One call per position (rows still running at that position are batched), so a new policy gets a
    correct ``sequence_logprob`` for free.
    """
    xs = [tuple(x) for x in xs]
    length = max((len(x) for x in xs), default=0)
    per = torch.zeros((len(xs), length), dtype=torch.float64)
    for t in range(length):
        rows = [i for i, x in enumerate(xs) if len(x) > t]
        lp = policy.next_logprobs(prompt, [xs[i][:t] for i in rows]).to(torch.float64)
        toks = torch.tensor([xs[i][t] for i in rows], dtype=torch.long)
        per[rows, t] = lp.gather(1, toks[:, None]).squeeze(1)
    if per_token:
        return per
    return per.sum(dim=1)
