"""Attacks on the code-execution sandbox: every one scores 0 and leaves no trace.

Two families (threat model in ``docs/sandbox.md``):

* **reward hacking** -- a wrong program that tries to be scored as correct: early exits
  (``sys.exit``, ``os._exit``, ``SystemExit``, ``atexit``), forged or tampered verdicts, tampering
  with the harness, reading the tests' answers. The reward must stay 0.
* **escapes** -- a program that tries to act outside its sandbox: files, processes, network,
  signals, privileges, devices, resources. Each attempt is followed by a correct solution, so the
  reward is 1 if the attempt "worked" silently and 0 when it was refused; the host is then
  checked for traces.

Most attacks run twice: with the in-process audit hook (the default) and without it
(``audit_hook=False``), which shows that the operating-system boundary holds on its own. The
attacks that only the hook stops (object-graph walks, frame and code introspection, tracing) run
with it, and a canary test shows that they do succeed without it, so they are not vacuous.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

from tiltsample.targets.sandbox import CodeExecutionReward, sandbox_status

# Hundreds of sandboxed runs (~0.1-2 s each): in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

EVENT = "tiltsample.sandbox.verdict"
CORRECT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def guarded() -> CodeExecutionReward:
    status = sandbox_status()
    if not status.available:
        pytest.skip(f"the OS sandbox cannot be built here: {status.reason}")
    return CodeExecutionReward(lambda x: None, timeout=3.0)


@pytest.fixture(scope="module")
def bare(guarded: CodeExecutionReward) -> CodeExecutionReward:
    return CodeExecutionReward(lambda x: None, timeout=3.0, audit_hook=False)


@pytest.fixture(params=["guarded", "bare"])
def reward(request: pytest.FixtureRequest) -> CodeExecutionReward:
    value: CodeExecutionReward = request.getfixturevalue(request.param)
    return value


# ============================================================================================
# A correct solution scores 1
# ============================================================================================
def test_correct_solution_scores_one(reward: CodeExecutionReward) -> None:
    res = reward.run(CORRECT, TESTS)
    assert (res.reward, res.reason, res.returncode) == (1.0, "passed", 0)
    assert reward.run(WRONG, TESTS).reward == 0.0


def test_realistic_correct_program_scores_one(guarded: CodeExecutionReward) -> None:
    program = CORRECT + (
        "import collections, dataclasses, enum, functools, logging, typing, textwrap\n"
        "Point = collections.namedtuple('Point', 'x y')\n"
        "class P(typing.NamedTuple):\n    x: int\n"
        "Color = enum.Enum('Color', 'RED GREEN')\n"
        "@dataclasses.dataclass(frozen=True)\nclass Box:\n    w: int\n"
        "@functools.lru_cache(None)\n"
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
        "logging.getLogger('x').warning('logging works')\n"
        "open('scratch.txt', 'w').write(textwrap.dedent('  ok'))\n"
    )
    tests = TESTS + (
        "import unittest, io\n"
        "assert fib(25) == 75025 and Point(1, 2).y == 2 and P(3).x == 3 and Box(2).w == 2\n"
        "assert Color.RED.value == 1 and open('scratch.txt').read() == 'ok'\n"
        "class T(unittest.TestCase):\n"
        "    def test_add(self):\n"
        "        self.assertEqual(add(1, 1), 2)\n"
        "        with self.assertRaises(TypeError):\n"
        "            add(1, 'x')\n"
        "runner = unittest.TextTestRunner(stream=io.StringIO())\n"
        "assert runner.run(unittest.defaultTestLoader.loadTestsFromTestCase(T)).wasSuccessful()\n"
    )
    res = guarded.run(program, tests)
    assert (res.reward, res.reason) == (1.0, "passed"), res.stderr


def test_the_program_runs_unprivileged_in_a_private_view(reward: CodeExecutionReward) -> None:
    probe = (
        "import os, socket, resource\n"
        "ids = (os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups())\n"
        "assert ids == (65534, 65534, 65534, 65534, []), ids\n"
        "assert resource.getrlimit(resource.RLIMIT_NPROC) == (0, 0)\n"
        "allowed = {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_CTYPE', 'PYTHONHASHSEED',\n"
        "           'PYTHONDONTWRITEBYTECODE', 'PYTHONUTF8'}\n"
        "assert set(os.environ) <= allowed, os.environ\n"
        "assert os.getcwd() == '/tmp' and os.listdir('/etc') == []\n"
        "assert not os.path.exists('/proc') and not os.path.exists('/etc/shadow')\n"
        "assert sorted(os.listdir('/dev')) == ['full', 'null', 'random', 'urandom', 'zero']\n"
    )
    res = reward.run(CORRECT + probe, TESTS)
    assert res.reward == 1.0, res.reason + res.stderr


# ============================================================================================
# Reward hacking: early exits
# ============================================================================================
#: ``name -> (attack appended to the program, expected start of the reason)``; each is also
#: tried after a *correct* program, where it must still score 0 (the tests never ran).
EARLY_EXITS = {
    "sys.exit(0)": ("import sys\nsys.exit(0)", "early exit (SystemExit: 0)"),
    "sys.exit()": ("import sys\nsys.exit()", "early exit (SystemExit)"),
    "raise SystemExit": ("raise SystemExit", "early exit (SystemExit)"),
    "raise SystemExit(0)": ("raise SystemExit(0)", "early exit (SystemExit: 0)"),
    "sys.exit(message)": ("import sys\nsys.exit('done')", "early exit (SystemExit: done)"),
    "raise KeyboardInterrupt": ("raise KeyboardInterrupt", "early exit (KeyboardInterrupt)"),
    "os._exit(0)": ("import os\nos._exit(0)", "no verdict"),
    "os.abort()": ("import os\nos.abort()", "no verdict"),
    "exit inside the tested function": (
        "import os\n_add = add\ndef add(a, b):\n    os._exit(0)",
        "no verdict",
    ),
    "swallow the tests in a string": ("s = '''", "failed: SyntaxError"),
    "swallow the tests in a block": ("if True:", "failed: IndentationError"),
    "line continuation": ("x = 1 + \\", "failed: SyntaxError"),
}


@pytest.mark.parametrize("name", list(EARLY_EXITS))
@pytest.mark.parametrize("program", [WRONG, CORRECT], ids=["wrong", "correct"])
def test_early_exit_scores_zero(reward: CodeExecutionReward, name: str, program: str) -> None:
    attack, reason = EARLY_EXITS[name]
    res = reward.run(program + attack, TESTS)
    assert res.reward == 0.0 and res.reason.startswith(reason), res.reason


#: Exits that happen after the program's code, at interpreter shutdown or while reporting.
LATE_EXITS = {
    "atexit os._exit(0)": "import atexit, os\natexit.register(lambda: os._exit(0))",
    "atexit sys.exit(0)": "import atexit, sys\natexit.register(sys.exit, 0)",
    "excepthook os._exit(0)": "import sys, os\nsys.excepthook = lambda *a: os._exit(0)",
    "__del__ os._exit(0)": (
        "import os\nclass D:\n    def __del__(self):\n        os._exit(0)\nd = D()"
    ),
    "stdout flush os._exit(0)": (
        "import sys, os\n"
        "class W:\n"
        "    def write(self, s):\n        return len(s)\n"
        "    def flush(self):\n        os._exit(0)\n"
        "sys.stdout = sys.stderr = W()"
    ),
    "unraisable hook": "import sys, os\nsys.unraisablehook = lambda *a: os._exit(0)",
}


@pytest.mark.parametrize("name", list(LATE_EXITS))
def test_late_exit_scores_zero(reward: CodeExecutionReward, name: str) -> None:
    res = reward.run(WRONG + LATE_EXITS[name], TESTS)
    assert res.reward == 0.0 and res.reason != "passed", res.reason


# ============================================================================================
# Reward hacking: forged and tampered verdicts
# ============================================================================================
FORGERIES = {
    "fake verdict on stdout and stderr": (
        "import sys\nprint('VERDICT ' + '0' * 64 + ' pass ')\n"
        "sys.stderr.write('STATUS {}\\nVERDICT ' + '0' * 64 + ' pass \\n')"
    ),
    "fake verdict on every descriptor": (
        "import os\nfor fd in range(3, 64):\n"
        "    try:\n        os.write(fd, b'VERDICT ' + b'0' * 64 + b' pass \\n')\n"
        "    except OSError:\n        pass"
    ),
    "fill the verdict pipe": (
        "import os\nfor fd in range(3, 64):\n"
        "    try:\n        os.set_blocking(fd, False)\n        os.write(fd, b'x' * 70000)\n"
        "    except OSError:\n        pass"
    ),
    "stdout over every descriptor": (
        "import os\nfor fd in range(3, 64):\n"
        "    try:\n        os.dup2(1, fd)\n    except OSError:\n        pass"
    ),
    "close every descriptor": "import os\nos.closerange(3, 64)",
    "report pass through the audit event": f"import sys\nsys.audit({EVENT!r}, 'pass', '')",
    "re-arm the reporter": f"import sys\nsys.audit({EVENT!r}, 'armed', '')",
    "report from a builtin callable in __str__": (
        "import functools, sys\n"
        f"class E(Exception):\n    __str__ = functools.partial(sys.audit, {EVENT!r}, 'pass')\n"
        "raise E()"
    ),
    "report from a builtin callable in a metaclass": (
        "import functools, sys\n"
        "class M(type):\n"
        f"    __name__ = property(functools.partial(sys.audit, {EVENT!r}, 'pass'))\n"
        "class E(Exception, metaclass=M):\n    pass\nraise E()"
    ),
    "report from __eq__ of the returned value": (
        "import functools, sys\n"
        f"class V:\n    __eq__ = functools.partial(sys.audit, {EVENT!r}, 'pass')\n"
        "def add(a, b):\n    return V()"
    ),
    "report from a gc callback": (
        "import functools, gc, sys\n"
        f"gc.callbacks.append(functools.partial(sys.audit, {EVENT!r}, 'pass'))\n"
        "x = []\nx.append(x)\ndel x\ngc.collect()"
    ),
    "report from __del__ of garbage": (
        "import functools, sys\n"
        f"class D:\n    __del__ = functools.partial(sys.audit, {EVENT!r}, 'pass', '')\n"
        "d = D()\nd.me = d\ndel d"
    ),
    "report from a weakref finalizer": (
        "import sys, weakref\nclass O:\n    pass\no = O()\no.me = o\n"
        f"weakref.finalize(o, sys.audit, {EVENT!r}, 'pass', '')\ndel o"
    ),
    "monkeypatch the reporting path": (
        "import builtins, os, sys\n"
        "os.write = lambda *a: 0\nos._exit = lambda *a: None\nsys.audit = lambda *a: None\n"
        "builtins.exec = lambda *a, **k: None\nbuiltins.BaseException = type('B', (Exception,), {})"
    ),
    "disable the old hook tables (the issue's attack)": (
        "import sys\nm = sys.modules['__main__']\n"
        "for step in (lambda: m.BLOCKED.clear(), lambda: setattr(m, 'inside', lambda p: True)):\n"
        "    try:\n        step()\n    except Exception:\n        pass"
    ),
    "signal handler to catch the harness's frame": (
        "import signal\nsignal.signal(signal.SIGALRM, lambda s, f: None)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)"
    ),
    "signal handler through a fresh _signal": (
        "import _imp, importlib.machinery as m\n"
        "s = _imp.create_builtin(m.ModuleSpec('_signal', m.BuiltinImporter))\n"
        "s.signal(14, lambda *a: None)"
    ),
    "native code through a fresh _ctypes": (
        "import _imp, importlib.util\n_imp.create_dynamic(importlib.util.find_spec('_ctypes'))"
    ),
    "a thread racing the harness": ("import _thread, os\n_thread.start_new_thread(os._exit, (0,))"),
    "harmless-looking recursion limit": "import sys\nsys.setrecursionlimit(40)",
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_forged_verdict_scores_zero(reward: CodeExecutionReward, name: str) -> None:
    res = reward.run(WRONG + FORGERIES[name], TESTS)
    assert res.reward == 0.0 and res.reason != "passed", res.reason


@pytest.mark.parametrize(
    "name", ["report pass through the audit event", "report from a builtin callable in __str__"]
)
def test_forging_ends_even_a_correct_run_with_zero(reward: CodeExecutionReward, name: str) -> None:
    res = reward.run(CORRECT + FORGERIES[name], TESTS)
    assert res.reward == 0.0 and "forged" in res.reason, res.reason


# ============================================================================================
# Reward hacking that only the in-process gate stops (it guards the nonce and the tests)
# ============================================================================================
#: Walks the object graph to the reporter's closure and writes a pass with the real nonce.
GC_FORGERY = """
import gc, os, types
for obj in gc.get_objects():
    if type(obj) is types.FunctionType and obj.__name__ == 'report':
        cells = dict(zip(obj.__code__.co_freevars, (c.cell_contents for c in obj.__closure__)))
        os.write(cells['verdict_fd'], cells['prefix'] + b'pass \\n')
        os._exit(0)
