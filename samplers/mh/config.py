"""MH parameters: the validated, frozen run configuration (:class:`MHConfig`) and its
constructors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tiltsample import validation

__all__ = [
    "BATCHINGS",
    "CUTS",
    "DEFAULT_STEPS_PER_STAGE",
    "DEFAULT_STEPS_PLAIN",
    "LENGTH_MODES",
    "SUPPORTS",
    "MHConfig",
    "config_from",
    "make_config",
]


CUTS: tuple[str, ...] = ("uniform", "entropy_jump")


LENGTH_MODES: tuple[str, ...] = ("exact", "reference")


SUPPORTS: tuple[str, ...] = ("full", "top_k")


BATCHINGS: tuple[str, ...] = ("auto", "ragged", "grouped", "aligned", "continuous")


DEFAULT_STEPS_PLAIN = 100


DEFAULT_STEPS_PER_STAGE = 10


@dataclass(frozen=True)
class MHConfig:
    """Validated configuration of the MH kernel (see :func:`sampler` for the meaning).

    ``greedy=True`` is max-swap (``alpha = inf``).
    """

    num_steps: int = DEFAULT_STEPS_PLAIN
    cut: str = "uniform"
    cut_power: float = 4.0
    proposal_temperature: float = 1.0
    length_mode: str = "exact"
    support: str = "full"
    top_k: int = 50
    block_size: int | None = None
    batching: str = "auto"
    greedy: bool = False
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.block_size is None:
            validation.positive_int("num_steps", self.num_steps)
        else:
            validation.positive_int("block_size", self.block_size)
            validation.non_negative_int("num_steps", self.num_steps)
        validation.one_of("cut", self.cut, CUTS)
        object.__setattr__(
            self, "cut_power", validation.positive_float("cut_power", self.cut_power)
        )
        object.__setattr__(
            self,
            "proposal_temperature",
            validation.positive_float("proposal_temperature", self.proposal_temperature),
        )
        validation.one_of("length_mode", self.length_mode, LENGTH_MODES)
        validation.one_of("support", self.support, SUPPORTS)
        validation.positive_int("top_k", self.top_k)
        validation.one_of("batching", self.batching, BATCHINGS)
        if self.batching == "continuous" and self.block_size is not None:
            raise ValueError(
                "batching='continuous' runs plain MH only: block_size must be None (the stage "
                "schedule synchronises all chains at every stage), got "
                f"block_size={self.block_size}"
            )
        if not isinstance(self.greedy, bool):
            raise TypeError(f"greedy must be a bool, got {type(self.greedy).__name__}")
        if self.max_rows is not None:
            validation.positive_int("max_rows", self.max_rows)
            if self.batching != "continuous":
                raise ValueError(
                    "max_rows (session rows, chains queued for a free row) needs "
                    f"batching='continuous', got batching={self.batching!r}"
                )

    def as_dict(self) -> dict[str, Any]:
        """The configuration as plain values (for ``meta`` and records)."""
        return {
            "num_steps": self.num_steps,
            "cut": self.cut,
            "cut_power": self.cut_power,
            "proposal_temperature": self.proposal_temperature,
            "length_mode": self.length_mode,
            "support": self.support,
            "top_k": self.top_k,
            "block_size": self.block_size,
            "batching": self.batching,
            "greedy": self.greedy,
            "max_rows": self.max_rows,
        }


def make_config(
    *,
    num_steps: int | None = None,
    cut: str = "uniform",
    cut_power: float = 4.0,
    proposal_temperature: float = 1.0,
    length_mode: str = "exact",
    support: str = "full",
    top_k: int = 50,
    block_size: int | None = None,
    batching: str = "auto",
    greedy: bool = False,
    max_rows: int | None = None,
) -> MHConfig:
    """An :class:`MHConfig`; ``num_steps=None`` means 100 (plain) or 10 per stage (staged)."""
    if num_steps is None:
        num_steps = DEFAULT_STEPS_PLAIN if block_size is None else DEFAULT_STEPS_PER_STAGE
    return MHConfig(
        num_steps,
        cut,
        cut_power,
        proposal_temperature,
        length_mode,
        support,
        top_k,
        block_size,
        batching,
        greedy,
        max_rows,
    )


def config_from(config: dict[str, Any]) -> MHConfig:
    """The configuration of keyword parameters: a prebuilt one passed as ``_config=`` (and
    nothing else), or :func:`make_config` of the parameters."""
    cfg = config.pop("_config", None)
    if cfg is None:
        return make_config(**config)
    if config:
        raise TypeError(f"unexpected parameters {sorted(config)}")
    if not isinstance(cfg, MHConfig):
        raise TypeError("_config must be an MHConfig")
    return cfg
