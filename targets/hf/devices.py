r"""Where a ``transformers`` policy computes, and what it hands back: devices and dtypes.

The scheme (``docs/hf.md``, "Devices and dtypes"):

* **the policy owns its device and dtype** (``HFPolicy.device``, ``.dtype``): the model's
  parameters, the KV cache, and every tensor handed to the model (input ids, attention masks,
  position ids, cache row indices) live there, and the logits come back there;
* **the laws handed to samplers are float64 on the CPU** (``logprobs()``, ``next_logprobs``,
  ``sequence_logprob``, ``extend_and_score`` scores, diffusion predictive log-probs): the logits
  are cast to float64 and normalised (``log_softmax``) *on the device*, and only the ``[B, V]``
  law (or the gathered scores) crosses the bus (:func:`to_host`), never the cache. The samplers'
  log-space arithmetic and the caller's CPU ``torch.Generator`` stay on the CPU, so every sampler
  runs unchanged on any device, the same seed gives the same draws whenever the model's log-probs
  are the same, and on the CPU nothing moves at all (bit-identical to a CPU-only build).

Sessions keep their bookkeeping (tokens, lengths, the live-column mask) on the CPU too; the tensors
built from it for a forward call are moved to the device in one place,
:meth:`HFPolicy.forward_logits <tiltsample.targets.hf.HFPolicy.forward_logits>`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DTYPES",
    "HOST",
    "model_device",
    "model_dtype",
    "resolve_device",
    "resolve_dtype",
    "to_host",
]

HOST = torch.device("cpu")
"""Where laws and scores handed to samplers live."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
"""Names accepted for a model dtype (and the ``--dtype`` flag)."""

_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def resolve_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """A model dtype: ``torch.float32`` / ``bfloat16`` / ``float16`` / ``float64`` or one of the
    names of :data:`DTYPES` (``"float32"``, ``"bf16"``, ``"fp16"``, ...); ``ValueError`` naming
    ``name`` otherwise."""
    allowed = sorted(set(DTYPES.values()), key=str)
    if isinstance(dtype, torch.dtype):
        if dtype in allowed:
            return dtype
        raise ValueError(f"{name} must be one of float32, bfloat16, float16, float64, got {dtype}")
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(
        f"{name} must be one of {', '.join(DTYPES)} (or a torch float dtype), got {dtype!r}"
    )


def resolve_device(device: Any, name: str = "device") -> torch.device:
    """A device to run a model on: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"xpu"`` or a
    ``torch.device``; ``ValueError`` naming ``name`` when it is malformed, of another type
    (``"meta"`` holds no values), or not available here (CUDA requested on a machine without it,
    or a CUDA index beyond the visible GPUs)."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and device.strip():
        try:
            dev = torch.device(device.strip())
        except (RuntimeError, ValueError):
            raise ValueError(
                f"{name} must be cpu, cuda, cuda:N, mps or xpu, got {device!r}"
            ) from None
    else:
        raise ValueError(f"{name} must be a device name such as 'cpu' or 'cuda', got {device!r}")
    if dev.type not in _DEVICE_TYPES:
        raise ValueError(f"{name} must be cpu, cuda, cuda:N, mps or xpu, got {str(dev)!r}")
    if dev.type == "cpu":
        return dev
    if dev.type == "mps":
        available = bool(torch.backends.mps.is_available())
        count = 1 if available else 0
    else:
        backend = getattr(torch, dev.type)
        available = bool(backend.is_available())
        count = int(backend.device_count()) if available else 0
    if not available:
        raise ValueError(
            f"{name}={str(dev)!r}: {dev.type.upper()} is not available on this machine "
            f"(torch {torch.__version__}); use {name}='cpu'"
        )
    if dev.index is not None and not 0 <= dev.index < count:
        raise ValueError(f"{name}={str(dev)!r}: only {count} {dev.type} device(s) are visible")
    return dev


def model_device(model: Any) -> torch.device:
    """Where ``model`` takes its inputs: the device of its input embeddings (the first layer of a
    model split over devices), else of its first parameter, else the CPU."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, Tensor):
        return weight.device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if isinstance(p, Tensor):
                return p.device
    return HOST


def model_dtype(model: Any) -> torch.dtype:
    """The floating dtype of ``model``'s parameters (float32 when it has none)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            if isinstance(p, Tensor) and p.is_floating_point():
                return p.dtype
    return torch.float32


def to_host(t: Tensor) -> Tensor:
    """``t`` as float64 on the CPU (no copy when it already is: CPU runs are unchanged)."""
    return t.to(HOST, torch.float64)
