"""Reward and prefix-potential protocols.

A :class:`Reward` scores complete responses; a :class:`PrefixPotential` (a *twist*) estimates the
log-energy ``log E[exp(log_tilt(x)) | prefix]`` of partial responses. Both are structural protocols
(no base class): a reward is an object with ``__call__(prompt, xs)`` and, optionally, metadata
attributes that samplers read (see :class:`Reward`); a plain function is the metadata-free case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from tiltsample.types import Cost, Seq


@runtime_checkable
class Reward(Protocol):
    """``r(y, x)`` for a batch of complete responses: an object with ``__call__(prompt, xs)``.

    **The call** (required): ``reward(prompt, xs) -> Tensor[B]`` (float; ``B = len(xs)``).
    Deterministic and stateless. Values may be ``-inf`` (a hard constraint) but never NaN or
    ``+inf``; :class:`~tiltsample.target.TiltedTarget` checks every output
    (:func:`check_reward_output`) and rejects a reward that is not callable. Responses are
    :data:`~tiltsample.types.Seq` with EOS included when they ended with EOS; a reward sees
    nothing past EOS.

    **Metadata** (optional attributes, read with ``getattr`` and a default, so a plain function
    ``def r(prompt, xs): ...`` is a valid reward with none of them). The recommended form is a
    class with ``__call__``, these attributes where they apply and a readable ``__repr__``; the
    rewards of :mod:`tiltsample.targets.rewards` are such classes.

    ``uses_reference_logprob: bool`` (default ``False``)
        ``True`` declares ``r = scale · log p_ref(x | y)`` exactly, with a finite float ``scale``
        attribute and ``from_reference(log_reference: Tensor) -> Tensor`` returning the reward from
        already computed ``log p_ref`` values (``-inf`` where ``log p_ref = -inf``). Targets then
        skip the reward call when the sampler tracks ``log p_ref``; the SMC twists, Power-SMC, ETS
        rollouts and the MH family fold the term into the exponent of ``p_ref`` (it factorises
        over tokens).
        :class:`~tiltsample.target.LogProbReward` (behind ``power_target``) is the one shipped.
    ``extract: Callable[[Seq], Hashable | None]``
        The answer of a response (``None``: no valid answer). ETS's
        ``reward_mode="self-consistency"`` uses it when no ``answer=`` is given.
    ``require_repeat: bool`` (default ``False``)
        Self-consistency only: a pseudo-label seen once scores 0 (ETS reads it as
        ``sc_zero_if_unique``).

    A sample-dependent reward (majority vote) keeps its state in the sampler state, never in the
    reward object, so runs stay reproducible.
    """

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor: ...


@runtime_checkable
class PrefixPotential(Protocol):
    """An estimate of ``log psi(prefix) = log E_p[exp(log_tilt(x)) | prefix]`` (a twist).

    Used by beam search, SMC (lookahead twists) and ETS (the K-rollout estimator is one
    implementation). For a complete prefix the exact value is ``log_tilt(prefix)``. Random
    estimators draw from ``generator`` and report the cost they spent.
    """

    def log_potential(
        self, prompt: Seq, prefixes: Sequence[Seq], generator: torch.Generator
    ) -> tuple[Tensor, Cost]: ...


def check_reward_output(values: object, batch: int, what: str = "reward") -> Tensor:
    """Validate a reward's output: a float tensor of shape ``[batch]``, no NaN, no ``+inf``."""
    if not isinstance(values, Tensor):
        raise TypeError(f"{what} must return a torch.Tensor of shape [{batch}], got {type(values)}")
    if tuple(values.shape) != (batch,):
        raise ValueError(f"{what} returned shape {tuple(values.shape)}, expected ({batch},)")
    values = values.to(torch.float64)
    if bool(torch.isnan(values).any()):
        raise ValueError(f"{what} returned NaN for {int(torch.isnan(values).sum())} sequence(s)")
    if bool((values == torch.inf).any()):
        raise ValueError(f"{what} returned +inf; rewards must be finite or -inf (a constraint)")
    return values
