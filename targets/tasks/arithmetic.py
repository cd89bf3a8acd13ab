r"""The synthetic verifiable reasoning task: chained addition/subtraction with a written-out trace.

A problem is a chain of ``k`` operations (``min_ops <= k <= max_ops``) on non-negative integers,
evaluated left to right::

    prompt    "57+8-3+9\n"
    response  "57+8=65\n65-3=62\n62+9=71\n# 71" <eos>

The response writes every intermediate result on its own line (``a op b = c``: the running value,
the next operand copied from the prompt, the new running value), then the final answer after
``"# "``. With the defaults (3–4 operations, a two-digit start, one-digit operands) the response is
23–45 tokens long (mean 33; the trace before the answer line alone 18–40, mean 27). Most tokens
are copies that a model gets right; a few — the digits of each intermediate result — are the
*decision points* where a weak model errs, and an early error propagates. This is what
block-wise guidance, cut positions and prefix potentials act on (a bare 3-token answer
would reduce every sampler to best-of-N).

Determinism and splits: :func:`generate_problems` draws from ``random.Random(seed)`` (never a global
RNG) and keeps only problems of the requested split; the split of a problem is a fixed function of
its prompt (``crc32(prompt) % 5 == 0`` is test), so train and test never share a problem, whatever
the seeds.

Verification: the prompt itself determines the answer (:func:`answer_of_prompt`), so the exact-match
verifier needs no side table: it works on any prompt of the task's grammar.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from tiltsample import validation
from tiltsample.types import Seq

from .tokenizer import BOS_ID, EOS_ID, VOCAB

Split = Literal["train", "test"]
_ID_TO_CHAR: dict[int, str] = {i: c for c, i in VOCAB.items() if len(c) == 1}
_NEWLINE_ID = VOCAB["\n"]
_ANSWER = re.compile(r"# (\d+)")
_EXPR = re.compile(r"\d+(?:[+-]\d+)*")


@dataclass(frozen=True)
class ArithmeticTask:
    """Parameters of the problem distribution.

    Parameters
    ----------
    min_ops, max_ops
        Number of operations ``k`` per problem (uniform in ``[min_ops, max_ops]``).
    start_min, start_max
        Range of the first operand.
    operand_max
        Later operands are uniform in ``[1, operand_max]``.
    subtract_prob
        Probability of ``-`` for an operation (replaced by ``+`` when the running value would go
        negative).
    """

    min_ops: int = 3
    max_ops: int = 4
    start_min: int = 10
    start_max: int = 99
    operand_max: int = 9
    subtract_prob: float = 0.5

    def __post_init__(self) -> None:
        validation.positive_int("min_ops", self.min_ops)
        validation.positive_int("max_ops", self.max_ops)
        if self.max_ops < self.min_ops:
            raise ValueError(f"max_ops must be >= min_ops={self.min_ops}, got {self.max_ops}")
        validation.non_negative_int("start_min", self.start_min)
        validation.non_negative_int("start_max", self.start_max)
        if self.start_max < self.start_min:
            raise ValueError(f"start_max must be >= start_min={self.start_min}")
        validation.positive_int("operand_max", self.operand_max)
        validation.unit_interval("subtract_prob", self.subtract_prob)

    @property
    def max_response_tokens(self) -> int:
        """An upper bound on response length (EOS included) for this distribution."""
        top = self.start_max + self.max_ops * self.operand_max
        digits = len(str(top))
        step = digits + 1 + len(str(self.operand_max)) + 1 + digits + 1  # "a+b=c\n"
        return self.max_ops * step + 2 + digits + 1  # "# c" + EOS

    def as_dict(self) -> dict[str, int | float]:
        return {
            "min_ops": self.min_ops,
            "max_ops": self.max_ops,
            "start_min": self.start_min,
            "start_max": self.start_max,
            "operand_max": self.operand_max,
            "subtract_prob": self.subtract_prob,
        }


@dataclass(frozen=True)
class Problem:
    """One problem: operands, operators, prompt and the reference response."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]
    prompt: str = field(init=False)
    trace: str = field(init=False)
    answer: int = field(init=False)

    def __post_init__(self) -> None:
        if len(self.operands) != len(self.ops) + 1 or not self.ops:
            raise ValueError("a problem needs k >= 1 operators and k + 1 operands")
        if any(op not in "+-" for op in self.ops) or any(v < 0 for v in self.operands):
            raise ValueError("operators must be '+' or '-', operands non-negative")
        expr = str(self.operands[0]) + "".join(
            f"{op}{v}" for op, v in zip(self.ops, self.operands[1:], strict=True)
        )
        lines, acc = [], self.operands[0]
        for op, v in zip(self.ops, self.operands[1:], strict=True):
            new = acc + v if op == "+" else acc - v
            if new < 0:
                raise ValueError("running values must stay non-negative")
            lines.append(f"{acc}{op}{v}={new}")
            acc = new
        object.__setattr__(self, "prompt", expr + "\n")
        object.__setattr__(self, "trace", "\n".join(lines) + f"\n# {acc}")
        object.__setattr__(self, "answer", acc)

    @property
    def split(self) -> Split:
        return split_of(self.prompt)

    def prompt_ids(self) -> Seq:
        """``<bos>`` + prompt characters."""
        return encode(self.prompt)

    def response_ids(self) -> Seq:
        """The reference response's ids, ``<eos>`` included."""
        return (*encode(self.trace, bos=False), EOS_ID)


