"""Training metrics: model FLOPs per token, per-device peak FLOP/s, MFU, and the writers.

MFU (model FLOPs utilisation, PaLM: Chowdhery et al. 2022, appendix B) is the
model FLOP/s a run achieves divided by the peak FLOP/s of its devices. Both
halves are explicit here, because either one wrong makes the ratio a fiction:

* model FLOPs are counted from each family's layer shapes (`flops_per_token`),
  matmul by matmul, so a seq2seq or an untied head is counted as it runs;
* peaks come from vendor datasheets, looked up by the exact `device_kind` JAX
  reports (`peak_flops`). A device with no published peak (a CPU, or a kind
  not in the table) has none: MFU is then None, never a made-up number. Give
  `TrainConfig.peak_flops` to override (on any device, CPU included).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from gptjax.config import ModelConfig
from gptjax.models import family as family_lib

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------- peaks

# Dense (not 2:4-sparse) bf16 peak FLOP/s per *JAX device*, keyed by the exact
# `device.device_kind` (matched case-insensitively after stripping; never by
# substring, so "NVIDIA L40S" is not an "NVIDIA L4" and "TPU v5" not "TPU v5 lite").
PEAK_FLOPS: dict[str, float] = {
    # Google Cloud TPU system-architecture pages, bf16 per chip. A v2/v3 chip has two
    # TensorCores that JAX reports as two devices, so a device is half a chip; from v4
    # on, a chip's TensorCores form one "megacore" device. XLA's own device tables accept
    # "TPU v5p" / "TPU v5e" besides the names JAX reports, so those are aliases here.
    "TPU v2": 45e12 / 2,  # 45 TFLOP/s per chip
    "TPU v3": 123e12 / 2,  # 123 TFLOP/s per chip
    "TPU v4": 275e12,
    "TPU v5": 459e12,  # v5p: JAX's device_kind has no "p"
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    # NVIDIA datasheets, BF16 tensor core. The sheets' headline figures assume 2:4
    # sparsity; the dense peak is half of them. JAX's device_kind is the CUDA device name.
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5: 1,979 sparse
    "NVIDIA H100 PCIe": 756e12,  # 1,513 sparse
    "NVIDIA H100 NVL": 835e12,  # 1,671 sparse
    "NVIDIA H200": 989e12,  # H200 SXM: 1,979 sparse
    "NVIDIA H200 NVL": 835e12,  # 1,671 sparse
    "NVIDIA GH200 480GB": 989e12,  # Grace Hopper's H100: 1,979 sparse
    "NVIDIA B200": 2250e12,  # HGX B200: 4.5 PFLOP/s sparse per GPU
    "NVIDIA A100-SXM4-40GB": 312e12,  # A100 sheet: 312 dense, 624 sparse (every A100)
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362.05e12,  # 733 sparse
    "NVIDIA L40": 181.05e12,  # 362.1 sparse
    "NVIDIA L4": 121e12,  # 242 sparse
    "NVIDIA A10": 125e12,  # 250 sparse
    # AWS's A10 variant (G5 instances) has no NVIDIA datasheet; 70 TFLOP/s dense bf16 is the
    # figure published in comparisons of the two (e.g. Baseten, "NVIDIA A10 vs A10G").
    "NVIDIA A10G": 70e12,
    # V100 has no bf16 tensor cores: these are its fp16 tensor-core peaks (V100 datasheet),
    # right for ModelConfig.dtype='float16'; bf16 matmuls on a V100 never reach them.
    "Tesla V100-SXM2-16GB": 125e12,
    "Tesla V100-SXM2-32GB": 125e12,
    "Tesla V100-PCIE-16GB": 112e12,
    "Tesla V100-PCIE-32GB": 112e12,
}
_PEAK_BY_KIND = {kind.strip().lower(): flops for kind, flops in PEAK_FLOPS.items()}
_ANNOUNCED: set[str] = set()  # device kinds already logged about, so each is said once


def _say_once(kind: str, level: int, message: str) -> None:
    if kind not in _ANNOUNCED:
        _ANNOUNCED.add(kind)
        log.log(level, message)


def peak_flops(device: Any = None) -> float | None:
    """The dense bf16 peak FLOP/s of one JAX device (default: the first), or None.

    None on CPU (no single published peak to divide by) and for a device kind not
    in `PEAK_FLOPS` (logged once, naming the override `TrainConfig.peak_flops`).
    """
    device = jax.devices()[0] if device is None else device
    if getattr(device, "platform", "") == "cpu":
        _say_once(
            "cpu",
            logging.INFO,
            "no published peak FLOP/s for a CPU, so no MFU; set "
            "TrainConfig.peak_flops (e.g. to metrics.measured_matmul_peak()) for one.",
        )
        return None
    kind = str(device.device_kind).strip().lower()
    peak = _PEAK_BY_KIND.get(kind)
    if peak is None:
        _say_once(
            kind,
            logging.WARNING,
            f"no peak FLOP/s known for device kind {device.device_kind!r}, so no MFU; "
            "set TrainConfig.peak_flops to its dense bf16 peak (FLOP/s per JAX device).",
        )
    return peak


def measured_matmul_peak(
    n: int = 2048, dtype: str | None = None, repeats: int = 5, device: Any = None
) -> float:
    """FLOP/s of a jitted n x n x n matmul, best of `repeats`: *measured*, not published.

    A yardstick where no datasheet peak exists (a CPU), e.g. for
    `TrainConfig.peak_flops`; an MFU against it says how close the model runs to
    the matmul this machine actually sustains. dtype defaults to bfloat16, and
    to float32 on CPU (where bf16 matmuls are emulated).
    """
    device = jax.local_devices()[0] if device is None else device
    dtype = dtype or ("float32" if device.platform == "cpu" else "bfloat16")
    a_key, b_key = jax.random.split(jax.random.key(0))
    a_NN, b_NN = (
        jax.device_put(jax.random.normal(k, (n, n), dtype), device) for k in (a_key, b_key)
    )
    matmul = jax.jit(jnp.matmul)
    matmul(a_NN, b_NN).block_until_ready()  # compile outside the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a_NN, b_NN).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------- FLOPs

FORWARD_BACKWARD = 3  # the backward pass is two matmuls per forward one (d_input, d_weight)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model training FLOPs (forward + backward) per token, from the family's shapes.

    The family's forward matmul FLOPs (`gptjax.models.flops`, which says what is
    counted) times 3 for training; remat's recomputation is not counted (model
    FLOPs, not hardware FLOPs). For a decoder this is 6 N + 12 L d T less the
    biases and LayerNorm scales N includes.

    "A token" is what the loop counts (`batch_size * seq_len` per step): a position
    of a decoder or encoder sequence of seq_len; for seq2seq, one token of a window
    of seq_len, of which seq_len // 2 are the source and the rest the target
    (`family.from_windows`), so FLOPs per token = FLOPs of one (source, target)
    pair / seq_len. Task datasets with other source/target lengths are approximated.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    forward = family_lib.family_of(cfg).forward_flops(cfg, seq_len)
    return FORWARD_BACKWARD * forward / seq_len


def mfu(
    tokens_per_s: float, cfg: ModelConfig, seq_len: int, n_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilisation over n_devices of `peak` FLOP/s each; None without a peak."""
    if peak is None:
        return None
    return tokens_per_s * flops_per_token(cfg, seq_len) / (n_devices * peak)


