"""The transformers backend: HFPolicy sessions against full recomputes, the decode law, samplers.

Everything runs on tiny random Qwen2 models built from a config (no hub access). Exact checks
first (session = recompute, crop + re-extend, select, fork), then seeded chi-square tests of the
decode law with the significance level stated, then the core samplers unchanged on HF targets.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy import stats

import tiltsample
from tiltsample.decoding import decode_until_complete, rows_to_seqs
from tiltsample.samplers import _template, ancestral, beam, best_of_n, imh
from tiltsample.target import TiltedTarget
from tiltsample.targets.hf import (
    HFMaskedDiffusionPolicy,
    HFPolicy,
    HFSession,
    filtered_logprobs,
    load_tokenizer,
)
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.testing import check_policy, check_sampler

V = 8
EOS = 0
BOS = 1
ALPHA = 1e-3  # significance level of every chi-square test below (seeded, so deterministic)


def tiny_model(
    dtype: torch.dtype = torch.float64,
    *,
    causal: bool = True,
    seed: int = 0,
    vocab: int = V,
    init: float = 0.3,
) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=init,
        is_causal=causal,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def policy() -> HFPolicy:
    return HFPolicy(tiny_model())


@pytest.fixture(scope="module")
def policy32() -> HFPolicy:
    return HFPolicy(tiny_model(torch.float32))


pytestmark = pytest.mark.usefixtures("serial_torch")


def _recompute(policy: HFPolicy, prompt: tuple[int, ...], session: HFSession) -> torch.Tensor:
    """Next-token laws by full forwards; rows that ended with EOS are a point mass on EOS."""
    rows = [tuple(r) for r in session.tokens().tolist()]
    out = torch.full((len(rows), V), -math.inf, dtype=torch.float64)
    out[:, EOS] = 0.0
    live = [i for i, r in enumerate(rows) if EOS not in r]
    if live:
        out[live] = policy.next_logprobs(prompt, [rows[i] for i in live])
    return out


# ------------------------------------------------------------------------------ exact checks
@pytest.mark.parametrize("prompt", [(), (3, 4, 5)])
def test_check_policy_float64(policy: HFPolicy, prompt: tuple[int, ...]) -> None:
    check_policy(policy, prompt=prompt, max_len=6, batch=6, atol=1e-9)


def test_check_policy_float32(policy32: HFPolicy) -> None:
    check_policy(policy32, prompt=(2, 3), max_len=6, batch=6, atol=1e-4)


def test_session_equals_full_recompute_at_every_step(policy: HFPolicy) -> None:
    prompt = (2, 5, 3)
    gen = torch.Generator().manual_seed(1)
    session = policy.session(prompt, 5)
    for _ in range(7):
        lp = session.logprobs()
        assert torch.allclose(lp, _recompute(policy, prompt, session), atol=1e-10)
        assert torch.allclose(lp.logsumexp(-1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
        session.extend(torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1))


def test_multi_token_extend_and_sequence_logprob(policy: HFPolicy) -> None:
    prompt = (4,)
    xs = [(2, 3, 4, 5, 0), (3, 3, 0), (6,)]
    per = policy.sequence_logprob(prompt, xs, per_token=True)
    for i, x in enumerate(xs):
        for t in range(len(x)):
            want = policy.next_logprobs(prompt, [x[:t]])[0, x[t]]
            assert math.isclose(float(per[i, t]), float(want), abs_tol=1e-10)
        assert bool((per[i, len(x) :] == 0).all())
    s = policy.session(prompt, 1)
    s.extend(torch.tensor([[2, 3, 4]]))
    assert torch.allclose(s.logprobs()[0], policy.next_logprobs(prompt, [(2, 3, 4)])[0], atol=1e-10)


def test_crop_and_re_extend_reproduces(policy: HFPolicy) -> None:
    prompt = (3, 2)
    s = policy.session(prompt, 3)
    toks = torch.tensor([[2, 3, 4, 5, 6], [3, 3, 3, 3, 3], [7, 6, 5, 4, 3]])
    s.extend(toks)
    before = s.logprobs().clone()
    calls = s.cost.model_calls
    for n in (1, 3, 5):
        s.truncate(n)
        assert s.length == 5 - n
        assert torch.allclose(s.logprobs(), _recompute(policy, prompt, s), atol=1e-10)
        s.extend(toks[:, 5 - n :])
        assert torch.allclose(s.logprobs(), before, atol=1e-10)
    # each crop re-feeds one token per row (plus the crop's removed tokens once re-extended)
    assert s.cost.model_calls > calls


def test_truncate_cost_refeeds_one_token(policy: HFPolicy) -> None:
    s = policy.session((3, 2), 4)
    s.extend(torch.full((4, 3), 5))
    s.logprobs()
    fwd = s.cost.forward_tokens
    s.truncate(1)
    s.logprobs()
    assert s.cost.forward_tokens - fwd == 4  # one re-fed token per row, no re-encoding


def test_select_equals_re_decoding_selected_prefixes(policy: HFPolicy) -> None:
    prompt = (5,)
    gen = torch.Generator().manual_seed(2)
    s = policy.session(prompt, 4)
    decode_until_complete(s, gen, eos_id=EOS, max_length=5)
    s.truncate(1)  # rows may end at EOS; keep some live rows
    idx = torch.tensor([3, 3, 0, 1, 2, 0])
    rows = s.tokens()[idx]
    s.select(idx)
    fresh = policy.session(prompt, 6)
    fresh.extend(rows)
    assert torch.equal(s.tokens(), fresh.tokens())
    assert torch.allclose(s.logprobs(), fresh.logprobs(), atol=1e-10)
    s.extend(torch.tensor([2, 3, 4, 5, 6, 7]))
    fresh.extend(torch.tensor([2, 3, 4, 5, 6, 7]))
    assert torch.allclose(s.logprobs(), fresh.logprobs(), atol=1e-10)


def test_fork_is_independent_and_shares_the_prefix(policy: HFPolicy) -> None:
    s = policy.session((2, 3, 4), 2)
    s.extend(torch.tensor([[5, 6], [6, 5]]))
    base = s.logprobs().clone()
    twin = s.fork()
    assert twin.cost == tiltsample.Cost()
    k0 = s._cache.layers[0].keys
    assert twin._cache.layers[0].keys.data_ptr() == k0.data_ptr()  # copy-on-write
    twin.extend(torch.tensor([3, 3]))
    twin.logprobs()
    twin.select(torch.tensor([1, 1, 0]))
    twin.truncate(2)
    assert torch.equal(s._cache.layers[0].keys, k0)
    assert torch.allclose(s.logprobs(), base, atol=0)
    s.extend(torch.tensor([7, 7]))
    assert torch.allclose(s.logprobs(), _recompute(policy, (2, 3, 4), s), atol=1e-10)
    assert torch.allclose(twin.logprobs(), _recompute(policy, (2, 3, 4), twin), atol=1e-10)


def test_prompt_encoded_once_and_cost_counts_what_the_model_sees(policy: HFPolicy) -> None:
    seen: list[int] = []
    handle = policy.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(int(kw["input_ids"].numel())), with_kwargs=True
    )
    try:
        prompt = (2, 3, 4, 5, 6, 7)
        s = policy.session(prompt, 16)
        gen = torch.Generator().manual_seed(0)
        d = decode_until_complete(s, gen, eos_id=EOS, max_length=6)
    finally:
        handle.remove()
    assert seen[0] == len(prompt)  # the prompt once, batch 1
    assert all(n % 16 == 0 for n in seen[1:])  # then one token per row and call
    assert s.cost.forward_tokens == sum(seen)
    assert s.cost.model_calls == len(seen)
    assert d.generated_tokens <= 16 * 6


def test_finished_rows_are_a_point_mass_on_eos(policy: HFPolicy) -> None:
    s = policy.session((3,), 2)
    s.extend(torch.tensor([[4, EOS], [4, 5]]))
    lp = s.logprobs()
    assert float(lp[0, EOS]) == 0.0 and bool(torch.isneginf(lp[0, 1:]).all())
    s.extend(torch.tensor([6, 6]))
    assert s.tokens()[0].tolist() == [4, EOS, EOS]  # EOS padding whatever the caller passes


def test_empty_batch_and_empty_selection(policy: HFPolicy) -> None:
    s = policy.session((3,), 0)
    assert s.logprobs().shape == (0, V)
    s2 = policy.session((3,), 2)
    s2.logprobs()
    s2.select(torch.tensor([], dtype=torch.long))
    assert s2.batch_size == 0 and s2.logprobs().shape == (0, V)


def test_bad_input_names_the_parameter(policy: HFPolicy) -> None:
    s = policy.session((3,), 2)
    with pytest.raises(ValueError, match="tokens"):
        s.extend(torch.tensor([V, 1]))
    with pytest.raises(ValueError, match="n must"):
        s.truncate(1)
    with pytest.raises(ValueError, match="indices"):
        s.select(torch.tensor([2]))
    with pytest.raises(ValueError, match="eos_id"):
        HFPolicy(tiny_model(), eos_id=V)
    with pytest.raises(TypeError, match="model"):
        HFPolicy("not a model")
    no_bos = HFPolicy(tiny_model(), bos_id=None)
    no_bos._bos = None
    with pytest.raises(ValueError, match="prompt is empty"):
        no_bos.session((), 1)
    with pytest.raises(ValueError, match="top_p"):
        policy.generate((3,), 2, torch.Generator(), max_new_tokens=2, top_p=0.0)


# ------------------------------------------------------------------------------ sampling laws
def _chi_square_p(counts: Counter[Any], law: dict[Any, float], n: int) -> float:
    """p-value of Pearson's test, pooling cells with expected count < 5 into one."""
    obs, exp = [], []
    rest_o, rest_e = 0.0, 0.0
    for key, p in law.items():
        if n * p >= 5:
            obs.append(counts.get(key, 0))
            exp.append(n * p)
        else:
            rest_o += counts.get(key, 0)
            rest_e += n * p
    if rest_e > 0:
        obs.append(rest_o)
        exp.append(rest_e)
    assert sum(counts.values()) == n and abs(sum(exp) - n) < 1e-6 * n
    assert set(counts) <= set(law), "a draw outside the support"
    return float(stats.chisquare(obs, exp).pvalue)


