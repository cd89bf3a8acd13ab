"""A vLLM engine as a reference policy: :class:`VLLMPolicy`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.policy import response_context
from tiltsample.targets.vllm.engine import Engine, token_level_error
from tiltsample.targets.vllm.session import VLLMSession, check_contexts
from tiltsample.types import Seq

__all__ = ["VLLMPolicy"]

ENGINE_DEFAULTS: dict[str, Any] = {
    "enable_prefix_caching": True,
    "logprobs_mode": "processed_logprobs",
    "generation_config": "vllm",
}
"""What :meth:`VLLMPolicy.from_pretrained` passes to ``vllm.LLM`` unless told otherwise: prefix
caching (shared prefixes are computed once), processed log-probs (a sampled token's log-prob is
``log q`` of the tempered law it was drawn from) and vLLM's own sampling defaults (the model
folder's ``generation_config.json`` must not change the law: every request sets its own)."""


class VLLMPolicy:
    r"""A vLLM engine as a reference policy ``p_ref(x_t | y, x_<t)``, at the rollout level.

    Build it with :meth:`from_pretrained` (starts an engine) or from a started ``vllm.LLM``.
    Its sessions (:class:`~tiltsample.targets.vllm.VLLMSession`) decode whole continuations in
    one engine call (:class:`~tiltsample.policy.RolloutSession`), so every sampler written
    against the rollout level (``decode`` / ``score_continuations``) runs on it unchanged.

    Parameters
    ----------
    llm
        A started ``vllm.LLM``.
    eos_id, bos_id
        Override the special ids (default: the model config's; the first one when it lists
        several). ``bos_id`` is the context of an empty prompt.
    max_logprobs
        Ask the engine for at most this many log-probs per position (default: the engine's
        ``max_logprobs``, which also caps it). Below ``V`` the policy works at the rollout level
        only (no :meth:`next_logprobs`), whatever the engine allows.

    Notes
    -----
    Token-level access (:meth:`next_logprobs`, ``session.logprobs()``, per-token entropies,
    teacher forcing at a temperature other than 1) needs the full ``V`` log-probs per position,
    which vLLM returns only when the engine was started with ``max_logprobs >= V`` (or -1):
    true for small test models, not for real vocabularies. Otherwise these raise
    :class:`~tiltsample.policy.TokenLevelAccessError` (use the transformers backend).
    :attr:`full_vocabulary` says which case holds.

    Numerics: vLLM computes log-probs in float32; laws are renormalised in float64 and every
    score is returned as float64 on the CPU. The model's device and dtype are the engine's.
    Prompts are token ids exactly as the model sees them (an empty prompt means ``(bos_id,)``).
    """

    def __init__(
        self,
        llm: Any,
        *,
        eos_id: int | None = None,
        bos_id: int | None = None,
        max_logprobs: int | None = None,
    ) -> None:
        self.engine = Engine(llm, max_logprobs)
        vocab = self.engine.vocab_size
        config = self.engine.hf_config
        eos = eos_id if eos_id is not None else _first(getattr(config, "eos_token_id", None))
        if eos is None:
            raise ValueError("eos_id: the model config defines no eos_token_id; pass eos_id=")
        self._eos = validation.token_id("eos_id", eos, vocab)
        bos = bos_id if bos_id is not None else _first(getattr(config, "bos_token_id", None))
        self._bos = None if bos is None else validation.token_id("bos_id", bos, vocab)
        self.name = str(getattr(config, "_name_or_path", "") or "vllm")

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: str = "float32",
        max_model_len: int | None = None,
        seed: int = 0,
        eos_id: int | None = None,
        bos_id: int | None = None,
        **engine_kwargs: Any,
    ) -> VLLMPolicy:
        """Start a ``vllm.LLM`` on ``path`` (a local folder or a hub name) and wrap it.

        ``dtype``, ``max_model_len`` (default: the model's) and ``seed`` go to the engine, with
        :data:`ENGINE_DEFAULTS` and ``engine_kwargs`` (e.g. ``max_logprobs``,
        ``enforce_eager``, ``gpu_memory_utilization``; they override the defaults). On a CPU
        build, set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) before the call. Call :meth:`shutdown` when
        done (the engine core is a separate process).
        """
        LLM = _import_llm()
        options: dict[str, Any] = {**ENGINE_DEFAULTS, "dtype": dtype, "seed": seed}
        options.update(engine_kwargs)
        if max_model_len is not None:
            options["max_model_len"] = validation.positive_int("max_model_len", max_model_len)
        llm = LLM(model=os.fspath(path), **options)
        return cls(llm, eos_id=eos_id, bos_id=bos_id)

    # ------------------------------------------------------------------ protocol attributes
    @property
    def vocab_size(self) -> int:
        return int(self.engine.vocab_size)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def full_vocabulary(self) -> bool:
        """Whether the engine returns all ``V`` log-probs per position (token-level access)."""
        return bool(self.engine.full_vocabulary)

    def __repr__(self) -> str:
        e = self.engine
        return (
            f"VLLMPolicy({self.name!r}, V={e.vocab_size}, eos={self._eos}, "
            f"max_logprobs={e.max_logprobs}, logprobs_mode={e.logprobs_mode!r})"
        )

    # ------------------------------------------------------------------ text helpers
    def encode(self, text: str, *, add_special_tokens: bool = True) -> Seq:
        """Token ids of ``text`` by the engine's tokenizer."""
        ids = self.engine.llm.get_tokenizer().encode(text, add_special_tokens=add_special_tokens)
        return tuple(int(i) for i in ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of token ids by the engine's tokenizer (special tokens dropped by default)."""
        tok = self.engine.llm.get_tokenizer()
        return str(tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    # ------------------------------------------------------------------ model calls
    def context(self, prompt: Seq) -> Seq:
        """The ids sent before the response: ``prompt``, or ``(bos_id,)`` if it is empty."""
        return response_context(prompt, self._bos)

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        """``[B, V]`` float64 next-token laws after each prefix (one engine call). Needs
        full-vocabulary laws (:attr:`full_vocabulary`), else
        :class:`~tiltsample.policy.TokenLevelAccessError`."""
        if not self.engine.full_vocabulary:
            raise token_level_error("next_logprobs (full next-token laws)", self.engine)
        ctx = self.context(prompt)
        prefixes = [tuple(int(t) for t in p) for p in prefixes]
        if not prefixes:
            return torch.zeros((0, self.vocab_size), dtype=torch.float64)
        laws: Tensor = self.engine.next_laws([ctx + p for p in prefixes])
        return laws

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        """``log p(x | y)`` (``[B, L_max]`` per token, 0 past each length) from one engine call
        with ``prompt_logprobs`` on ``prompt ⊕ x`` for every non-empty ``x``."""
        ctx = self.context(prompt)
        xs = [tuple(int(t) for t in x) for x in xs]
        per = torch.zeros((len(xs), max((len(x) for x in xs), default=0)), dtype=torch.float64)
        rows = [i for i, x in enumerate(xs) if x]
        if rows:
            got = self.engine.prompt_scores([ctx + xs[i] for i in rows], [len(ctx)] * len(rows))
            for i, values in zip(rows, got, strict=True):
                per[i, : len(values)] = torch.tensor(values, dtype=torch.float64)
        return per if per_token else per.sum(dim=1)

    def session(self, prompt: Seq, batch: int) -> VLLMSession:
        """A :class:`~tiltsample.targets.vllm.VLLMSession` of ``batch`` empty rows after
        ``prompt`` (no model call: the engine sees the prompt with the first request)."""
        validation.non_negative_int("batch", batch)
        return VLLMSession(self.engine, self._eos, [self.context(prompt)] * batch)

    def session_multi(self, prompts: Sequence[Seq], rows_per_prompt: Sequence[int]) -> VLLMSession:
        """One session over several prompts (see :func:`tiltsample.policy.open_session_multi`):
        ``rows_per_prompt[i]`` empty rows after ``prompts[i]``, rows ordered by prompt."""
        contexts = check_contexts([self.context(p) for p in prompts], rows_per_prompt)
        return VLLMSession(self.engine, self._eos, contexts)

    def shutdown(self) -> None:
        """Stop the engine core process and close the client's sockets (the engine is unusable
        afterwards). ``vllm.LLM`` has no method for it: this stops the engine-core client and
        destroys its ZMQ context, which garbage collection would otherwise report as a
        ``ResourceWarning``."""
        core = getattr(self.engine.llm.llm_engine, "engine_core", None)
        if core is None:
            return
        core.shutdown()
        ctx = getattr(core, "ctx", None)
        if ctx is not None:
            ctx.destroy(linger=0)


def _import_llm() -> Any:
    """``vllm.LLM``. Its first import imports ``torch._inductor``, whose ``torch/utils/mkldnn.py``
    uses ``torch.jit.script_method``, deprecated in torch 2.13 (a ``DeprecationWarning`` raised in
    ``torch.jit._script``): neither ours nor vLLM's to fix, and an error under
    ``-W error::DeprecationWarning``; that one warning is ignored here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.jit\.script_method` is deprecated",
            category=DeprecationWarning,
            module=r"torch\.jit\._script",
        )
        from vllm import LLM
    return LLM


def _first(value: Any) -> int | None:
    """An id, or the first of a list of ids (instruct configs list several EOS ids)."""
    if isinstance(value, list | tuple):
        return int(value[0]) if value else None
    return None if value is None else int(value)
