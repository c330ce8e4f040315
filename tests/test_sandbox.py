"""The sandbox contains hostile programs, labels how each ended, and leaves nothing behind."""

from __future__ import annotations

import os
import time

import pytest

from gptjax.evals import sandbox, sandbox_child

FAST = sandbox.Limits(timeout=1.0, memory_mb=256, output_mb=1.0)


def _sandbox_processes() -> list[int]:
    """Live processes running the sandbox's child script."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sandbox_child.py" in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


@pytest.fixture
def victim(tmp_path):
    """A file and a folder the programs try to damage, plus the sandbox's own temp root."""
    target = tmp_path / "victim"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    root = tmp_path / "sandboxes"
    root.mkdir()
    return target, root


# name -> (program, the start of the result it must get)
HOSTILE = {
    "infinite loop": ("while True:\n    pass", "timed out"),
    "sleeps forever": ("import time\ntime.sleep(1000)", "timed out"),
    "allocates 50 GB": ("x = bytearray(50 * 2**30)", "failed: out of memory"),
    "grows until memory runs out": (
        "x = []\nwhile True:\n    x.append(bytearray(2**24))",
        "failed: out of memory",
    ),
    "forks in a loop": ("import os\nwhile True:\n    os.fork()", "failed: Refused"),
    "multiprocessing": (
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "failed: Refused",
    ),
    "subprocess": ("import subprocess\nsubprocess.run(['sleep', '100'])", "failed: Refused"),
    "os.system": ("import os\nos.system('touch {target}/pwned')", "failed: Refused"),
    "ctypes fork": ("import ctypes\nctypes.CDLL(None).fork()", "failed: Refused"),
    "kills init": ("import os, signal\nos.kill(1, signal.SIGKILL)", "failed: Refused"),
    "removes a file": ("import os\nos.remove('{target}/keep.txt')", "failed: Refused"),
    "unlinks by pathlib": (
        "import pathlib\npathlib.Path('{target}/keep.txt').unlink()",
        "failed: Refused",
    ),
    "rmtree": ("import shutil\nshutil.rmtree('{target}')", "failed: Refused"),
    "overwrites a file": ("open('{target}/keep.txt', 'w').write('gone')", "failed: Refused"),
    "creates a file outside": (
        "import os\nos.open('{target}/new', os.O_WRONLY | os.O_CREAT)",
        "failed: Refused",
    ),
    "renames": ("import os\nos.rename('{target}/keep.txt', 'stolen')", "failed: Refused"),
    "opens a socket": (
        "import socket\nsocket.create_connection(('10.0.0.1', 80))",
        "failed: Refused",
    ),
    "reads a secret": (
        "import os\nassert 'GPTJAX_SANDBOX_SECRET' not in os.environ, 'leaked'\n"
        "raise RuntimeError('env: ' + ','.join(sorted(os.environ)))",
        "failed: RuntimeError: env: HOME,LANG,LC_ALL,OMP_NUM_THREADS,PATH,TMPDIR",
    ),
    "prints gigabytes": ("while True:\n    print('x' * 2**20)", "failed: output limit exceeded"),
    "calls sys.exit(0)": ("import sys\nsys.exit(0)", "failed: SystemExit: 0"),
    "calls os._exit(0)": ("import os\nos._exit(0)", "failed: exited with code 0 without"),
    "raises at import": ("import no_such_module_xyz", "failed: ModuleNotFoundError"),
    "recursion": ("def f():\n    return f()\nf()", "failed: RecursionError"),
    "segfaults": ("import faulthandler\nfaulthandler._sigsegv()", "failed: crashed (SIGSEGV"),
    "adds an audit hook, then ctypes": (  # the new hook is silently not added
        "import sys\nsys.addaudithook(lambda *a: None)\nimport ctypes",
        "failed: Refused",
    ),
}


