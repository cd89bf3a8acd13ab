"""SMC state: the particles of many independent runs in one decode session (:class:`SMCState`),
what a step reports (:class:`SMCInfo`), the mutable per-row arrays of a step
(:class:`ParticleRows`), the per-target sections of a step (:class:`Section`), and
``init``/``done``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.diffusion import is_masked_diffusion
from tiltsample.policy import DecodeSession, open_session
from tiltsample.row_generators import RowGenerators
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = [
    "ParticleRows",
    "SMCInfo",
    "SMCState",
    "Section",
    "blank_state",
    "done",
    "init",
    "reference_paths",
    "sections",
    "with_rows",
]


class SMCState(NamedTuple):
    """Particles of ``num_groups`` independent runs of ``num_particles`` each, in one session.

    Row ``g * num_particles + i`` is particle ``i`` of run ``g``. Every row holds its whole path
    (the session is reordered at each resampling), so no ancestry needs tracing back.
    """

    target: TiltedTarget
    num_particles: int
    num_groups: int
    session: DecodeSession
    finished: Tensor
    """``[M]`` bool: the particle is a complete response."""
    log_p: Tensor
    """``[M]`` ``log p_ref`` of the particle (temperature 1; a forced EOS included)."""
    tok_log_p: Tensor
    """``[M, t]`` per-token ``log p_ref`` (0 on padding)."""
    tok_log_q_move: Tensor
    """``[M, t]`` per-token log-prob under the moves' EOS-free proposal ``q'`` (0 on EOS, padding
    and a forced EOS)."""
    log_psi: Tensor
    """``[M]`` stored log-twist of the current prefix (the true log-tilt once finished)."""
    pending: Tensor | None
    """``[M, V]`` log-twists of the children (optimal proposal: drawn, not yet used)."""
    pending_reward: Tensor | None
    """``[M, V]`` primary reward of complete children (NaN elsewhere)."""
    log_next: Tensor | None
    """``[M]`` ``log sum_v p(v|s) psi(s+v)``: the potential of the fully adapted target."""
    reward: Tensor
    """``[M]`` primary reward of finished particles (NaN until finished)."""
    log_w: Tensor
    """``[M]`` current-epoch log-weights."""
    log_z: Tensor
    """``[G]`` accumulated ``log Ẑ`` of completed epochs (convention A)."""
    reference: Tensor | None
    """``[G, L]`` conditional-SMC reference paths (EOS-padded), particle 0 of each run."""
    steps: int
    resample_count: Tensor
    """``[G]`` number of resampling events per run."""
    ess_history: tuple[Tensor, ...]
    """``[G]`` ESS before each resampling decision (NaN for a run with nothing left to do)."""
    moves_proposed: int
    moves_accepted: int
    cost: Cost
    tok_entropy: Tensor | None = None
    """``[M, t]`` Shannon entropy of ``p_ref(. | x_<s)`` at every position (0 on padding): the
    entropy-jump cut law of the moves."""
    targets: tuple[TiltedTarget, ...] | None = None
    """Several targets in one state (:func:`~tiltsample.samplers.smc.many.sample_many`): target
    ``s`` owns the ``num_groups / len(targets)`` consecutive runs of section ``s`` (its rows
    follow from the run layout); ``target`` is then ``targets[0]``, read only for what the
    targets share (policy, EOS, cap, truncation). ``None``: every run samples ``target``."""
    generators: RowGenerators | None = None
    """With ``targets``: one generator per section (rows grouped by section); every draw of a
    section comes from its generator, and the step's ``generator`` argument is not used."""


class Section(NamedTuple):
    """The part of a state that one target owns in a step: its target, the generator of its
    draws, its runs and its rows (slices of the state's run and row axes)."""

    target: TiltedTarget
    generator: torch.Generator
    runs: slice
    rows: slice


def sections(state: SMCState, generator: torch.Generator | None) -> list[Section]:
    """The sections of ``state``: one per target of ``state.targets`` with its own generator, or
    a single section (every run, ``state.target``, ``generator``) for a one-target state."""
    n, groups = state.num_particles, state.num_groups
    if state.targets is None:
        if generator is None:
            raise ValueError("an SMC step of a one-target state needs a generator")
        return [Section(state.target, generator, slice(0, groups), slice(0, groups * n))]
    if state.generators is None or len(state.generators.generators) != len(state.targets):
        raise ValueError("a state with several targets needs one generator per target")
    per = groups // len(state.targets)
    return [
        Section(t, gen, slice(s * per, (s + 1) * per), slice(s * per * n, (s + 1) * per * n))
        for s, (t, gen) in enumerate(zip(state.targets, state.generators.generators, strict=True))
    ]


class SMCInfo(NamedTuple):
    """What one block step reports."""

    cost: Cost
    ess: Tensor
    """``[G]`` ESS at the resampling decision (NaN when the run had finished)."""
    resampled: Tensor
    """``[G]`` bool."""
    section_costs: tuple[Cost, ...] = ()
    """The cost each section (:func:`sections`) spent by itself: its generated tokens, its twist
    and reward calls; the shared session's model calls and forward tokens are in ``cost`` only."""


