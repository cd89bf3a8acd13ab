"""Beam search batched across problems: :func:`sample_many`.

The searches of several targets (one per problem; same policy, cap and truncation, different
prompts) run as one job: every target's beams are rows of one multi-prompt session, grouped by
target, expanded by :func:`~tiltsample.samplers.beam.expand_rows` (the step of the search alone),
so each target keeps its own ``num_beams`` best with the same tie rules and its result is the one
the search returns alone. Finished hypotheses and finished searches leave the session.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tiltsample import validation
from tiltsample.policy import open_session_multi
from tiltsample.proposal import check_batchable
from tiltsample.results import SampleSet
from tiltsample.reward import PrefixPotential
from tiltsample.samplers.beam import BeamRows, advance_rows, empty_rows, top_hypotheses
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost

__all__ = ["sample_many"]


def sample_many(
    targets: Sequence[TiltedTarget],
    num_samples: int,
    generators: Sequence[torch.Generator] | None = None,
    *,
    num_beams: int = 4,
    potential: PrefixPotential | None = None,
) -> list[SampleSet]:
    """Beam search on several targets at once (same policy, cap and truncation; one per problem).

    Every target's beams are rows of one multi-prompt session
    (:func:`~tiltsample.policy.open_session_multi`, rows grouped by target): one model call per
    position serves all searches, each keeping its own ``num_beams`` best
    (:func:`~tiltsample.samplers.beam.expand_rows`, same tie rules as alone); finished hypotheses
    and finished searches leave the session, so they cost nothing more. Result ``i`` is the
    one ``sample("beam", targets[i], num_samples, num_beams=num_beams)`` returns
    (bit-identical on an exact toy; up to the float differences of a batched forward on a real
    model).

    Parameters
    ----------
    targets
        The targets, sharing policy, ``max_new_tokens``, truncation and EOS.
    num_samples
        Hypotheses returned per target (``<= num_beams``).
    generators
        One per target or ``None``: beam search draws nothing, so they are accepted for a uniform
        signature and left untouched.
    num_beams
        Beams per target.
    potential
        Not supported here (``ValueError`` unless ``None``): run a search with a prefix potential
        through :func:`tiltsample.sample`.

    Returns
    -------
    list of SampleSet
        One per target; its ``cost`` counts its own generated tokens and reward calls,
        ``meta["joint_cost"]`` the whole job's (model calls and forward tokens are shared).
    """
    n = validation.positive_int("num_samples", num_samples)
    width = validation.positive_int("num_beams", num_beams)
    if width < n:
        raise ValueError(f"num_beams must be >= num_samples={n}, got {width}")
    if potential is not None:
        raise ValueError(
            "beam.sample_many does not support a prefix potential; run "
            "sample('beam', target, ..., potential=...) for each target"
        )
    targets = list(targets)
    check_batchable(targets)
    if generators is not None and len(generators) != len(targets):
        raise ValueError(
            f"targets and generators must be of one length, got {len(targets)} targets and "
            f"{len(generators)} generators"
        )
    groups = len(targets)
    session = open_session_multi(targets[0].policy, [t.prompt for t in targets], 1)
    rows = empty_rows(groups)
    generated = torch.zeros(groups, dtype=torch.long)
    costs = [Cost()] * groups
    while not bool(rows.finished.all()):
        generated += torch.bincount(rows.group[~rows.finished], None, groups)
        rows, extra = advance_rows(session, targets, rows, width)
        costs = [c + e for c, e in zip(costs, extra, strict=True)]
    shared = session.cost
    joint = Cost(
        generated_tokens=int(generated.sum()),
        forward_tokens=shared.forward_tokens,
        model_calls=shared.model_calls,
    )
    for c in costs:
        joint = joint + c
    out, start = [], 0
    params = {"num_beams": width, "potential": None}
    for g, count in enumerate(torch.bincount(rows.group, None, groups).tolist()):
        mine = BeamRows(*(field[start : start + count] for field in rows))
        start += count
        res = top_hypotheses(mine, n, Cost(generated_tokens=int(generated[g])) + costs[g])
        res.meta["failed"] = int(torch.isneginf(res.log_weights).sum())
        res.meta.update({"sampler": "beam", "params": params, "joint_cost": joint})
        out.append(res)
    return out
