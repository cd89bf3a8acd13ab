"""SMC parameters: the family's one validated, frozen configuration (:class:`SMCConfig`).

``smc``, ``csmc``, ``particle-gibbs``, ``power-smc`` and ``tri-tsmc`` take the same keyword
parameters; each sampler builds **one** :class:`SMCConfig` from them, which checks every
parameter on construction, and hands that object to the engine
(:func:`~tiltsample.samplers.smc.step.kernel_from_config`,
:func:`~tiltsample.samplers.smc.algorithm.run`), so nothing downstream validates again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from tiltsample import validation
from tiltsample.resampling import CONDITIONAL_SCHEMES, SCHEMES
from tiltsample.reward import PrefixPotential
from tiltsample.samplers.smc.twists.base import Twist
from tiltsample.samplers.smc.twists.factory import make_twist

__all__ = [
    "CONVENTIONS",
    "MOVE_CUTS",
    "PARAMETERS",
    "PROPOSALS",
    "SMCConfig",
    "conditional_config",
    "make_config",
]

PROPOSALS = ("reference", "optimal")
MOVE_CUTS = ("uniform", "entropy_jump")
CONVENTIONS = ("reset", "mean")


@dataclass(frozen=True)
class SMCConfig:
    """The SMC family's parameters (meaning: :func:`tiltsample.samplers.smc.sampler`), checked
    once, on construction (``ValueError``/``TypeError`` naming the parameter).

    The fields are the public keyword parameters exactly as given (so :meth:`as_params`
    reproduces them); :attr:`psi` and :attr:`move_tau` are what the engine reads for the twist and
    the moves' proposal temperature.
    """

    twist: str | Twist = "prefix"
    potential: PrefixPotential | None = None
    num_rollouts: int | None = None
    rollout_temperature: float = 1.0
    proposal: str = "reference"
    temperature: float = 1.0
    block_size: int = 1
    ess_threshold: float = 0.5
    resampling: str = "systematic"
    num_moves: int = 0
    move_temperature: float | None = None
    convention: str = "reset"
    move_cut: str = "uniform"
    move_cut_power: float = 4.0
    psi: Twist = field(init=False, repr=False, compare=False)
    """The twist object (``twist`` resolved with ``potential``, ``num_rollouts`` and
    ``rollout_temperature`` by :func:`~tiltsample.samplers.smc.twists.make_twist`)."""
    move_tau: float = field(init=False, repr=False, compare=False)
    """The moves' proposal temperature (``move_temperature``, default ``temperature``)."""

    def __post_init__(self) -> None:
        psi = make_twist(self.twist, self.potential, self.num_rollouts, self.rollout_temperature)
        proposal = validation.one_of("proposal", self.proposal, PROPOSALS)
        temperature = validation.positive_float("temperature", self.temperature)
        if proposal == "optimal" and temperature != 1.0:
            raise ValueError(
                "temperature applies to proposal='reference' only; the optimal proposal is "
                f"p_ref·psi (got temperature={temperature})"
            )
        validation.positive_int("block_size", self.block_size)
        validation.unit_interval("ess_threshold", self.ess_threshold)
        validation.one_of("resampling", self.resampling, SCHEMES)
        validation.non_negative_int("num_moves", self.num_moves)
        tau = temperature if self.move_temperature is None else self.move_temperature
        tau = validation.positive_float("move_temperature", tau)
        validation.one_of("convention", self.convention, CONVENTIONS)
        validation.one_of("move_cut", self.move_cut, MOVE_CUTS)
        validation.positive_float("move_cut_power", self.move_cut_power)
        object.__setattr__(self, "psi", psi)
        object.__setattr__(self, "move_tau", tau)

    def as_params(self) -> dict[str, Any]:
        """The keyword parameters (as given) that rebuild this configuration."""
        return {name: getattr(self, name) for name in PARAMETERS}

    def with_params(self, **changes: Any) -> SMCConfig:
        """The same configuration with some parameters changed (checked again)."""
        return replace(self, **changes)


PARAMETERS: tuple[str, ...] = tuple(f.name for f in fields(SMCConfig) if f.init)
"""The names of the SMC family's keyword parameters, in signature order."""


def make_config(**params: Any) -> SMCConfig:
    """An :class:`SMCConfig` from the keyword parameters of
    :func:`tiltsample.samplers.smc.sampler` (defaults for those not given)."""
    return SMCConfig(**params)


def conditional_config(params: dict[str, Any] | SMCConfig) -> SMCConfig:
    """The configuration of a conditional SMC (``csmc``, particle Gibbs, the upper bound).

    ``resampling`` defaults to ``"multinomial"`` (for a dict) and must name a conditional scheme
    (:data:`tiltsample.resampling.CONDITIONAL_SCHEMES`); ``num_moves`` must be 0 (no
    resample-move). Checked before the other parameters.
    """
    raw = params.as_params() if isinstance(params, SMCConfig) else dict(params)
    raw.setdefault("resampling", "multinomial")
    validation.one_of("resampling", raw["resampling"], CONDITIONAL_SCHEMES)
    if raw.get("num_moves", 0):
        raise ValueError("num_moves must be 0 for conditional SMC (no resample-move)")
    return params if isinstance(params, SMCConfig) else SMCConfig(**raw)
