"""The decode engine's rules, one at a time: per-row starts and caps, teacher forcing, forced EOS,
the hard-cap feeding rule, ``max_new``, parking, the draws and the laws.

Exact checks: most use policies whose next-token laws are point masses (every draw is determined)
or per-position :func:`decode_step` calls with given uniforms, so no assertion depends on a seed;
where a generator draws, the assertions are exact recomputations of what was recorded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from tiltsample.decode_engine import (
    Decoded,
    DecodeRequest,
    Parking,
    decode,
    decode_step,
    score_continuations,
)
from tiltsample.decoding import decode_until_complete
from tiltsample.policy import (
    DecodeSession,
    PrefixSession,
    row_lengths,
    sequence_logprob_from_next,
    truncate_rows,
)
from tiltsample.row_generators import RowGenerators
from tiltsample.token_laws import (
    check_law,
    draw_tokens,
    inverse_cdf,
    tempered_law,
    tempered_logprobs,
)
from tiltsample.types import Seq

V, EOS = 5, 0
NEG = -math.inf


class PointPolicy:
    """After a prefix of length ``n`` the next token is EOS if ``n == stop``, else ``1 + n % 4``
    (a point mass: every draw is determined)."""

    vocab_size = V
    eos_id = EOS

    def __init__(self, stop: int | None = None) -> None:
        self.stop = stop

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        out = torch.full((len(prefixes), V), NEG, dtype=torch.float64)
        for i, x in enumerate(prefixes):
            out[i, EOS if len(x) == self.stop else 1 + len(x) % 4] = 0.0
        return out

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        return sequence_logprob_from_next(self, prompt, xs, per_token)


class SoftPolicy:
    """A fixed full-support law that depends on the last token."""

    vocab_size = V
    eos_id = EOS

    def __init__(self) -> None:
        w = torch.arange(V * V, dtype=torch.float64).reshape(V, V)
        self.table = torch.log_softmax(torch.sin(w) * 1.5, dim=-1)

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        return torch.stack([self.table[x[-1] if x else 0] for x in prefixes])

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        return sequence_logprob_from_next(self, prompt, xs, per_token)


def _ragged(policy: object, lengths: list[int]) -> DecodeSession:
    """A session whose row ``r`` holds the first ``lengths[r]`` tokens the policy decodes."""
    rows, top = len(lengths), max(lengths)
    session: DecodeSession = PrefixSession(policy, (), rows)  # type: ignore[arg-type]
    for t in range(top):
        session.extend(torch.full((rows,), 1 + t % 4, dtype=torch.long))
    return truncate_rows(session, torch.tensor([top - n for n in lengths]))


def _request(**kw: object) -> DecodeRequest:
    base: dict[str, object] = {"law": tempered_law(), "eos_id": EOS, "start": 0, "cap": 4}
    base.update(kw)
    return DecodeRequest(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the loop: per-row rules
def test_per_row_start_and_cap() -> None:
    start = [3, 2, 1, 0]
    cap = torch.tensor([4, 4, 5, 3])
    session = _ragged(PointPolicy(), start)
    gen = torch.Generator().manual_seed(0)
    out, _ = decode(session, gen, _request(start=torch.tensor(start), cap=cap))
    assert out.new_lengths.tolist() == [1, 2, 4, 3]
    assert out.generated_tokens == 10
    for r, s in enumerate(start):
        n = int(cap[r]) - s
        assert out.tokens[r, :n].tolist() == [1 + t % 4 for t in range(s, int(cap[r]))]
        assert (out.tokens[r, n:] == EOS).all()
    assert (out.token_log_p == 0).all() and (out.token_log_q == 0).all()
    # every row of the session got a token per position (EOS padding after its end)
    assert torch.equal(row_lengths(session), torch.tensor(start) + out.tokens.shape[1])


def test_rows_stop_at_eos_and_get_padding() -> None:
    session = _ragged(PointPolicy(stop=2), [0, 1, 2])
    out, _ = decode(session, torch.Generator(), _request(start=torch.tensor([0, 1, 2]), cap=6))
    assert out.new_lengths.tolist() == [3, 2, 1]  # two tokens, then EOS (at length 2)
    assert out.tokens.tolist() == [[1, 2, EOS], [2, EOS, EOS], [EOS, EOS, EOS]]


def test_teacher_forcing_records_the_forced_tokens_and_does_not_count_them() -> None:
    policy = SoftPolicy()
    forced = torch.tensor([[2, 3, 4], [4, 4, 4], [1, 2, 3]])
    until = torch.tensor([3, 1, 0])
    session = PrefixSession(policy, (), 3)  # type: ignore[arg-type]
    out, _ = decode(
        session,
        torch.Generator().manual_seed(5),
        _request(cap=3, forced=forced, forced_until=until, law=tempered_law(0.7)),
    )
    for r in range(3):
        k = int(until[r])
        assert out.tokens[r, :k].tolist() == forced[r, :k].tolist()
        row = out.tokens[r, : int(out.new_lengths[r])].tolist()
        for t, tok in enumerate(row):
            lp = policy.next_logprobs((), [tuple(row[:t])])[0]
            assert out.token_log_p[r, t] == lp[tok]
            assert out.token_log_q[r, t] == tempered_logprobs(lp[None], 0.7)[0, tok]
    drawn = int(out.new_lengths.sum()) - int(until.clamp(max=out.new_lengths).sum())
    assert out.generated_tokens == drawn


def test_forced_eos_at_the_cap() -> None:
    policy = SoftPolicy()
    forced = torch.tensor([[2, 3, 0], [2, 3, 0], [2, 3, 0]])
    session = PrefixSession(policy, (), 3)  # type: ignore[arg-type]
    out, _ = decode(
        session,
        torch.Generator().manual_seed(0),
        _request(
            cap=3,
            force_eos=torch.tensor([True, True, False]),
            forced=forced,
            forced_until=torch.tensor([2, 3, 2]),
        ),
    )
    lp = policy.next_logprobs((), [(2, 3)])[0]
    # row 0: EOS forced at cap - 1: log q = 0, log p = log p(EOS | x_<cap), counted as generated
    assert out.tokens[0].tolist() == [2, 3, EOS]
    assert out.token_log_q[0, 2] == 0 and out.token_log_p[0, 2] == lp[EOS]
    # row 1: a teacher-forced EOS there counts the same (log q = 0), not generated
    assert out.tokens[1].tolist() == [2, 3, EOS] and out.token_log_q[1, 2] == 0
    # row 2: no forcing: a draw from q (here p) at cap - 1
    tok = int(out.tokens[2, 2])
    assert out.token_log_q[2, 2] == lp[tok] == out.token_log_p[2, 2]
    assert out.generated_tokens == 2


def test_max_new_stops_early_and_rows_stay_open() -> None:
    session = PrefixSession(PointPolicy(), (), 2)  # type: ignore[arg-type]
    gen = torch.Generator()
    first = decode_until_complete(session, gen, eos_id=EOS, max_length=6, max_new=2)
    assert first.tokens.tolist() == [[1, 2], [1, 2]] and first.generated_tokens == 4
    rest = decode_until_complete(session, gen, eos_id=EOS, max_length=6)
    assert rest.tokens.tolist() == [[3, 4, 1, 2]] * 2


def test_no_draw_when_every_live_row_is_forced() -> None:
    policy = SoftPolicy()
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    # the only position is cap - 1 under the EOS rule: nothing to draw
    out = decode_until_complete(
        PrefixSession(policy, (), 4),
        gen,
        eos_id=EOS,
        max_length=1,
        force_eos_at_cap=True,  # type: ignore[arg-type]
    )
    assert (out.tokens == EOS).all() and torch.equal(gen.get_state(), state)
    # every position teacher-forced: nothing to draw either
    forced = torch.tensor([[1, 2, 3]] * 4)
    until = torch.full((4,), 3)
    decode(
        PrefixSession(policy, (), 4),  # type: ignore[arg-type]
        gen,
        _request(cap=3, forced=forced, forced_until=until),
    )
    assert torch.equal(gen.get_state(), state)
    decode_until_complete(PrefixSession(policy, (), 4), gen, eos_id=EOS, max_length=1)  # type: ignore[arg-type]
    assert not torch.equal(gen.get_state(), state)


def test_decode_until_complete_skips_rows_that_already_ended() -> None:
    session = PrefixSession(PointPolicy(stop=1), (), 2)  # type: ignore[arg-type]
    session.extend(torch.tensor([1, EOS]))
    out = decode_until_complete(session, torch.Generator(), eos_id=EOS, max_length=5)
    assert out.new_lengths.tolist() == [1, 0]
    assert out.tokens.tolist() == [[EOS], [EOS]]


# ------------------------------------------------------------------ parking
@pytest.mark.parametrize("force", [False, True])
def test_parking_gives_the_same_continuations_and_row_order(force: bool) -> None:
    start = [0, 3, 1, 4, 2, 0, 5, 1, 3]
    caps = torch.tensor([6, 6, 3, 8, 8, 2, 7, 8, 4])
    outs = []
    for parking in (None, Parking(shrink_below=0.9, min_rows=2)):
        session = _ragged(PointPolicy(stop=5), start)
        req = _request(
            start=torch.tensor(start), cap=caps, force_eos=force, hard_cap=8, parking=parking
        )
        out, session = decode(session, torch.Generator(), req)
        outs.append((out, session))
    (a, sa), (b, sb) = outs
    for x, y in zip(a, b, strict=True):
        assert x == y if x is None or isinstance(x, int) else torch.equal(x, y)
    # the rows come back in their order; they differ only in EOS padding after their end
    ends = torch.tensor(start) + a.new_lengths
    assert bool((row_lengths(sb) >= ends).all())
    ta, tb = sa.tokens(), sb.tokens()
    for r, n in enumerate(ends.tolist()):
        assert ta[r, :n].tolist() == tb[r, :n].tolist()
    # parked rows are not pushed (rows ended by EOS cost nothing here either way)
    assert sb.cost.forward_tokens <= sa.cost.forward_tokens
    assert force or sb.cost.forward_tokens < sa.cost.forward_tokens


@pytest.mark.parametrize("restore", [True, False])
@pytest.mark.parametrize("groups", [False, True])
def test_parking_with_same_draws_keeps_every_draw(restore: bool, groups: bool) -> None:
    """``same_draws``: the parked decode draws exactly what the unparked one draws (tokens,
    laws and the generators' final states), with a random law so that the stream matters;
    ``restore=False`` drops the finished rows and returns only the rows left decoding."""
    start = [0, 2, 1, 0, 3, 0, 1, 2, 0, 1, 0, 2]
    rows = len(start)

    def run(parking: Parking | None) -> tuple[Decoded, DecodeSession, list[Tensor]]:
        gens = [torch.Generator().manual_seed(7 + g) for g in range(3 if groups else 1)]
        gen: torch.Generator | RowGenerators = gens[0]
        if groups:
            gen = RowGenerators(gens, torch.arange(rows) // 4)
        session = _ragged(SoftPolicy(), start)
        req = _request(start=torch.tensor(start), cap=9, parking=parking)
        out, session = decode(session, gen, req)
        return out, session, [g.get_state() for g in gens]

    plain, s_plain, states_plain = run(None)
    parked, s_parked, states_parked = run(
        Parking(shrink_below=0.9, min_rows=2, same_draws=True, restore=restore)
    )
    assert 0 < int((plain.new_lengths < 9 - torch.tensor(start)).sum()) < rows  # rows end early
    for x, y in zip(plain, parked, strict=True):
        assert x == y if x is None or isinstance(x, int) else torch.equal(x, y)
    assert all(torch.equal(a, b) for a, b in zip(states_plain, states_parked, strict=True))
    # (this toy session charges nothing for rows ended by EOS; the HF session does, see
    # tests/samplers/ets for the saving)
    assert s_parked.cost.forward_tokens <= s_plain.cost.forward_tokens
    assert s_parked.cost.model_calls == s_plain.cost.model_calls
    if restore:
        assert s_parked.batch_size == rows
    else:  # only the rows decoding at the last step are left
        assert 0 < s_parked.batch_size < rows


# ------------------------------------------------------------------ one position
def _point_laws(tokens: list[int]) -> Tensor:
    out = torch.full((len(tokens), V), NEG, dtype=torch.float64)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 0.0
    return out


def test_step_hard_cap_feeds_eos_but_records_the_token() -> None:
    out = decode_step(
        _point_laws([3, 3, 3]),
        tempered_law(),
        eos_id=EOS,
        live=torch.tensor([True, True, False]),
        position=torch.tensor([2, 1, 2]),
        cap=torch.tensor([3, 2, 3]),
        hard_cap=3,
        uniforms=torch.zeros(3, dtype=torch.float64),
    )
    assert out.tokens.tolist() == [3, 3, EOS]
    assert out.fed.tolist() == [EOS, 3, EOS]  # row 1 ends at its own cap, not the hard cap
    assert out.live.tolist() == [False, False, False]
    assert out.generated.tolist() == [True, True, False]


def test_step_with_uniforms_is_the_inverse_cdf() -> None:
    log_p = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]] * 4, dtype=torch.float64))
    u = torch.tensor([0.05, 0.25, 0.59, 0.61], dtype=torch.float64)
    out = decode_step(
        log_p,
        tempered_law(with_entropy=True),
        eos_id=EOS,
        live=torch.ones(4, dtype=torch.bool),
        position=torch.zeros(4, dtype=torch.long),
        cap=torch.full((4,), 5),
        uniforms=u,
        record_entropy=True,
    )
    assert out.tokens.tolist() == [0, 1, 2, 3]
    assert out.live.tolist() == [False, True, True, True]  # row 0 drew EOS
    assert torch.equal(out.log_q, log_p[0, out.tokens])
    h = -(log_p[0, :4].exp() * log_p[0, :4]).sum()
    assert out.entropy is not None and torch.allclose(out.entropy, h.expand(4))


def test_step_needs_an_entropy_when_asked() -> None:
    with pytest.raises(ValueError, match="entropy"):
        decode_step(
            _point_laws([1]),
            tempered_law(),
            eos_id=EOS,
            live=torch.ones(1, dtype=torch.bool),
            position=torch.zeros(1, dtype=torch.long),
            cap=torch.full((1,), 3),
            generator=torch.Generator(),
            record_entropy=True,
        )


# ------------------------------------------------------------------ draws and laws
def test_inverse_cdf_never_draws_zero_mass_and_inverts_the_cdf() -> None:
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0], dtype=torch.float64)
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)[:-1]
    idx = inverse_cdf(torch.log(probs).expand(len(u), -1), u)
    want = torch.searchsorted(torch.cumsum(probs, 0), u, right=True)
    assert torch.equal(idx, want)
    assert int(inverse_cdf(torch.log(probs)[None], torch.tensor([1.0]))[0]) == 4  # overflow


@pytest.mark.parametrize(
    ("row", "cause"),
    [([0.0, math.nan], "NaN"), ([math.inf, 0.0], r"\+inf"), ([NEG, NEG], "no token")],
)
def test_draw_tokens_names_an_invalid_law(row: list[float], cause: str) -> None:
    log_q = torch.tensor([[0.0, NEG], row], dtype=torch.float64)
    with pytest.raises(ValueError, match=f"rows 1; row 1 has {cause}"):
        draw_tokens(torch.Generator(), log_q)


def test_draw_tokens_refuses_an_unnormalised_law() -> None:
    log_q = torch.tensor([[-1000.0, -1000.0]], dtype=torch.float64)
    check_law(log_q)  # a law up to normalisation ...
    with pytest.raises(ValueError, match="not normalised"):
        draw_tokens(torch.Generator(), log_q)  # ... but the engine draws normalised ones


def test_draw_tokens_draws_a_point_mass() -> None:
    assert draw_tokens(torch.Generator(), _point_laws([4, 2])).tolist() == [4, 2]


def test_per_row_temperatures_equal_the_row_wise_law() -> None:
    log_p = torch.log_softmax(torch.randn(6, V, generator=torch.Generator().manual_seed(0)), -1)
    log_p = log_p.to(torch.float64)
    tau = torch.tensor([1.0, 0.5, 2.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    law = tempered_law(tau)(log_p)
    for r in range(6):
        assert torch.equal(law.log_q[r], tempered_logprobs(log_p[r : r + 1], float(tau[r]))[0])
    assert law.entropy is None


# ------------------------------------------------------------------ scoring given continuations
def test_score_continuations_is_teacher_forcing() -> None:
    policy = SoftPolicy()
    session = PrefixSession(policy, (), 2)  # type: ignore[arg-type]
    session.extend(torch.tensor([3, 1]))
    tokens = torch.tensor([[2, 4, 0], [1, 0, 0]])
    got = score_continuations(session, tokens, torch.tensor([3, 2]))
    for r, (first, row) in enumerate([(3, [2, 4, 0]), (1, [1, 0])]):
        full = [first, *row]
        for t in range(len(row)):
            assert got[r, t] == policy.next_logprobs((), [tuple(full[: t + 1])])[0, row[t]]
    assert got[1, 2] == 0
