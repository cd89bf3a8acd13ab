r"""The twist contract of the SMC samplers (:class:`Twist`) and the helpers every family shares:
output checks, the power part of a log-tilt (the exact prefix potential of ``(alpha - 1) log p``)
and the floor that keeps random twists positive (``specs/smc.md`` §2–§3)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.decoding import rows_to_seqs
from tiltsample.policy import DecodeSession
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "Twist",
    "apply_floor",
    "check_floor",
    "check_twist_output",
    "power_exponent",
    "power_log_tilt",
    "scaled_log",
]


def check_twist_output(values: object, batch: int, what: str) -> Tensor:
    """Validate a twist's output: a ``[batch]`` or ``[batch, V]`` tensor, no NaN or ``+inf``."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{what} must return a torch.Tensor, got {type(values).__name__}")
    if values.dim() == 0 or values.shape[0] != batch:
        raise ValueError(f"{what} returned shape {tuple(values.shape)}, expected first dim {batch}")
    values = values.to(torch.float64)
    if bool(torch.isnan(values).any()):
        raise ValueError(f"{what} returned NaN; log-twists must be finite or -inf")
    if bool((values == math.inf).any()):
        raise ValueError(f"{what} returned +inf; log-twists must be finite or -inf")
    return values


def scaled_log(values: Tensor, scale: float) -> Tensor:
    """``scale · values`` keeping ``-inf`` as ``-inf`` (never NaN)."""
    return torch.where(torch.isneginf(values), values, values * scale)


def power_log_tilt(target: TiltedTarget, log_reference: Tensor) -> Tensor:
    r"""The part of the log-tilt that is a multiple of ``log p_ref``, at ``log_reference``.

    For each tilt term whose reward is a :class:`~tiltsample.target.LogProbReward` (the power tilt
    ``(alpha - 1) log p_ref``) this adds ``term.scale · reward.from_reference(log_reference)``.
    Such a term factorises over tokens, so on a prefix ``s`` it is the exact prefix potential
    ``prod_{t <= |s|} G_t``. Works elementwise on any shape.
    """
    total = torch.zeros_like(log_reference, dtype=torch.float64)
    for term in target.terms:
        if getattr(term.reward, "uses_reference_logprob", False):
            values = term.reward.from_reference(log_reference.to(torch.float64))  # type: ignore[attr-defined]
            total = total + scaled_log(values, term.scale)
    return total


def power_exponent(target: TiltedTarget) -> float:
    """``alpha - 1``: the summed coefficient of ``log p_ref`` in the target's log-tilt."""
    total = 0.0
    for term in target.terms:
        if getattr(term.reward, "uses_reference_logprob", False):
            total += term.scale * float(getattr(term.reward, "scale", 1.0))
    return total


def check_floor(floor: float | None) -> float | None:
    """A twist floor (:func:`apply_floor`): None, or a finite number ``> 0`` returned as a float
    (``ValueError`` otherwise)."""
    if floor is None:
        return None
    if isinstance(floor, bool) or not isinstance(floor, int | float) or not 0 < floor < math.inf:
        raise ValueError(f"floor must be None or a finite number > 0, got {floor!r}")
    return float(floor)


def apply_floor(
    values: Tensor, floor: float | None, target: TiltedTarget, log_reference: Tensor
) -> Tensor:
    r"""Replace zero twist estimates (``-inf``) by ``floor · psi_prefix(s)``.

    A random twist must be **positive** wherever the energy is (``specs/smc.md`` §3): the
    telescoping argument needs ``psi_{t-1} > 0`` for every ``gamma_t > 0``. An estimator that
    returns 0 for a prefix of positive energy (K rollouts that all violate a hard constraint, or
    that end without EOS under ``truncation="condition"``) kills particles the target needs, and
    SMC becomes biased (measured: ``E[Ẑ]/Z = 0.92 ± 0.01`` on a constraint toy with one rollout,
    ``tests/samplers/smc/test_twists.py``). Any positive value restores exactness; the floor is
    relative to the prefix twist (the power part of the tilt, ``1`` for other tilts) so it has
    the tilt's scale.
    """
    if floor is None:
        return values
    base = power_log_tilt(target, log_reference) + math.log(floor)
    return torch.where(torch.isneginf(values), base, values)


class Twist(ABC):
    """Base class of SMC twists (see :mod:`tiltsample.samplers.smc.twists`).

    Subclasses implement :meth:`log_twist`; :meth:`log_twist_children` has a generic default.
    """

    name: str = "twist"
    random: bool = False
    """Whether repeated calls on the same prefix may return different values."""
    session_aware: bool = False
    """If True the SMC calls :meth:`log_twist_session` with a decode session whose rows are the
    prefixes (a fork it owns), so the twist can continue them without re-encoding."""

    @abstractmethod
    def log_twist(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        """``[B]`` float64 ``log psi(s)`` of incomplete prefixes, and the cost spent.

        ``log_reference[b] = log p_ref(prefixes[b])`` (temperature 1) is supplied so that
        analytic twists need no model call.
        """

    def log_twist_children(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        next_logprobs: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        """``[B, V]`` ``log psi(s + v)`` for every token ``v`` (``-inf`` where ``p(v | s) = 0``).

        Default: one batched :meth:`log_twist` call on the children ``s + v`` with
        ``p(v | s) > 0`` and ``v != EOS``; the EOS column is left at ``-inf`` (the caller uses
        ``G`` for complete children).
        """
        batch, vocab = next_logprobs.shape
        out = torch.full((batch, vocab), -math.inf, dtype=torch.float64)
        mask = next_logprobs > -math.inf
        mask[:, target.eos_id] = False
        rows, toks = mask.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return out, Cost()
        children = [(*prefixes[r], v) for r, v in zip(rows.tolist(), toks.tolist(), strict=True)]
        child_ref = (
            log_reference.to(torch.float64)[rows] + next_logprobs.to(torch.float64)[rows, toks]
        )
        values, cost = self.log_twist(target, children, child_ref, generator)
        out[rows, toks] = check_twist_output(values, len(children), f"{self.name} twist")
        return out, cost

    def log_twist_session(
        self,
        target: TiltedTarget,
        session: DecodeSession,
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        """``[B]`` ``log psi`` of the rows of ``session`` (session-aware twists only).

        ``session`` is a fork owned by the twist; the caller adds ``session.cost`` to its cost.
        """
        prefixes = rows_to_seqs(session.tokens(), target.eos_id)
        return self.log_twist(target, prefixes, log_reference, generator)

    def log_twist_children_session(
        self,
        target: TiltedTarget,
        session: DecodeSession,
        log_reference: Tensor,
        next_logprobs: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        """:meth:`log_twist_children` for a session-aware twist.

        The children ``s + v`` (``p(v | s) > 0``, ``v != EOS``) are built by expanding ``session``
        with ``select`` and appending one token, so the prefixes are not re-encoded.
        """
        batch, vocab = next_logprobs.shape
        out = torch.full((batch, vocab), -math.inf, dtype=torch.float64)
        mask = next_logprobs > -math.inf
        mask[:, target.eos_id] = False
        rows, toks = mask.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return out, Cost()
        session.select(rows)
        session.extend(toks)
        child_ref = (
            log_reference.to(torch.float64)[rows] + next_logprobs.to(torch.float64)[rows, toks]
        )
        values, cost = self.log_twist_session(target, session, child_ref, generator)
        out[rows, toks] = check_twist_output(values, rows.numel(), f"{self.name} twist")
        return out, cost

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
