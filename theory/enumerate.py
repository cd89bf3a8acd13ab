r"""The exact tilted target of an enumerable toy: support, probabilities, ``log Z``, exact draws.

For a :class:`~tiltsample.target.TiltedTarget` whose support can be listed
(:func:`tiltsample.enumeration.enumerate_target`, about ``1e5`` responses at most),

.. math::

    \pi(x) = \frac{p_{\mathrm{ref}}(x)\, e^{\mathrm{log\_tilt}(x)}}{Z}, \qquad
    Z = \sum_x p_{\mathrm{ref}}(x)\, e^{\mathrm{log\_tilt}(x)},

summed over the complete responses of the target's length convention (``truncation="stop"`` or
``"condition"``). Everything is computed in float64 log space, so ``lam`` down to ``1e-3`` with
rewards in ``[0, 1]`` neither overflows nor underflows (``specs/smc.md`` §12, "Exact toys").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from tiltsample.enumeration import DEFAULT_MAX_SUPPORT, enumerate_target
from tiltsample.target import TiltedTarget
from tiltsample.types import Seq

__all__ = ["ExactDistribution", "exact_distribution"]


class ExactDistribution:
    r"""A finite law ``{x: pi(x)}`` over responses, stored in log space.

    Parameters
    ----------
    support
        The responses with positive probability, in a fixed order.
    log_probs
        ``[S]`` float64 normalised log-probabilities, aligned with ``support`` (all finite).
    log_z
        ``log Z`` of the unnormalised target the law was built from (``nan`` is not allowed; use
        ``0.0`` for a law that is normalised by construction).
    log_reference, log_tilt
        Optional ``[S]`` float64 ``log p_ref(x)`` and summed log-tilt of every support element.

    Attributes
    ----------
    support : list[Seq]
    log_probs : Tensor
    log_z : float
    log_reference : Tensor | None
    log_tilt : Tensor | None
    """

    def __init__(
        self,
        support: Sequence[Seq],
        log_probs: Tensor,
        log_z: float,
        log_reference: Tensor | None = None,
        log_tilt: Tensor | None = None,
    ) -> None:
        self.support: list[Seq] = [tuple(int(t) for t in x) for x in support]
        self.log_probs: Tensor = torch.as_tensor(log_probs, dtype=torch.float64)
        n = len(self.support)
        if self.log_probs.shape != (n,):
            raise ValueError(
                f"log_probs must have shape ({n},) (one entry per support element), "
                f"got {tuple(self.log_probs.shape)}"
            )
        if n == 0:
            raise ValueError("an ExactDistribution needs a non-empty support")
        if not bool(torch.isfinite(self.log_probs).all()):
            raise ValueError("log_probs must be finite (drop zero-probability sequences)")
        total = float(torch.logsumexp(self.log_probs, 0))
        if abs(total) > 1e-9:
            raise ValueError(f"log_probs must be normalised, logsumexp = {total:.3g}")
        if math.isnan(float(log_z)):
            raise ValueError("log_z must not be NaN")
        self.log_z: float = float(log_z)
        for name, value in (("log_reference", log_reference), ("log_tilt", log_tilt)):
            if value is not None and tuple(value.shape) != (n,):
                raise ValueError(f"{name} must have shape ({n},)")
        self.log_reference = log_reference
        self.log_tilt = log_tilt
        self._index: dict[Seq, int] = {x: i for i, x in enumerate(self.support)}
        if len(self._index) != n:
            raise ValueError("support contains duplicate sequences")

    def __len__(self) -> int:
        return len(self.support)

    def __repr__(self) -> str:
        return f"ExactDistribution(|support|={len(self)}, log_z={self.log_z:.6g})"

    @property
    def probs(self) -> Tensor:
        """``[S]`` float64 probabilities ``pi(x)``."""
        return torch.exp(self.log_probs)

    def as_dict(self) -> dict[Seq, float]:
        """The law as ``{sequence: probability}``."""
        return dict(zip(self.support, self.probs.tolist(), strict=True))

    def index(self, x: Seq) -> int:
        """Position of ``x`` in :attr:`support` (``KeyError`` outside the support)."""
        return self._index[tuple(x)]

    def prob(self, x: Seq) -> float:
        """``pi(x)``; ``0.0`` for a sequence outside the support."""
        i = self._index.get(tuple(x))
        return 0.0 if i is None else math.exp(float(self.log_probs[i]))

    def log_prob(self, x: Seq) -> float:
        """``log pi(x)``; ``-inf`` outside the support."""
        i = self._index.get(tuple(x))
        return -math.inf if i is None else float(self.log_probs[i])

    def sample(self, n: int, generator: torch.Generator) -> list[Seq]:
        """``n`` exact i.i.d. draws (``torch.multinomial`` with the caller's generator)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError("generator must be a torch.Generator")
        if n == 0:
            return []
        idx = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        return [self.support[i] for i in idx.tolist()]

    def expectation(self, values: Tensor) -> float:
        r"""``E_pi[f] = sum_x pi(x) f(x)`` for ``values[i] = f(support[i])``.

        ``-inf``/``+inf`` values are allowed (the result is then infinite); NaN is rejected.
        """
        v = torch.as_tensor(values, dtype=torch.float64)
        if v.shape != self.log_probs.shape:
            raise ValueError(f"values must have shape {tuple(self.log_probs.shape)}")
        if bool(torch.isnan(v).any()):
            raise ValueError("values must not contain NaN")
        return float(torch.sum(self.probs * v))


def exact_distribution(
    target: TiltedTarget, max_support: int = DEFAULT_MAX_SUPPORT
) -> ExactDistribution:
    r"""Enumerate ``target`` and normalise: ``pi(x) = exp(log_density(x) - log Z)``.

    Parameters
    ----------
    target
        An enumerable :class:`~tiltsample.target.TiltedTarget` (toy policies only).
    max_support
        Refuse (``ValueError``) to enumerate more complete responses than this.

    Returns
    -------
    ExactDistribution
        Only responses with ``pi(x) > 0``: those with ``p_ref(x) = 0`` are never enumerated and
        those whose log-tilt is ``-inf`` (a violated constraint) are dropped.
        ``log_z = logsumexp_x (log p_ref(x) + log_tilt(x))``.

    Raises
    ------
    ValueError
        When the total mass is zero (every response violates a constraint, or none is complete
        under ``truncation="condition"``), or the support exceeds ``max_support``.
    """
    enum = enumerate_target(target, max_support=max_support)
    log_density = enum.log_density
    keep = torch.isfinite(log_density)
    if not bool(keep.any()):
        raise ValueError(
            "the target has zero total mass: no complete response has p_ref(x) > 0 and a "
            "finite log-tilt (check constraints and the truncation convention)"
        )
    idx = keep.nonzero().flatten()
    log_density = log_density[idx]
    log_z = float(torch.logsumexp(log_density, 0))
    support = [enum.support[i] for i in idx.tolist()]
    return ExactDistribution(
        support, log_density - log_z, log_z, enum.log_reference[idx], enum.log_tilt[idx]
    )
