"""The code-execution reward: untrusted code is contained and scored 0 with a reason.

Each hostile program is run once through the sandbox with a short wall-clock limit; the tests
check both the verdict and that nothing escaped (no file outside the sandbox, no connection reached
a listening socket, the parent is unaffected). The sandbox needs the kernel's namespaces: where it
cannot be built the sandbox tests are skipped with the reason (and the reward raises
:class:`SandboxUnavailableError` instead of running anything). The attack catalogue is in
``test_sandbox_attacks.py``.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tiltsample.targets.rewards import (
    CodeExecutionReward,
    ExecutionResult,
    SandboxUnavailableError,
    sandbox_status,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sandboxed() -> None:
    status = sandbox_status()
    if not status.available:
        pytest.skip(f"the OS sandbox cannot be built here: {status.reason}")


def sandbox(**kw: object) -> CodeExecutionReward:
    return CodeExecutionReward(lambda x: None, timeout=kw.pop("timeout", 2.0), **kw)  # type: ignore[arg-type]


@pytest.mark.usefixtures("sandboxed")
def test_passing_and_failing_programs() -> None:
    r = sandbox()
    ok = r.run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')")
    assert (ok.reward, ok.reason, ok.stdout.strip()) == (1.0, "passed", "fine")
    bad = r.run("assert 1 == 2, 'wrong answer'")
    assert bad.reward == 0.0 and bad.reason == "failed: AssertionError: wrong answer"
    assert "AssertionError: wrong answer" in bad.stderr  # the traceback is kept for debugging
    syntax = r.run("def f(:\n")
    assert syntax.reward == 0.0 and "SyntaxError" in syntax.reason
    assert r.run(None) == ExecutionResult(0.0, "no code", None, "", "", 0.0, {})
    inside = r.run("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'")
    assert inside.reward == 1.0  # the throw-away working directory is writable


@pytest.mark.usefixtures("sandboxed")
def test_program_and_tests_are_separate_units() -> None:
    r = sandbox()
    assert r.run("def f(x):\n    return 2 * x", "assert f(3) == 6").reward == 1.0
    assert r.run("def f(x):\n    return 2 * x", "assert f(3) == 7").reward == 0.0
    # a program cannot swallow the tests by leaving a construct open
    res = r.run("def f(x):\n    return 2 * x\ns = '''", "assert f(3) == 7")
    assert res.reward == 0.0 and "SyntaxError" in res.reason
    res = r.run("def f(x):\n    return 2 * x", "assert f(3) ==")
    assert res.reward == 0.0 and "SyntaxError" in res.reason


@pytest.mark.usefixtures("sandboxed")
def test_reward_protocol_with_tests_and_batches() -> None:
    programs = {1: "def f(x):\n    return 2 * x", 2: "def f(x):\n    return x + 2", 3: None}
    r = CodeExecutionReward(
        lambda x: programs[x[0]], lambda prompt: "assert f(3) == 6", timeout=5.0, max_workers=2
    )
    assert r((0,), [(1,), (2,), (3,), (1,)]).tolist() == [1.0, 0.0, 0.0, 1.0]
    reasons = [res.reason for res in r.evaluate((0,), [(1,), (2,), (3,)])]
    assert reasons == ["passed", "failed: AssertionError", "no code"]


@pytest.mark.usefixtures("sandboxed")
def test_infinite_loop_hits_the_wall_clock_limit() -> None:
    res = sandbox(timeout=1.0).run("while True:\n    pass")
    assert res.reward == 0.0 and res.reason.startswith("wall-clock limit")
    assert res.seconds < 10


@pytest.mark.usefixtures("sandboxed")
def test_fork_bomb_is_contained() -> None:
    res = sandbox().run("import os\nwhile True:\n    os.fork()")
    assert res.reward == 0.0 and "process creation" in res.reason
    res = sandbox().run("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])")
    assert res.reward == 0.0 and res.reason.startswith("blocked")


@pytest.mark.usefixtures("sandboxed")
def test_ten_gigabyte_allocation_fails_cleanly() -> None:
    res = sandbox(memory_mb=256).run("x = bytearray(10 * 1024 ** 3)\nprint(len(x))")
    assert res.reward == 0.0 and res.reason.startswith("memory limit")


@pytest.mark.usefixtures("sandboxed")
def test_write_outside_the_directory_is_refused(tmp_path: Path) -> None:
    res = sandbox().run("open('/var/escaped.txt', 'w').write('x')")
    assert res.reward == 0.0 and "outside the working directory" in res.reason
    assert not Path("/var/escaped.txt").exists()
    # the host's /tmp is not the sandbox's /tmp (a private tmpfs): the host folder is not there
    target = tmp_path / "escaped.txt"
    res = sandbox().run(f"open({str(target)!r}, 'w').write('x')")
    assert res.reward == 0.0 and "No such file or directory" in res.reason
    assert not target.exists()
    res = sandbox().run(f"import os\nos.remove({str(tmp_path)!r})")
    assert res.reward == 0.0 and "No such file or directory" in res.reason
    assert tmp_path.exists()
    res = sandbox().run("import os\nos.remove('/usr/bin/env')")
    assert res.reward == 0.0 and res.reason.startswith("blocked")
    assert Path("/usr/bin/env").exists()
    res = sandbox().run("import os\nos.chdir('/')\nopen('x', 'w')")
    assert res.reward == 0.0 and res.reason.startswith("blocked")


@pytest.mark.usefixtures("sandboxed")
def test_socket_connection_is_refused() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        res = sandbox().run(
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)"
        )
        assert res.reward == 0.0 and "network" in res.reason
        with pytest.raises(TimeoutError):
            server.accept()  # nothing connected
    finally:
        server.close()


@pytest.mark.usefixtures("sandboxed")
def test_native_code_is_refused() -> None:
    res = sandbox().run("import ctypes\nctypes.CDLL(None).system(b'true')")
    assert res.reward == 0.0 and "native code" in res.reason


@pytest.mark.usefixtures("sandboxed")
def test_isolation_status_is_reported() -> None:
    res = sandbox().run("print('hi')")
    layers = {
        "mount_namespace",
        "pid_namespace",
        "network_namespace",
        "ipc_namespace",
        "read_only_root",
        "dropped_root",
        "no_new_privs",
        "seccomp",
    }
    assert layers <= set(res.isolation)
    assert all(res.isolation[k] for k in layers)
    assert "user_namespace" in res.isolation and "native_modules_hidden" in res.isolation
    assert sandbox_status().available and sandbox_status().isolation == res.isolation


def test_an_unavailable_boundary_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    """With ``unshare`` refused by the kernel, the reward raises instead of running the program."""
    machine = platform.machine()
    numbers = {"x86_64": (0xC000003E, 272), "aarch64": (0xC00000B7, 97)}
    if machine not in numbers:
        pytest.skip(f"no seccomp numbers for {machine}")
    arch, unshare = numbers[machine]
    marker = tmp_path / "ran.txt"
    script = textwrap.dedent(
        f"""
        import ctypes, struct, sys
        from tiltsample.targets.sandbox import CodeExecutionReward, SandboxUnavailableError

        def op(code, k, jt=0, jf=0):
            return struct.pack("HBBI", code, jt, jf, k)

        prog = b"".join([
            op(0x20, 4), op(0x15, {arch}, 1, 0), op(0x06, 0x7FFF0000), op(0x20, 0),
            op(0x15, {unshare}, 0, 1), op(0x06, 0x50001), op(0x06, 0x7FFF0000),
        ])
        buf = ctypes.create_string_buffer(prog, len(prog))

        class Fprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        assert libc.prctl(38, 1, 0, 0, 0) == 0
        assert libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) == 0
        reward = CodeExecutionReward(lambda x: None, timeout=5.0)
        try:
            reward.run("open({str(marker)!r}, 'w').write('ran')")
        except SandboxUnavailableError as exc:
            print("UNAVAILABLE", exc)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    assert "UNAVAILABLE" in proc.stdout and "unshare" in proc.stdout, proc.stdout
    assert not marker.exists()


