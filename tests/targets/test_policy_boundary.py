"""Errors at the policy boundary name their cause: missing model folders, offline hub names,
text outside the tokenizer's vocabulary, and invalid laws returned by a policy."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from tiltsample.decoding import check_law, sample_categorical
from tiltsample.targets import tasks
from tiltsample.targets.hf import HFMaskedDiffusionPolicy, HFPolicy


@pytest.mark.parametrize("cls", [HFPolicy, HFMaskedDiffusionPolicy])
def test_missing_folder_is_named(cls: type, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "model"
    with pytest.raises(FileNotFoundError, match=r"model folder .*no/model.* does not exist"):
        cls.from_pretrained(missing)


def test_hub_name_is_refused_at_once_offline() -> None:
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="local_files_only=False"):
        HFPolicy.from_pretrained("nonexistent-org/nonexistent-model")
    # no network retries: the refusal happens before any download is attempted
    assert time.perf_counter() - start < 30.0


def test_encode_names_characters_outside_the_vocabulary() -> None:
    policy = HFPolicy.from_pretrained(tasks.model_path("arith-ar"))
    assert policy.encode("1+2")  # in the vocabulary: fine
    with pytest.raises(ValueError, match=r"characters outside the vocabulary: 'dehlorw'"):
        policy.encode("hello world")


@pytest.mark.parametrize(
    ("value", "cause"),
    [(math.nan, "NaN"), (math.inf, r"\+inf"), (None, "no token of finite log-probability")],
)
def test_invalid_law_names_rows_and_cause(value: float | None, cause: str) -> None:
    log_p = torch.log_softmax(torch.zeros(5, 4, dtype=torch.float64), dim=-1)
    if value is None:
        log_p[3] = -math.inf
    else:
        log_p[3, 1] = value
    with pytest.raises(ValueError, match=rf"1 of 5 rows \(rows 3; row 3 has {cause}\)"):
        sample_categorical(torch.Generator().manual_seed(0), log_p)


def test_valid_law_with_masked_tokens_passes() -> None:
    log_p = torch.tensor([[0.0, -math.inf], [-math.log(2), -math.log(2)]], dtype=torch.float64)
    check_law(log_p)
    draws = sample_categorical(torch.Generator().manual_seed(0), log_p)
    assert draws[0].item() == 0
