"""The benchmarks' model: the shipped ``arith-ar`` policy, or a random-init one ``K`` times wider.

``--scale K`` in ``bench_hf.py``, ``bench_overhead.py`` and ``bench_peers.py`` measures on a model
whose call costs more against the library's work around it (and against a re-encode of the
prompt), which is where the per-call overhead and re-prefilling of the toy-scale tables stop
deciding the ratios.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from tiltsample.targets import tasks


def scaled_policy(scale: int) -> Any:
    """A random-init model shaped like the shipped one but ``scale`` times wider (hidden size, MLP
    width and heads; same tokenizer, depth and context), as an HFPolicy (seeded, offline).

    Its laws are those of an untrained network (near uniform, so responses end at a random
    length), which is all a throughput measurement needs: the point is the cost of a model call
    relative to the library's work around it."""
    from transformers import AutoModelForCausalLM

    from tiltsample.targets.hf import HFPolicy

    shipped = tasks.load_policy()
    config = copy.deepcopy(shipped.model.config)
    config.hidden_size *= scale
    config.intermediate_size *= scale
    config.num_attention_heads *= scale
    config.num_key_value_heads *= scale
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return HFPolicy(model, shipped.tokenizer, eos_id=shipped.eos_id, bos_id=shipped.bos_id)


def add_scale_argument(parser: argparse.ArgumentParser) -> None:
    """``--scale K`` (default 1, the shipped model)."""
    parser.add_argument(
        "--scale",
        type=int,
        default=1,
        help="1: the shipped model; K > 1: a random-init model K times wider (scaled_policy)",
    )


def policy_for(parser: argparse.ArgumentParser, scale: int) -> tuple[Any, str]:
    """The policy of ``--scale`` and its name for the tables (a parser error for ``scale < 1``)."""
    if scale < 1:
        parser.error(f"--scale must be >= 1, got {scale}")
    if scale == 1:
        return tasks.load_policy(), "arith-ar"
    return scaled_policy(scale), f"arith-ar shape x{scale}, random init"
