"""Preemption on several hosts: one process gets SIGTERM, every process stops at the same step.

On a pod the scheduler often signals one host first, and orbax's multi-process save needs every
process to take part, so `PreemptionHandler.should_stop(step)` must give the same answer on
every process. Two real `jax.distributed` processes on CPU (localhost coordinator, gloo):
first the handler alone (tests/preemption_worker.py), then `gptjax train` end to end: the agreed
step is saved by both, both exit 0, and a rerun resumes from it and reproduces an uninterrupted
run's losses exactly. Every subprocess is bounded by a timeout, so a hang fails the test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gptjax.training import checkpoint as ckpt_lib
from gptjax.training.metrics import read_metrics
from tests.conftest import copy_stdlib

N_PROCESSES = 2
WORKER = os.path.join(os.path.dirname(__file__), "preemption_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `gptjax train` end to end: a tiny model, its params sharded over both processes (fsdp=2).
MODEL = dict(n_layers=1, d_model=16, n_heads=2, d_ff=32, vocab_size=300, max_len=16)
# Neither `steps` nor checkpoint_every is reached: the only checkpoint is the preemption's.
TRAIN = dict(
    steps=10_000, batch_size=8, seq_len=8, log_every=1, eval_every=10**6, checkpoint_every=10**6
)
OPT = dict(peak_lr=3e-3, warmup_steps=2)  # so the compared steps really update the params
MESH = dict(shape={"data": 1, "fsdp": 2, "tensor": 1}, rules="fsdp")
LOCAL_DEVICES = 1
CHECK_EVERY = ckpt_lib.PREEMPTION_CHECK_EVERY  # install_preemption_handler's, the loop's
SAFETY_STOP = 500  # --stop_after for the preempted run: a broken agreement ends, not hangs
TIMEOUT_S = 120  # per job; a healthy one takes ~10-20 s on 2 loaded cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(local_devices: int) -> dict:
    """CPU only, N fake devices, and this checkout's gptjax (also for the worker script)."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": path,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}",
    }


