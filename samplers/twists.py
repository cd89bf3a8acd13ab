r"""Twist families for the SMC samplers (``specs/smc.md`` §2–§3, §11).

SMC for ``pi(x) ∝ p(x) G(x)`` moves through intermediate targets
``gamma_t(x_{1:t}) = p(x_{1:t}) · psi_t(x_{1:t})`` whose *twists* satisfy ``psi_0 = 1`` and
``psi = G`` on complete responses. The SMC samplers always replace the twist of a complete response
by the true tilt ``G`` (``specs/smc.md`` §6 rule 6), so a twist is only ever asked about
**incomplete** prefixes, and it can be anything positive: its quality changes the variance, never
the final target.

A :class:`Twist` answers two questions about a batch of incomplete prefixes ``s``:

``log_twist``
    ``log psi(s)`` (``[B]``).
``log_twist_children``
    ``log psi(s + v)`` for every token ``v`` at once (``[B, V]``), the vocabulary-wide twist vector
    needed by the twist-induced (locally optimal) proposal ``q(v | s) ∝ p(v | s) psi(s + v)``
    (``specs/smc.md`` §11). The default expands the children with ``p(v | s) > 0`` and calls
    ``log_twist`` on them; analytic twists override it. Entries of children that are complete
    (EOS, or the length cap) are ignored by the caller, which uses ``G`` there.

Both may be random (a particle stores the value it drew and reuses it in the next weight, so the
twists telescope and the final target stays exact, ``specs/smc.md`` §3) and report their
:class:`~tiltsample.types.Cost`.

Families
--------
:class:`NoTwist` (``twist="none"``)
    ``psi = 1`` until completion: importance sampling with a final reweighting.
:class:`PrefixTilt` (``twist="prefix"``)
    The tilt factors already determined by the prefix: every tilt term that is a multiple of
    ``log p_ref`` (the power tilt ``(alpha - 1) log p``, additive over tokens) contributes
    ``scale · log p_ref(s)``, plus an optional user :class:`~tiltsample.reward.PrefixPotential` of
    the reward seen so far. For a reward defined on complete responses only this is ``psi = 1``.
:class:`LookaheadTwist` (``twist="lookahead"``)
    Any :class:`~tiltsample.reward.PrefixPotential` estimate of ``log E_p[G | s]``: the exact one
    (``tiltsample.theory.ExactPotential``), ETS's K-rollout estimator, or a learned twist.
:class:`LogNormalNoise`
    Wraps a potential into a noisy but **unbiased** estimator
    ``V̂ = V · exp(sigma ε − sigma²/2)``, ``ε ~ N(0, 1)``: the test bed for random twists.
:class:`LinearTwist`, :func:`tri_tsmc` (learned twists)
    A parametric family ``log psi_theta(s) = theta · phi(s)`` and the TRI-TSMC iteration
    (tempered importance reweighting of the current twisted path measure, then a weighted
    maximum-likelihood projection onto the family).

References
----------
Zhao, Brekelmans, Makhzani & Grosse, *Probabilistic Inference in Language Models via Twisted SMC*,
arXiv 2404.17546 (2024). Lew et al., arXiv 2306.03081 (2023). Wang, Yang, Deng & Xu (TRI-TSMC),
arXiv 2605.25123.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple, Self

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import rows_to_seqs
from tiltsample.policy import DecodeSession, open_session
from tiltsample.reward import PrefixPotential
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "LinearFamily",
    "LinearTwist",
    "LogNormalNoise",
    "LookaheadTwist",
    "NoTwist",
    "OneHotTable",
    "PrefixTable",
    "PrefixTilt",
    "RolloutTwist",
    "Twist",
    "apply_floor",
    "check_twist_output",
    "make_twist",
    "negative_phase_samples",
    "power_log_tilt",
    "tri_tsmc",
]

TWIST_NAMES = ("none", "prefix", "lookahead")
NEGATIVE_PHASES = ("exact", "smc")


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


def _scaled(values: Tensor, scale: float) -> Tensor:
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
            total = total + _scaled(values, term.scale)
    return total


def power_exponent(target: TiltedTarget) -> float:
    """``alpha - 1``: the summed coefficient of ``log p_ref`` in the target's log-tilt."""
    total = 0.0
    for term in target.terms:
        if getattr(term.reward, "uses_reference_logprob", False):
            total += term.scale * float(getattr(term.reward, "scale", 1.0))
    return total


def _check_floor(floor: float | None) -> float | None:
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
    ``tests/test_twists.py``). Any positive value restores exactness; the floor is relative to the
    prefix twist (the power part of the tilt, ``1`` for other tilts) so it has the tilt's scale.
    """
    if floor is None:
        return values
    base = power_log_tilt(target, log_reference) + math.log(floor)
    return torch.where(torch.isneginf(values), base, values)


class Twist(ABC):
    """Base class of SMC twists (see the module docstring).

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


