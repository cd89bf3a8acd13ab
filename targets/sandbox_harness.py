"""The sandbox's harness: the only code trusted to report a verdict; runs inside the boundary.

The launcher (:mod:`~tiltsample.targets.sandbox_launcher`) reads this file and, after the boundary
is up, executes it as ``python -S -s -P -c <this source> harness CONFIG_FD VERDICT_FD AUDIT HIDDEN``
as uid 65534 under seccomp and the resource limits. It reads (and closes) the config pipe, keeps the
nonce only in the closure of the reporter audit hook, installs the gate audit hook, runs the program
and then the tests, and reports ``VERDICT <nonce> pass|fail <reason>`` from its single report site.

**Self-contained:** inside the sandbox neither this file nor the ``tiltsample`` package is visible,
so this module imports only the standard library and no other module of the project; the names of
the hidden native modules (``HIDDEN``) come from the launcher.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    _Hook = Callable[[str, tuple[Any, ...]], None]


#: Audit event through which the harness reports its verdict.
_VERDICT_EVENT = "tiltsample.sandbox.verdict"
#: File name the tests are compiled under (the gate refuses reading their code objects).
_TESTS_FILENAME = "<tests>"
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


def _make_gate(busy: list[bool], hidden: tuple[str, ...]) -> _Hook:
    """The defence-in-depth audit hook: it holds no secret and raises to refuse.

    It refuses what would let the program reach the harness's state or the tests (``gc`` object
    walks, frames, code objects, tracing, profiling, new audit hooks, building code objects,
    ``marshal``), and gives clear reasons for what the kernel refuses anyway (sockets, processes,
    native code, writes outside ``/tmp``). It must never call code the program could have
    replaced: it uses only objects captured here and C-level operations on exact ``str``/``bytes``
    (the one exception, ``os.fspath`` of a path-like argument, only decides a write check that the
    read-only filesystem enforces anyway). ``busy`` is set by the reporter around its own frame
    lookup; ``hidden`` names the extension modules whose files the launcher hid.
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
        {*hidden, *(n.lstrip("_") for n in hidden)} | {"ctypes", "multiprocessing", "subprocess"}
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


def _read_config(
    config_fd: int, verdict_fd: int, audit_hook: bool, hidden: tuple[str, ...]
) -> tuple[str, Any, list[_Hook]]:
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
        hooks.append(_make_gate(busy, hidden))
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


def _harness(config_fd: int, verdict_fd: int, audit_hook: bool, hidden: tuple[str, ...]) -> None:
    """Run the program, then the tests, and report the verdict from one report site.

    Everything the harness needs once untrusted code has started is a local variable of this
    frame (the program can rebind globals and builtins, not the fast locals of a running frame),
    and the frame itself is out of the program's reach (frame introspection is refused).
    """
    import builtins
    import contextlib
    import gc
    import types

    program, tests, hooks = _read_config(config_fd, verdict_fd, audit_hook, hidden)
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
    """Entry point of the harness (``harness CONFIG_FD VERDICT_FD AUDIT HIDDEN``)."""
    if argv[:1] == ["harness"]:
        _harness(int(argv[1]), int(argv[2]), argv[3] == "1", tuple(argv[4].split(",")))
    else:
        sys.exit("usage: sandbox_harness.py harness ...")


if __name__ == "__main__":
    _main(sys.argv[1:])
