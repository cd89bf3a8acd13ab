"""Loading ``transformers`` models and tokenizers: the tokenizer rule, special ids, source checks.

Shared by :class:`~tiltsample.targets.hf.HFPolicy` and
:class:`~tiltsample.targets.hf.HFMaskedDiffusionPolicy`. ``transformers`` is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["check_model_source", "load_tokenizer", "loading_errors", "special_id"]


def load_tokenizer(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load the tokenizer of a model folder or hub name.

    A folder with a ``tokenizer.json`` is loaded with ``PreTrainedTokenizerFast`` — the exact
    tokenizer the file describes. ``AutoTokenizer`` would pick the tokenizer *class* of the model's
    config instead: in a folder holding a Qwen2 ``config.json`` it returns a Qwen2 tokenizer that
    silently drops the spaces and newlines of a custom character vocabulary (digit-only strings
    still round-trip, so a naive check passes). Anything else goes through ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(path)
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder), **kwargs)
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def special_id(tokenizer: Any, config: Any, name: str) -> int | None:
    """``<name>_token_id`` from the tokenizer, else from the model config (first id of a list)."""
    for source in (tokenizer, getattr(config, "get_text_config", lambda: config)(), config):
        if source is None:
            continue
        value = getattr(source, f"{name}_token_id", None)
        if isinstance(value, list | tuple):
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_model_source(path: str | os.PathLike[str], local_files_only: bool | None) -> bool:
    """Resolve ``local_files_only`` (None means offline) and reject a missing folder early.

    A name that looks like a filesystem path (absolute, ``./``, ``../``, ``~``) but is not a folder
    raises ``FileNotFoundError``; so does any name when offline and no such folder exists.
    """
    offline = True if local_files_only is None else bool(local_files_only)
    text = os.fspath(path)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return offline
    looks_local = text.startswith(("/", "./", "../", "~")) or folder.exists()
    if looks_local:
        raise FileNotFoundError(f"model folder {text!r} does not exist (or is not a folder)")
    if offline:
        raise FileNotFoundError(
            f"{text!r} is not a local model folder and downloads are off (offline by default); "
            "pass local_files_only=False to fetch it from a model hub"
        )
    return offline


@contextmanager
def loading_errors(path: str | os.PathLike[str], offline: bool) -> Iterator[None]:
    """Re-raise ``transformers`` loading errors with the path and the offline setting."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        mode = "offline" if offline else "online"
        raise OSError(
            f"could not load a model from {os.fspath(path)!r} ({mode}): {error}"
        ) from error
