"""Compile the train step ahead of time and report memory and FLOPs per device.

Catches an out-of-memory batch size or a mesh that does not fit before a
pod job starts: nothing is allocated, only `lower(...).compile()` runs.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from gptjax.parallel import logical
from gptjax.training import metrics as metrics_lib
from gptjax.training.step import TrainConfig, Trainer, abstract_state

_GIB = 1024**3


def report(trainer: Trainer, train_cfg: TrainConfig) -> dict:
    """Compile `train_step` for the trainer's mesh; print and return its costs."""
    state = abstract_state(trainer)
    batch = {
        "tokens": jax.ShapeDtypeStruct(
            (train_cfg.batch_size, train_cfg.seq_len + 1), np.int32, sharding=trainer.batch_sharding
        )
    }
    t0 = time.perf_counter()
    # Trace under the mesh and rules, as the loop does: the model's activation constraints
    # read them at trace time, and without them XLA compiles (and sizes) another program.
    with logical.use_mesh(trainer.mesh, trainer.rules):
        compiled = trainer.train_step.lower(state, batch).compile()
    out = {
        "compile_s": time.perf_counter() - t0,
        "devices": jax.device_count(),
        "mesh": dict(trainer.mesh.shape),
    }
    mem = compiled.memory_analysis()
    if mem is not None:
        for name in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "generated_code_size_in_bytes",
            "alias_size_in_bytes",
        ):
            out[name.replace("_in_bytes", "_gib")] = getattr(mem, name, 0) / _GIB
        # Donated state aliases its output, so it is counted once.
        out["peak_estimate_gib"] = (
            out["argument_size_gib"]
            + out["output_size_gib"]
            - out.get("alias_size_gib", 0.0)
            + out["temp_size_gib"]
        )
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    out["model_flops_per_step"] = (
        metrics_lib.flops_per_token(trainer.cfg, train_cfg.seq_len)
        * train_cfg.batch_size
        * train_cfg.seq_len
    )
    out["model_flops_per_device"] = out["model_flops_per_step"] / jax.device_count()
    if cost:  # XLA counts a scanned layer stack's body once: compare with scan_layers=False
        out["xla_flops_per_device"] = float(cost.get("flops", 0.0))
    width = max(len(k) for k in out)
    print("dry run: train_step compiled, nothing allocated")
    for k, v in out.items():
        print(f"  {k:<{width}}  {v:,.3f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    return out
