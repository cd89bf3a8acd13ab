"""Named toy targets for the CLI and the demo: ``factory(seed=0, **options) -> TiltedTarget``.

Each is small enough to enumerate exactly (:mod:`tiltsample.theory`), so every sampler run on it can
be compared with ground truth. Registered in :mod:`tiltsample.registry` (``tiltsample list``).
"""

from __future__ import annotations

import torch

from tiltsample import validation
from tiltsample.target import TiltedTarget, power_target
from tiltsample.targets.decision_trace import decision_trace
from tiltsample.targets.rewards import ContainsTokenReward, CountFractionReward
from tiltsample.targets.tabular import TabularPolicy, random_tabular


def _random_tabular_target(
    reward_class: type[ContainsTokenReward] | type[CountFractionReward],
    seed: int,
    vocab_size: int,
    max_len: int,
    lam: float,
    concentration: float,
    truncation: str,
) -> TiltedTarget:
    gen = torch.Generator().manual_seed(validation.non_negative_int("seed", seed))
    policy = random_tabular(gen, vocab_size, max_len, concentration=concentration)
    reward = reward_class(1, policy.eos_id)
    return TiltedTarget(policy, reward, lam, (), max_len, truncation)  # type: ignore[arg-type]


def tabular_toy(
    seed: int = 0,
    vocab_size: int = 4,
    max_len: int = 6,
    lam: float = 0.25,
    concentration: float = 0.5,
    truncation: str = "stop",
) -> TiltedTarget:
    """Random tabular policy × binary reward ``1{token 1 occurs}`` at ``lam``."""
    return _random_tabular_target(
        ContainsTokenReward, seed, vocab_size, max_len, lam, concentration, truncation
    )


def graded_toy(
    seed: int = 0,
    vocab_size: int = 4,
    max_len: int = 6,
    lam: float = 0.1,
    concentration: float = 0.5,
    truncation: str = "stop",
) -> TiltedTarget:
    """Random tabular policy × graded reward (fraction of content tokens equal to 1)."""
    return _random_tabular_target(
        CountFractionReward, seed, vocab_size, max_len, lam, concentration, truncation
    )


def power_example_policy() -> TabularPolicy:
    """The two-token example of ``specs/mcmc.md`` §1: ``p(ab)=0.45, p(ba)=p(bb)=0.275``.

    Tokens: EOS = 0 (probability zero), ``a`` = 1, ``b`` = 2; responses have exactly two tokens.
    """
    return TabularPolicy.from_probs(
        3,
        0,
        2,
        {(): [0.0, 0.45, 0.55], (1,): [0.0, 0.0, 1.0], (2,): [0.0, 0.5, 0.5]},
    )


def power_example(seed: int = 0, alpha: float = 4.0) -> TiltedTarget:
    """``p^alpha`` on the two-token example (``seed`` unused: the table is fixed)."""
    return power_target(power_example_policy(), alpha, max_new_tokens=2)


def decision_trace_toy(
    seed: int = 0, filler_len: int = 4, num_decisions: int = 2, alpha: float = 4.0
) -> TiltedTarget:
    """The decision-trace toy as the power target ``p^alpha`` (``seed`` unused)."""
    return decision_trace(filler_len, num_decisions, alpha)
