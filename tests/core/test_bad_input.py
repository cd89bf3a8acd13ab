"""Bad input fails early with an error naming the parameter and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import tiltsample
from tiltsample import validation
from tiltsample.app.compare import run_compare
from tiltsample.targets.rewards import ContainsTokenReward
from tiltsample.targets.tabular import random_tabular

POLICY = random_tabular(torch.Generator().manual_seed(0), 3, 4)
REWARD = ContainsTokenReward(1, 0)


def target(**kw: Any) -> tiltsample.TiltedTarget:
    args: dict[str, Any] = {"policy": POLICY, "reward": REWARD, "lam": 0.5, "max_new_tokens": 4}
    args.update(kw)
    return tiltsample.TiltedTarget(**args)


class WrongEos:
    vocab_size = 3
    eos_id = 7

    def next_logprobs(self, prompt: Any, prefixes: Any) -> torch.Tensor:
        return torch.zeros(len(prefixes), 3)

    def sequence_logprob(self, prompt: Any, xs: Any, per_token: bool = False) -> torch.Tensor:
        return torch.zeros(len(xs))


def nan_reward(prompt: Any, xs: Any) -> torch.Tensor:
    return torch.full((len(xs),), math.nan)


def short_reward(prompt: Any, xs: Any) -> torch.Tensor:
    return torch.zeros(len(xs) + 1)


def plus_inf_reward(prompt: Any, xs: Any) -> torch.Tensor:
    return torch.full((len(xs),), math.inf)


CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("lam zero", lambda: target(lam=0.0), ValueError, "lam"),
    ("lam negative", lambda: target(lam=-1.0), ValueError, "lam"),
    ("lam nan", lambda: target(lam=math.nan), ValueError, "lam"),
    ("max_new_tokens zero", lambda: target(max_new_tokens=0), ValueError, "max_new_tokens"),
    ("max_new_tokens float", lambda: target(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    ("max_new_tokens beyond table", lambda: target(max_new_tokens=9), ValueError, "max_len"),
    ("eos outside vocabulary", lambda: target(policy=WrongEos()), ValueError, "eos_id"),
    ("not a policy", lambda: target(policy=object()), TypeError, "ReferencePolicy"),
    ("bad truncation", lambda: target(truncation="cut"), ValueError, "truncation"),
    ("prompt token out of range", lambda: target(prompt=(5,)), ValueError, "prompt"),
    (
        "alpha zero",
        lambda: tiltsample.power_target(POLICY, 0.0, max_new_tokens=3),
        ValueError,
        "alpha",
    ),
    (
        "NaN reward",
        lambda: tiltsample.sample("best-of-n", target(reward=nan_reward), 2, seed=0),
        ValueError,
        "NaN",
    ),
    (
        "reward of the wrong shape",
        lambda: tiltsample.sample("importance", target(reward=short_reward), 2, seed=0),
        ValueError,
        "shape",
    ),
    (
        "+inf reward",
        lambda: tiltsample.sample("importance", target(reward=plus_inf_reward), 2, seed=0),
        ValueError,
        r"\+inf",
    ),
    (
        "unknown sampler",
        lambda: tiltsample.sample("best-of-m", target(), 2, seed=0),
        ValueError,
        "best-of-n",
    ),
    (
        "num_samples zero",
        lambda: tiltsample.sample("exact", target(), 0, seed=0),
        ValueError,
        "num_samples",
    ),
    (
        "num_samples negative",
        lambda: tiltsample.sample("exact", target(), -3, seed=0),
        ValueError,
        "num_samples",
    ),
    (
        "num_candidates zero",
        lambda: tiltsample.sample("best-of-n", target(), 2, seed=0, num_candidates=0),
        ValueError,
        "num_candidates",
    ),
    (
        "unknown selection",
        lambda: tiltsample.sample("best-of-n", target(), 2, seed=0, selection="max"),
        ValueError,
        "selection",
    ),
    (
        "temperature zero",
        lambda: tiltsample.sample("ancestral", target(), 2, seed=0, temperature=0.0),
        ValueError,
        "temperature",
    ),
    (
        "generator of the wrong kind",
        lambda: tiltsample.sample("exact", target(), 2, generator=42),  # type: ignore[arg-type]
        TypeError,
        "generator",
    ),
    (
        "seed and generator together",
        lambda: tiltsample.sample("exact", target(), 2, seed=1, generator=torch.Generator()),
        ValueError,
        "seed",
    ),
    ("negative seed", lambda: tiltsample.sample("exact", target(), 2, seed=-1), ValueError, "seed"),
    (
        "unknown sampler parameter",
        lambda: tiltsample.sample("ancestral", target(), 2, seed=0, num_candidate=3),
        TypeError,
        "num_candidate",
    ),
    (
        "target of the wrong kind",
        lambda: tiltsample.sample("exact", POLICY, 2, seed=0),
        TypeError,
        "TiltedTarget",
    ),  # type: ignore[arg-type]
    (
        "beam narrower than num_samples",
        lambda: tiltsample.sample("beam", target(), 3, seed=0, num_beams=2),
        ValueError,
        "num_beams",
    ),
    (
        "MH steps zero",
        lambda: tiltsample.sample("imh", target(), 2, seed=0, num_steps=0),
        ValueError,
        "num_steps",
    ),
    ("vocab too small", lambda: random_tabular(torch.Generator(), 1, 3), ValueError, "vocab_size"),
    (
        "concentration zero",
        lambda: random_tabular(torch.Generator(), 3, 3, concentration=0),
        ValueError,
        "concentration",
    ),
    (
        "eos_prob one",
        lambda: random_tabular(torch.Generator(), 3, 3, eos_prob=1.0),
        ValueError,
        "eos_prob",
    ),
    ("generator not a Generator", lambda: random_tabular(0, 3, 3), TypeError, "generator"),  # type: ignore[arg-type]
    (
        "resample scheme typo",
        lambda: tiltsample.sample("importance", target(), 4, seed=0).resample(
            2, torch.Generator(), "sistematic"
        ),
        ValueError,
        "systematic",
    ),
    # run_compare: an explicit 0 / [] is refused, never replaced by the profile's default
    ("compare num_problems zero", lambda: run_compare(num_problems=0), ValueError, "num_problems"),
    ("compare repeats zero", lambda: run_compare(repeats=0), ValueError, "repeats"),
    ("compare budgets empty", lambda: run_compare(budgets=[]), ValueError, "budgets"),
    ("compare budget zero", lambda: run_compare(budgets=[1, 0]), ValueError, r"budgets\[1\]"),
    ("compare seed negative", lambda: run_compare(seed=-1), ValueError, "seed"),
    ("compare lam inf", lambda: run_compare(lam=math.inf), ValueError, "lam"),
    ("compare threads zero", lambda: run_compare(threads=0), ValueError, "threads"),
    ("compare samplers empty", lambda: run_compare(samplers=[]), ValueError, "samplers"),
    ("compare samplers str", lambda: run_compare(samplers="smc"), ValueError, "samplers"),
    (
        "compare out_dir in a missing folder outside the current directory",
        lambda: run_compare(out_dir="/nonexistent-tiltsample-dir/x"),
        ValueError,
        "out_dir",
    ),
    (
        "output file is a folder",
        lambda: validation.output_file("out", "/"),
        ValueError,
        "out must be a file",
    ),
    ("output path empty", lambda: validation.output_folder("out", ""), ValueError, "out"),
    ("output path not a path", lambda: validation.output_file("out", 3), TypeError, "out"),
]


@pytest.mark.parametrize(("case", "call", "error", "match"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_clearly(
    case: str, call: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_output_paths(tmp_path: Path) -> None:
    """Missing folders are accepted only where the caller allows creating them."""
    (tmp_path / "f").write_text("")
    assert validation.output_file("out", tmp_path / "x.jsonl") == tmp_path / "x.jsonl"
    assert validation.output_folder("out", tmp_path / "new") == tmp_path / "new"  # the leaf
    with pytest.raises(ValueError, match="does not exist"):
        validation.output_folder("out", tmp_path / "a" / "b")
    with pytest.raises(ValueError, match="does not exist"):
        validation.output_file("out", tmp_path / "a" / "x.jsonl")
    below = validation.output_file("out", tmp_path / "a" / "x.jsonl", create_below=tmp_path)
    assert below == tmp_path / "a" / "x.jsonl" and not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="is a file"):
        validation.output_folder("out", tmp_path / "f")
    with pytest.raises(ValueError, match="not a folder"):
        validation.output_file("out", tmp_path / "f" / "x", create_below=tmp_path)
    assert validation.finite_or_inf("INF") == math.inf
    assert validation.finite_or_inf("-Infinity") == -math.inf
    assert math.isnan(validation.finite_or_inf("nan") or 0.0)
    assert validation.finite_or_inf("1e3") is None