def test_decode_loop_law_equals_softmax_of_logits(policy: HFPolicy) -> None:
    """Two-token responses: the empirical joint of the own decode loop vs the exact law
    ``p(x1) p(x2 | x1)`` from full forwards (softmax of the logits)."""
    prompt = (3, 4)
    n = 20_000
    gen = torch.Generator().manual_seed(7)
    s = policy.session(prompt, n)
    d = decode_until_complete(s, gen, eos_id=EOS, max_length=2)
    counts = Counter(rows_to_seqs(d.tokens, EOS))
    law: dict[Any, float] = {}
    p1 = policy.next_logprobs(prompt, [()])[0].exp()
    law[(EOS,)] = float(p1[EOS])
    firsts = [(v,) for v in range(V) if v != EOS]
    p2 = policy.next_logprobs(prompt, firsts).exp()
    for (v,), row in zip(firsts, p2, strict=True):
        for w in range(V):
            law[(v, w)] = float(p1[v] * row[w])
    assert _chi_square_p(counts, law, n) > ALPHA
    # the per-token log-probs the loop reports are the model's
    seqs = rows_to_seqs(d.tokens, EOS)
    assert torch.allclose(d.log_p[:50], policy.sequence_logprob(prompt, seqs[:50]), atol=1e-10)


