"""One conformance parametrisation over *every* registered sampler.

The cases come from the registry itself (``register_sampler(..., example=...)``), so a new sampler
is under test as soon as it is registered: the sampler contract on toys of its kind under both
length conventions, cost accounting, bad input, and the zero-mass rule
(:mod:`tiltsample.testing.conformance`). Laws are tested per family against exact ground truth.
"""

from __future__ import annotations

import pytest

import tiltsample
from tiltsample import registry
from tiltsample.target import TiltedTarget
from tiltsample.targets.masked_diffusion import masked_diffusion_toy
from tiltsample.targets.rewards import ConstraintReward
from tiltsample.targets.toys import tabular_toy
from tiltsample.testing.conformance import check_registered

NAMES = [entry.name for entry in registry.samplers()]


def targets_of_kind(kind: str) -> tuple[list[TiltedTarget], TiltedTarget]:
    """Toys a sampler of ``kind`` accepts, and a zero-mass target of that kind."""
    if kind == "masked-diffusion":
        toy = masked_diffusion_toy(seed=1, length=3)
        zero = tiltsample.TiltedTarget(
            toy.policy, ConstraintReward(lambda x: False), 1.0, (), toy.max_new_tokens
        )
        return [toy], zero
    toys = [
        tabular_toy(seed=1, vocab_size=3, max_len=4, truncation=t) for t in ("stop", "condition")
    ]
    base = toys[0]
    zero = tiltsample.TiltedTarget(
        base.policy, ConstraintReward(lambda x: False), 1.0, (), base.max_new_tokens
    )
    return toys, zero


def test_every_sampler_declares_a_runnable_example() -> None:
    assert len(NAMES) >= 17 and {"fk-steering", "tri-tsmc"} <= set(NAMES)
    for entry in registry.samplers():
        assert entry.target_kind in registry.TARGET_KINDS
        assert entry.kind in ("iid", "markov")


@pytest.mark.parametrize("name", NAMES)
def test_registered_sampler_conforms(name: str) -> None:
    entry = registry.sampler_entry(name)
    targets, zero = targets_of_kind(entry.target_kind)
    outputs = check_registered(name, targets, zero_mass_target=zero)
    assert len(outputs) == len(targets)


def test_a_sampler_registered_by_a_user_is_under_test_at_once() -> None:
    """Registration alone: a user's sampler (the template under a new name) runs the suite."""
    registry.register_sampler(
        "user-importance",
        "tiltsample.samplers._template:sampler",
        "a user's copy of the template",
        example={"temperature": 1.1},
    )
    try:
        assert "user-importance" in [e.name for e in registry.samplers()]
        targets, zero = targets_of_kind("autoregressive")
        check_registered("user-importance", targets, zero_mass_target=zero)
    finally:
        registry.unregister_sampler("user-importance")
    assert "user-importance" not in [e.name for e in registry.samplers()]