def test_hostile_programs_are_contained_and_labelled(victim, monkeypatch):
    target, root = victim
    monkeypatch.setenv("GPTJAX_SANDBOX_SECRET", "hunter2")
    names = list(HOSTILE)
    programs = [HOSTILE[n][0].format(target=target) for n in names]
    start = time.monotonic()
    outcomes = sandbox.run_programs(programs, FAST, workers=2, progress=False, tmp_root=root)
    elapsed = time.monotonic() - start
    for name, outcome in zip(names, outcomes):
        expected = HOSTILE[name][1]
        assert not outcome.passed, name
        assert outcome.result.startswith(expected), f"{name}: {outcome.result!r}"
    # nothing outside the sandbox changed, nothing is left behind
    assert sorted(os.listdir(target)) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "precious"
    assert os.listdir(root) == []
    assert _sandbox_processes() == []
    assert elapsed < 60, f"{len(names)} programs took {elapsed:.0f} s"


def test_passing_and_failing_programs():
    ok = "def f(x):\n    return x + 1\nassert f(1) == 2\nprint('output is fine')"
    outcomes = sandbox.run_programs(
        [ok, "assert 1 + 1 == 3, 'arithmetic'", "syntax error here"], FAST, progress=False
    )
    assert [o.passed for o in outcomes] == [True, False, False]
    assert outcomes[0].result == "passed"
    assert outcomes[1].result == "failed: AssertionError: arithmetic"
    assert outcomes[2].result.startswith("failed: SyntaxError")


def test_programs_may_use_their_own_directory():
    program = (
        "import os, tempfile\nopen('notes.txt', 'w').write('x')\n"
        "assert open('notes.txt').read() == 'x'\n"
        "with tempfile.NamedTemporaryFile(dir='.') as f:\n    f.write(b'y')\n"
        "assert os.environ['HOME'] == os.getcwd()"
    )
    assert sandbox.run_program(program, FAST).result == "passed"


def test_threads_and_output_survive_the_exit():
    program = "import threading, time\nthreading.Thread(target=time.sleep, args=(100,)).start()"
    assert sandbox.run_program(program, FAST).result == "passed"  # not a time-out


def test_classify_signals_and_exit_codes():
    limits = sandbox.Limits()
    assert sandbox.classify(None, -24, False, limits) == "timed out (CPU time limit)"  # SIGXCPU
    assert sandbox.classify(None, -9, False, limits) == "failed: killed by SIGKILL"
    assert sandbox.classify(None, 3, False, limits).startswith("failed: exited with code 3")
    assert sandbox.classify({"status": "passed"}, 0, True, limits) == "timed out"
    report = {"status": "failed", "detail": "ValueError: x"}
    assert sandbox.classify(report, 0, False, limits) == "failed: ValueError: x"


def test_limits_reject_nonsense():
    for bad in (dict(timeout=0), dict(memory_mb=1), dict(output_mb=-1)):
        with pytest.raises(ValueError, match="must be"):
            sandbox.Limits(**bad)


def test_audit_hook_allows_reads_and_the_sandbox_only(tmp_path):
    hook = sandbox_child.audit_hook(str(tmp_path))
    hook("open", ("/etc/passwd", "r", os.O_RDONLY))
    hook("open", (str(tmp_path / "a.txt"), "w", os.O_WRONLY | os.O_CREAT))
    hook("os.remove", (str(tmp_path / "a.txt"), -1))
    for event, args in (
        ("open", ("/etc/passwd", "a", os.O_APPEND)),
        ("open", (str(tmp_path / ".." / "escape"), None, os.O_CREAT)),
        ("os.rename", (str(tmp_path / "a"), "/tmp/b", -1, -1)),
        ("os.fork", ()),
        ("ctypes.dlopen", ("libc.so.6",)),
        ("import", ("ctypes", None, [], [], [])),
    ):
        with pytest.raises(sandbox_child.Refused):
            hook(event, args)


def test_others_can_read(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert not sandbox_child.others_can_read(str(private))
    private.chmod(0o755)
    assert sandbox_child.others_can_read(str(private)) == sandbox_child.others_can_read(
        str(tmp_path)
    )
