r"""Parametric (learnable) twist families ``log psi_theta = theta · phi``: the shared parameter
handling (:class:`LinearFamily`), one-hot tables (:class:`OneHotTable`, :class:`PrefixTable`) and
the prefix twist :class:`LinearTwist`, learned by :func:`~tiltsample.samplers.smc.twists.tri_tsmc`
(``specs/smc.md`` §11)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, Self

import torch
from torch import Tensor

from tiltsample.samplers.smc.twists.base import Twist
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["FeatureMap", "LinearFamily", "LinearTwist", "OneHotTable", "PrefixTable"]

FeatureMap = Callable[[Sequence[Seq], Tensor], Tensor]
"""``features(prefixes, log_reference) -> Tensor[B, F]`` (float64)."""


class OneHotTable:
    """One-hot features over a fixed list of token tuples: the saturated (tabular) family.

    Row ``b`` of the features is the indicator of ``keys.index(row_b)`` (the zero vector for a
    tuple outside the list). Shared by :class:`PrefixTable` and
    :class:`~tiltsample.samplers.smc.twists.StateTable`.

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
    :class:`~tiltsample.samplers.smc.twists.LinearStateTwist` (masked-diffusion states)
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

    Deterministic and free (no model or reward call). Learned by
    :func:`~tiltsample.samplers.smc.twists.tri_tsmc`; any ``theta`` keeps SMC exact (the final
    twist is always ``G``), only the variance changes.

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
