"""Evaluation of a tiny task model: accuracy at temperature 1, greedy accuracy and pass@k.

The samplers here are the training script's own fast loops (a KV-cached one for the causal LM,
the drawn-confidence one for the masked-diffusion LM), batched over problems of equal prompt
length. Re-exported by :mod:`tiltsample.targets.tasks.train`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .arithmetic import Problem, extract_answer_ids
from .tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID
from .train_config import TrainConfig

__all__ = ["dlm_samples", "evaluate"]


def _group_by_prompt_length(problems: Sequence[Problem]) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(len(p.prompt_ids()), []).append(i)
    return [groups[k] for k in sorted(groups)]


@torch.no_grad()
def _ar_samples(
    model: Any,
    problems: Sequence[Problem],
    num: int,
    temperature: float,
    gen: torch.Generator,
    max_new: int,
) -> list[list[tuple[int, ...]]]:
    """``num`` responses per problem, batched over problems of equal prompt length."""
    from tiltsample.targets.hf import compat

    out: list[list[tuple[int, ...]]] = [[] for _ in problems]
    for group in _group_by_prompt_length(problems):
        ctx = torch.tensor([problems[i].prompt_ids() for i in group]).repeat_interleave(num, 0)
        cache = compat.new_dynamic_cache()
        with_cache = compat.forward_cache_kwargs(model, cache)
        logits = model(input_ids=ctx, **with_cache).logits[:, -1]
        rows = ctx.shape[0]
        toks = torch.zeros((rows, 0), dtype=torch.long)
        live = torch.ones(rows, dtype=torch.bool)
        for _ in range(max_new):
            lp = torch.log_softmax(logits.to(torch.float64), dim=-1)
            if temperature == 0.0:
                tok = torch.argmax(lp, dim=-1)
            else:
                tok = torch.multinomial(torch.softmax(lp / temperature, -1), 1, generator=gen)[:, 0]
            tok = torch.where(live, tok, torch.full_like(tok, EOS_ID))
            toks = torch.cat([toks, tok[:, None]], dim=1)
            live = live & (tok != EOS_ID)
            if not bool(live.any()):
                break
            logits = model(input_ids=tok[:, None], **with_cache).logits[:, -1]
        for r, row in enumerate(toks.tolist()):
            if EOS_ID in row:
                row = row[: row.index(EOS_ID) + 1]
            out[group[r // num]].append(tuple(row))
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