def split_of(prompt: str) -> Split:
    """``"test"`` for one prompt in five (a fixed hash of the prompt text), else ``"train"``."""
    return "test" if zlib.crc32(prompt.encode()) % 5 == 0 else "train"


def sample_problem(task: ArithmeticTask, rng: random.Random) -> Problem:
    """One problem drawn with ``rng``."""
    k = rng.randint(task.min_ops, task.max_ops)
    acc = rng.randint(task.start_min, task.start_max)
    operands, ops = [acc], []
    for _ in range(k):
        v = rng.randint(1, task.operand_max)
        op = "-" if rng.random() < task.subtract_prob and acc - v >= 0 else "+"
        acc = acc + v if op == "+" else acc - v
        operands.append(v)
        ops.append(op)
    return Problem(tuple(operands), tuple(ops))


def generate_problems(
    task: ArithmeticTask, split: Split, n: int, seed: int = 0, *, unique: bool = True
) -> list[Problem]:
    """``n`` problems of ``split`` drawn deterministically from ``seed``.

    With ``unique=True`` no prompt repeats. Raises ``ValueError`` if the split cannot supply ``n``
    distinct problems within a generous number of draws.
    """
    validation.one_of("split", split, ("train", "test"))
    validation.non_negative_int("n", n)
    rng = random.Random(f"tiltsample-arith-{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} problems from this task")
        p = sample_problem(task, rng)
        if p.split != split or (unique and p.prompt in seen):
            continue
        seen.add(p.prompt)
        out.append(p)
    return out


# ------------------------------------------------------------------------------ ids <-> text
def encode(text: str, *, bos: bool = True) -> Seq:
    """Character ids of ``text`` (``<bos>`` first when ``bos``); same ids as the HF tokenizer."""
    try:
        body = tuple(VOCAB[c] for c in text)
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the task vocabulary") from None
    return ((BOS_ID,) if bos else ()) + body


def decode(ids: Sequence[int]) -> str:
    """Text of ids; special tokens are dropped."""
    return "".join(_ID_TO_CHAR.get(int(i), "") for i in ids)


def extract_answer(text: str) -> int | None:
    """The final answer of a response text: its last line must be ``"# <digits>"``.

    Returns None when the last line has another form (no answer, trailing junk, a malformed
    number).
    """
    last = text.rsplit("\n", 1)[-1]
    m = _ANSWER.fullmatch(last)
    return int(m.group(1)) if m else None


def extract_answer_ids(x: Seq, *, require_eos: bool = True) -> int | None:
    """The answer of a response given as ids; None if it did not end with EOS (when required)."""
    x = tuple(x)
    if x and x[-1] == EOS_ID:
        x = x[:-1]
    elif require_eos:
        return None
    if EOS_ID in x:
        return None
    # the answer is on the last line: decode only what follows the last newline
    if _NEWLINE_ID in x:
        x = x[len(x) - x[::-1].index(_NEWLINE_ID) :]
    return extract_answer(decode(x))


def answer_of_prompt(prompt: str | Seq) -> int:
    """The correct answer of a prompt (text or ids), by evaluating its expression."""
    text = prompt if isinstance(prompt, str) else decode(prompt)
    expr = text.strip()
    if not _EXPR.fullmatch(expr):
        raise ValueError(f"not an arithmetic-task prompt: {text!r}")
    total, sign, num = 0, 1, ""
    for c in expr + "+":
        if c.isdigit():
            num += c
        else:
            total += sign * int(num)
            sign, num = (1 if c == "+" else -1), ""
    return total


def reference_answer_text(prompt: Seq) -> str:
    """The correct answer of a prompt as text (what the exact-match verifier compares with)."""
    return str(answer_of_prompt(prompt))


def answer_text_of_response(x: Seq) -> str | None:
    """The extracted answer as text (None when absent): the extractor of the verifier."""
    a = extract_answer_ids(x)
    return None if a is None else str(a)