class NoTwist(Twist):
    """``psi = 1`` on incomplete prefixes: plain importance weights, reweighted at completion."""

    name = "none"

    def log_twist(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        return torch.zeros(len(prefixes), dtype=torch.float64), Cost()

    def log_twist_children(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        next_logprobs: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        out = torch.where(
            next_logprobs > -math.inf,
            torch.zeros((), dtype=torch.float64),
            torch.full((), -math.inf, dtype=torch.float64),
        ).to(torch.float64)
        return out, Cost()


class PrefixTilt(Twist):
    r"""Prefix-only twist: the tilt factors the prefix already determines.

    .. math::

        \log\psi_t(x_{1:t}) = \sum_{k:\ r_k = c_k \log p_{ref}} s_k c_k \log p_{ref}(x_{1:t})
            \;+\; \log \phi(x_{1:t}),

    where the first sum runs over the tilt terms that are multiples of ``log p_ref`` (the power
    tilt, additive over tokens, so its prefix value is exact) and ``phi`` is an optional user
    :class:`~tiltsample.reward.PrefixPotential` for the reward seen so far (for instance a
    constraint that can already be checked on a prefix, or a process reward). With neither, this is
    :class:`NoTwist`. Myopic: it favours what scored well so far, not expected final reward.

    Parameters
    ----------
    potential
        Optional prefix potential added to the factorised part.
    """

    name = "prefix"

    def __init__(self, potential: PrefixPotential | None = None) -> None:
        if potential is not None and not callable(getattr(potential, "log_potential", None)):
            raise TypeError("potential must implement PrefixPotential.log_potential")
        self.potential = potential
        self.random = potential is not None

    def log_twist(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        out = power_log_tilt(target, log_reference)
        cost = Cost()
        if self.potential is not None and len(prefixes):
            values, cost = self.potential.log_potential(target.prompt, prefixes, generator)
            values = check_twist_output(values, len(prefixes), "prefix potential")
            out = torch.where(torch.isneginf(values), values, out + values)
        return out, cost

    def log_twist_children(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        next_logprobs: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        if self.potential is not None:
            return super().log_twist_children(
                target, prefixes, log_reference, next_logprobs, generator
            )
        child_ref = log_reference.to(torch.float64)[:, None] + next_logprobs.to(torch.float64)
        out = power_log_tilt(target, child_ref)
        out = torch.where(next_logprobs > -math.inf, out, torch.full_like(out, -math.inf))
        return out, Cost()

    def __repr__(self) -> str:
        return f"PrefixTilt(potential={self.potential!r})"


class LookaheadTwist(Twist):
    r"""Lookahead twist: ``log psi(s) = `` a :class:`~tiltsample.reward.PrefixPotential` estimate of
    ``log E_p[G(x) | s]``.

    With the exact potential the intermediate targets are the exact marginals of ``pi``; with the
    exact potential **and** the locally optimal proposal every incremental weight is deterministic
    and ``Ẑ = Z`` in every run (``specs/smc.md`` §2). A random, positive estimate (e.g. K rollouts)
    is drawn once per particle and prefix and reused in the next weight, so the final target stays
    exact whatever its quality (§3).

    Parameters
    ----------
    potential
        The estimator (``log_potential(prompt, prefixes, generator) -> (Tensor[B], Cost)``).
    random
        Whether the potential is random (informational; default: True unless the potential has a
        ``random`` attribute saying otherwise).
    floor
        Replace zero estimates by ``floor · psi_prefix`` (:func:`apply_floor`). Needed for a random
        potential that can return 0 where the energy is positive; None (default) keeps zeros,
        which is right for the exact potential (zero exactly where the energy is zero).
    """

    name = "lookahead"

    def __init__(
        self, potential: PrefixPotential, random: bool | None = None, floor: float | None = None
    ) -> None:
        if not callable(getattr(potential, "log_potential", None)):
            raise TypeError(
                "potential must implement PrefixPotential.log_potential(prompt, prefixes, "
                f"generator), got {type(potential).__name__}"
            )
        self.potential = potential
        self.random = bool(getattr(potential, "random", True)) if random is None else random
        self.floor = _check_floor(floor)

    def log_twist(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        if not len(prefixes):
            return torch.zeros(0, dtype=torch.float64), Cost()
        values, cost = self.potential.log_potential(target.prompt, prefixes, generator)
        values = check_twist_output(values, len(prefixes), "lookahead potential")
        return apply_floor(values, self.floor, target, log_reference), cost

    def __repr__(self) -> str:
        return f"LookaheadTwist({self.potential!r}, floor={self.floor})"


class RolloutTwist(Twist):
    r"""Lookahead twist estimated by ``K`` rollouts from the SMC's own session (ETS's estimator).

    .. math::

        \hat\psi(s) = \frac1K \sum_{k=1}^K \frac{p_{ref}(z_k \mid s)}{q(z_k \mid s)}
            e^{\mathrm{log\_tilt}(s \oplus z_k)}, \quad z_k \sim q = p_{ref}^{1/\tau},

    unbiased for ``E_p[G | s]``. The rollouts continue a fork of the particles' session expanded by
    ``select`` (:func:`tiltsample.samplers.ets.rollout.rollouts_from_sessions`), so a particle's
    prefix is never re-encoded. A random twist: each particle keeps the estimate it drew
    (``specs/smc.md`` §3).

    Parameters
    ----------
    num_rollouts
        ``K >= 1``.
    temperature
        Rollout temperature ``tau`` (the ratio uses the tempered law, so the estimate stays
        unbiased).
    floor
        A zero estimate (every rollout has ``G = 0``: hard constraints, ``truncation="condition"``)
        becomes ``floor · psi_prefix`` (:func:`apply_floor`), keeping the twist positive and SMC
        exact; the default ``1`` falls back to the prefix twist. None keeps zeros (biased under
        constraints). A floor far below the typical energy is unbiased in theory but makes the
        weights heavy-tailed (a floored particle that survives resampling later gains a factor
        ``1/floor``): measured ``E[Ẑ]/Z = 0.945 ± 0.011`` at ``floor = 1e-8`` against
        ``0.989 ± 0.012`` at ``1`` (``docs/samplers/smc.md``).

    Cost
        ``K`` rollouts per incomplete prefix (generated tokens), one reward call per rollout and
        tilt term.
    """

    name = "rollout"
    random = True
    session_aware = True

    def __init__(
        self, num_rollouts: int, temperature: float = 1.0, floor: float | None = 1.0
    ) -> None:
        self.num_rollouts = validation.positive_int("num_rollouts", num_rollouts)
        self.temperature = validation.positive_float("rollout_temperature", temperature)
        self.floor = _check_floor(floor)

    def log_twist_session(
        self,
        target: TiltedTarget,
        session: DecodeSession,
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        from tiltsample.samplers.ets.rollout import log_mean_energy, rollouts_from_sessions

        if session.batch_size == 0:
            return torch.zeros(0, dtype=torch.float64), Cost()
        k = self.num_rollouts
        batch = rollouts_from_sessions(
            target, session, None, k, generator, temperature=self.temperature
        )
        full_ref = log_reference.to(torch.float64).repeat_interleave(k) + batch.log_reference
        scores = target.evaluate_tilt(batch.sequences, log_reference=full_ref)
        values = log_mean_energy(batch.log_ratio, scores.log_tilt, k)
        values = apply_floor(values, self.floor, target, log_reference)
        return values, batch.cost + scores.cost

    def log_twist(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        """Seq-based fallback: encodes each group of equal-length prefixes once."""
        out = torch.zeros(len(prefixes), dtype=torch.float64)
        cost = Cost()
        by_length: dict[int, list[int]] = {}
        for i, x in enumerate(prefixes):
            by_length.setdefault(len(x), []).append(i)
        for length, idx in sorted(by_length.items()):
            session = open_session(target.policy, target.prompt, len(idx))
            if length:
                rows = torch.tensor([list(prefixes[i]) for i in idx], dtype=torch.long)
                session.extend(rows)
            values, c = self.log_twist_session(
                target, session, log_reference.to(torch.float64)[idx], generator
            )
            out[idx] = values
            cost = cost + c + session.cost
        return out, cost

    def __repr__(self) -> str:
        return (
            f"RolloutTwist(K={self.num_rollouts}, temperature={self.temperature}, "
            f"floor={self.floor})"
        )


class LogNormalNoise:
    r"""A noisy but unbiased :class:`~tiltsample.reward.PrefixPotential` around another one.

    .. math::

        \hat V(s) = V(s)\, e^{\sigma \varepsilon - \sigma^2/2}, \quad
        \varepsilon \sim \mathcal N(0, 1) \ \text{(the caller's generator)},

    so ``E[V̂(s)] = V(s)``. Used to test that random twists keep SMC exact (``specs/smc.md`` §3) and
    to measure how twist noise costs variance.

    Parameters
    ----------
    potential
        The exact (or any) potential ``V``.
    sigma
        Log-scale noise ``>= 0``.
    """

    random = True

    def __init__(self, potential: PrefixPotential, sigma: float) -> None:
        if not callable(getattr(potential, "log_potential", None)):
            raise TypeError("potential must implement PrefixPotential.log_potential")
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma >= 0:
            raise ValueError(f"sigma must be a number >= 0, got {sigma!r}")
        if not math.isfinite(sigma):
            raise ValueError(f"sigma must be finite, got {sigma!r}")
        self.potential = potential
        self.sigma = float(sigma)

    def log_potential(
        self, prompt: Seq, prefixes: Sequence[Seq], generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        base, cost = self.potential.log_potential(prompt, prefixes, generator)
        base = base.to(torch.float64)
        eps = torch.randn(len(prefixes), generator=generator, dtype=torch.float64)
        noise = self.sigma * eps - 0.5 * self.sigma**2
        return torch.where(torch.isneginf(base), base, base + noise), cost

    def __repr__(self) -> str:
        return f"LogNormalNoise({self.potential!r}, sigma={self.sigma})"


def make_twist(
    twist: str | Twist,
    potential: PrefixPotential | None = None,
    num_rollouts: int | None = None,
    rollout_temperature: float = 1.0,
) -> Twist:
    """Resolve the ``twist=`` / ``potential=`` / ``num_rollouts=`` parameters of the SMC samplers.

    ``"none"`` → :class:`NoTwist`; ``"prefix"`` → :class:`PrefixTilt` (``potential`` optional);
    ``"lookahead"`` → :class:`LookaheadTwist` (``potential``) or :class:`RolloutTwist`
    (``num_rollouts``): exactly one of the two; a :class:`Twist` instance is returned as is.
    """
    if num_rollouts is not None and (twist != "lookahead" or potential is not None):
        raise ValueError("num_rollouts= goes with twist='lookahead' and no potential=")
    if isinstance(twist, Twist):
        if potential is not None:
            raise ValueError("pass potential= only with twist='prefix' or 'lookahead'")
        return twist
    if not isinstance(twist, str):
        raise TypeError(
            f"twist must be one of {list(TWIST_NAMES)} or a Twist instance, "
            f"got {type(twist).__name__}"
        )
    validation.one_of("twist", twist, TWIST_NAMES)
    if twist == "none":
        if potential is not None:
            raise ValueError("twist='none' takes no potential; use twist='prefix' or 'lookahead'")
        return NoTwist()
    if twist == "prefix":
        return PrefixTilt(potential)
    if num_rollouts is not None:
        return RolloutTwist(num_rollouts, rollout_temperature)
    if potential is None:
        raise ValueError(
            "twist='lookahead' needs potential= (a PrefixPotential, e.g. "
            "tiltsample.theory.ExactPotential(target)) or num_rollouts= (K-rollout estimates)"
        )
    return LookaheadTwist(potential)


# --------------------------------------------------------------------------- learned twists
FeatureMap = Callable[[Sequence[Seq], Tensor], Tensor]
"""``features(prefixes, log_reference) -> Tensor[B, F]`` (float64)."""


class OneHotTable:
    """One-hot features over a fixed list of token tuples: the saturated (tabular) family.

    Row ``b`` of the features is the indicator of ``keys.index(row_b)`` (the zero vector for a
    tuple outside the list). Shared by :class:`PrefixTable` and
    :class:`~tiltsample.samplers.diffusion_twists.StateTable`.

    Parameters
    ----------
    keys
        The distinct tuples that get a parameter, in feature order.
    """

    unit: ClassVar[str] = "keys"
    """What the keys are (named in the repr)."""

    def __init__(self, keys: list[Seq]) -> None:
        self.keys = keys
        self.index = {s: i for i, s in enumerate(keys)}

    @property
    def num_features(self) -> int:
        return len(self.keys)

    def one_hot(self, rows: Sequence[Sequence[int]]) -> Tensor:
        """``[len(rows), F]`` float64 indicators of the rows' positions in the list."""
        out = torch.zeros((len(rows), self.num_features), dtype=torch.float64)
        for b, row in enumerate(rows):
            i = self.index.get(tuple(row))
            if i is not None:
                out[b, i] = 1.0
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features} {self.unit})"


class PrefixTable(OneHotTable):
    """One-hot features over a fixed list of prefixes: the saturated (tabular) twist family.

    ``log psi_theta(s) = theta[index(s)]``; a prefix outside the list has the zero feature vector
    (``psi = 1``). With this family the twisted marginals can match any target marginals, so the
    optimal twist is representable exactly.

    Parameters
    ----------
    prefixes
        The prefixes that get a parameter (e.g. :meth:`from_target`: every incomplete prefix that
        ``p_ref`` reaches on an enumerable toy).
    """

    unit = "prefixes"

    def __init__(self, prefixes: Sequence[Seq]) -> None:
        keys = sorted({tuple(int(t) for t in s) for s in prefixes}, key=lambda s: (len(s), s))
        super().__init__(keys)
        self.prefixes: list[Seq] = keys

    @classmethod
    def from_target(cls, target: TiltedTarget) -> PrefixTable:
        """Every non-empty incomplete prefix of every complete response with ``p_ref > 0``."""
        from tiltsample.enumeration import enumerate_target

        support = enumerate_target(target).support
        prefixes = {x[:t] for x in support for t in range(1, len(x))}
        return cls([s for s in prefixes if not target.is_complete(s)])

    def __call__(self, prefixes: Sequence[Seq], log_reference: Tensor) -> Tensor:
        return self.one_hot(prefixes)


class LinearFamily:
    r"""Parameter handling shared by the linear twist families ``log psi_theta = theta · phi``.

    :class:`LinearTwist` (prefixes) and
    :class:`~tiltsample.samplers.diffusion_twists.LinearStateTwist` (masked-diffusion states)
    differ only in what ``phi`` is evaluated on; this base checks the features and ``theta`` and
    evaluates ``theta · phi`` against the feature map's output shape.

    Parameters
    ----------
    features
        ``phi``: a callable returning ``[B, F]`` features (with a ``num_features`` attribute if
        ``theta`` is omitted).
    theta
        ``[F]`` finite parameters (default: zeros, i.e. ``psi = 1``).
    """

    features_call: ClassVar[str] = "features(...)"
    """How ``features`` is called (named in the error for a non-callable one)."""

    def __init__(self, features: Callable[..., Tensor], theta: Tensor | None = None) -> None:
        if not callable(features):
            raise TypeError(f"features must be callable as {self.features_call}")
        self.features = features
        if theta is None:
            size = getattr(features, "num_features", None)
            if not isinstance(size, int):
                raise ValueError("theta is required when features has no num_features attribute")
            theta = torch.zeros(size, dtype=torch.float64)
        theta = torch.as_tensor(theta, dtype=torch.float64)
        if theta.dim() != 1 or not bool(torch.isfinite(theta).all()):
            raise ValueError("theta must be a finite 1-D tensor")
        self.theta = theta

    def with_theta(self, theta: Tensor) -> Self:
        """The same family at other parameters."""
        return type(self)(self.features, theta.detach().clone())

    def _linear(self, phi: Tensor, batch: int) -> Tensor:
        """``phi @ theta`` for ``batch`` feature rows ``phi`` (checked against ``[batch, F]``)."""
        phi = phi.to(torch.float64)
        if phi.shape != (batch, self.theta.numel()):
            raise ValueError(
                f"features returned shape {tuple(phi.shape)}, expected "
                f"({batch}, {self.theta.numel()})"
            )
        return phi @ self.theta

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.features!r}, |theta|={self.theta.numel()})"


class LinearTwist(LinearFamily, Twist):
    r"""A parametric twist family ``log psi_theta(s) = theta · phi(s)`` (incomplete ``s``).

    Deterministic and free (no model or reward call). Learned by :func:`tri_tsmc`; any
    ``theta`` keeps SMC exact (the final twist is always ``G``), only the variance changes.

    Parameters
    ----------
    features
        ``phi``: a :data:`FeatureMap` (e.g. :class:`PrefixTable`).
    theta
        ``[F]`` parameters (default: zeros, i.e. ``psi = 1``).
    """

    name = "linear"
    features_call = "features(prefixes, log_reference)"
    features: FeatureMap

    def log_twist(
        self,
        target: TiltedTarget,
        prefixes: Sequence[Seq],
        log_reference: Tensor,
        generator: torch.Generator,
    ) -> tuple[Tensor, Cost]:
        if not len(prefixes):
            return torch.zeros(0, dtype=torch.float64), Cost()
        return self._linear(self.features(prefixes, log_reference), len(prefixes)), Cost()


class TRIStep(NamedTuple):
    """One TRI-TSMC iteration (diagnostics of the path measure it reweighted)."""

    iteration: int
    ess_fraction: float
    """Kong ESS / M of the untempered importance weights ``pi/Q_theta`` of the sampled paths."""
    log_z_hat: float
    """Importance-sampling estimate of ``log Z`` from the sampled paths."""
    objective: float
    """Weighted negative log-likelihood after the projection."""


class TRIResult(NamedTuple):
    """What :func:`tri_tsmc` returns."""

    twist: LinearTwist
    history: list[TRIStep]
    cost: Cost


def _state_tables(
    target: TiltedTarget, features: FeatureMap
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per length ``t``: (features of incomplete states, their log p, log p G of complete states).

    The exact normaliser ``Z_t(theta)`` of the twisted marginal at ``t`` sums ``p(s) psi(s)`` over
    incomplete prefixes of length ``t`` and ``p(x) G(x)`` over complete responses of length
    ``<= t`` (enumerable toys only).
    """
    from tiltsample.enumeration import enumerate_target

    enum = enumerate_target(target)
    support = enum.support
    per = target.policy.sequence_logprob(target.prompt, support, per_token=True).to(torch.float64)
    cum = torch.cumsum(per, dim=1)
    log_p: dict[Seq, float] = {}
    for i, x in enumerate(support):
        for t in range(1, len(x)):
            log_p.setdefault(x[:t], float(cum[i, t - 1]))
    complete_lengths = torch.tensor([len(x) for x in support], dtype=torch.long)
    complete_logd = enum.log_density
    out = []
    for t in range(1, target.max_new_tokens + 1):
        inc = [s for s in log_p if len(s) == t and not target.is_complete(s)]
        lp = torch.tensor([log_p[s] for s in inc], dtype=torch.float64)
        phi = (
            features(inc, lp).to(torch.float64) if inc else torch.zeros((0, 0), dtype=torch.float64)
        )
        comp = complete_logd[complete_lengths <= t]
        out.append((phi, lp, comp))
    return out


def _path_states(
    target: TiltedTarget, paths: Sequence[Seq], features: FeatureMap
) -> list[tuple[Tensor, Tensor]]:
    """Per length ``t``: (rows of the paths still incomplete at ``t``, their features).

    The features get the prefixes' true ``log p_ref`` (one teacher-forced call for all paths).
    """
    out = []
    cum = torch.zeros((len(paths), 0), dtype=torch.float64)
    if paths:
        per = target.policy.sequence_logprob(target.prompt, list(paths), per_token=True)
        cum = torch.cumsum(per.to(torch.float64), dim=1)
    for t in range(1, target.max_new_tokens + 1):
        rows = [
            i
            for i, x in enumerate(paths)
            if len(x) > t or (len(x) == t and not target.is_complete(x))
        ]
        prefixes = [paths[i][:t] for i in rows]
        lp = cum[rows, t - 1] if rows else torch.zeros(0, dtype=torch.float64)
        phi = (
            features(prefixes, lp).to(torch.float64)
            if rows
            else torch.zeros((0, 0), dtype=torch.float64)
        )
        out.append((torch.tensor(rows, dtype=torch.long), phi))
    return out


def _objective(
    theta: Tensor,
    states: list[tuple[Tensor, Tensor]],
    tables: list[tuple[Tensor, Tensor, Tensor]],
    weights: Tensor,
    l2: float,
) -> Tensor:
    """Weighted negative log-likelihood of the twisted marginals (plus the ridge penalty)."""
    total = l2 * (theta * theta).sum()
    for (rows, phi_paths), (phi_all, lp_all, comp) in zip(states, tables, strict=True):
        if phi_all.shape[0] == 0:
            continue  # no incomplete state at this length: Z_t does not depend on theta
        log_z_t = torch.logsumexp(torch.cat([lp_all + phi_all @ theta, comp]), 0)
        if rows.numel():
            total = total - (weights[rows] * (phi_paths @ theta)).sum()
        total = total + log_z_t  # the weights sum to one
    return total


NegativeSamples = list[tuple[Tensor, Tensor]]
"""Per length ``t``: (``[n]`` normalised log-weights of SMC particles targeting the twisted
marginal ``sigma_t^{theta_k}``, ``[n, F]`` their features, zero rows for complete particles)."""


def negative_phase_samples(
    target: TiltedTarget,
    twist: LinearTwist,
    num_particles: int,
    generator: torch.Generator,
    ess_threshold: float = 0.5,
) -> tuple[NegativeSamples, Cost]:
    r"""Weighted particles of every twisted marginal ``sigma_t^theta`` from one SMC run.

    SMC with the twist ``psi_theta``, the ``p_ref`` proposal, one token per step and adaptive
    resampling has the intermediate target ``gamma_t = p(s) psi_theta(s)`` (incomplete ``s`` of
    length ``t``) / ``p(x) G(x)`` (complete ``|x| <= t``), i.e. ``sigma_t^theta`` up to its
    normaliser: after step ``t`` its weighted particles (equally weighted right after a
    resampling) estimate ``E_{sigma_t}[f]`` consistently, with ``O(1/N)`` bias. No enumeration:
    the cost is one SMC run, whatever the size of the state space.
    """
    from tiltsample.samplers import smc

    state = smc.init(target, generator=generator, num_particles=num_particles)
    step = smc.build_kernel(twist=twist, ess_threshold=ess_threshold)
    out: NegativeSamples = []
    width = twist.theta.numel()
    while not smc.done(state):
        state, _ = step(generator, state)
        log_w = state.log_w - torch.logsumexp(state.log_w, 0)
        live = (~state.finished).nonzero().flatten()
        phi = torch.zeros((num_particles, width), dtype=torch.float64)
        if live.numel():
            tokens = state.session.tokens()[live]
            prefixes = [tuple(int(v) for v in row) for row in tokens.tolist()]
            phi[live] = twist.features(prefixes, state.log_p[live]).to(torch.float64)
        out.append((log_w, phi))
    while len(out) < target.max_new_tokens:  # every particle finished early: constant terms
        out.append((out[-1][0], torch.zeros((num_particles, width), dtype=torch.float64)))
    return out, state.cost


def _objective_sampled(
    theta: Tensor,
    theta_k: Tensor,
    states: list[tuple[Tensor, Tensor]],
    negatives: NegativeSamples,
    weights: Tensor,
    l2: float,
    prox: float,
) -> Tensor:
    """:func:`_objective` with ``log Z_t(theta) - log Z_t(theta_k)`` replaced by its
    self-normalised importance estimate ``log sum_i W_i^t exp((theta - theta_k) · phi_i^t)``
    over particles of ``sigma_t^{theta_k}`` (its gradient is the sampled negative phase), plus
    the proximal term ``prox |theta - theta_k|^2`` that keeps the step where the importance
    estimate holds (it vanishes at a fixed point)."""
    delta = theta - theta_k
    total = l2 * (theta * theta).sum() + prox * (delta * delta).sum()
    for (rows, phi_paths), (log_w, phi_neg) in zip(states, negatives, strict=True):
        if rows.numel():
            total = total - (weights[rows] * (phi_paths @ theta)).sum()
        total = total + torch.logsumexp(log_w + phi_neg @ delta, 0)
    return total


def _project(
    theta0: Tensor,
    states: list[tuple[Tensor, Tensor]],
    tables: list[tuple[Tensor, Tensor, Tensor]] | None,
    weights: Tensor,
    l2: float,
    max_iter: int,
    negatives: NegativeSamples | None = None,
    prox: float = 0.05,
) -> tuple[Tensor, float]:
    """``argmin_theta`` of :func:`_objective` by L-BFGS (strong Wolfe line search, float64).

    With ``negatives`` (and ``tables=None``) the normalisers are the sampled surrogate of
    :func:`_objective_sampled` around ``theta0``.
    """
    theta_k = theta0.detach().clone()

    def objective(th: Tensor) -> Tensor:
        if negatives is not None:
            return _objective_sampled(th, theta_k, states, negatives, weights, l2, prox)
        assert tables is not None
        return _objective(th, states, tables, weights, l2)

    theta = theta0.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [theta],
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        value = float(objective(theta))
    return theta.detach().clone(), value


class TRIParameters(NamedTuple):
    """The checked numeric parameters of a TRI-TSMC iteration (:func:`tri_parameters`)."""

    iterations: int
    num_paths: int
    beta: float
    l2: float
    max_iter: int
    num_negative: int
    prox: float


def tri_parameters(
    generator: torch.Generator,
    num_iterations: int,
    num_paths: int,
    step_size: float,
    l2: float,
    max_iter: int,
    num_negative: int | None,
    prox: float,
) -> TRIParameters:
    """Check the parameters shared by :func:`tri_tsmc` and
    :func:`~tiltsample.samplers.diffusion_twists.learn_state_twist` (errors name the parameter);
    ``num_negative`` defaults to ``num_paths``."""
    validation.generator("generator", generator)
    iterations = validation.positive_int("num_iterations", num_iterations)
    m = validation.positive_int("num_paths", num_paths)
    beta = validation.unit_interval("step_size", step_size)
    if beta == 0.0:
        raise ValueError("step_size must lie in (0, 1], got 0")
    if isinstance(l2, bool) or not isinstance(l2, int | float) or not l2 >= 0:
        raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
    max_iter = validation.positive_int("max_iter", max_iter)
    m_neg = m if num_negative is None else validation.positive_int("num_negative", num_negative)
    prox = validation.positive_float("prox", prox)
    return TRIParameters(iterations, m, beta, float(l2), max_iter, m_neg, prox)


def tempered_path_weights(log_w: Tensor, beta: float) -> Tensor:
    """``W ∝ w^beta``, normalised (the trust-region step of TRI-TSMC); zero-weight paths keep 0.

    Raises ``ValueError`` when every path has zero weight.
    """
    finite = torch.isfinite(log_w)
    if not bool(finite.any()):
        raise ValueError("every sampled path has zero weight: no projection possible")
    tempered = torch.where(finite, beta * log_w, torch.full_like(log_w, -math.inf))
    return torch.exp(tempered - torch.logsumexp(tempered, 0))


def ess_fraction(log_w: Tensor) -> float:
    """Kong's ``ESS / M = (sum w)^2 / (M sum w^2)`` of unnormalised log-weights ``[M]``."""
    ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))
    return ess / log_w.numel()


def tri_tsmc(
    target: TiltedTarget,
    twist: LinearTwist,
    *,
    generator: torch.Generator,
    num_iterations: int = 5,
    num_paths: int = 512,
    step_size: float = 0.5,
    l2: float = 1e-3,
    max_iter: int = 200,
    negative: str = "exact",
    num_negative: int | None = None,
    prox: float = 0.05,
) -> TRIResult:
    r"""Learn a twist by the trust-region iteration of TRI-TSMC (arXiv 2605.25123).

    Each iteration, with the current twist ``psi_k = psi_{theta_k}``:

    1. **Sample the current twisted path measure.** ``M = num_paths`` complete paths from the
       twist-induced proposal ``Q_k(x) = prod_t p(x_t | x_<t) psi_k(x_{1:t}) / sum_v p(v | x_<t)
       psi_k(x_<t v)`` (SMC with ``proposal="optimal"`` and no resampling), with importance
       weights ``w = p G / Q_k``.
    2. **Tempered importance reweighting** (the closed form of the KL trust-region step
       ``min_Q KL(Q ‖ pi) + (1/beta - 1) KL(Q ‖ Q_k)``): ``Q_{k+1} ∝ Q_k^{1-beta} pi^beta``, i.e.
       the paths reweighted by ``W ∝ w^beta`` with ``beta = step_size``. The iterates follow the
       geometric (escort) path from ``Q_0`` to ``pi``.
    3. **Projection by weighted maximum likelihood** onto the family: ``theta_{k+1}`` maximises
       ``sum_i W_i sum_t log sigma_t^theta(x_i at t) - l2 |theta|^2``, where
       ``sigma_t^theta(s) ∝ p(s) psi_theta(s)`` (incomplete ``s`` of length ``t``) and
       ``∝ p(x) G(x)`` (complete ``x``, ``|x| <= t``) are the twisted intermediate marginals.
       Its maximiser over a family containing the value function is ``psi = V`` exactly (the
       complete states pin the scale at every ``t``), which makes twisted SMC zero-variance.

    The projection fits the *marginals* (the contrastive objective of Zhao et al. 2024) rather than
    the path likelihood of ``Q_theta``: the latter identifies ``psi`` only up to a factor per
    parent prefix, which leaves ``Q_theta`` unchanged but not the SMC weights (they depend on
    ``psi`` itself once particles are resampled). The twist parameterisation on masked states
    and the step-size schedule of the paper are unconfirmed (``specs/smc.md`` §10).

    **Negative phase.** The gradient of the objective is
    ``sum_t (E_{sigma_t^theta}[phi 1{incomplete}] - sum_i W_i phi(x_i at t)) + 2 l2 theta``.
    ``negative="exact"`` computes the normalisers ``Z_t(theta)`` by enumeration (enumerable toys
    only). ``negative="smc"`` scales: each iteration runs one SMC with the current twist
    (:func:`negative_phase_samples`, ``num_negative`` particles) whose weighted particles at every
    ``t`` target ``sigma_t^{theta_k}``, and replaces ``log Z_t(theta) - log Z_t(theta_k)`` by the
    self-normalised importance estimate ``log sum_i W_i^t exp((theta - theta_k) · phi_i^t)``:
    a deterministic surrogate (L-BFGS still applies) that is exact at ``theta_k`` to ``O(1/N)``
    and whose gradient is the importance-sampled negative phase. Far from ``theta_k`` the
    importance estimate fails (a feature no particle carries would get no negative phase at
    all, and its parameter would diverge), so the surrogate adds the proximal term
    ``prox |theta - theta_k|^2``; it vanishes at a fixed point, so the iteration's fixed points
    are those of the exact projection (up to Monte Carlo error).

    Parameters
    ----------
    target
        An enumerable target.
    twist
        The family and its starting point (``theta = 0``: ``psi = 1``).
    generator
        Randomness of the path samples.
    num_iterations, num_paths
        Outer iterations and paths per iteration.
    step_size
        ``beta`` in ``(0, 1]`` (``1``: plain weighted ML on importance-weighted paths).
    l2
        Ridge penalty (keeps ``psi > 0`` on prefixes the samples never visit).
    max_iter
        L-BFGS iterations per projection.
    negative, num_negative
        ``"exact"`` (enumeration) or ``"smc"`` (sampled normalisers; ``num_negative`` SMC
        particles per iteration, default ``num_paths``).
    prox
        Proximal weight of the sampled surrogate (``negative="smc"`` only; ``> 0``).

    Returns
    -------
    TRIResult
        The learned twist, per-iteration diagnostics and the sampling cost.
    """
    from tiltsample.samplers import smc

    if not isinstance(twist, LinearTwist):
        raise TypeError(f"twist must be a LinearTwist, got {type(twist).__name__}")
    iterations, m, beta, l2, max_iter, m_neg, prox = tri_parameters(
        generator, num_iterations, num_paths, step_size, l2, max_iter, num_negative, prox
    )
    negative = validation.one_of("negative", negative, NEGATIVE_PHASES)
    tables = _state_tables(target, twist.features) if negative == "exact" else None
    history: list[TRIStep] = []
    cost = Cost()
    current = twist
    for k in range(iterations):
        state = smc.run(
            target,
            num_particles=m,
            generator=generator,
            twist=current,
            proposal="optimal",
            ess_threshold=0.0,
        )
        cost = cost + state.cost
        out = smc.result(state)
        log_w = out.log_weights
        weights = tempered_path_weights(log_w, beta)
        paths = out.sequences
        states = _path_states(target, paths, current.features)
        negatives = None
        if negative == "smc":
            negatives, neg_cost = negative_phase_samples(target, current, m_neg, generator)
            cost = cost + neg_cost
        theta, value = _project(
            current.theta, states, tables, weights, float(l2), max_iter, negatives, prox
        )
        log_z_hat = float(torch.logsumexp(log_w, 0) - math.log(m))
        history.append(TRIStep(k, ess_fraction(log_w), log_z_hat, value))
        current = current.with_theta(theta)
    return TRIResult(current, history, cost)
