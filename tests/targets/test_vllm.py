"""The vLLM backend (``tiltsample.targets.vllm``) against the transformers backend.

One engine for the whole session on the shipped ``arith-ar`` model (V = 20). Exact checks first
(per-token ``log p`` equals ``HFPolicy``'s to float32 precision, ``log q`` equals the tempered
law's, the rules of the decode engine against the token-level loop on the same tokens), then
seeded statistical tests of the sampled law (chi-square against HF's exact law, significance
``ALPHA``), the seeds, and the samplers: those written against the rollout level run on an
engine view without full-vocabulary laws (``max_logprobs=5 < V``), the token-level ones refuse
it with :class:`~tiltsample.policy.TokenLevelAccessError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy import stats

import tiltsample
from tiltsample.app import recipes
from tiltsample.app.cli import main
from tiltsample.decode_engine import DecodeRequest, decode, score_continuations
from tiltsample.decoding import decode_until_complete, rows_to_seqs, seqs_to_rows
from tiltsample.policy import RolloutSession, TokenLevelAccessError
from tiltsample.target import TiltedTarget, power_target
from tiltsample.targets.tasks import held_out_problems, load_policy, model_path, problem_target
from tiltsample.targets.vllm import VLLMPolicy, close_engines, load_vllm_policy
from tiltsample.testing import check_sampler
from tiltsample.token_laws import TemperedLaw, tempered_law

pytest.importorskip("vllm", reason="the vLLM backend tests need vllm (the 'vllm' extra)")
# one engine start (tens of seconds) for the module: in `make test`, not in `make test-fast`
pytestmark = pytest.mark.slow

ALPHA = 1e-3  # significance level of every chi-square test below (seeded, so deterministic)
ATOL = 1e-4  # float32 engine vs float32 transformers, float64 arithmetic on both sides
BOS = 1
PROMPT = held_out_problems(1)[0].prompt_ids()


@pytest.fixture(scope="session")
def policy() -> Iterator[VLLMPolicy]:
    """The engine of the session (start-up takes tens of seconds), from the same per-process
    cache as the CLI's ``--engine vllm`` (so its tests reuse it): full-vocabulary laws
    (``max_logprobs = V = 20``), eager mode, 1 GiB KV cache; shut down at the end."""
    engine = load_vllm_policy(model_path("arith-ar"))
    assert engine.full_vocabulary and engine.engine.max_model_len == 128
    yield engine
    close_engines()


@pytest.fixture(scope="session")
def rollout_only(policy: VLLMPolicy) -> VLLMPolicy:
    """The same engine, asked for at most 5 log-probs per position: rollout level only."""
    return VLLMPolicy(policy.engine.llm, max_logprobs=5)


@pytest.fixture(scope="session")
def hf() -> Any:
    return load_policy("arith-ar")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- exact checks
def test_sequence_logprob_and_scores_match_hf(policy: VLLMPolicy, hf: Any) -> None:
    problem = held_out_problems(1)[0]
    drawn = hf.generate(PROMPT, 4, _gen(0), max_new_tokens=40, temperature=1.5).sequences
    xs = [problem.response_ids(), *drawn, (), (PROMPT[1],)]
    want = hf.sequence_logprob(PROMPT, xs, per_token=True)
    got = policy.sequence_logprob(PROMPT, xs, per_token=True)
    diff = float((got - want).abs().max())
    assert diff < ATOL, diff
    assert got.dtype == torch.float64 and torch.equal(
        got.sum(1), policy.sequence_logprob(PROMPT, xs)
    )
    rows, lengths = seqs_to_rows(xs, policy.eos_id)
    session = policy.session(PROMPT, len(xs))
    session.extend(rows[:, :3])
    scored = score_continuations(session, rows[:, 3:], (lengths - 3).clamp(min=0))
    assert float((scored - want[:, 3:]).abs().max()) < ATOL
    assert session.cost.model_calls == 1 and session.cost.forward_tokens > 0


def test_next_token_laws_match_hf(policy: VLLMPolicy, hf: Any) -> None:
    prefixes = [(), (10,), (10, 10, 14)]
    diff = (policy.next_logprobs(PROMPT, prefixes) - hf.next_logprobs(PROMPT, prefixes)).abs()
    assert float(diff.max()) < ATOL
    session = policy.session((), 3)
    session.extend(torch.tensor([[9], [10], [policy.eos_id]]))
    law = session.logprobs()
    assert float((law[:2] - hf.next_logprobs((), [(9,), (10,)])).abs().max()) < ATOL
    assert law[2, policy.eos_id] == 0.0 and torch.isneginf(law[2]).sum() == 19


@pytest.mark.parametrize(("tau", "full"), [(1.0, True), (0.7, True), (1.0, False)])
def test_decode_matches_the_token_level_loop(
    policy: VLLMPolicy, rollout_only: VLLMPolicy, hf: Any, tau: float, full: bool
) -> None:
    """Native decoding (teacher forcing, forced EOS, per-row caps, entropies with full laws)
    equals the token-level loop on HF fed the same tokens: ``log p``, ``log q``, entropies,
    lengths. Without full laws (no entropies) teacher forcing works at ``tau = 1``."""
    engine = policy if full else rollout_only
    ref = held_out_problems(1)[0].response_ids()
    rows = 4
    forced = torch.tensor([ref[:8]] * rows)
    until = torch.tensor([2, 6, 0, 3])
    cap = torch.tensor([3, 6, 9, 12])
    request = DecodeRequest(
        law=tempered_law(tau, with_entropy=full),
        eos_id=policy.eos_id,
        start=0,
        cap=cap,
        force_eos=True,
        forced=forced,
        forced_until=until,
        record_entropy=full,
    )
    session = engine.session(PROMPT, rows)
    out, same = decode(session, _gen(1), request)
    assert same is session and isinstance(session, RolloutSession)
    assert out.tokens[0].tolist()[:3] == [*ref[:2], policy.eos_id]  # forced EOS at cap - 1
    assert out.tokens[1].tolist()[:6] == list(ref[:6])  # teacher-forced up to the cap
    assert out.token_log_q[0, 2] == 0.0 and out.token_log_q[1, 5] == 0.0
    assert torch.equal(session.tokens()[:, : out.tokens.shape[1]], out.tokens)
    # the token-level loop, every token teacher-forced to the native result
    replay = request._replace(forced=out.tokens, forced_until=out.new_lengths)
    want, _ = decode(hf.session(PROMPT, rows), _gen(2), replay)
    assert torch.equal(want.tokens, out.tokens) and torch.equal(want.new_lengths, out.new_lengths)
    assert (out.token_entropy is None) == (not full)
    for name in ("token_log_p", "token_log_q", "token_entropy")[: 3 if full else 2]:
        diff = float((getattr(out, name) - getattr(want, name)).abs().max())
        assert diff < ATOL, (name, diff)
    if tau == 1.0:
        real = out.token_log_q != 0
        assert torch.equal(out.token_log_p[real], out.token_log_q[real])
    forced_count = torch.minimum(until, out.new_lengths)
    generated = int((out.new_lengths - forced_count).sum())
    assert out.generated_tokens == generated


# ---------------------------------------------------------------------------- the sampled law
def _exact_law(hf: Any, cap: int, tau: float) -> dict[tuple[int, ...], float]:
    """HF's law of the responses after BOS under ``q_tau``, stopped at EOS or ``cap``."""
    law: dict[tuple[int, ...], float] = {}
    frontier: dict[tuple[int, ...], float] = {(): 0.0}
    for t in range(cap):
        prefixes = list(frontier)
        lq = torch.log_softmax(hf.next_logprobs((), prefixes) / tau, dim=-1)
        nxt: dict[tuple[int, ...], float] = {}
        for i, x in enumerate(prefixes):
            for v in range(lq.shape[1]):
                y = (*x, v)
                value = frontier[x] + float(lq[i, v])
                done = v == hf.eos_id or t == cap - 1
                (law if done else nxt)[y] = value
        frontier = nxt
    return {x: math.exp(v) for x, v in law.items()}


