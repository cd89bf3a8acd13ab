"""Sandboxed code execution: the operating-system boundary, the harness and its verdict channel.

:class:`CodeExecutionReward` scores a generated program by running it, then its tests, in a
throw-away sandbox. The reward is ``1`` only when **the trusted harness reports, through a channel
the program cannot forge, that the tests ran to completion without an exception**; an exit status
of 0 alone is worth nothing. The threat model and its limits are in ``docs/sandbox.md``.

Three processes take part::

    parent (this module, the caller's process)
      └─ launcher  (``python -I -S sandbox_launcher.py launch``, the caller's credentials)
           └─ init  (pid 1 of new mount/pid/net/ipc/uts [+ user] namespaces, private root)
                └─ harness (uid 65534, no capabilities, seccomp, rlimits) runs program + tests
                   (``python -c`` with the source of ``sandbox_harness.py``)

* The **boundary is the kernel**: namespaces, a private read-only view of the filesystem (only the
  system directories, the interpreter's prefix and a size-limited writable ``/tmp`` that vanishes
  with the namespace), no network, an unprivileged uid without capabilities, ``no_new_privs``, a
  seccomp filter (no process creation, no signals, no ``ptrace``, no mounts or namespaces) and
  resource limits that bind (``RLIMIT_NPROC = 0`` for a non-root uid).
* The **verdict channel**: the parent opens a pipe whose write end only the harness holds and a
  second pipe that carries the program, the tests and a random nonce. The harness reads and closes
  the second pipe before any untrusted code runs and keeps the nonce only in the closure of an
  audit hook that untrusted code cannot reach (``gc`` introspection, tracing and profiling are
  refused, signals and native code are unavailable). The hook writes ``VERDICT <nonce> pass`` only
  when called from the harness's single report site, after the tests returned. Anything else --
  an early ``sys.exit``/``os._exit``/``SystemExit``/``atexit`` exit, junk on the channel, a
  forged report, a timeout -- scores ``0`` with its reason.

This module is the parent side (the public API, the nonce, the pipes, the deadline, reading the
verdict) and :func:`sandbox_status`. The launcher (:mod:`~tiltsample.targets.sandbox_launcher`:
namespaces, mounts, ``pivot_root``, dropping root, rlimits, seccomp) and the harness
(:mod:`~tiltsample.targets.sandbox_harness`: audit hooks, program and tests, the verdict) run as
standalone scripts where ``tiltsample`` cannot be imported, so none of the three imports another:
they exchange only data (command lines, pipes, the fixed environment). This module too imports
only the standard library at run time, so it works when loaded from its file alone.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from torch import Tensor

    from tiltsample.types import Seq

__all__ = [
    "CodeExecutionReward",
    "ExecutionResult",
    "SandboxStatus",
    "SandboxUnavailableError",
    "sandbox_status",
]

#: Bytes kept from each of stdout / stderr (the tail) and from the verdict channel (the head).
_KEEP_OUTPUT = 1 << 20
_KEEP_VERDICT = 1 << 16
#: Fixed environment of the launcher and the program (the launcher gets it in ``limits["env"]``).
_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUTF8": "1",
}


class SandboxUnavailableError(RuntimeError):
    """The operating-system boundary could not be built; no untrusted code was run."""


class ExecutionResult(NamedTuple):
    """What one sandboxed run produced."""

    reward: float
    reason: str
    """``"passed"``, ``"failed: ..."``, ``"early exit: ..."``, ``"no verdict: ..."``,
    ``"wall-clock limit ..."``, ``"memory limit ..."``, ``"blocked: ..."``, ``"no code"`` ..."""
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: dict[str, bool]
    """The layers that were active, e.g. ``mount_namespace``, ``network_namespace``,
    ``dropped_root``, ``seccomp`` (empty when nothing ran)."""


class SandboxStatus(NamedTuple):
    """Whether the sandbox works on this machine (see :func:`sandbox_status`)."""

    available: bool
    reason: str
    isolation: dict[str, bool]


def _base_interpreter(python: str | None) -> str:
    """The real interpreter behind ``python`` (a virtual environment's base interpreter)."""
    if python is None:
        return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return os.path.realpath(python)


def _launcher_script() -> str:
    """The launcher script, ``sandbox_launcher.py`` next to this file."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")


_STATUS_CACHE: dict[str, SandboxStatus] = {}


def sandbox_status(python: str | None = None) -> SandboxStatus:
    """Probe (once per interpreter and process) whether the sandbox can be built here.

    Runs a trivial program through the full boundary. Use it to skip tests or to fail early;
    :class:`CodeExecutionReward` itself raises :class:`SandboxUnavailableError` instead of running
    anything when the boundary cannot be built.

    Parameters
    ----------
    python
        The interpreter (default: the base interpreter of this one).

    Returns
    -------
    SandboxStatus
        ``available`` (bool), ``reason`` (why not, e.g. ``unshare(...) failed: Operation not
        permitted`` in an unprivileged container without user namespaces; ``"passed"`` when
        available) and the ``isolation`` layers that were active.
    """
    interpreter = _base_interpreter(python)
    if interpreter not in _STATUS_CACHE:
        reward = CodeExecutionReward(lambda x: None, timeout=30.0, python=interpreter)
        try:
            res = reward.run("pass")
        except SandboxUnavailableError as exc:
            _STATUS_CACHE[interpreter] = SandboxStatus(False, str(exc), {})
        else:
            ok = res.reward == 1.0
            _STATUS_CACHE[interpreter] = SandboxStatus(ok, res.reason, res.isolation)
    return _STATUS_CACHE[interpreter]


SETUP_GRACE_S = 30.0
"""Wall-clock allowance of the sandbox's own set-up (the launcher's interpreter, namespaces,
limits, seccomp) before the program starts; the program's ``timeout`` runs from the launcher's
``STATUS`` line, written just before the harness is executed. A loaded machine therefore does not
charge the set-up to the program (measured: the launcher missed a 3 s limit with both cores
busy)."""


def _pump(
    proc: Any, config: bytes, config_fd: int, verdict_fd: int, timeout: float
) -> tuple[bytes, bytes, bytes, bool, float]:
    """Feed the config pipe and drain stdout, stderr and the verdict pipe, with caps.

    Returns ``(stdout, stderr, verdict, timed_out, deadline)``; kills the process group at the
    deadline: :data:`SETUP_GRACE_S` plus ``timeout`` after the start until the status line has
    arrived, then ``timeout`` after its arrival (``deadline`` is that final ``time.monotonic``
    time).
    """
    import contextlib
    import selectors
    import signal
    import time

    deadline = time.monotonic() + SETUP_GRACE_S + timeout
    started = False
    sel = selectors.DefaultSelector()
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    buffers[verdict_fd] = bytearray()
    for fd in buffers:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    os.set_blocking(config_fd, False)
    sel.register(config_fd, selectors.EVENT_WRITE)
    pending = memoryview(config)
    writing, timed_out = True, False
    open_reads = len(buffers)
    try:
        while open_reads:
            left = deadline - time.monotonic()
            if timed_out and left < -5.0:
                break  # killed 5 s ago and still not closed: give up on the rest
            if left <= 0 and not timed_out:
                timed_out = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            for key, _ in sel.select(timeout=max(left, 0.05) if not timed_out else 1.0):
                fd = int(key.fd)
                if fd == config_fd:
                    try:
                        pending = pending[os.write(fd, pending) :]
                    except (BrokenPipeError, BlockingIOError):
                        pending = pending[:0]
                    if not pending and writing:
                        sel.unregister(fd)
                        os.close(fd)
                        writing = False
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(fd)
                    open_reads -= 1
                    continue
                buf = buffers[fd]
                if fd == verdict_fd:
                    buf += chunk[: max(0, _KEEP_VERDICT - len(buf))]
                    if not started and b"\n" in buf:  # the status line: the program starts
                        started = True
                        deadline = time.monotonic() + timeout
                else:
                    buf += chunk
                    if len(buf) > 2 * _KEEP_OUTPUT:
                        del buf[: len(buf) - _KEEP_OUTPUT]
    finally:
        if writing:
            os.close(config_fd)
        sel.close()
    return (
        bytes(buffers[proc.stdout.fileno()][-_KEEP_OUTPUT:]),
        bytes(buffers[proc.stderr.fileno()][-_KEEP_OUTPUT:]),
        bytes(buffers[verdict_fd]),
        timed_out,
        deadline,
    )


def _classify(reason: str, memory_mb: int) -> str:
    """Turn the harness's description of the exception that ended the run into a reason."""
    if reason.startswith(("PermissionError: sandbox:", "ValueError: sandbox:")):
        return "blocked: " + reason.split("sandbox:", 1)[1].strip()
    if reason.startswith("MemoryError"):
        return f"memory limit ({memory_mb} MB)"
    if reason.startswith(("SystemExit", "KeyboardInterrupt", "GeneratorExit")):
        return f"early exit ({reason}) before the tests completed"
    if reason.startswith("forged:"):
        return "blocked: " + reason
    return "failed: " + reason


