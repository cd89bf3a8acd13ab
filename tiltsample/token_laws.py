"""Next-token laws and draws: the pieces of one decoding position that every decoder shares.

A *law* turns the temperature-1 next-token log-probs ``[R, V]`` of ``R`` rows into the
:class:`TokenLaw` the decode engine (:mod:`tiltsample.decode_engine`) needs: the normalised
``log q`` tokens are drawn from, ``log p`` at temperature 1 (recorded for every token, so that
``log p - log q`` is an exact importance log-weight) and, when asked, an entropy per row.
:func:`tempered_law` is the default (``q = softmax(log p / tau)``, full vocabulary, one
temperature per row or one for all); a sampler with another law (the MH family's top-k support)
passes its own function. :func:`tempered_law` returns a :class:`TemperedLaw`, a callable that
also exposes its temperature and whether a custom ``proposal`` replaces it: the one kind of law a
serving backend (which samples inside its engine) can express and therefore accept.

Draws: :func:`draw_tokens` with the caller's ``torch.Generator`` (``torch.multinomial`` on
``exp(log q)``; a row that is not a law raises the :func:`check_law` error), or
:func:`inverse_cdf` with given uniforms (continuous batching, where every chain owns a stream).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = [
    "Law",
    "LawValues",
    "TemperedLaw",
    "TokenLaw",
    "check_law",
    "draw_tokens",
    "entropy",
    "inverse_cdf",
    "sample_categorical",
    "tempered_law",
    "tempered_logprobs",
]


class TokenLaw(NamedTuple):
    """The laws at one decoding position, ``[R, V]`` / ``[R]`` float64."""

    log_q: Tensor
    """Normalised ``log q``: the law tokens are drawn from."""
    log_p: Tensor
    """``log p_ref`` at temperature 1 over the full vocabulary (recorded per token)."""
    entropy: Tensor | None = None
    """An entropy per row (which one is the law's choice: the MH family's is that of ``p``
    restricted to its support), or None when the law was not asked for one."""


class LawValues(Protocol):
    """What a law returns: anything with the fields of :class:`TokenLaw` (a sampler's own
    NamedTuple whose ``entropy`` is always a tensor qualifies)."""

    @property
    def log_q(self) -> Tensor: ...

    @property
    def log_p(self) -> Tensor: ...

    @property
    def entropy(self) -> Tensor | None: ...


Law = Callable[[Tensor], LawValues]
"""A law: float64 temperature-1 log-probs ``[R, V]`` in, :class:`TokenLaw` (or the like) out."""


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


class TemperedLaw:
    r"""The law ``q = softmax(log p / tau)`` on the full vocabulary, as a callable that exposes its
    parameters (what :func:`tempered_law` returns).

    Calling it maps the float64 temperature-1 log-probs ``[R, V]`` to a :class:`TokenLaw`. The
    attributes let a *serving* backend (one that samples inside its engine, e.g. vLLM) tell a
    plain tempered law, which it can express as a per-request temperature, from an arbitrary one,
    which it must refuse: :attr:`expressible` is true exactly when no custom ``proposal`` was
    given.

    Attributes
    ----------
    temperature
        One ``tau > 0`` for all rows, or a ``[R]`` tensor (one per row).
    proposal
        The custom law (temperature-1 log-probs to normalised ``log q``, e.g. a top-k / top-p
        filter) that replaces the tempered one, or None.
    with_entropy
        Whether the law also returns the entropy of ``p`` at temperature 1.
    """

    __slots__ = ("proposal", "temperature", "with_entropy")

    def __init__(
        self,
        temperature: float | Tensor = 1.0,
        *,
        proposal: Callable[[Tensor], Tensor] | None = None,
        with_entropy: bool = False,
    ) -> None:
        self.temperature = temperature
        self.proposal = proposal
        self.with_entropy = with_entropy

    @property
    def expressible(self) -> bool:
        """True when the law is ``softmax(log p / tau)`` itself (no custom ``proposal``)."""
        return self.proposal is None

    def __call__(self, log_p: Tensor) -> TokenLaw:
        if self.proposal is not None:
            log_q = self.proposal(log_p).to(torch.float64)
        elif isinstance(self.temperature, Tensor):
            log_q = _per_row_tempered(log_p, self.temperature)
        else:
            log_q = tempered_logprobs(log_p, self.temperature)
        return TokenLaw(log_q, log_p, entropy(log_p) if self.with_entropy else None)

    def __repr__(self) -> str:
        tau = "per-row" if isinstance(self.temperature, Tensor) else repr(self.temperature)
        custom = "" if self.proposal is None else f", proposal={self.proposal!r}"
        return f"TemperedLaw(temperature={tau}{custom}, with_entropy={self.with_entropy})"


def tempered_law(
    temperature: float | Tensor = 1.0,
    *,
    proposal: Callable[[Tensor], Tensor] | None = None,
    with_entropy: bool = False,
) -> TemperedLaw:
    """The law ``q = softmax(log p / tau)`` on the full vocabulary (no top-k, no top-p).

    ``temperature`` is one ``tau > 0`` for all rows or a ``[R]`` tensor, one per row (rows at
    ``tau = 1`` get ``log p`` itself). ``proposal``, if given, replaces it: a function from the
    temperature-1 log-probs to normalised ``log q`` (a top-k / top-p filter). With
    ``with_entropy`` the law also returns the entropy of ``p`` at temperature 1. The returned
    :class:`TemperedLaw` is a :data:`Law` that also exposes these parameters (for serving
    backends, which express a tempered law natively and refuse a custom one).
    """
    return TemperedLaw(temperature, proposal=proposal, with_entropy=with_entropy)


def _per_row_tempered(log_p: Tensor, temperature: Tensor) -> Tensor:
    """:func:`tempered_logprobs` with one temperature per row (the same values row by row)."""
    out = log_p.clone()
    for tau in sorted(set(temperature.tolist())):
        if tau == 1.0:
            continue
        rows = temperature == tau
        out[rows] = tempered_logprobs(log_p[rows], tau)
    return out


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


def draw_tokens(generator: torch.Generator, log_q: Tensor) -> Tensor:
    """One draw per row of the **normalised** log-probs ``log_q`` ``[R, V]``, with the caller's
    generator: ``torch.multinomial(exp(log_q))`` (no ``softmax``: the law is normalised already).

    ``torch.multinomial`` validates the probabilities itself; when it refuses them, the rows are
    checked with :func:`check_law`, whose ``ValueError`` names the rows and the cause (NaN,
    ``+inf``, no finite entry) instead of torch's "probability tensor contains inf, nan".
    """
    try:
        probs = torch.exp(log_q.to(torch.float64))
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    except RuntimeError as err:
        check_law(log_q)
        raise ValueError(
            f"the law to draw from is not normalised (no row may have all of its mass "
            f"underflow): {err}"
        ) from err


def sample_categorical(generator: torch.Generator, log_probs: Tensor) -> Tensor:
    """One draw per row of possibly **unnormalised** ``log_probs`` ``[B, V]`` (``softmax`` in
    float64, then ``torch.multinomial``) with the caller's generator.

    Raises ``ValueError`` naming the rows if a row holds NaN or no finite entry (a policy that
    returned an invalid law), instead of torch's "probability tensor contains inf, nan". The
    decode engine draws with :func:`draw_tokens` (its laws are normalised).
    """
    check_law(log_probs)
    probs = torch.softmax(log_probs.to(torch.float64), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def inverse_cdf(log_q: Tensor, u: Tensor) -> Tensor:
    r"""``[R]`` draws from the normalised log-probs ``log_q`` ``[R, V]`` with the uniforms ``u``.

    Row ``r`` returns the index ``i`` with ``F_{i-1} <= u_r F_V < F_i`` (``F`` the running sum of
    ``exp(log_q)``), which has positive probability: an exact inverse-CDF draw. A rounding
    overflow (``u_r F_V`` not below ``F_V``) falls back to the last index of positive probability.
    """
    probs = torch.exp(log_q.to(torch.float64))
    cdf = torch.cumsum(probs, dim=-1)
    point = u[:, None].to(torch.float64) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, point, right=True).squeeze(1)
    vocab = probs.shape[1]
    over = idx >= vocab
    if bool(over.any()):
        last = vocab - 1 - torch.flip(probs > 0, dims=[1]).long().argmax(dim=1)
        idx = torch.where(over, last, idx)
    return idx
