"""Rewards for toy and real targets.

Every reward follows the :class:`~tiltsample.reward.Reward` protocol:
``reward(prompt, xs) -> Tensor[B]`` (float64), deterministic and stateless. Responses include their
final EOS; the rewards below look only at the *content* (the tokens before EOS) unless stated.
The code-execution reward lives in :mod:`tiltsample.targets.sandbox` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tiltsample.target import LogProbReward
from tiltsample.targets.sandbox import (
    CodeExecutionReward,
    ExecutionResult,
    SandboxUnavailableError,
    sandbox_status,
)
from tiltsample.types import Seq

__all__ = [
    "CodeExecutionReward",
    "ConstraintReward",
    "ContainsTokenReward",
    "CountFractionReward",
    "ExactMatchReward",
    "ExecutionResult",
    "LastTokenReward",
    "LogProbReward",
    "ParityReward",
    "RewardModelReward",
    "SandboxUnavailableError",
    "SelfConsistencyReward",
    "TableReward",
    "content",
    "majority_vote",
    "sandbox_status",
]


def content(x: Seq, eos_id: int) -> Seq:
    """The tokens of ``x`` before its EOS (all of ``x`` when it has none)."""
    return x[:-1] if x and x[-1] == eos_id else x


class TableReward:
    """``r(x) = table[x]`` for an explicit table of complete responses.

    Parameters
    ----------
    table
        ``{response: value}`` (responses as :data:`~tiltsample.types.Seq`, EOS included).
    default
        Value for responses missing from the table; ``None`` makes a missing response an error.
    """

    def __init__(self, table: Mapping[Seq, float], default: float | None = None) -> None:
        self.table = {tuple(k): float(v) for k, v in table.items()}
        self.default = default

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        out = []
        for x in xs:
            key = tuple(x)
            if key in self.table:
                out.append(self.table[key])
            elif self.default is not None:
                out.append(float(self.default))
            else:
                raise KeyError(f"TableReward has no value for {key} and no default")
        return torch.tensor(out, dtype=torch.float64)


class ContainsTokenReward:
    """Binary: ``1`` if ``token`` occurs in the content, else ``0``."""

    def __init__(self, token: int, eos_id: int) -> None:
        self.token, self.eos_id = int(token), int(eos_id)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        return torch.tensor(
            [float(self.token in content(x, self.eos_id)) for x in xs], dtype=torch.float64
        )


class ParityReward:
    """Binary: ``1`` if ``token`` occurs an odd (``odd=True``) or even number of times."""

    def __init__(self, token: int, eos_id: int, odd: bool = True) -> None:
        self.token, self.eos_id, self.odd = int(token), int(eos_id), bool(odd)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        vals = [(content(x, self.eos_id).count(self.token) % 2 == 1) == self.odd for x in xs]
        return torch.tensor([float(v) for v in vals], dtype=torch.float64)


class LastTokenReward:
    """Binary: ``1`` if the last content token is ``token`` (``0`` for an empty response)."""

    def __init__(self, token: int, eos_id: int) -> None:
        self.token, self.eos_id = int(token), int(eos_id)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        vals = []
        for x in xs:
            c = content(x, self.eos_id)
            vals.append(float(bool(c) and c[-1] == self.token))
        return torch.tensor(vals, dtype=torch.float64)


class CountFractionReward:
    """Graded, in ``[0, 1]``: the fraction of content tokens equal to ``token`` (0 if empty)."""

    def __init__(self, token: int, eos_id: int) -> None:
        self.token, self.eos_id = int(token), int(eos_id)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        vals = []
        for x in xs:
            c = content(x, self.eos_id)
            vals.append(c.count(self.token) / len(c) if c else 0.0)
        return torch.tensor(vals, dtype=torch.float64)


class ConstraintReward:
    """A hard constraint: ``0`` where ``predicate(x)`` holds, ``-inf`` elsewhere.

    Tilting by it (any ``lam``) restricts the target to the responses that satisfy the predicate.
    """

    def __init__(self, predicate: Callable[[Seq], bool], name: str = "constraint") -> None:
        self.predicate, self.name = predicate, name

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        return torch.tensor(
            [0.0 if self.predicate(tuple(x)) else -torch.inf for x in xs], dtype=torch.float64
        )


# ============================================================================================
# Verifiable rewards for real models
# ============================================================================================
class ExactMatchReward:
    """Binary verifier: ``1`` if the response's extracted answer equals the prompt's answer.

    Parameters
    ----------
    extract
        ``extract(x) -> str | None``: the final answer of a response (ids, EOS included), or None
        when the response has no well-formed answer (then the reward is ``0``).
    reference
        ``reference(prompt) -> str``: the correct answer of a prompt.
    wrong
        Reward of a wrong or missing answer (default ``0``; ``-inf`` turns the verifier into a
        hard constraint).

    Deterministic and stateless: the reward of a response depends on the prompt and that response
    only.
    """

    def __init__(
        self,
        extract: Callable[[Seq], str | None],
        reference: Callable[[Seq], str],
        *,
        wrong: float = 0.0,
    ) -> None:
        if not callable(extract) or not callable(reference):
            raise TypeError("extract and reference must be callables")
        if wrong != wrong or wrong >= 1.0:  # NaN or not below a correct answer
            raise ValueError(f"wrong must be < 1 (or -inf), got {wrong!r}")
        self.extract, self.reference, self.wrong = extract, reference, float(wrong)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        truth = self.reference(tuple(prompt))
        vals = [1.0 if self.extract(tuple(x)) == truth else self.wrong for x in xs]
        return torch.tensor(vals, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"ExactMatchReward(wrong={self.wrong})"


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the answer that occurred **first**.

    Deterministic (no ``set`` iteration order is involved): two runs with the same answers in the
    same order give the same vote. ``None`` when no answer is valid.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return None
    return min(counts, key=lambda a: (-counts[a], first[a]))


class SelfConsistencyReward:
    r"""Self-consistency pseudo-reward (majority vote), with its answer cache kept explicit.

    ``r(x) = 1`` if ``extract(x)`` equals the pseudo-label, the majority of
    ``cache ∪ {answers of the batch being scored}`` (``include_batch=True``, the ETS paper's rule,
    ``specs/ets.md`` §7) or of ``cache`` alone; ``0`` otherwise (and for a missing answer).

    **This is not a fixed reward.** The pseudo-label depends on the samples drawn, so the "target"
    moves during a run and no convergence statement applies. To keep runs reproducible the object
    is immutable: a sampler keeps the cache in its own state and calls :meth:`with_answers` to get
    the reward of the grown cache; the object never mutates itself.

    Parameters
    ----------
    extract
        ``extract(x) -> str | None`` (the task's answer extractor).
    cache
        Answers collected so far for this prompt (in order; the order matters for tie-breaking).
    include_batch
        Add the answers of the scored batch to the vote.
    require_repeat
        The LLaDA reference code's extra rule (``specs/ets.md`` §11, item 7): if the top answer
        occurs only once, every reward is ``0``. Off by default.
    """

    def __init__(
        self,
        extract: Callable[[Seq], str | None],
        cache: Sequence[str | None] = (),
        *,
        include_batch: bool = True,
        require_repeat: bool = False,
    ) -> None:
        if not callable(extract):
            raise TypeError("extract must be callable as extract(x) -> str | None")
        self.extract = extract
        self.cache: tuple[str | None, ...] = tuple(cache)
        self.include_batch = bool(include_batch)
        self.require_repeat = bool(require_repeat)

    def with_answers(self, answers: Sequence[str | None]) -> SelfConsistencyReward:
        """A new reward whose cache is this cache followed by ``answers``."""
        return SelfConsistencyReward(
            self.extract,
            (*self.cache, *answers),
            include_batch=self.include_batch,
            require_repeat=self.require_repeat,
        )

    def answers(self, xs: Sequence[Seq]) -> list[str | None]:
        """The extracted answers of responses."""
        return [self.extract(tuple(x)) for x in xs]

    def pseudo_label(self, xs: Sequence[Seq] = ()) -> str | None:
        """The majority answer used to score ``xs``."""
        pool = list(self.cache) + (self.answers(xs) if self.include_batch else [])
        label = majority_vote(pool)
        if self.require_repeat and label is not None and pool.count(label) < 2:
            return None
        return label

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        answers = self.answers(xs)
        pool = list(self.cache) + (answers if self.include_batch else [])
        label = majority_vote(pool)
        if self.require_repeat and label is not None and pool.count(label) < 2:
            label = None
        vals = [1.0 if label is not None and a == label else 0.0 for a in answers]
        return torch.tensor(vals, dtype=torch.float64)

    def __repr__(self) -> str:
        return (
            f"SelfConsistencyReward(cache={len(self.cache)} answers, "
            f"include_batch={self.include_batch}, require_repeat={self.require_repeat})"
        )


class RewardModelReward:
    """A sequence-classification model (``AutoModelForSequenceClassification``) as a reward.

    ``r(y, x) = transform(logits[label])`` of the reward model on the text
    ``format(prompt_text, response_text)``.

    Parameters
    ----------
    model, tokenizer
        The reward model and *its* tokenizer (text is re-tokenised: the policy and the reward model
        need not share a vocabulary).
    decode
        ``decode(ids) -> str`` for the policy's ids (e.g. ``HFPolicy.decode``); applied to the
        prompt and to the response content (EOS dropped).
    label
        Which logit to read (default 0; a single-logit model has only 0).
    transform
        ``"logit"`` (raw, default), ``"logsigmoid"`` (``log sigmoid(logit)``: a log-probability
        ``<= 0``), or ``"sigmoid"`` (a probability in ``[0, 1]``).
    template
        ``template.format(prompt=..., response=...)``; default ``"{prompt}{response}"``.
    max_batch
        Texts per forward call.

    Deterministic (eval mode, no sampling); scores do not depend on how responses are batched
    beyond float32 rounding (padding is masked).
    """

    TRANSFORMS = ("logit", "logsigmoid", "sigmoid")

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        decode: Callable[[Seq], str],
        *,
        eos_id: int | None = None,
        label: int = 0,
        transform: str = "logit",
        template: str = "{prompt}{response}",
        max_batch: int = 64,
    ) -> None:
        if not callable(model) or not hasattr(model, "config"):
            raise TypeError("model must be a transformers sequence-classification model")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decode = decode
        self.eos_id = eos_id
        num_labels = int(getattr(model.config, "num_labels", 1))
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"label must be an int in [0, num_labels={num_labels}), got {label!r}")
        self.label = label
        if transform not in self.TRANSFORMS:
            raise ValueError(f"transform must be one of {list(self.TRANSFORMS)}, got {transform!r}")
        self.transform = transform
        if "{prompt}" not in template or "{response}" not in template:
            raise ValueError("template must contain {prompt} and {response}")
        self.template = template
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.max_batch = max_batch

    @classmethod
    def from_pretrained(
        cls, path: str, decode: Callable[[Seq], str], **kwargs: Any
    ) -> RewardModelReward:
        """Load ``AutoModelForSequenceClassification`` and its tokenizer from ``path``."""
        from transformers import AutoModelForSequenceClassification

        from tiltsample.targets.hf import load_tokenizer

        model = AutoModelForSequenceClassification.from_pretrained(path)
        return cls(model, load_tokenizer(path), decode, **kwargs)

    def texts(self, prompt: Seq, xs: Sequence[Seq]) -> list[str]:
        """The texts the reward model scores."""
        p = self.decode(tuple(prompt))
        out = []
        for x in xs:
            x = tuple(x)
            if self.eos_id is not None:
                x = content(x, self.eos_id)
            out.append(self.template.format(prompt=p, response=self.decode(x)))
        return out

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        texts = self.texts(prompt, xs)
        scores = torch.zeros(len(texts), dtype=torch.float64)
        for lo in range(0, len(texts), self.max_batch):
            chunk = texts[lo : lo + self.max_batch]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True)
            with torch.no_grad():
                logits = self.model(
                    input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask")
                ).logits
            scores[lo : lo + len(chunk)] = logits[:, self.label].to(torch.float64)
        if self.transform == "logsigmoid":
            return torch.nn.functional.logsigmoid(scores)
        if self.transform == "sigmoid":
            return torch.sigmoid(scores)
        return scores

    def __repr__(self) -> str:
        return f"RewardModelReward(label={self.label}, transform={self.transform!r})"
