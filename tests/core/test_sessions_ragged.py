"""Ragged rows, ``extend_and_score`` and multi-prompt sessions against full recomputes.

Exact checks on tiny random Qwen2 models built from a config (transformers 5.x ``DynamicCache``
with holes masked in the 2-D attention mask and per-row ``position_ids``), on the stateless
:class:`~tiltsample.policy.PrefixSession`, and on the :class:`~tiltsample.policy.RaggedGroups`
fallback for sessions without the capability.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pytest
import torch
from hf_toys import EOS, V, tiny_model

from tiltsample.policy import (
    PrefixSession,
    RaggedGroups,
    extend_and_score,
    open_session,
    open_session_multi,
    row_lengths,
    score_token_by_token,
    supports_ragged,
    truncate_rows,
)
from tiltsample.policy import append_rows as append_rows_helper
from tiltsample.targets.hf import HFPolicy, HFSession
from tiltsample.targets.tabular import random_tabular
from tiltsample.types import Seq

pytestmark = pytest.mark.usefixtures("serial_torch")


@pytest.fixture(scope="module")
def policy() -> HFPolicy:
    return HFPolicy(tiny_model(torch.float64))


@pytest.fixture(scope="module")
def policy32() -> HFPolicy:
    return HFPolicy(tiny_model(torch.float32, seed=3))


def rows_of(session: Any) -> list[Seq]:
    lengths = row_lengths(session).tolist()
    return [tuple(r[:n]) for r, n in zip(session.tokens().tolist(), lengths, strict=True)]


def recompute(policy: Any, prompts: list[Seq], rows: list[Seq]) -> torch.Tensor:
    """Next-token laws by full forwards; rows that ended with EOS are a point mass on EOS."""
    out = torch.full((len(rows), policy.vocab_size), -math.inf, dtype=torch.float64)
    out[:, EOS] = 0.0
    for i, (p, r) in enumerate(zip(prompts, rows, strict=True)):
        if EOS not in r:
            out[i] = policy.next_logprobs(p, [r])[0]
    return out


def law_error(policy: Any, prompts: list[Seq], session: Any) -> float:
    """Largest ``|log p|`` gap between the session's next-token laws and a full recompute of each
    row's sequence (``inf`` when the supports differ)."""
    got = session.logprobs()
    want = recompute(policy, prompts, rows_of(session))
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return math.inf
    return float((got[finite] - want[finite]).abs().max())


class Walk(NamedTuple):
    """The end of a :func:`random_walk` and what it measured."""

    session: Any
    worst: float
    """The largest :func:`law_error` over every intermediate state."""
    checks: int
    """Number of states compared."""


def random_walk(
    policy: Any, session: Any, prompts: list[Seq], gen: torch.Generator, rounds: int
) -> Walk:
    """Random ragged truncations, one- and multi-token extensions, selects and forks; every
    intermediate law is compared with a full recompute of each row's sequence (the caller
    asserts on the returned worst error)."""
    batch = session.batch_size
    errors: list[float] = []
    for r in range(rounds):
        lp = session.logprobs()
        session.extend(torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1))
        errors.append(law_error(policy, prompts, session))
        if r % 3 == 2:
            block = torch.randint(1, V, (batch, 2), generator=gen)
            session.extend(block)
            errors.append(law_error(policy, prompts, session))
        if r % 2 == 1:
            lengths = row_lengths(session)
            cut = (torch.rand(batch, generator=gen) * (lengths + 1).double()).long()
            session = truncate_rows(session, cut)
            if not torch.equal(row_lengths(session), lengths - cut):
                errors.append(math.inf)  # a row lost the wrong number of tokens
            errors.append(law_error(policy, prompts, session))
        if r % 4 == 3:
            idx = torch.randint(batch, (batch,), generator=gen)
            twin = session.fork()
            twin.select(idx)
            prompts_twin = [prompts[i] for i in idx.tolist()]
            twin.extend(torch.full((batch,), 2, dtype=torch.long))
            errors.append(law_error(policy, prompts_twin, twin))
            errors.append(law_error(policy, prompts, session))  # the fork changed nothing
            session, prompts = twin, prompts_twin
    return Walk(session, max(errors), len(errors))


