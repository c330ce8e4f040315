"""Training metrics: FLOPs per token, model FLOPs utilisation and the metric writers.

MFU = achieved model FLOP/s / peak FLOP/s of the devices. Model FLOPs per
token follow the PaLM/nanoGPT convention: 6 N for the weight matmuls
(forward + backward) plus 12 L d T for attention scores and values, with N
the non-position-embedding parameter count.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from gptjax.config import ModelConfig, param_count

# Dense bf16 peak FLOP/s per device, matched against `device.device_kind`
# (first match wins, so the more specific names come first).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e reports "TPU v5 lite"
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    # A CPU has no single published peak: a nominal 100 GFLOP/s per JAX CPU
    # device keeps MFU comparable between CPU runs, nothing more.
    ("cpu", 100e9),
)


def peak_flops(device: Any = None) -> float:
    """The peak of one device from the table above (override with TrainConfig.peak_flops)."""
    device = device or jax.devices()[0]
    kind = f"{device.device_kind} {device.platform}"
    for name, flops in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return flops
    return 100e12  # unknown accelerator: a round number, say so in the logs


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L d T (forward + backward)."""
    n = param_count(cfg) - (cfg.max_len * cfg.d_model if cfg.pos_embedding == "learned" else 0)
    return 6 * n + 12 * cfg.n_layers * cfg.d_model * seq_len


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, n_devices: int,
        peak: float) -> float:
    return tokens_per_s * flops_per_token(cfg, seq_len) / (n_devices * peak)


class MetricWriter:
    """Writes each logged step to `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; the JSONL log is the record
                self._tb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), int(step))

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
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
