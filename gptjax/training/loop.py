"""The training loop: data → jitted steps → metrics, evals, samples, checkpoints.

Metrics are fetched one step late (the device runs step s+1 while the host
reads step s), except before a checkpoint, where the host waits so that a
NaN step is never saved. The same command on the same workdir resumes
exactly: params, optimizer state, RNG and the data iterator's position are
all in the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time

import gin
import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from gptjax.training import checkpoint as ckpt_lib
from gptjax.models import family
from gptjax.training import metrics as metrics_lib
from gptjax.inference import preview as preview_lib
from gptjax.parallel import mesh as sharding
from gptjax.config import ModelConfig
from gptjax.data.config import DataConfig, workdir_tokenizer
from gptjax.data import numbers
from gptjax.data.pipeline import make_datasets
from gptjax.data.tokenizer import check_vocab
from gptjax.training.optimizer import OptimizerConfig, batch_size_at
from gptjax.training.step import TrainConfig, Trainer, abstract_state, make_trainer

log = logging.getLogger("gptjax")


class TrainingDivergedError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient; the last good checkpoint
    is kept."""


class BatchRamp:
    """GPT-3's batch-size ramp with static shapes: each step feeds the full batch, of which
    only the first `rows(step)` rows are real data; the rest are padding, masked out."""

    def __init__(self, opt_cfg: OptimizerConfig, train_cfg: TrainConfig):
        self.opt_cfg, self.train_cfg = opt_cfg, train_cfg
        self.enabled = opt_cfg.batch_ramp_tokens > 0
        self._rows: list[int] = []  # rows used at each step, from step 0 (cheap to replay)
        self._rows_seen = 0  # sum(self._rows), kept so each new step costs O(1)

    def rows(self, step: int) -> int:
        """Real rows of the global batch at `step` (0-based): all of them without a ramp."""
        if not self.enabled:
            return self.train_cfg.batch_size
        full_tokens = self.train_cfg.batch_size * self.train_cfg.seq_len
        while len(self._rows) <= step:
            seen = self._rows_seen * self.train_cfg.seq_len
            self._rows.append(batch_size_at(seen, self.opt_cfg, full_tokens,
                                            self.train_cfg.seq_len))
            self._rows_seen += self._rows[-1]
        return self._rows[step]

    def tokens(self, start: int, end: int) -> int:
        """Real tokens trained on over steps [start, end)."""
        return sum(self.rows(s) for s in range(start, end)) * self.train_cfg.seq_len


def mask_padding(local: dict, real_rows: int) -> dict:
    """Zero the loss mask of a local batch's padding rows (rows >= real_rows), multiplying any
    mask the batch already has (a task dataset's answer mask), never replacing it."""
    if real_rows == family.batch_rows(local):  # every row real (any family's batch)
        return local
    b, t_plus_1 = local["tokens"].shape
    rows_B1 = (np.arange(b) < real_rows)[:, None].astype(np.float32)
    mask_BT = np.asarray(local.get("loss_mask", np.ones((b, t_plus_1 - 1), np.float32)))
    return {**local, "loss_mask": mask_BT.astype(np.float32) * rows_B1}


def setup_compilation_cache(path: str | None) -> None:
    """Persistent XLA compilation cache: a rerun skips compiles it has seen."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def evaluate(trainer: Trainer, params, eval_iter_factory, n_batches: int,
             prepare=lambda i, batch: batch) -> dict[str, float]:
    """Mean eval loss and perplexity over up to `n_batches` validation batches;
    `prepare(i, batch)` turns a corpus batch into the model family's objective."""
    total, count = 0.0, 0.0
    for i, batch in enumerate(eval_iter_factory()):
        if i >= n_batches:
            break
        out = jax.device_get(trainer.eval_step(params, sharding.make_global_batch(
            prepare(i, batch), trainer.mesh, trainer.rules)))
        total, count = total + float(out["loss_sum"]), count + float(out["tokens"])
    loss = total / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def _save_run_files(workdir: str, configs: dict) -> None:
    """The resolved config (gin syntax and JSON, with the model family) next to the checkpoints."""
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.config_str())
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"family": family.family_of(configs["model"]).name,
                   **{k: dataclasses.asdict(v) for k, v in configs.items()}}, f, indent=2)


def run_datasets(data_cfg: DataConfig, model_cfg: ModelConfig, tokenizer, train_cfg: TrainConfig):
    """(train iterator, eval factory): a corpus's windows, or a task in the family's format."""
    shard = dict(seed=train_cfg.seed, process_index=jax.process_index(),
                 process_count=jax.process_count())
    if data_cfg.dataset in numbers.TASKS:
        return numbers.make_task_datasets(
            data_cfg.dataset, family.family_of(model_cfg).task_format, tokenizer, train_cfg.seq_len,
            train_cfg.batch_size, max_number=data_cfg.task_max_number, **shard)
    return make_datasets(data_cfg.dataset, tokenizer, train_cfg.seq_len, train_cfg.batch_size,
                         data_cfg.resolved_data_dir, path=data_cfg.path, **shard)