# ----------------------------------------------------------------------------- HF session
def test_hf_ragged_rows_equal_a_full_recompute_float64(policy: HFPolicy) -> None:
    prompt = (2, 5, 3)
    session = policy.session(prompt, 6)
    assert supports_ragged(session)
    gen = torch.Generator().manual_seed(0)
    walk = random_walk(policy, session, [prompt] * 6, gen, rounds=14)
    assert walk.checks >= 14 and walk.worst <= 1e-10
    assert isinstance(walk.session, HFSession)


def test_hf_ragged_rows_equal_a_full_recompute_float32(policy32: HFPolicy) -> None:
    prompt = (4, 4)
    session = policy32.session(prompt, 5)
    gen = torch.Generator().manual_seed(1)
    walk = random_walk(policy32, session, [prompt] * 5, gen, rounds=12)
    assert walk.checks >= 12 and walk.worst <= 1e-5


def test_hf_holes_are_compacted_and_nothing_is_re_encoded(policy: HFPolicy) -> None:
    """MH-like use: cut every row at its own place and regrow it, many times. The cache stays
    bounded (compaction), laws stay exact, and forward tokens are the new tokens plus one re-fed
    token per cut row per step (B per call: the block is rectangular)."""
    prompt = (3,)
    batch = 4
    session = policy.session(prompt, batch)
    gen = torch.Generator().manual_seed(2)
    session.extend(torch.randint(1, V, (batch, 10), generator=gen))
    session.logprobs()
    widest = 0
    rounds = 20
    for _ in range(rounds):
        lengths = row_lengths(session)
        cut = torch.randint(1, 6, (batch,), generator=gen).clamp(max=lengths)
        session.truncate_rows(cut)
        before = session.cost
        for _ in range(4):
            session.extend(torch.randint(1, V, (batch,), generator=gen))
            session.logprobs()
        spent = session.cost.forward_tokens - before.forward_tokens
        assert spent == batch * (4 + 1)  # first call re-feeds one token per row, then 1 per step
        widest = max(widest, session.cache_columns)
        # compaction keeps at most twice the live columns (+ slack and this round's block)
        assert session.cache_columns <= 2 * (1 + int(row_lengths(session).max())) + 8 + 4
        assert law_error(policy, [prompt] * batch, session) <= 1e-10
    # without compaction the cache would hold 1 + 10 + 5 * rounds = 111 columns
    assert widest < 1 + 10 + 5 * rounds


def test_hf_uniform_truncate_still_crops(policy: HFPolicy) -> None:
    session = policy.session((2, 3), 3)
    session.extend(torch.tensor([[2, 3, 4, 5]] * 3))
    session.logprobs()
    columns = session.cache_columns
    session.truncate(2)
    assert session.cache_columns == columns - 3  # the cut tokens and the re-fed one are cropped
    assert law_error(policy, [(2, 3)] * 3, session) <= 1e-10


def test_hf_multi_prompt_session(policy: HFPolicy) -> None:
    prompts: list[Seq] = [(2, 5, 3, 4), (), (6,)]
    counts = [2, 1, 3]
    session = open_session_multi(policy, prompts, counts)
    assert isinstance(session, HFSession) and session.batch_size == 6
    per_row = [p for p, c in zip(prompts, counts, strict=True) for _ in range(c)]
    context_rows = [policy.context(p) for p in per_row]
    assert session.cost.model_calls == 0
    assert law_error(policy, per_row, session) <= 1e-10
    # the prefill encodes each distinct context once, in one call
    assert session.cost == session.cost.__class__(forward_tokens=4 + 1 + 1, model_calls=1)
    gen = torch.Generator().manual_seed(3)
    walk = random_walk(policy, session, per_row, gen, rounds=9)
    assert walk.checks >= 9 and walk.worst <= 1e-10
    assert sorted({len(c) for c in context_rows}) == [1, 4]


