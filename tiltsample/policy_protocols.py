"""The reference-policy and decode-session protocols (re-exported by :mod:`tiltsample.policy`).

A *reference policy* is the model ``p_ref(x | y)`` that every target tilts. Any object with the
attributes of :class:`ReferencePolicy` works (structural typing; no subclassing of project classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from tiltsample.types import Cost, Seq

__all__ = ["DecodeSession", "RaggedDecodeSession", "ReferencePolicy", "RolloutSession"]


@runtime_checkable
class ReferencePolicy(Protocol):
    """An autoregressive reference policy ``p_ref(x_t | y, x_<t)`` at temperature 1.

    Attributes
    ----------
    vocab_size
        Number of token ids, ``V``; ids lie in ``[0, V)``.
    eos_id
        The end-of-sequence id. It may have probability zero everywhere (log-prob ``-inf``).
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        """Log-probabilities ``[B, V]`` (float64 or float32) of the next token after each prefix.

        Prefixes never contain EOS (callers stop there). Rows must be normalised in probability
        space; entries may be ``-inf``.
        """
        ...

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        """``sum_t log p(x_t | y, x_<t)`` over the tokens present in each ``x`` (EOS included).

        With ``per_token=True`` return ``[B, L_max]``, zero beyond each sequence's length.
        """
        ...


@runtime_checkable
class DecodeSession(Protocol):
    """A batch of ``B`` response prefixes that continue one prompt, decoded step by step.

    All rows have the same number of tokens (``length``); rows that already ended with EOS are
    padded by further EOS tokens and report a point mass on EOS. Methods mutate the session in place
    (a sampler state *owns* its session: ``step`` consumes it; branching needs :meth:`fork`).

    Optional capabilities (use them through the module-level helpers, which fall back when a
    session lacks them): *ragged rows* (:class:`RaggedDecodeSession`: ``row_lengths`` and
    ``truncate_rows``) and *scoring given tokens* (``extend_and_score``).
    """

    @property
    def batch_size(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def cost(self) -> Cost:
        """Forward tokens and model calls spent by *this* session object (not by its forks)."""
        ...

    def tokens(self) -> Tensor:
        """The response tokens so far, ``LongTensor[B, length]``."""
        ...

    def logprobs(self) -> Tensor:
        """Next-token log-probabilities ``[B, V]`` (temperature 1) after every row."""
        ...

    def extend(self, tokens: Tensor) -> None:
        """Append ``tokens`` (``[B]`` or ``[B, k]``) to every row."""
        ...

    def truncate(self, n: int) -> None:
        """Drop the last ``n`` tokens of every row."""
        ...

    def select(self, indices: Tensor) -> None:
        """Replace the rows by ``rows[indices]`` (resampling, expansion); may change ``B``."""
        ...

    def fork(self) -> DecodeSession:
        """An independent copy sharing nothing mutable with this session."""
        ...


@runtime_checkable
class RaggedDecodeSession(DecodeSession, Protocol):
    """A :class:`DecodeSession` whose rows may have different lengths.

    ``row_lengths()[r]`` is the number of tokens of row ``r``; ``length`` is the largest of them
    and ``tokens()`` is ``[B, length]`` with EOS padding past each row's own length (read the
    lengths, not the padding). ``extend`` appends at each row's own position, ``truncate(n)``
    drops the last ``n`` tokens of every row (``n <= min(row_lengths())``) and ``select`` /
    ``fork`` keep each row's length. A session over rows of *different prompts*
    (:func:`~tiltsample.policy.open_session_multi`) is ragged too.
    """

    def row_lengths(self) -> Tensor:
        """``LongTensor[B]``: tokens of every row."""
        ...

    def truncate_rows(self, n: Tensor) -> None:
        """Drop the last ``n[r]`` tokens of row ``r`` (``LongTensor[B]``, ``0 <= n[r] <= len``)."""
        ...


@runtime_checkable
class RolloutSession(Protocol):
    """A session that implements the *rollout level* of the decode engine natively.

    A serving backend (the vLLM engine of :mod:`tiltsample.targets.vllm`) decodes whole
    continuations in one engine call instead of one next-token law per position;
    :func:`tiltsample.decode_engine.decode` and
    :func:`~tiltsample.decode_engine.score_continuations` hand their requests to these methods
    when the session has them (``isinstance(session, RolloutSession)``), and run the token-level
    loop otherwise. Such a session may not offer ``logprobs()`` (full next-token laws); when it
    cannot, it raises an error naming the token-level access the caller needs. Such a session is
    also a :class:`RaggedDecodeSession`; the protocol lists only the two rollout methods, so that
    the ``isinstance`` check of every ``decode`` call stays cheap.

    The types are those of :mod:`tiltsample.decode_engine` (``DecodeRequest`` in, ``Decoded``
    out), written ``Any`` here because that module imports this one.
    """

    def decode_rollouts(self, generator: Any, request: Any) -> Any:
        """Extend every row as the ``DecodeRequest`` ``request`` says (the rules of
        :mod:`tiltsample.decode_engine`) and return the ``Decoded`` continuations; randomness
        comes from ``generator`` only (a ``torch.Generator``, or a
        :class:`~tiltsample.row_generators.RowGenerators` whose groups each draw from their
        own generator, as their runs alone would). Every row ends extended by the returned
        ``[B, n]`` tokens (EOS-padded), as after the token-level loop without parking."""
        ...

    def score_continuations(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Append ``tokens`` ``[B, k]`` (row ``r``: ``lengths[r]`` real tokens, then padding) and
        return their temperature-1 log-probs ``[B, k]`` float64, 0 on padding."""
        ...
