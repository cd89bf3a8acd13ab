"""Names users type: registered samplers and toy targets.

The core imports no sampler or target module: an entry holds a ``"module:attribute"`` path and is
imported on first use, so ``import tiltsample`` stays light and the layering stays one-way.
Sampler names are kebab-case; see ``docs/adding_a_sampler.md`` to add one.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: Kinds of reference policy a sampler accepts (the conformance suite builds matching toys).
TARGET_KINDS = ("autoregressive", "masked-diffusion")


@dataclass(frozen=True)
class Entry:
    """A registered sampler or target.

    ``example`` holds small, fast parameters and ``example_num_samples`` a draw count: the
    conformance suite (:func:`tiltsample.testing.conformance.check_registered`) runs every
    registered sampler with them, so registering a sampler is what puts it under test.
    ``target_kind`` says which policies it accepts; ``targets_pi=False`` marks a sampler whose
    draws are not aimed at the tilted target (``ancestral`` samples ``p_ref``).
    """

    name: str
    path: str
    summary: str
    kind: str = ""
    example: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    example_num_samples: int = 4
    target_kind: str = "autoregressive"
    targets_pi: bool = True

    def load(self) -> Callable[..., Any]:
        """Import and return the registered factory."""
        module, _, attr = self.path.partition(":")
        obj: Callable[..., Any] = getattr(importlib.import_module(module), attr)
        return obj


_SAMPLERS: dict[str, Entry] = {}
_TARGETS: dict[str, Entry] = {}


def _check_name(name: str) -> None:
    if not name or name != name.lower() or " " in name or "_" in name:
        raise ValueError(f"registry names are kebab-case (lower case, '-'), got {name!r}")


def register_sampler(
    name: str,
    path: str,
    summary: str,
    kind: str = "iid",
    *,
    example: Mapping[str, Any] | None = None,
    example_num_samples: int = 4,
    target_kind: str = "autoregressive",
    targets_pi: bool = True,
) -> None:
    """Register ``path`` (``"module:sampler"``) under ``name``; re-registering replaces it.

    Parameters
    ----------
    name, path, summary
        Kebab-case name, ``"package.module:factory"`` and a one-line description.
    kind
        ``"iid"`` (independent, possibly weighted draws) or ``"markov"`` (chains).
    example, example_num_samples
        Small parameters and a draw count the conformance suite runs the sampler with.
    target_kind
        ``"autoregressive"`` or ``"masked-diffusion"``: the policies it accepts.
    targets_pi
        False for a sampler whose draws are not aimed at the tilted target (``ancestral``).
    """
    _check_name(name)
    if ":" not in path:
        raise ValueError(f"path must look like 'package.module:attribute', got {path!r}")
    if kind not in ("iid", "markov"):
        raise ValueError(f"kind must be 'iid' or 'markov', got {kind!r}")
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"target_kind must be one of {list(TARGET_KINDS)}, got {target_kind!r}")
    if not isinstance(example_num_samples, int) or example_num_samples < 1:
        raise ValueError(f"example_num_samples must be an int >= 1, got {example_num_samples!r}")
    _SAMPLERS[name] = Entry(
        name,
        path,
        summary,
        kind,
        MappingProxyType(dict(example or {})),
        example_num_samples,
        target_kind,
        targets_pi,
    )


def unregister_sampler(name: str) -> None:
    """Remove a registered sampler (``ValueError`` naming the closest match if unknown)."""
    del _SAMPLERS[sampler_entry(name).name]


def register_target(name: str, path: str, summary: str) -> None:
    """Register a toy-target factory ``(seed: int, **options) -> TiltedTarget``."""
    _check_name(name)
    _TARGETS[name] = Entry(name, path, summary, "target")


def _lookup(table: dict[str, Entry], what: str, name: str) -> Entry:
    if not isinstance(name, str):
        raise TypeError(f"{what} name must be a str, got {type(name).__name__}")
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint} Known: {sorted(table)}")
    return table[name]


def sampler_entry(name: str) -> Entry:
    """The entry of a registered sampler (``ValueError`` naming the closest match otherwise)."""
    return _lookup(_SAMPLERS, "sampler", name)


def target_entry(name: str) -> Entry:
    """The entry of a registered toy target."""
    return _lookup(_TARGETS, "target", name)


def samplers() -> list[Entry]:
    """All registered samplers, sorted by name."""
    return [_SAMPLERS[k] for k in sorted(_SAMPLERS)]


def targets() -> list[Entry]:
    """All registered toy targets, sorted by name."""
    return [_TARGETS[k] for k in sorted(_TARGETS)]


_S = "tiltsample.samplers"
register_sampler(
    "ancestral",
    f"{_S}.ancestral:sampler",
    "i.i.d. draws from p_ref (optionally at a temperature; "
    "low temperature is NOT the power distribution)",
    example={"temperature": 0.7},
    targets_pi=False,
)
register_sampler("exact", f"{_S}.exact:sampler", "exact i.i.d. draws from an enumerable target")
register_sampler(
    "best-of-n",
    f"{_S}.best_of_n:sampler",
    "best-of-N: one SIR draw among N candidates (default, selection='softmax') or the argmax "
    "of the tilt (selection='argmax')",
    example={"num_candidates": 3},
)
register_sampler(
    "beam",
    f"{_S}.beam:sampler",
    "beam search on prefix log-density (+ optional prefix potential)",
    example={"num_beams": 3},
    example_num_samples=2,
)
register_sampler(
    "importance",
    f"{_S}._template:sampler",
    "self-normalised importance sampling from p_ref (the copy-me template)",
    example={"temperature": 1.3},
)
register_sampler(
    "imh",
    f"{_S}.imh:sampler",
    "independence Metropolis–Hastings with whole-sequence proposals from p_ref",
    kind="markov",
    example={"num_steps": 4},
)
register_sampler(
    "ets",
    f"{_S}.ets:sampler",
    "ETS: energy-guided SIR per block with K-rollout energies (ETS-IS via proposal=); "
    "autoregressive and masked diffusion",
    example={"num_candidates": 3, "num_rollouts": 2, "block_size": 1},
)

_T = "tiltsample.targets.toys"
register_target(
    "tabular",
    f"{_T}:tabular_toy",
    "random tabular policy (V=4, L=6) × binary 'contains token 1' reward",
)
register_target(
    "tabular-graded",
    f"{_T}:graded_toy",
    "random tabular policy × graded reward (fraction of token 1)",
)
register_target(
    "power-example",
    f"{_T}:power_example",
    "the two-token power-vs-temperature example of specs/mcmc.md §1 (alpha=4)",
)
register_target(
    "decision-trace",
    f"{_T}:decision_trace_toy",
    "stylized reasoning trace: few decisions among filler, power target alpha=4",
)
register_target(
    "masked-diffusion",
    "tiltsample.targets.masked_diffusion:masked_diffusion_toy",
    "masked-diffusion toy: random joint over V^L (V=3, L=4), exact conditionals, unmasking order",
)
register_sampler(
    "smc",
    f"{_S}.smc:sampler",
    "SMC: token/block steps, prefix/lookahead/learned twists, tempered or optimal proposal, "
    "adaptive resampling, resample-move, log_evidence",
    example={"num_moves": 1, "block_size": 2},
)
register_sampler(
    "csmc",
    f"{_S}.smc.csmc:sampler",
    "conditional SMC given reference paths (default: exact draws on toys); E[log Z_CSMC] >= log Z",
)
register_sampler(
    "particle-gibbs",
    f"{_S}.smc.particle_gibbs:particle_gibbs_sampler",
    "particle Gibbs: the CSMC kernel iterated (Markov)",
    kind="markov",
    example={"num_steps": 3, "num_particles": 4},
)
register_sampler(
    "power-smc",
    f"{_S}.smc.power_smc:sampler",
    "Power-SMC for p_ref^alpha: tau=1/alpha proposal, prefix-only weights, optional alpha ramp",
    example={"alpha_ramp": 2},
)
register_sampler(
    "fk-steering",
    f"{_S}.smc.fk_steering:sampler",
    "FK steering of masked-diffusion LMs: particles resampled by intermediate-reward potentials",
    example={"num_samples_phi": 2},
    target_kind="masked-diffusion",
)
register_sampler(
    "tri-tsmc",
    f"{_S}.smc.tri_tsmc:sampler",
    "TRI-TSMC: learn a twist (trust-region reweighting + projection), then twisted SMC; toys",
    example={"num_iterations": 1, "num_paths": 16},
)
register_sampler(
    "mh",
    f"{_S}.mh:sampler",
    "suffix-resampling Metropolis–Hastings, uniform or entropy-jump cuts, exact for variable "
    "lengths",
    kind="markov",
    example={"num_steps": 4, "proposal_temperature": 0.7},
)
register_sampler(
    "power",
    f"{_S}.mh.power:sampler",
    "power sampling (Karan & Du): MH on p^alpha, uniform cut, proposal at 1/alpha; "
    "block_size= for the stage schedule",
    kind="markov",
    example={"alpha": 2.0, "num_steps": 4},
)
register_sampler(
    "entropy-cut",
    f"{_S}.mh.entropy_cut:sampler",
    "entropy-cut MH (Zhou, Mehrotra & Liu): power sampling with cuts at entropy jumps",
    kind="markov",
    example={"alpha": 2.0, "num_steps": 4, "cut_power": 2.0},
)
register_sampler(
    "qalign",
    f"{_S}.mh.qalign:sampler",
    "QAlign: uniform-cut suffix MH with p_ref proposals on a reward-tilted target",
    kind="markov",
    example={"num_steps": 4},
)
