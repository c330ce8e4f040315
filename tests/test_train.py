"""The train step and the loop: end to end, exact resume, NaN stop, accumulation."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import ModelConfig
from gptjax.data.config import DataConfig, run_datasets
from gptjax.evals.hooks import train_with_defaults
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training.loop import TrainingDivergedError, train
from gptjax.training.metrics import read_metrics
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig, make_trainer

MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=300, max_len=32)
ONE_DEVICE = sharding.MeshConfig(shape={"data": 1, "fsdp": 1, "tensor": 1})
ALL_DEVICES = sharding.MeshConfig(shape={"data": -1, "fsdp": 1, "tensor": 1})  # 8 fake CPUs


def _configs(corpus, tmp_path, **train_kw):
    train_cfg = TrainConfig(
        **{
            **dict(
                steps=8,
                batch_size=8,
                seq_len=16,
                log_every=1,
                eval_every=4,
                eval_batches=2,
                checkpoint_every=2,
                sample_tokens=8,
                compilation_cache_dir=str(tmp_path.parent / "jax_cache"),
            ),
            **train_kw,
        }
    )
    return dict(
        model_cfg=MODEL,
        train_cfg=train_cfg,
        opt_cfg=OptimizerConfig(peak_lr=3e-3, warmup_steps=2),
        data_cfg=DataConfig(dataset=corpus, tokenizer="byte", data_dir=str(tmp_path / "data")),
        mesh_cfg=ALL_DEVICES,
    )


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def test_end_to_end_run_writes_metrics_checkpoints_and_samples(corpus, tmp_path):
    """With the default hooks (as `gptjax train`): metrics, evals, samples, checkpoints; and
    `gptjax eval`'s perplexity of the workdir at the loop's eval batches is its eval loss."""
    workdir = str(tmp_path / "run")
    summary = train_with_defaults(workdir, **_configs(corpus, tmp_path))
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    for key in ("lr", "grad_norm", "tokens_per_s"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert not any("mfu" in r for r in train_rows)  # CPU: no published peak, so no MFU
    assert all(r["update_skipped"] == 0 and r["skipped_updates"] == 0 for r in train_rows)
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert [r["step"] for r in rows if "eval/loss" in r] == [4, 8]
    assert len(rows) == 8  # one object per logged step: train and eval metrics merged
    assert summary["end_step"] == 8 and np.isfinite(summary["eval/loss"])
    assert isinstance(summary["sample"], str)
    for name in ("config.gin", "config.json", "tokenizer.json", "summary.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "8"
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
    from gptjax.evals.in_context import split_perplexity
    from gptjax.training.workdir import load_run

    cfg, params, tokenizer, configs, _ = load_run(workdir)
    out = split_perplexity(cfg, params, tokenizer, configs, batch_size=8, max_batches=2)
    np.testing.assert_allclose(out["loss"], summary["eval/loss"], rtol=1e-5)
    assert out["tokens"] == 2 * 8 * 16


def test_without_hooks_an_eval_is_loss_and_perplexity_only(corpus, tmp_path):
    """`train` imports no evals: without hooks there is no sample; a hook's metrics join
    the eval row and its text becomes the sample."""
    seen = []

    def make_hooks(model_cfg, data_cfg, train_cfg, tokenizer):
        def hook(step, params):
            seen.append(step)
            return {"eval/answer": 42.0}, f"text at {step}"

        return [hook]

    cfgs = _configs(corpus, tmp_path, steps=4, eval_every=2, checkpoint_every=100)
    plain = train(str(tmp_path / "plain"), **cfgs)
    assert "sample" not in plain and np.isfinite(plain["eval/loss"])
    hooked = train(str(tmp_path / "hooked"), hooks=make_hooks, **cfgs)
    assert seen == [2, 4] and hooked["sample"] == "text at 4" and hooked["eval/answer"] == 42.0
    rows = [r for r in read_metrics(str(tmp_path / "hooked")) if "eval/loss" in r]
    assert [r["eval/answer"] for r in rows] == [42.0, 42.0]
    np.testing.assert_allclose(hooked["eval/loss"], plain["eval/loss"], rtol=1e-6)


def test_resume_after_stop_equals_uninterrupted(corpus, tmp_path):
    full = str(tmp_path / "full")
    train(full, **_configs(corpus, tmp_path))
    parts = str(tmp_path / "parts")
    first = train(parts, stop_after=3, **_configs(corpus, tmp_path))
    assert first["end_step"] == 3
    second = train(parts, **_configs(corpus, tmp_path))
    assert second["start_step"] == 3 and second["end_step"] == 8
    a, b = _losses(full), _losses(parts)
    assert sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], rtol=1e-6)


def test_resume_from_an_older_checkpoint_after_a_crash(corpus, tmp_path):
    """A crash loses the steps after the last checkpoint; the rerun redoes them identically."""
    full = str(tmp_path / "full")
    train(full, **_configs(corpus, tmp_path))
    crashed = str(tmp_path / "crashed")
    train(crashed, stop_after=5, **_configs(corpus, tmp_path))
    # Simulate the crash: step 5's checkpoint was never written.
    import shutil

    shutil.rmtree(os.path.join(crashed, "checkpoints", "5"))
    again = train(crashed, **_configs(corpus, tmp_path))
    assert again["start_step"] == 4
    rows = read_metrics(crashed)
    redo = {r["step"]: r["train/loss"] for r in rows[-12:] if "train/loss" in r}
    np.testing.assert_allclose(
        [redo[s] for s in range(5, 9)], [_losses(full)[s] for s in range(5, 9)], rtol=1e-6
    )


def test_nan_loss_stops_with_a_clear_error_and_keeps_good_checkpoints(corpus, tmp_path):
    workdir = str(tmp_path / "nan")
    cfgs = _configs(corpus, tmp_path, checkpoint_every=1, eval_every=100)
    cfgs["opt_cfg"] = OptimizerConfig(peak_lr=1e25, warmup_steps=3, clip_norm=None)
    with pytest.raises(
        TrainingDivergedError, match="skipped; stopped before saving. The last good"
    ):
        train(workdir, **cfgs)
    manager = ckpt_lib.CheckpointManager(workdir, read_only=True)
    steps = manager.all_steps()
    manager.close()
    assert steps, "the checkpoints written before the divergence are kept"
    from gptjax.training.workdir import load_run

    _, params, _, _, step = load_run(workdir)
    assert step == max(steps)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def test_an_injected_inf_gradient_skips_that_update_and_training_goes_on(
    corpus, tmp_path, monkeypatch
):
    """Step 3's backward pass overflows (an inf gradient under a finite loss, as a bf16
    overflow would): that update is skipped and counted, step 3's checkpoint holds step 2's
    params exactly, and the run trains on to the end."""
    from jax.experimental import io_callback

    from gptjax.training import step as train_lib
    from gptjax.training.step import abstract_state

    calls = {"n": 0}

    def overflow_now():
        calls["n"] += 1
        return np.bool_(calls["n"] == 3)

    @jax.custom_vjp
    def overflow_in_backward(x):
        return x

    def bwd(_, g):
        flag = io_callback(overflow_now, jax.ShapeDtypeStruct((), jnp.bool_))
        return (g * jnp.where(flag, jnp.inf, 1.0),)

    overflow_in_backward.defvjp(lambda x: (x, None), bwd)
    real = train_lib.family_objective

    def poisoned(cfg):
        def objective(params, mb):
            sums, weights, aux = real(cfg)(params, mb)
            return {"loss": overflow_in_backward(sums["loss"])}, weights, aux

        return objective

    monkeypatch.setattr(train_lib, "family_objective", poisoned)
    workdir = str(tmp_path / "inf")
    cfgs = _configs(
        corpus,
        tmp_path,
        checkpoint_every=1,
        eval_every=100,
        keep_checkpoints=10,
        compilation_cache_dir=None,
    )
    summary = train(workdir, **cfgs)
    rows = {r["step"]: r for r in read_metrics(workdir) if "train/loss" in r}
    assert [s for s, r in rows.items() if r["update_skipped"]] == [3]
    assert np.isfinite(rows[3]["train/loss"]) and not np.isfinite(rows[3]["grad_norm"])
    assert rows[8]["skipped_updates"] == 1 and summary["skipped_updates"] == 1
    assert summary["end_step"] == 8
    trainer = make_trainer(
        MODEL,
        cfgs["opt_cfg"],
        8,
        sharding.make_mesh(ALL_DEVICES),
        logical.logical_axis_rules("dp"),
        8,
    )
    manager = ckpt_lib.CheckpointManager(workdir, read_only=True)
    (_, s2, _), (_, s3, _) = (manager.restore(abstract_state(trainer), step=k) for k in (2, 3))
    manager.close()
    for a, b in zip(
        jax.tree.leaves((s2.params, s2.opt_state)), jax.tree.leaves((s3.params, s3.opt_state))
    ):
        np.testing.assert_array_equal(a, b)


def test_tokens_per_s_at_an_eval_step_excludes_the_eval(corpus, tmp_path, monkeypatch):
    """An eval that takes 2 s must not count as training time: the eval step's row still
    shows a step's throughput (one step of this model takes well under a second), where
    counting the eval would cap it at batch * seq_len / 2 s."""
    import time

    from gptjax.training import loop

    real = loop.evaluate

    def slow_evaluate(*args, **kw):
        time.sleep(2.0)
        return real(*args, **kw)

    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    workdir = str(tmp_path / "timing")
    train(workdir, **_configs(corpus, tmp_path, steps=4, eval_every=4, checkpoint_every=100))
    row = [r for r in read_metrics(workdir) if r["step"] == 4][0]
    assert "eval/loss" in row and row["tokens_per_s"] > 8 * 16 / 1.0


def test_gradient_accumulation_equals_the_large_batch():
    mesh = sharding.make_mesh(ONE_DEVICE, devices=jax.devices()[:1])
    rules = logical.logical_axis_rules("dp")
    batch = {"tokens": jax.random.randint(jax.random.key(0), (8, 17), 0, MODEL.vocab_size)}
    results = []
    for accum in (1, 4):
        opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=1, grad_accum_steps=accum)
        trainer = make_trainer(MODEL, opt, 10, mesh, rules, 8)
        state = trainer.init_train_state(0)
        state, _ = trainer.train_step(state, batch)
        state, metrics = trainer.train_step(state, batch)
        results.append(
            (
                jax.device_get(state.params),
                float(metrics["train/loss"]),
                float(metrics["grad_norm"]),
            )
        )
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)
    np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-5)  # the summed gradient
    # The key bias has an exactly zero true gradient (softmax ignores a shift shared by
    # all scores), so Adam turns float noise there into +-lr steps: compare q and v only.
    for p, *_ in results:
        p["h"]["attn"]["c_attn"]["bias"] = p["h"]["attn"]["c_attn"]["bias"][:, ::2]
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
        # Adam divides by sqrt(v): elements with gradients near 0 amplify float noise (one
        # of 8192 moved 3.8% of a step on an AMD EPYC host), so allow 10% of one step (lr
        # 1e-2); a wrong accumulation moves params by ~lr.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_bad_inputs_raise_clear_errors(corpus, tmp_path):
    cfgs = _configs(corpus, tmp_path)
    with pytest.raises(ValueError, match="seq_len=64 exceeds ModelConfig.max_len=32"):
        train(str(tmp_path / "a"), **{**cfgs, "train_cfg": TrainConfig(seq_len=64)})
    with pytest.raises(ValueError, match="vocab"):
        train(str(tmp_path / "b"), **{**cfgs, "model_cfg": MODEL.replace(vocab_size=100)})
    with pytest.raises(FileNotFoundError, match="neither 'stdlib'"):
        train(
            str(tmp_path / "c"),
            **{
                **cfgs,
                "data_cfg": DataConfig(dataset=str(tmp_path / "missing.txt"), tokenizer="byte"),
            },
        )
    with pytest.raises(ValueError, match="not divisible"):
        train(
            str(tmp_path / "d"),
            **{**cfgs, "opt_cfg": OptimizerConfig(grad_accum_steps=3, warmup_steps=1)},
        )
    with pytest.raises(ValueError, match="batch"):  # 8 devices cannot split a batch of 4
        train(str(tmp_path / "e"), **{**cfgs, "train_cfg": TrainConfig(batch_size=4, seq_len=16)})


def test_batch_ramp_masks_rows_and_grows_to_full():
    from gptjax.training.batches import BatchRamp, mask_padding

    train_cfg = TrainConfig(batch_size=8, seq_len=4)
    ramp = BatchRamp(OptimizerConfig(batch_ramp_tokens=64, batch_ramp_start=8), train_cfg)
    rows = [ramp.rows(s) for s in range(8)]
    assert rows[0] == 2 and rows == sorted(rows) and rows[-1] == 8
    assert ramp.tokens(0, 8) == 4 * sum(rows)
    assert not BatchRamp(OptimizerConfig(), train_cfg).enabled
    # A task dataset's answer mask is multiplied, not replaced: padding rows get 0, the
    # active rows keep their prompt positions at 0.
    answer = np.array([[0, 1, 1, 0]] * 4, np.float32)
    out = mask_padding({"tokens": np.zeros((4, 5), np.int32), "loss_mask": answer}, 2)
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 0]] * 2 + [[0, 0, 0, 0]] * 2)
    plain = mask_padding({"tokens": np.zeros((4, 5), np.int32)}, 3)["loss_mask"]
    np.testing.assert_array_equal(plain, [[1] * 4] * 3 + [[0] * 4])


def test_batch_ramp_start_logs_the_true_loss_under_accumulation(corpus, tmp_path):
    """A ramp of 2 rows with 4 microbatches used to log (and descend) half the loss; the
    logged loss must be the mean over the 2 real rows, the data they hold the iterator's
    first 2 windows, and tokens_trained count those rows only."""
    from gptjax.data.config import workdir_tokenizer
    from gptjax.models import family

    cfgs = _configs(corpus, tmp_path, steps=4, log_every=1, eval_every=100)
    cfgs["opt_cfg"] = OptimizerConfig(
        peak_lr=3e-3,
        warmup_steps=2,
        grad_accum_steps=4,
        batch_ramp_tokens=10**6,
        batch_ramp_start=2 * 16,
    )
    # Microbatches of 2 rows: batch over a data axis of 2, the model over tensor 4.
    cfgs["mesh_cfg"] = sharding.MeshConfig(shape={"data": 2, "fsdp": 1, "tensor": 4}, rules="tp")
    workdir = str(tmp_path / "ramp")
    summary = train(workdir, stop_after=1, **cfgs)
    assert summary["tokens_trained"] == 2 * 16
    logged = _losses(workdir)[1]
    trainer = make_trainer(
        MODEL,
        cfgs["opt_cfg"],
        4,
        sharding.make_mesh(ONE_DEVICE, devices=jax.devices()[:1]),
        logical.logical_axis_rules("dp"),
        8,
    )
    params = trainer.init_train_state(cfgs["train_cfg"].seed).params
    tokenizer = workdir_tokenizer(workdir, cfgs["data_cfg"])
    train_cfg = cfgs["train_cfg"]
    train_iter, _ = run_datasets(
        cfgs["data_cfg"],
        tokenizer,
        task_format="causal",
        seq_len=train_cfg.seq_len,
        batch_size=train_cfg.batch_size,
        seed=train_cfg.seed,
    )
    local, real = train_iter.take(2)
    want = float(family.loss(MODEL, params, {"tokens": jnp.asarray(local["tokens"][:real])}))
    np.testing.assert_allclose(logged, want, rtol=1e-5)
