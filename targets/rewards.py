"""Rewards for toy and real targets.

Every reward follows the :class:`~tiltsample.reward.Reward` protocol:
``reward(prompt, xs) -> Tensor[B]`` (float64), deterministic and stateless. Responses include their
final EOS; the rewards below look only at the *content* (the tokens before EOS) unless stated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tiltsample.target import LogProbReward
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
    "SelfConsistencyReward",
    "TableReward",
    "content",
    "majority_vote",
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


# ============================================================================================
# Sandboxed code execution
# ============================================================================================
#: Trusted launcher run as ``python -I -S -c _LAUNCHER <code-file> <limits-json>`` in the child.
#: It tightens the process before it executes the untrusted code: resource limits, a private
#: network namespace (when the kernel allows it), dropping root to ``nobody``, and an audit hook
#: that refuses sockets, process creation, native-code loading and file changes outside the
#: working directory.
_LAUNCHER = r"""
import json, os, resource, sys
code_path, limits = sys.argv[1], json.loads(sys.argv[2])
work = os.path.realpath(os.getcwd())
mem = limits["memory_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
cpu = limits["cpu_seconds"]
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
fsize = limits["file_bytes"]
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
status = {"network_namespace": False, "dropped_root": False}
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    flags = 0x40000000 if os.geteuid() == 0 else (0x40000000 | 0x10000000)
    status["network_namespace"] = libc.unshare(flags) == 0
    del ctypes, libc
    sys.modules.pop("ctypes", None)
except Exception:
    pass
import math, re, collections, itertools, functools, heapq, bisect, string, random, operator
import statistics, fractions, decimal, typing, dataclasses, copy, array, enum, socket
def world_readable(path):
    path = os.path.realpath(path)
    while True:
        if os.stat(path).st_mode & 0o005 != 0o005:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent
if os.geteuid() == 0 and world_readable(os.path.dirname(os.__file__)):
    try:
        os.chown(work, 65534, 65534)
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        status["dropped_root"] = True
    except OSError:
        pass
if limits.get("require_network_namespace") and not status["network_namespace"]:
    sys.stderr.write("sandbox: network namespace unavailable\n")
    os._exit(97)
sys.stderr.write("sandbox-status " + json.dumps(status) + "\n")
sys.stderr.flush()
code = open(code_path).read()
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
BLOCKED = {
    "socket.__new__": "network access", "socket.connect": "network access",
    "socket.bind": "network access", "socket.getaddrinfo": "network access",
    "os.fork": "process creation", "os.forkpty": "process creation",
    "os.system": "process creation", "os.exec": "process creation",
    "os.posix_spawn": "process creation", "os.spawn": "process creation",
    "subprocess.Popen": "process creation", "os.kill": "signals", "os.killpg": "signals",
    "ctypes.dlopen": "native code", "ctypes.dlsym": "native code", "ctypes.cdata": "native code",
    "os.chdir": "changing directory", "os.chroot": "changing root",
    "os.setuid": "privileges", "os.setgid": "privileges",
}
PATH_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link",
               "os.chmod", "os.chown", "os.truncate", "os.utime", "shutil.rmtree"}
NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"}
def inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == work or p.startswith(work + os.sep)
def hook(event, args):
    if event in BLOCKED:
        raise PermissionError(f"sandbox: {BLOCKED[event]} is not allowed ({event})")
    if event == "import" and args and str(args[0]).split(".")[0] in NO_IMPORT:
        what = f"import {args[0]}"
        raise PermissionError(f"sandbox: native code / processes are not allowed ({what})")
    if event == "open":
        path, mode, flags = (list(args) + [None, None, None])[:3]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE)
        if writing and not isinstance(path, int) and not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory ({path!r})")
    elif event in PATH_EVENTS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                what = f"outside the working directory ({event} {a!r})"
                raise PermissionError(f"sandbox: changing files {what}")