@pytest.mark.parametrize("tau", [1.0, 1.5])
def test_samples_follow_the_hf_law(policy: VLLMPolicy, hf: Any, tau: float) -> None:
    n, cap = 3000, 3
    law = _exact_law(hf, cap, tau)
    session = policy.session((), n)
    out = decode_until_complete(
        session, _gen(3), eos_id=policy.eos_id, max_length=cap, temperature=tau
    )
    counts: dict[tuple[int, ...], int] = {}
    for x in rows_to_seqs(out.tokens, policy.eos_id):
        counts[x] = counts.get(x, 0) + 1
    big = sorted(x for x, p in law.items() if n * p >= 5)
    observed = [counts.get(x, 0) for x in big]
    expected = [n * law[x] for x in big]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    assert len(big) >= 10  # the test has power: many categories
    p_value = stats.chisquare(observed, expected).pvalue
    assert p_value > ALPHA, (p_value, len(big))


def test_same_seed_same_output_and_rows_do_not_depend_on_the_batch(policy: VLLMPolicy) -> None:
    def run(rows: int, seed: int) -> Any:
        session = policy.session((), rows)
        return decode_until_complete(session, _gen(seed), eos_id=policy.eos_id, max_length=8)

    a, b, alone, other = run(6, 5), run(6, 5), run(1, 5), run(6, 6)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.token_log_p, b.token_log_p)
    width = int(alone.new_lengths[0])
    assert torch.equal(alone.tokens[0, :width], a.tokens[0, :width])
    assert not torch.equal(a.tokens, other.tokens)


