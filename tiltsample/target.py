r"""The shared target: a reference policy times a composable tilt.

.. math::

    \pi(x \mid y) \;\propto\; p_{\mathrm{ref}}(x \mid y)\,
        \exp\Big(\sum_k s_k\, r_k(y, x)\Big),

with the primary term ``s = 1/lam`` for a reward ``r``. The power distribution ``p_ref^alpha`` is
the special case ``r = (alpha - 1) log p_ref``, ``lam = 1`` (:func:`power_target`); hard
constraints are terms whose reward is ``0`` or ``-inf``. Every sampler accepts every target.

Length handling is a property of the target (``truncation``):

``"stop"`` (default)
    A response ends at EOS or when it reaches ``max_new_tokens`` tokens (EOS counts as a token).
    An unterminated response of exactly ``max_new_tokens`` tokens is a valid terminal state whose
    reference probability is its prefix probability. This is the law of ordinary capped generation.
``"condition"``
    Only EOS-terminated responses of at most ``max_new_tokens`` tokens (EOS included) are in the
    support: ``pi(x) ∝ p_ref(x) G(x) 1{x ends with EOS, |x| <= max_new_tokens}``. Samplers that
    decode force EOS at the last position and carry the factor ``p_ref(EOS | x_<L)`` in their
    weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.policy import ReferencePolicy
from tiltsample.reward import Reward, check_reward_output
from tiltsample.types import Cost, Seq

Truncation = Literal["stop", "condition"]
TRUNCATIONS: tuple[str, ...] = ("stop", "condition")


class LogProbReward:
    r"""``r(y, x) = scale · log p_ref(x | y)``: the reward behind :func:`power_target`.

    With ``scale = alpha - 1`` and ``lam = 1`` the tilted target is ``p_ref^alpha / Z_alpha``.
    Samplers that already track ``log p_ref`` pass it to :meth:`TiltedTarget.evaluate_tilt` and
    this reward costs nothing.
    """

    uses_reference_logprob = True

    def __init__(self, policy: ReferencePolicy, scale: float = 1.0) -> None:
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
        ):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        self.policy = policy
        self.scale = float(scale)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        return self.from_reference(self.policy.sequence_logprob(prompt, xs))

    def from_reference(self, log_reference: Tensor) -> Tensor:
        """The reward given already computed ``log p_ref(x)`` values.

        A response of reference probability zero is outside every tilted target's support: its
        reward is ``-inf`` whatever the sign of ``scale`` (never ``+inf`` or NaN).
        """
        log_reference = log_reference.to(torch.float64)
        return torch.where(torch.isneginf(log_reference), log_reference, self.scale * log_reference)

    def __repr__(self) -> str:
        return f"LogProbReward(scale={self.scale})"


@dataclass(frozen=True)
class TiltTerm:
    """One additive term ``scale · r(y, x)`` of a target's log-tilt."""

    reward: Reward
    scale: float
    name: str

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"tilt term {self.name!r}: scale must be finite and > 0 (1/lam)")


class TiltScores(NamedTuple):
    """What :meth:`TiltedTarget.evaluate_tilt` returns."""

    log_tilt: Tensor
    """``[B]`` float64: the summed log-tilt of every response."""
    reward: Tensor | None
    """``[B]`` float64: the primary reward ``r`` (None for an untilted target)."""
    cost: Cost
    """Reward calls spent (one per response per term that had to be evaluated)."""