def test_extend_and_score_is_one_call_and_equals_token_by_token(policy: HFPolicy) -> None:
    prompt = (2, 4)
    gen = torch.Generator().manual_seed(4)
    a = policy.session(prompt, 5)
    a.extend(torch.randint(1, V, (5, 6), generator=gen))
    a.logprobs()
    a.truncate_rows(torch.tensor([0, 1, 3, 6, 2]))
    b = a.fork()
    block = torch.randint(1, V, (5, 4), generator=gen)
    block[1, 1] = EOS  # row 1 ends inside the block: later entries are forced padding
    before = a.cost
    got = extend_and_score(a, block)
    assert a.cost.model_calls - before.model_calls == 1
    want = score_token_by_token(b, block)
    assert torch.allclose(got, want, atol=1e-10, rtol=0)
    assert bool((got[1, 2:] == 0).all())
    assert torch.equal(a.tokens(), b.tokens())
    assert torch.allclose(a.logprobs(), b.logprobs(), atol=1e-10)
    assert a.cost.model_calls - before.model_calls == 1  # the law after the block was kept
    # on a fresh session (prefill inside) and on empty rows
    c = policy.session(prompt, 2)
    got_c = extend_and_score(c, block[:2, :3])
    want_c = torch.stack(
        [policy.sequence_logprob(prompt, [tuple(r)], per_token=True)[0] for r in [[1], [1]]]
    )
    del want_c
    seqs = [tuple(int(t) for t in block[i, :3]) for i in range(2)]
    per = policy.sequence_logprob(prompt, seqs, per_token=True)
    per[1, 2] = 0.0  # row 1 ended at its second token
    assert torch.allclose(got_c, per, atol=1e-10)


# ----------------------------------------------------------------------------- fallbacks
class _RectangularSession:
    """A session with only the base protocol (hides the ragged and scoring capabilities)."""

    def __init__(self, inner: PrefixSession) -> None:
        self._inner = inner

    batch_size = property(lambda self: self._inner.batch_size)
    length = property(lambda self: self._inner.length)
    cost = property(lambda self: self._inner.cost)

    def tokens(self) -> torch.Tensor:
        return self._inner.tokens()

    def logprobs(self) -> torch.Tensor:
        return self._inner.logprobs()

    def extend(self, tokens: torch.Tensor) -> None:
        self._inner.extend(tokens)

    def truncate(self, n: int) -> None:
        self._inner.truncate(n)

    def select(self, indices: torch.Tensor) -> None:
        self._inner.select(indices)

    def fork(self) -> _RectangularSession:
        return _RectangularSession(self._inner.fork())


def test_prefix_session_ragged_and_multi_prompt(policy: HFPolicy) -> None:
    """The stateless session on a prompt-dependent policy (the HF model's ``next_logprobs``)."""
    prompts: list[Seq] = [(2, 3), (5,)]
    session = PrefixSession.multi(policy, prompts, [3, 2])
    per_row: list[Seq] = [(2, 3)] * 3 + [(5,)] * 2
    gen = torch.Generator().manual_seed(5)
    walk = random_walk(policy, session, per_row, gen, rounds=8)
    assert walk.checks >= 8 and walk.worst <= 1e-10
    s = PrefixSession(policy, (2, 3), 3)
    s.extend(torch.tensor([[2, 3, 4], [3, 3, 3], [4, 5, 6]]))
    s.truncate_rows(torch.tensor([1, 0, 3]))
    t = s.fork()
    block = torch.tensor([[2, 0, 5], [6, 6, 6], [3, 4, 5]])
    assert torch.allclose(
        extend_and_score(s, block), score_token_by_token(t, block), atol=1e-10, rtol=0
    )


