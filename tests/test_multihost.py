"""A real two-process `jax.distributed` run on localhost equals one process with 8 devices.

Two `gptjax train` processes (4 fake CPU devices each, gloo collectives) join through
`--coordinator_address/--num_processes/--process_id` and train one 8-device mesh (fsdp preset,
data=2 x fsdp=4), each loading only its half of every batch. The run is split in two
invocations (`--stop_after`), so the second restores the first's orbax checkpoint from both
processes. The losses must equal an uninterrupted single-process run on 8 devices (this pytest
process, see conftest.py), only process 0 may write logs, and the checkpoints must restore here.
"""

import glob
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from gptjax.config import ModelConfig
from gptjax.data.config import DataConfig
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training.metrics import read_metrics
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig, abstract_state, make_trainer
from tests.conftest import copy_stdlib

# One set of values, used both as dataclass fields (reference run) and as gin bindings (CLI).
MODEL = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=300, max_len=32)
# Every run stops early (`stop_after`), so no run reaches `steps`: that keeps the final eval and
# sample preview (tested in test_train.py) out of this test's time budget.
TRAIN = dict(
    steps=50,
    batch_size=8,
    seq_len=16,
    log_every=1,
    eval_every=1000,
    checkpoint_every=3,
    compilation_cache_dir=None,
)
OPT = dict(peak_lr=3e-3, warmup_steps=2)
MESH = dict(shape={"data": 2, "fsdp": 4, "tensor": 1}, rules="fsdp")
N_PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 150  # per invocation; a healthy one takes ~15-30 s on 2 loaded cores


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A real corpus (20 stdlib modules as text files) and a data_dir shared by all runs."""
    root = tmp_path_factory.mktemp("mh_corpus")
    copy_stdlib(root, 20)
    return {
        "dataset": str(root / "*.txt"),
        "tokenizer": "byte",
        "data_dir": str(tmp_path_factory.mktemp("mh_data")),
    }


def _bindings(data: dict) -> list[str]:
    groups = {
        "ModelConfig": MODEL,
        "TrainConfig": TRAIN,
        "OptimizerConfig": OPT,
        "MeshConfig": MESH,
        "DataConfig": data,
    }
    return [f"{name}.{k} = {v!r}" for name, kw in groups.items() for k, v in kw.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    workdir: str, data: dict, extra: list[str], n_processes: int = N_PROCESSES
) -> list[str]:
    """Run `gptjax train` as `n_processes` processes of one job (8 devices in all); return their
    outputs. They compile at XLA's default optimisation level (the suite's -O0 reorders float
    sums, beyond this test's tolerance between one and two processes).

    Bounded: every process is killed when any one fails or the timeout passes, so a process
    blocked in a collective (its peer died) cannot hang the test suite.
    """
    port = _free_port()
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // n_processes}",
    }
    args = [
        sys.executable,
        "-m",
        "gptjax",
        "train",
        f"--workdir={workdir}",
    ]
    if n_processes > 1:
        args += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n_processes}"]
    args += [f"--gin_bindings={b}" for b in _bindings(data)] + extra
    procs = [
        subprocess.Popen(
            args + ([f"--process_id={i}"] if n_processes > 1 else []),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n_processes)
    ]
    outputs = [""] * n_processes
    try:
        for i, p in enumerate(procs):
            outputs[i], _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for i, p in enumerate(procs):
            rest, _ = p.communicate()
            outputs[i] += rest or ""
    for i, p in enumerate(procs):
        assert p.returncode == 0, (
            f"process {i} exited with {p.returncode} (timeout {TIMEOUT_S}s):\n{outputs[i][-3000:]}"
        )
    return outputs


def _configs(data: dict) -> dict:
    return dict(
        model_cfg=ModelConfig(**MODEL),
        train_cfg=TrainConfig(**TRAIN),
        opt_cfg=OptimizerConfig(**OPT),
        data_cfg=DataConfig(**data),
        mesh_cfg=sharding.MeshConfig(**MESH),
    )


def _train_losses(workdir: str) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(workdir) if "train/loss" in r]


def _restore(workdir: str, trainer, step: int | None = None):
    with ckpt_lib.CheckpointManager(workdir, read_only=True) as manager:
        return manager.restore(abstract_state(trainer), step=step)


def test_two_processes_equal_one_process_with_eight_devices(data, tmp_path):
    assert jax.process_count() == 1 and jax.device_count() == 8
    # Reference: one process, 8 devices, uninterrupted (also prepares the shared dataset, so
    # the two processes below only read it).
    ref = str(tmp_path / "one_process")
    _launch(ref, data, ["--stop_after=6"], n_processes=1)
    ref_losses = _train_losses(ref)
    assert [s for s, _ in ref_losses] == list(range(1, 7))

    multi = str(tmp_path / "two_processes")
    # A persistent compilation cache lets the second invocation skip the first one's compile.
    cache = [f"--gin_bindings=TrainConfig.compilation_cache_dir = '{tmp_path / 'jax_cache'}'"]
    _launch(multi, data, ["--stop_after=3"] + cache)
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3"]
    outputs = _launch(multi, data, ["--stop_after=3"] + cache)  # both processes resume from step 3

    # Only process 0 logs: a second writer would duplicate every row of the shared workdir.
    losses = _train_losses(multi)
    assert [s for s, _ in losses] == list(range(1, 7)), losses
    np.testing.assert_allclose([x for _, x in losses], [x for _, x in ref_losses], rtol=1e-5)
    assert len(glob.glob(os.path.join(multi, "tensorboard", "events.*"))) == 2  # one per run
    for name in ("config.json", "config.gin", "summary.json", "tokenizer.json"):
        assert os.path.exists(os.path.join(multi, name)), name
    assert all("done: step 6" in out for out in outputs), outputs[0][-2000:]
    assert "train:" in outputs[0] and "train:" not in outputs[1]  # process 0's progress bar

    # Both checkpoints restore here, onto the same 8-device mesh in one process, and equal the
    # reference's parameters at the same step.
    assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3", "6"]
    cfgs = _configs(data)
    mesh = sharding.make_mesh(cfgs["mesh_cfg"])
    trainer = make_trainer(
        cfgs["model_cfg"],
        cfgs["opt_cfg"],
        TRAIN["steps"],
        mesh,
        logical.logical_axis_rules(MESH["rules"]),
        TRAIN["batch_size"],
    )
    for step in (3, 6):
        got_step, got, meta = _restore(multi, trainer, step)
        assert got_step == step and meta["data"]["window"] == step * TRAIN["batch_size"]
    _, want, _ = _restore(ref, trainer, 6)
    for a, b in zip(
        jax.tree.leaves(jax.device_get(got.params)), jax.tree.leaves(jax.device_get(want.params))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(got.step) == 6
