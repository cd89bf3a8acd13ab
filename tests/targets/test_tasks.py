"""The arithmetic reasoning task, its tokenizer, the shipped models and the training script."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import tiltsample
from tiltsample.decoding import decode_until_complete
from tiltsample.policy import open_session_multi
from tiltsample.row_generators import RowGenerators
from tiltsample.targets import tasks
from tiltsample.targets.tasks import arithmetic
from tiltsample.targets.tasks.train import PRESETS, TrainConfig, evaluate, train
from tiltsample.testing import check_policy

pytestmark = pytest.mark.usefixtures("serial_torch")


# ------------------------------------------------------------------------------ task
def test_problem_format_and_answer() -> None:
    p = arithmetic.Problem((57, 8, 3, 9), ("+", "-", "+"))
    assert p.prompt == "57+8-3+9\n"
    assert p.trace == "57+8=65\n65-3=62\n62+9=71\n# 71"
    assert (
        p.answer == 71 == tasks.answer_of_prompt(p.prompt) == tasks.answer_of_prompt(p.prompt_ids())
    )
    assert p.prompt_ids()[0] == tasks.BOS_ID and p.response_ids()[-1] == tasks.EOS_ID
    assert tasks.extract_answer_ids(p.response_ids()) == 71
    with pytest.raises(ValueError, match="non-negative"):
        arithmetic.Problem((3, 5), ("-",))


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("5+1=6\n# 6", 6),
        ("5+1=6\n# 6 ", None),  # trailing junk
        ("5+1=6\n#6", None),
        ("5+1=6\n# 6\n", None),  # the answer must be the last line
        ("5+1=6", None),
        ("# 12", 12),
        ("", None),
    ],
)
def test_extract_answer(text: str, answer: int | None) -> None:
    assert tasks.extract_answer(text) == answer


def test_extract_requires_eos_by_default() -> None:
    ids = tasks.encode("# 12", bos=False)
    assert tasks.extract_answer_ids(ids) is None
    assert tasks.extract_answer_ids(ids, require_eos=False) == 12
    assert tasks.extract_answer_ids((*ids, tasks.EOS_ID)) == 12


def test_generator_is_deterministic_and_splits_are_disjoint() -> None:
    task = tasks.DEFAULT_TASK
    a = tasks.generate_problems(task, "train", 300, seed=3)
    b = tasks.generate_problems(task, "train", 300, seed=3)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    test = tasks.generate_problems(task, "test", 300, seed=3)
    assert not {p.prompt for p in a} & {p.prompt for p in test}
    assert all(p.split == "test" for p in test) and all(p.split == "train" for p in a)
    assert len({p.prompt for p in test}) == 300
    assert tasks.generate_problems(task, "test", 5, seed=4) != test[:5]


def test_responses_carry_a_reasoning_trace() -> None:
    problems = tasks.held_out_problems(500)
    lengths = [len(p.response_ids()) for p in problems]
    before_answer = [len(p.trace.rsplit("\n", 1)[0]) for p in problems]
    # a written-out trace before the answer: 18-40 tokens (mean 27), responses 23-45 (mean 33)
    assert min(before_answer) >= 18 and sum(before_answer) / len(problems) >= 24
    assert min(lengths) >= 23 and sum(lengths) / len(problems) >= 30
    assert max(lengths) <= tasks.DEFAULT_TASK.max_response_tokens <= tasks.MAX_NEW_TOKENS
    for p in problems[:50]:
        assert tasks.answer_of_prompt(p.prompt) == p.answer
        assert p.answer >= 0


def test_bad_task_parameters() -> None:
    with pytest.raises(ValueError, match="max_ops"):
        tasks.ArithmeticTask(min_ops=3, max_ops=2)
    with pytest.raises(ValueError, match="split"):
        tasks.generate_problems(tasks.DEFAULT_TASK, "dev", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not an arithmetic-task prompt"):
        tasks.answer_of_prompt("hello")
    with pytest.raises(ValueError, match="vocabulary"):
        tasks.encode("x")


# ------------------------------------------------------------------------------ tokenizer
def test_tokenizer_matches_encode_and_keeps_spaces_and_newlines(tmp_path: Path) -> None:
    from transformers import Qwen2Config

    from tiltsample.targets.hf import load_tokenizer

    tok = tasks.build_tokenizer()
    text = "12 + 3\n# 15\n 7"
    assert tuple(tok(text)["input_ids"]) == tasks.encode(text)
    # the Qwen2 tokenizer trap: a folder with a Qwen2 config must still give the char tokenizer
    Qwen2Config(vocab_size=len(tasks.VOCAB)).save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path)
    ids = loaded(text)["input_ids"]
    assert tuple(ids) == tasks.encode(text)
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert (loaded.eos_token_id, loaded.mask_token_id) == (tasks.EOS_ID, tasks.MASK_ID)


# ------------------------------------------------------------------------------ verifier
def test_verifier_reward() -> None:
    p = tasks.held_out_problems(1)[0]
    reward = tasks.verifier()
    good = p.response_ids()
    body = p.trace.rsplit("# ", 1)[0] + f"# {p.answer + 1}"
    wrong = (*tasks.encode(body, bos=False), tasks.EOS_ID)
    cut = good[:-1]  # no EOS: no answer
    vals = reward(p.prompt_ids(), [good, wrong, cut, ()])
    assert vals.tolist() == [1.0, 0.0, 0.0, 0.0] and vals.dtype == torch.float64
    assert tasks.verifier(wrong=-math.inf)(p.prompt_ids(), [wrong]).item() == -math.inf


# ------------------------------------------------------------------------------ shipped model
@pytest.fixture(scope="module")
def policy() -> Any:
    return tasks.load_policy()


def test_shipped_model_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from tiltsample.targets.hf import HFPolicy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tasks.model_path("arith-ar")
    assert (folder / "model.safetensors").stat().st_size < 8 * 2**20
    pol = HFPolicy.from_pretrained(folder)
    n = sum(p.numel() for p in pol.model.parameters())
    assert 0.5e6 < n < 1.5e6
    assert pol.vocab_size == len(tasks.VOCAB) and pol.eos_id == tasks.EOS_ID
    text = "57+8-3+9\n"
    assert pol.decode(pol.encode(text)) == text
    with pytest.raises(ValueError, match="name"):
        tasks.model_path("no-such-model")


def test_shipped_model_is_a_policy(policy: Any) -> None:
    prompt = tasks.held_out_problems(1)[0].prompt_ids()
    check_policy(policy, prompt=prompt, max_len=6, batch=4, atol=1e-4)


def test_shipped_model_is_mediocre_but_capable(policy: Any) -> None:
    """Accuracy at temperature 1 well inside (0.15, 0.65), pass@4 clearly higher.

    40 problems × 4 draws; the shipped model measured 0.34 (T = 1) / 0.80 (pass@8) on 500
    problems (docs/hf.md). Problem-level clustering inflates the standard error to at most
    ``0.5/sqrt(40) ≈ 0.08``, so the bounds are more than 2 standard errors from 0.34.
    """
    config = PRESETS["arith-ar"]
    problems = tasks.held_out_problems(40, seed=5)
    scores = evaluate(policy.model, config, problems, num_samples=4, seed=0)
    assert 0.15 < scores["accuracy_t1"] < 0.65, scores
    assert scores["pass@4"] > scores["accuracy_t1"] + 0.1, scores


def test_problem_target_on_the_shipped_model(policy: Any) -> None:
    p = tasks.held_out_problems(1)[0]
    target = tasks.problem_target(p, policy, lam=0.1)
    assert target.meta["answer"] == p.answer
    good = p.response_ids()
    dens = target.log_density([good])
    assert math.isclose(
        float(dens[0]), float(policy.sequence_logprob(target.prompt, [good])[0]) + 10.0
    )
    # the core samplers run unchanged on it
    out = tiltsample.sample("best-of-n", target, 2, seed=0, num_candidates=4, selection="argmax")
    assert len(out) == 2 and out.cost.generated_tokens > 0
    same = tasks.problem_target(p.prompt, policy)
    assert same.prompt == target.prompt
    assert tasks.problem_target(p.prompt_ids(), policy).meta["answer"] == p.answer


# ------------------------------------------------------------------------------ training
def _weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny-ar", "tiny-dlm"])
def test_training_is_deterministic(name: str, tmp_path: Path) -> None:
    config = PRESETS[name]
    rng = torch.get_rng_state()
    a = train(config, out_dir=tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), rng), "training touched the global RNG"
    b = train(config)
    wa, wb = _weights(a.model), _weights(b.model)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert a.history[-1]["loss"] < a.history[0]["loss"]
    other = train(TrainConfig.from_dict({**config.as_dict(), "seed": 1}))
    assert not all(torch.equal(wa[k], v) for k, v in _weights(other.model).items())
    # the saved folder loads back as the right policy type
    from tiltsample.targets.hf import HFMaskedDiffusionPolicy, HFPolicy

    folder = tmp_path / "a"
    if config.kind == "ar":
        pol: Any = HFPolicy.from_pretrained(folder)
    else:
        pol = HFMaskedDiffusionPolicy.from_pretrained(folder)
        assert pol.length == config.response_length and pol.unmasking == "drawn-confidence"
        assert not pol.model.config.is_causal
    x = torch.tensor([list(tasks.encode("12+3\n"))])
    assert torch.allclose(pol.model(input_ids=x).logits, a.model(input_ids=x).logits, atol=1e-6)


def test_a_run_is_the_prefix_of_a_longer_run() -> None:
    """Constant learning rate after warm-up: stopping at n steps = the first n steps of a longer
    run (so the shipped model's stopping step could be chosen from one run)."""
    short = PRESETS["tiny-ar"]
    longer = TrainConfig.from_dict({**short.as_dict(), "steps": short.steps + 5})
    a, b = train(short), train(longer)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history[: short.steps]]