class CodeExecutionReward:
    r"""Runs a generated program and its tests in a sandbox: ``1`` iff the harness saw them pass.

    The program is ``extract(x)``; the tests are ``tests(prompt)`` (e.g. ``assert`` statements),
    compiled separately and run after the program in its namespace. Reward ``1.0`` exactly when the
    trusted harness reports -- through a pipe and a per-run nonce the program cannot reach -- that
    both ran to completion without an exception, within the limits. Everything else scores
    ``0.0``: a failing test, an early exit (``sys.exit``, ``SystemExit``, ``os._exit``, an
    ``atexit`` handler), a forged or tampered report, a crash, a timeout. :meth:`evaluate` also
    returns the reason.

    The boundary is the operating system (details and limits in ``docs/sandbox.md``):

    * **namespaces**: mount, pid, network (no interface but a down loopback), IPC, UTS, and a user
      namespace when not started as root;
    * **filesystem**: a private root with the system directories and the interpreter's prefix
      read-only, an empty ``/etc``, a few device nodes, and one writable, size-limited ``/tmp``
      (``file_mb``) that disappears with the run. The caller's home, ``/etc/shadow``, the
      repository and the host's ``/tmp`` are not visible;
    * **credentials**: uid/gid 65534 (``nobody``), no capabilities, ``no_new_privs``;
    * **seccomp**: no ``fork``/``clone``, no signals, no ``ptrace``, no sockets, no mounts or new
      namespaces, no keyrings, BPF or io_uring;
    * **limits**: ``RLIMIT_AS`` = ``memory_mb``, ``RLIMIT_CPU``, ``RLIMIT_FSIZE``,
      ``RLIMIT_NOFILE``, ``RLIMIT_NPROC = 0`` (binding: the uid is not root), no core dumps; the
      parent kills the process group at ``timeout`` seconds of wall clock.

    An audit hook inside the harness adds defence in depth (clear ``blocked: ...`` reasons for
    sockets, processes, native code, writes outside ``/tmp``) and guards the verdict (no ``gc``
    object walks, tracing, profiling, new audit hooks, code-object construction or ``marshal``).
    If the kernel refuses any layer, :meth:`run` raises :class:`SandboxUnavailableError`: untrusted
    code never runs without the boundary.

    Parameters
    ----------
    extract
        ``extract(x) -> str | None``: the program text of a response (None: reward 0, "no code").
    tests
        ``tests(prompt) -> str``: test code run after the program (default: none; the program
        must then merely run to completion).
    timeout
        Wall-clock limit in seconds (sandbox start-up, about 0.1 s, included).
    memory_mb
        Address-space limit.
    file_mb
        Size of the writable ``/tmp`` and the largest file the program may write.
    max_workers
        Concurrent sandboxes when scoring a batch.
    python
        The interpreter (default: the base interpreter of this one). Only its standard library is
        visible to the program.
    require_network_namespace
        Kept for compatibility: the network namespace is now always required.
    audit_hook
        Install the in-process defence-in-depth hook (default). Turning it off is only meant for
        testing that the operating-system boundary holds on its own; it weakens the verdict's
        protection against in-process tampering.
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
        require_network_namespace: bool = True,
        audit_hook: bool = True,
    ) -> None:
        import math

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
        if python is not None and not isinstance(python, str):
            raise TypeError(f"python must be a path to an interpreter or None, got {python!r}")
        self.extract, self.tests = extract, tests
        self.timeout = float(timeout)
        self.memory_mb, self.file_mb = memory_mb, file_mb
        self.max_workers = max_workers
        self.python = _base_interpreter(python)
        self.require_network_namespace = bool(require_network_namespace)
        self.audit_hook = bool(audit_hook)

    def __call__(self, prompt: Seq, xs: Sequence[Seq]) -> Tensor:
        import torch

        return torch.tensor([r.reward for r in self.evaluate(prompt, xs)], dtype=torch.float64)

    def evaluate(self, prompt: Seq, xs: Sequence[Seq]) -> list[ExecutionResult]:
        """Run every response with the prompt's tests.

        Parameters
        ----------
        prompt
            The prompt; ``tests(prompt)`` gives the test code.
        xs
            The responses; ``extract(x)`` gives each program (None: ``"no code"``).

        Returns
        -------
        list of ExecutionResult
            One per response, in input order (``max_workers`` sandboxes at a time).
        """
        from concurrent.futures import ThreadPoolExecutor

        suffix = self.tests(tuple(prompt)) if self.tests is not None else None
        programs = [self.extract(tuple(x)) for x in xs]
        if self.max_workers == 1 or len(programs) <= 1:
            return [self.run(p, suffix) for p in programs]
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda p: self.run(p, suffix), programs))

    def run(self, program: str | None, tests: str | None = None) -> ExecutionResult:
        """Run one program, then ``tests`` (if any), in a fresh sandbox.

        Parameters
        ----------
        program
            Python source of the program (None: reward 0, ``"no code"``).
        tests
            Python source run after the program, in its namespace; compiled separately, so the
            program cannot absorb it. None: the program only has to run to completion.

        Returns
        -------
        ExecutionResult
            ``reward`` 1.0 iff the harness reported that both ran without an exception within
            the limits; ``reason`` says why not otherwise.

        Raises
        ------
        SandboxUnavailableError
            When the operating-system boundary cannot be built (nothing untrusted ran).
        """
        import contextlib
        import hmac
        import secrets
        import signal
        import subprocess
        import time

        if program is None:
            return ExecutionResult(0.0, "no code", None, "", "", 0.0, {})
        nonce = secrets.token_hex(32)
        config = json.dumps({"nonce": nonce, "program": program, "tests": tests}).encode()
        limits = {
            "memory_bytes": self.memory_mb * 2**20,
            # one second above the wall clock: a busy program meets the wall clock first
            "cpu_seconds": int(self.timeout + 0.999) + 1,
            "file_bytes": self.file_mb * 2**20,
            "audit_hook": self.audit_hook,
            "env": _ENV,
        }
        config_r, config_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                [
                    *(self.python, "-I", "-S", _launcher_script(), "launch"),
                    *(str(config_r), str(verdict_w), json.dumps(limits)),
                ],
                pass_fds=(config_r, verdict_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                env=_ENV,
                cwd="/",
            )
        except BaseException:
            for fd in (config_w, verdict_r):
                os.close(fd)
            raise
        finally:
            os.close(config_r)
            os.close(verdict_w)
        try:
            out_b, err_b, verdict, timed_out, deadline = _pump(
                proc, config, config_w, verdict_r, self.timeout
            )
            left = deadline - time.monotonic()
            try:
                proc.wait(timeout=max(left, 0.0) + (1.0 if timed_out else 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
        finally:
            os.close(verdict_r)
            proc.stdout.close()  # type: ignore[union-attr]
            proc.stderr.close()  # type: ignore[union-attr]
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.perf_counter() - start
        code = proc.returncode
        out = out_b.decode("utf-8", "replace")[-4000:]
        err = err_b.decode("utf-8", "replace")[-4000:]

        first, newline, rest = verdict.partition(b"\n")
        if first.startswith(b"SETUP-ERROR "):
            raise SandboxUnavailableError(
                "the sandbox could not be built: " + first[12:].decode("utf-8", "replace")
            )
        if not first.startswith(b"STATUS ") or not newline:
            detail = err.strip().splitlines()[-1] if err.strip() else f"exit status {code}"
            if timed_out:
                detail = f"no status within {SETUP_GRACE_S + self.timeout:g} s"
            raise SandboxUnavailableError(f"the sandbox launcher failed: {detail}")
        isolation = {str(k): bool(v) for k, v in json.loads(first[7:]).items()}

        def result(reward: float, reason: str) -> ExecutionResult:
            return ExecutionResult(reward, reason, code, out, err, seconds, isolation)

        status, report = None, ""
        if rest:
            head = b"VERDICT " + nonce.encode() + b" "
            line, end, tail = rest.partition(b"\n")
            authentic = hmac.compare_digest(line[: len(head)], head)
            if not (authentic and end and not tail):
                return result(0.0, "blocked: the verdict channel was tampered with")
            word, _, text = line[len(head) :].partition(b" ")
            status = word.decode("ascii", "replace")
            report = text.decode("utf-8", "replace").replace("\\n", "\n")
        if timed_out:
            return result(0.0, f"wall-clock limit ({self.timeout:g} s) exceeded")
        if status == "pass" and code == 0:
            return result(1.0, "passed")
        if status == "fail":
            return result(0.0, _classify(report, self.memory_mb))
        if status is not None:
            return result(0.0, f"blocked: unexpected verdict {status!r} (exit status {code})")
        if code is not None and code < 0:
            sig = -code
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
            if sig == signal.SIGXCPU:
                return result(0.0, "cpu limit")
            return result(0.0, f"no verdict: the process was killed by signal {name}")
        return result(
            0.0, f"no verdict: the process ended (exit status {code}) without the harness's report"
        )

    def __repr__(self) -> str:
        return f"CodeExecutionReward(timeout={self.timeout:g}s, memory={self.memory_mb}MB)"
