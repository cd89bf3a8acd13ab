r"""A vLLM engine as a reference policy, at the *rollout level* of the decode engine.

:class:`VLLMPolicy`
    A ``vllm.LLM`` (started by :meth:`VLLMPolicy.from_pretrained`, or given) as a
    :class:`~tiltsample.policy.ReferencePolicy`: ``vocab_size``, ``eos_id``,
    ``sequence_logprob`` (one call with ``prompt_logprobs``), ``session`` / ``session_multi``
    and, only when the engine returns all ``V`` log-probs per position (``max_logprobs >= V``),
    ``next_logprobs``.
:class:`VLLMSession`
    Rows as token lists (context + response prefix); no KV state on our side: vLLM's automatic
    prefix caching makes shared prefixes free. It is a
    :class:`~tiltsample.policy.RaggedDecodeSession` and a
    :class:`~tiltsample.policy.RolloutSession`: :func:`tiltsample.decode_engine.decode` and
    :func:`~tiltsample.decode_engine.score_continuations` hand their requests to its
    ``decode_rollouts`` / ``score_continuations`` (:mod:`.rollouts`: one ``generate`` call for
    all rows, per-request seeds drawn from the caller's generator, at most one scoring call).

Which samplers run on it: those written against the rollout level — ``ancestral``,
``best-of-n``, ``imh``, the MH family (``mh``, ``power``, ``qalign``; ``entropy-cut`` needs
per-token entropies, i.e. full-vocabulary laws) with ``batching="ragged"`` (the default
``"auto"`` picks it) or ``"aligned"``, and ``ets`` with rollout energies
(``batching="lockstep"``), and block SMC / ``power-smc`` (one ``decode`` call per block;
without resample-move or the optimal proposal). Samplers that read next-token laws (``beam``,
``exact``, ``entropy-cut``, conditional SMC / particle Gibbs, SMC with resample-move or the
optimal proposal, ``ets`` / ``mh`` with ``batching="continuous"``) raise
:class:`~tiltsample.policy.TokenLevelAccessError` at their first ``logprobs()`` call, naming
what they need, unless the engine returns full-vocabulary laws.

Laws: a plain tempered law (:class:`~tiltsample.token_laws.TemperedLaw` without a custom
``proposal``) is sampled natively; any other law (top-k / top-p filters, the MH family's
``support="top_k"``) is refused with a ``ValueError``.

``vllm`` is imported lazily (in :meth:`VLLMPolicy.from_pretrained` and at the first engine
call), so importing this package is cheap and works where vLLM is not installed.

:func:`load_vllm_policy` starts an engine once per process (cached per model, dtype and options;
:func:`close_engines` stops them), with defaults chosen from the model and the machine
(:func:`engine_options`): full-vocabulary laws for vocabularies up to ``FULL_VOCAB_LIMIT``,
eager mode and a 1 GiB KV cache on a machine without CUDA.

Modules: :mod:`.engine` (the engine's capabilities and calls), :mod:`.session`
(:class:`VLLMSession`), :mod:`.rollouts` (the native rollout level), :mod:`.policy`
(:class:`VLLMPolicy`), :mod:`.loader` (the per-process engine cache).
"""

from __future__ import annotations

from tiltsample.targets.vllm.engine import Engine
from tiltsample.targets.vllm.loader import close_engines, engine_options, load_vllm_policy
from tiltsample.targets.vllm.policy import ENGINE_DEFAULTS, VLLMPolicy
from tiltsample.targets.vllm.rollouts import decode_rollouts
from tiltsample.targets.vllm.session import VLLMSession

__all__ = [
    "ENGINE_DEFAULTS",
    "Engine",
    "VLLMPolicy",
    "VLLMSession",
    "close_engines",
    "decode_rollouts",
    "engine_options",
    "load_vllm_policy",
]
