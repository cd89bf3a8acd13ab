"""What determines a tiny task model: :class:`TrainConfig`, the :data:`PRESETS` of the shipped
checkpoints, and the Qwen2 model a configuration builds (see :mod:`.train` for the training).

Re-exported by :mod:`tiltsample.targets.tasks.train`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from tiltsample import validation

from .arithmetic import ArithmeticTask
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB

__all__ = ["PRESETS", "Kind", "TrainConfig", "build_model", "model_config"]


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