def task_metrics(model_cfg: ModelConfig, params, tokenizer, data_cfg: DataConfig,
                 train_cfg: TrainConfig, n_examples: int) -> tuple[dict, str]:
    """Exact match of greedy decoding on validation examples of a seq2seq task, and a preview."""
    from gptjax.evals import exact_match as task_eval
    pairs = numbers.pairs(data_cfg.dataset, "validation", data_cfg.task_max_number)
    pairs = pairs[::max(1, len(pairs) // n_examples)][:n_examples]  # spread over the range
    kw = dict(task=data_cfg.dataset, seq_len=train_cfg.seq_len,
              max_number=data_cfg.task_max_number)
    em = task_eval.exact_match(model_cfg, params, tokenizer, pairs, **kw)
    return {"eval/exact_match": em}, task_eval.preview(model_cfg, params, tokenizer, pairs, **kw)


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
    model_cfg, train_cfg = model_cfg or family.model_config(), train_cfg or TrainConfig()
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
        from gptjax.training.dry_run import report
        return report(trainer, train_cfg)

    # Process 0 builds the dataset, tokenizer and token cache first; the others wait at the
    # barrier and then read what it wrote (a shared data_dir and workdir), so they never race.
    multi = jax.process_count() > 1
    if multi and not primary:
        multihost_utils.sync_global_devices("gptjax_prepare_data")
    tokenizer = workdir_tokenizer(workdir, data_cfg, save=primary)
    check_vocab(tokenizer, model_cfg.vocab_size)
    train_iter, eval_factory = run_datasets(data_cfg, model_cfg, tokenizer, train_cfg)
    if multi and primary:
        multihost_utils.sync_global_devices("gptjax_prepare_data")
    if primary:
        _save_run_files(workdir, {"model": model_cfg, "train": train_cfg, "optimizer": opt_cfg,
                                  "data": data_cfg})

    manager = ckpt_lib.CheckpointManager(workdir, checkpoint_every=train_cfg.checkpoint_every,
                                         max_to_keep=train_cfg.keep_checkpoints)
    restored = manager.restore(abstract_state(trainer))
    if restored is None:
        state = trainer.init_train_state(train_cfg.seed)
        start = 0
    else:
        start, state, meta = restored
        train_iter.set_state(meta["data"])
        log.info("resumed from step %d in %s", start, workdir)

    writer = metrics_lib.MetricWriter(workdir, enabled=primary)
    peak = train_cfg.peak_flops or metrics_lib.peak_flops()
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    summary = {"start_step": start, "steps": train_cfg.steps, "preempted": False}
    skips = {"total": int(meta.get("skipped_updates", 0)) if restored else 0, "run": 0}
    end = train_cfg.steps if stop_after is None else min(train_cfg.steps, start + stop_after)
    ramp = BatchRamp(opt_cfg, train_cfg)
    if ramp.enabled and not family.family_of(model_cfg).causal_lm:
        raise ValueError("OptimizerConfig.batch_ramp_tokens (GPT-3's batch ramp) is for decoder "
                         "models; set it to 0 for encoder and seq2seq runs.")
    is_task = data_cfg.dataset in numbers.TASKS
    base_key = jax.random.key(train_cfg.seed)

    def prepare(step: int, local: dict) -> dict:
        """The family's objective from a corpus batch (BERT masking is keyed by the step)."""
        return family.from_windows(model_cfg, local, tokenizer, jax.random.fold_in(
            jax.random.fold_in(base_key, jax.process_index()), step))
    say = (lambda msg: tqdm.write(msg)) if primary else (lambda msg: None)
    last_good = manager.latest_step()
    window = {"t": time.perf_counter(), "step": start, "paused": 0.0}

    def global_batch(step: int) -> dict:
        """The batch of `step` (0-based): under GPT-3's batch ramp only its first
        `ramp.rows(step)` rows are data (taken from the iterator), the rest masked padding."""
        local, real = train_iter.take(ramp.rows(step))
        return sharding.make_global_batch(mask_padding(prepare(step, local), real), mesh, rules)

    def settle(step: int, metrics) -> dict[str, float]:
        """Fetch a finished step's metrics (this waits for it); count skipped updates and
        stop when more than `max_consecutive_skips` come in a row."""
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        skipped = metrics["update_skipped"] > 0
        skips["total"] += int(skipped)
        skips["run"] = skips["run"] + 1 if skipped else 0
        metrics["skipped_updates"] = skips["total"]
        if skips["run"] > train_cfg.max_consecutive_skips:
            raise TrainingDivergedError(
                f"{skips['run']} updates in a row, up to step {step}, had a non-finite loss "
                f"({metrics['train/loss']}) or gradient norm ({metrics['grad_norm']}) and were "
                f"skipped; stopped before saving. The last good checkpoint (step {last_good}) "
                f"is kept in {workdir}. Lower OptimizerConfig.peak_lr, keep clip_norm on, or "
                "train in float32 (ModelConfig.dtype='float32'), then rerun.")
        if skipped:
            log.warning("step %d: non-finite loss %s or gradient norm %s; update skipped "
                        "(params unchanged)", step, metrics["train/loss"], metrics["grad_norm"])
        else:
            summary["train/loss"] = metrics["train/loss"]
        return metrics

    def log_row(step: int, metrics: dict) -> None:
        """Throughput since the last row, not counting eval, sample and checkpoint time."""
        now = time.perf_counter()
        busy = max(now - window["t"] - window["paused"], 1e-9)
        rate = tokens_per_step * (step - window["step"]) / busy
        window.update(t=now, step=step, paused=0.0)
        metrics["tokens_per_s"] = rate
        mfu = metrics_lib.mfu(rate, model_cfg, train_cfg.seq_len, jax.device_count(), peak)
        if mfu is not None:
            metrics["mfu"] = mfu
        writer.write(step, metrics)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{rate:,.0f}",
                        **({} if mfu is None else {"mfu": f"{mfu:.1%}"}))

    def eval_and_preview(step: int) -> dict:
        ev = evaluate(trainer, state.params, eval_factory, train_cfg.eval_batches,
                      lambda i, b: prepare(2**31 + i, b))  # the same masks at every eval
        if is_task:
            task_ev, text = task_metrics(model_cfg, state.params, tokenizer, data_cfg, train_cfg,
                                         train_cfg.eval_batches * train_cfg.batch_size)
            ev |= task_ev
        else:
            text = preview_lib.preview(model_cfg, state.params, tokenizer,
                                       train_cfg.sample_prompt, train_cfg.sample_tokens, step)
        writer.write_text(step, "sample", text)
        em = f", exact match {ev['eval/exact_match']:.1%}" if "eval/exact_match" in ev else ""
        say(f"step {step}: eval loss {ev['eval/loss']:.3f} (ppl {ev['eval/perplexity']:.1f}){em}"
            f"\n--- sample ---\n{text}\n---")
        summary.update(ev, sample=text)
        return ev

    with contextlib.ExitStack() as stack:
        stack.enter_context(sharding.use_mesh(mesh, rules))
        handler = stack.enter_context(ckpt_lib.install_preemption_handler())
        stack.callback(writer.close)
        stack.callback(manager.close)
        stack.callback(manager.wait)
        bar = stack.enter_context(tqdm(total=end, initial=start, disable=not primary,
                                       desc="train", dynamic_ncols=True))
        pending = None
        if start < end:
            batch = global_batch(start)
            t0 = time.perf_counter()
            compiled = trainer.train_step.lower(state, batch).compile()
            summary["compile_s"] = time.perf_counter() - t0
            log.info("train_step compiled in %.1fs", summary["compile_s"])
            if peak is not None:
                log.info("MFU: %s; %.3g model FLOPs per token, peak %.3g FLOP/s per device",
                         metrics_lib.ATTENTION_CONVENTION,
                         metrics_lib.flops_per_token(model_cfg, train_cfg.seq_len), peak)
            window["t"] = time.perf_counter()
        for step in range(start + 1, end + 1):
            state, metrics = compiled(state, batch)
            bar.update(1)
            if pending is not None:  # the previous step: finished by now, so no stall
                prev_step, prev = pending[0], settle(*pending)
                if prev_step % train_cfg.log_every == 0:
                    log_row(prev_step, prev)
            pending = (step, metrics)
            stop = handler.should_stop(step)  # every process agrees on the step
            save = stop or step % train_cfg.checkpoint_every == 0 or step == end
            evaluate_now = step % train_cfg.eval_every == 0 or step == train_cfg.steps
            if save or evaluate_now:  # never save or evaluate a step whose update is unchecked
                current = settle(*pending)
                pending = None
                t_pause = time.perf_counter()
                if evaluate_now:
                    current |= eval_and_preview(step)
                window["paused"] += time.perf_counter() - t_pause
                if evaluate_now or step % train_cfg.log_every == 0 or step == end:
                    log_row(step, current)
            if save:
                t_pause = time.perf_counter()
                manager.save(step, state, {"data": train_iter.get_state(),
                                           "skipped_updates": skips["total"]}, force=True)
                window["paused"] += time.perf_counter() - t_pause
                last_good = step
            if stop:
                summary["preempted"] = True
                say(f"preemption signal: saved step {step}, exiting")
                break
            if step < end:
                batch = global_batch(step)
    summary["end_step"] = int(jax.device_get(state.step))
    summary["tokens_trained"] = ramp.tokens(start, summary["end_step"])  # real rows only
    summary["skipped_updates"] = skips["total"]
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
