"""Conformance checks shared by the package's own tests and users' tests.

:func:`check_policy`
    The :class:`~tiltsample.policy.ReferencePolicy` contract: normalised next-token laws,
    batched = unbatched, ``sequence_logprob`` = the sum of next-token log-probs, and the
    :class:`~tiltsample.policy.DecodeSession` contract (``extend``/``truncate``/``select``/``fork``
    agree with a recompute), and the optional capabilities through their helpers: ragged rows
    (``truncate_rows``), ``extend_and_score`` and several prompts in one session
    (``open_session_multi``).
:func:`check_sampler`
    The sampler contract: valid responses under the target's length convention, no NaN, a
    :class:`~tiltsample.types.Cost`, the same seed ⇒ bit-identical output, global RNG untouched.

Hypothesis strategies for random tabular targets are in :mod:`tiltsample.testing.strategies`
(requires the ``dev`` extra).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tiltsample.decoding import decode_until_complete, rows_to_seqs
from tiltsample.driver import run_chains, sample
from tiltsample.policy import (
    ReferencePolicy,
    extend_and_score,
    open_session,
    open_session_multi,
    row_lengths,
    truncate_rows,
)
from tiltsample.results import SampleSet
from tiltsample.sampler import SamplingAlgorithm
from tiltsample.target import TiltedTarget
from tiltsample.types import Cost, Seq

__all__ = ["check_policy", "check_sampler"]


def _close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    a, b = a.to(torch.float64), b.to(torch.float64)
    same_inf = torch.isinf(a) == torch.isinf(b)
    finite = torch.isfinite(a) & torch.isfinite(b)
    return (
        bool(same_inf.all())
        and bool(torch.allclose(a[finite], b[finite], atol=atol, rtol=0.0))
        and bool((a[~finite] == b[~finite]).all())
    )


def check_policy(
    policy: ReferencePolicy,
    *,
    prompt: Seq = (),
    max_len: int = 4,
    batch: int = 6,
    seed: int = 0,
    atol: float = 1e-6,
) -> None:
    """Assert that ``policy`` honours the ReferencePolicy and DecodeSession contracts.

    Prefixes are drawn from the policy itself (so they have positive probability) with a seeded
    generator. Raises ``AssertionError`` naming the broken property.
    """
    vocab, eos = policy.vocab_size, policy.eos_id
    assert isinstance(vocab, int) and vocab >= 2, f"vocab_size must be an int >= 2, got {vocab!r}"
    assert isinstance(eos, int) and 0 <= eos < vocab, f"eos_id {eos!r} outside [0, {vocab})"
    gen = torch.Generator().manual_seed(seed)

    session = open_session(policy, prompt, batch)
    decoded = decode_until_complete(session, gen, eos_id=eos, max_length=max_len)
    xs = rows_to_seqs(decoded.tokens, eos)

    # next-token laws: normalised, batched == unbatched
    prefixes = sorted({x[:t] for x in xs for t in range(len(x)) if eos not in x[:t]})
    lp = policy.next_logprobs(prompt, prefixes)
    assert tuple(lp.shape) == (len(prefixes), vocab), f"next_logprobs shape {tuple(lp.shape)}"
    assert not bool(torch.isnan(lp).any()), "next_logprobs returned NaN"
    assert not bool((lp == math.inf).any()), "next_logprobs returned +inf"
    norm = torch.logsumexp(lp.to(torch.float64), dim=1)
    assert bool(torch.allclose(norm, torch.zeros_like(norm), atol=atol)), (
        f"next_logprobs rows are not normalised (max |logsumexp| = {float(norm.abs().max()):.3g})"
    )
    for i, prefix in enumerate(prefixes):
        single = policy.next_logprobs(prompt, [prefix])[0]
        assert _close(single, lp[i], atol), f"batched != unbatched next_logprobs for {prefix}"

    # sequence_logprob = sum of next-token log-probs; per-token form consistent
    total = policy.sequence_logprob(prompt, xs).to(torch.float64)
    per = policy.sequence_logprob(prompt, xs, per_token=True).to(torch.float64)
    assert _close(total, decoded.log_p, atol), "sequence_logprob != sum of next-token log-probs"
    assert _close(per.sum(dim=1), total, atol), "per_token=True does not sum to the total"

    # session contract: logprobs after extend/truncate/select/fork equal a recompute
    s = open_session(policy, prompt, batch)
    tokens = decoded.tokens[:, : max(decoded.tokens.shape[1] - 1, 0)]
    if tokens.shape[1] == 0:
        return
    s.extend(tokens)
    _check_session_rows(policy, prompt, s, atol, "after extend([B, k])")
    s.truncate(1)
    _check_session_rows(policy, prompt, s, atol, "after truncate(1)")
    idx = torch.randint(batch, (batch + 2,), generator=gen)
    s.select(idx)
    assert s.batch_size == batch + 2, "select did not change the batch size"
    _check_session_rows(policy, prompt, s, atol, "after select")
    twin = s.fork()
    before = s.tokens()
    twin.extend(torch.full((twin.batch_size,), eos, dtype=torch.long))
    assert torch.equal(s.tokens(), before), "extending a fork changed the original session"
    _check_session_rows(policy, prompt, s, atol, "after a fork was extended")
    assert isinstance(s.cost, Cost), "session.cost must be a Cost"
    _check_capabilities(policy, prompt, decoded.tokens, gen, atol)


def _check_capabilities(
    policy: ReferencePolicy, prompt: Seq, tokens: torch.Tensor, gen: torch.Generator, atol: float
) -> None:
    """Ragged truncation, ``extend_and_score`` and multi-prompt sessions against recomputes."""
    eos, batch = policy.eos_id, tokens.shape[0]
    width = tokens.shape[1]
    if width < 2:
        return
    # ragged rows: cut every row by its own amount, then extend each at its own position (with
    # the row's own next decoded token, so that every prefix has positive probability)
    padded = torch.cat([tokens, torch.full((batch, 4), eos, dtype=torch.long)], dim=1)
    s = open_session(policy, prompt, batch)
    s.extend(tokens)
    cut = torch.randint(1, width + 1, (batch,), generator=gen)
    s = truncate_rows(s, cut)
    lengths = torch.full((batch,), width) - cut
    assert torch.equal(row_lengths(s), lengths), "truncate_rows left wrong row lengths"
    _check_session_rows(policy, prompt, s, atol, "after truncate_rows")
    s.extend(padded.gather(1, lengths[:, None]).squeeze(1))
    _check_session_rows(policy, prompt, s, atol, "after a ragged extend", cap=width)
    twin = s.fork()
    twin.select(torch.arange(batch).flip(0))
    _check_session_rows(policy, prompt, twin, atol, "after select of a ragged fork", cap=width)
    # extend_and_score == the log-probs of a recompute, token by token (ragged rows; the block
    # stays within the decoded width, so no prefix goes past the policy's cap)
    k = min(3, width)
    s = open_session(policy, prompt, batch)
    s.extend(tokens)
    s = truncate_rows(s, torch.randint(k, width + 1, (batch,), generator=gen))
    lengths = row_lengths(s)
    block = padded.gather(1, lengths[:, None] + torch.arange(k)[None, :])
    before = [
        tuple(r[: int(n)]) for r, n in zip(s.tokens().tolist(), lengths.tolist(), strict=True)
    ]
    got = extend_and_score(s, block)
    assert tuple(got.shape) == (batch, k), "extend_and_score must return [B, k]"
    for i, row in enumerate(before):
        full = list(row)
        for j in range(k):
            if eos in full:
                assert float(got[i, j]) == 0.0, "extend_and_score: padding after EOS must score 0"
                full.append(eos)
                continue
            want = policy.next_logprobs(prompt, [tuple(full)])[0, int(block[i, j])]
            assert _close(got[i, j : j + 1], want[None], atol), "extend_and_score != recompute"
            full.append(int(block[i, j]))
    assert torch.equal(row_lengths(s), lengths + k), "extend_and_score: wrong row lengths"
    _check_session_rows(policy, prompt, s, atol, "after extend_and_score", cap=width)
    # several prompts in one session
    other = (*tuple(prompt), (eos + 1) % policy.vocab_size)
    m = open_session_multi(policy, [prompt, other], [2, 1])
    m.extend(tokens[:3, : width - 1] if batch >= 3 else tokens[:, : width - 1].repeat(3, 1)[:3])
    got_m = m.logprobs()
    for i, (p, row) in enumerate(zip([prompt, prompt, other], m.tokens().tolist(), strict=True)):
        if eos in row:
            continue
        want = policy.next_logprobs(p, [tuple(row)])[0]
        assert _close(got_m[i], want, atol), "multi-prompt session differs from a recompute"


def _check_session_rows(
    policy: ReferencePolicy,
    prompt: Seq,
    session: Any,
    atol: float,
    when: str,
    cap: int | None = None,
) -> None:
    """Compare every live row's law with a recompute (rows at ``cap`` tokens are skipped: the
    policy need not define a law past its cap)."""
    eos = policy.eos_id
    lengths = row_lengths(session).tolist()
    if cap is not None and any(n >= cap for n in lengths):
        return
    got = session.logprobs()
    rows = session.tokens().tolist()
    for i, row in enumerate(rows):
        row = row[: lengths[i]]
        if eos in row:
            continue
        want = policy.next_logprobs(prompt, [tuple(row)])[0]
        assert _close(got[i], want, atol), f"session logprobs differ from a recompute {when}"


def check_sampler(
    name_or_algorithm: str | SamplingAlgorithm,
    target: TiltedTarget,
    *,
    num_samples: int = 6,
    seed: int = 0,
    **params: Any,
) -> SampleSet:
    """Assert the sampler contract on ``target`` and return one result for further checks.

    Checks: ``num_samples`` draws (a Markov sampler: one per chain), every draw a complete response
    under the target's length convention, log-weights without NaN/+inf, a non-negative
    :class:`Cost`, bit-identical output for the same seed, and torch's global RNG untouched.
    Markov samplers also run :func:`~tiltsample.run_chains` with two chains.
    """
    rng_before = torch.get_rng_state()
    first = sample(name_or_algorithm, target, num_samples, seed=seed, **params)
    second = sample(name_or_algorithm, target, num_samples, seed=seed, **params)
    assert torch.equal(torch.get_rng_state(), rng_before), "the sampler touched the global RNG"
    assert len(first) == num_samples, f"expected {num_samples} draws, got {len(first)}"
    target.check_sequences(first.sequences, name="sequences")
    assert first.sequences == second.sequences, "same seed gave different sequences"
    assert torch.equal(first.log_weights, second.log_weights), "same seed gave different weights"
    assert first.cost == second.cost, "same seed gave a different cost"
    assert isinstance(first.cost, Cost), "SampleSet.cost must be a Cost"
    assert not bool(torch.isnan(first.log_weights).any()), "NaN log-weight"
    if first.log_evidence is not None:
        assert not math.isnan(first.log_evidence), "NaN log_evidence"
    if isinstance(name_or_algorithm, str):
        from tiltsample.registry import sampler_entry

        if sampler_entry(name_or_algorithm).kind == "markov":
            trace = run_chains(name_or_algorithm, target, 2, seed=seed, **params)
            assert trace.num_chains == 2 and trace.num_draws >= 1, "run_chains produced no draws"
            assert "log_density" in trace.stats, "a Markov sampler must record log_density"
            for chain in trace.sequences:
                target.check_sequences(chain, name="chain")
    return first
