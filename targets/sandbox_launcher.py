"""The sandbox's launcher: a standalone script that builds the operating-system boundary.

Run by :class:`~tiltsample.targets.sandbox.CodeExecutionReward` as
``python -I -S sandbox_launcher.py launch CONFIG_FD VERDICT_FD LIMITS`` with the caller's
credentials. It enters new mount/pid/net/ipc/uts (+ user) namespaces, forks the sandbox's init
(private read-only root via ``pivot_root``, uid 65534, no capabilities), which forks the harness
process: resource limits, ``no_new_privs``, a seccomp filter, then ``exec`` of a fresh interpreter
running :mod:`~tiltsample.targets.sandbox_harness` with ``-c`` (the files of this folder are not
visible inside the sandbox). Everything after ``pivot_root`` runs inside the boundary.

**Self-contained:** under ``-I -S`` the ``tiltsample`` package is not importable, so this module
imports only the standard library and no other module of the project. What it shares with the
other processes travels as data: the harness's source is read from the sibling file
``sandbox_harness.py`` before any namespace is entered, the fixed environment comes from the parent
in ``LIMITS`` (``"env"``) and the hidden modules go to the harness on its command line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NoReturn

#: The unprivileged uid/gid the program runs as (``nobody``).
SANDBOX_UID = 65534
#: Exit status of a launcher that could not build the sandbox (nothing untrusted ran).
_SETUP_FAILED = 97
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

    ``source`` is the text of ``sandbox_harness.py``: the harness runs it with ``python -c`` (the
    file itself is not visible inside the sandbox).
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
        argv.append(",".join(_HIDDEN_MODULES))
        os.execve(plan["exe"], argv, limits["env"])
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


def _main(argv: list[str]) -> None:
    """Entry point of the launcher (``launch``); reads the harness's source for ``python -c``."""
    if argv[:1] == ["launch"]:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "sandbox_harness.py"), encoding="utf-8") as f:
            source = f.read()
        _launch(int(argv[1]), int(argv[2]), json.loads(argv[3]), source)
    else:
        sys.exit("usage: sandbox_launcher.py launch ...")


if __name__ == "__main__":
    _main(sys.argv[1:])
