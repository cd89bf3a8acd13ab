r"""The synthetic verifiable reasoning task and the tiny trained models (the embedded default).

Task (:mod:`.arithmetic`)
    Chained addition/subtraction with every intermediate result written out (23–45 response
    tokens), a deterministic generator with train/test splits, an answer extractor and the
    exact-match verifier (:func:`verifier`).
Models (``models/<name>/``, shipped with the package, loaded offline with ``from_pretrained``)
    ``arith-ar``: a ~0.85M-parameter Qwen2 causal LM (:func:`load_policy`);
    ``arith-dlm``: the same backbone with bidirectional attention as a masked-diffusion LM,
    adapted from ``arith-ar`` (:func:`load_diffusion_policy`; drawn-confidence sampler, blocks of
    8, 48 steps). Both were trained by :mod:`.train` (``tiltsample train-tiny``)
    and stopped early on purpose: mediocre at temperature 1, much better at pass@8.
Targets
    :func:`problem_target` — ``pi(x | y) ∝ p_ref(x | y) exp(r(y, x)/lam)`` for one problem with the
    verifier as ``r``.

Example
-------
>>> from tiltsample.targets import tasks
>>> policy = tasks.load_policy()                                     # doctest: +SKIP
>>> problem = tasks.held_out_problems(1)[0]                              # doctest: +SKIP
>>> target = tasks.problem_target(problem, policy, lam=0.1)          # doctest: +SKIP
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tiltsample import validation
from tiltsample.target import TiltedTarget, Truncation
from tiltsample.types import Seq

from .arithmetic import (
    ArithmeticTask,
    Problem,
    answer_of_prompt,
    answer_text_of_response,
    decode,
    encode,
    extract_answer,
    extract_answer_ids,
    generate_problems,
    reference_answer_text,
    split_of,
)
from .tokenizer import BOS_ID, CHARS, EOS_ID, MASK_ID, PAD_ID, SPECIALS, VOCAB, build_tokenizer

__all__ = [
    "BOS_ID",
    "CHARS",
    "DEFAULT_AR",
    "DEFAULT_DLM",
    "DEFAULT_TASK",
    "EOS_ID",
    "MASK_ID",
    "MODEL_DIR",
    "PAD_ID",
    "SPECIALS",
    "VOCAB",
    "ArithmeticTask",
    "Problem",
    "answer_of_prompt",
    "answer_text_of_response",
    "build_tokenizer",
    "check_placement",
    "decode",
    "encode",
    "extract_answer",
    "extract_answer_ids",
    "generate_problems",
    "held_out_problems",
    "load_diffusion_policy",
    "load_policy",
    "load_policy_from",
    "model_path",
    "problem_target",
    "reference_answer_text",
    "self_consistency",
    "split_of",
    "verifier",
]

MODEL_DIR = Path(__file__).resolve().parent / "models"
"""Folder of the shipped checkpoints (package data)."""
DEFAULT_AR = "arith-ar"
DEFAULT_DLM = "arith-dlm"
DEFAULT_TASK = ArithmeticTask()
MAX_NEW_TOKENS = 48
"""Default response cap of task targets (the longest default response has 45 tokens; the bound
``ArithmeticTask.max_response_tokens`` is 46)."""


def model_path(name: str) -> Path:
    """The folder of a shipped model (``ValueError`` naming the available ones otherwise)."""
    available = (
        sorted(p.name for p in MODEL_DIR.iterdir() if p.is_dir()) if MODEL_DIR.is_dir() else []
    )
    validation.one_of("name", name, available)
    return MODEL_DIR / name


def check_placement(device: Any = None, dtype: Any = None) -> tuple[str, str]:
    """Checked ``(device, dtype)`` as canonical strings (``("cpu", "float32")`` for None, None;
    ``("cuda:0", "bfloat16")``): ``ValueError`` naming ``device`` / ``dtype`` (malformed, CUDA
    not available) before anything is loaded."""
    import torch

    from tiltsample.targets.hf import resolve_device, resolve_dtype

    where = None if device is None else resolve_device(device)
    dev = "cpu" if where is None or where.type == "cpu" else str(where)
    kind = resolve_dtype(torch.float32 if dtype is None else dtype)
    return dev, str(kind).removeprefix("torch.")


@functools.lru_cache(maxsize=4)
def _load_ar(path: str, device: str = "cpu", dtype: str = "float32") -> Any:
    from tiltsample.targets.hf import HFPolicy

    return HFPolicy.from_pretrained(path, device=device, dtype=dtype)


def load_policy(name: str = DEFAULT_AR, *, device: Any = None, dtype: Any = None) -> Any:
    """The shipped causal LM ``name`` as an :class:`~tiltsample.targets.hf.HFPolicy` (offline).

    ``device`` (default: the CPU; ``"cuda"``, ``"cuda:1"``, ...) and ``dtype`` (default float32;
    ``"bf16"``, ``torch.float16``, ...) are checked first (``ValueError`` naming them), see
    :class:`~tiltsample.targets.hf.HFPolicy`. Cached per process and placement: policies are
    read-only, so sharing one is safe.
    """
    return load_policy_from(model_path(name), device=device, dtype=dtype)


def load_policy_from(path: str | Path, *, device: Any = None, dtype: Any = None) -> Any:
    """A causal LM folder as an :class:`~tiltsample.targets.hf.HFPolicy`, cached per process,
    folder and placement like :func:`load_policy` (whose shipped models it loads by name)."""
    return _load_ar(str(path), *check_placement(device, dtype))


def load_diffusion_policy(
    name: str = DEFAULT_DLM, *, device: Any = None, dtype: Any = None, **options: Any
) -> Any:
    """The shipped masked-diffusion LM as a :class:`~tiltsample.targets.hf.HFMaskedDiffusionPolicy`.

    ``device`` and ``dtype`` as in :func:`load_policy`; ``options`` override the saved sampler
    defaults (``length``, ``num_steps``, ``unmasking``, ``temperature``).
    """
    from tiltsample.targets.hf import HFMaskedDiffusionPolicy

    dev, kind = check_placement(device, dtype)
    path = model_path(name)
    return HFMaskedDiffusionPolicy.from_pretrained(path, device=dev, dtype=kind, **options)


def held_out_problems(n: int, seed: int = 0, task: ArithmeticTask = DEFAULT_TASK) -> list[Problem]:
    """The first ``n`` test problems of ``task`` for ``seed`` (a fixed, reproducible list)."""
    return generate_problems(task, "test", n, seed=seed)


def verifier(*, wrong: float = 0.0) -> Any:
    """The exact-match verifier reward: ``1`` iff the final answer (``"# <n>"`` followed by EOS)
    equals the value of the prompt's expression."""
    from tiltsample.targets.rewards import ExactMatchReward

    return ExactMatchReward(answer_text_of_response, reference_answer_text, wrong=wrong)


