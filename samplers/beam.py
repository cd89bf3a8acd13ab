r"""Beam search on prefix log-density, with an optional prefix potential.

Score of a hypothesis
    complete response ``x``: ``log p_ref(x) + log_tilt(x)`` (the unnormalised ``log pi(x)``);
    unfinished prefix ``x_{1:t}``: ``log p_ref(x_{1:t}) + log psi(x_{1:t})`` with ``psi`` the
    prefix potential (``0`` without one). With the exact potential
    ``psi = E[exp(log_tilt) | prefix]``
    both scores are log-marginals of ``pi`` on one scale, and a beam as wide as the support returns
    the mode of ``pi`` exactly.
Step
    Every unfinished beam is expanded by every token of positive probability; finished beams
    compete unchanged; the ``num_beams`` best hypotheses survive (ties: lower beam index, then lower
    token id — deterministic). Search ends when every beam is finished.
Output
    The ``num_samples`` best finished hypotheses, best first, unweighted (beam search is an
    optimiser, not a sampler of ``pi``); ``meta["scores"]`` holds their scores.
Cost per step
    One forward token per live beam (finished hypotheses leave the decode session, see
    :func:`advance_rows`), one reward call per complete candidate and term, potential calls for
    unfinished candidates.
Many problems at once
    :func:`tiltsample.samplers.beam_many.sample_many` runs the searches of several targets (one
    per problem) as one job: their beams are rows of one multi-prompt session, grouped by target,
    each group keeping its own ``num_beams`` best (:func:`expand_rows` is the step both paths
    share), so each result is the one the search returns alone.

The beams live in tensors (:class:`BeamRows`: tokens ``[B, t]``, lengths, scores); tuples are built
only for the complete candidates the reward reads and for the returned hypotheses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.policy import DecodeSession, open_session
from tiltsample.results import SampleSet
from tiltsample.reward import PrefixPotential
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq


class BeamRows(NamedTuple):
    """The hypotheses of one or several searches, one row each, rows grouped by search.

    Attributes
    ----------
    tokens
        ``[B, t]`` long: the tokens of every hypothesis; a finished one is padded with EOS.
    lengths
        ``[B]`` long: the length of every hypothesis (EOS included).
    log_reference
        ``[B]`` float64: ``log p_ref`` of every hypothesis.
    scores
        ``[B]`` float64: the beam scores (see the module docstring).
    finished
        ``[B]`` bool: whether the hypothesis is a complete response.
    group
        ``[B]`` long, non-decreasing: the search (target) each row belongs to.
    """

    tokens: Tensor
    lengths: Tensor
    log_reference: Tensor
    scores: Tensor
    finished: Tensor
    group: Tensor


class BeamState(NamedTuple):
    target: TiltedTarget
    session: DecodeSession
    rows: BeamRows
    num_samples: int
    cost: Cost


class BeamInfo(NamedTuple):
    cost: Cost
    num_finished: int


def empty_rows(num_groups: int) -> BeamRows:
    """One empty hypothesis per search (the start of ``num_groups`` searches)."""
    zero = torch.zeros(num_groups, dtype=torch.float64)
    return BeamRows(
        torch.zeros((num_groups, 0), dtype=torch.long),
        torch.zeros(num_groups, dtype=torch.long),
        zero,
        zero.clone(),
        torch.zeros(num_groups, dtype=torch.bool),
        torch.arange(num_groups),
    )


def rows_to_seqs(tokens: Tensor, lengths: Tensor) -> list[Seq]:
    """The hypotheses ``tokens[i, :lengths[i]]`` as :data:`~tiltsample.types.Seq` tuples."""
    return [tuple(row[:n]) for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)]


def expand_rows(
    targets: Sequence[TiltedTarget],
    rows: BeamRows,
    log_p: Tensor,
    width: int,
    potential: PrefixPotential | None = None,
    generator: torch.Generator | None = None,
) -> tuple[BeamRows, Tensor, list[Cost]]:
    """One beam-search step of every search: expand, score, keep each group's ``width`` best.

    Parameters
    ----------
    targets
        One target per group (they share the cap, truncation rule and EOS).
    rows
        The current hypotheses, all of length ``t``.
    log_p
        ``[B, V]`` float64 next-token log-probs of every row (rows of finished hypotheses are
        ignored).
    width
        Beams kept per group.
    potential, generator
        Optional prefix potential scoring unfinished candidates (one group only).

    Returns
    -------
    BeamRows, Tensor, list of Cost
        The kept hypotheses (best first within each group; ties: lower beam index, then lower
        token id), the index of each one's parent row, and each group's reward and potential cost.
    """
    first = targets[0]
    eos, cap = first.eos_id, first.max_new_tokens
    condition = first.truncation == "condition"
    t = int(rows.tokens.shape[1])
    fin = rows.finished
    vocab = int(log_p.shape[1])
    # candidates as a [beams, V] grid read in row-major (beam, token) order: every token of
    # positive probability of a live beam, and one entry (the EOS column) per finished beam
    lp_grid = rows.log_reference[:, None] + log_p
    valid = (lp_grid > -math.inf) & ~fin[:, None]
    if condition and t == cap - 1:
        valid[:, torch.arange(vocab) != eos] = False
    valid[:, eos] |= fin
    lp_grid[:, eos] = torch.where(fin, rows.log_reference, lp_grid[:, eos])
    flat = valid.flatten().nonzero().flatten()
    parent_of = torch.div(flat, vocab, rounding_mode="floor")
    token_of = flat - parent_of * vocab
    lp = lp_grid.flatten()[flat]
    was_done = fin[parent_of]
    ends_all = not condition and t + 1 == cap  # truncation: every candidate is complete
    complete = ~was_done if ends_all else (token_of == eos) & ~was_done
    cgroup = rows.group[parent_of]
    scores = torch.where(was_done, rows.scores[parent_of], lp)
    extra = [Cost()] * len(targets)

    def seqs_of(idx: Tensor) -> list[Seq]:
        grown = torch.cat([rows.tokens[parent_of[idx]], token_of[idx, None]], dim=1)
        return [tuple(x) for x in grown.tolist()]

    idx_c = complete.nonzero().flatten()
    if len(idx_c):
        seqs, lp_c = seqs_of(idx_c), lp[idx_c]
        tilt = torch.empty(len(idx_c), dtype=torch.float64)
        start = 0
        counts = (
            [len(seqs)]
            if len(targets) == 1
            else torch.bincount(cgroup[idx_c], None, len(targets)).tolist()
        )
        for g, n in enumerate(counts):
            if n:
                part = slice(start, start + n)
                scored = targets[g].evaluate_tilt(seqs[part], log_reference=lp_c[part])
                tilt[part] = scored.log_tilt
                extra[g] = extra[g] + scored.cost
                start += n
        scores[idx_c] = torch.where(torch.isneginf(tilt), tilt, lp_c + tilt)
    if potential is not None:
        if generator is None or len(targets) != 1:
            raise ValueError("expand_rows: a prefix potential needs one target and a generator")
        idx_u = (~complete & ~was_done).nonzero().flatten()
        if len(idx_u):
            psi, pcost = potential.log_potential(first.prompt, seqs_of(idx_u), generator)
            extra[0] = extra[0] + pcost
            scores[idx_u] = torch.where(torch.isneginf(psi), psi, lp[idx_u] + psi.to(torch.float64))
    # stable sorts: ties keep (beam, token) order; then (stably) by group
    by_score = torch.sort(-scores, stable=True).indices
    if len(targets) == 1:
        order = by_score[:width]
    else:
        ranked = by_score[torch.sort(cgroup[by_score], stable=True).indices]
        counts_t = torch.bincount(cgroup, None, len(targets))
        starts = torch.cumsum(counts_t, 0) - counts_t
        order = ranked[torch.arange(len(ranked)) - starts[cgroup[ranked]] < width]
    parents = parent_of[order]
    done_o = was_done[order]
    new = BeamRows(
        torch.cat([rows.tokens[parents], token_of[order].masked_fill(done_o, eos)[:, None]], 1),
        rows.lengths[parents].masked_fill(~done_o, t + 1),
        lp[order],
        scores[order],
        (complete | was_done)[order],
        cgroup[order],
    )
    return new, parents, extra


def advance_rows(
    session: DecodeSession,
    targets: Sequence[TiltedTarget],
    rows: BeamRows,
    width: int,
    potential: PrefixPotential | None = None,
    generator: torch.Generator | None = None,
) -> tuple[BeamRows, list[Cost]]:
    """One step of the searches whose *unfinished* hypotheses are the rows of ``session`` (in the
    order of ``rows``): read their next-token laws, :func:`expand_rows`, and leave in ``session``
    the kept unfinished hypotheses, each extended by its new token. Finished hypotheses never
    occupy a session row, so they cost no forward tokens. Returns the new rows and each group's
    reward and potential cost."""
    live = ~rows.finished
    log_p = session.logprobs().to(torch.float64)
    if not bool(live.all()):  # the session holds the unfinished rows only
        full = torch.zeros((int(live.numel()), int(log_p.shape[1])), dtype=torch.float64)
        full[live] = log_p
        log_p = full
    new, parents, extra = expand_rows(targets, rows, log_p, width, potential, generator)
    keep = ~new.finished
    if bool(keep.any()):
        session_row = torch.cumsum(live, 0) - 1
        session.select(session_row[parents[keep]])
        session.extend(new.tokens[keep, -1])
    return new, extra


def init(target: TiltedTarget, *, generator: torch.Generator, num_samples: int = 1) -> BeamState:
    """One empty beam."""
    validation.positive_int("num_samples", num_samples)
    session = open_session(target.policy, target.prompt, 1)
    return BeamState(target, session, empty_rows(1), num_samples, Cost())


def build_kernel(num_beams: int = 4, potential: PrefixPotential | None = None) -> Any:
    """One expansion of every live beam."""
    width = validation.positive_int("num_beams", num_beams)
    if potential is not None and not callable(getattr(potential, "log_potential", None)):
        raise TypeError(
            "potential must implement PrefixPotential.log_potential(prompt, prefixes, generator)"
        )

    def step(generator: torch.Generator, state: BeamState) -> tuple[BeamState, BeamInfo]:
        before = state.session.cost
        live_before = int((~state.rows.finished).sum())
        new, extra = advance_rows(
            state.session, [state.target], state.rows, width, potential, generator
        )
        after = state.session.cost
        step_cost = extra[0] + Cost(
            generated_tokens=live_before,
            forward_tokens=after.forward_tokens - before.forward_tokens,
            model_calls=after.model_calls - before.model_calls,
        )
        new_state = state._replace(rows=new, cost=state.cost + step_cost)
        return new_state, BeamInfo(step_cost, int(new.finished.sum()))

    return step


def done(state: BeamState) -> bool:
    return bool(state.rows.finished.all())


def top_hypotheses(rows: BeamRows, n: int, cost: Cost) -> SampleSet:
    """The first ``n`` rows as a result (best first), refused when fewer than ``n`` exist."""
    count = int(rows.tokens.shape[0])
    if count < n:
        raise ValueError(
            f"beam search finished with {count} hypotheses < num_samples={n}; raise num_beams"
        )
    scores = rows.scores[:n]
    # a hypothesis of zero target density (a violated constraint) is a failed draw
    failed = torch.isneginf(scores)
    return SampleSet(
        rows_to_seqs(rows.tokens[:n], rows.lengths[:n]),
        torch.where(failed, -math.inf, 0.0).to(torch.float64),
        cost,
        None,
        rows.log_reference[:n],
        None,
        {"scores": scores.tolist()},
    )


def result(state: BeamState) -> SampleSet:
    """The best ``num_samples`` finished hypotheses, best first."""
    return top_hypotheses(state.rows, state.num_samples, state.cost)


def sampler(
    target: TiltedTarget,
    *,
    num_samples: int = 1,
    num_beams: int = 4,
    potential: PrefixPotential | None = None,
) -> SamplingAlgorithm:
    """Beam search (see the module docstring); needs ``num_beams >= num_samples``."""
    validation.positive_int("num_samples", num_samples)
    validation.positive_int("num_beams", num_beams)
    if num_beams < num_samples:
        raise ValueError(f"num_beams must be >= num_samples={num_samples}, got {num_beams}")
    return SamplingAlgorithm(
        name="beam",
        kind="iid",
        init=lambda g: init(target, generator=g, num_samples=num_samples),
        step=build_kernel(num_beams, potential),
        done=done,
        result=result,
        params={
            "num_beams": num_beams,
            "potential": type(potential).__name__ if potential else None,
        },
        total_steps=target.max_new_tokens,
    )