@pytest.mark.parametrize(("top_k", "top_p", "temperature"), [(3, None, 1.0), (None, 0.7, 0.8)])
def test_generate_samples_the_filtered_law(
    policy: HFPolicy, top_k: int | None, top_p: float | None, temperature: float
) -> None:
    prompt = (2,)
    n = 20_000
    out = policy.generate(
        prompt,
        n,
        torch.Generator().manual_seed(3),
        max_new_tokens=1,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )
    lq = filtered_logprobs(
        policy.next_logprobs(prompt, [()])[0], temperature=temperature, top_k=top_k, top_p=top_p
    )
    law = {(v,): float(lq[v].exp()) for v in range(V) if lq[v] > -math.inf}
    counts = Counter(out.sequences)
    assert _chi_square_p(counts, law, n) > ALPHA
    for x, q in zip(out.sequences[:20], out.log_q[:20].tolist(), strict=True):
        assert math.isclose(q, float(lq[x[0]]), abs_tol=1e-12)


def test_filtered_logprobs_exact() -> None:
    lp = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1], dtype=torch.float64))
    k2 = filtered_logprobs(lp, top_k=2).exp()
    # tie at the boundary broken by token id: {1, 2}
    assert torch.allclose(k2, torch.tensor([0, 2 / 3, 1 / 3, 0, 0], dtype=torch.float64))
    p = filtered_logprobs(lp, top_p=0.5).exp()  # 0.4 < 0.5, so the next token (id 2) is kept
    assert torch.allclose(p, torch.tensor([0, 2 / 3, 1 / 3, 0, 0], dtype=torch.float64))
    assert torch.allclose(filtered_logprobs(lp), lp)