sys.addaudithook(hook)
del json, resource
glb = {"__name__": "__main__", "__builtins__": __builtins__}
exec(compile(code, "<generated>", "exec"), glb)
"""


class ExecutionResult(NamedTuple):
    """What one sandboxed run produced."""

    reward: float
    reason: str
    """``"passed"``, ``"failed: ..."``, ``"wall-clock limit ..."``, ``"memory limit"``,
    ``"blocked: ..."``, ``"cpu limit"``, ``"no code"`` ..."""
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: dict[str, bool]
    """Kernel-level layers that were active: ``network_namespace``, ``dropped_root``."""


class CodeExecutionReward:
    r"""Runs generated code with tests in a sandboxed subprocess: ``1`` if it exits cleanly.

    The program is ``extract(x)`` followed by ``tests(prompt)`` (e.g. ``assert`` statements), run by
    ``python -I -S`` in a throw-away working directory. Reward ``1.0`` when it exits with status 0
    within the limits, else ``0.0``; :meth:`evaluate` also returns the reason.

    Containment (layered; the run never touches the parent process):

    * **wall clock**: killed (whole process group) after ``timeout`` seconds;
    * **memory**: ``RLIMIT_AS`` / ``RLIMIT_DATA`` = ``memory_mb`` (a 10 GB allocation raises
      ``MemoryError``); ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, no core dumps;
    * **processes**: ``RLIMIT_NPROC = 0`` and an audit hook refusing ``fork`` / ``exec`` /
      ``subprocess`` / ``posix_spawn`` / ``os.system`` (a fork bomb stops at its first fork);
    * **network**: a private network namespace when the kernel allows it (no interface but a
      down loopback), and the audit hook refuses socket creation in any case;
    * **files**: the working directory is a fresh temporary folder, deleted afterwards; the audit
      hook refuses opening for writing, removing, renaming, ... anything outside it; when started
      as root the child drops to ``nobody`` (uid 65534) after setting up, so file permissions apply
      too. ``ctypes`` and native-library loading are refused (they would bypass the hook).

    Audit hooks are a best-effort layer, not a kernel boundary; the kernel-level layers are the
    resource limits, the network namespace and the privilege drop. For hostile code at scale use a
    container or VM runner with the same interface.

    Parameters
    ----------
    extract
        ``extract(x) -> str | None``: the program text of a response (None: reward 0, "no code").
    tests
        ``tests(prompt) -> str``: code appended after the program (default: nothing).
    timeout
        Wall-clock limit in seconds.
    memory_mb
        Address-space limit.
    max_workers
        Concurrent subprocesses when scoring a batch.
    python
        The interpreter (default: this one).
    """

    def __init__(
        self,
        extract: Callable[[Seq], str | None],
        tests: Callable[[Seq], str] | None = None,
        *,
        timeout: float = 5.0,
        memory_mb: int = 512,
        file_mb: int = 16,
        max_workers: int = 2,
        python: str | None = None,
        require_network_namespace: bool = False,
    ) -> None:
        import math
        import sys

        if not callable(extract):
            raise TypeError("extract must be callable as extract(x) -> str | None")
        if tests is not None and not callable(tests):
            raise TypeError("tests must be callable as tests(prompt) -> str")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
        for name, value, least in (("memory_mb", memory_mb, 16), ("file_mb", file_mb, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self.extract, self.tests = extract, tests
        self.timeout = float(timeout)
        self.memory_mb, self.file_mb = memory_mb, file_mb
        self.max_workers = max_workers
        self.python = python or sys.executable
        self.require_network_namespace = bool(require_network_namespace)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        return torch.tensor([r.reward for r in self.evaluate(prompt, xs)], dtype=torch.float64)

    def evaluate(self, prompt: Seq, xs: Sequence[Seq]) -> list[ExecutionResult]:
        """Run every response; results in input order."""
        from concurrent.futures import ThreadPoolExecutor

        suffix = self.tests(tuple(prompt)) if self.tests is not None else ""
        programs = []
        for x in xs:
            code = self.extract(tuple(x))
            programs.append(None if code is None else code + "\n" + suffix)
        if self.max_workers == 1 or len(programs) <= 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: str | None) -> ExecutionResult:
        """Run one program in the sandbox."""
        import contextlib
        import json
        import os
        import shutil
        import signal
        import subprocess
        import tempfile
        import time

        if program is None:
            return ExecutionResult(0.0, "no code", None, "", "", 0.0, {})
        work = tempfile.mkdtemp(prefix="tiltsample-sandbox-")
        limits = {
            "memory_bytes": self.memory_mb * 2**20,
            "cpu_seconds": max(1, int(self.timeout) + 1),
            "file_bytes": self.file_mb * 2**20,
            "require_network_namespace": self.require_network_namespace,
        }
        code_path = os.path.join(work, "program.py")
        with open(code_path, "w") as f:
            f.write(program)
        os.chmod(work, 0o777)
        os.chmod(code_path, 0o644)
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(
            [self.python, "-I", "-S", "-c", _LAUNCHER, code_path, json.dumps(limits)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        timed_out = False
        try:
            out, err = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        seconds = time.perf_counter() - start
        code = proc.returncode
        isolation: dict[str, bool] = {}
        if err.startswith("sandbox-status "):
            first, _, err = err.partition("\n")
            isolation = json.loads(first.split(" ", 1)[1])
        out, err = out[-4000:], err[-4000:]
        if timed_out:
            reason = f"wall-clock limit ({self.timeout:g} s) exceeded"
        elif code == 0:
            return ExecutionResult(1.0, "passed", code, out, err, seconds, isolation)
        elif "sandbox:" in err:
            line = next(ln for ln in err.splitlines()[::-1] if "sandbox:" in ln)
            reason = "blocked: " + line.split("sandbox:", 1)[1].strip()
        elif "MemoryError" in err:
            reason = f"memory limit ({self.memory_mb} MB)"
        elif code is not None and code < 0:
            sig = -code
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
            reason = "cpu limit" if sig == signal.SIGXCPU else f"killed by signal {name}"
        else:
            tail = err.strip().splitlines()[-1] if err.strip() else f"exit status {code}"
            reason = f"failed: {tail}"
        return ExecutionResult(0.0, reason, code, out, err, seconds, isolation)

    def __repr__(self) -> str:
        return f"CodeExecutionReward(timeout={self.timeout:g}s, memory={self.memory_mb}MB)"
