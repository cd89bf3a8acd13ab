r"""Real language models: ``transformers`` causal and masked-diffusion LMs as reference policies.

:class:`HFPolicy`
    Any ``transformers`` causal LM (a local folder, or a hub name when online) as a
    :class:`~tiltsample.policy.ReferencePolicy`. Its :class:`HFSession` is a batched
    :class:`~tiltsample.policy.DecodeSession` over a ``DynamicCache``:

    * the prompt is encoded **once** (batch 1) and the cache is expanded to the batch with
      ``batch_repeat_interleave``;
    * ``extend`` only records tokens; the next ``logprobs`` pushes all pending tokens through the
      model in one call (``[B, k]``), asking for the last position's logits only;
    * ``truncate(n)`` crops the cache (``crop(-n)``) and re-feeds one token per row;
      ``truncate_rows(n)`` cuts every row by its own amount (ragged rows: the cut columns are
      masked out of the 2-D attention mask and new tokens get per-row ``position_ids``);
    * ``extend_and_score(tokens)`` scores ``k`` given tokens per row in one forward call;
    * :meth:`HFPolicy.session_multi` opens one session over several prompts;
    * ``select(indices)`` gathers cache rows (``batch_select_indices``; repeats allowed — this is
      resampling and expansion, without re-encoding anything);
    * ``fork()`` copies the cache *by reference*: ``DynamicLayer`` updates rebind their tensors
      (``torch.cat``, slicing, indexing) and never write in place, so two forks share the common
      prefix's memory until one of them changes it (copy-on-write). Cache layers of other types are
      deep-copied.

    Sampling never goes through ``generate(do_sample=True)`` (which silently applies top-k = 50 to
    a model built from a config, and draws from torch's global RNG): every decode loop of the
    library samples with the caller's ``torch.Generator`` from the full-vocabulary law, and
    :meth:`HFPolicy.generate` applies top-k / top-p only when asked, reporting the log-probability
    of the law it actually sampled.

:class:`HFMaskedDiffusionPolicy`
    A bidirectional mask predictor (LLaDA-style interface: one forward pass predicts every masked
    position) as a :class:`~tiltsample.diffusion.MaskedDiffusionPolicy`, with a fixed response
    length, a number of denoising steps and an unmasking rule (see its docstring).

Numerics: logits are cast to float64 before ``log_softmax``, so every returned row is normalised to
float64 precision; a float32 model agrees with its own full recompute to about ``1e-5``.

``transformers`` is imported lazily (inside functions), so importing this module is cheap.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.decoding import (
    decode_until_complete,
    rows_to_seqs,
    sample_categorical,
    seqs_to_rows,
    tempered_logprobs,
)
from tiltsample.diffusion import block_positions, block_quota, check_step
from tiltsample.policy import check_token_block
from tiltsample.targets import hf_compat
from tiltsample.types import Cost, Seq

__all__ = [
    "UNMASKING_RULES",
    "Generated",
    "HFMaskedDiffusionPolicy",
    "HFPolicy",
    "HFSession",
    "filtered_logprobs",
    "load_tokenizer",
]


# --------------------------------------------------------------------------------------------
# tokenizer loading
# --------------------------------------------------------------------------------------------
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


def _special_id(tokenizer: Any, config: Any, name: str) -> int | None:
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


def _encode_failure(tokenizer: Any, text: str, error: BaseException) -> str:
    """Why ``text`` could not be encoded, naming the characters outside a character vocabulary."""
    message = f"cannot encode text {text[:40]!r}{'...' if len(text) > 40 else ''}: {error}"
    vocab: dict[str, int] = getattr(tokenizer, "get_vocab", lambda: {})()
    if vocab and all(len(token) == 1 for token in vocab if not token.startswith(("<", "["))):
        outside = sorted({c for c in text if c not in vocab})
        if outside:
            message += f"; characters outside the vocabulary: {''.join(outside)!r}"
    return message


def _check_model_source(path: str | os.PathLike[str], local_files_only: bool | None) -> bool:
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
def _loading_errors(path: str | os.PathLike[str], offline: bool) -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------
# top-k / top-p
# --------------------------------------------------------------------------------------------
def filtered_logprobs(
    log_p: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    r"""The law a tempered, truncated sampler actually draws from, as normalised log-probs.

    ``q(v) ∝ exp(log p(v) / tau)`` restricted to the ``top_k`` most likely tokens and then to the
    smallest set whose mass reaches ``top_p`` (nucleus), renormalised. Ties at the top-k boundary
    are broken by token id (``torch.topk`` order is not used), so the law is a deterministic
    function of ``log_p``. With ``top_k=None`` and ``top_p=None`` (the default) nothing is
    truncated: this is what every sampler of the library uses.
    """
    log_q = tempered_logprobs(log_p.to(torch.float64), temperature)
    vocab = log_q.shape[-1]
    if top_k is not None and top_k < vocab:
        # stable descending sort: equal values keep ascending token-id order
        order = torch.sort(log_q, dim=-1, descending=True, stable=True).indices
        drop = order[..., top_k:]
        log_q = log_q.scatter(-1, drop, -math.inf)
        log_q = torch.log_softmax(log_q, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_lq, order = torch.sort(log_q, dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_lq.exp(), dim=-1) - sorted_lq.exp()
        drop_sorted = mass_before >= top_p  # keep a token while the mass *before* it is < top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        log_q = torch.log_softmax(log_q.masked_fill(drop, -math.inf), dim=-1)
    return log_q


class Generated(NamedTuple):
    """Output of :meth:`HFPolicy.generate`."""

    sequences: list[Seq]
    """Responses (EOS included when they ended with EOS)."""
    log_p: Tensor
    """``[n]``: ``log p_ref(x)`` at temperature 1."""
    log_q: Tensor
    """``[n]``: log-probability under the law actually sampled (temperature, top-k, top-p)."""
    cost: Cost


# --------------------------------------------------------------------------------------------
# the causal-LM policy
# --------------------------------------------------------------------------------------------
class HFPolicy:
    r"""A ``transformers`` causal LM as a reference policy ``p_ref(x_t | y, x_<t)``.

    Parameters
    ----------
    model
        A causal LM (``AutoModelForCausalLM``-like: ``model(input_ids, attention_mask=...,
        use_cache=...)`` with the KV cache under the keyword the installed ``transformers``
        takes, see :mod:`tiltsample.targets.hf_compat`, returning ``.logits``). It is put in eval
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

    Notes
    -----
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
    ) -> None:
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError(
                "model must be a transformers causal LM (a module with .config), "
                f"got {type(model).__name__}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        vocab = getattr(getattr(config, "get_text_config", lambda: config)(), "vocab_size", None)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out_emb is not None and hasattr(out_emb, "out_features"):
            vocab = int(out_emb.out_features)
        if not isinstance(vocab, int) or vocab < 2:
            raise ValueError(f"could not read a vocab_size >= 2 from the model, got {vocab!r}")
        self._vocab = vocab
        eos = eos_id if eos_id is not None else _special_id(tokenizer, config, "eos")
        if eos is None:
            raise ValueError(
                "eos_id: the model/tokenizer defines no eos_token_id; pass eos_id= explicitly"
            )
        self._eos = validation.token_id("eos_id", eos, vocab)
        bos = bos_id if bos_id is not None else _special_id(tokenizer, config, "bos")
        self._bos = None if bos is None else validation.token_id("bos_id", bos, vocab)
        self.max_batch = validation.positive_int("max_batch", max_batch)
        self._logits_to_keep = hf_compat.forward_accepts(model, "logits_to_keep")
        self.name = str(getattr(config, "_name_or_path", "") or type(model).__name__)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        tokenizer: Any = "auto",
        local_files_only: bool | None = None,
        **kwargs: Any,
    ) -> HFPolicy:
        """Load a causal LM and its tokenizer from a folder (offline) or a hub name.

        ``tokenizer="auto"`` uses :func:`load_tokenizer` (``PreTrainedTokenizerFast`` when the
        folder has a ``tokenizer.json``); pass ``None`` for no tokenizer or an object to use it.
        Offline by default: ``local_files_only=None`` (the default) means True, so a name that is
        not an existing folder fails at once with a clear message instead of retrying the network;
        pass ``local_files_only=False`` to allow downloads from a hub. A path that does not exist
        raises ``FileNotFoundError`` naming it.
        """
        from transformers import AutoModelForCausalLM

        offline = _check_model_source(path, local_files_only)
        with _loading_errors(path, offline):
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, local_files_only=offline
            )
        auto = isinstance(tokenizer, str) and tokenizer == "auto"
        tok = load_tokenizer(path, local_files_only=offline) if auto else tokenizer
        return cls(model, tok, **kwargs)

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

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"HFPolicy({self.name!r}, params={n}, V={self._vocab}, eos={self._eos})"

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
        prompt = tuple(int(t) for t in prompt)
        if prompt:
            return prompt
        if self._bos is None:
            raise ValueError(
                "prompt is empty and the model has no bos_token_id: pass a non-empty prompt "
                "or bos_id="
            )
        return (self._bos,)

    def _logits(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        last_only: bool = False,
    ) -> tuple[Tensor, Any]:
        kwargs = hf_compat.forward_cache_kwargs(self.model, cache)
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if last_only and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits
        if last_only:
            logits = logits[:, -1]
        return logits, hf_compat.returned_cache(out)

    def next_logprobs(self, prompt: Seq, prefixes: Sequence[Seq]) -> Tensor:
        """``[B, V]`` float64 next-token log-probs by a full (uncached) forward of each prefix."""
        ctx = self.context(prompt)
        prefixes = [tuple(p) for p in prefixes]
        out = torch.empty((len(prefixes), self._vocab), dtype=torch.float64)
        for lo in range(0, len(prefixes), self.max_batch):
            chunk = prefixes[lo : lo + self.max_batch]
            rows, lengths = seqs_to_rows([ctx + p for p in chunk], pad_id=self._eos)
            mask = (torch.arange(rows.shape[1])[None, :] < lengths[:, None]).long()
            logits, _ = self._logits(rows, attention_mask=mask)
            last = logits[torch.arange(len(chunk)), lengths - 1]
            out[lo : lo + len(chunk)] = torch.log_softmax(last.to(torch.float64), dim=-1)
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
            mask = (torch.arange(rows.shape[1])[None, :] < lengths[:, None]).long()
            logits, _ = self._logits(rows, attention_mask=mask)
            width = rows.shape[1] - n_ctx
            lp = torch.log_softmax(logits[:, n_ctx - 1 : -1].to(torch.float64), dim=-1)
            tok = rows[:, n_ctx:]
            got = lp.gather(-1, tok[..., None]).squeeze(-1)
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
        )
        seqs = rows_to_seqs(out.tokens, self._eos)
        cost = session.cost + Cost(generated_tokens=out.generated_tokens)
        return Generated(seqs, out.log_p, out.log_q, cost)


