"""Scaling checks on 8 fake CPU devices: restore onto another mesh, dry runs, early mesh errors.

- A checkpoint written on an 8-device fsdp mesh restores on one device (dp) and on a 4x2
  fsdp_tp mesh, and training continues with the same losses as on the original mesh.
- `loop.train(..., dry_run=True)` compiles the real train step for the configured mesh and
  reports per-device memory and FLOPs without allocating the state, for a tiny model and for
  GPT-2 124M.
- A mesh that does not divide the model fails inside `loop.train` before anything is jitted,
  naming the config field, the mesh axis and both sizes.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from gptjax import config as config_lib
from gptjax.config import ModelConfig
from gptjax.data.config import DataConfig, workdir_tokenizer
from gptjax.data.pipeline import make_datasets
from gptjax.models import family as family_lib
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training import metrics as metrics_lib
from gptjax.training.loop import train
from gptjax.training.metrics import read_metrics
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig, abstract_state, make_trainer
from tests.conftest import copy_stdlib

# Distinct sizes that every mesh below divides (heads and vocab over tensor=2, embed over fsdp=4).
MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=4, d_ff=96, vocab_size=300, max_len=32)
FSDP = sharding.MeshConfig(shape={"data": 2, "fsdp": 4}, rules="fsdp")
FSDP_TP = sharding.MeshConfig(shape={"fsdp": 4, "tensor": 2}, rules="fsdp_tp")
STOP, END = 3, 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_corpus")
    return copy_stdlib(root, 20)


def _configs(corpus, tmp_path, mesh_cfg, **train_kw):
    train_cfg = TrainConfig(
        **{
            **dict(
                steps=50,
                batch_size=8,
                seq_len=16,
                log_every=1,
                eval_every=1000,
                checkpoint_every=STOP,
                compilation_cache_dir=None,
            ),
            **train_kw,
        }
    )
    return dict(
        model_cfg=MODEL,
        train_cfg=train_cfg,
        opt_cfg=OptimizerConfig(peak_lr=3e-3, warmup_steps=2),
        data_cfg=DataConfig(
            dataset=corpus, tokenizer="byte", data_dir=str(tmp_path.parent / "scale_data")
        ),
        mesh_cfg=mesh_cfg,
    )


def _losses(workdir, after=0):
    return [
        r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r and r["step"] > after
    ]


def _continue_on_one_device(workdir, cfgs):
    """Resume `workdir` on a 1-device dp mesh with the trainer API (loop.train always uses all
    devices of the process) and run the remaining steps on the checkpoint's data position."""
    mesh = sharding.make_mesh(sharding.MeshConfig(shape={"data": 1}), devices=jax.devices()[:1])
    rules = logical.logical_axis_rules("dp")
    train_cfg, data_cfg = cfgs["train_cfg"], cfgs["data_cfg"]
    trainer = make_trainer(
        MODEL, cfgs["opt_cfg"], train_cfg.steps, mesh, rules, train_cfg.batch_size
    )
    with ckpt_lib.CheckpointManager(workdir, read_only=True) as manager:
        step, state, meta = manager.restore(abstract_state(trainer))
    assert step == STOP
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(state))
    train_iter, _ = make_datasets(
        data_cfg.dataset,
        workdir_tokenizer(workdir),
        train_cfg.seq_len,
        train_cfg.batch_size,
        data_cfg.resolved_data_dir,
        seed=train_cfg.seed,
        state=meta["data"],
    )
    losses = []
    with logical.use_mesh(mesh, rules):
        for _ in range(END - STOP):
            batch = sharding.make_global_batch(next(train_iter), mesh, rules)
            state, metrics = trainer.train_step(state, batch)
            losses.append(float(metrics["train/loss"]))
    return losses, state


