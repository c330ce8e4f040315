"""gs:// workdirs, offline: a run's files (config, tokenizer, metrics, TensorBoard, orbax
checkpoints) written to and read back from a local Cloud Storage emulator
(`gcp-storage-emulator`, started here in a subprocess on a free port).

Every client is pointed at it through its own emulator setting: gcsfs (etils.epath's gs://
backend when TensorFlow is absent) and google-cloud-storage (tensorboardX's gs:// writer) read
STORAGE_EMULATOR_HOST; tensorstore (orbax's arrays) reads TENSORSTORE_GCS_HTTP_URL and takes
GOOGLE_AUTH_TOKEN_FOR_TESTING as its credential. What cannot work on gs:// (array_record
shards, so the data dir) gets a clear error, checked here.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest

pytest.importorskip(
    "gcp_storage_emulator", reason="gs:// tests need the gcp-storage-emulator package"
)
gcsfs = pytest.importorskip("gcsfs", reason="etils.epath's gs:// backend needs gcsfs")
import fsspec  # noqa: E402  (after the skips: gcsfs brings it)
from etils import epath  # noqa: E402

from gptjax.config import ModelConfig  # noqa: E402
from gptjax.data.config import DataConfig  # noqa: E402
from gptjax.parallel import mesh as sharding  # noqa: E402
from gptjax.training.loop import train  # noqa: E402
from gptjax.training.metrics import ObjectLog, read_metrics  # noqa: E402
from gptjax.training.optimizer import OptimizerConfig  # noqa: E402
from gptjax.training.step import TrainConfig  # noqa: E402
from gptjax.training.workdir import load_run  # noqa: E402

BUCKET = "gptjax-test"
_EMULATORS: list = []
PROTOCOLS = ("gs", "gcs")  # etils.epath asks fsspec for "gcs"
MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=300, max_len=32)
ALL_DEVICES = sharding.MeshConfig(shape={"data": -1, "fsdp": 1, "tensor": 1})  # 8 fake CPUs


# gcp-storage-emulator with one fix: its media downloads lack the x-goog-generation header
# that real Cloud Storage sends. tensorstore takes an object's generation from it, so without it
# every read has generation 0, and OCDBT's next conditional manifest write (orbax commits a
# checkpoint's arrays in several batches) fails with "Malformed StorageGeneration".
EMULATOR = """
from gcp_storage_emulator.handlers import objects

def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:
        return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]

_download, objects.download = objects.download, download  # before server.py's routing table

import os, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
from gcp_storage_emulator.__main__ import main
main({args})
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _emulator_env(url: str):
    """Point gcsfs, google-cloud-storage and tensorstore at `url`; undo it after."""
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = {p: fsspec.config.conf.get(p) for p in PROTOCOLS}
    os.environ.update(env)
    # No credentials to look for. And gcsfs's default class (ExtendedGcsFileSystem) asks
    # the Storage Control gRPC API for each bucket's layout, which the emulator lacks
    # (a 60 s timeout per call): use the plain JSON-API client.
    for p in PROTOCOLS:
        fsspec.config.conf[p] = {"token": "anon"}
    _use_gcsfs(gcsfs.core.GCSFileSystem)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for p, conf in saved_conf.items():
            if conf is None:
                fsspec.config.conf.pop(p, None)
            else:
                fsspec.config.conf[p] = conf
        _use_gcsfs(gcsfs.GCSFileSystem)


def _use_gcsfs(cls) -> None:
    """Make `cls` what gs:// paths open, also for etils.epath, which caches its filesystem."""
    for p in PROTOCOLS:
        fsspec.register_implementation(p, cls, clobber=True)
    cls.clear_instance_cache()
    epath.backend.fsspec_backend._get_filesystem.cache_clear()  # etils' (private) cache


