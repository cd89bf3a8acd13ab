"""Hypothesis strategies for random, exactly enumerable tabular targets.

``tabular_targets()`` draws a random :class:`~tiltsample.targets.tabular.TabularPolicy` (vocabulary
2–4, length cap 1–4, Dirichlet concentration, optionally an EOS of probability zero), one of the toy
rewards, ``lam`` and a length convention. Supports stay below a few hundred sequences so exact laws
are cheap. Requires ``hypothesis`` (the ``dev`` extra).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from tiltsample.target import TiltedTarget


@st.composite
def tabular_policies(
    draw: st.DrawFn,
    vocab_sizes: tuple[int, ...] = (2, 3, 4),
    max_lens: tuple[int, ...] = (1, 2, 3, 4),
    allow_no_eos: bool = True,
) -> object:
    """A random tabular policy (as built by ``random_tabular``)."""
    from tiltsample.targets.tabular import random_tabular

    seed = draw(st.integers(0, 2**31 - 1))
    vocab = draw(st.sampled_from(vocab_sizes))
    max_len = draw(st.sampled_from(max_lens))
    concentration = draw(st.sampled_from((0.3, 1.0, 3.0)))
    eos_prob = draw(st.sampled_from((None, None, 0.0) if allow_no_eos else (None,)))
    if vocab == 2 and eos_prob == 0.0:
        eos_prob = None  # a single non-EOS token and no EOS would be deterministic
    gen = torch.Generator().manual_seed(seed)
    return random_tabular(gen, vocab, max_len, concentration=concentration, eos_prob=eos_prob)


@st.composite
def tabular_targets(
    draw: st.DrawFn,
    vocab_sizes: tuple[int, ...] = (2, 3, 4),
    max_lens: tuple[int, ...] = (1, 2, 3, 4),
    lams: tuple[float, ...] = (0.1, 0.5, 2.0),
    truncations: tuple[str, ...] = ("stop", "condition"),
) -> TiltedTarget:
    """A random tilted target over a random tabular policy."""
    from tiltsample.targets import rewards

    policy = draw(tabular_policies(vocab_sizes, max_lens))
    eos = policy.eos_id  # type: ignore[attr-defined]
    truncation = draw(st.sampled_from(truncations))
    if truncation == "condition" and bool(
        torch.isneginf(policy.next_logprobs((), [()])[0, eos])  # type: ignore[attr-defined]
    ):
        truncation = "stop"  # EOS impossible: the conditioned target would be empty
    kind = draw(st.sampled_from(("contains", "fraction", "parity", "last")))
    token = 1 if eos != 1 else 0
    reward = {
        "contains": rewards.ContainsTokenReward,
        "fraction": rewards.CountFractionReward,
        "parity": rewards.ParityReward,
        "last": rewards.LastTokenReward,
    }[kind](token, eos)
    lam = draw(st.sampled_from(lams))
    max_len = policy.max_len  # type: ignore[attr-defined]
    return TiltedTarget(policy, reward, lam, (), max_len, truncation)  # type: ignore[arg-type]
