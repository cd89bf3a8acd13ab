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

Devices and dtypes (:mod:`.devices`): the policy owns its device and dtype (``device=`` /
``dtype=`` of the constructors and ``from_pretrained``; ``policy.device``, ``policy.dtype``). The
model, its KV cache and every tensor handed to it live on ``policy.device``; the laws and scores
handed to samplers are float64 on the CPU (normalised on the device, then copied), where the
samplers' arithmetic and the caller's CPU ``torch.Generator`` live. So every sampler runs
unchanged on a GPU, and a CPU run is bit-identical to one without device handling.

``transformers`` is imported lazily (inside functions), so importing this package is cheap.

Modules: :mod:`.loading` (tokenizer and model loading, source checks), :mod:`.devices` (device
and dtype checks, the host copy of laws), :mod:`.laws`
(:func:`filtered_logprobs`), :mod:`.policy` (:class:`HFPolicy`), :mod:`.session`
(:class:`HFSession`) and :mod:`.cache` (its KV-cache operations), :mod:`.diffusion`
(:class:`HFMaskedDiffusionPolicy`), and :mod:`.compat`, the one place that knows how the
``transformers`` API moved between releases.
"""

from __future__ import annotations

from tiltsample.targets.hf.devices import resolve_device, resolve_dtype
from tiltsample.targets.hf.diffusion import UNMASKING_RULES, HFMaskedDiffusionPolicy
from tiltsample.targets.hf.laws import filtered_logprobs
from tiltsample.targets.hf.loading import load_tokenizer
from tiltsample.targets.hf.policy import Generated, HFPolicy
from tiltsample.targets.hf.session import HFSession

__all__ = [
    "UNMASKING_RULES",
    "Generated",
    "HFMaskedDiffusionPolicy",
    "HFPolicy",
    "HFSession",
    "filtered_logprobs",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
]