# --------------------------------------------------------------------- writers


class ObjectLog:
    """An append-only text file on an object store (gs://, any etils.epath URI), where an
    object cannot be appended to (gcsfs turns mode 'a' into an overwrite): the whole text
    is kept here and the object rewritten on `flush`, at most every `every_s` seconds, and
    on `close`. A crash loses at most the last `every_s` seconds of rows."""

    def __init__(self, path: epath.Path, every_s: float = 30.0):
        self._path, self._every_s = path, every_s
        self._chunks = [path.read_text()] if path.exists() else []
        self._uploaded = -float("inf")  # the first flush uploads

    def write(self, text: str) -> None:
        self._chunks.append(text)

    def flush(self, force: bool = False) -> None:
        if force or time.monotonic() - self._uploaded >= self._every_s:
            self._path.write_text("".join(self._chunks))
            self._uploaded = time.monotonic()

    def close(self) -> None:
        self.flush(force=True)


class MetricWriter:
    """Writes each logged step to `metrics.jsonl` and TensorBoard (process 0 only).

    A metric whose value is None (an MFU without a known peak) is left out of the
    row rather than written as a made-up number. `workdir` may be a gs:// path (any
    etils.epath URI): the JSONL log is then an `ObjectLog`, and tensorboardX writes its
    event files there itself (gs:// through google-cloud-storage, s3:// through boto3).
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if enabled:
            path = epath.Path(workdir) / "metrics.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            if "://" in os.fspath(path):
                self._jsonl = ObjectLog(path)
            else:
                self._jsonl = open(path, "a")  # noqa: SIM115  (closed by close())
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tensorboard"))
            except ImportError:  # TensorBoard is optional; the JSONL log is the record
                self._tb = None

    def write(self, step: int, metrics: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

    def write_text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` (for tests, sweeps and notebooks)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
