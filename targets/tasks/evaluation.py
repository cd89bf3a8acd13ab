"""Evaluation of a tiny task model: accuracy at temperature 1, greedy accuracy and pass@k.

The causal LM decodes through the library's decode engine (a KV-cached
:class:`~tiltsample.targets.hf.HFSession` per group of problems of equal prompt length); the
masked-diffusion LM uses the training script's own drawn-confidence loop (the same sampler as
:meth:`~tiltsample.targets.hf.HFMaskedDiffusionPolicy.denoise_step`, batched). Re-exported by
:mod:`tiltsample.targets.tasks.train`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample.decode_engine import DecodeRequest, decode
from tiltsample.decoding import rows_to_seqs
from tiltsample.token_laws import TokenLaw, tempered_law

from .arithmetic import Problem, extract_answer_ids
from .tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID
from .train_config import TrainConfig

__all__ = ["dlm_samples", "evaluate"]


def _group_by_prompt_length(problems: Sequence[Problem]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(len(p.prompt_ids()), []).append(i)
    return [groups[k] for k in sorted(groups)]


def _greedy_law(log_p: Tensor) -> TokenLaw:
    """A point mass on the most likely token (the first of tied ones): greedy decoding."""
    top = torch.argmax(log_p, dim=-1, keepdim=True)
    return TokenLaw(torch.full_like(log_p, -math.inf).scatter(1, top, 0.0), log_p)


@torch.no_grad()
def _ar_samples(
    model: Any,
    problems: Sequence[Problem],
    num: int,
    temperature: float,
    gen: torch.Generator,
    max_new: int,
) -> list[list[tuple[int, ...]]]:
    """``num`` responses per problem, at most ``max_new`` tokens each, decoded by the decode
    engine (:func:`~tiltsample.decode_engine.decode`) on a KV-cached session of the model: one
    session and one decode per group of problems of equal prompt length (groups in order of
    prompt length, ``num`` rows per problem), full-vocabulary draws from
    ``softmax(log p / temperature)`` with ``gen``, or greedy (``temperature = 0``: ``gen`` is not
    used). The model's train/eval mode is left as it was."""
    from tiltsample.targets.hf import HFPolicy

    training = bool(getattr(model, "training", False))
    policy = HFPolicy(model, eos_id=EOS_ID, bos_id=BOS_ID)  # puts the model in eval mode
    greedy = temperature == 0.0
    request = DecodeRequest(
        law=_greedy_law if greedy else tempered_law(temperature),
        eos_id=EOS_ID,
        start=0,
        cap=max_new,
    )
    out: list[list[tuple[int, ...]]] = [[] for _ in problems]
    try:
        for group in _group_by_prompt_length(problems):
            prompts = [problems[i].prompt_ids() for i in group]
            session = policy.session_multi(prompts, [num] * len(group))
            # a point mass needs no randomness: greedy draws leave the caller's generator alone
            draws = torch.Generator() if greedy else gen
            decoded, _ = decode(session, draws, request)
            for r, row in enumerate(rows_to_seqs(decoded.tokens, EOS_ID)):
                out[group[r // num]].append(row)
    finally:
        model.train(training)
    return out


@torch.no_grad()
def dlm_samples(
    model: Any,
    problems: Sequence[Problem],
    num: int,
    temperature: float,
    gen: torch.Generator,
    length: int,
    block: int,
    shift: int = 0,
) -> list[list[tuple[int, ...]]]:
    """``num`` responses per problem from the drawn-confidence sampler: one token per step,
    semi-autoregressive blocks of ``block`` positions (the shipped policy's defaults; a test
    checks it against :meth:`~tiltsample.targets.hf.HFMaskedDiffusionPolicy.denoise_step`)."""
    out: list[list[tuple[int, ...]]] = [[] for _ in problems]
    forbidden = torch.tensor([PAD_ID, BOS_ID, MASK_ID])
    for group in _group_by_prompt_length(problems):
        ctx = torch.tensor([problems[i].prompt_ids() for i in group]).repeat_interleave(num, 0)
        rows = ctx.shape[0]
        state = torch.full((rows, length), MASK_ID, dtype=torch.long)
        for step in range(length):
            logits = model(input_ids=torch.cat([ctx, state], 1), use_cache=False).logits
            lp = torch.log_softmax(
                logits[:, ctx.shape[1] - shift : ctx.shape[1] - shift + length]
                .to(torch.float64)
                .index_fill(-1, forbidden, -math.inf),
                dim=-1,
            )
            if temperature == 0.0:
                drawn = torch.argmax(lp, dim=-1)
            else:
                probs = torch.softmax(lp / temperature, -1).reshape(-1, lp.shape[-1])
                drawn = torch.multinomial(probs, 1, generator=gen).view(rows, length)
            score = lp.gather(-1, drawn[..., None]).squeeze(-1)
            eligible = torch.zeros(length, dtype=torch.bool)
            lo = (step // block) * block
            eligible[lo : lo + block] = True
            score = score.masked_fill((state != MASK_ID) | ~eligible, -math.inf)
            pos = torch.sort(score, dim=1, descending=True, stable=True).indices[:, 0]
            state[torch.arange(rows), pos] = drawn[torch.arange(rows), pos]
        for r, row in enumerate(state.tolist()):
            if EOS_ID in row:
                row = row[: row.index(EOS_ID) + 1]
            out[group[r // num]].append(tuple(row))
    return out


def evaluate(
    model: Any,
    config: TrainConfig,
    problems: Sequence[Problem],
    *,
    num_samples: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy at temperature 1 (mean over ``num_samples`` draws), greedy accuracy, pass@k.

    ``pass@k`` is the unbiased estimator ``1 - C(n-c, k)/C(n, k)`` (Chen et al. 2021) over the
    ``n = num_samples`` draws with ``c`` correct, for ``k = 1`` and ``k = num_samples``.
    """
    if not problems:
        return {}
    gen = torch.Generator().manual_seed(seed)

    def sampler(num: int, temperature: float) -> list[list[tuple[int, ...]]]:
        if config.kind == "ar":
            limit = config.task.max_response_tokens
            return _ar_samples(model, problems, num, temperature, gen, limit)
        return dlm_samples(
            model,
            problems,
            num,
            temperature,
            gen,
            config.response_length,
            config.block_length,
            int(config.shift),
        )

    draws = sampler(num_samples, 1.0)
    greedy = sampler(1, 0.0)
    correct = [
        sum(extract_answer_ids(x) == p.answer for x in xs)
        for xs, p in zip(draws, problems, strict=True)
    ]
    n = num_samples
    return {
        "accuracy_t1": sum(correct) / (n * len(problems)),
        "accuracy_greedy": sum(
            extract_answer_ids(xs[0]) == p.answer for xs, p in zip(greedy, problems, strict=True)
        )
        / len(problems),
        f"pass@{n}": sum(c > 0 for c in correct) / len(problems),
    }
