"""Read a training workdir back: its configs, tokenizer and latest params.

`gptjax sample`, `gptjax eval` and the notebooks use this; it never writes
to the workdir (the checkpoint manager is opened read-only).
"""

from __future__ import annotations

import json
import os

import jax

from gptjax.data.config import DataConfig, workdir_tokenizer
from gptjax.models import family
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig, abstract_state, make_trainer


def load_configs(workdir: str) -> dict:
    """The dataclass configs a run wrote to `workdir/config.json` (the model's in its
    family's class: ModelConfig, EncoderConfig or Seq2SeqConfig)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no config.json in {workdir!r}; train first with "
            f"`gptjax train --workdir={workdir} ...`."
        )
    with open(path) as f:
        raw = json.load(f)
    kinds = {
        "model": family.by_name(raw.get("family", "decoder")).config_class,
        "train": TrainConfig,
        "optimizer": OptimizerConfig,
        "data": DataConfig,
    }
    return {k: kinds[k](**v) for k, v in raw.items() if k in kinds}


def load_run(workdir: str, mesh_cfg: sharding.MeshConfig | None = None):
    """(model_cfg, params, tokenizer, configs, step) from a workdir's newest good checkpoint."""
    configs = load_configs(workdir)
    cfg, train_cfg = configs["model"], configs["train"]
    if mesh_cfg is None:  # one device: enough to sample from or score a small model
        mesh_cfg = sharding.MeshConfig(shape={"data": 1, "fsdp": 1, "tensor": 1})
        mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:1])
    else:
        mesh = sharding.make_mesh(mesh_cfg)
    rules = logical.logical_axis_rules(mesh_cfg.rules)
    trainer = make_trainer(
        cfg, configs["optimizer"], train_cfg.steps, mesh, rules, train_cfg.batch_size
    )
    manager = ckpt_lib.CheckpointManager(workdir, read_only=True)
    try:
        restored = manager.restore(abstract_state(trainer))
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir!r}/checkpoints yet.")
    step, state, _ = restored
    return cfg, state.params, workdir_tokenizer(workdir), configs, step