class Job:
    """N_PROCESSES processes of one `jax.distributed` job, output to files (never a full pipe).

    `wait()` is bounded: past the deadline every process still running is killed, so a process
    blocked in a collective (its peer gone, or the two disagreeing on a step) fails the test.
    """

    def __init__(self, argv: list[str], tmp_path, name: str, local_devices: int, timeout_s: float):
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.logs = [tmp_path / f"{name}.{i}.log" for i in range(N_PROCESSES)]
        self.procs = []
        for i, log in enumerate(self.logs):
            with open(log, "w") as out:
                self.procs.append(
                    subprocess.Popen(
                        argv(i), env=_env(local_devices), stdout=out, stderr=subprocess.STDOUT
                    )
                )

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def wait(self) -> list[str]:
        """Each process's output, once all exited; asserts every one exited 0."""
        try:
            for p in self.procs:
                p.wait(timeout=max(self.deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        outputs = [log.read_text() for log in self.logs]
        for i, p in enumerate(self.procs):
            assert p.returncode == 0, (
                f"process {i} exited with {p.returncode} (timeout "
                f"{self.timeout_s}s):\n{outputs[i][-3000:]}"
            )
        return outputs

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _last_json(output: str) -> dict:
    return json.loads([line for line in output.splitlines() if line.startswith("{")][-1])


# ----------------------------------------------------------------------------------------------
# The handler alone


@pytest.mark.parametrize("check_every, want_stop", [(1, 3), (4, 4)])
def test_one_signalled_process_stops_both_at_the_same_step(tmp_path, check_every, want_stop):
    """Process 1 signals itself at step 3; with check_every=k both stop at the next multiple."""
    port = _free_port()
    job = Job(
        lambda i: [sys.executable, WORKER, str(port), str(i), str(check_every), "1", "3"],
        tmp_path,
        "handler",
        local_devices=2,
        timeout_s=60,
    )
    results = [_last_json(out) for out in job.wait()]
    assert [r["stop_step"] for r in results] == [want_stop] * N_PROCESSES, results
    assert [r["requested"] for r in results] == [False, True]  # the flag stays per process
    assert results[1]["signum"] == signal.SIGTERM


# ----------------------------------------------------------------------------------------------
# `gptjax train` end to end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small real corpus (stdlib modules as text, byte tokens) and a shared data_dir."""
    root = tmp_path_factory.mktemp("preempt_corpus")
    copy_stdlib(root, 10)
    return {
        "dataset": str(root / "*.txt"),
        "tokenizer": "byte",
        "data_dir": str(tmp_path_factory.mktemp("preempt_data")),
    }


def _train(workdir, data: dict, tmp_path, name: str, extra: list[str]) -> Job:
    """Start `gptjax train` as the two processes of one job (returns at once)."""
    groups = {
        "ModelConfig": MODEL,
        "OptimizerConfig": OPT,
        "MeshConfig": MESH,
        "DataConfig": data,
        "TrainConfig": {**TRAIN, "compilation_cache_dir": str(tmp_path / "jax_cache")},
    }
    bindings = [f"{g}.{k} = {v!r}" for g, kw in groups.items() for k, v in kw.items()]
    port = _free_port()
    argv = [
        sys.executable,
        "-m",
        "gptjax",
        "train",
        f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={N_PROCESSES}",
    ]
    argv += [f"--gin_bindings={b}" for b in bindings] + extra
    return Job(lambda i: argv + [f"--process_id={i}"], tmp_path, name, LOCAL_DEVICES, TIMEOUT_S)


def _signal_once_training(job: Job, workdir, process: int, min_step: int) -> int:
    """SIGTERM `process` only, once process 0's metrics show `min_step`; returns the step seen.

    The handler is installed before the first step, so the signal is never the default kill.
    """
    while not job.expired():
        rows = read_metrics(str(workdir))
        if rows and rows[-1]["step"] >= min_step:
            job.procs[process].send_signal(signal.SIGTERM)
            return rows[-1]["step"]
        if any(p.poll() is not None for p in job.procs):
            break
        time.sleep(0.05)
    job.kill()
    pytest.fail(f"training never reached step {min_step}:\n{job.logs[0].read_text()[-3000:]}")


def _rows(workdir) -> list[dict]:
    """metrics.jsonl without the timing columns, which differ between runs."""
    return [
        {k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}
        for r in read_metrics(str(workdir))
    ]


def test_train_preempted_on_one_process_saves_one_agreed_step_and_resumes_exactly(data, tmp_path):
    run = tmp_path / "preempted"
    job = _train(run, data, tmp_path, "preempted", [f"--stop_after={SAFETY_STOP}"])
    seen = _signal_once_training(job, run, process=1, min_step=3)
    outputs = job.wait()  # both exited 0: process 0 was never signalled, yet stopped

    steps = sorted(int(s) for s in os.listdir(run / "checkpoints"))
    assert len(steps) == 1, steps  # one save (the params are sharded: both wrote theirs)
    stop = steps[0]
    for i in range(N_PROCESSES):
        assert (run / "checkpoints" / str(stop) / "state" / f"ocdbt.process_{i}").is_dir()
    # At the first check after the signal (process 1 may be a step or two past `seen`).
    assert stop % CHECK_EVERY == 0 and seen <= stop <= seen + 2 * CHECK_EVERY, (seen, stop)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preempted"] and summary["end_step"] == stop, summary
    assert "Received SIGTERM" in outputs[1] and "Received SIGTERM" not in outputs[0]
    assert all(f"processes stop at step {stop}" in out for out in outputs)
    assert [r["step"] for r in _rows(run)] == list(range(1, stop + 1))

    resumed = _train(run, data, tmp_path, "resumed", ["--stop_after=3"]).wait()
    assert all(f"resumed from step {stop}" in out for out in resumed), resumed[0][-2000:]
    straight = tmp_path / "straight"
    _train(straight, data, tmp_path, "straight", [f"--stop_after={stop + 3}"]).wait()
    got, want = _rows(run), _rows(straight)
    assert [r["step"] for r in want] == list(range(1, stop + 4))
    assert got == want  # exactly: the resumed steps included