def test_refuses_a_law_it_cannot_express(policy: VLLMPolicy) -> None:
    law = tempered_law(1.0, proposal=lambda lp: lp)
    assert isinstance(law, TemperedLaw) and not law.expressible
    request = DecodeRequest(law=law, eos_id=policy.eos_id, start=0, cap=4)
    with pytest.raises(ValueError, match="plain tempered laws only"):
        decode(policy.session(PROMPT, 2), _gen(0), request)


# ---------------------------------------------------------------------------- samplers
def _target(policy: VLLMPolicy) -> TiltedTarget:
    return problem_target(held_out_problems(1)[0], policy, lam=0.5, max_new_tokens=14)


ROLLOUT_SAMPLERS: list[tuple[str, dict[str, Any]]] = [
    ("ancestral", {"temperature": 0.7}),
    ("best-of-n", {"num_candidates": 3}),
    ("imh", {"num_steps": 3}),
    ("mh", {"num_steps": 3, "proposal_temperature": 0.7}),
    ("power", {"alpha": 2.0, "num_steps": 3}),
    ("qalign", {"num_steps": 3}),
    ("ets", {"num_candidates": 2, "num_rollouts": 2, "block_size": 5}),
    ("smc", {"block_size": 5, "temperature": 0.7}),
    ("power-smc", {"block_size": 4, "alpha_ramp": 3}),  # on a power target, alpha = 2
]


@pytest.mark.parametrize(("name", "params"), ROLLOUT_SAMPLERS, ids=[s for s, _ in ROLLOUT_SAMPLERS])
def test_rollout_level_samplers_run_on_the_engine(
    rollout_only: VLLMPolicy, name: str, params: dict[str, Any]
) -> None:
    target = _target(rollout_only)
    if name == "power-smc":
        target = power_target(rollout_only, 2.0, target.prompt, target.max_new_tokens)
    _check_result(check_sampler(name, target, num_samples=3, **params), name != "power-smc")


def test_entropy_cut_runs_with_full_vocabulary_laws(policy: VLLMPolicy) -> None:
    params = {"alpha": 2.0, "num_steps": 3}
    _check_result(check_sampler("entropy-cut", _target(policy), num_samples=3, **params))


def _check_result(out: Any, rewarded: bool = True) -> None:
    assert bool(torch.isfinite(out.log_weights).all())
    cost = out.cost
    assert min(cost.generated_tokens, cost.forward_tokens, cost.model_calls) > 0, cost
    assert (cost.reward_calls > 0) == rewarded, cost  # a pure power target has no reward


TOKEN_LEVEL: list[tuple[str, dict[str, Any]]] = [
    ("smc", {"num_moves": 1, "block_size": 2}),
    ("beam", {"num_beams": 2}),
    ("exact", {}),
    ("entropy-cut", {"alpha": 2.0, "num_steps": 2}),
    ("ets", {"num_candidates": 2, "num_rollouts": 2, "batching": "continuous"}),
    ("mh", {"num_steps": 2, "batching": "continuous"}),
    ("mh", {"num_steps": 2, "support": "top_k", "top_k": 3}),
]


@pytest.mark.parametrize(
    ("name", "params"), TOKEN_LEVEL, ids=[f"{s}-{'-'.join(p)}" for s, p in TOKEN_LEVEL]
)
def test_token_level_samplers_refuse_a_rollout_only_engine(
    rollout_only: VLLMPolicy, name: str, params: dict[str, Any]
) -> None:
    error: type[Exception] = ValueError if "support" in params else TokenLevelAccessError
    with pytest.raises(error, match="token-level access"):
        tiltsample.sample(name, _target(rollout_only), 2, seed=0, **params)
    with pytest.raises(TokenLevelAccessError, match="max_logprobs=5"):
        rollout_only.next_logprobs(PROMPT, [()])