def self_consistency(cache: tuple[str | None, ...] = (), **options: Any) -> Any:
    """The self-consistency (majority-vote) pseudo-reward with this task's answer extractor."""
    from tiltsample.targets.rewards import SelfConsistencyReward

    return SelfConsistencyReward(answer_text_of_response, cache, **options)


def problem_target(
    problem: Problem | str | Seq,
    policy: Any = None,
    *,
    lam: float = 0.1,
    reward: Any = "verifier",
    max_new_tokens: int | None = None,
    truncation: Truncation = "stop",
) -> TiltedTarget:
    """The tilted target of one problem: ``p_ref(x | prompt) · exp(r(prompt, x)/lam)``.

    Parameters
    ----------
    problem
        A :class:`Problem`, a prompt text (``"57+8-3+9\\n"``) or prompt ids.
    policy
        The reference policy (default: the shipped ``arith-ar`` model). A masked-diffusion policy
        forces ``max_new_tokens`` to its ``length``.
    lam
        KL coefficient of the reward.
    reward
        ``"verifier"`` (default), ``None`` (the untilted reference target) or any Reward.
    max_new_tokens
        Response cap (default 48, or the diffusion policy's length).
    """
    if policy is None:
        policy = load_policy()
    if isinstance(problem, Problem):
        prompt = problem.prompt_ids()
        meta: dict[str, Any] = {"prompt_text": problem.prompt, "answer": problem.answer}
    elif isinstance(problem, str):
        prompt = encode(problem)
        meta = {"prompt_text": problem, "answer": answer_of_prompt(problem)}
    else:
        prompt = tuple(int(t) for t in problem)
        meta = {"prompt_text": decode(prompt), "answer": answer_of_prompt(prompt)}
    if reward == "verifier":
        reward = verifier()
    if max_new_tokens is None:
        max_new_tokens = int(getattr(policy, "length", MAX_NEW_TOKENS))
    meta["task"] = "arithmetic"
    return TiltedTarget(policy, reward, lam, prompt, max_new_tokens, truncation, meta=meta)
