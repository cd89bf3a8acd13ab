"""The ``transformers`` causal LM as a reference policy: :class:`HFPolicy` and its outputs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import decode_until_complete, rows_to_seqs, seqs_to_rows
from tiltsample.policy import response_context
from tiltsample.targets.hf import compat
from tiltsample.targets.hf.devices import (
    model_device,
    model_dtype,
    resolve_device,
    resolve_dtype,
    to_host,
)
from tiltsample.targets.hf.laws import filtered_logprobs
from tiltsample.targets.hf.loading import (
    check_model_source,
    load_tokenizer,
    loading_errors,
    special_id,
)
from tiltsample.targets.hf.session import HFSession
from tiltsample.types import Cost, Seq

__all__ = ["Generated", "HFPolicy"]


class Generated(NamedTuple):
    """Output of :meth:`HFPolicy.generate`."""

    sequences: list[Seq]
    """Responses (EOS included when they ended with EOS)."""
    log_p: Tensor
    """``[n]``: ``log p_ref(x)`` at temperature 1."""
    log_q: Tensor
    """``[n]``: log-probability under the law actually sampled (temperature, top-k, top-p)."""
    cost: Cost


def _encode_failure(tokenizer: Any, text: str, error: BaseException) -> str:
    """Why ``text`` could not be encoded, naming the characters outside a character vocabulary."""
    message = f"cannot encode text {text[:40]!r}{'...' if len(text) > 40 else ''}: {error}"
    vocab: dict[str, int] = getattr(tokenizer, "get_vocab", lambda: {})()
    if vocab and all(len(token) == 1 for token in vocab if not token.startswith(("<", "["))):
        outside = sorted({c for c in text if c not in vocab})
        if outside:
            message += f"; characters outside the vocabulary: {''.join(outside)!r}"
    return message


class HFPolicy:
    r"""A ``transformers`` causal LM as a reference policy ``p_ref(x_t | y, x_<t)``.

    Parameters
    ----------
    model
        A causal LM (``AutoModelForCausalLM``-like: ``model(input_ids, attention_mask=...,
        use_cache=...)`` with the KV cache under the keyword the installed ``transformers``
        takes, see :mod:`tiltsample.targets.hf.compat`, returning ``.logits``). It is put in eval
        mode.
    tokenizer
        Optional; used by :meth:`encode` / :meth:`decode` and for the special-token ids.
    eos_id, bos_id
        Override the special ids (default: tokenizer, then model config; the first id when the
        config lists several, as instruct models do — the protocol has one EOS). ``eos_id`` is
        required; ``bos_id`` is the context used for an empty prompt.
    max_batch
        Rows per forward call in the stateless methods (:meth:`next_logprobs`,
        :meth:`sequence_logprob`); sessions forward their whole batch at once.
    device
        Where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``): the model
        is moved there (in place, as ``Module.to``). None (default) keeps the model where it is
        (:attr:`device` is then the device of its input embeddings). ``ValueError`` naming
        ``device`` when it is malformed or not available (CUDA on a machine without it).
    dtype
        Cast the model to this dtype (``torch.float32``, ``bfloat16``, ``float16``, ``float64``
        or a name: ``"float32"``, ``"bf16"``, ``"fp16"``, ...); None (default) keeps its dtype.

    Notes
    -----
    Devices: the model, its KV cache and every tensor handed to it live on :attr:`device`;
    every law and score returned to a sampler is float64 on the CPU (logits are normalised in
    float64 on the device, then only the ``[B, V]`` law or the gathered scores are copied), where
    the samplers' arithmetic and the caller's CPU ``torch.Generator`` live. Token tensors from
    samplers (CPU) are moved to the device in :meth:`forward_logits`. See
    :mod:`tiltsample.targets.hf.devices`.

    Prompts are token ids (:data:`~tiltsample.types.Seq`) exactly as the model sees them: build
    them with :meth:`encode` (which adds the tokenizer's BOS / chat template) or by hand. An empty
    prompt means "BOS only". ``vocab_size`` is the width of the model's logits (it may exceed the
    tokenizer's vocabulary; padding ids then get whatever mass the model gives them).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        eos_id: int | None = None,
        bos_id: int | None = None,
        max_batch: int = 256,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError(
                "model must be a transformers causal LM (a module with .config), "
                f"got {type(model).__name__}"
            )
        target_device = None if device is None else resolve_device(device)
        target_dtype = None if dtype is None else resolve_dtype(dtype)
        if target_dtype is not None:
            model = model.to(target_dtype)
        if target_device is not None:
            model = model.to(target_device)
        self.model = model.eval()
        self._device = model_device(model)
        self._dtype = model_dtype(model)
        self.tokenizer = tokenizer
        config = model.config
        vocab = getattr(getattr(config, "get_text_config", lambda: config)(), "vocab_size", None)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is not None and hasattr(out_emb, "out_features"):
            vocab = int(out_emb.out_features)
        if not isinstance(vocab, int) or vocab < 2:
            raise ValueError(f"could not read a vocab_size >= 2 from the model, got {vocab!r}")
        self._vocab = vocab
        eos = eos_id if eos_id is not None else special_id(tokenizer, config, "eos")
        if eos is None:
            raise ValueError(
                "eos_id: the model/tokenizer defines no eos_token_id; pass eos_id= explicitly"
            )
        self._eos = validation.token_id("eos_id", eos, vocab)
        bos = bos_id if bos_id is not None else special_id(tokenizer, config, "bos")
        self._bos = None if bos is None else validation.token_id("bos_id", bos, vocab)
        self.max_batch = validation.positive_int("max_batch", max_batch)
        self._logits_to_keep = compat.forward_accepts(model, "logits_to_keep")
        self.name = str(getattr(config, "_name_or_path", "") or type(model).__name__)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        tokenizer: Any = "auto",
        local_files_only: bool | None = None,
        **kwargs: Any,
    ) -> HFPolicy:
        """Load a causal LM and its tokenizer from a folder (offline) or a hub name.

        ``device`` (default None: the CPU) and ``dtype`` (default float32) are checked before
        anything is loaded (``ValueError`` naming them); the weights are loaded in ``dtype`` and
        the model moved to ``device``.

        ``tokenizer="auto"`` uses :func:`load_tokenizer` (``PreTrainedTokenizerFast`` when the
        folder has a ``tokenizer.json``); pass ``None`` for no tokenizer or an object to use it.
        Offline by default: ``local_files_only=None`` (the default) means True, so a name that is
        not an existing folder fails at once with a clear message instead of retrying the network;
        pass ``local_files_only=False`` to allow downloads from a hub. A path that does not exist
        raises ``FileNotFoundError`` naming it.
        """
        from transformers import AutoModelForCausalLM

        target_device = None if device is None else resolve_device(device)
        target_dtype = resolve_dtype(dtype)
        offline = check_model_source(path, local_files_only)
        with loading_errors(path, offline):
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=target_dtype, local_files_only=offline
            )
        auto = isinstance(tokenizer, str) and tokenizer == "auto"
        tok = load_tokenizer(path, local_files_only=offline) if auto else tokenizer
        return cls(model, tok, device=target_device, **kwargs)

    # ------------------------------------------------------------------ protocol attributes
    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def device(self) -> torch.device:
        """Where the model, its KV caches and its inputs live (laws come back on the CPU)."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype (laws come back in float64 whatever it is)."""
        return self._dtype

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        where = "" if self._device.type == "cpu" else f", device={str(self._device)!r}"
        return (
            f"HFPolicy({self.name!r}, params={n}, V={self._vocab}, eos={self._eos}, "
            f"dtype={str(self._dtype).removeprefix('torch.')}{where})"
        )

    # ------------------------------------------------------------------ text helpers
    def encode(self, text: str, *, chat: bool = False, add_special_tokens: bool = True) -> Seq:
        """Token ids of a prompt ``text`` (with the tokenizer's BOS / post-processor).

        ``chat=True`` wraps ``text`` as one user message in the tokenizer's chat template (with the
        generation prompt); it raises ``ValueError`` if the tokenizer has no chat template.
        """
        tok = self._require_tokenizer()
        if chat:
            if not getattr(tok, "chat_template", None):
                raise ValueError("chat=True: the tokenizer has no chat_template")
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return tuple(int(i) for i in ids)
        try:
            ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        except Exception as error:  # tokenizers raises a bare Exception for unknown characters
            raise ValueError(_encode_failure(tok, text, error)) from error
        return tuple(int(i) for i in ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of token ids (special tokens dropped by default)."""
        tok = self._require_tokenizer()
        return str(tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this HFPolicy has no tokenizer; pass tokenizer= to use text")
        return self.tokenizer

    # ------------------------------------------------------------------ model calls
    def context(self, prompt: Seq) -> Seq:
        """The ids fed to the model before the response: ``prompt``, or ``(bos_id,)`` if empty."""
        return response_context(prompt, self._bos)

    def forward_logits(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Any]:
        """One forward call of the model: its logits (``[B, T, V]``, or ``[B, V]`` for the last
        position with ``last_only``, then computed for that position only when the model takes
        ``logits_to_keep``) and the KV cache it returned. ``cache`` is passed under the keyword the
        installed ``transformers`` takes (:mod:`tiltsample.targets.hf.compat`); None runs without
        a cache. Used by :class:`~tiltsample.targets.hf.HFSession` for its prefill and blocks.

        The one door to the model: ``input_ids``, ``attention_mask`` (a boolean mask is moved as
        such and made ``long`` on the device) and ``position_ids`` are moved to :attr:`device`
        (no copy when they are there already); the logits stay on the device."""
        dev = self._device
        kwargs = compat.forward_cache_kwargs(self.model, cache)
        if attention_mask is not None:
            mask = attention_mask.to(dev)
            kwargs["attention_mask"] = mask.long() if mask.dtype == torch.bool else mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.to(dev)
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        # inference mode, not just no_grad: measured 0.17-0.2 ms less per call of 1-8 rows on
        # the shipped model (12%); the logits and KV tensors it makes are read by later
        # functional ops only (the cache is rebound, never written in place)
        with torch.inference_mode():
            out = self.model(input_ids=input_ids.to(dev), **kwargs)
        logits = out.logits
        if last_only:
            logits = logits[:, -1]
        return logits, compat.returned_cache(out)

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        """``[B, V]`` float64 next-token log-probs by a full (uncached) forward of each prefix."""
        ctx = self.context(prompt)
        prefixes = [tuple(p) for p in prefixes]
        out = torch.empty((len(prefixes), self._vocab), dtype=torch.float64)
        for lo in range(0, len(prefixes), self.max_batch):
            chunk = prefixes[lo : lo + self.max_batch]
            rows, lengths = seqs_to_rows([ctx + p for p in chunk], pad_id=self._eos)
            mask = torch.arange(rows.shape[1])[None, :] < lengths[:, None]
            logits, _ = self.forward_logits(rows, attention_mask=mask)
            at = logits.device
            last = logits[torch.arange(len(chunk), device=at), (lengths - 1).to(at)]
            out[lo : lo + len(chunk)] = to_host(torch.log_softmax(last.to(torch.float64), dim=-1))
        return out

    def sequence_logprob(self, prompt: Seq, xs: Sequence[Seq], per_token: bool = False) -> Tensor:
        """``log p(x | y)`` (``[B, L_max]`` per token) by one forward of ``prompt ⊕ x`` per row."""
        ctx = self.context(prompt)
        xs = [tuple(int(t) for t in x) for x in xs]
        length = max((len(x) for x in xs), default=0)
        per = torch.zeros((len(xs), length), dtype=torch.float64)
        n_ctx = len(ctx)
        for lo in range(0, len(xs), self.max_batch):
            chunk = xs[lo : lo + self.max_batch]
            if not any(chunk):
                continue
            rows, lengths = seqs_to_rows([ctx + x for x in chunk], pad_id=self._eos)
            mask = torch.arange(rows.shape[1])[None, :] < lengths[:, None]
            logits, _ = self.forward_logits(rows, attention_mask=mask)
            width = rows.shape[1] - n_ctx
            lp = torch.log_softmax(logits[:, n_ctx - 1 : -1].to(torch.float64), dim=-1)
            tok = rows[:, n_ctx:].to(lp.device)
            got = to_host(lp.gather(-1, tok[..., None]).squeeze(-1))
            valid = torch.arange(width)[None, :] < (lengths - n_ctx)[:, None]
            per[lo : lo + len(chunk), :width] = torch.where(valid, got, torch.zeros_like(got))
        return per if per_token else per.sum(dim=1)

    def session(self, prompt: Seq, batch: int) -> HFSession:
        """A KV-cached :class:`HFSession` of ``batch`` empty rows after ``prompt``."""
        return HFSession(self, prompt, batch)

    def session_multi(self, prompts: Sequence[Seq], rows_per_prompt: Sequence[int]) -> HFSession:
        """One KV-cached :class:`HFSession` over several prompts (see
        :func:`tiltsample.policy.open_session_multi`): ``rows_per_prompt[i]`` empty rows after
        ``prompts[i]``, every prompt encoded once, all rows decoded in the same forward calls."""
        return HFSession.multi(self, prompts, rows_per_prompt)

    def generate(
        self,
        prompt: Seq,
        num: int,
        generator: torch.Generator,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> Generated:
        """``num`` responses decoded with the caller's generator (own loop; never ``generate``).

        Full-vocabulary sampling at ``temperature`` unless ``top_k`` / ``top_p`` are given; the
        returned ``log_q`` is the log-probability under the law actually sampled, so
        ``log_p - log_q`` is an exact importance log-weight towards ``p_ref``.
        """
        validation.generator("generator", generator)
        validation.positive_int("num", num)
        validation.positive_int("max_new_tokens", max_new_tokens)
        temperature = validation.positive_float("temperature", temperature)
        if top_k is not None:
            validation.positive_int("top_k", top_k)
        if top_p is not None:
            top_p = validation.unit_interval("top_p", top_p, closed=True)
            if top_p == 0.0:
                raise ValueError("top_p must lie in (0, 1], got 0")
        session = self.session(prompt, num)
        out = decode_until_complete(
            session,
            generator,
            eos_id=self._eos,
            max_length=max_new_tokens,
            proposal=partial(filtered_logprobs, temperature=temperature, top_k=top_k, top_p=top_p),
            drop_finished=True,  # a throw-away session
        )
        seqs = rows_to_seqs(out.tokens, self._eos)
        cost = session.cost + Cost(generated_tokens=out.generated_tokens)
        return Generated(seqs, out.log_p, out.log_q, cost)
