"""A tiny random Qwen2 model built from a config, shared by the HF session tests.

Imported by name (``from hf_toys import tiny_model``): ``tests/conftest.py`` puts this folder on
``sys.path``.
"""

from __future__ import annotations

from typing import Any

import torch

V = 8
EOS = 0
BOS = 1


def tiny_model(dtype: torch.dtype, seed: int = 0) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype).eval()