def test_same_seed_same_output(policy: HFPolicy) -> None:
    a = policy.generate((3,), 8, torch.Generator().manual_seed(5), max_new_tokens=6)
    b = policy.generate((3,), 8, torch.Generator().manual_seed(5), max_new_tokens=6)
    assert a.sequences == b.sequences and torch.equal(a.log_p, b.log_p)


# ------------------------------------------------------------------------------ samplers
def _target(policy: HFPolicy, truncation: str) -> TiltedTarget:
    return TiltedTarget(
        policy,
        ContainsTokenReward(3, EOS),
        0.5,
        (2, 4),
        5,
        truncation,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("truncation", ["stop", "condition"])
def test_core_samplers_run_unchanged_on_hf_targets(policy: HFPolicy, truncation: str) -> None:
    target = _target(policy, truncation)
    builds = [
        ancestral.sampler(target, num_samples=4),
        ancestral.sampler(target, num_samples=4, temperature=0.7),
        best_of_n.sampler(target, num_samples=3, num_candidates=4),
        best_of_n.sampler(target, num_samples=3, num_candidates=4, selection="argmax"),
        _template.sampler(target, num_samples=4, batch_size=2),
        imh.sampler(target, num_samples=2, num_steps=3),
        beam.sampler(target, num_samples=2, num_beams=3),
    ]
    for algorithm in builds:
        out = check_sampler(algorithm, target, num_samples=_n(algorithm))
        assert out.cost.forward_tokens > 0 and out.cost.model_calls > 0
    trace = tiltsample.run_chains(
        imh.sampler(target, num_samples=2, num_steps=3), target, 2, seed=0
    )
    assert trace.num_draws == 3 and "log_density" in trace.stats


def _n(algorithm: tiltsample.SamplingAlgorithm) -> int:
    state = algorithm.init(torch.Generator().manual_seed(0))
    if hasattr(state, "remaining"):
        return int(state.remaining)
    if hasattr(state, "num_samples"):
        return int(state.num_samples)
    return len(state.sequences)


def test_importance_weights_are_exact_on_hf(policy: HFPolicy) -> None:
    """log w = log p + log_tilt - log q with q at temperature 0.7: check against recomputes."""
    target = _target(policy, "stop")
    out = tiltsample.sample(
        _template.sampler(target, num_samples=16, temperature=0.7), target, 16, seed=1
    )
    log_p = policy.sequence_logprob(target.prompt, out.sequences)
    assert out.log_reference is not None
    assert torch.allclose(out.log_reference, log_p, atol=1e-10)


# ------------------------------------------------------------------------------ loading
def test_from_pretrained_offline_and_tokenizer_trap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiltsample.targets.tasks import build_tokenizer

    model = tiny_model(torch.float32, vocab=20)
    model.config.eos_token_id = 2
    model.save_pretrained(str(tmp_path))
    build_tokenizer().save_pretrained(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = HFPolicy.from_pretrained(tmp_path)
    assert loaded.eos_id == 2 and loaded.bos_id == 1
    text = "12 + 3\n# 15"
    ids = loaded.encode(text)
    assert ids[0] == 1 and loaded.decode(ids) == text  # spaces and newlines survive
    assert load_tokenizer(tmp_path).decode(list(ids), skip_special_tokens=True) == text
    x = torch.tensor([list(ids)])
    assert torch.allclose(loaded.model(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6)


# ------------------------------------------------------------------------------ masked diffusion
@pytest.fixture(scope="module")
def dlm() -> HFMaskedDiffusionPolicy:
    return HFMaskedDiffusionPolicy(
        tiny_model(causal=False, init=0.5),
        length=2,
        mask_id=V - 1,
        eos_id=EOS,
        bos_id=BOS,
        unmasking="fixed",
    )


def test_diffusion_protocol_and_step_mechanics(dlm: HFMaskedDiffusionPolicy) -> None:
    from tiltsample.diffusion import MaskedDiffusionPolicy, is_masked_diffusion

    assert isinstance(dlm, MaskedDiffusionPolicy) and is_masked_diffusion(dlm)
    states = dlm.initial_states(3)
    lp = dlm.position_logprobs((2, 3), states)
    assert lp.shape == (3, 2, V)
    assert bool(torch.isneginf(lp[..., V - 1]).all())  # never predicts the mask
    assert torch.allclose(lp.logsumexp(-1), torch.zeros(3, 2, dtype=torch.float64), atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    s1, cost = dlm.denoise_step((2, 3), states, 0, gen)
    assert bool(((s1 != V - 1).sum(1) == 1).all()) and bool((s1[:, 0] != V - 1).all())
    assert cost.model_calls == 1 and cost.forward_tokens == 3 * 4 and cost.generated_tokens == 3
    s2, _ = dlm.denoise_step((2, 3), s1, 1, gen)
    assert torch.equal(s2[:, 0], s1[:, 0]) and bool((s2 != V - 1).all())
    with pytest.raises(ValueError, match="step"):
        dlm.denoise_step((2, 3), states, 2, gen)
    with pytest.raises(ValueError, match="unmasking"):
        HFMaskedDiffusionPolicy(dlm.model, length=2, mask_id=V - 1, eos_id=0, unmasking="x")  # type: ignore[arg-type]


def test_diffusion_quota_splits_length_evenly() -> None:
    p = HFMaskedDiffusionPolicy(
        tiny_model(causal=False), length=7, num_steps=3, mask_id=V - 1, eos_id=EOS
    )
    assert [p.quota(s) for s in range(3)] == [3, 2, 2]
    assert sum(p.quota(s) for s in range(3)) == 7
    blocks = HFMaskedDiffusionPolicy(
        tiny_model(causal=False), length=6, num_steps=6, block_length=2, mask_id=V - 1, eos_id=EOS
    )
    assert [blocks.block(s) for s in (0, 1, 2, 5)] == [
        range(0, 2),
        range(0, 2),
        range(2, 4),
        range(4, 6),
    ]
    gen = torch.Generator().manual_seed(0)
    st = blocks.initial_states(4)
    for s in range(6):
        st, _ = blocks.denoise_step((2,), st, s, gen)
        revealed = (st != V - 1).sum(1)
        assert bool((revealed == s + 1).all())
        assert bool((st[:, blocks.block(s).stop :] == V - 1).all())  # later blocks wait
    with pytest.raises(ValueError, match="block_length"):
        p.with_options(block_length=3)


def _dlm_exact_law(
    p: HFMaskedDiffusionPolicy, prompt: tuple[int, ...]
) -> dict[tuple[int, int], float]:
    """Exact output law of the L = 2, T = 2 base sampler, by enumerating its paths."""
    m = p.mask_id
    lp0 = p.position_logprobs(prompt, torch.tensor([[m, m]]))[0]
    law: dict[tuple[int, int], float] = {}

    def add(x: tuple[int, int], w: float) -> None:
        law[x] = law.get(x, 0.0) + w

    cond_first = p.position_logprobs(prompt, torch.tensor([[v, m] for v in range(V)]))[:, 1]
    cond_second = p.position_logprobs(prompt, torch.tensor([[m, v] for v in range(V)]))[:, 0]
    for d1, d2 in itertools.product(range(V), range(V)):
        w = float(lp0[0, d1].exp() * lp0[1, d2].exp())
        if w == 0:
            continue
        if p.unmasking == "fixed":
            first = True
        elif p.unmasking == "max-confidence":  # the more peaked law first, ties to the left
            first = float(lp0[0].max()) >= float(lp0[1].max())
        else:  # drawn-confidence: the higher probability of the drawn token, ties to the left
            first = float(lp0[0, d1]) >= float(lp0[1, d2])
        if first:
            for w2 in range(V):
                add((d1, w2), w * float(cond_first[d1, w2].exp()))
        else:
            for w1 in range(V):
                add((w1, d2), w * float(cond_second[d2, w1].exp()))
    return law


@pytest.mark.parametrize("rule", ["fixed", "drawn-confidence", "max-confidence"])
def test_diffusion_base_sampler_law(rule: str) -> None:
    """Chi-square of the sampler's draws against its exact path-summed output law."""
    p = HFMaskedDiffusionPolicy(
        tiny_model(causal=False, init=0.5),
        length=2,
        mask_id=V - 1,
        eos_id=EOS,
        bos_id=BOS,
        unmasking=rule,  # type: ignore[arg-type]
    )
    prompt = (2, 3)
    law = _dlm_exact_law(p, prompt)
    n = 20_000
    _, states, cost = p.sample(prompt, n, torch.Generator().manual_seed(11))
    counts = Counter(tuple(r) for r in states.tolist())
    assert _chi_square_p(counts, law, n) > ALPHA
    assert cost.model_calls == 2 and cost.generated_tokens == 2 * n


def test_chat_template_is_used_when_present() -> None:
    from tiltsample.targets.tasks import build_tokenizer, encode

    tok = build_tokenizer()
    pol = HFPolicy(tiny_model(torch.float32, vocab=20), tok, eos_id=2)
    with pytest.raises(ValueError, match="chat_template"):
        pol.encode("1+1\n", chat=True)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}#{% endif %}"
    )
    assert pol.encode("1+1\n", chat=True) == encode("1+1\n#")
    assert pol.encode("1+1\n") == encode("1+1\n")


def test_ets_runs_on_an_hf_masked_diffusion_target() -> None:
    from tiltsample.samplers import ets

    p = HFMaskedDiffusionPolicy(
        tiny_model(causal=False),
        length=6,
        mask_id=V - 1,
        eos_id=EOS,
        bos_id=BOS,
        forbidden_ids=[BOS],
    )
    target = TiltedTarget(p, ContainsTokenReward(3, EOS), 0.5, (2, 4), 6)  # type: ignore[arg-type]
    algorithm = ets.sampler(target, num_samples=3, num_candidates=2, num_rollouts=2)
    out = check_sampler(algorithm, target, num_samples=3)
    assert out.cost.model_calls > 0 and out.cost.generated_tokens >= 3 * 6


def test_diffusion_shift_reads_the_previous_position() -> None:
    model = tiny_model(causal=False)
    p = HFMaskedDiffusionPolicy(model, length=3, mask_id=V - 1, eos_id=EOS, shift=True)
    states = torch.tensor([[V - 1, 4, V - 1]])
    ids = torch.tensor([[2, 3, V - 1, 4, V - 1]])
    logits = model(input_ids=ids).logits[0].to(torch.float64)
    logits[:, V - 1] = -math.inf
    want = torch.log_softmax(logits[1:4], dim=-1)
    assert torch.allclose(p.position_logprobs((2, 3), states)[0], want, atol=1e-10)
    assert p.with_options(num_steps=1).shift
