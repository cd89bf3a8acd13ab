r"""The vLLM engine as the backend sees it: what it can return, and the three calls it makes.

:class:`Engine` wraps a ``vllm.LLM`` and reads, once, what the rest of the backend needs to
know about it: the vocabulary size ``V``, ``max_logprobs`` (how many log-probs one position may
return; *full-vocabulary laws* need ``max_logprobs >= V`` or ``-1``), ``logprobs_mode`` (the
log-probs of sampled tokens are those of the law actually sampled, ``log q``, only in
``"processed_logprobs"`` mode; prompt log-probs are always the raw, temperature-1 ``log p``) and
``max_model_len``. Every engine call goes through :meth:`Engine.generate`, which checks prompt
lengths against ``max_model_len`` first (a clear ``ValueError`` instead of vLLM's), and returns
the ``RequestOutput`` list in request order.

Scores: :meth:`Engine.prompt_scores` reads ``log p(prompt[i] | prompt[:i])`` for the positions
``i >= start`` of every prompt from one call with ``prompt_logprobs=0`` (the log-prob of the
prompt token itself is always returned); :meth:`Engine.prompt_laws` reads the full ``[n, V]``
laws there (``prompt_logprobs=V``); :meth:`Engine.next_laws` the law after the last token of
every prompt (one generated token with ``logprobs=V``, temperature 1). Laws are float64,
renormalised in float64 (vLLM computes them in float32).

``vllm`` is imported lazily (inside :func:`sampling_params`), so importing this module is free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample import validation
from tiltsample.capabilities import TokenLevelAccessError
from tiltsample.types import Seq

__all__ = ["Engine", "sampling_params", "token_level_error"]


def sampling_params(**kwargs: Any) -> Any:
    """A ``vllm.SamplingParams`` with ``detokenize=False`` (the backend works on token ids)."""
    from vllm import SamplingParams

    kwargs.setdefault("detokenize", False)
    return SamplingParams(**kwargs)


def token_level_error(what: str, engine: Engine) -> TokenLevelAccessError:
    """The error of a request that needs full next-token laws from an engine that cannot return
    them: it names ``what`` needed them, the engine's limit and the ways out."""
    return TokenLevelAccessError(
        f"{what} needs token-level access (full next-token laws over all {engine.vocab_size} "
        f"tokens), but this vLLM engine returns at most max_logprobs={engine.max_logprobs} "
        "log-probs per position. Use a sampler that needs only rollouts and scores (ancestral, "
        "best-of-n, imh, mh / power / qalign with batching='ragged', ets with "
        "batching='lockstep', smc / power-smc without resample-move or the optimal "
        "proposal), start the engine with max_logprobs >= vocab_size (or -1; only "
        "sensible for small vocabularies), or use the transformers backend "
        "(tiltsample.targets.hf.HFPolicy)"
    )


class Engine:
    """A ``vllm.LLM`` and what it can return (see the module docstring).

    Parameters
    ----------
    llm
        A started ``vllm.LLM`` (text generation).
    max_logprobs
        Ask for at most this many log-probs per position (default: the engine's
        ``max_logprobs``; a larger value is capped by it). Below ``V`` the backend works at the
        rollout level only, whatever the engine allows.
    """

    def __init__(self, llm: Any, max_logprobs: int | None = None) -> None:
        config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
        if config is None or not callable(getattr(llm, "generate", None)):
            raise TypeError(f"llm must be a vllm.LLM, got {type(llm).__name__}")
        self.llm = llm
        self.vocab_size = int(config.get_vocab_size())
        limit = int(config.max_logprobs)
        if max_logprobs is not None:
            wanted = validation.non_negative_int("max_logprobs", max_logprobs)
            limit = wanted if limit == -1 else min(limit, wanted)
        self.max_logprobs = limit
        self.logprobs_mode = str(config.logprobs_mode)
        self.max_model_len = int(config.max_model_len)
        self.hf_config = config.hf_config

    @property
    def full_vocabulary(self) -> bool:
        """Whether one position may return all ``V`` log-probs (``max_logprobs >= V`` or -1)."""
        return self.max_logprobs == -1 or self.max_logprobs >= self.vocab_size

    @property
    def processed(self) -> bool:
        """Whether sampled tokens' log-probs are those of the law sampled (``log q``)."""
        return self.logprobs_mode == "processed_logprobs"

    def generate(self, prompts: Sequence[Seq], params: Sequence[Any], new: Sequence[int]) -> Any:
        """One engine call: ``prompts[i]`` with ``params[i]``, which generates at most
        ``new[i]`` tokens; the outputs in request order. ``ValueError`` naming
        ``max_model_len`` when a prompt plus its new tokens would not fit."""
        for p, k in zip(prompts, new, strict=True):
            if len(p) + k > self.max_model_len:
                raise ValueError(
                    f"a request needs {len(p)} prompt + {k} new tokens, more than the engine's "
                    f"max_model_len={self.max_model_len}: start the engine with a larger "
                    "max_model_len or lower the target's max_new_tokens"
                )
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        return self.llm.generate(requests, list(params), use_tqdm=False)

    def prompt_scores(self, prompts: Sequence[Seq], starts: Sequence[int]) -> list[list[float]]:
        """``log p(prompt[i] | prompt[:i])`` for ``starts[r] <= i < len(prompt)``, per prompt
        (``starts[r] >= 1``), from one call."""
        params = sampling_params(max_tokens=1, prompt_logprobs=0)
        outs = self.generate(prompts, [params] * len(prompts), [1] * len(prompts))
        scores = []
        for p, s, out in zip(prompts, starts, outs, strict=True):
            table = out.prompt_logprobs
            scores.append([float(table[i][p[i]].logprob) for i in range(s, len(p))])
        return scores

    def prompt_laws(self, prompts: Sequence[Seq], starts: Sequence[int]) -> list[Tensor]:
        """``[len(prompt) - start, V]`` float64: the full law of ``prompt[i]`` given
        ``prompt[:i]`` for ``start <= i``, per prompt, from one call (full vocabulary only)."""
        params = sampling_params(max_tokens=1, prompt_logprobs=self.vocab_size)
        outs = self.generate(prompts, [params] * len(prompts), [1] * len(prompts))
        return [
            self._laws([out.prompt_logprobs[i] for i in range(s, len(p))])
            for p, s, out in zip(prompts, starts, outs, strict=True)
        ]

    def next_laws(self, prompts: Sequence[Seq]) -> Tensor:
        """``[n, V]`` float64: the temperature-1 law of the token after every prompt, from one
        call (full vocabulary only)."""
        params = sampling_params(max_tokens=1, temperature=1.0, logprobs=self.vocab_size, seed=0)
        outs = self.generate(prompts, [params] * len(prompts), [1] * len(prompts))
        return self._laws([out.outputs[0].logprobs[0] for out in outs])

    def _laws(self, tables: Sequence[Any]) -> Tensor:
        """``[n, V]`` float64 log-probs from vLLM's ``{token: Logprob}`` tables, renormalised in
        float64; ``-inf`` where a table has no entry."""
        out = torch.full((len(tables), self.vocab_size), -math.inf, dtype=torch.float64)
        for r, table in enumerate(tables):
            ids = torch.tensor(list(table.keys()), dtype=torch.long)
            out[r, ids] = torch.tensor([v.logprob for v in table.values()], dtype=torch.float64)
        if not len(tables):
            return out
        return out - torch.logsumexp(out, dim=1, keepdim=True)
