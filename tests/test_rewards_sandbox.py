"""The code-execution reward: untrusted code is contained and scored 0 with a reason.

Each hostile program is run once through the sandbox with a short wall-clock limit; the tests
check both the verdict and that nothing escaped (no file outside the working directory, no
connection reached a listening socket, the parent is unaffected).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tiltsample.targets.rewards import CodeExecutionReward, ExecutionResult


def sandbox(**kw: object) -> CodeExecutionReward:
    return CodeExecutionReward(lambda x: None, timeout=kw.pop("timeout", 2.0), **kw)  # type: ignore[arg-type]


def test_passing_and_failing_programs() -> None:
    r = sandbox()
    ok = r.run("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('fine')")
    assert (ok.reward, ok.reason, ok.stdout.strip()) == (1.0, "passed", "fine")
    bad = r.run("assert 1 == 2, 'wrong answer'")
    assert bad.reward == 0.0 and bad.reason == "failed: AssertionError: wrong answer"
    syntax = r.run("def f(:\n")
    assert syntax.reward == 0.0 and "SyntaxError" in syntax.reason
    assert r.run(None) == ExecutionResult(0.0, "no code", None, "", "", 0.0, {})
    inside = r.run("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'")
    assert inside.reward == 1.0  # the throw-away working directory is writable


def test_reward_protocol_with_tests_and_batches() -> None:
    programs = {1: "def f(x):\n    return 2 * x", 2: "def f(x):\n    return x + 2", 3: None}
    r = CodeExecutionReward(
        lambda x: programs[x[0]], lambda prompt: "assert f(3) == 6", timeout=5.0, max_workers=2
    )
    assert r((0,), [(1,), (2,), (3,), (1,)]).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_infinite_loop_hits_the_wall_clock_limit() -> None:
    res = sandbox(timeout=1.0).run("while True:\n    pass")
    assert res.reward == 0.0 and res.reason.startswith("wall-clock limit")
    assert res.seconds < 10


def test_fork_bomb_is_contained() -> None:
    res = sandbox().run("import os\nwhile True:\n    os.fork()")
    assert res.reward == 0.0 and "process creation" in res.reason
    res = sandbox().run("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])")
    assert res.reward == 0.0 and res.reason.startswith("blocked")


def test_ten_gigabyte_allocation_fails_cleanly() -> None:
    res = sandbox(memory_mb=256).run("x = bytearray(10 * 1024 ** 3)\nprint(len(x))")
    assert res.reward == 0.0 and res.reason.startswith("memory limit")


def test_write_outside_the_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    res = sandbox().run(f"open({str(target)!r}, 'w').write('x')")
    assert res.reward == 0.0 and "outside the working directory" in res.reason
    assert not target.exists()
    res = sandbox().run(f"import os\nos.remove({str(tmp_path)!r})")
    assert res.reward == 0.0 and res.reason.startswith("blocked")
    assert tmp_path.exists()
    res = sandbox().run("import os\nos.chdir('/')\nopen('x', 'w')")
    assert res.reward == 0.0 and res.reason.startswith("blocked")


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


def test_native_code_is_refused() -> None:
    res = sandbox().run("import ctypes\nctypes.CDLL(None).system(b'true')")
    assert res.reward == 0.0 and "native code" in res.reason


def test_isolation_status_is_reported() -> None:
    res = sandbox().run("print('hi')")
    assert set(res.isolation) == {"network_namespace", "dropped_root"}


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="timeout"):
        CodeExecutionReward(lambda x: None, timeout=0)
    with pytest.raises(ValueError, match="memory_mb"):
        CodeExecutionReward(lambda x: None, memory_mb=1)
    with pytest.raises(ValueError, match="max_workers"):
        CodeExecutionReward(lambda x: None, max_workers=0)
    with pytest.raises(TypeError, match="extract"):
        CodeExecutionReward("code")  # type: ignore[arg-type]
