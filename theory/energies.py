r"""Exact energies (soft values / optimal twists) of every prefix of an enumerable target.

The energy of a prefix ``s`` (``specs/ets.md`` §2; the exact twist of ``specs/smc.md`` §2) is

.. math::

    \mathcal{E}(s) = \mathbb{E}_{x \sim p_{ref}(\cdot \mid s)}\big[e^{\mathrm{log\_tilt}(x)}\big]
      = \frac{\sum_{x \sqsupseteq s} p_{ref}(x)\, e^{\mathrm{log\_tilt}(x)}}{p_{ref}(s)},

the sum running over the complete responses ``x`` that extend ``s`` under the target's length
convention (under ``truncation="condition"`` a response that reaches the cap without EOS is not
complete and contributes nothing, exactly as in the target). Here ``p_ref(s)`` is the product of the
next-token probabilities of the tokens of ``s``. Consequences, unit-tested in
``tests/theory/test_theory_energies.py``:

* ``E(()) = Z`` and ``E(x) = exp(log_tilt(x))`` for a complete ``x``;
* the normaliser identity ``sum_v p_ref(v | s) E(s + v) = E(s)`` at every prefix;
* the optimal (Doob h-transform) kernel ``pi(v | s) = p_ref(v | s) E(s + v) / E(s)`` chains to
  ``pi`` exactly.

Everything is float64 log space: ``log E(s) = logsumexp_{x ⊒ s}(log p(x) + log_tilt(x)) -
log p(s)``. A prefix all of whose completions violate a constraint (``-inf`` tilt) has
``log E = -inf``; no NaN is ever produced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from tiltsample.enumeration import DEFAULT_MAX_SUPPORT, enumerate_target
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "ExactEnergies",
    "ExactPotential",
    "exact_energies",
    "optimal_next_token_logprobs",
]

_BATCH = 4096


def scatter_logsumexp(values: Tensor, index: Tensor, size: int) -> Tensor:
    """``out[g] = logsumexp(values[index == g])`` (``-inf`` for an empty or all ``-inf`` group).

    Max-shifted per group, so it neither overflows nor produces NaN.
    """
    values = values.to(torch.float64)
    top = torch.full((size,), -math.inf, dtype=torch.float64)
    top = top.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = torch.zeros(size, dtype=torch.float64).index_add(
        0, index, torch.exp(values - shift[index])
    )
    return torch.log(total) + shift


class ExactEnergies:
    r"""``log E(s)`` for every prefix ``s`` of every complete response with ``p_ref > 0``.

    Parameters
    ----------
    table
        ``{prefix: log E(prefix)}``; must contain the empty prefix.
    target
        The target the table was computed for. Used to classify a prefix missing from the
        table: one that ``p_ref`` reaches but that has no complete extension (possible only under
        ``truncation="condition"``) has ``log E = -inf``; any other is unreachable (``KeyError``).

    Attributes
    ----------
    table : dict[Seq, float]
    target : TiltedTarget | None
    """

    def __init__(self, table: dict[Seq, float], target: TiltedTarget | None = None) -> None:
        if () not in table:
            raise ValueError("the energy table must contain the empty prefix ()")
        self.table = table
        self.target = target
        self._dead: dict[Seq, float] = {}

    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, prefix: object) -> bool:
        return prefix in self.table

    def __repr__(self) -> str:
        return f"ExactEnergies(|prefixes|={len(self)}, log_z={self.log_z:.6g})"

    @property
    def log_z(self) -> float:
        """``log Z = log E(())``."""
        return self.table[()]

    def log_energy(self, prefix: Seq) -> float:
        """``log E(prefix)``; ``KeyError`` for a prefix the reference policy never produces."""
        key = tuple(int(t) for t in prefix)
        value = self.table.get(key)
        if value is not None:
            return value
        value = self._dead.get(key)
        if value is not None:
            return value
        value = self._resolve_missing(key)
        self._dead[key] = value
        return value

    def log_energies(self, prefixes: Iterable[Seq]) -> Tensor:
        """``[B]`` float64 ``log E`` of a batch of prefixes."""
        return torch.tensor([self.log_energy(s) for s in prefixes], dtype=torch.float64)

    def _resolve_missing(self, prefix: Seq) -> float:
        target = self.target
        unreachable = KeyError(
            f"prefix {prefix} is not a reachable prefix of this target: p_ref(prefix) = 0, or it "
            "has tokens outside the vocabulary, tokens after EOS, or more than max_new_tokens "
            "tokens; exact energies exist only for prefixes that p_ref produces"
        )
        if target is None:
            raise unreachable
        eos, vocab = target.eos_id, target.vocab_size
        if (
            len(prefix) > target.max_new_tokens
            or any(not 0 <= t < vocab for t in prefix)
            or eos in prefix[:-1]
            or target.is_complete(prefix)  # every complete response with p > 0 is in the table
        ):
            raise unreachable
        log_p = 0.0
        for t in range(len(prefix)):
            try:
                row = target.policy.next_logprobs(target.prompt, [prefix[:t]])
            except KeyError:
                raise unreachable from None
            log_p += float(row[0, prefix[t]])
            if log_p == -math.inf:
                raise unreachable
        return -math.inf  # reachable, but no complete extension: E = 0


def _walk_prefix_logprobs(target: TiltedTarget, support: Sequence[Seq]) -> dict[Seq, float]:
    """``log p_ref(s)`` of every prefix of every response in ``support`` (one call per depth).

    The sums are accumulated token by token in the same order as
    :func:`tiltsample.enumeration.enumerate_target`, so for a complete response they equal its
    enumerated ``log_reference`` bit for bit.
    """
    policy, prompt = target.policy, target.prompt
    log_p: dict[Seq, float] = {(): 0.0}
    depth = max((len(x) for x in support), default=0)
    for t in range(depth):
        children = sorted({x[: t + 1] for x in support if len(x) > t})
        parents = sorted({c[:-1] for c in children})
        rows: dict[Seq, Tensor] = {}
        for start in range(0, len(parents), _BATCH):
            chunk = parents[start : start + _BATCH]
            lp = policy.next_logprobs(prompt, chunk).to(torch.float64)
            parent_lp = torch.tensor([log_p[s] for s in chunk], dtype=torch.float64)
            total = parent_lp[:, None] + lp
            for i, s in enumerate(chunk):
                rows[s] = total[i]
        for c in children:
            log_p[c] = float(rows[c[:-1]][c[-1]])
    return log_p


def exact_energies(target: TiltedTarget, max_support: int = DEFAULT_MAX_SUPPORT) -> ExactEnergies:
    r"""Exact ``log E(s)`` for every prefix ``s`` (empty and complete ones included) by a trie sum.

    .. math::

        \log \mathcal{E}(s) = \operatorname{logsumexp}_{x \sqsupseteq s}
            \big(\log p_{ref}(x) + \mathrm{log\_tilt}(x)\big) - \log p_{ref}(s),

    over the enumeration of :func:`tiltsample.enumeration.enumerate_target`; for a complete ``x``
    the table holds exactly ``log_tilt(x)`` (``specs/ets.md`` §2: ``E(x_0) = exp(r/lam)``).

    Parameters
    ----------
    target
        An enumerable target.
    max_support
        Passed to the enumerator.

    Returns
    -------
    ExactEnergies
        Keys: every prefix of every complete response with ``p_ref(x) > 0``. ``log_z`` is
        ``log Z`` of the target (``-inf`` if every response violates a constraint).
    """
    enum = enumerate_target(target, max_support=max_support)
    support = enum.support
    log_p = _walk_prefix_logprobs(target, support)
    prefixes = list(log_p)  # every prefix of every support element (incl. () and complete ones)
    ids = {s: i for i, s in enumerate(prefixes)}
    log_density = enum.log_density
    groups: list[int] = []
    values: list[Tensor] = []
    lengths = torch.tensor([len(x) for x in support], dtype=torch.long)
    for d in range(int(lengths.max()) + 1 if support else 1):
        rows = (lengths >= d).nonzero().flatten()
        groups.extend(ids[support[i][:d]] for i in rows.tolist())
        values.append(log_density[rows])
    numerator = scatter_logsumexp(
        torch.cat(values) if values else torch.zeros(0, dtype=torch.float64),
        torch.tensor(groups, dtype=torch.long),
        len(prefixes),
    )
    denominator = torch.tensor([log_p[s] for s in prefixes], dtype=torch.float64)
    # numerator is -inf exactly when every completion violates a constraint; denominator is finite
    log_e = numerator - denominator
    table = dict(zip(prefixes, log_e.tolist(), strict=True))
    for x, tilt in zip(support, enum.log_tilt.tolist(), strict=True):
        table[x] = tilt
    return ExactEnergies(table, target)


class ExactPotential:
    r"""The exact twist ``log E(prefix)`` as a :class:`~tiltsample.reward.PrefixPotential`.

    Deterministic and free: the energies are precomputed by :func:`exact_energies` (enumeration
    cost paid once, in the constructor) and every call reports ``Cost()``. Plugging it into SMC
    gives the zero-variance twisted SMC of ``specs/smc.md`` §2; into ETS, the "exact energies"
    setting of ``specs/ets.md`` §9 (a).

    Parameters
    ----------
    target
        An enumerable target.
    energies
        Reuse an already computed table (must belong to ``target``).
    """

    def __init__(self, target: TiltedTarget, energies: ExactEnergies | None = None) -> None:
        self.target = target
        self.energies = exact_energies(target) if energies is None else energies

    def log_potential(
        self, prompt: Seq, prefixes: Sequence[Seq], generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        """``[B]`` float64 exact ``log E(prefix)`` and a zero cost (``generator`` is unused)."""
        if tuple(prompt) != self.target.prompt:
            raise ValueError(
                f"ExactPotential was built for prompt {self.target.prompt}, got {tuple(prompt)}"
            )
        return self.energies.log_energies(prefixes), Cost()

    def __repr__(self) -> str:
        return f"ExactPotential({self.energies!r})"


def optimal_next_token_logprobs(
    energies: ExactEnergies, target: TiltedTarget, prefix: Seq
) -> Tensor:
    r"""The exact next-token law of ``pi`` after ``prefix`` (the optimal kernel).

    .. math::

        \log \pi(v \mid s) = \log p_{ref}(v \mid s) + \log\mathcal{E}(s + v) - \log\mathcal{E}(s)

    (``specs/ets.md`` §2, Prop. 2 with the exact normaliser). Under ``truncation="condition"``
    only EOS may occupy the last position (other tokens get ``-inf``, as their energy is 0).

    Parameters
    ----------
    energies
        :func:`exact_energies` of ``target``.
    target
        The target.
    prefix
        An incomplete prefix with ``E(prefix) > 0``.

    Returns
    -------
    Tensor
        ``[V]`` float64 log-probabilities (``-inf`` for impossible tokens); they sum to one up to
        rounding by the normaliser identity.

    Raises
    ------
    ValueError
        If ``prefix`` is complete, or ``pi(prefix) = 0`` (the conditional law is undefined).
    """
    prefix = tuple(int(t) for t in prefix)
    if target.is_complete(prefix):
        raise ValueError(f"prefix {prefix} is a complete response; it has no next token")
    log_e = energies.log_energy(prefix)
    if log_e == -math.inf:
        raise ValueError(
            f"prefix {prefix} has energy 0 (pi(prefix) = 0): its next-token law is undefined"
        )
    row = target.policy.next_logprobs(target.prompt, [prefix])[0].to(torch.float64)
    out = torch.full_like(row, -math.inf)
    last = len(prefix) == target.max_new_tokens - 1
    allowed = [target.eos_id] if target.truncation == "condition" and last else range(len(row))
    for v in allowed:
        lp = float(row[v])
        if lp == -math.inf:
            continue
        child = energies.log_energy((*prefix, v))
        if child > -math.inf:
            out[v] = lp + child - log_e
    return out
