r"""A masked-diffusion toy with a known joint, exact conditionals and an exactly computable law.

:class:`MaskedDiffusionToy` implements :class:`~tiltsample.diffusion.MaskedDiffusionPolicy` for an
explicit joint ``P(x)`` over ``V^L``. Its "network" returns the exact per-position conditionals

.. math::

    p(x_j = v \mid x_R) = \frac{\sum_{x' :\, x'_R = x_R,\ x'_j = v} P(x')}
                               {\sum_{x' :\, x'_R = x_R} P(x')}

given the revealed positions ``R`` (a state of zero mass, reachable only when several positions
are committed per step, gets uniform conditionals at its masked positions: the sampler stays
defined and its law stays computable). The base sampler runs ``T = num_steps`` steps; a step
commits ``quota(s)`` masked positions of the current block (LLaDA's semi-autoregressive schedule:
``block_length`` positions per block, an even split of each block over its steps; the default is
one block and ``T = L``, i.e. one position per step). Which positions, by ``order``:

``"fixed"``
    the next masked positions of ``permutation`` (default left to right); tokens drawn from their
    conditionals.
``"random"``
    a uniformly random subset of the eligible masked positions (drawn with the caller's
    generator); tokens drawn from their conditionals.
``"max-confidence"``
    the positions whose exact conditional has the largest maximum probability (ties: lowest
    index); tokens drawn from their conditionals.
``"drawn-confidence"``
    LLaDA's low-confidence remasking (``specs/ets.md`` §3): draw a token at every eligible masked
    position, score each by its probability, commit the highest-scoring ones (ties: lowest index).

Exactness (``specs/ets.md`` §3, "DLM toy"). With one position per step and a rule that looks at
the revealed tokens only (``fixed``, ``random``, ``max-confidence``), the sampler's output law is
the joint itself. ``drawn-confidence`` and several positions per step do **not** preserve the
joint; ``p_ref`` is then the sampler's own output law. Either way :meth:`completion_law` computes
the law exactly by summing over sampler paths (a forward pass over partial states, with the same
selection code as :meth:`denoise_step`), and ``sequence_logprob`` is that law pushed to responses
(cut after the first EOS). So ``TiltedTarget(toy, reward, lam, max_new_tokens=L)`` is an exactly
known target for every order (``tests/targets/test_masked_diffusion.py``).

Cost: one denoiser pass per live row per step, ``forward_tokens = rows · (len(prompt) + L)``,
``generated_tokens`` = committed positions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.diffusion import block_positions, block_quota, check_states, check_step
from tiltsample.policy import ReferencePolicy
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "ORDERS",
    "MaskedDiffusionToy",
    "masked_diffusion_toy",
    "random_masked_diffusion",
]

ORDERS: tuple[str, ...] = ("fixed", "random", "max-confidence", "drawn-confidence")
MAX_JOINT = 2_000_000
"""Largest ``V^L`` the toy accepts."""
MAX_DRAWS = 2_000_000
"""Largest number of joint draws the exact ``drawn-confidence`` transition enumerates."""

State = tuple[int, ...]


class MaskedDiffusionToy:
    """An explicit joint over ``V^L`` with a masked-diffusion base sampler (module docstring).

    Parameters
    ----------
    log_joint
        ``[V] * L`` (or flat ``[V**L]``, last position fastest) float log-probabilities,
        normalised; entries may be ``-inf``.
    eos_id
        The EOS id (responses are cut after the first EOS).
    order
        One of :data:`ORDERS`.
    num_steps
        ``T`` in ``[1, L]`` (default ``L``: one position per step).
    block_length
        LLaDA block length (default ``L``: one block); must divide ``L``, and the number of
        blocks must divide ``T``.
    permutation
        The position order of ``order="fixed"`` (default ``0, 1, ..., L - 1``).
    """

    def __init__(
        self,
        log_joint: Tensor,
        eos_id: int = 0,
        *,
        order: str = "max-confidence",
        num_steps: int | None = None,
        block_length: int | None = None,
        permutation: Sequence[int] | None = None,
    ) -> None:
        joint = torch.as_tensor(log_joint, dtype=torch.float64)
        if joint.dim() == 1:
            raise ValueError(
                "log_joint must have shape [V] * L; reshape a flat table with "
                "MaskedDiffusionToy.from_flat(log_probs, vocab_size, length)"
            )
        vocab = int(joint.shape[0])
        if vocab < 2 or any(int(s) != vocab for s in joint.shape):
            raise ValueError(f"log_joint must have shape [V] * L with V >= 2, got {joint.shape}")
        if joint.numel() > MAX_JOINT:
            raise ValueError(f"V**L = {joint.numel()} exceeds {MAX_JOINT}; use a smaller toy")
        if bool(torch.isnan(joint).any()) or bool((joint == math.inf).any()):
            raise ValueError("log_joint must not contain NaN or +inf")
        total = float(torch.logsumexp(joint.flatten(), 0))
        if not abs(total) < 1e-9:
            raise ValueError(f"log_joint must be normalised, logsumexp = {total:.3g}")
        self._joint = joint
        self._vocab = vocab
        self._length = int(joint.dim())
        self._eos = validation.token_id("eos_id", eos_id, vocab)
        self.order = validation.one_of("order", order, ORDERS)
        length = self._length
        steps = length if num_steps is None else validation.positive_int("num_steps", num_steps)
        if steps > length:
            raise ValueError(f"num_steps must lie in [1, L={length}], got {steps}")
        block = (
            length
            if block_length is None
            else validation.positive_int("block_length", block_length)
        )
        if length % block:
            raise ValueError(f"block_length must divide L={length}, got {block}")
        num_blocks = length // block
        if steps % num_blocks:
            raise ValueError(
                f"num_steps={steps} must be a multiple of the number of blocks L/block_length = "
                f"{num_blocks}"
            )
        self._steps = steps
        self.block_length = block
        self._steps_per_block = steps // num_blocks
        perm = tuple(range(length)) if permutation is None else tuple(int(p) for p in permutation)
        if sorted(perm) != list(range(length)):
            raise ValueError(f"permutation must be a permutation of 0..{length - 1}, got {perm}")
        self.permutation = perm
        rank = [0] * length
        for r, p in enumerate(perm):
            rank[p] = r
        self._rank = torch.tensor(rank, dtype=torch.float64)
        self._cond_cache: dict[State, Tensor] = {}
        self._trans_cache: dict[tuple[State, int], list[tuple[State, float]]] = {}
        self._completion_cache: dict[tuple[State, int], dict[State, float]] = {}
        self._seq_law: dict[Seq, float] | None = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_flat(
        cls, log_probs: Tensor, vocab_size: int, length: int, eos_id: int = 0, **kw: Any
    ) -> MaskedDiffusionToy:
        """Build from a flat ``[V**L]`` table (last position fastest)."""
        flat = torch.as_tensor(log_probs, dtype=torch.float64)
        if flat.shape != (vocab_size**length,):
            raise ValueError(f"log_probs must have shape ({vocab_size**length},)")
        return cls(flat.view(*([vocab_size] * length)), eos_id, **kw)

    @classmethod
    def from_policy(
        cls, policy: ReferencePolicy, length: int, prompt: Seq = (), **kw: Any
    ) -> MaskedDiffusionToy:
        """The joint of an enumerable autoregressive policy's responses of at most ``length``.

        A response that ended with EOS is padded with EOS to ``L`` positions, so its pushed-
        forward law (cut after the first EOS) is the autoregressive ``p_ref`` under
        ``truncation="stop"`` with ``max_new_tokens = length``. This is the "same joint with the
        reveal rule" of ``specs/ets.md`` §9.
        """
        from tiltsample.enumeration import enumerate_target
        from tiltsample.target import reference_target

        enum = enumerate_target(reference_target(policy, prompt, length, "stop"))
        vocab, eos = int(policy.vocab_size), int(policy.eos_id)
        joint = torch.full([vocab] * length, -math.inf, dtype=torch.float64)
        for x, lp in zip(enum.support, enum.log_reference.tolist(), strict=True):
            full = tuple(x) + (eos,) * (length - len(x))
            joint[full] = lp
        joint = joint - torch.logsumexp(joint.flatten(), 0)
        return cls(joint, eos, **kw)

    def with_schedule(self, **changes: Any) -> MaskedDiffusionToy:
        """The same joint with another ``order`` / ``num_steps`` / ``block_length`` /
        ``permutation``."""
        args: dict[str, Any] = {
            "order": self.order,
            "num_steps": self._steps,
            "block_length": self.block_length,
            "permutation": self.permutation,
        }
        args.update(changes)
        return MaskedDiffusionToy(self._joint, self._eos, **args)

    def tempered(self, beta: float) -> MaskedDiffusionToy:
        """The joint ``P^beta`` renormalised, same schedule (a proposal with a known ratio)."""
        beta = validation.positive_float("beta", beta)
        lj = torch.where(torch.isneginf(self._joint), self._joint, beta * self._joint)
        lj = lj - torch.logsumexp(lj.flatten(), 0)
        return MaskedDiffusionToy(
            lj,
            self._eos,
            order=self.order,
            num_steps=self._steps,
            block_length=self.block_length,
            permutation=self.permutation,
        )

    # ------------------------------------------------------------------ protocol
    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def mask_id(self) -> int:
        return self._vocab

    @property
    def length(self) -> int:
        return self._length

    @property
    def num_steps(self) -> int:
        return self._steps

    @property
    def log_joint(self) -> Tensor:
        """The ``[V] * L`` joint log-probabilities (a copy)."""
        return self._joint.clone()

    def quota(self, step: int) -> int:
        """Positions committed at step ``step``."""
        return block_quota(self._check_step(step), self.block_length, self._steps_per_block)

    def block(self, step: int) -> range:
        """Positions eligible at step ``step`` (the current block)."""
        return block_positions(self._check_step(step), self.block_length, self._steps_per_block)

    def committed_before(self, step: int) -> int:
        """Positions committed by the first ``step`` steps."""
        if not 0 <= step <= self._steps:
            raise ValueError(f"step must lie in [0, num_steps={self._steps}], got {step}")
        return sum(self.quota(s) for s in range(step))

    def position_logprobs(self, prompt: Seq, states: Tensor) -> Tensor:
        states = check_states(self, states)
        if states.shape[0] == 0:
            return torch.zeros((0, self._length, self._vocab), dtype=torch.float64)
        return self._cond_batch(states)

    def denoise_step(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        self._check_step(step)
        states = check_states(self, states)
        new = states.clone()
        live = (states == self.mask_id).any(dim=1).nonzero().flatten()
        n = int(live.numel())
        if n == 0:
            return new, Cost()
        rows = states[live]
        cond = self._cond_batch(rows)  # [n, L, V]
        drawn = torch.multinomial(
            torch.exp(cond).reshape(n * self._length, self._vocab), 1, generator=generator
        ).view(n, self._length)
        rand = (
            torch.rand((n, self._length), generator=generator, dtype=torch.float64)
            if self.order == "random"
            else None
        )
        chosen = self._choose(rows, cond, drawn, rand, step)  # [n, k]
        picked = drawn.gather(1, chosen)
        sub = new[live]
        sub.scatter_(1, chosen, picked)
        new[live] = sub
        cost = Cost(
            generated_tokens=n * int(chosen.shape[1]),
            forward_tokens=n * (len(prompt) + self._length),
            model_calls=1,
        )
        return new, cost

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        """``log p_ref(x)`` under the base sampler's output law (exact; cut after EOS)."""
        if per_token:
            raise ValueError(
                "per_token=True is not defined for a masked-diffusion sampler (there is no "
                "left-to-right factorisation of its law)"
            )
        law = self.output_logprobs()
        return torch.tensor(
            [law.get(tuple(int(t) for t in x), -math.inf) for x in xs], dtype=torch.float64
        )

    def completion_logprob(
        self, prompt: Seq, states: Tensor, step: int, completions: Tensor
    ) -> Tensor:
        """``log P(sampler from states[b] at step ends at completions[b])`` (exact)."""
        states = check_states(self, states)
        completions = check_states(self, completions, "completions")
        if completions.shape[0] != states.shape[0]:
            raise ValueError("states and completions must have the same number of rows")
        out = []
        for s, c in zip(states.tolist(), completions.tolist(), strict=True):
            law = self.completion_law(tuple(s), step)
            out.append(law.get(tuple(c), -math.inf))
        return torch.tensor(out, dtype=torch.float64)

    # ------------------------------------------------------------------ exact laws
    def transitions(self, state: State, step: int) -> list[tuple[State, float]]:
        """Every state one step ``step`` can reach from ``state``, with its log-probability."""
        key = (tuple(state), step)
        cached = self._trans_cache.get(key)
        if cached is None:
            cached = self._enumerate_transitions(tuple(state), step)
            self._trans_cache[key] = cached
        return cached

    def completion_law(self, state: State, step: int) -> dict[State, float]:
        """``{complete state: log P}`` of the sampler run from ``state`` at ``step`` to ``T``."""
        key = (tuple(int(t) for t in state), int(step))
        cached = self._completion_cache.get(key)
        if cached is not None:
            return cached
        if not 0 <= step <= self._steps:
            raise ValueError(f"step must lie in [0, num_steps={self._steps}], got {step}")
        masked = sum(1 for t in key[0] if t == self.mask_id)
        if masked != self._length - self.committed_before(step):
            raise ValueError(
                f"state has {masked} masked positions; the schedule leaves "
                f"{self._length - self.committed_before(step)} after {step} steps"
            )
        layer: dict[State, float] = {key[0]: 0.0}
        for s in range(step, self._steps):
            nxt: dict[State, list[float]] = {}
            for st, lp in layer.items():
                for child, lq in self.transitions(st, s):
                    nxt.setdefault(child, []).append(lp + lq)
            layer = {k: _lse(v) for k, v in nxt.items()}
        self._completion_cache[key] = layer
        return layer

    def output_logprobs(self) -> dict[Seq, float]:
        """``{response: log p_ref(response)}``: the sampler's output law pushed to responses."""
        if self._seq_law is None:
            start = (self.mask_id,) * self._length
            groups: dict[Seq, list[float]] = {}
            for full, lp in self.completion_law(start, 0).items():
                groups.setdefault(self.to_seq(full), []).append(lp)
            self._seq_law = {k: _lse(v) for k, v in groups.items() if _lse(v) > -math.inf}
        return dict(self._seq_law)

    def output_law(self) -> dict[Seq, float]:
        """``{response: p_ref(response)}`` (probabilities)."""
        return {k: math.exp(v) for k, v in self.output_logprobs().items()}

    def joint_law(self) -> dict[Seq, float]:
        """The joint pushed to responses (equals :meth:`output_law` for joint-preserving rules)."""
        out: dict[Seq, float] = {}
        flat = self._joint.flatten()
        for idx in (flat > -math.inf).nonzero().flatten().tolist():
            full = _unravel(idx, self._vocab, self._length)
            x = self.to_seq(full)
            out[x] = out.get(x, 0.0) + math.exp(float(flat[idx]))
        return out

    def to_seq(self, full: Sequence[int]) -> Seq:
        """A complete state as a response, cut after the first EOS."""
        row = [int(t) for t in full]
        if self._eos in row:
            row = row[: row.index(self._eos) + 1]
        return tuple(row)

    # ------------------------------------------------------------------ internals
    def _check_step(self, step: int) -> int:
        return check_step(step, self._steps)

    def _cond_batch(self, states: Tensor) -> Tensor:
        """``[B, L, V]`` conditionals of a batch (computed once per distinct state)."""
        uniq, inverse = torch.unique(states, dim=0, return_inverse=True)
        table = torch.stack([self._cond(tuple(r)) for r in uniq.tolist()])
        return table[inverse]

    def _cond(self, state: State) -> Tensor:
        """``[L, V]`` exact conditional log-probs given the revealed tokens (cached per state)."""
        cached = self._cond_cache.get(state)
        if cached is not None:
            return cached
        mask = self.mask_id
        out = torch.full((self._length, self._vocab), -math.inf, dtype=torch.float64)
        index: list[Any] = []
        masked: list[int] = []
        for j, t in enumerate(state):
            if t == mask:
                index.append(slice(None))
                masked.append(j)
            else:
                out[j, t] = 0.0
                index.append(t)
        if masked:
            sub = self._joint[tuple(index)]
            total = torch.logsumexp(sub.flatten(), 0)
            for k, j in enumerate(masked):
                if not bool(torch.isfinite(total)):
                    out[j] = -math.log(self._vocab)  # zero-mass state: uniform fallback
                    continue
                others = [d for d in range(len(masked)) if d != k]
                marg = torch.logsumexp(sub, dim=others) if others else sub
                out[j] = marg - total
        self._cond_cache[state] = out
        return out

    def _choose(
        self, rows: Tensor, cond: Tensor, drawn: Tensor, rand: Tensor | None, step: int
    ) -> Tensor:
        """``[n, k]`` positions committed at ``step`` (shared by the sampler and the exact law)."""
        n = int(rows.shape[0])
        eligible = torch.zeros(self._length, dtype=torch.bool)
        eligible[list(self.block(step))] = True
        ok = (rows == self.mask_id) & eligible[None, :]
        count = int(ok[0].sum())
        k = min(self.quota(step), count)
        if self.order == "fixed":
            score = -self._rank.expand(n, -1)
        elif self.order == "random":
            assert rand is not None
            score = rand
        elif self.order == "max-confidence":
            score = cond.max(dim=2).values
        else:  # drawn-confidence
            score = cond.gather(2, drawn[:, :, None]).squeeze(2)
        score = torch.where(ok, score, torch.full_like(score, -math.inf))
        order = torch.sort(-score, dim=1, stable=True).indices  # ties: lowest index first
        return order[:, :k]

    def _enumerate_transitions(self, state: State, step: int) -> list[tuple[State, float]]:
        self._check_step(step)
        mask = self.mask_id
        if mask not in state:
            return [(state, 0.0)]
        cond = self._cond(state)
        rows = torch.tensor([state], dtype=torch.long)
        elig = [j for j in self.block(step) if state[j] == mask]
        k = min(self.quota(step), len(elig))
        out: dict[State, list[float]] = {}

        def tokens_at(j: int) -> list[int]:
            return (cond[j] > -math.inf).nonzero().flatten().tolist()

        def commit(positions: Sequence[int], log_weight: float) -> None:
            for toks in itertools.product(*(tokens_at(j) for j in positions)):
                child = list(state)
                lp = log_weight
                for j, v in zip(positions, toks, strict=True):
                    child[j] = v
                    lp += float(cond[j, v])
                out.setdefault(tuple(child), []).append(lp)

        if self.order in ("fixed", "max-confidence"):
            dummy = torch.zeros((1, self._length), dtype=torch.long)
            commit(self._choose(rows, cond[None], dummy, None, step)[0].tolist(), 0.0)
        elif self.order == "random":
            subsets = list(itertools.combinations(elig, k))
            for subset in subsets:
                commit(subset, -math.log(len(subsets)))
        else:  # drawn-confidence: sum over every joint draw at the eligible masked positions
            options = [tokens_at(j) for j in elig]
            total = math.prod(len(o) for o in options)
            if total > MAX_DRAWS:
                raise ValueError(
                    f"the exact drawn-confidence transition needs {total} draws > {MAX_DRAWS}"
                )
            combos = torch.tensor(list(itertools.product(*options)), dtype=torch.long)
            drawn = torch.zeros((len(combos), self._length), dtype=torch.long)
            drawn[:, elig] = combos
            picks = self._choose(
                rows.expand(len(combos), -1),
                cond[None].expand(len(combos), -1, -1),
                drawn,
                None,
                step,
            )
            elig_t = torch.tensor(elig, dtype=torch.long)
            log_draw = cond[elig_t[None, :], combos].sum(dim=1)
            picked = drawn.gather(1, picks)
            for c_row, p_row, lp in zip(
                picks.tolist(), picked.tolist(), log_draw.tolist(), strict=True
            ):
                child = list(state)
                for j, v in zip(c_row, p_row, strict=True):
                    child[j] = v
                out.setdefault(tuple(child), []).append(lp)
        result = [(child, _lse(v)) for child, v in out.items()]
        return [(c, lp) for c, lp in result if lp > -math.inf]

    def __repr__(self) -> str:
        return (
            f"MaskedDiffusionToy(V={self._vocab}, L={self._length}, T={self._steps}, "
            f"order={self.order!r}, block_length={self.block_length})"
        )


