"""ETS with continuous batching (``batching="continuous"``, tiltsample.samplers.ets.continuous).

Seed-exact checks first: the output of every chain is a function of its own seed (any row budget
gives the same draws, selections and generated tokens), the paper's token-count formula holds
exactly, inversion sampling never draws a zero-probability token and the uniform streams do not
depend on how they are chunked. Then seeded statistical checks of the output law against the
exact ETS law of :mod:`tiltsample.theory.ets_laws` (chi-square and the Rao–Blackwellised TV, with
tolerances from the sample size), and bad input.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from test_ets import ar_target, chi2_pvalue, dlm_target, perturbed, run

from tiltsample.samplers import ets
from tiltsample.samplers.ets.chains import ChainStream, inverse_cdf
from tiltsample.testing import check_sampler
from tiltsample.theory import ExactPotential, tv
from tiltsample.theory.ets_laws import ets_law, rao_blackwell_law

torch.set_num_threads(1)
CONT: dict[str, Any] = {"batching": "continuous"}


# ----------------------------------------------------------------------------- building blocks
def test_inverse_cdf_draws_only_positive_mass_and_matches_the_law() -> None:
    log_p = torch.log(torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]], dtype=torch.float64))
    u = torch.linspace(0, 1, 10001, dtype=torch.float64)[:-1]
    idx = inverse_cdf(log_p.expand(len(u), -1), u)
    counts = torch.bincount(idx, minlength=6).double() / len(u)
    assert counts[[0, 2, 5]].sum() == 0  # zero-probability tokens are never drawn
    assert torch.allclose(counts, torch.exp(log_p[0]), atol=2e-4)
    # u just below 1 (a rounding overflow) falls back to the last positive index
    assert int(inverse_cdf(log_p, torch.tensor([1.0 - 1e-17], dtype=torch.float64))[0]) == 4


def test_chain_stream_does_not_depend_on_chunking() -> None:
    a, b = ChainStream(7, chunk=3), ChainStream(7, chunk=256)
    sizes = [1, 5, 2, 9, 1, 1, 30]
    got_a = torch.cat([a.take(n) for n in sizes])
    got_b = torch.cat([b.take(n) for n in sizes])
    assert torch.equal(got_a, got_b)
    assert bool(((got_a >= 0) & (got_a < 1)).all())


# ----------------------------------------------------------------------------- seed-exact
@pytest.mark.parametrize("block", [1, 2])
def test_the_schedule_does_not_change_any_chain(block: int) -> None:
    """Row budgets of one chain (no overlap) to all chains give identical results per chain."""
    target = ar_target(3, vocab=3, length=4, lam=0.3)
    params = {"num_candidates": 3, "num_rollouts": 2, "block_size": block, **CONT}
    outs = [run(target, 12, seed=5, batch_size=b, **params) for b in (1, 3, 12)]
    for out in outs[1:]:
        assert out.sequences == outs[0].sequences
        assert out.cost.generated_tokens == outs[0].cost.generated_tokens
        assert out.cost.reward_calls == outs[0].cost.reward_calls
        assert out.meta["rollouts"] == outs[0].meta["rollouts"]
        for s1, s0 in zip(out.meta["selections"], outs[0].meta["selections"], strict=True):
            assert [(s.candidates, s.chosen) for s in s1] == [(s.candidates, s.chosen) for s in s0]
            for x, y in zip(s1, s0, strict=True):
                assert torch.equal(x.probs, y.probs)
    # a budget of one chain runs one chain at a time; a larger budget overlaps their phases
    assert outs[2].meta["peak_rows"] > outs[0].meta["peak_rows"]
    assert outs[2].cost.model_calls < outs[0].cost.model_calls


def test_conformance() -> None:
    target = ar_target(2, vocab=3, length=4)
    check_sampler(
        ets.sampler(target, num_samples=5, num_candidates=3, num_rollouts=2, block_size=1, **CONT),
        target,
        num_samples=5,
    )
    cond = ar_target(4, vocab=3, length=3, truncation="condition")
    check_sampler(
        ets.sampler(
            cond,
            num_samples=4,
            num_candidates=2,
            num_rollouts=3,
            block_size=2,
            temperature=0.8,
            proposal_temperature=1.3,
            batch_size=1,
            **CONT,
        ),
        cond,
        num_samples=4,
    )


def test_self_consistency_is_reproducible() -> None:
    target = ar_target(6, vocab=4, length=4)
    params = {
        "num_candidates": 3,
        "num_rollouts": 2,
        "block_size": 2,
        "reward_mode": "self-consistency",
        "answer": "last-token",
        **CONT,
    }
    a = run(target, 6, seed=3, batch_size=2, **params)
    b = run(target, 6, seed=3, batch_size=6, **params)
    assert a.sequences == b.sequences
    assert a.meta["answer_caches"] == b.meta["answer_caches"]
    assert all(c["total"] > 0 for c in a.meta["answer_caches"])


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_generated_tokens_follow_the_paper_formula_exactly(block: int) -> None:
    target = ar_target(8, length=8, eos_prob=0.0)
    m, k, n = 3, 2, 4
    out = run(target, n, seed=0, num_candidates=m, num_rollouts=k, block_size=block, **CONT)
    steps = 8 // block
    assert out.cost.generated_tokens == n * m * (1 + k * (steps - 1) / 2) * 8
    assert out.meta["candidate_tokens"] == n * m * 8
    assert out.meta["rollouts"] == n * m * k * (steps - 1)
    assert out.cost.reward_calls == n * m * (1 + k * (steps - 1))
    # no prefix is re-encoded: beyond the generated tokens and one prompt prefill, at most one
    # token per finished row (a rollout row pushes its candidate's last token; a finished row
    # without EOS pushes its last token once before it leaves the batch)
    rows = n * m * steps + out.meta["rollouts"]
    assert out.cost.forward_tokens <= out.cost.generated_tokens + 1 + rows


@pytest.mark.parametrize("truncation", ["stop", "condition"])
def test_ragged_hf_session_gives_exact_log_probabilities(truncation: str) -> None:
    """On a KV-cached HF session, rows of different chains at different phases share each call:
    the log-probabilities the sampler accumulated equal full recomputes, and the row budget does
    not change the draws."""
    from test_hf import _target, tiny_model

    from tiltsample.targets.hf import HFPolicy

    policy = HFPolicy(tiny_model())
    target = _target(policy, truncation)
    params = {"num_candidates": 3, "num_rollouts": 2, "block_size": 2, **CONT}
    wide = run(target, 6, seed=2, batch_size=3, **params)
    narrow = run(target, 6, seed=2, batch_size=1, **params)
    assert wide.sequences == narrow.sequences
    assert wide.meta["peak_rows"] > narrow.meta["peak_rows"]
    assert wide.log_reference is not None
    recomputed = policy.sequence_logprob(target.prompt, wide.sequences)
    assert torch.allclose(wide.log_reference, recomputed, atol=1e-9)
    assert wide.cost.forward_tokens <= wide.cost.generated_tokens + 2 + wide.meta["rollouts"]


# ----------------------------------------------------------------------------- laws (seeded)
N_LAW = 2000
LAW_CASES: list[tuple[str, dict[str, Any]]] = [
    ("K=2, B=2", {"num_candidates": 3, "num_rollouts": 2, "block_size": 2}),
    (
        "condition + temperatures",
        {
            "num_candidates": 3,
            "num_rollouts": 2,
            "block_size": 1,
            "temperature": 0.7,
            "truncation": "condition",
        },
    ),
]


@pytest.mark.parametrize(("name", "case"), LAW_CASES, ids=[c[0] for c in LAW_CASES])
def test_continuous_law_matches_the_exact_ets_law(name: str, case: dict[str, Any]) -> None:
    params = dict(case)
    truncation = params.pop("truncation", "stop")
    target = ar_target(10, vocab=3, length=3, lam=0.3, truncation=truncation)
    exact = ets_law(target, **params).law
    out = run(target, N_LAW, seed=12, batch_size=25, **params, **CONT)
    assert chi2_pvalue(out.sequences, exact) > 1e-3
    rb = rao_blackwell_law(out, target)
    floor = sum(math.sqrt(p * (1 - p) / (2 * math.pi * N_LAW)) for p in exact.values())
    assert tv(rb, exact) < 2.5 * floor


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_batching_parameter() -> None:
    target = ar_target(1)
    with pytest.raises(ValueError, match="batching"):
        ets.sampler(target, num_samples=2, batching="eager")
    with pytest.raises(ValueError, match="batching"):
        ets.sampler(target, num_samples=2, proposal=perturbed(target.policy, 1), **CONT)
    with pytest.raises(ValueError, match="batching"):
        ets.sampler(target, num_samples=2, potential=ExactPotential(target), **CONT)
    with pytest.raises(ValueError, match="batching"):
        ets.sampler(dlm_target(1), num_samples=2, **CONT)