def _pad_columns(t: Tensor, width: int) -> Tensor:
    """Pad a ``[B, H, T, D]`` cache tensor with zero columns up to ``width`` (they are masked).

    Returns ``t`` itself when it already has ``width`` columns (no copy).
    """
    if t.shape[2] == width:
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2]))


def _fork_cache(cache: Any) -> Any:
    """An independent copy of a ``DynamicCache`` that shares tensors copy-on-write.

    ``DynamicLayer`` never writes its tensors in place (``update`` concatenates, ``crop`` slices,
    ``batch_select_indices`` / ``batch_repeat_interleave`` index), so copying the layer objects is
    enough; any other layer type is deep-copied.
    """
    layers = hf_compat.dynamic_layers(cache)
    if layers is not None:
        twin = copy.copy(cache)
        twin.layers = [copy.copy(layer) for layer in layers]
        return twin
    return copy.deepcopy(cache)


class HFSession:
    """A batched, KV-cached :class:`~tiltsample.policy.RaggedDecodeSession` of an :class:`HFPolicy`.

    Layout: one ``DynamicCache`` of ``T`` columns shared by the ``B`` rows, a boolean ``[B, T]``
    *live* mask, and per row its prompt, its response tokens and the cache column of each of them.
    A column holds a context or response token of a row; a row's new tokens attend only to its live
    columns (the mask is passed as the 2-D ``attention_mask``) and get explicit ``position_ids``
    ``len(context_r) + i``, so rows of different lengths, cut at different places or continuing
    different prompts share every forward call without re-encoding anything:

    * the prompt(s) are encoded **once** (one batch of the distinct prompts, right-padded), and
      the cache is expanded to the rows with ``batch_select_indices``;
    * ``extend`` only records tokens (at each row's own position); the next ``logprobs`` pushes
      every row's pending tokens through the model in one call (right-aligned in a ``[B, k]``
      block, padding slots masked), asking for the last position's logits only;
    * ``truncate_rows(n)`` marks the cut tokens' columns dead (the last kept token is re-fed, as
      no per-position law is stored); columns dead in every row at the end are cropped, and when
      holes exceed a fifth of the columns (and 8) the cache is compacted (each row's live columns
      gathered to the left; keys already carry their rotary positions, so moving them is exact);
    * ``extend_and_score(tokens)`` pushes the pending and the ``k`` given tokens in one call and
      reads the log-prob of every given token;
    * ``select(indices)`` gathers cache rows (``batch_select_indices``; repeats allowed);
    * ``fork()`` copies the cache *by reference*: ``DynamicLayer`` updates rebind their tensors
      (``torch.cat``, slicing, indexing, gathering) and never write in place, so two forks share
      the common prefix's memory until one of them changes it (copy-on-write). Cache layers of
      other types are deep-copied (and never compacted).

    Rows that ended with EOS report a point mass on EOS; their EOS padding is recorded but never
    pushed through the model. Cost: the prefill counts the distinct contexts' tokens once; every
    later call counts ``B × k`` tokens for a ``[B, k]`` block (padding slots included: the model
    computes them).
    """

    def __init__(self, policy: HFPolicy, prompt: Seq, batch: int) -> None:
        validation.non_negative_int("batch", batch)
        self._setup(policy, [policy.context(prompt)], [batch])

    @classmethod
    def multi(
        cls, policy: HFPolicy, prompts: Sequence[Seq], rows_per_prompt: Sequence[int]
    ) -> HFSession:
        """``rows_per_prompt[i]`` empty rows after ``prompts[i]`` (rows ordered by prompt)."""
        if len(prompts) != len(rows_per_prompt):
            raise ValueError("rows_per_prompt must hold one count per prompt")
        for c in rows_per_prompt:
            validation.non_negative_int("rows_per_prompt", c)
        self = cls.__new__(cls)
        self._setup(policy, [policy.context(p) for p in prompts], list(rows_per_prompt))
        return self

    def _setup(self, policy: HFPolicy, contexts: list[Seq], counts: list[int]) -> None:
        self._policy = policy
        self._contexts = contexts
        batch = sum(counts)
        self._row_prompt = torch.repeat_interleave(
            torch.arange(len(counts), dtype=torch.long), torch.tensor(counts, dtype=torch.long)
        )
        ctx_len = torch.tensor([len(c) for c in contexts], dtype=torch.long)
        self._ctx_len = ctx_len[self._row_prompt] if batch else torch.zeros(0, dtype=torch.long)
        self._eos = policy.eos_id
        self._vocab = policy.vocab_size
        self._tokens = torch.full((batch, 0), self._eos, dtype=torch.long)
        self._lens = torch.zeros(batch, dtype=torch.long)
        self._done = torch.zeros(batch, dtype=torch.bool)
        self._cache: Any = None
        self._live = torch.zeros((batch, 0), dtype=torch.bool)
        self._col = torch.zeros((batch, 0), dtype=torch.long)
        self._cached = torch.zeros(batch, dtype=torch.long)
        self._prompt_laws: Tensor | None = None
        self._law = torch.zeros((batch, self._vocab), dtype=torch.float64)
        self._known = torch.zeros(batch, dtype=torch.bool)
        self._forward = 0
        self._calls = 0

    # ------------------------------------------------------------------ protocol
    @property
    def batch_size(self) -> int:
        return int(self._tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self._lens.max()) if self._lens.numel() else 0

    @property
    def cost(self) -> Cost:
        return Cost(forward_tokens=self._forward, model_calls=self._calls)

    @property
    def cached_length(self) -> int:
        """Response tokens held in the KV cache by every row (the rest are pending)."""
        if self._cache is None or not self._cached.numel():
            return 0
        return int(self._cached.min())

    @property
    def cache_columns(self) -> int:
        """Columns of the KV cache (context, live response tokens and holes)."""
        return int(self._live.shape[1]) if self._cache is not None else 0

    def row_lengths(self) -> Tensor:
        return self._lens.clone()

    def tokens(self) -> Tensor:
        return self._tokens[:, : self.length].clone()

    def logprobs(self) -> Tensor:
        if not bool(self._known.all()):
            self._compute()
        return self._law

    def _check_tokens(self, tokens: Tensor) -> Tensor:
        return check_token_block(tokens, self.batch_size, self._vocab)

    def _append(self, tokens: Tensor) -> Tensor:
        k = tokens.shape[1]
        is_eos = tokens == self._eos
        after = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
        held = torch.where(self._done[:, None] | after, torch.full_like(tokens, self._eos), tokens)
        need = self.length + k
        if need > self._tokens.shape[1]:
            grow = need - self._tokens.shape[1]
            self._tokens = torch.cat(
                [self._tokens, torch.full((self.batch_size, grow), self._eos, dtype=torch.long)], 1
            )
            self._col = torch.cat(
                [self._col, torch.zeros((self.batch_size, grow), dtype=torch.long)], 1
            )
        cols = self._lens[:, None] + torch.arange(k)[None, :]
        self._tokens.scatter_(1, cols, held)
        self._lens = self._lens + k
        self._done = self._done | (held == self._eos).any(dim=1)
        self._known[:] = False
        return held

    def extend(self, tokens: Tensor) -> None:
        tokens = self._check_tokens(tokens)
        if tokens.shape[1] == 0:
            return
        self._append(tokens)

    def extend_and_score(self, tokens: Tensor) -> Tensor:
        """Append ``tokens`` ``[B, k]`` and return their log-probs ``[B, k]`` from one forward call.

        See :func:`tiltsample.policy.extend_and_score` (temperature 1, float64; entries after a
        row's EOS are 0). The pending tokens and the ``k`` new ones go through the model together;
        the law after the block is kept, so the next :meth:`logprobs` is free.
        """
        tokens = self._check_tokens(tokens)
        batch, k = tokens.shape
        out = torch.zeros((batch, k), dtype=torch.float64)
        if k == 0 or batch == 0:
            if k:
                self._append(tokens)
            return out
        if self._cache is None:
            self._prefill()
        done_before = self._done.clone()
        pending_before = self._lens - self._cached
        first_law = self._law.clone()
        held = self._append(tokens)
        rows = ~done_before
        logits, width = self._forward_pending(rows, last_only=False)
        # slot of the token that precedes new token i of row r: width - k - 1 + i
        for i in range(k):
            slot = width - k - 1 + i
            tok = held[:, i]
            if i == 0:
                # the law before the block: stored, the prompt's, or the last pending slot
                assert self._prompt_laws is not None
                base = torch.where(
                    (self._lens - k == 0)[:, None],
                    self._prompt_laws[self._row_prompt],
                    first_law,
                )
                lp_known = base.gather(1, tok[:, None]).squeeze(1)
                use_slot = rows & (pending_before > 0)
                if bool(use_slot.any()):
                    lse = torch.logsumexp(logits[:, slot].to(torch.float64), dim=-1)
                    lp_slot = logits[:, slot].to(torch.float64).gather(1, tok[:, None]).squeeze(1)
                    lp_known = torch.where(use_slot, lp_slot - lse, lp_known)
                got = lp_known
            else:
                row_logits = logits[:, slot].to(torch.float64)
                got = row_logits.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(
                    row_logits, dim=-1
                )
            ended_before = (held[:, :i] == self._eos).any(dim=1) if i else torch.zeros_like(rows)
            out[:, i] = torch.where(rows & ~ended_before, got, torch.zeros_like(got))
        law = torch.log_softmax(logits[:, width - 1].to(torch.float64), dim=-1)
        self._set_laws(law, rows)
        return out

    def truncate(self, n: int) -> None:
        low = int(self._lens.min()) if self._lens.numel() else 0
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= low:
            raise ValueError(f"n must be an int in [0, length={low}], got {n!r}")
        if n == 0:
            return
        self.truncate_rows(torch.full((self.batch_size,), n, dtype=torch.long))

    def truncate_rows(self, n: Tensor) -> None:
        counts = torch.as_tensor(n, dtype=torch.long)
        if counts.shape != self._lens.shape:
            raise ValueError(
                f"n must have shape [B] = {tuple(self._lens.shape)}, got {tuple(counts.shape)}"
            )
        if counts.numel() and (bool((counts < 0).any()) or bool((counts > self._lens).any())):
            raise ValueError("n[r] must lie in [0, row length] for every row r")
        cut = counts > 0
        if not bool(cut.any()):
            return
        self._lens = self._lens - counts
        pos = torch.arange(self._tokens.shape[1])[None, :]
        inside = pos < self._lens[:, None]
        self._tokens = torch.where(inside, self._tokens, torch.full_like(self._tokens, self._eos))
        self._done = ((self._tokens == self._eos) & inside).any(dim=1)
        self._known = self._known & ~cut
        if self._cache is not None:
            # keep at most len - 1 cached response tokens: the last token is re-fed (for an
            # emptied row the prompt's law is stored)
            keep = torch.where(cut, (self._lens - 1).clamp(min=0), self._cached)
            keep = torch.minimum(keep, self._cached)
            dead = (pos >= keep[:, None]) & (pos < self._cached[:, None])
            if bool(dead.any()):
                r, i = dead.nonzero(as_tuple=True)
                self._live[r, self._col[r, i]] = False
            self._cached = keep
            self._tidy()
        width = self.length
        self._tokens = self._tokens[:, :width]
        self._col = self._col[:, :width]

    def select(self, indices: Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
            raise ValueError(f"indices must lie in [0, batch_size={self.batch_size})")
        self._tokens = self._tokens[idx]
        self._lens = self._lens[idx]
        self._done = self._done[idx]
        self._row_prompt = self._row_prompt[idx]
        self._ctx_len = self._ctx_len[idx]
        self._law = self._law[idx]
        self._known = self._known[idx]
        self._cached = self._cached[idx]
        self._col = self._col[idx]
        self._live = self._live[idx]
        width = self.length
        self._tokens = self._tokens[:, :width]
        self._col = self._col[:, :width]
        if self._cache is not None:
            if idx.numel() == 0:
                self._cache = None
                self._live = torch.zeros((0, 0), dtype=torch.bool)
            else:
                self._cache.batch_select_indices(idx)
                self._tidy()

    def append_rows(self, other: HFSession) -> None:
        """Move the rows of ``other`` (a session of the same policy; consumed, its cost moves
        with it) after these rows: the shorter KV cache is padded with masked columns and the
        batches are concatenated (``DynamicLayer`` caches only)."""
        if not isinstance(other, HFSession) or other._policy is not self._policy:
            raise TypeError("append_rows needs an HFSession of the same policy")
        for s in (self, other):
            if s.batch_size and s._cache is None:
                s._prefill()
        # contexts are deduplicated (a state session merged every step must not grow)
        contexts = list(self._contexts)
        remap: list[int] = []
        for c in other._contexts:
            if c not in contexts:
                contexts.append(c)
            remap.append(contexts.index(c))
        if self._prompt_laws is not None or other._prompt_laws is not None:
            laws = torch.full((len(contexts), self._vocab), -math.inf, dtype=torch.float64)
            if self._prompt_laws is not None:
                laws[: len(self._contexts)] = self._prompt_laws
            if other._prompt_laws is not None:
                for i, j in enumerate(remap):
                    if bool(torch.isfinite(other._prompt_laws[i]).any()):
                        laws[j] = other._prompt_laws[i]
            self._prompt_laws = laws
        self._contexts = contexts
        if other._cache is None:  # other has no rows
            pass
        elif self._cache is None:  # this session has no rows
            self._cache = other._cache
            self._live = other._live
        else:
            mine = hf_compat.dynamic_layers(self._cache)
            theirs = hf_compat.dynamic_layers(other._cache)
            if mine is None or theirs is None:
                raise TypeError("append_rows supports DynamicLayer caches only")
            width = max(self._live.shape[1], other._live.shape[1])
            for x, y in zip(mine, theirs, strict=True):
                x.keys = torch.cat([_pad_columns(x.keys, width), _pad_columns(y.keys, width)])
                x.values = torch.cat([_pad_columns(x.values, width), _pad_columns(y.values, width)])
            self._live = torch.cat(
                [
                    torch.nn.functional.pad(self._live, (0, width - self._live.shape[1])),
                    torch.nn.functional.pad(other._live, (0, width - other._live.shape[1])),
                ]
            )
        tok_width = max(self._tokens.shape[1], other._tokens.shape[1])

        def pad(t: Tensor, fill: int) -> Tensor:
            return torch.nn.functional.pad(t, (0, tok_width - t.shape[1]), value=fill)

        self._tokens = torch.cat([pad(self._tokens, self._eos), pad(other._tokens, self._eos)])
        self._col = torch.cat([pad(self._col, 0), pad(other._col, 0)])
        for name in ("_lens", "_done", "_ctx_len", "_law", "_known", "_cached"):
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        mapped = torch.tensor(remap, dtype=torch.long)[other._row_prompt]
        self._row_prompt = torch.cat([self._row_prompt, mapped])
        self._forward += other._forward
        self._calls += other._calls

    def fork(self) -> HFSession:
        twin = copy.copy(self)
        for name in (
            "_tokens",
            "_lens",
            "_done",
            "_row_prompt",
            "_ctx_len",
            "_law",
            "_known",
            "_cached",
            "_col",
            "_live",
        ):
            setattr(twin, name, getattr(self, name).clone())
        twin._cache = None if self._cache is None else _fork_cache(self._cache)
        twin._forward = 0
        twin._calls = 0
        return twin

    # ------------------------------------------------------------------ internals
    def _prefill(self) -> None:
        """Encode the distinct contexts once (right-padded batch); expand the cache to the rows."""
        used = sorted(set(self._row_prompt.tolist()))
        sub = {p: i for i, p in enumerate(used)}
        rows, lengths = seqs_to_rows([self._contexts[p] for p in used], pad_id=self._eos)
        width = rows.shape[1]
        mask = torch.arange(width)[None, :] < lengths[:, None]
        cache = hf_compat.new_dynamic_cache()
        positions = torch.arange(width)[None, :].expand(len(used), -1)
        kwargs: dict[str, Any] = {}
        if not bool(mask.all()):
            kwargs = {"attention_mask": mask.long(), "position_ids": positions}
        logits, _ = self._policy._logits(rows, cache=cache, **kwargs)
        self._forward += int(lengths.sum())
        self._calls += 1
        last = logits[torch.arange(len(used)), lengths - 1].to(torch.float64)
        laws = torch.full((len(self._contexts), self._vocab), -math.inf, dtype=torch.float64)
        laws[used] = torch.log_softmax(last, dim=-1)
        self._prompt_laws = laws
        index = torch.tensor([sub[p] for p in self._row_prompt.tolist()], dtype=torch.long)
        if len(used) == 1 and self.batch_size > 1:
            cache.batch_repeat_interleave(self.batch_size)
        elif not (len(used) == 1 and self.batch_size == 1):
            cache.batch_select_indices(index)
        self._cache = cache
        self._live = mask[index]
        self._cached = torch.zeros(self.batch_size, dtype=torch.long)

    def _set_laws(self, law: Tensor, rows: Tensor) -> None:
        """Store ``law`` for ``rows``; prompt laws for empty rows; point masses for ended rows."""
        assert self._prompt_laws is not None
        new = torch.where(rows[:, None], law, self._law)
        empty = (self._lens == 0) & ~self._known
        new = torch.where(empty[:, None], self._prompt_laws[self._row_prompt], new)
        if bool(self._done.any()):
            new[self._done] = -math.inf
            new[self._done, self._eos] = 0.0
        self._law = new
        self._known[:] = True

    def _compute(self) -> None:
        if self.batch_size == 0:
            self._known[:] = True
            return
        if self._cache is None:
            self._prefill()
        rows = ~self._known & ~self._done & (self._lens > 0)
        law = self._law
        if bool(rows.any()):
            logits, _ = self._forward_pending(rows, last_only=True)  # [B, V]: last slot
            law = torch.log_softmax(logits.to(torch.float64), dim=-1)
        self._set_laws(law, rows)

    def _forward_pending(self, rows: Tensor, *, last_only: bool) -> tuple[Tensor, int]:
        """Push the pending tokens of ``rows`` (right-aligned) through the model in one call."""
        pending = torch.where(rows, self._lens - self._cached, torch.zeros_like(self._lens))
        if bool((rows & (pending <= 0)).any()):  # pragma: no cover - guarded by the invariant
            raise RuntimeError("HFSession lost its next-token law; this is a bug")
        width = int(pending.max())
        batch = self.batch_size
        slot = torch.arange(width)[None, :]
        start = width - pending  # first real slot of each row
        real = slot >= start[:, None]
        index = (self._cached[:, None] + slot - start[:, None]).clamp(min=0)
        index = index.clamp(max=max(self._tokens.shape[1] - 1, 0))
        ids = torch.where(real, self._tokens.gather(1, index), torch.full_like(index, self._eos))
        positions = torch.where(real, self._ctx_len[:, None] + index, torch.zeros_like(index))
        mask = torch.cat([self._live, real], dim=1)
        logits, _ = self._policy._logits(
            ids,
            cache=self._cache,
            attention_mask=mask.long(),
            position_ids=positions,
            last_only=last_only,
        )
        self._forward += batch * width
        self._calls += 1
        columns = self._live.shape[1] + slot.expand(batch, -1)
        r_idx, s_idx = real.nonzero(as_tuple=True)
        self._col[r_idx, index[r_idx, s_idx]] = columns[r_idx, s_idx]
        self._live = mask
        self._cached = torch.where(rows, self._lens, self._cached)
        return logits, width

    def _tidy(self) -> None:
        """Crop columns dead in every row at the end; compact when holes dominate."""
        if self._cache is None or self._live.shape[1] == 0:
            return
        any_live = self._live.any(dim=0)
        width = self._live.shape[1]
        last = int(any_live.nonzero().max()) + 1 if bool(any_live.any()) else 0
        if last < width:
            self._cache.crop(-(width - last))
            self._live = self._live[:, :last]
        counts = self._live.sum(dim=1)
        need = int(counts.max()) if counts.numel() else 0
        if self._live.shape[1] - need > max(8, need // 4):
            self._compact(counts, need)

    def _compact(self, counts: Tensor, need: int) -> None:
        layers = hf_compat.dynamic_layers(self._cache)
        if layers is None:
            return
        order = torch.sort((~self._live).long(), dim=1, stable=True).indices[:, :need]
        for layer in layers:
            if not getattr(layer, "is_initialized", True) or layer.keys is None:
                continue
            b, h, _, d = layer.keys.shape
            gather = order[:, None, :, None].expand(b, h, need, d)
            layer.keys = layer.keys.gather(2, gather)
            dv = layer.values.shape[-1]
            layer.values = layer.values.gather(2, order[:, None, :, None].expand(b, h, need, dv))
        rank = torch.cumsum(self._live.long(), dim=1) - 1
        cached = torch.arange(self._col.shape[1])[None, :] < self._cached[:, None]
        moved = rank.gather(1, self._col.clamp(max=self._live.shape[1] - 1))
        self._col = torch.where(cached, moved, torch.zeros_like(moved))
        self._live = torch.arange(need)[None, :] < counts[:, None]


# --------------------------------------------------------------------------------------------
# masked diffusion
# --------------------------------------------------------------------------------------------
UNMASKING_RULES: tuple[str, ...] = ("fixed", "random", "max-confidence", "drawn-confidence")


class HFMaskedDiffusionPolicy:
    r"""A bidirectional mask predictor as a :class:`~tiltsample.diffusion.MaskedDiffusionPolicy`.

    The network sees ``context ⊕ state`` (``state`` the ``L`` response positions, ``mask_id`` where
    masked) with full (non-causal) attention and predicts, at every response position, the token
    there: :meth:`position_logprobs` returns these ``[B, L, V]`` laws (``mask_id`` and the ids in
    ``forbidden_ids`` get probability zero).

    Base sampler (it *defines* ``p_ref``; ``specs/ets.md`` §1, §3), with the names and schedule of
    the exact toy :class:`~tiltsample.targets.masked_diffusion.MaskedDiffusionToy`: ``T =
    num_steps`` steps; LLaDA's semi-autoregressive schedule splits the response into blocks of
    ``block_length`` positions (default one block) and each block evenly over its ``T / (L /
    block_length)`` steps. At every step each eligible (current block, masked) position draws a
    token from its predictive law at ``temperature`` with the caller's generator, and the
    committed positions are chosen by ``unmasking``:

    ``"fixed"``
        the leftmost eligible masked positions;
    ``"random"``
        a uniformly random subset of them;
    ``"max-confidence"``
        the positions whose predictive law has the largest maximum probability;
    ``"drawn-confidence"`` (default)
        LLaDA's low-confidence remasking: the positions whose *drawn* tokens have the highest
        untempered probability.

    Ties go to the lowest position. The first three rules look at the revealed tokens only, so with
    one position per step and an exact predictor the output law is the joint (the spec's DLM toy);
    ``"drawn-confidence"`` looks at the fresh draws, so ``p_ref`` is the sampler's own output law,
    which has no tractable sequence probability for a network (this class therefore has no
    ``sequence_logprob``; samplers that need only rewards run on it).

    ``shift=True`` reads the prediction for position ``j`` from the network output at ``j - 1``
    (the last context position for ``j = 0``), as in models adapted from causal LMs (Dream,
    DiffuLLaMA); the shipped task model is one.

    Positions after a committed EOS are not forced to EOS; a response is read as a
    :data:`~tiltsample.types.Seq` cut after its first EOS (the protocol's convention) and the
    trained task model learns to fill them with EOS.

    Cost of a step: one forward of ``B × (len(context) + L)`` tokens (no KV cache: attention is
    bidirectional) for the rows that still have a masked position; ``generated_tokens`` =
    positions committed.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        length: int,
        num_steps: int | None = None,
        block_length: int | None = None,
        mask_id: int | None = None,
        eos_id: int | None = None,
        bos_id: int | None = None,
        unmasking: str = "drawn-confidence",
        temperature: float = 1.0,
        forbidden_ids: Sequence[int] = (),
        shift: bool = False,
    ) -> None:
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
        if not isinstance(shift, bool):
            raise TypeError(f"shift must be a bool, got {type(shift).__name__}")
        self.shift = shift
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        vocab = getattr(config, "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 3:
            raise ValueError(f"model.config.vocab_size must be an int >= 3, got {vocab!r}")
        self._vocab = vocab
        self._length = validation.positive_int("length", length)
        steps = length if num_steps is None else num_steps
        self._steps = validation.positive_int("num_steps", steps)
        if self._steps > self._length:
            raise ValueError(f"num_steps must lie in [1, length={length}], got {steps}")
        block = length if block_length is None else block_length
        self.block_length = validation.positive_int("block_length", block)
        if length % block:
            raise ValueError(f"block_length must divide length={length}, got {block}")
        if self._steps % (length // block):
            raise ValueError(
                f"num_steps={self._steps} must be a multiple of the number of blocks "
                f"length/block_length = {length // block}"
            )
        self._steps_per_block = self._steps // (length // block)
        if self._steps_per_block > block:
            raise ValueError(
                f"each block of {block} positions gets {self._steps_per_block} steps; "
                "lower num_steps or raise block_length"
            )
        mask = mask_id if mask_id is not None else _special_id(tokenizer, config, "mask")
        if mask is None:
            raise ValueError("mask_id: the model/tokenizer defines no mask_token_id; pass mask_id=")
        self._mask = validation.token_id("mask_id", mask, vocab)
        eos = eos_id if eos_id is not None else _special_id(tokenizer, config, "eos")
        if eos is None:
            raise ValueError("eos_id: the model/tokenizer defines no eos_token_id; pass eos_id=")
        self._eos = validation.token_id("eos_id", eos, vocab)
        if self._eos == self._mask:
            raise ValueError("eos_id and mask_id must differ")
        bos = bos_id if bos_id is not None else _special_id(tokenizer, config, "bos")
        self._bos = None if bos is None else validation.token_id("bos_id", bos, vocab)
        self.unmasking = validation.one_of("unmasking", unmasking, UNMASKING_RULES)
        self.temperature = validation.positive_float("temperature", temperature)
        forbidden = {self._mask}
        for i, t in enumerate(forbidden_ids):
            forbidden.add(validation.token_id(f"forbidden_ids[{i}]", t, vocab))
        if self._eos in forbidden:
            raise ValueError("forbidden_ids must not contain eos_id")
        self._forbidden = torch.tensor(sorted(forbidden), dtype=torch.long)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        tokenizer: Any = "auto",
        local_files_only: bool | None = None,
        **kwargs: Any,
    ) -> HFMaskedDiffusionPolicy:
        """Load the mask predictor and tokenizer (as :meth:`HFPolicy.from_pretrained`).

        A ``tiltsample_diffusion.json`` in the folder supplies defaults for ``length``,
        ``num_steps``, ``unmasking`` and ``forbidden_ids``; keyword arguments override them.
        """
        import json

        from transformers import AutoModelForCausalLM

        folder = Path(path)
        offline = _check_model_source(path, local_files_only)
        with _loading_errors(path, offline):
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, local_files_only=offline
            )
        auto = isinstance(tokenizer, str) and tokenizer == "auto"
        tok = load_tokenizer(path, local_files_only=offline) if auto else tokenizer
        meta_file = folder / "tiltsample_diffusion.json"
        options: dict[str, Any] = {}
        if meta_file.is_file():
            options = json.loads(meta_file.read_text())
        options.update(kwargs)
        return cls(model, tok, **options)

    def with_options(self, **changes: Any) -> HFMaskedDiffusionPolicy:
        """The same network with another sampler (``num_steps``, ``unmasking``, ...)."""
        args: dict[str, Any] = {
            "length": self._length,
            "num_steps": self._steps,
            "block_length": self.block_length,
            "mask_id": self._mask,
            "eos_id": self._eos,
            "bos_id": self._bos,
            "unmasking": self.unmasking,
            "temperature": self.temperature,
            "forbidden_ids": [int(t) for t in self._forbidden if int(t) != self._mask],
            "shift": self.shift,
        }
        args.update(changes)
        return HFMaskedDiffusionPolicy(self.model, self.tokenizer, **args)

    # ------------------------------------------------------------------ protocol
    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def mask_id(self) -> int:
        return self._mask

    @property
    def length(self) -> int:
        return self._length

    @property
    def num_steps(self) -> int:
        return self._steps

    def context(self, prompt: Seq) -> Seq:
        """The ids before the response positions (``(bos_id,)`` for an empty prompt)."""
        prompt = tuple(int(t) for t in prompt)
        if prompt:
            return prompt
        if self._bos is None:
            raise ValueError("prompt is empty and the model has no bos_token_id")
        return (self._bos,)

    def initial_states(self, batch: int) -> Tensor:
        """``[batch, L]`` fully masked states."""
        validation.non_negative_int("batch", batch)
        return torch.full((batch, self._length), self._mask, dtype=torch.long)

    def _check_step(self, step: int) -> int:
        return check_step(step, self._steps)

    def quota(self, step: int) -> int:
        """Positions committed at step ``step`` (an even split of its block over the block's
        steps; earlier steps of a block take the remainder)."""
        return block_quota(self._check_step(step), self.block_length, self._steps_per_block)

    def block(self, step: int) -> range:
        """Positions eligible at step ``step`` (the current block)."""
        return block_positions(self._check_step(step), self.block_length, self._steps_per_block)

    def _check_states(self, states: Tensor) -> Tensor:
        from tiltsample.diffusion import check_states

        return check_states(self, states)

    def position_logprobs(self, prompt: Seq, states: Tensor) -> Tensor:
        """``[B, L, V]`` float64 predictive log-probs of every response position."""
        return self._position_logprobs(prompt, self._check_states(states))[0]

    def _position_logprobs(self, prompt: Seq, states: Tensor) -> tuple[Tensor, Cost]:
        ctx = self.context(prompt)
        batch = states.shape[0]
        if batch == 0:
            return torch.zeros((0, self._length, self._vocab), dtype=torch.float64), Cost()
        ids = torch.cat([torch.tensor([ctx], dtype=torch.long).expand(batch, -1), states], dim=1)
        with torch.no_grad():
            lo = len(ctx) - int(self.shift)
            logits = self.model(input_ids=ids, use_cache=False).logits[:, lo : lo + self._length]
        logits = logits.to(torch.float64)
        logits[..., self._forbidden] = -math.inf
        cost = Cost(forward_tokens=int(ids.numel()), model_calls=1)
        return torch.log_softmax(logits, dim=-1), cost

    def denoise_step(
        self, prompt: Seq, states: Tensor, step: int, generator: torch.Generator
    ) -> tuple[Tensor, Cost]:
        """Commit ``quota(step)`` eligible masked positions of every row (class docstring).

        Rows with fewer eligible masked positions than the quota commit all of them; rows without
        a masked position are returned unchanged and are not pushed through the network.
        """
        validation.generator("generator", generator)
        states = self._check_states(states)
        self._check_step(step)
        new = states.clone()
        live = (states == self._mask).any(dim=1).nonzero().flatten()
        if live.numel() == 0:
            return new, Cost()
        rows = states[live]
        log_p, cost = self._position_logprobs(prompt, rows)
        n, length, vocab = log_p.shape
        log_q = tempered_logprobs(log_p, self.temperature)
        drawn = sample_categorical(generator, log_q.reshape(-1, vocab)).view(n, length)
        eligible = torch.zeros(length, dtype=torch.bool)
        blk = self.block(step)
        eligible[blk.start : blk.stop] = True
        masked = (rows == self._mask) & eligible
        if self.unmasking == "fixed":
            score = -torch.arange(length, dtype=torch.float64).expand(n, -1).clone()
        elif self.unmasking == "random":
            score = torch.rand((n, length), generator=generator, dtype=torch.float64)
        elif self.unmasking == "max-confidence":
            score = log_p.max(dim=-1).values
        else:
            score = log_p.gather(-1, drawn[..., None]).squeeze(-1)
        score = score.masked_fill(~masked, -math.inf)
        k = self.quota(step)
        # stable descending sort: ties go to the lowest position
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
        commit = torch.zeros_like(masked).scatter(1, order, True) & masked
        new[live] = torch.where(commit, drawn, rows)
        return new, cost + Cost(generated_tokens=int(commit.sum()))

    def sample(
        self, prompt: Seq, num: int, generator: torch.Generator
    ) -> tuple[list[Seq], Tensor, Cost]:
        """``num`` complete responses of the base sampler (all ``T`` steps, one batch).

        Returns the responses (cut after the first EOS), the raw ``[num, L]`` states and the cost.
        """
        validation.positive_int("num", num)
        states = self.initial_states(num)
        cost = Cost()
        for step in range(self._steps):
            states, c = self.denoise_step(prompt, states, step, generator)
            cost = cost + c
        return self.to_seqs(states), states, cost

    def to_seqs(self, states: Tensor) -> list[Seq]:
        """Complete states as responses cut after their first EOS."""
        from tiltsample.diffusion import states_to_seqs

        return states_to_seqs(states, self._eos, self._mask)

    def __repr__(self) -> str:
        return (
            f"HFMaskedDiffusionPolicy(V={self._vocab}, L={self._length}, T={self._steps}, "
            f"block_length={self.block_length}, unmasking={self.unmasking!r})"
        )
