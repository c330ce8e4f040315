"""The training loop: data → jitted steps → metrics, evals, samples, checkpoints.

Metrics are fetched one step late (the device runs step s+1 while the host
reads step s), except before a checkpoint, where the host waits so that a
NaN step is never saved. The same command on the same workdir resumes
exactly: params, optimizer state, RNG and the data iterator's position are
all in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import gin
import jax
import numpy as np
from tqdm.auto import tqdm

from gptjax import checkpoint as ckpt_lib
from gptjax import metrics as metrics_lib
from gptjax import sample, sharding
from gptjax.config import ModelConfig
from gptjax.data.config import DataConfig, workdir_tokenizer
from gptjax.data.pipeline import make_datasets
from gptjax.data.tokenizer import check_vocab
from gptjax.optimizer import OptimizerConfig
from gptjax.train import TrainConfig, Trainer, abstract_state, make_trainer

log = logging.getLogger("gptjax")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def setup_compilation_cache(path: str | None) -> None:
    """Persistent XLA compilation cache: a rerun skips compiles it has seen."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def evaluate(trainer: Trainer, params, eval_iter_factory, n_batches: int) -> dict[str, float]:
    """Mean eval loss and perplexity over up to `n_batches` validation batches."""
    total, count = 0.0, 0.0
    for i, batch in enumerate(eval_iter_factory()):
        if i >= n_batches:
            break
        out = jax.device_get(trainer.eval_step(params, sharding.make_global_batch(
            batch, trainer.mesh, trainer.rules)))
        total, count = total + float(out["loss_sum"]), count + float(out["tokens"])
    loss = total / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def preview(cfg: ModelConfig, params, tokenizer, prompt: str, n_tokens: int, seed: int) -> str:
    """A short sample from the current params (shown during training)."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    ids = ids[-max(1, cfg.max_len - n_tokens):]
    out = sample.generate(cfg, params, np.array([ids]), key=jax.random.key(seed),
                          max_new_tokens=min(n_tokens, cfg.max_len - len(ids)), temperature=0.8,
                          top_k=50)
    return prompt + tokenizer.decode(np.asarray(out.tokens[0, len(ids):]).tolist())


def _save_run_files(workdir: str, configs: dict) -> None:
    """The resolved config (gin syntax and JSON) next to the checkpoints."""
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({k: dataclasses.asdict(v) for k, v in configs.items()}, f, indent=2)


def train(workdir: str, *, model_cfg: ModelConfig | None = None,
          train_cfg: TrainConfig | None = None, opt_cfg: OptimizerConfig | None = None,
          data_cfg: DataConfig | None = None, mesh_cfg: sharding.MeshConfig | None = None,
          stop_after: int | None = None, dry_run: bool = False) -> dict:
    """Train (or resume) a model in `workdir`; returns a summary dict.

    Configs default to what gin binds. `stop_after` ends this invocation after
    that many steps, as a preemption would (the final checkpoint is written);
    `dry_run` compiles the train step for the configured mesh and reports its
    memory and FLOPs without training.
    """
    model_cfg, train_cfg = model_cfg or ModelConfig(), train_cfg or TrainConfig()
    opt_cfg, data_cfg = opt_cfg or OptimizerConfig(), data_cfg or DataConfig()
    mesh_cfg = mesh_cfg or sharding.MeshConfig()
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    setup_compilation_cache(train_cfg.compilation_cache_dir)

    mesh = sharding.make_mesh(mesh_cfg)
    rules = sharding.logical_axis_rules(mesh_cfg.rules)
    trainer = make_trainer(model_cfg, opt_cfg, train_cfg.steps, mesh, rules,
                           train_cfg.batch_size)
    if train_cfg.seq_len > model_cfg.max_len:
        raise ValueError(f"TrainConfig.seq_len={train_cfg.seq_len} exceeds ModelConfig.max_len="
                         f"{model_cfg.max_len}.")
    if dry_run:
        from gptjax.dry_run import report
        return report(trainer, train_cfg)

    tokenizer = workdir_tokenizer(workdir, data_cfg, save=primary)
    check_vocab(tokenizer, model_cfg.vocab_size)
    if primary:
        _save_run_files(workdir, {"model": model_cfg, "train": train_cfg, "optimizer": opt_cfg,
                                  "data": data_cfg})

    manager = ckpt_lib.CheckpointManager(workdir, checkpoint_every=train_cfg.checkpoint_every,
                                         max_to_keep=train_cfg.keep_checkpoints)
    restored = manager.restore(abstract_state(trainer))
    data_state = None
    if restored is None:
        state = trainer.init_train_state(train_cfg.seed)
        start = 0
    else:
        start, state, meta = restored
        data_state = meta.get("data")
        log.info("resumed from step %d in %s", start, workdir)
    train_iter, eval_factory = make_datasets(
        data_cfg.dataset, tokenizer, train_cfg.seq_len, train_cfg.batch_size,
        data_cfg.resolved_data_dir, seed=train_cfg.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), path=data_cfg.path, state=data_state)

    writer = metrics_lib.MetricWriter(workdir, enabled=primary)
    peak = train_cfg.peak_flops or metrics_lib.peak_flops()
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    summary = {"start_step": start, "steps": train_cfg.steps, "preempted": False}
    end = train_cfg.steps if stop_after is None else min(train_cfg.steps, start + stop_after)
    handler = ckpt_lib.install_preemption_handler()
    bar = tqdm(total=end, initial=start, disable=not primary, desc="train", dynamic_ncols=True)
    pending, last_good = None, manager.latest_step()
    window = {"t": time.perf_counter(), "step": start}

    def global_batch():
        return sharding.make_global_batch(next(train_iter), mesh, rules)

    def settle(pending) -> dict[str, float]:
        """Fetch a finished step's metrics, stop on NaN, log on schedule."""
        step, metrics = pending
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["train/loss"]):
            raise TrainingDivergedError(
                f"loss became {metrics['train/loss']} at step {step}; the last good checkpoint "
                f"(step {last_good}) is kept in {workdir}. Lower OptimizerConfig.peak_lr, keep "
                "clip_norm on, or train in float32 (ModelConfig.dtype='float32'), then rerun.")
        if step % train_cfg.log_every == 0 or step == end:
            now = time.perf_counter()
            rate = tokens_per_step * (step - window["step"]) / max(now - window["t"], 1e-9)
            window.update(t=now, step=step)
            metrics |= {"tokens_per_s": rate, "mfu": metrics_lib.mfu(
                rate, model_cfg, train_cfg.seq_len, jax.device_count(), peak)}
            writer.write(step, metrics)
            bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{rate:,.0f}",
                            mfu=f"{metrics['mfu']:.1%}")
        summary["train/loss"] = metrics["train/loss"]
        return metrics

    try:
        mesh_context = sharding.use_mesh(mesh, rules)
        mesh_context.__enter__()
        if start < end:
            batch = global_batch()
            t0 = time.perf_counter()
            compiled = trainer.train_step.lower(state, batch).compile()
            summary["compile_s"] = time.perf_counter() - t0
            log.info("train_step compiled in %.1fs", summary["compile_s"])
            window["t"] = time.perf_counter()
        for step in range(start + 1, end + 1):
            state, metrics = compiled(state, batch)
            if pending is not None:
                settle(pending)
            pending = (step, metrics)
            bar.update(1)
            boundary = (step % train_cfg.checkpoint_every == 0 or step == end
                        or handler.requested)
            if boundary or step % train_cfg.eval_every == 0:
                settle(pending)  # never save (or evaluate) a step whose loss is unchecked
                pending = None
            if step % train_cfg.eval_every == 0 or step == train_cfg.steps:
                ev = evaluate(trainer, state.params, eval_factory, train_cfg.eval_batches)
                writer.write(step, ev)
                summary |= ev
                text = preview(model_cfg, state.params, tokenizer, train_cfg.sample_prompt,
                               train_cfg.sample_tokens, step)
                writer.write_text(step, "sample", text)
                bar.write(f"step {step}: eval loss {ev['eval/loss']:.3f} "
                          f"(ppl {ev['eval/perplexity']:.1f})\n--- sample ---\n{text}\n---")
                summary["sample"] = text
            if boundary:
                manager.save(step, state, {"data": train_iter.get_state()}, force=True)
                last_good = step
            if handler.requested:
                summary["preempted"] = True
                bar.write(f"preemption signal: saved step {step}, exiting")
                break
            if step < end:
                batch = global_batch()
        if pending is not None:
            settle(pending)
    finally:
        mesh_context.__exit__(None, None, None)
        bar.close()
        handler.close()
        manager.wait()
        manager.close()
        writer.close()
    summary["end_step"] = int(jax.device_get(state.step))
    tokens = summary["end_step"] - start
    summary["tokens_trained"] = tokens * tokens_per_step
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
