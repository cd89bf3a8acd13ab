"""Sandboxed code execution: the operating-system boundary, the harness and its verdict channel.

:class:`CodeExecutionReward` scores a generated program by running it, then its tests, in a
throw-away sandbox. The reward is ``1`` only when **the trusted harness reports, through a channel
the program cannot forge, that the tests ran to completion without an exception**; an exit status
of 0 alone is worth nothing. The threat model and its limits are in ``docs/sandbox.md``.

Three processes take part::

    parent (this module, the caller's process)
      └─ launcher  (``python -I -S sandbox.py launch``, the caller's credentials)
           └─ init  (pid 1 of new mount/pid/net/ipc/uts [+ user] namespaces, private root)
                └─ harness (uid 65534, no capabilities, seccomp, rlimits) runs program + tests

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

The module is also the launcher and the harness script, so it imports only the standard library at
run time.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from torch import Tensor

    from tiltsample.types import Seq

    _Hook = Callable[[str, tuple[Any, ...]], None]

__all__ = [
    "CodeExecutionReward",
    "ExecutionResult",
    "SandboxStatus",
    "SandboxUnavailableError",
    "sandbox_status",
]

#: The unprivileged uid/gid the program runs as (``nobody``).
SANDBOX_UID = 65534
#: Audit event through which the harness reports its verdict.
_VERDICT_EVENT = "tiltsample.sandbox.verdict"
#: File name the tests are compiled under (the gate refuses reading their code objects).
_TESTS_FILENAME = "<tests>"
#: Exit status of a launcher that could not build the sandbox (nothing untrusted ran).
_SETUP_FAILED = 97
#: Bytes kept from each of stdout / stderr (the tail) and from the verdict channel (the head).
_KEEP_OUTPUT = 1 << 20
_KEEP_VERDICT = 1 << 16
#: System directories bound read-only into the sandbox (symbolic links are recreated).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Device nodes bound into the sandbox's ``/dev``.
_DEVICES = ("null", "zero", "full", "random", "urandom")
#: Extension modules whose files are hidden (an empty file is mounted over them): native code
#: loading, raw memory access, test hooks into the interpreter, process creation.
_HIDDEN_MODULES = (
    "_ctypes",
    "_ctypes_test",
    "_testcapi",
    "_testinternalcapi",
    "_testbuffer",
    "_testclinic",
    "_testimportmultiple",
    "_testmultiphase",
    "_testsinglephase",
    "_xxsubinterpreters",
    "_xxinterpchannels",
    "_xxtestfuzz",
    "_posixsubprocess",
    "_multiprocessing",
    "_posixshmem",
    "_lsprof",
    "xxlimited",
    "xxlimited_35",
)
#: Hidden modules that only create processes (which seccomp refuses anyway).
_PROCESS_MODULES = ("_posixsubprocess", "_multiprocessing", "_posixshmem")
#: Modules imported by the harness before the program runs (from their bytecode caches; later
#: imports compile from source because ``marshal`` is refused to untrusted code).
_PRELOAD = (
    "math",
    "cmath",
    "re",
    "collections",
    "itertools",
    "functools",
    "heapq",
    "bisect",
    "string",
    "random",
    "operator",
    "statistics",
    "fractions",
    "decimal",
    "typing",
    "dataclasses",
    "copy",
    "array",
    "enum",
    "json",
    "logging",
    "unittest",
)
#: Fixed environment of the launcher and the program.
_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUTF8": "1",
}

# Linux constants (stable ABI).
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 32, 4096, 16384, 1 << 18
_MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1024, 2048, 1 << 21
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 22, 24, 38
_SECCOMP_MODE_FILTER = 2
_SECCOMP_RET_KILL_PROCESS, _SECCOMP_RET_ERRNO, _SECCOMP_RET_ALLOW = 0x80000000, 0x50000, 0x7FFF0000
_EPERM = 1
#: ``(AUDIT_ARCH, pivot_root syscall, "name=number ..." of the denied syscalls)`` per machine.
#: The denied list: process creation, signals (a Python signal handler would receive the current
#: frame), tracing and other processes' memory, sockets, mounts and namespaces, kernel keyrings,
#: modules, BPF, io_uring.
_SYSCALLS: dict[str, tuple[int, int, str]] = {
    "x86_64": (
        0xC000003E,
        155,
        """
        fork=57 vfork=58 clone=56 clone3=435 ptrace=101 process_vm_readv=310
        process_vm_writev=311 kill=62 tkill=200 tgkill=234 rt_sigqueueinfo=129
        rt_tgsigqueueinfo=297 pidfd_send_signal=424 pidfd_open=434 pidfd_getfd=438 alarm=37
        setitimer=38 timer_create=222 rt_sigaction=13 socket=41 mount=165 umount2=166
        pivot_root=155 chroot=161 unshare=272 setns=308 keyctl=250 add_key=248 request_key=249
        bpf=321 perf_event_open=298 userfaultfd=323 io_uring_setup=425 io_uring_enter=426
        io_uring_register=427 init_module=175 finit_module=313 delete_module=176 kexec_load=246
        kexec_file_load=320 reboot=169 swapon=167 swapoff=168 acct=163 quotactl=179
        personality=135 open_by_handle_at=304 name_to_handle_at=303 fanotify_init=300
        move_mount=429 open_tree=428 fsopen=430 fsconfig=431 fsmount=432 fspick=433
        mount_setattr=442 ioperm=173 iopl=172 modify_ldt=154 syslog=103 uselib=134 vhangup=153
        settimeofday=164 clock_settime=227 clock_adjtime=305 adjtimex=159 sethostname=170
        setdomainname=171 process_madvise=440 kcmp=312
        """,
    ),
    "aarch64": (
        0xC00000B7,
        41,
        """
        clone=220 clone3=435 ptrace=117 process_vm_readv=270 process_vm_writev=271 kill=129
        tkill=130 tgkill=131 rt_sigqueueinfo=138 rt_tgsigqueueinfo=240 pidfd_send_signal=424
        pidfd_open=434 pidfd_getfd=438 setitimer=103 timer_create=107 rt_sigaction=134
        socket=198 mount=40 umount2=39 pivot_root=41 chroot=51 unshare=97 setns=268 keyctl=219
        add_key=217 request_key=218 bpf=280 perf_event_open=241 userfaultfd=282
        io_uring_setup=425 io_uring_enter=426 io_uring_register=427 init_module=105
        finit_module=273 delete_module=106 kexec_load=104 kexec_file_load=294 reboot=142
        swapon=224 swapoff=225 acct=89 quotactl=60 personality=92 open_by_handle_at=265
        name_to_handle_at=264 fanotify_init=262 move_mount=429 open_tree=428 fsopen=430
        fsconfig=431 fsmount=432 fspick=433 mount_setattr=442 syslog=116 vhangup=58
        settimeofday=170 clock_settime=112 clock_adjtime=266 adjtimex=171 sethostname=161
        setdomainname=162 process_madvise=440 kcmp=272
        """,
    ),
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


# ============================================================================================
# Parent side
# ============================================================================================
def _base_interpreter(python: str | None) -> str:
    """The real interpreter behind ``python`` (a virtual environment's base interpreter)."""
    if python is None:
        return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    return os.path.realpath(python)


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


def _pump(
    proc: Any, config: bytes, config_fd: int, verdict_fd: int, timeout: float
) -> tuple[bytes, bytes, bytes, bool]:
    """Feed the config pipe and drain stdout, stderr and the verdict pipe, with caps.

    Returns ``(stdout, stderr, verdict, timed_out)``; kills the process group at the deadline.
    """
    import contextlib
    import selectors
    import signal
    import time

    deadline = time.monotonic() + timeout
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
            "cpu_seconds": max(1, int(self.timeout + 0.999)),
            "file_bytes": self.file_mb * 2**20,
            "audit_hook": self.audit_hook,
        }
        config_r, config_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        start = time.perf_counter()
        try:
            proc = subprocess.Popen(
                [
                    *(self.python, "-I", "-S", os.path.abspath(__file__), "launch"),
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
            out_b, err_b, verdict, timed_out = _pump(
                proc, config, config_w, verdict_r, self.timeout
            )
            left = self.timeout - (time.perf_counter() - start)
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
                detail = f"no status within {self.timeout:g} s"
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


# ============================================================================================
# Launcher: runs with the caller's credentials, builds the boundary, starts the harness
# ============================================================================================
def _mount_plan() -> dict[str, Any]:
    """Host paths the sandbox needs, computed before any namespace is entered."""
    import importlib.machinery

    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    system = [d for d in _SYSTEM_DIRS if os.path.lexists(d)]
    system_real = [os.path.realpath(d) for d in system]

    def covered(path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in system_real)

    binds: list[str] = []
    for path in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(exe)):
        real = os.path.realpath(path)
        if not covered(real) and not any(real == b or real.startswith(b + "/") for b in binds):
            binds = [b for b in binds if not b.startswith(real + "/")] + [real]
    # shared libraries mapped by this interpreter (e.g. libpython) outside the bound directories
    try:
        with open("/proc/self/maps") as maps:
            mapped = {ln.split(None, 5)[5].strip() for ln in maps if len(ln.split(None, 5)) == 6}
    except OSError:
        mapped = set()
    for path in sorted(p for p in mapped if p.startswith("/") and os.path.isfile(p)):
        real = os.path.dirname(os.path.realpath(path))
        if not covered(real) and not any(real == b or real.startswith(b + "/") for b in binds):
            binds.append(real)
    hidden: list[str] = []
    missing_files: list[str] = []
    for name in _HIDDEN_MODULES:
        spec = importlib.machinery.PathFinder.find_spec(name, sys.path)
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            hidden.append(os.path.realpath(spec.origin))
        elif name in sys.builtin_module_names and name not in _PROCESS_MODULES:
            missing_files.append(name)
    sources = system_real + binds
    base = next(
        (
            c
            for c in ("/tmp", "/mnt", "/media", "/srv", "/opt", "/run", "/var/tmp", "/home")
            if os.path.isdir(c)
            and not os.path.islink(c)
            and not any(s == c or s.startswith(c + "/") for s in sources)
        ),
        None,
    )
    if base is None:
        raise RuntimeError("no directory to build the sandbox root on")
    return {
        "exe": exe,
        "system": system,
        "binds": binds,
        "hidden": hidden,
        "builtin_hidden": missing_files,
        "base": base,
    }


def _seccomp_program(machine: str) -> bytes:
    """A classic-BPF seccomp filter denying (EPERM) the listed syscalls, allowing the rest."""
    import struct

    arch, _, table = _SYSCALLS[machine]
    deny = {int(item.partition("=")[2]) for item in table.split()}
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06

    def op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    prog = [op(ld_abs, 4), op(jeq, arch, 1, 0), op(ret, _SECCOMP_RET_KILL_PROCESS), op(ld_abs, 0)]
    if machine == "x86_64":  # refuse the x32 ABI (syscall numbers with bit 30 set)
        prog += [op(jge, 0x40000000, 0, 1), op(ret, _SECCOMP_RET_KILL_PROCESS)]
    for nr in sorted(deny):
        prog += [op(jeq, nr, 0, 1), op(ret, _SECCOMP_RET_ERRNO | _EPERM)]
    prog.append(op(ret, _SECCOMP_RET_ALLOW))
    return b"".join(prog)


def _launch(config_fd: int, verdict_fd: int, limits: dict[str, Any], source: str) -> None:
    """Enter new namespaces, fork the sandbox's init; mirror its exit status.

    ``source`` is this module's text: the harness runs it with ``python -c`` (the file itself is
    not visible inside the sandbox).
    """
    import contextlib
    import ctypes
    import signal

    def fail(message: str) -> NoReturn:
        text = message.encode("utf-8", "replace").replace(b"\n", b" ")
        os.write(verdict_fd, b"SETUP-ERROR " + text + b"\n")
        os._exit(_SETUP_FAILED)

    try:
        machine = os.uname().machine
        if machine not in _SYSCALLS:
            fail(f"no seccomp syscall table for the {machine!r} architecture")
        plan = _mount_plan()
        plan["source"] = source
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        uid, gid = os.geteuid(), os.getegid()
        userns = uid != 0
        flags = _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS
        if userns:
            flags |= _CLONE_NEWUSER
        if libc.unshare(ctypes.c_int(flags)) != 0:
            err = ctypes.get_errno()
            what = "user, " if userns else ""
            fail(
                f"unshare({what}mount, pid, network, ipc, uts namespaces) failed: "
                f"{os.strerror(err)} (running as uid {uid}; the sandbox needs root with "
                "CAP_SYS_ADMIN or unprivileged user namespaces)"
            )
        if userns:
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write(f"{SANDBOX_UID} {uid} 1")
            with open("/proc/self/gid_map", "w") as f:
                f.write(f"{SANDBOX_UID} {gid} 1")
        _no_core_dumps()
    except Exception as exc:
        fail(f"{type(exc).__name__}: {exc}")
    pid = os.fork()
    if pid == 0:
        try:
            _init(libc, plan, limits, userns, machine, config_fd, verdict_fd)
        except BaseException as exc:
            fail(f"{type(exc).__name__}: {exc}")
    os.close(config_fd)
    os.close(verdict_fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code > 128:  # the init reports a signal that ended the harness as 128 + signal number
        code = -(code - 128)
    if code < 0:  # end the same way, so that the parent sees the signal
        with contextlib.suppress(OSError, ValueError):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def _no_core_dumps() -> None:
    """``RLIMIT_CORE = 0`` (inherited by the sandbox)."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _init(
    libc: Any,
    plan: dict[str, Any],
    limits: dict[str, Any],
    userns: bool,
    machine: str,
    config_fd: int,
    verdict_fd: int,
) -> None:
    """Pid 1 of the sandbox: build the filesystem view, drop privileges, fork the harness."""
    import ctypes
    import resource
    import signal

    def check(ret: int, what: str) -> None:
        if ret != 0:
            raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")

    def mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
        enc = [None if s is None else s.encode() for s in (src, dst, fstype, data)]
        check(libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {dst}")

    def remount_ro(dst: str, extra: int = 0) -> None:
        # keep the flags the kernel may have locked (user namespaces) and add read-only
        f = os.statvfs(dst).f_flag
        keep = (
            (_MS_NOSUID if f & os.ST_NOSUID else 0)
            | (_MS_NODEV if f & os.ST_NODEV else 0)
            | (_MS_NOEXEC if f & os.ST_NOEXEC else 0)
            | (_MS_NOATIME if f & os.ST_NOATIME else 0)
            | (_MS_NODIRATIME if f & os.ST_NODIRATIME else 0)
            | (_MS_RELATIME if f & os.ST_RELATIME else 0)
        )
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | keep | extra
        mount(None, dst, None, flags, None)

    def bind_ro(src: str, dst: str) -> None:
        mount(src, dst, None, _MS_BIND | _MS_REC, None)
        remount_ro(dst)

    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    check(libc.sethostname(b"sandbox", 7), "sethostname")  # private UTS namespace
    mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
    root = plan["base"]
    mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=4m,nr_inodes=4096,mode=0755")
    for d in plan["system"]:
        target = root + d
        if os.path.islink(d):
            os.symlink(os.readlink(d), target)
        elif os.path.isdir(d):
            os.makedirs(target, 0o755)
            bind_ro(d, target)
    for d in plan["binds"]:
        os.makedirs(root + d, 0o755, exist_ok=True)
        bind_ro(d, root + d)
    os.makedirs(root + "/dev", 0o755)
    for name in _DEVICES:
        target = f"{root}/dev/{name}"
        if os.path.exists(f"/dev/{name}"):
            open(target, "w").close()
            mount(f"/dev/{name}", target, None, _MS_BIND, None)
    empty = root + "/.hidden"
    open(empty, "w").close()
    os.chmod(empty, 0o444)
    for path in plan["hidden"]:
        mount(empty, root + path, None, _MS_BIND, None)
        remount_ro(root + path)
    os.makedirs(root + "/etc", 0o755)
    os.makedirs(root + "/tmp", 0o755)
    size, inodes = int(limits["file_bytes"]), 1024
    mount(
        "tmpfs",
        root + "/tmp",
        "tmpfs",
        _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
        f"size={size},nr_inodes={inodes},mode=0700,uid={SANDBOX_UID},gid={SANDBOX_UID}",
    )
    mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None)
    os.chdir(root)
    pivot = _SYSCALLS[machine][1]
    check(libc.syscall(ctypes.c_long(pivot), b".", b"."), "pivot_root")
    check(libc.umount2(b".", _MNT_DETACH), "umount old root")
    os.chdir("/")
    os.chdir("/tmp")

    # credentials: drop every capability from the bounding set, then become nobody
    for cap in range(64):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    if not userns:
        os.setgroups([])
        os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
    try:  # in a user namespace uid 0 is not even mapped (EINVAL); capabilities go at exec
        os.setuid(0)
        dropped = False
    except OSError:
        dropped = os.geteuid() != 0
    if not dropped:
        raise RuntimeError("could not drop root privileges")
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    status = {
        "user_namespace": userns,
        "mount_namespace": True,
        "pid_namespace": True,
        "network_namespace": True,
        "ipc_namespace": True,
        "read_only_root": True,
        "dropped_root": dropped,
        "no_new_privs": True,
        "seccomp": True,
        "native_modules_hidden": not plan["builtin_hidden"],
    }
    source = plan["source"]
    pid = os.fork()
    if pid == 0:
        # the harness: limits, no_new_privs, seccomp, then exec the interpreter
        mem, cpu = int(limits["memory_bytes"]), int(limits["cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        fsize = int(limits["file_bytes"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        resource.setrlimit(resource.RLIMIT_MSGQUEUE, (0, 0))
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        prog = _seccomp_program(machine)
        buf = ctypes.create_string_buffer(prog, len(prog))

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        fprog = SockFprog(len(prog) // 8, ctypes.addressof(buf))
        check(
            libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
            "seccomp",
        )
        os.write(verdict_fd, b"STATUS " + json.dumps(status).encode() + b"\n")
        argv = [plan["exe"], "-S", "-s", "-P", "-c", source, "harness"]
        argv += [str(config_fd), str(verdict_fd), "1" if limits["audit_hook"] else "0"]
        os.execve(plan["exe"], argv, _ENV)
    os.close(config_fd)
    os.close(verdict_fd)
    while True:
        try:
            child, wstatus = os.wait()
        except ChildProcessError:
            os._exit(_SETUP_FAILED)
        if child == pid:
            break
    code = os.waitstatus_to_exitcode(wstatus)
    os._exit(128 - code if code < 0 else min(code, 128))


# ============================================================================================
# Harness: runs inside the sandbox; the only code trusted to report a verdict
# ============================================================================================
def _make_gate(busy: list[bool]) -> _Hook:
    """The defence-in-depth audit hook: it holds no secret and raises to refuse.

    It refuses what would let the program reach the harness's state or the tests (``gc`` object
    walks, frames, code objects, tracing, profiling, new audit hooks, building code objects,
    ``marshal``), and gives clear reasons for what the kernel refuses anyway (sockets, processes,
    native code, writes outside ``/tmp``). It must never call code the program could have
    replaced: it uses only objects captured here and C-level operations on exact ``str``/``bytes``
    (the one exception, ``os.fspath`` of a path-like argument, only decides a write check that the
    read-only filesystem enforces anyway). ``busy`` is set by the reporter around its own frame
    lookup.
    """
    import types

    _type, _str, _bytes, _int, _tuple, _len = type, str, bytes, int, tuple, len
    _perm, _value_error = PermissionError, ValueError
    _fspath, _decode = os.fspath, bytes.decode
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    deny = {
        "gc.get_objects": "object-graph introspection",
        "gc.get_referrers": "object-graph introspection",
        "gc.get_referents": "object-graph introspection",
        "sys._current_frames": "frame introspection",
        "sys.settrace": "tracing",
        "sys.setprofile": "profiling",
        "sys.addaudithook": "adding audit hooks",
        "code.__new__": "building code objects",
        "function.__new__": "building functions from code objects",
        "marshal.loads": "loading marshalled code",
        "marshal.load": "loading marshalled code",
        "os.fork": "process creation",
        "os.forkpty": "process creation",
        "os.system": "process creation",
        "os.exec": "process creation",
        "os.posix_spawn": "process creation",
        "os.spawn": "process creation",
        "subprocess.Popen": "process creation",
        "_thread.start_new_thread": "starting threads",
        "os.kill": "sending signals",
        "os.killpg": "sending signals",
        "sqlite3.enable_load_extension": "native code",
        "sqlite3.load_extension": "native code",
        "os.chroot": "changing root",
        "os.setuid": "privileges",
        "os.setgid": "privileges",
    }
    hidden_attributes = frozenset(
        {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_code", "gi_code", "cr_code", "ag_code"}
    )
    code_type = types.CodeType
    tests_file = _TESTS_FILENAME
    inner = [False]  # set while the gate reads a function's code itself
    no_import = frozenset(
        {*_HIDDEN_MODULES, *(n.lstrip("_") for n in _HIDDEN_MODULES)}
        | {"ctypes", "multiprocessing", "subprocess"}
    )
    path_events = frozenset(
        {
            "os.remove",
            "os.rename",
            "os.mkdir",
            "os.rmdir",
            "os.symlink",
            "os.link",
            "os.chmod",
            "os.chown",
            "os.truncate",
            "os.utime",
            "shutil.rmtree",
            "os.chdir",
        }
    )

    def inside(path: object) -> bool:
        t = _type(path)
        if t is _int:
            return True  # an open descriptor
        if t is not _str and t is not _bytes:
            try:
                path = _fspath(path)  # type: ignore[call-overload]
            except BaseException:
                return False
            t = _type(path)
        if t is _bytes:
            path = _decode(path, "utf-8", "surrogateescape")  # type: ignore[arg-type]
        elif t is not _str:
            return False
        p: str = path  # type: ignore[assignment]
        if p.startswith("/") and not (p == "/tmp" or p.startswith("/tmp/")):
            return False
        return "/../" not in "/" + p + "/"

    def gate(event: str, args: tuple[Any, ...]) -> None:
        why = deny.get(event)
        if why is None:
            if event == "sys._getframe":
                if not busy[0]:  # typing, enum, namedtuple and logging catch ValueError
                    raise _value_error(
                        "sandbox: frame introspection is not allowed (" + event + ")"
                    )
            elif event == "object.__getattr__":
                if inner[0]:
                    return
                name: Any = args[1] if _type(args) is _tuple and _len(args) == 2 else None
                if _type(name) is not _str or name in hidden_attributes:
                    why = "frame and code-object introspection"
                elif name == "__code__":  # only the tests' functions: their constants are answers
                    inner[0] = True
                    try:
                        code = args[0].__code__
                    except BaseException:
                        code = None
                    inner[0] = False
                    if _type(code) is not code_type or code.co_filename == tests_file:
                        why = "reading the tests' code"
                if why is not None:
                    event = "." + name if _type(name) is _str else event
            elif event.startswith("socket."):
                why = "network access"
            elif event.startswith("ctypes."):
                why = "native code"
            elif event == "import":
                module: Any = args[0] if args else None
                if _type(module) is not _str or module.partition(".")[0] in no_import:
                    why = "importing a module that loads native code or creates processes"
                    event = "import " + module if _type(module) is _str else event
            elif event == "open":
                path, mode, flags = (*args, None, None, None)[:3]
                text_mode = _type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode)
                writing = text_mode or (_type(mode) is _str and "+" in mode)
                writing = writing or (_type(flags) is _int and flags & write_flags)
                if writing and not inside(path):
                    why = "writing outside the working directory"
            elif event in path_events:
                for a in args[:2]:
                    if _type(a) is not _int and not inside(a):
                        why = "changing files outside the working directory"
        if why is not None:
            raise _perm("sandbox: " + why + " is not allowed (" + event + ")")

    return gate


def _make_reporter(prefix: bytes, verdict_fd: int, busy: list[bool]) -> _Hook:
    """The audit hook that holds the nonce (in ``prefix``) and writes the one verdict.

    It never raises and never calls code the program could have replaced. The first report arms
    it and records the caller's frame and instruction (the harness's report site); a later report
    is accepted only from that same frame and instruction, otherwise a forged report is recorded.
    Either way the process ends right after writing. Nothing can run inside it: ``gc`` is
    disabled first, signals cannot be delivered (seccomp) and other hooks cannot be added.
    """
    import gc

    _getframe, _write, _exit, _gc_disable = sys._getframe, os.write, os._exit, gc.disable
    _type, _str, _len, _encode, _replace = type, str, len, str.encode, bytes.replace
    event_name = _VERDICT_EVENT
    site: list[Any] = [None, -1]

    def report(event: str, args: tuple[Any, ...]) -> None:
        if event != event_name:
            return
        try:
            _gc_disable()
            busy[0] = True
            caller = _getframe(1)
            busy[0] = False
            if site[0] is None:
                site[0], site[1] = caller, caller.f_lasti
                return
            ok = caller is site[0] and caller.f_lasti == site[1] and _len(args) == 2
            status = args[0] if ok else None
            reason = args[1] if ok else None
            if _type(status) is not _str or (status != "pass" and status != "fail"):
                message = b"fail forged: a verdict was reported outside the harness"
            else:
                text: Any = reason if _type(reason) is _str else "?"
                body = _replace(_encode(text, "utf-8", "backslashreplace"), b"\n", b"\\n")
                message = _encode(status, "ascii") + b" " + body
            _write(verdict_fd, prefix + message + b"\n")
            _exit(0 if message[:5] == b"pass " else 1)
        except BaseException:
            _exit(3)

    return report


def _read_config(config_fd: int, verdict_fd: int, audit_hook: bool) -> tuple[str, Any, list[_Hook]]:
    """Read (and close) the config pipe; the nonce goes only into the reporter's closure.

    Returns the program, the tests (or None) and the audit hooks to install, reporter first.
    """
    chunks = []
    while True:
        chunk = os.read(config_fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(config_fd)
    config = json.loads(b"".join(chunks))
    busy = [False]
    prefix = b"VERDICT " + config["nonce"].encode() + b" "
    hooks = [_make_reporter(prefix, verdict_fd, busy)]
    if audit_hook:
        hooks.append(_make_gate(busy))
    return str(config["program"]), config["tests"], hooks


def _describe(exc: BaseException) -> str:
    """``"Type: message"`` of the exception that ended the run (an exact ``str``)."""
    try:
        name = str(type(exc).__name__)
        text = str(exc)
    except BaseException:
        name, text = "Exception", "<unprintable>"
    msg = f"{name}: {text}" if text else name
    return "".join(["", msg[:2000]])


def _harness(config_fd: int, verdict_fd: int, audit_hook: bool) -> None:
    """Run the program, then the tests, and report the verdict from one report site.

    Everything the harness needs once untrusted code has started is a local variable of this
    frame (the program can rebind globals and builtins, not the fast locals of a running frame),
    and the frame itself is out of the program's reach (frame introspection is refused).
    """
    import builtins
    import contextlib
    import gc
    import types

    program, tests, hooks = _read_config(config_fd, verdict_fd, audit_hook)
    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    if "traceback" in sys.modules:  # unittest's assertRaises clears frames: a no-op here
        setattr(sys.modules["traceback"], "clear_frames", lambda tb: None)  # noqa: B010
    sys.dont_write_bytecode = True
    sys.pycache_prefix = "/nonexistent-pycache"  # later imports compile from source
    program_code = tests_code = error = None
    try:
        program_code = compile(program, "<program>", "exec")
        if tests is not None:
            tests_code = compile(str(tests), _TESTS_FILENAME, "exec")
    except Exception as exc:
        error = exc
    del program, tests
    module = types.ModuleType("__main__")
    namespace = module.__dict__
    namespace["__builtins__"] = builtins
    sys.modules["__main__"] = module
    sys.argv = ["<program>"]
    _exec, _audit, _describe_, _base, _type = exec, sys.audit, _describe, BaseException, type
    _print_exception = sys.__excepthook__
    _gc_enable, _gc_disable = gc.enable, gc.disable
    out, err = sys.stdout, sys.stderr
    event = _VERDICT_EVENT
    for hook in hooks:  # the reporter first: the gate refuses any hook added after it
        sys.addaudithook(hook)
    del hook, hooks
    status, reason = "armed", ""
    for step in (0, 1):
        if step:
            _gc_enable()
            status, reason = "fail", "harness error"
            try:
                if error is not None:
                    raise error
                _exec(program_code, namespace)  # type: ignore[arg-type]
                if tests_code is not None:
                    _exec(tests_code, namespace)
            except _base as exc:
                reason = _describe_(exc)
                try:  # noqa: SIM105 (no library code on the harness's path: contextlib is patchable)
                    _print_exception(_type(exc), exc, exc.__traceback__)
                except _base:
                    pass
            else:
                status, reason = "pass", ""
            for stream in (out, err):
                try:  # noqa: SIM105
                    stream.flush()
                except _base:
                    pass
            _gc_disable()
        # the single report site: arms the reporter (step 0), then reports (step 1)
        _audit(event, status, reason)
    os._exit(3)


def _main(argv: list[str]) -> None:
    """Entry point of the launcher (``launch``) and of the harness (``harness``)."""
    if argv[:1] == ["launch"]:
        with open(os.path.abspath(__file__), encoding="utf-8") as f:
            source = f.read()
        _launch(int(argv[1]), int(argv[2]), json.loads(argv[3]), source)
    elif argv[:1] == ["harness"]:
        _harness(int(argv[1]), int(argv[2]), argv[3] == "1")
    else:
        sys.exit("usage: sandbox.py launch|harness ...")


if __name__ == "__main__":
    _main(sys.argv[1:])