@dataclass(frozen=True, eq=False)
class TiltedTarget:
    r"""``pi(x | y) ∝ p_ref(x | y) · exp(r(y, x)/lam + further terms)``.

    Parameters
    ----------
    policy
        The reference policy ``p_ref``: any :class:`~tiltsample.policy.ReferencePolicy`, or a
        :class:`~tiltsample.diffusion.MaskedDiffusionPolicy` (then ``max_new_tokens`` must equal
        its ``length``, and ``log_reference`` needs the policy's own ``sequence_logprob``).
    reward
        The primary reward ``r``; ``None`` gives the untilted reference target.
    lam
        The KL coefficient ``lam > 0`` of the primary reward (``lam → ∞`` recovers ``p_ref``).
    prompt
        The conditioning prompt ``y`` (token ids).
    max_new_tokens
        Length cap ``L`` of responses, EOS included.
    truncation
        ``"stop"`` or ``"condition"`` (see the module docstring).
    extra_terms
        Further tilt terms (use :meth:`tilt` rather than passing them by hand).
    """

    policy: ReferencePolicy
    reward: Reward | None = None
    lam: float = 1.0
    prompt: Seq = ()
    max_new_tokens: int = 16
    truncation: Truncation = "stop"
    extra_terms: tuple[TiltTerm, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        policy = self.policy
        if is_masked_diffusion(policy):
            if self.max_new_tokens != policy.length:  # type: ignore[attr-defined]
                raise ValueError(
                    f"max_new_tokens must equal the masked-diffusion policy's length "
                    f"{policy.length}, got {self.max_new_tokens}"  # type: ignore[attr-defined]
                )
        else:
            for attr in ("vocab_size", "eos_id", "next_logprobs", "sequence_logprob"):
                if not hasattr(policy, attr):
                    raise TypeError(
                        "policy must implement the ReferencePolicy protocol (or "
                        f"MaskedDiffusionPolicy); missing {attr!r}"
                    )
        vocab = policy.vocab_size
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 2:
            raise ValueError(f"policy.vocab_size must be an int >= 2, got {vocab!r}")
        validation.token_id("policy.eos_id", policy.eos_id, vocab)
        validation.positive_float("lam", self.lam, allow_inf=True)
        validation.positive_int("max_new_tokens", self.max_new_tokens)
        validation.one_of("truncation", self.truncation, TRUNCATIONS)
        max_len = getattr(policy, "max_len", None)
        if isinstance(max_len, int) and self.max_new_tokens > max_len:
            raise ValueError(
                f"max_new_tokens={self.max_new_tokens} exceeds the policy's max_len={max_len}"
            )
        prompt = tuple(self.prompt)
        for i, tok in enumerate(prompt):
            validation.token_id(f"prompt[{i}]", tok, vocab)
        object.__setattr__(self, "prompt", prompt)
        if self.reward is not None and not callable(self.reward):
            raise TypeError("reward must be callable as reward(prompt, xs) -> Tensor[B]")

    # ----------------------------------------------------------------- structure
    @property
    def vocab_size(self) -> int:
        return int(self.policy.vocab_size)

    @property
    def eos_id(self) -> int:
        return int(self.policy.eos_id)

    @property
    def terms(self) -> tuple[TiltTerm, ...]:
        """All tilt terms, the primary ``r/lam`` first (absent for an untilted target)."""
        primary: tuple[TiltTerm, ...] = ()
        if self.reward is not None and math.isfinite(self.lam):
            primary = (TiltTerm(self.reward, 1.0 / self.lam, "reward"),)
        return primary + self.extra_terms

    @property
    def is_tilted(self) -> bool:
        """False when ``pi = p_ref`` (no reward, or ``lam = inf``, and no extra terms)."""
        return bool(self.terms)

    def with_lam(self, lam: float) -> TiltedTarget:
        """The same target with a different ``lam`` for the primary reward."""
        return _replace(self, lam=lam)

    def with_prompt(self, prompt: Seq) -> TiltedTarget:
        """The same target conditioned on another prompt."""
        return _replace(self, prompt=tuple(prompt))

    def tilt(self, reward: Reward, lam: float = 1.0, name: str | None = None) -> TiltedTarget:
        """Compose: a new target with the extra factor ``exp(reward/lam)``.

        ``power_target(p, 4).tilt(verifier, lam=0.1)`` is "power distribution × verifier reward";
        a constraint is a reward returning ``0`` or ``-inf`` (any ``lam``).
        """
        lam = validation.positive_float("lam", lam)
        term = TiltTerm(reward, 1.0 / lam, name or f"term{len(self.extra_terms) + 1}")
        return _replace(self, extra_terms=(*self.extra_terms, term))

    # ----------------------------------------------------------------- support
    def is_complete(self, x: Seq) -> bool:
        """Whether ``x`` is a terminal state of this target's length convention."""
        if len(x) > 0 and x[-1] == self.eos_id:
            return True
        return self.truncation == "stop" and len(x) == self.max_new_tokens

    def check_sequences(self, xs: Sequence[Seq], name: str = "xs") -> list[Seq]:
        """Validate responses against the target's vocabulary, EOS and length convention."""
        out: list[Seq] = []
        eos, vocab = self.eos_id, self.vocab_size
        for i, x in enumerate(xs):
            x = tuple(int(t) for t in x)
            if any(not 0 <= t < vocab for t in x):
                raise ValueError(f"{name}[{i}] has token ids outside [0, vocab_size={vocab})")
            if eos in x[:-1]:
                raise ValueError(f"{name}[{i}] has tokens after EOS")
            if len(x) > self.max_new_tokens:
                raise ValueError(
                    f"{name}[{i}] has {len(x)} tokens > max_new_tokens={self.max_new_tokens}"
                )
            if not self.is_complete(x):
                raise ValueError(
                    f"{name}[{i}] is not a complete response under truncation="
                    f"{self.truncation!r} (must end with EOS"
                    + (" or reach max_new_tokens)" if self.truncation == "stop" else ")")
                )
            out.append(x)
        return out

    # ----------------------------------------------------------------- densities
    def log_reference(self, xs: Sequence[Seq]) -> Tensor:
        """``log p_ref(x | y)`` of complete responses, ``[B]`` float64."""
        xs = list(xs)
        if not xs:
            return torch.zeros(0, dtype=torch.float64)
        return self.policy.sequence_logprob(self.prompt, xs).to(torch.float64)

    def evaluate_tilt(self, xs: Sequence[Seq], log_reference: Tensor | None = None) -> TiltScores:
        """Log-tilt, primary reward and reward cost of complete responses.

        ``log_reference`` (if the caller already has ``log p_ref(x)``) is reused by reference-log-
        probability rewards such as the power tilt.
        """
        xs = list(xs)
        batch = len(xs)
        total = torch.zeros(batch, dtype=torch.float64)
        primary: Tensor | None = None
        calls = 0
        for term in self.terms:
            if getattr(term.reward, "uses_reference_logprob", False) and log_reference is not None:
                values = term.reward.from_reference(log_reference)  # type: ignore[attr-defined]
            else:
                values = term.reward(self.prompt, xs) if batch else torch.zeros(0)
                calls += batch
            values = check_reward_output(values, batch, what=f"tilt term {term.name!r}")
            if term.name == "reward" and primary is None:
                primary = values
            total = total + _scaled(values, term.scale)
        if self.reward is not None and primary is None:  # lam = inf: reward reported, not tilted
            values = self.reward(self.prompt, xs) if batch else torch.zeros(0)
            primary = check_reward_output(values, batch)
            calls += batch
        return TiltScores(total, primary, Cost(reward_calls=calls))

    def log_tilt(self, xs: Sequence[Seq]) -> Tensor:
        """Summed log-tilt ``sum_k s_k r_k(y, x)`` of complete responses, ``[B]`` float64."""
        return self.evaluate_tilt(xs).log_tilt

    def log_density(self, xs: Sequence[Seq]) -> Tensor:
        """Unnormalised ``log pi(x) = log p_ref(x) + log_tilt(x)``, ``[B]`` float64."""
        log_ref = self.log_reference(xs)
        return log_ref + self.evaluate_tilt(xs, log_reference=log_ref).log_tilt

    def describe(self) -> str:
        """A one-line human description."""
        parts = [f"p_ref(V={self.vocab_size})"]
        parts += [f"exp({t.scale:.4g}·{t.name})" for t in self.terms]
        return " · ".join(parts) + f", L={self.max_new_tokens}, truncation={self.truncation}"


def _scaled(values: Tensor, scale: float) -> Tensor:
    """``scale · values`` keeping ``-inf`` (constraints) as ``-inf``; never produces NaN."""
    return torch.where(torch.isneginf(values), values, values * scale)


def _replace(target: TiltedTarget, **changes: Any) -> TiltedTarget:
    """A validated copy of ``target`` with some fields changed (``meta`` copied)."""
    changes.setdefault("meta", dict(target.meta))
    return dataclasses.replace(target, **changes)


def power_target(
    policy: ReferencePolicy,
    alpha: float,
    prompt: Seq = (),
    max_new_tokens: int = 16,
    truncation: Truncation = "stop",
) -> TiltedTarget:
    r"""The power distribution ``pi_alpha(x) ∝ p_ref(x)^alpha`` as a tilted target.

    ``r = (alpha - 1) log p_ref``, ``lam = 1``. Not the same as low-temperature sampling at
    ``1/alpha`` (see ``docs/concepts.md`` and ``specs/mcmc.md`` §1).
    """
    alpha = validation.positive_float("alpha", alpha)
    meta = {"kind": "power", "alpha": alpha}
    if alpha == 1.0:
        return TiltedTarget(policy, None, 1.0, prompt, max_new_tokens, truncation, meta=meta)
    return TiltedTarget(
        policy,
        _PowerReward(policy, alpha - 1.0),
        1.0,
        prompt,
        max_new_tokens,
        truncation,
        meta=meta,
    )


class _PowerReward(LogProbReward):
    """``(alpha - 1) log p_ref``; allows a negative scale (alpha < 1 flattens)."""

    def __repr__(self) -> str:
        return f"PowerReward(alpha={self.scale + 1.0})"


def reference_target(
    policy: ReferencePolicy,
    prompt: Seq = (),
    max_new_tokens: int = 16,
    truncation: Truncation = "stop",
) -> TiltedTarget:
    """The untilted target ``pi = p_ref`` (with the given length convention)."""
    return TiltedTarget(policy, None, 1.0, prompt, max_new_tokens, truncation)