@pytest.fixture(scope="module")
def bucket():
    """gs://BUCKET on a fresh in-memory emulator, which exits with this process.

    Not before: tensorboardX's gs:// writer is held by an atexit hook until the interpreter
    shuts down, and then (its __del__) uploads its event file once more, retrying for 120 s
    if the store is gone. The emulator exits when its stdin, this process's pipe, closes.
    """
    port = _free_port()
    args = ["start", "--port", str(port), "--in-memory", "--default-bucket", BUCKET, "--quiet"]
    cmd = [sys.executable, "-c", EMULATOR.format(args=args)]
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://localhost:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"the storage emulator exited with {proc.returncode}")
                time.sleep(0.05)
        else:
            pytest.fail(f"the storage emulator did not answer at {url}")
    except BaseException:
        proc.kill()
        raise
    _EMULATORS.append(proc)  # kept: it runs until this process exits
    with _emulator_env(url):
        yield epath.Path(f"gs://{BUCKET}")


def _configs(corpus, tmp_path):
    train_cfg = TrainConfig(
        steps=4,
        batch_size=8,
        seq_len=16,
        log_every=1,
        eval_every=2,
        eval_batches=1,
        checkpoint_every=2,
        compilation_cache_dir=str(tmp_path / "jax_cache"),
    )
    return dict(
        model_cfg=MODEL,
        train_cfg=train_cfg,
        opt_cfg=OptimizerConfig(peak_lr=3e-3, warmup_steps=2),
        data_cfg=DataConfig(dataset=corpus, tokenizer="byte", data_dir=str(tmp_path / "data")),
        mesh_cfg=ALL_DEVICES,
    )


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def test_a_gs_workdir_trains_resumes_and_loads_as_a_local_one(bucket, corpus, tmp_path):
    """Two invocations on gs:// (stopped at step 2, resumed to 4) give the losses and final
    params of one uninterrupted local run, and leave every run file in the bucket."""
    local = str(tmp_path / "local")
    train(local, **_configs(corpus, tmp_path))
    remote = f"gs://{BUCKET}/run"
    first = train(remote, stop_after=2, **_configs(corpus, tmp_path))
    second = train(remote, **_configs(corpus, tmp_path))
    assert (first["end_step"], second["start_step"], second["end_step"]) == (2, 2, 4)

    run = bucket / "run"
    for name in ("config.gin", "config.json", "tokenizer.json", "summary.json"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # The metrics of both invocations: a gs:// object cannot be appended to (ObjectLog).
    assert sorted(_losses(remote)) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(_losses(remote).values()), list(_losses(local).values()))

    cfg, params, tokenizer, configs, step = load_run(remote)
    _, local_params, local_tokenizer, _, _ = load_run(local)
    assert step == 4 and cfg == MODEL and configs["train"].steps == 4
    assert tokenizer.fingerprint == local_tokenizer.fingerprint
    jax.tree.map(np.testing.assert_array_equal, params, local_params)


def test_object_log_keeps_earlier_rows_and_uploads_on_close(bucket):
    path = bucket / "log" / "metrics.jsonl"
    log = ObjectLog(path, every_s=3600)
    log.write("a\n")
    log.flush()  # the first flush uploads
    log.write("b\n")
    log.flush()  # within every_s: kept here
    assert path.read_text() == "a\n"
    log.close()
    again = ObjectLog(path)
    again.write("c\n")
    again.close()
    assert path.read_text() == "a\nb\nc\n"


def test_a_gs_data_dir_is_refused_with_the_mount_route(bucket, monkeypatch):
    """array_record opens files with POSIX calls only, so TFDS shards cannot live on gs://."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(f"gs://{BUCKET}/data/x.array_record", "")
    assert not writer.ok()  # it opened "gs://..." as a local file name
    with pytest.raises(RuntimeError, match="open\\(\\) failed: No such file or directory"):
        writer.write(b"record")
    with pytest.raises(ValueError, match="DataConfig.data_dir=.*gcsfuse"):
        DataConfig(data_dir=f"gs://{BUCKET}/data")
    monkeypatch.setenv("GPTJAX_DATA_DIR", f"gs://{BUCKET}/data")
    with pytest.raises(ValueError, match=r"\$GPTJAX_DATA_DIR=.*mounted path"):
        _ = DataConfig().resolved_data_dir
