"""Verifiable rewards: exact match, self-consistency (majority vote), reward-model wrapper."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tiltsample.reward import Reward
from tiltsample.targets import tasks
from tiltsample.targets.rewards import (
    ExactMatchReward,
    RewardModelReward,
    SelfConsistencyReward,
    majority_vote,
)

EOS = tasks.EOS_ID


def resp(text: str) -> tuple[int, ...]:
    return (*tasks.encode(text, bos=False), EOS)


PROMPT = tasks.encode("10+5-3\n")  # answer 12


# ------------------------------------------------------------------------------ exact match
def test_exact_match_is_a_reward() -> None:
    r = tasks.verifier()
    assert isinstance(r, Reward)
    xs = [resp("10+5=15\n15-3=12\n# 12"), resp("# 12"), resp("# 13"), resp("12"), ()]
    assert r(PROMPT, xs).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    generic = ExactMatchReward(lambda x: str(len(x)), lambda p: "3")
    assert generic((), [(1, 2, 3), (1,)]).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="wrong"):
        ExactMatchReward(lambda x: None, lambda p: "", wrong=1.0)
    with pytest.raises(TypeError, match="callables"):
        ExactMatchReward("x", lambda p: "")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ majority vote
@pytest.mark.parametrize(
    ("answers", "vote"),
    [
        (["3", "4", "4", "3"], "3"),  # tie: the answer seen first wins
        (["4", "3", "3", "4"], "4"),
        (["1", None, "2", "2"], "2"),
        ([None, None], None),
        ([], None),
        (["7"], "7"),
    ],
)
def test_majority_vote_breaks_ties_deterministically(
    answers: list[str | None], vote: str | None
) -> None:
    assert majority_vote(answers) == vote


def test_majority_vote_is_independent_of_hash_seed() -> None:
    """A set-based vote changed between interpreter runs; this one is a function of the order."""
    import subprocess
    import sys

    code = (
        "from tiltsample.targets.rewards import majority_vote\n"
        "print(majority_vote(['b', 'a', 'c', 'a', 'c', 'b']))"
    )
    procs = [  # both interpreters at once: each spends seconds importing torch
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": str(s), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for s in (1, 2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert {out.strip() for out, _ in results} == {"b"}


def test_self_consistency_reward() -> None:
    sc = tasks.self_consistency()
    xs = [resp("# 12"), resp("# 13"), resp("# 13"), resp("1+1=2")]
    assert sc(PROMPT, xs).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert sc.pseudo_label(xs) == "13"
    # the cache is explicit and the object immutable: with_answers returns a new reward
    grown = sc.with_answers(["12", "12", "12"])
    assert sc.cache == () and grown.cache == ("12", "12", "12")
    assert grown(PROMPT, xs).tolist() == [1.0, 0.0, 0.0, 0.0]
    cache_only = SelfConsistencyReward(tasks.answer_text_of_response, ["13"], include_batch=False)
    assert cache_only(PROMPT, [resp("# 12"), resp("# 12")]).tolist() == [0.0, 0.0]
    # the LLaDA code's extra rule: a top answer seen once gives every reward 0
    strict = tasks.self_consistency(require_repeat=True)
    assert strict(PROMPT, [resp("# 1"), resp("# 2")]).tolist() == [0.0, 0.0]
    assert strict(PROMPT, [resp("# 1"), resp("# 1")]).tolist() == [1.0, 1.0]
    assert strict.pseudo_label([resp("# 1"), resp("# 2")]) is None


# ------------------------------------------------------------------------------ reward model
@pytest.fixture(scope="module")
def reward_model() -> Any:
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    cfg = Qwen2Config(
        vocab_size=len(tasks.VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=tasks.PAD_ID,
        initializer_range=0.3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForSequenceClassification(cfg)
    return model.eval()


def test_reward_model_wrapper(reward_model: Any) -> None:
    tok = tasks.build_tokenizer()
    r = RewardModelReward(reward_model, tok, tasks.decode, eos_id=EOS, label=1)
    assert isinstance(r, Reward)
    xs = [resp("# 12"), resp("10+5=15\n15-3=12\n# 12"), resp("# 1")]
    vals = r(PROMPT, xs)
    assert vals.shape == (3,) and vals.dtype == torch.float64
    assert torch.equal(vals, r(PROMPT, xs))  # deterministic
    # batching (padding) does not change a score beyond float32 rounding
    single = torch.cat([r(PROMPT, [x]) for x in xs])
    assert torch.allclose(vals, single, atol=1e-5)
    small = RewardModelReward(reward_model, tok, tasks.decode, eos_id=EOS, label=1, max_batch=1)
    assert torch.allclose(small(PROMPT, xs), vals, atol=1e-5)
    # the text is prompt + response content; EOS dropped
    assert r.texts(PROMPT, xs[:1]) == ["10+5-3\n# 12"]
    # by hand
    enc = tok(["10+5-3\n# 12"], return_tensors="pt")
    with torch.no_grad():
        want = reward_model(**enc).logits[0, 1]
    assert math.isclose(float(vals[0]), float(want), abs_tol=1e-6)
    logsig = RewardModelReward(reward_model, tok, tasks.decode, eos_id=EOS, transform="logsigmoid")
    assert bool((logsig(PROMPT, xs) <= 0).all())


def test_reward_model_bad_input(reward_model: Any) -> None:
    tok = tasks.build_tokenizer()
    with pytest.raises(ValueError, match="label"):
        RewardModelReward(reward_model, tok, tasks.decode, label=2)
    with pytest.raises(ValueError, match="transform"):
        RewardModelReward(reward_model, tok, tasks.decode, transform="tanh")
    with pytest.raises(ValueError, match="template"):
        RewardModelReward(reward_model, tok, tasks.decode, template="{prompt}")
    with pytest.raises(TypeError, match="sequence-classification"):
        RewardModelReward("model", tok, tasks.decode)
