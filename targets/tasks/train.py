r"""Deterministic training of the tiny task models (``tiltsample train-tiny``).

Two models share one Qwen2 backbone (``Qwen2Config`` / ``Qwen2ForCausalLM``; about 1M parameters
with the defaults: hidden 128, 4 layers, 4 heads, MLP 384, vocabulary 20):

``kind="ar"``
    A causal LM trained by teacher forcing on ``<bos> prompt response <eos>``; the loss is the mean
    cross-entropy over response tokens (EOS included; the prompt is not scored).
``kind="dlm"``
    A masked-diffusion LM (``Qwen2Config(is_causal=False)``: bidirectional attention). The response
    is padded with EOS to a fixed length ``L``; each training example draws ``t ~ U(t_min, 1)``.
    A fraction ``block_mask_fraction`` of the examples gets the masks the semi-autoregressive
    sampler visits — a random block ``b`` of ``block_length`` positions masked with probability
    ``t``, the blocks before it revealed, the blocks after it fully masked — scored on the masked
    positions of block ``b`` only (the sampler never commits a later block from such a state); the
    others mask every position independently with probability ``t`` (LLaDA) and are scored on all
    masked positions. The loss is the **plain mean** cross-entropy over scored positions (the
    1/t-weighted LLaDA loss does not learn in minutes at this scale — ``../shared/PITFALLS.md``).
    Without ``shift`` the output at a position predicts that position; with ``shift`` the output
    at ``j - 1`` predicts ``j``. The shipped ``arith-dlm`` starts from ``arith-ar``'s weights
    (``init_from``), uses ``shift`` and block masks only: from scratch, or with uniform masks, the
    model had not learned the arithmetic after 500–750 steps (1–3% accuracy; ``docs/hf.md``).

Both are stopped early on purpose: the shipped base models are mediocre at temperature 1 (the
regime where reward-guided sampling has room), while pass@k is far higher.

Determinism: the initial weights come from ``torch.manual_seed(seed)`` inside
``torch.random.fork_rng`` (the caller's global RNG is restored), batches and masks from a
``torch.Generator`` seeded from ``seed``, no dropout; the learning rate is a linear warm-up then
constant, so the first ``n`` steps of a longer run are the run of ``n`` steps. Same seed, same
thread count ⇒ the same weights bit for bit.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation

from .arithmetic import Problem, generate_problems
from .evaluation import evaluate
from .tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, build_tokenizer
from .train_config import PRESETS, Kind, TrainConfig, build_model, model_config

__all__ = [
    "PRESETS",
    "Kind",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "main_train",
    "model_config",
    "train",
]


# ------------------------------------------------------------------------------ batches
def _ar_batch(problems: Sequence[Problem]) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``<bos> prompt response <eos>`` rows, attention mask and loss mask."""
    seqs = [p.prompt_ids() + p.response_ids() for p in problems]
    n_prompt = [len(p.prompt_ids()) for p in problems]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    score = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, n) in enumerate(zip(seqs, n_prompt, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        score[i, n : len(s)] = True  # positions whose token is predicted (response + EOS)
    return ids, attn, score


def _dlm_rows(problems: Sequence[Problem], length: int) -> tuple[Tensor, Tensor]:
    """Prompt ids (left-padded with PAD, masked out) and EOS-padded response ids."""
    prompts = [p.prompt_ids() for p in problems]
    width = max(len(q) for q in prompts)
    ctx = torch.full((len(problems), width), PAD_ID, dtype=torch.long)
    ctx_mask = torch.zeros((len(problems), width), dtype=torch.long)
    resp = torch.full((len(problems), length), EOS_ID, dtype=torch.long)
    for i, (q, p) in enumerate(zip(prompts, problems, strict=True)):
        ctx[i, width - len(q) :] = torch.tensor(q)
        ctx_mask[i, width - len(q) :] = 1
        r = p.response_ids()
        if len(r) > length:
            raise ValueError(f"response of {len(r)} tokens exceeds response_length={length}")
        resp[i, : len(r)] = torch.tensor(r)
    return torch.cat([ctx, resp], dim=1), torch.cat([ctx_mask, torch.ones_like(resp)], dim=1)


def _position_ids(mask: Tensor) -> Tensor:
    return (torch.cumsum(mask, dim=1) - 1).clamp(min=0)


def _loss(
    model: Any, config: TrainConfig, batch: Sequence[Problem], gen: torch.Generator
) -> Tensor:
    if config.kind == "ar":
        ids, attn, score = _ar_batch(batch)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        pred = logits[:, :-1]
        target = ids[:, 1:]
        keep = score[:, 1:]
        return torch.nn.functional.cross_entropy(pred[keep], target[keep])
    L = config.response_length
    ids, attn = _dlm_rows(batch, L)
    n = ids.shape[0]
    t = config.mask_t_min + (1 - config.mask_t_min) * torch.rand(n, 1, generator=gen)
    coin = torch.rand(n, L, generator=gen) < t
    # block-structured masks: blocks before b revealed, block b masked w.p. t, later blocks masked
    block = config.block_length
    b = torch.randint(L // block, (n, 1), generator=gen)
    pos = torch.arange(L)[None, :]
    start, stop = b * block, (b + 1) * block
    structured = (pos >= stop) | ((pos >= start) & (pos < stop) & coin)
    use_blocks = torch.rand(n, 1, generator=gen) < config.block_mask_fraction
    masked = torch.where(use_blocks, structured, coin)
    # at least one masked position per row (in the current block for structured rows)
    none = ~masked.any(dim=1)
    if bool(none.any()):
        rows = none.nonzero().flatten()
        pick = torch.randint(block, (int(rows.numel()),), generator=gen)
        pick = torch.where(use_blocks[rows, 0], start[rows, 0] + pick, pick * (L // block))
        masked[rows, pick] = True
    # scored positions: every masked one for uniform masks; the current block's for block masks
    # (the sampler never commits a later block from such a state, so those predictions are unused)
    in_block = (pos >= start) & (pos < stop)
    scored = masked & (~use_blocks | in_block)
    pad = torch.zeros(n, ids.shape[1] - L, dtype=torch.bool)
    full_mask = torch.cat([pad, masked], dim=1)
    full_scored = torch.cat([pad, scored], dim=1)
    inputs = ids.masked_fill(full_mask, MASK_ID)
    logits = model(
        input_ids=inputs, attention_mask=attn, position_ids=_position_ids(attn), use_cache=False
    ).logits
    if config.shift:  # the output at j - 1 predicts position j
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    return torch.nn.functional.cross_entropy(logits[full_scored], ids[full_scored])


# ------------------------------------------------------------------------------ training
@dataclass
class TrainResult:
    """The trained model, its tokenizer and the loss / evaluation history."""

    model: Any
    tokenizer: Any
    config: TrainConfig
    history: list[dict[str, float]]
    seconds: float


def train(
    config: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    progress: bool = False,
    eval_every: int = 0,
    eval_problems: int = 200,
    save_every: int = 0,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> TrainResult:
    """Train a model of ``config`` deterministically; optionally save it to ``out_dir``.

    ``eval_every > 0`` evaluates (temperature 1, greedy, pass@8 on ``eval_problems`` test problems)
    every that many steps and records it in the history; ``save_every > 0`` also saves a
    checkpoint ``out_dir/step-<n>`` at those steps (used to choose where to stop).
    ``threads`` (default ``config.threads``) fixes torch's intra-op thread count for the run
    (restored afterwards): float sums are reduced in a thread-count-dependent order, so
    bit-identical weights need the same count. One thread is the fastest on a loaded 2-core
    machine (oversubscribed threads are 10× slower); the count is recorded in the saved config.
    """
    if threads is not None and threads != config.threads:
        config = TrainConfig.from_dict({**config.as_dict(), "threads": threads})
    previous = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, out_dir, progress, eval_every, eval_problems, save_every, log)
    finally:
        torch.set_num_threads(previous)


def _train(
    config: TrainConfig,
    out_dir: str | Path | None,
    progress: bool,
    eval_every: int,
    eval_problems: int,
    save_every: int,
    log: Callable[[str], None] | None,
) -> TrainResult:
    from tqdm.auto import tqdm

    problems = generate_problems(config.task, "train", config.num_train_problems, seed=config.seed)
    test = (
        generate_problems(config.task, "test", eval_problems, seed=config.seed + 1)
        if eval_every
        else []
    )
    model = build_model(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    order = torch.randperm(len(problems), generator=gen)
    cursor = 0
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=f"train {config.kind}", disable=not progress)
    for step in bar:
        if cursor + config.batch_size > len(order):
            order = torch.randperm(len(problems), generator=gen)
            cursor = 0
        batch = [problems[i] for i in order[cursor : cursor + config.batch_size].tolist()]
        cursor += config.batch_size
        lr = config.lr * min(1.0, (step + 1) / max(config.warmup, 1))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = _loss(model, config, batch, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        loss_value = float(loss.detach())
        record = {"step": float(step + 1), "loss": loss_value, "lr": lr}
        done = step + 1
        if eval_every and done % eval_every == 0:
            model.eval()
            record.update(evaluate(model, config, test, seed=config.seed))
            model.train()
            if log is not None:
                log(json.dumps(record))
            if save_every and out_dir is not None and done % save_every == 0:
                _save(model, config, Path(out_dir) / f"step-{done}", [*history, record], 0.0)
        history.append(record)
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    seconds = time.perf_counter() - start
    tokenizer = build_tokenizer()
    if out_dir is not None:
        _save(model, config, Path(out_dir), history, seconds, tokenizer)
    return TrainResult(model, tokenizer, config, history, seconds)


def _save(
    model: Any,
    config: TrainConfig,
    folder: Path,
    history: list[dict[str, float]],
    seconds: float,
    tokenizer: Any = None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    (tokenizer or build_tokenizer()).save_pretrained(str(folder))
    meta = {
        "train_config": config.as_dict(),
        "train_seconds": round(seconds, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "evaluations": [h for h in history if "accuracy_t1" in h],
    }
    (folder / "tiltsample_train.json").write_text(json.dumps(meta, indent=1) + "\n")
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)  # package data must be readable by every user
    if config.kind == "dlm":
        options = {
            "length": config.response_length,
            "num_steps": config.response_length,
            "block_length": config.block_length,
            "shift": config.shift,
            "unmasking": "drawn-confidence",
            "forbidden_ids": [PAD_ID, BOS_ID],
        }
        (folder / "tiltsample_diffusion.json").write_text(json.dumps(options, indent=1) + "\n")


def main_train(
    name: str,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    seed: int | None = None,
    eval_every: int = 0,
    save_every: int = 0,
    progress: bool = True,
    threads: int | None = None,
) -> TrainResult:
    """Train the preset ``name`` (see :data:`PRESETS`) into ``out_dir`` (the CLI entry)."""
    validation.one_of("name", name, list(PRESETS))
    config = PRESETS[name]
    changes: dict[str, Any] = {}
    if steps is not None:
        changes["steps"] = steps
    if seed is not None:
        changes["seed"] = seed
    if changes:
        config = TrainConfig.from_dict({**config.as_dict(), **changes})
    return train(
        config,
        out_dir=out_dir,
        progress=progress,
        eval_every=eval_every,
        save_every=save_every,
        log=print if eval_every else None,
        threads=threads,
    )
