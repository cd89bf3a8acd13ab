r"""The measurements of ``specs/smc.md`` §14 and §9 on the spec toy (:func:`spec_toy`,
:func:`modes_table`, :func:`sandwich_table`; ``python -m tiltsample.theory.smc_exact`` prints
them; the numbers are in ``docs/samplers/smc.md``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample.results import SampleSet
from tiltsample.target import TiltedTarget
from tiltsample.theory.enumerate import ExactDistribution, exact_distribution
from tiltsample.theory.smc_exact.evidence import one_particle_bounds
from tiltsample.types import Seq

__all__ = ["main", "modes_table", "sandwich_table", "spec_toy"]


class _CountReward:
    """``r(x) = #{token 1 in x}`` (the tilt ``1.5 · #token`` of ``specs/smc.md`` §14)."""

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        return torch.tensor([float(x.count(1)) for x in xs], dtype=torch.float64)


def spec_toy(seed: int = 0) -> TiltedTarget:
    """The toy of ``specs/smc.md`` §14: 3 content tokens, length 5 (243 responses, EOS impossible),
    a random context-dependent policy and the tilt ``r/lam = 1.5 · #{token 1}``."""
    from tiltsample.targets.tabular import random_tabular

    policy = random_tabular(torch.Generator().manual_seed(seed), 4, 5, eos_prob=0.0)
    return TiltedTarget(policy, _CountReward(), 1 / 1.5, (), 5)


def modes_table(
    target: TiltedTarget, ns: tuple[int, ...] = (8, 32, 128, 512), runs: int = 400
) -> list[dict[str, float | int | str]]:
    """``specs/smc.md`` §14: prefix / lookahead (exact twists) / opt (exact twists + optimal
    proposal) SMC with adaptive systematic resampling, ``runs`` runs per cell.

    The particles of a run are weighted and, after resampling, duplicated: not ``N`` i.i.d.
    draws, so each TV column comes with two references, both the exact expected TV
    (:func:`~tiltsample.theory.distances.expected_tv_iid`) of an i.i.d. sample of ``pi``: of size
    ``N`` (``R·N`` for the histogram pooled over the ``R`` runs), what exact draws would give, and
    of size ESS (**the ESS floor**), ESS the Kong ESS ``(Σw)²/Σw²`` of a run's final weights
    (column ``"ESS"``: the mean over runs; per run for ``"TV(run)"``, summed over runs for the
    pooled histogram). Neither is a bound for weighted particles: Kong's ESS summarises weight
    degeneracy, not the per-response variance of a weighted histogram, and counts resampled
    copies as distinct. A TV far above both is bias.
    """
    from tiltsample.samplers import smc
    from tiltsample.theory.energies import ExactPotential

    exact = exact_distribution(target)
    pot = ExactPotential(target)
    modes: dict[str, dict[str, Any]] = {
        "prefix": {},
        "lookahead": {"twist": "lookahead", "potential": pot},
        "opt": {"twist": "lookahead", "potential": pot, "proposal": "optimal"},
    }
    rows: list[dict[str, float | int | str]] = []
    for mode, params in modes.items():
        for n in ns:
            state = smc.run(
                target,
                num_particles=n,
                num_runs=runs,
                generator=torch.Generator().manual_seed(n),
                **params,
            )
            rows.append(
                _modes_row(mode, n, runs, exact, smc.log_evidence_runs(state), smc.result(state))
            )
    return rows


def _modes_row(
    mode: str, n: int, runs: int, exact: ExactDistribution, log_z: Tensor, out: SampleSet
) -> dict[str, float | int | str]:
    """One row of :func:`modes_table` from ``runs`` pooled runs of ``n`` particles."""
    from tiltsample.theory.distances import expected_tv_iid, tv

    w = (out.normalized_weights() * runs).tolist()
    per_run, ess, ess_floor = [], [], []
    for r in range(runs):
        law: dict[Seq, float] = {}
        for i in range(r * n, (r + 1) * n):
            law[out.sequences[i]] = law.get(out.sequences[i], 0.0) + w[i]
        per_run.append(tv(law, exact))
        lw = out.log_weights[r * n : (r + 1) * n]
        log_ess = 2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)
        ess.append(float(torch.exp(log_ess)))
        ess_floor.append(expected_tv_iid(exact, max(1, round(ess[-1]))))
    return {
        "mode": mode,
        "N": n,
        "E[Z]/Z": float(torch.exp(log_z - exact.log_z).mean()),
        "E[logZ]-logZ": float(log_z.mean()) - exact.log_z,
        "sd(logZ)": float(log_z.std()),
        "ESS": sum(ess) / runs,
        "TV(run)": sum(per_run) / runs,
        "iid floor(run)": expected_tv_iid(exact, n),
        "ESS floor(run)": sum(ess_floor) / runs,
        "TV(mean hist)": tv(out.empirical(), exact),
        "iid floor(hist)": expected_tv_iid(exact, runs * n),
        "ESS floor(hist)": expected_tv_iid(exact, max(1, round(sum(ess)))),
    }


def sandwich_table(
    target: TiltedTarget, ns: tuple[int, ...] = (1, 4, 16, 64, 256)
) -> list[dict[str, float | int]]:
    """``specs/smc.md`` §9: ``E[log Ẑ_SMC] - log Z`` and ``E_pi[log Ẑ_CSMC] - log Z`` (prefix
    twist, multinomial resampling at every step; 2,000 runs up to ``N = 16``, 500 beyond)."""
    from tiltsample.samplers import csmc

    exact = exact_distribution(target)
    rows: list[dict[str, float | int]] = []
    for n in ns:
        r = 2000 if n <= 16 else 500
        lo = csmc.log_z_lower(
            target,
            n,
            generator=torch.Generator().manual_seed(n),
            num_runs=r,
            ess_threshold=1.0,
            resampling="multinomial",
        )
        refs = exact.sample(r, torch.Generator().manual_seed(1000 + n))
        up = csmc.log_z_upper(
            target, n, refs, generator=torch.Generator().manual_seed(n), ess_threshold=1.0
        )
        rows.append(
            {
                "N": n,
                "lower": lo.mean - exact.log_z,
                "lower_se": lo.stderr,
                "upper": up.mean - exact.log_z,
                "upper_se": up.stderr,
                "gap": up.mean - lo.mean,
            }
        )
    return rows


def main() -> None:  # pragma: no cover - the documentation's measurement
    """Print the measurements of ``docs/samplers/smc.md``
    (``python -m tiltsample.theory.smc_exact``)."""
    torch.set_num_threads(1)
    target = spec_toy()
    exact = exact_distribution(target)
    print(f"spec toy: |support| = {len(exact)}, log Z = {exact.log_z:.3f}")
    for row in modes_table(target):
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    for srow in sandwich_table(target):
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in srow.values()))
    b = one_particle_bounds(target)
    print(f"exact N = 1: lower {b.lower - b.log_z:+.4f}, upper {b.upper - b.log_z:+.4f}")