def _lse(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(v - top) for v in values))


def _unravel(index: int, vocab: int, length: int) -> State:
    out = []
    for _ in range(length):
        index, r = divmod(index, vocab)
        out.append(r)
    return tuple(reversed(out))


def random_masked_diffusion(
    generator: torch.Generator,
    vocab_size: int,
    length: int,
    concentration: float = 1.0,
    eos_id: int = 0,
    **kw: Any,
) -> MaskedDiffusionToy:
    """A toy whose joint is one Dirichlet(``concentration``) draw over all ``V^L`` vectors.

    Every vector has positive probability, so every state has well-defined conditionals.
    ``**kw`` goes to :class:`MaskedDiffusionToy` (``order``, ``num_steps``, ...).
    """
    from tiltsample.targets.tabular import log_dirichlet

    validation.generator("generator", generator)
    validation.positive_int("vocab_size", vocab_size)
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    validation.positive_int("length", length)
    if vocab_size**length > MAX_JOINT:
        raise ValueError(f"vocab_size**length = {vocab_size**length} exceeds {MAX_JOINT}")
    concentration = validation.positive_float("concentration", concentration)
    flat = log_dirichlet(generator, concentration, vocab_size**length)
    return MaskedDiffusionToy.from_flat(flat, vocab_size, length, eos_id, **kw)


def masked_diffusion_toy(
    seed: int = 0,
    vocab_size: int = 3,
    length: int = 4,
    lam: float = 0.3,
    order: str = "max-confidence",
    num_steps: int | None = None,
    concentration: float = 0.5,
) -> TiltedTarget:
    """A random masked-diffusion toy × binary reward ``1{token 1 occurs}`` at ``lam``.

    The toy-target factory for the CLI (``tiltsample sample ets --target masked-diffusion``).
    """
    from tiltsample.targets.rewards import ContainsTokenReward

    gen = torch.Generator().manual_seed(validation.non_negative_int("seed", seed))
    policy = random_masked_diffusion(
        gen, vocab_size, length, concentration, order=order, num_steps=num_steps
    )
    reward = ContainsTokenReward(1, policy.eos_id)
    return TiltedTarget(policy, reward, lam, (), length)  # type: ignore[arg-type]