# ------------------------------------------------------------------ the application layer
def test_compare_runs_every_recipe_on_the_engine(
    policy: VLLMPolicy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tiltsample compare --profile test --engine vllm`` end to end, on the session's engine
    (the loader's cache): every default recipe runs (full-vocabulary laws), none fails, and the
    run file says which engine wrote it."""
    assert load_vllm_policy(model_path("arith-ar")) is policy  # no second engine start
    out = tmp_path / "cmp"
    argv = ["compare", "--profile", "test", "--engine", "vllm", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    lines = [json.loads(x) for x in (out / "compare.jsonl").read_text().splitlines()]
    assert lines[0]["header"]["engine"] == "vllm"
    records = [x for x in lines if "sampler" in x]
    assert not [r for r in records if "error" in r]
    runnable = {r.label for r in recipes.RECIPES if r.configure(1) or r.configure(2)}
    assert {r["sampler"] for r in records} == runnable
    for r in records:  # batched cells share (and apportion) their model calls: some get 0
        assert r["generated_tokens"] > 0 and r["model_calls"] >= 0, r
        assert r["correct"] in (0.0, 1.0)
    assert all(r["model_calls"] > 0 for r in records if "batched" not in r)
    assert "| smc | 2 | 2 |" in capsys.readouterr().out


def test_sample_with_a_model_on_the_engine(
    policy: VLLMPolicy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tiltsample sample best-of-n --model arith-ar --engine vllm``: one row per problem and a
    total; the written draws resume to the same file."""
    out = tmp_path / "draws.jsonl"
    argv = ["sample", "best-of-n", "--model", "arith-ar", "--engine", "vllm", "--problems", "2"]
    argv += ["-n", "3", "-p", "num_candidates=4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "engine vllm" in text and "\nall " in text
    first = out.read_text()
    assert len(first.splitlines()) == 1 + 2 * (3 + 1)  # header, 2 problems x (3 draws + done)
    assert main(argv) == 0
    assert out.read_text() == first


def test_token_level_recipes_are_exactly_those_that_need_laws(rollout_only: VLLMPolicy) -> None:
    """``compare`` leaves out :data:`~tiltsample.app.recipes.TOKEN_LEVEL` on a rollout-only
    engine: each recipe at its smallest budget raises ``TokenLevelAccessError`` there iff it is
    listed (the recipes as compare runs them there: :func:`~tiltsample.app.recipes.
    for_rollout_engine`)."""
    problem = held_out_problems(1)[0]
    for recipe in map(recipes.for_rollout_engine, recipes.RECIPES):
        conf = next(c for c in map(recipe.configure, (1, 2, 4)) if c is not None)
        n, params = conf
        base = problem_target(problem, rollout_only, lam=0.5, max_new_tokens=14)
        target = base
        if recipe.target == "power":
            target = power_target(
                rollout_only, recipes.POWER_ALPHA, base.prompt, base.max_new_tokens
            )
        try:
            tiltsample.sample(recipe.name, target, n, seed=0, **params)
        except TokenLevelAccessError:
            assert recipe.name in recipes.TOKEN_LEVEL, recipe.label
        else:
            assert recipe.name not in recipes.TOKEN_LEVEL, recipe.label


def test_the_engines_doc_example_runs(
    policy: VLLMPolicy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first example of docs/engines.md, run as written (as ``__main__``) on the session's
    engine (its ``close_engines()`` must not stop the engine the other tests share)."""
    import tiltsample.targets.vllm as backend

    text = (Path(__file__).resolve().parents[2] / "docs" / "engines.md").read_text()
    block = text.split("```python no-run run in-process by tests/targets/test_vllm.py")[1]
    code = block.split("\n", 1)[1].split("```", 1)[0]
    assert 'load_vllm_policy(tasks.model_path("arith-ar"))' in code
    monkeypatch.setattr(backend, "close_engines", lambda: None)
    exec(compile(code, "docs/engines.md", "exec"), {"__name__": "__main__"})
    assert "Cost(" in capsys.readouterr().out


def test_batched_compare_cells_equal_the_cells_alone_on_the_engine(
    policy: VLLMPolicy, tmp_path: Path
) -> None:
    """On the engine, the ancestral / best-of-n cells of all problems run as one engine call per
    (recipe, budget): each problem's rows take their seeds from its own cell's generator, so the
    records equal those of the cells run one at a time (the engine's rows do not depend on the
    batch)."""
    from tiltsample.app.compare import run_compare

    kw: dict[str, Any] = {"profile": "test", "num_problems": 3, "budgets": [1, 4]}
    kw.update(samplers=["ancestral", "majority", "best-of-n"], engine="vllm", progress=False)
    alone = run_compare(out_dir=tmp_path / "alone", batch_problems=False, **kw)
    batched = run_compare(out_dir=tmp_path / "batched", **kw)
    same = ("sampler", "budget", "problem", "correct", "response", "generated_tokens")
    assert len(batched.records) == 3 * 5
    for a, b in zip(alone.records, batched.records, strict=True):
        assert {k: a[k] for k in same} == {k: b[k] for k in same}
        assert b["batched"] == 3
    assert batched.cost.model_calls < alone.cost.model_calls
