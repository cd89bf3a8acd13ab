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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from tiltsample import validation

from .arithmetic import ArithmeticTask, Problem, extract_answer_ids, generate_problems
from .tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, VOCAB, build_tokenizer

Kind = Literal["ar", "dlm"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model (it is saved beside the weights)."""

    kind: Kind = "ar"
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    num_train_problems: int = 40_000
    response_length: int = 48
    """Fixed response length ``L`` of the masked-diffusion model (positions, EOS padding)."""
    mask_t_min: float = 0.05
    block_length: int = 8
    """Block length of the masked-diffusion model's semi-autoregressive sampler (and of the
    block-structured training masks)."""
    block_mask_fraction: float = 0.75
    shift: bool = False
    """Masked diffusion: read the prediction of position ``j`` from the network output at
    ``j - 1`` (Dream-style), which keeps a causal LM's next-token head meaningful."""
    init_from: str | None = None
    """Start from the weights of a shipped model (``targets/tasks/models/<name>``) instead of a
    random initialisation (adapting an autoregressive model into a masked-diffusion one, as
    DiffuLLaMA / Dream do)."""
    """Fraction of masked-diffusion training examples whose mask has the block structure the
    sampler visits (earlier blocks revealed, the current block partly masked, later blocks fully
    masked; only the current block is scored); the rest are masked uniformly (LLaDA)."""
    task: ArithmeticTask = field(default_factory=ArithmeticTask)
    threads: int = 1
    """torch intra-op threads: float sums are reduced in a thread-count-dependent order, so the
    count is part of what determines the weights bit for bit."""

    def __post_init__(self) -> None:
        validation.one_of("kind", self.kind, ("ar", "dlm"))
        for name in (
            "steps",
            "batch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "num_train_problems",
            "response_length",
        ):
            validation.positive_int(name, getattr(self, name))
        validation.non_negative_int("warmup", self.warmup)
        validation.non_negative_int("seed", self.seed)
        validation.positive_int("threads", self.threads)
        validation.positive_float("lr", self.lr)
        validation.unit_interval("mask_t_min", self.mask_t_min, closed=False)
        validation.positive_int("block_length", self.block_length)
        validation.unit_interval("block_mask_fraction", self.block_mask_fraction)
        if self.response_length % self.block_length:
            raise ValueError(
                f"block_length={self.block_length} must divide response_length="
                f"{self.response_length}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.kind == "dlm" and self.response_length < self.task.max_response_tokens:
            raise ValueError(
                f"response_length={self.response_length} is shorter than the task's longest "
                f"response ({self.task.max_response_tokens} tokens)"
            )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task"] = self.task.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        d["task"] = ArithmeticTask(**d.get("task", {}))
        return cls(**d)


#: The configurations of the shipped checkpoints (``targets/tasks/models/<name>``).
PRESETS: dict[str, TrainConfig] = {
    # trained with two threads: `train-tiny --model arith-ar` reproduces the shipped bits
    "arith-ar": TrainConfig(kind="ar", steps=450, threads=2),
    "arith-dlm": TrainConfig(
        kind="dlm", steps=1200, lr=1e-3, shift=True, init_from="arith-ar", block_mask_fraction=1.0
    ),
    # small, fast variants for tests of the training script itself
    "tiny-ar": TrainConfig(
        kind="ar",
        steps=30,
        batch_size=16,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        num_train_problems=500,
        task=ArithmeticTask(min_ops=1, max_ops=2),
    ),
    "tiny-dlm": TrainConfig(
        kind="dlm",
        steps=30,
        batch_size=16,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        num_train_problems=500,
        response_length=28,
        block_length=4,
        task=ArithmeticTask(min_ops=1, max_ops=2),
    ),
}


def model_config(config: TrainConfig) -> Any:
    """The ``Qwen2Config`` of a training configuration."""
    from transformers import Qwen2Config

    options: dict[str, Any] = {
        "vocab_size": len(VOCAB),
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_heads,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        # a generic config attribute (not in Qwen2Config's signature): bidirectional attention
        "is_causal": config.kind == "ar",
        "attention_dropout": 0.0,
    }
    return Qwen2Config(**options)


def build_model(config: TrainConfig) -> Any:
    """A freshly initialised model; the global RNG is seeded locally and restored."""
    from transformers import Qwen2ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Qwen2ForCausalLM(model_config(config))
    if config.init_from is not None:
        from safetensors.torch import load_file

        from tiltsample.targets.tasks import model_path

        weights = load_file(str(model_path(config.init_from) / "model.safetensors"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or any(not k.endswith("lm_head.weight") for k in missing):
            raise ValueError(
                f"init_from={config.init_from!r} does not match this architecture "
                f"(missing {missing}, unexpected {unexpected})"
            )
        model.tie_weights()
    return model


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


# ------------------------------------------------------------------------------ evaluation
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
    from tiltsample.targets import hf_compat

    out: list[list[tuple[int, ...]]] = [[] for _ in problems]
    for group in _group_by_prompt_length(problems):
        ctx = torch.tensor([problems[i].prompt_ids() for i in group]).repeat_interleave(num, 0)
        cache = hf_compat.new_dynamic_cache()
        with_cache = hf_compat.forward_cache_kwargs(model, cache)
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
def _dlm_samples(
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
    semi-autoregressive blocks of ``block`` positions (the shipped policy's defaults)."""
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
        return _dlm_samples(
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