def test_ragged_groups_fallback_for_rectangular_sessions() -> None:
    table = random_tabular(torch.Generator().manual_seed(0), 4, 6, concentration=0.8)
    inner = PrefixSession(table, (), 5, accounting="cached")
    session: Any = _RectangularSession(inner)
    assert not supports_ragged(session)
    gen = torch.Generator().manual_seed(6)
    toks = torch.tensor([[1, 2, 3, 1, 2]] * 5)
    session.extend(toks)
    same = truncate_rows(session, torch.full((5,), 2))
    assert same is session and session.length == 3
    ragged = truncate_rows(session, torch.tensor([0, 1, 2, 3, 1]))
    assert isinstance(ragged, RaggedGroups)
    assert row_lengths(ragged).tolist() == [3, 2, 1, 0, 2]
    assert law_error(table, [()] * 5, ragged) <= 1e-12
    ragged.extend(torch.tensor([1, 2, 3, 1, 2]))
    ragged.select(torch.tensor([4, 0, 0, 2]))
    assert row_lengths(ragged).tolist() == [3, 4, 4, 2]
    assert law_error(table, [()] * 4, ragged) <= 1e-12
    twin = ragged.fork()
    block = torch.tensor([[1, 2], [0, 3], [2, 2], [3, 1]])
    got = extend_and_score(ragged, block)
    assert torch.allclose(got, score_token_by_token(twin, block), atol=1e-12)
    del gen


def test_open_session_multi_fallbacks() -> None:
    table = random_tabular(torch.Generator().manual_seed(1), 3, 4)
    one = open_session_multi(table, [(), ()], [2, 1])
    assert one.batch_size == 3
    assert isinstance(open_session(table, (), 2), PrefixSession)
    with pytest.raises(ValueError, match="rows_per_prompt"):
        open_session_multi(table, [(), (1,)], [1])
    with pytest.raises(ValueError, match="n\\[r\\]"):
        PrefixSession(table, (), 2).truncate_rows(torch.tensor([1, 0]))


def test_append_rows_merges_sessions(policy: HFPolicy) -> None:
    """Rows of two sessions (different prompts, lengths, cache widths) in one session; then the
    merged session keeps decoding exactly. Also the stateless session and the fallback."""
    gen = torch.Generator().manual_seed(7)
    a = policy.session((2, 3), 3)
    a.extend(torch.randint(1, V, (3, 5), generator=gen))
    a.logprobs()
    b = open_session_multi(policy, [(4,), (5, 6, 2)], [1, 2])
    b.extend(torch.randint(1, V, (3, 2), generator=gen))
    b.logprobs()
    b.truncate_rows(torch.tensor([1, 0, 2]))
    spent = a.cost + b.cost
    merged = append_rows_helper(a, b)
    assert merged is a and merged.cost == spent
    per_row: list[Seq] = [(2, 3)] * 3 + [(4,), (5, 6, 2), (5, 6, 2)]
    assert row_lengths(merged).tolist() == [5, 5, 5, 1, 2, 0]
    walk = random_walk(policy, merged, per_row, gen, rounds=6)
    assert walk.checks >= 6 and walk.worst <= 1e-10
    # an empty session absorbs the rows of a non-empty one, and vice versa
    empty = policy.session((2,), 0)
    c = policy.session((3,), 2)
    c.extend(torch.tensor([[2, 3], [4, 5]]))
    assert append_rows_helper(empty, c).batch_size == 2
    assert law_error(policy, [(3,), (3,)], empty) <= 1e-10
    # stateless session
    p = PrefixSession(policy, (2,), 2)
    q = PrefixSession(policy, (3, 4), 1)
    p.extend(torch.tensor([[2, 3], [3, 3]]))
    q.extend(torch.tensor([5]))
    append_rows_helper(p, q)
    assert law_error(policy, [(2,), (2,), (3, 4)], p) <= 1e-10
    # fallback: sessions without the method are combined in a RaggedGroups adapter
    table = random_tabular(torch.Generator().manual_seed(0), 4, 6)
    r1: Any = _RectangularSession(PrefixSession(table, (), 2, accounting="cached"))
    r2: Any = _RectangularSession(PrefixSession(table, (), 1, accounting="cached"))
    r1.extend(torch.tensor([[1, 2], [2, 2]]))
    r2.extend(torch.tensor([[3, 1, 1]]))
    combined = append_rows_helper(r1, r2)
    assert isinstance(combined, RaggedGroups)
    assert row_lengths(combined).tolist() == [2, 2, 3]
    assert law_error(table, [()] * 3, combined) <= 1e-12