def test_train_config_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        TrainConfig(kind="gan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="response_length"):
        TrainConfig(kind="dlm", response_length=10)
    with pytest.raises(ValueError, match="hidden_size"):
        TrainConfig(hidden_size=30, num_heads=4)


def test_cli_train_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tiltsample.app.cli import main

    out = tmp_path / "m"
    argv = ["train-tiny", "--model", "tiny-ar", "--out", str(out), "--no-progress"]
    assert main([*argv, "--steps", "5", "--evaluate", "3"]) == 0
    printed = capsys.readouterr().out
    assert "trained tiny-ar" in printed and "accuracy_t1" in printed
    assert (out / "model.safetensors").is_file() and (out / "tiltsample_train.json").is_file()
    meta = (out / "tiltsample_train.json").read_text()
    assert '"steps": 5' in meta


# ------------------------------------------------------------------------------ shipped DLM
@pytest.fixture(scope="module")
def dlm() -> Any:
    return tasks.load_diffusion_policy()


def test_shipped_diffusion_model_loads_offline(dlm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tiltsample.diffusion import MaskedDiffusionPolicy
    from tiltsample.targets.hf import HFMaskedDiffusionPolicy

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = HFMaskedDiffusionPolicy.from_pretrained(tasks.model_path("arith-dlm"))
    for p in (dlm, again):
        assert isinstance(p, MaskedDiffusionPolicy)
        assert (p.length, p.num_steps, p.block_length) == (48, 48, 8)
        assert p.shift and p.unmasking == "drawn-confidence" and not p.model.config.is_causal
        assert p.mask_id == tasks.MASK_ID and p.eos_id == tasks.EOS_ID


@pytest.mark.slow
def test_shipped_diffusion_model_is_mediocre_but_capable(dlm: Any) -> None:
    """24 problems × 4 draws of the base sampler; measured 0.335 (T = 1) on 500 problems with 8
    draws (docs/hf.md); the bounds are more than 2 clustered standard errors (≤ 0.1) away."""
    import json

    meta = json.loads((tasks.model_path("arith-dlm") / "tiltsample_train.json").read_text())
    config = TrainConfig.from_dict(meta["train_config"])
    problems = tasks.held_out_problems(24, seed=7)
    scores = evaluate(dlm.model, config, problems, num_samples=4, seed=0)
    assert 0.12 < scores["accuracy_t1"] < 0.65, scores
    assert scores["pass@4"] > scores["accuracy_t1"] + 0.1, scores


def test_policy_sampler_matches_the_training_evaluation_sampler(dlm: Any) -> None:
    """The policy's denoise_step and the batched evaluation loop are the same base sampler:
    at temperature ~0 (argmax draws) both give the same responses."""
    from tiltsample.targets.tasks.evaluation import dlm_samples

    problems = tasks.held_out_problems(3, seed=2)
    cold = dlm.with_options(temperature=1e-6)
    fast = dlm_samples(dlm.model, problems, 1, 0.0, torch.Generator(), 48, 8, 1)
    for p, (want,) in zip(problems, fast, strict=True):
        seqs, states, cost = cold.sample(p.prompt_ids(), 1, torch.Generator().manual_seed(0))
        assert seqs[0] == want
        assert not bool((states == tasks.MASK_ID).any()) and cost.generated_tokens == 48


def test_ets_runs_on_the_shipped_diffusion_target(dlm: Any) -> None:
    from tiltsample.samplers import ets

    p = tasks.held_out_problems(1)[0]
    target = tasks.problem_target(p, dlm, lam=0.1)
    assert target.max_new_tokens == 48
    out = tiltsample.sample(
        ets.sampler(target, num_samples=1, num_candidates=2, num_rollouts=1, block_size=24),
        target,
        1,
        seed=0,
    )
    assert len(out) == 1 and out.cost.model_calls > 0


def test_dropping_finished_rows_keeps_the_draws_and_saves_forward_tokens() -> None:
    """``decode_until_complete(drop_finished=True)`` on the shipped model: the same tokens and
    generator states as keeping every row (laws equal up to a narrower forward's float error),
    fewer forward tokens, the same model calls; what ``propose_many`` and the ETS rollouts use."""
    policy = tasks.load_policy()
    prompts = [p.prompt_ids() for p in tasks.held_out_problems(4)]
    runs = []
    for drop in (False, True):
        gens = [torch.Generator().manual_seed(11 + i) for i in range(len(prompts))]
        session = open_session_multi(policy, prompts, 8)
        out = decode_until_complete(
            session,
            RowGenerators.of_sizes(gens, [8] * len(prompts)),
            eos_id=policy.eos_id,
            max_length=tasks.MAX_NEW_TOKENS,
            drop_finished=drop,
        )
        runs.append((out, session.cost, session.batch_size, [g.get_state() for g in gens]))
    (a, cost_a, rows_a, states_a), (b, cost_b, rows_b, states_b) = runs
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.new_lengths, b.new_lengths)
    assert a.generated_tokens == b.generated_tokens
    assert torch.allclose(a.log_p, b.log_p, atol=1e-5) and torch.allclose(
        a.log_q, b.log_q, atol=1e-5
    )
    assert all(torch.equal(x, y) for x, y in zip(states_a, states_b, strict=True))
    assert cost_b.model_calls == cost_a.model_calls
    assert cost_b.forward_tokens < 0.9 * cost_a.forward_tokens
    assert rows_a == 32 and rows_b < 32  # the finished rows left the session