@pytest.mark.usefixtures("sandboxed")
def test_an_unprivileged_caller_gets_a_user_namespace() -> None:
    """Run as uid 65534 (with the system interpreter), the sandbox uses a user namespace."""
    import os
    import shutil

    python = "/usr/bin/python3"
    script = ROOT / "targets" / "sandbox.py"
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists(python):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to switch to an unprivileged uid")
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
    )
    readable = all(os.stat(p).st_mode & 0o005 == 0o005 for p in [*script.parents, script.parent])
    if version.stdout.strip() != "True" or not readable or not os.access(script, os.R_OK):
        pytest.skip("the system interpreter is older than 3.11 or the sources are not readable")
    code = textwrap.dedent(
        f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("sandbox", {str(script)!r})
        sandbox = importlib.util.module_from_spec(spec)
        sys.modules["sandbox"] = sandbox
        spec.loader.exec_module(sandbox)
        reward = sandbox.CodeExecutionReward(lambda x: None, timeout=10.0, python=sys.executable)
        try:
            good = reward.run("import os\\nassert os.getuid() == 65534\\ndef f(x):\\n    return x",
                              "assert f(2) == 2")
            bad = reward.run("import os\\nos.fork()")
        except sandbox.SandboxUnavailableError as exc:
            print("UNAVAILABLE", exc)
        else:
            print(good.reward, good.isolation["user_namespace"], bad.reward)
        """
    )
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.startswith("UNAVAILABLE"):
        pytest.skip(f"no unprivileged user namespaces here: {proc.stdout.strip()}")
    assert proc.stdout.split() == ["1.0", "True", "0.0"], proc.stdout + proc.stderr


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="timeout"):
        CodeExecutionReward(lambda x: None, timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        CodeExecutionReward(lambda x: None, memory_mb=1)
    with pytest.raises(ValueError, match="file_mb"):
        CodeExecutionReward(lambda x: None, file_mb=0)
    with pytest.raises(ValueError, match="max_workers"):
        CodeExecutionReward(lambda x: None, max_workers=0)
    with pytest.raises(TypeError, match="extract"):
        CodeExecutionReward("code")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="python"):
        CodeExecutionReward(lambda x: None, python=3)  # type: ignore[arg-type]


def test_rewards_module_reexports_the_sandbox() -> None:
    from tiltsample.targets import rewards, sandbox

    assert rewards.CodeExecutionReward is sandbox.CodeExecutionReward
    assert rewards.ExecutionResult is sandbox.ExecutionResult
    assert SandboxUnavailableError is sandbox.SandboxUnavailableError
    assert issubclass(SandboxUnavailableError, RuntimeError)
    assert (ROOT / "targets" / "sandbox.py").exists()