def test_checkpoint_restores_on_another_mesh_and_training_continues(corpus, tmp_path):
    saved = str(tmp_path / "fsdp")
    summary = train(saved, stop_after=END, **_configs(corpus, tmp_path, FSDP))
    assert summary["end_step"] == END
    want = _losses(saved, after=STOP)  # steps 4-6 on the original mesh
    # Copies of the run as it was at step 3 (as if it had stopped there).
    moved, single = str(tmp_path / "fsdp_tp"), str(tmp_path / "single")
    for copy in (moved, single):
        shutil.copytree(saved, copy, ignore=shutil.ignore_patterns(str(END), "metrics.jsonl"))
        assert sorted(os.listdir(os.path.join(copy, "checkpoints"))) == [str(STOP)]

    summary = train(moved, stop_after=END - STOP, **_configs(corpus, tmp_path, FSDP_TP))
    assert summary["start_step"] == STOP and summary["end_step"] == END
    np.testing.assert_allclose(_losses(moved), want, rtol=1e-5)

    got, state = _continue_on_one_device(single, _configs(corpus, tmp_path, FSDP))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # And the parameters after the continued steps agree across meshes.
    rules = logical.logical_axis_rules("fsdp")
    trainer = make_trainer(
        MODEL, _configs(corpus, tmp_path, FSDP)["opt_cfg"], 50, sharding.make_mesh(FSDP), rules, 8
    )
    with ckpt_lib.CheckpointManager(saved, read_only=True) as manager:
        step, original, _ = manager.restore(abstract_state(trainer))
    assert step == END
    for a, b in zip(
        jax.tree.leaves(jax.device_get(state.params)),
        jax.tree.leaves(jax.device_get(original.params)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def _state_bytes_per_device(trainer) -> int:
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
        for x in jax.tree.leaves(abstract_state(trainer))
    )


def test_dry_run_reports_per_device_memory_and_flops(tmp_path):
    """Tiny model on the fsdp_tp mesh, layers unrolled so XLA's cost analysis sees every layer
    (it counts a scan body once). The argument bytes are the per-device shards of the state
    plus the batch; XLA's FLOPs match the 6N + 12LdT model count within the optimizer and
    softmax extras; and the compiled program is the one the loop trains, which traces under
    `use_mesh` (without it the activation constraints are missing and the memory is that of
    another program)."""
    cfg = MODEL.replace(scan_layers=False)
    train_cfg = TrainConfig(batch_size=8, seq_len=32, compilation_cache_dir=None)
    opt = OptimizerConfig(warmup_steps=2)
    before = _live_bytes()
    out = train(
        str(tmp_path / "dry"),
        model_cfg=cfg,
        train_cfg=train_cfg,
        opt_cfg=opt,
        mesh_cfg=FSDP_TP,
        dry_run=True,
    )
    assert _live_bytes() - before < 2**20  # nothing of the state was allocated
    assert not os.path.exists(tmp_path / "dry" / "checkpoints")
    assert out["devices"] == 8 and out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    mesh, rules = sharding.make_mesh(FSDP_TP), logical.logical_axis_rules("fsdp_tp")
    trainer = make_trainer(cfg, opt, train_cfg.steps, mesh, rules, 8)
    batch_bytes = 8 * 33 * 4 // 4  # int32 tokens, batch split over fsdp=4
    assert out["argument_size_gib"] * 2**30 == pytest.approx(
        _state_bytes_per_device(trainer) + batch_bytes, rel=0.02
    )
    assert out["peak_estimate_gib"] >= out["argument_size_gib"]
    model_flops = metrics_lib.flops_per_token(cfg, 32) * 8 * 32
    assert out["model_flops_per_step"] == model_flops
    assert 0.8 < out["xla_flops_per_device"] * 8 / model_flops < 2.0

    batch = {"tokens": jax.ShapeDtypeStruct((8, 33), np.int32, sharding=trainer.batch_sharding)}
    with logical.use_mesh(mesh, rules):
        mem = trainer.train_step.lower(abstract_state(trainer), batch).compile().memory_analysis()
    assert out["temp_size_gib"] * 2**30 == mem.temp_size_in_bytes, (
        "the dry run compiled another program than the loop's (trace it under use_mesh)"
    )


def test_dry_run_gpt2_small_on_the_fsdp_mesh(tmp_path):
    """GPT-2 124M (12 layers, scanned) at seq 1024 compiles on CPU in ~10 s and is never
    allocated; its per-device state is 1/4 of params + Adam moments (fsdp=4, data=2)."""
    cfg = config_lib.PRESETS["gpt2_small"]
    before = _live_bytes()
    out = train(
        str(tmp_path / "dry_124m"),
        model_cfg=cfg,
        train_cfg=TrainConfig(batch_size=8, seq_len=1024, compilation_cache_dir=None),
        opt_cfg=OptimizerConfig(),
        mesh_cfg=FSDP,
        dry_run=True,
    )
    state_gib = family_lib.param_count(cfg) * 3 * 4 / 4 / 2**30  # params, mu, nu in fp32
    assert out["argument_size_gib"] == pytest.approx(state_gib, rel=0.01)
    assert out["temp_size_gib"] > 0 and out["peak_estimate_gib"] > state_gib
    assert out["model_flops_per_step"] == pytest.approx(855e6 * 8 * 1024, rel=0.01)
    assert _live_bytes() - before < 2**20


@pytest.mark.parametrize(
    "model_kw, mesh_cfg, batch_size, message",
    [
        # heads over tensor: 4 heads cannot split 8 ways (nor can vocab 300)
        (
            dict(),
            sharding.MeshConfig(shape={"tensor": 8}, rules="tp"),
            8,
            r"n_heads=4 \(logical axis 'heads'.*mesh tensor=8",
        ),
        (
            dict(),
            sharding.MeshConfig(shape={"tensor": 8}, rules="tp"),
            8,
            r"vocab_size=300 \(logical axis 'vocab'.*mesh tensor=8",
        ),
        # embed over fsdp: d_model 36 cannot split 8 ways
        (
            dict(d_model=36),
            sharding.MeshConfig(shape={"fsdp": 8}, rules="fsdp"),
            8,
            r"d_model=36 \(logical axis 'embed'.*mesh fsdp=8: use fsdp in \{1,2,3,4,6,9,12,18,36\}",
        ),
        # d_ff over tensor under fsdp_tp
        (
            dict(d_ff=90),
            sharding.MeshConfig(shape={"fsdp": 2, "tensor": 4}, rules="fsdp_tp"),
            8,
            r"d_ff=90 \(logical axis 'mlp'.*mesh tensor=4",
        ),
        # the batch over data x fsdp
        (dict(), FSDP, 12, r"global_batch_size=12 is not divisible by mesh data\*fsdp=8"),
    ],
)
def test_a_mesh_that_does_not_divide_fails_before_compiling(
    corpus, tmp_path, monkeypatch, model_kw, mesh_cfg, batch_size, message
):
    def no_jit(*args, **kwargs):
        raise AssertionError("jax.jit was reached: the mesh check must come first")

    monkeypatch.setattr(jax, "jit", no_jit)
    cfgs = _configs(corpus, tmp_path, mesh_cfg, batch_size=batch_size)
    cfgs["model_cfg"] = MODEL.replace(**model_kw)
    with pytest.raises(ValueError, match=message):
        train(str(tmp_path / "bad"), **cfgs)
    with pytest.raises(ValueError, match=message):
        train(str(tmp_path / "bad_dry"), dry_run=True, **cfgs)
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")
