"""The one place that knows how the ``transformers`` API moved between 5.x releases.

Every call into ``transformers`` whose spelling differs between the supported releases (see
``pyproject.toml``: 5.19, the window of the vLLM CPU build, to the newest 5.x) goes through this
module, decided once per model class by inspecting the installed library — never by parsing
version strings, never with a deprecated spelling that a newer release warns about.

What moved, measured on the installed releases:

===========================  ==================================  ===============================
call                         transformers 5.19                   transformers 5.25
===========================  ==================================  ===============================
KV cache into ``forward``    ``past_key_values=cache``           ``cache=cache`` (the old keyword
                                                                 warns: ``FutureWarning``)
KV cache out of ``forward``  ``output.past_key_values``          ``output.cache``
===========================  ==================================  ===============================

The ``DynamicCache`` / ``DynamicLayer`` methods the library uses (``crop(-n)``,
``batch_select_indices``, ``batch_repeat_interleave``, ``layers[i].keys`` / ``.values``) are the
same in both. ``transformers`` is imported lazily, inside the functions.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = [
    "cache_keyword",
    "dynamic_layers",
    "forward_accepts",
    "forward_cache_kwargs",
    "new_dynamic_cache",
    "returned_cache",
]

#: Keywords under which ``forward`` has accepted the KV cache, newest first.
_CACHE_KEYWORDS = ("cache", "past_key_values")


#: ``forward`` keyword names per model class, inspected once.
_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def _forward_parameters(model: Any) -> frozenset[str]:
    kind = type(model)
    names = _FORWARD_PARAMETERS.get(kind)
    if names is None:
        try:
            names = frozenset(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
            names = frozenset()
        _FORWARD_PARAMETERS[kind] = names
    return names


def forward_accepts(model: Any, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name`` (decided once per model class)."""
    return name in _forward_parameters(model)


def cache_keyword(model: Any) -> str:
    """The keyword under which ``model.forward`` takes a KV cache: ``"cache"`` where the installed
    ``transformers`` accepts it (5.25 and later), ``"past_key_values"`` otherwise.

    A model whose ``forward`` names neither (a custom wrapper taking ``**kwargs``) gets
    ``"past_key_values"``, the keyword every 5.x release understands.
    """
    for name in _CACHE_KEYWORDS:
        if forward_accepts(model, name):
            return name
    return "past_key_values"


def forward_cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model.forward`` (with ``use_cache``)."""
    if cache is None:
        return {"use_cache": False}
    return {cache_keyword(model): cache, "use_cache": True}


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` or ``output.past_key_values``), or None.

    Read by key, so a release that keeps the old attribute as a deprecated alias never warns.
    """
    getter = getattr(output, "get", None)
    if getter is not None:
        for name in _CACHE_KEYWORDS:
            value = getter(name)
            if value is not None:
                return value
        return None
    for name in _CACHE_KEYWORDS:  # a plain object (custom model): attribute access
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def new_dynamic_cache() -> Any:
    """An empty ``transformers.DynamicCache``."""
    from transformers import DynamicCache

    return DynamicCache()


def dynamic_layers(cache: Any) -> list[Any] | None:
    """The cache's layers if every one is a plain ``DynamicLayer`` (tensors ``keys``/``values``
    ``[B, H, T, D]``, never written in place), else None."""
    from transformers.cache_utils import DynamicLayer

    layers = list(getattr(cache, "layers", ()))
    if all(type(layer) is DynamicLayer for layer in layers):
        return layers
    return None