"""
#: An audit hook of the program's, run inside the reporter's own frame lookup, reads the nonce.
HOOK_FORGERY = """
import os, sys
inside = []
def spy(event, args):
    if event == 'sys._getframe' and not inside:
        inside.append(1)
        for depth in range(1, 8):
            try:
                names = sys._getframe(depth).f_locals
            except ValueError:
                break
            if 'prefix' in names:
                os.write(names['verdict_fd'], names['prefix'] + b'pass \\n')
                os._exit(0)
        inside.pop()
sys.addaudithook(spy)
"""
#: A wrong solver that returns the expected value of the assert calling it: the answer is two
#: constants after the first argument in the caller's code (``assert add(2, 3) == 5``).
READ_THE_TESTS = """
import sys
def caller_code():
    return sys._getframe(2).f_code
def add(a, b):
    consts = [c for c in caller_code().co_consts if type(c) is int]
    return consts[consts.index(a) + 2]
"""
ANSWER_TESTS = "assert add(2, 3) == 5\nassert add(10, 20) == 30\n"
GATED = {
    "walk gc to the nonce": WRONG + GC_FORGERY,
    "an audit hook reads the nonce": WRONG + HOOK_FORGERY,
    "read the answers from the caller's frame": READ_THE_TESTS,
    "read the answers from a traceback's frame": READ_THE_TESTS.replace(
        "    return sys._getframe(2).f_code",
        "    try:\n        raise RuntimeError\n    except RuntimeError as e:\n"
        "        return e.__traceback__.tb_frame.f_back.f_back.f_code",
    ),
    "read the answers from the tests' functions": (
        "def add(a, b):\n"
        "    code = globals()['check'].__code__\n"
        "    consts = [c for c in code.co_consts if type(c) is int]\n"
        "    return consts[consts.index(a) + 2]\n"
    ),
    "walk frames to the harness": WRONG
    + (
        "import sys\nf = sys._getframe()\n"
        "while f.f_back is not None:\n    f = f.f_back\n"
        "f.f_locals['tests_code'] = compile('pass', 'x', 'exec')"
    ),
    "frames from a generator": WRONG + "g = (i for i in ())\nframe = g.gi_frame",
    "tracing": WRONG + "import sys\nsys.settrace(lambda *a: None)",
    "profiling": WRONG + "import sys\nsys.setprofile(lambda *a: None)",
    "building code objects": WRONG + "def f():\n    pass\nf.__code__.replace(co_consts=(1,))",
    "marshal": WRONG + "import marshal\nmarshal.loads(marshal.dumps(1))",
    "ctypes": WRONG + "import ctypes",
}


@pytest.mark.parametrize("name", list(GATED))
def test_gated_attacks_score_zero(guarded: CodeExecutionReward, name: str) -> None:
    tests = ANSWER_TESTS
    if "tests' functions" in name:
        tests = "def check():\n    " + ANSWER_TESTS.replace("\n", "\n    ") + "\ncheck()\n"
    res = guarded.run(GATED[name], tests)
    assert res.reward == 0.0 and res.reason.startswith(("blocked", "failed")), res.reason


@pytest.mark.parametrize(
    "name",
    [
        "walk gc to the nonce",
        "an audit hook reads the nonce",
        "read the answers from the caller's frame",
        "read the answers from a traceback's frame",
    ],
)
def test_gated_attacks_are_real(bare: CodeExecutionReward, name: str) -> None:
    """Canary: without the gate these attacks do win, so the tests above are not vacuous."""
    assert bare.run(GATED[name], ANSWER_TESTS).reward == 1.0


# ============================================================================================
# Escapes: each attempt is followed by a correct solution and must be refused, without a trace
# ============================================================================================
def _home_file() -> str | None:
    """A readable file in the caller's home folder, outside the interpreter's prefix."""
    import sys

    home = Path.home()
    prefix = Path(sys.base_prefix).resolve()
    try:
        for path in sorted(home.iterdir()):
            if path.is_file() and prefix not in path.resolve().parents:
                return str(path)
    except OSError:
        return None
    return None


ESCAPES = {
    "write the host folder": "open({host!r} + '/escaped.txt', 'w').write('x')",
    "write /etc": "open('/etc/escaped.txt', 'w').write('x')",
    "write /usr": "open('/usr/escaped.txt', 'w').write('x')",
    "write the interpreter": "import sys\nopen(sys.base_prefix + '/escaped.txt', 'w').write('x')",
    "write the root": "open('/escaped.txt', 'w').write('x')",
    "read /etc/shadow": "print(open('/etc/shadow').read())",
    "read /etc/passwd": "print(open('/etc/passwd').read())",
    "read the host canary": "print(open({host!r} + '/canary.txt').read())",
    "read a file in the home folder": "print(open({home!r}).read())",
    "read the repository": "import os\nprint(os.listdir({repo!r}))",
    "symlink to /etc": "import os\nos.symlink('/etc', 'e')\nprint(open('e/shadow').read())",
    "fork 50 times": "import os\nfor _ in range(50):\n    if os.fork() == 0:\n        os._exit(0)",
    "subprocess id": "import subprocess\nprint(subprocess.run(['id'], capture_output=True))",
    "os.system": "import os\nassert os.system('id > /tmp/id.txt') == 0",
    "posix_spawn": "import os\nos.posix_spawn('/usr/bin/id', ['id'], {{}})",
    "exec a shell": "import os\nos.execv('/bin/sh', ['sh', '-c', 'id; touch {host}/exec.txt'])",
    "threads": "import threading\nthreading.Thread(target=print).start()",
    "tcp to the host": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "unix socket": "import socket\nsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)",
    "kill everything": "import os\nos.kill(-1, 9)",
    "kill the parent": "import os\nos.kill(os.getppid(), 9)",
    "setuid root": "import os\nos.setuid(0)",
    "setgid root": "import os\nos.setgid(0)",
    "own memory through /proc": "open('/proc/self/mem', 'rb')",
    "host processes through /proc": "open('/proc/1/environ', 'rb')",
    "a block device": "import os, stat\nos.mknod('disk', stat.S_IFBLK | 0o600, os.makedev(8, 0))",
    "a raw disk": "open('/dev/sda', 'rb')",
    "fill the disk": "open('big', 'wb').write(b'x' * (64 * 2 ** 20))",
    "exhaust memory": "x = bytearray(10 * 2 ** 30)",
    "change the hostname": "import socket\nsocket.sethostname('pwned')",
    "sqlite extension": "import sqlite3\nsqlite3.connect(':memory:').load_extension('/tmp/x.so')",
}


@pytest.fixture
def host(tmp_path: Path) -> Path:
    (tmp_path / "canary.txt").write_text("CANARY-" + uuid.uuid4().hex)
    return tmp_path


@pytest.mark.parametrize("name", list(ESCAPES))
def test_escape_is_refused_without_a_trace(
    reward: CodeExecutionReward, name: str, host: Path
) -> None:
    home = _home_file()
    if "{home" in ESCAPES[name] and home is None:
        pytest.skip("no file in the home folder to try")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.05)
    before = {p.name for p in host.iterdir()}
    repo = str(Path(__file__).resolve().parents[2])
    try:
        attack = ESCAPES[name].format(
            host=str(host), home=home, repo=repo, port=server.getsockname()[1]
        )
        res = reward.run(attack + "\n" + CORRECT, TESTS)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert res.reward == 0.0, (res.reason, res.stdout)
    assert {p.name for p in host.iterdir()} == before
    canary = (host / "canary.txt").read_text()
    assert canary not in res.stdout + res.stderr
    assert "uid=0" not in res.stdout + res.stderr
    for path in ("/etc/escaped.txt", "/usr/escaped.txt", "/escaped.txt", "/tmp/id.txt"):
        assert not os.path.exists(path)


def test_scratch_files_vanish_with_the_run(reward: CodeExecutionReward) -> None:
    name = f"/tmp/tiltsample-escape-{uuid.uuid4().hex}"
    res = reward.run(
        CORRECT + f"open({name!r}, 'w').write('x')\nassert open({name!r}).read() == 'x'", TESTS
    )
    assert res.reward == 1.0  # the sandbox's /tmp is private: writing there is allowed ...
    assert not os.path.exists(name)  # ... and leaves nothing on the host


def test_concurrent_runs_are_isolated(guarded: CodeExecutionReward) -> None:
    programs = {
        i: CORRECT
        + "import os\nassert not os.path.exists('shared')\n"
        + f"open('shared', 'w').write('{i}')\nassert open('shared').read() == '{i}'"
        for i in range(4)
    }
    r = CodeExecutionReward(lambda x: programs[x[0]], lambda p: TESTS, timeout=3.0, max_workers=2)
    assert r((0,), [(i,) for i in range(4)]).tolist() == [1.0] * 4


def test_wall_clock_and_cpu(reward: CodeExecutionReward) -> None:
    fast = CodeExecutionReward(lambda x: None, timeout=1.0, audit_hook=reward.audit_hook)
    res = fast.run(CORRECT + "while True:\n    pass", TESTS)
    assert res.reward == 0.0 and res.reason.startswith("wall-clock limit")
    res = fast.run(CORRECT, TESTS + "while True:\n    pass")  # the tests hang after passing
    assert res.reward == 0.0 and res.reason.startswith("wall-clock limit")
