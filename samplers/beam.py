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
    One forward token per live beam, one reward call per complete candidate and term, potential
    calls for unfinished candidates.
"""

from __future__ import annotations

import math
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


class BeamState(NamedTuple):
    target: TiltedTarget
    session: DecodeSession
    beams: list[Seq]
    log_reference: Tensor
    scores: Tensor
    finished: Tensor
    num_samples: int
    cost: Cost


class BeamInfo(NamedTuple):
    cost: Cost
    num_finished: int


def init(target: TiltedTarget, *, generator: torch.Generator, num_samples: int = 1) -> BeamState:
    """One empty beam."""
    validation.positive_int("num_samples", num_samples)
    session = open_session(target.policy, target.prompt, 1)
    zero = torch.zeros(1, dtype=torch.float64)
    return BeamState(
        target,
        session,
        [()],
        zero,
        zero.clone(),
        torch.zeros(1, dtype=torch.bool),
        num_samples,
        Cost(),
    )


def build_kernel(num_beams: int = 4, potential: PrefixPotential | None = None) -> Any:
    """One expansion of every live beam."""
    width = validation.positive_int("num_beams", num_beams)
    if potential is not None and not callable(getattr(potential, "log_potential", None)):
        raise TypeError(
            "potential must implement PrefixPotential.log_potential(prompt, prefixes, generator)"
        )

    def step(generator: torch.Generator, state: BeamState) -> tuple[BeamState, BeamInfo]:
        target = state.target
        eos, cap = target.eos_id, target.max_new_tokens
        condition = target.truncation == "condition"
        session = state.session
        before = session.cost
        log_p = session.logprobs().to(torch.float64)
        t = session.length
        fin = state.finished
        vocab = int(log_p.shape[1])
        # candidates as a [beams, V] grid read in row-major (beam, token) order: every token of
        # positive probability of a live beam, and one entry (the EOS column) per finished beam
        lp_grid = state.log_reference[:, None] + log_p
        valid = (lp_grid > -math.inf) & ~fin[:, None]
        if condition and t == cap - 1:
            valid[:, torch.arange(vocab) != eos] = False
        if bool(fin.any()):
            valid[fin] = False
            valid[fin, eos] = True
            lp_grid[fin, eos] = state.log_reference[fin]
        flat = valid.flatten().nonzero().flatten()
        parent_of = flat // vocab
        token_of = flat % vocab
        lp = lp_grid.flatten()[flat]
        was_done = fin[parent_of]
        ends = token_of == eos
        if not condition and t + 1 == cap:
            ends = torch.ones_like(ends)
        complete = ends & ~was_done

        def seq_of(i: int) -> Seq:
            return (*state.beams[int(parent_of[i])], int(token_of[i]))

        scores = torch.empty(len(flat), dtype=torch.float64)
        scores[was_done] = state.scores[parent_of[was_done]]
        extra = Cost()
        idx_c = complete.nonzero().flatten().tolist()
        if idx_c:
            tilt = target.evaluate_tilt([seq_of(i) for i in idx_c], log_reference=lp[idx_c])
            extra = extra + tilt.cost
            scores[idx_c] = torch.where(
                torch.isneginf(tilt.log_tilt), tilt.log_tilt, lp[idx_c] + tilt.log_tilt
            )
        unfinished = ~complete & ~was_done
        if potential is None:
            scores[unfinished] = lp[unfinished]
        else:
            idx_u = unfinished.nonzero().flatten().tolist()
            if idx_u:
                psi, pcost = potential.log_potential(
                    target.prompt, [seq_of(i) for i in idx_u], generator
                )
                extra = extra + pcost
                scores[idx_u] = torch.where(
                    torch.isneginf(psi), psi, lp[idx_u] + psi.to(torch.float64)
                )
        # stable sort: ties keep (beam, token) order
        order = torch.sort(-scores, stable=True).indices[:width]
        keep = order.tolist()
        parents = parent_of[order]
        tokens = torch.where(was_done[order], torch.full_like(parents, eos), token_of[order])
        beams = [state.beams[int(parent_of[i])] if bool(was_done[i]) else seq_of(i) for i in keep]
        live_before = int((~state.finished).sum())
        session.select(parents)
        finished = (complete | was_done)[order]
        if not bool(finished.all()):
            session.extend(tokens)
        after = session.cost
        step_cost = extra + Cost(
            generated_tokens=live_before,
            forward_tokens=after.forward_tokens - before.forward_tokens,
            model_calls=after.model_calls - before.model_calls,
        )
        new = state._replace(
            beams=beams,
            log_reference=lp[order],
            scores=scores[order],
            finished=finished,
            cost=state.cost + step_cost,
        )
        return new, BeamInfo(step_cost, int(finished.sum()))

    return step


def done(state: BeamState) -> bool:
    return bool(state.finished.all())


def result(state: BeamState) -> SampleSet:
    """The best ``num_samples`` finished hypotheses, best first."""
    n = state.num_samples
    if len(state.beams) < n:
        raise ValueError(
            f"beam search finished with {len(state.beams)} hypotheses < num_samples={n}; "
            "raise num_beams"
        )
    scores = state.scores[:n]
    # a hypothesis of zero target density (a violated constraint) is a failed draw
    failed = torch.isneginf(torch.as_tensor(scores, dtype=torch.float64))
    return SampleSet(
        state.beams[:n],
        torch.where(failed, -math.inf, 0.0).to(torch.float64),
        state.cost,
        None,
        state.log_reference[:n],
        None,
        {"scores": scores.tolist()},
    )


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