def reference_paths(target: TiltedTarget, reference: Sequence[Seq], groups: int) -> Tensor:
    """``[G, L]`` the conditional-SMC reference paths, one complete response per run, padded with
    EOS (``ValueError`` for an invalid path or a wrong count)."""
    refs = target.check_sequences(list(reference), name="reference")
    if len(refs) != groups:
        raise ValueError(f"reference must hold one path per run ({groups}), got {len(refs)}")
    out = torch.full((groups, target.max_new_tokens), target.eos_id, dtype=torch.long)
    for g, x in enumerate(refs):
        if x:
            out[g, : len(x)] = torch.tensor(x, dtype=torch.long)
    return out


def init(
    target: TiltedTarget,
    *,
    generator: torch.Generator,
    num_particles: int,
    num_groups: int = 1,
    reference: Sequence[Seq] | None = None,
) -> SMCState:
    """Empty particles (``psi_0 = 1``, weights 1) for ``num_groups`` runs of ``num_particles``.

    ``reference`` (one complete response per run) makes each run a conditional SMC whose particle 0
    follows the reference path (:mod:`tiltsample.samplers.smc.csmc`).
    """
    if not isinstance(target, TiltedTarget):
        raise TypeError(f"target must be a TiltedTarget, got {type(target).__name__}")
    if is_masked_diffusion(target.policy):
        raise TypeError(
            "smc decodes autoregressively; for a masked-diffusion policy use "
            "tiltsample.samplers.smc.fk_steering"
        )
    validation.generator("generator", generator)
    n = validation.positive_int("num_particles", num_particles)
    g = validation.positive_int("num_groups", num_groups)
    ref = None if reference is None else reference_paths(target, reference, g)
    session = open_session(target.policy, target.prompt, n * g)
    return blank_state(target, session, n, g, ref)


def blank_state(
    target: TiltedTarget,
    session: DecodeSession,
    num_particles: int,
    num_groups: int,
    reference: Tensor | None = None,
) -> SMCState:
    """The state of :func:`init` on an open ``session`` of ``num_particles * num_groups`` empty
    rows (``reference``: the ``[G, L]`` paths of :func:`reference_paths`, or ``None``)."""
    n, g, ref = num_particles, num_groups, reference
    m = n * g
    f64 = torch.float64
    return SMCState(
        target=target,
        num_particles=n,
        num_groups=g,
        session=session,
        finished=torch.zeros(m, dtype=torch.bool),
        log_p=torch.zeros(m, dtype=f64),
        tok_log_p=torch.zeros((m, 0), dtype=f64),
        tok_log_q_move=torch.zeros((m, 0), dtype=f64),
        log_psi=torch.zeros(m, dtype=f64),
        pending=None,
        pending_reward=None,
        log_next=None,
        reward=torch.full((m,), math.nan, dtype=f64),
        log_w=torch.zeros(m, dtype=f64),
        log_z=torch.zeros(g, dtype=f64),
        reference=ref,
        steps=0,
        resample_count=torch.zeros(g, dtype=torch.long),
        ess_history=(),
        moves_proposed=0,
        moves_accepted=0,
        cost=Cost(),
        tok_entropy=torch.zeros((m, 0), dtype=f64),
    )


def done(state: SMCState) -> bool:
    """True when every particle of every run is a complete response."""
    return bool(state.finished.all())


class ParticleRows:
    """Mutable per-row arrays of a step (the state is immutable): copies of the state's per-particle
    tensors that a step, its moves and its resampling update in place (:meth:`select` reorders
    them by ancestor), written back by :func:`with_rows` or a new :class:`SMCState`."""

    def __init__(self, state: SMCState) -> None:
        self.finished = state.finished.clone()
        self.log_p = state.log_p.clone()
        self.tok_log_p = state.tok_log_p
        self.tok_log_q_move = state.tok_log_q_move
        self.tok_entropy = (
            state.tok_entropy
            if state.tok_entropy is not None
            else torch.zeros_like(state.tok_log_p)
        )
        self.log_psi = state.log_psi.clone()
        self.pending = state.pending
        self.pending_reward = state.pending_reward
        self.log_next = state.log_next
        self.reward = state.reward.clone()
        self.log_w = state.log_w.clone()

    def select(self, idx: Tensor) -> None:
        """Reorder (resample) every per-row array by the row indices ``idx``."""
        for name in (
            "finished",
            "log_p",
            "tok_log_p",
            "tok_log_q_move",
            "tok_entropy",
            "log_psi",
            "pending",
            "pending_reward",
            "log_next",
            "reward",
            "log_w",
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[idx])


def with_rows(
    state: SMCState, rows: ParticleRows, cost: Cost, accepted: int, proposed: int
) -> SMCState:
    """``state`` with the per-row arrays of ``rows``, ``accepted`` of ``proposed`` more moves and
    ``cost`` more spent."""
    return state._replace(
        finished=rows.finished,
        log_p=rows.log_p,
        tok_log_p=rows.tok_log_p,
        tok_log_q_move=rows.tok_log_q_move,
        tok_entropy=rows.tok_entropy,
        log_psi=rows.log_psi,
        pending=rows.pending,
        pending_reward=rows.pending_reward,
        log_next=rows.log_next,
        reward=rows.reward,
        log_w=rows.log_w,
        moves_proposed=state.moves_proposed + proposed,
        moves_accepted=state.moves_accepted + accepted,
        cost=state.cost + cost,
    )
