"""The conformance suite of a *registered* sampler: what every sampler of the registry must do.

:func:`check_registered` runs it for one name with the entry's own example parameters
(``register_sampler(..., example={...})``), so a new sampler is tested by registering it:

* the sampler contract of :func:`~tiltsample.testing.check_sampler` on the given targets (valid
  responses under the target's length convention, no NaN, a non-negative
  :class:`~tiltsample.types.Cost`, same seed ⇒ bit-identical output, global RNG untouched);
* cost accounting: a sampler that returned responses reports the work that produced them
  (``model_calls > 0`` or ``generated_tokens > 0`` unless it is an exact sampler that reads the
  enumerated law), and ``meta["failed"]`` equals the number of ``-inf`` log-weights;
* bad input: ``num_samples=0`` and an unknown parameter fail with an error naming the parameter;
* zero-mass targets: the sampler raises ``ValueError`` ("zero total mass") or flags every draw
  failed (log-weight ``-inf``), never returns silent draws — unless the entry says its draws are
  not aimed at the tilted target (``targets_pi=False``, e.g. ``ancestral``).

Laws are tested per family against exact ground truth (``tests/theory/test_theory_laws.py``,
``tests/theory/test_ets_laws.py``, ``tests/samplers/smc/test_smc_weighted_law.py``,
``tests/samplers/mh/test_mh_kernels.py``);
this suite is the floor every registered sampler stands on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

from tiltsample.driver import sample
from tiltsample.registry import sampler_entry
from tiltsample.results import SampleSet
from tiltsample.target import TiltedTarget
from tiltsample.testing import check_sampler

__all__ = ["check_registered"]


def check_registered(
    name: str,
    targets: Sequence[TiltedTarget],
    *,
    zero_mass_target: TiltedTarget | None = None,
    params: Mapping[str, Any] | None = None,
    num_samples: int | None = None,
    seed: int = 0,
) -> list[SampleSet]:
    """Run the conformance suite of the registered sampler ``name`` (see the module docstring).

    Parameters
    ----------
    name
        A registered sampler name.
    targets
        Targets of the kind the sampler accepts (e.g. both truncation conventions of a toy).
    zero_mass_target
        A target with no response of positive mass (e.g. a constraint no response satisfies);
        None skips that part.
    params
        Sampler parameters; default: the registry entry's ``example``.
    num_samples
        Draws per run; default: the entry's ``example_num_samples``.
    seed
        Seed of every run.

    Returns
    -------
    list[SampleSet]
        One result per target, for further, sampler-specific checks.
    """
    entry = sampler_entry(name)
    kwargs = dict(entry.example if params is None else params)
    n = entry.example_num_samples if num_samples is None else num_samples
    outputs = []
    for target in targets:
        out = check_sampler(name, target, num_samples=n, seed=seed, **kwargs)
        _check_accounting(name, out, entry.kind)
        outputs.append(out)
    _check_bad_input(name, targets[0], kwargs, n)
    if zero_mass_target is not None:
        _check_zero_mass(name, zero_mass_target, kwargs, n, entry.targets_pi)
    return outputs


def _check_accounting(name: str, out: SampleSet, kind: str) -> None:
    failed = int(torch.isneginf(out.log_weights).sum())
    assert out.meta.get("failed") == failed, (
        f"{name}: meta['failed']={out.meta.get('failed')} but {failed} draws have log-weight -inf"
    )
    cost = out.cost
    if name != "exact":
        assert cost.model_calls > 0 or cost.generated_tokens > 0, (
            f"{name}: returned responses but reported no model calls and no generated tokens"
        )
    assert cost.forward_tokens >= 0 and cost.reward_calls >= 0


def _check_bad_input(name: str, target: TiltedTarget, kwargs: dict[str, Any], n: int) -> None:
    with pytest.raises(ValueError, match="num_samples"):
        sample(name, target, 0, seed=0, **kwargs)
    with pytest.raises((TypeError, ValueError), match="no_such_parameter"):
        sample(name, target, n, seed=0, no_such_parameter=1, **kwargs)


def _check_zero_mass(
    name: str, target: TiltedTarget, kwargs: dict[str, Any], n: int, targets_pi: bool
) -> None:
    try:
        out = sample(name, target, n, seed=0, **kwargs)
    except ValueError as error:
        assert "zero total mass" in str(error), f"{name}: unclear zero-mass error: {error}"
        return
    if not targets_pi:
        return
    assert out.meta["failed"] == len(out), (
        f"{name}: {out.meta['failed']} of {len(out)} draws of a zero-mass target flagged failed"
    )
    assert bool(torch.isneginf(out.log_weights).all())
    assert out.log_evidence is None or out.log_evidence == float("-inf")
