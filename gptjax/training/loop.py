"""The training loop: data → jitted steps → metrics → eval hooks → checkpoints.

Metrics are fetched one step late (the device runs step s+1 while the host
reads step s), except before a checkpoint or an eval, where the host waits so
that a NaN step is never saved. The same command on the same workdir resumes
exactly: params, optimizer state, RNG and the data iterator's position are
all in the checkpoint. Whether a step is saved is the checkpoint module's
call (`CheckpointManager.should_save`). Eval-time extras (sample previews,
task exact match) are hooks the caller supplies (`gptjax.evals.hooks`): this
module imports no evals or inference code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import gin
import jax
from etils import epath
from tqdm.auto import tqdm

from gptjax.config import ModelConfig
from gptjax.data.config import DataConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.models import family, flops
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.training import batches
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training import metrics as metrics_lib
from gptjax.training import workdir as workdir_lib
from gptjax.training.eval_loss import weighted_mean_loss
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig, Trainer, abstract_state, make_trainer

log = logging.getLogger("gptjax")

# A hook runs at every eval step: (step, params) -> (metrics merged into the eval row, a text
# shown and written as the step's sample; "" for none).
Hook = Callable[[int, Any], tuple[dict[str, float], str]]
# What `train(hooks=...)` takes: it builds the hooks once the run's tokenizer is known.
MakeHooks = Callable[[ModelConfig, DataConfig, TrainConfig, Tokenizer], Sequence[Hook]]


class TrainingDivergedError(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient; the last good checkpoint
    is kept."""


def setup_compilation_cache(path: str | None) -> None:
    """Persistent XLA compilation cache: a rerun skips compiles it has seen."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _save_run_files(workdir: str, configs: dict) -> None:
    """The resolved config (gin syntax and JSON, with the model family) next to the checkpoints."""
    workdir = epath.Path(workdir)  # a local path, or gs:// and any other etils.epath URI
    (workdir / "config.gin").write_text(gin.config_str())
    raw = {
        "family": family.family_of(configs["model"]).name,
        **{k: dataclasses.asdict(v) for k, v in configs.items()},
    }
    (workdir / "config.json").write_text(json.dumps(raw, indent=2))


def evaluate(trainer: Trainer, params, batches: Iterable[dict], n_batches: int) -> dict[str, float]:
    """Token-weighted mean eval loss and perplexity over up to `n_batches` global batches
    (`weighted_mean_loss` over `Trainer.eval_step`)."""
    out = weighted_mean_loss(lambda batch: trainer.eval_step(params, batch), batches, n_batches)
    return {"eval/loss": out["loss"], "eval/perplexity": out["perplexity"]}


def fresh_state(trainer: Trainer, train_cfg: TrainConfig) -> tuple[Any, int | None]:
    """(step-0 train state, init_from's step or None) of a run without a checkpoint: from
    `train_cfg.init_from`'s params (`workdir.init_state_from`), or a random init."""
    if not train_cfg.init_from:
        return trainer.init_train_state(train_cfg.seed), None
    return workdir_lib.init_state_from(train_cfg.init_from, trainer, train_cfg.seed)


def _restore(
    manager: ckpt_lib.CheckpointManager, trainer: Trainer, train_iter, train_cfg: TrainConfig
) -> tuple[int, Any, int, int | None]:
    """(start step, train state, updates skipped so far, init_from's step): from the newest
    good checkpoint (the data iterator put back where it was; init_from is then ignored),
    or `fresh_state` at step 0."""
    restored = manager.restore(abstract_state(trainer))
    if restored is None:
        state, source_step = fresh_state(trainer, train_cfg)
        return 0, state, 0, source_step
    start, state, meta = restored
    train_iter.set_state(meta["data"])
    log.info("resumed from step %d in %s", start, manager.workdir)
    if train_cfg.init_from:
        log.info("TrainConfig.init_from=%r is ignored: the run resumes", train_cfg.init_from)
    return start, state, int(meta.get("skipped_updates", 0)), None


@dataclasses.dataclass
class Throughput:
    """Tokens/s between logged rows, not counting paused time (evals, hooks, checkpoints)."""

    tokens_per_step: int
    step: int
    t: float = dataclasses.field(default_factory=time.perf_counter)
    paused: float = 0.0

    @contextlib.contextmanager
    def pause(self):
        """Time spent inside does not count as training time."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    def rate(self, step: int) -> float:
        """Tokens/s since the last call (or the start), then start a new window at `step`."""
        now = time.perf_counter()
        busy = max(now - self.t - self.paused, 1e-9)
        rate = self.tokens_per_step * (step - self.step) / busy
        self.t, self.step, self.paused = now, step, 0.0
        return rate


@dataclasses.dataclass
class _Run:
    """One invocation of `train`: its parts, and what the loop advances step by step."""

    workdir: str
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    trainer: Trainer
    data: batches.RunData
    manager: ckpt_lib.CheckpointManager
    writer: metrics_lib.MetricWriter
    hooks: Sequence[Hook]
    state: Any
    start: int
    end: int
    skipped: int  # updates skipped over the whole run (kept in the checkpoints)
    summary: dict
    clock: Throughput
    primary: bool
    peak: float | None
    streak: int = 0  # updates skipped in a row, up to the last settled step
    last_good: int | None = None  # the newest checkpoint on disk
    bar: Any = None

    def say(self, msg: str) -> None:
        if self.primary:
            tqdm.write(msg)


def _settle(run: _Run, step: int, metrics) -> dict[str, float]:
    """Fetch a finished step's metrics (this waits for it); count skipped updates and
    stop when more than `max_consecutive_skips` come in a row."""
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    skipped = metrics["update_skipped"] > 0
    run.skipped += int(skipped)
    run.streak = run.streak + 1 if skipped else 0
    metrics["skipped_updates"] = run.skipped
    if run.streak > run.train_cfg.max_consecutive_skips:
        raise TrainingDivergedError(
            f"{run.streak} updates in a row, up to step {step}, had a non-finite loss "
            f"({metrics['train/loss']}) or gradient norm ({metrics['grad_norm']}) and were "
            f"skipped; stopped before saving. The last good checkpoint (step {run.last_good}) "
            f"is kept in {run.workdir}. Lower OptimizerConfig.peak_lr, keep clip_norm on, or "
            "train in float32 (ModelConfig.dtype='float32'), then rerun."
        )
    if skipped:
        log.warning(
            "step %d: non-finite loss %s or gradient norm %s; update skipped (params unchanged)",
            step,
            metrics["train/loss"],
            metrics["grad_norm"],
        )
    else:
        run.summary["train/loss"] = metrics["train/loss"]
    return metrics


def _log_row(run: _Run, step: int, metrics: dict) -> None:
    """Write a step's metrics with throughput (tokens/s, MFU where the peak is known)."""
    rate = run.clock.rate(step)
    metrics["tokens_per_s"] = rate
    mfu = metrics_lib.mfu(rate, run.model_cfg, run.train_cfg.seq_len, jax.device_count(), run.peak)
    if mfu is not None:
        metrics["mfu"] = mfu
    run.writer.write(step, metrics)
    run.bar.set_postfix(
        loss=f"{metrics['train/loss']:.3f}",
        tok_s=f"{rate:,.0f}",
        **({} if mfu is None else {"mfu": f"{mfu:.1%}"}),
    )


def _show(name: str, value: float) -> str:
    """A hook's metric for the console: fractions (exact match, accuracy) as percents."""
    return f"{value:.1%}" if name.endswith(("exact_match", "accuracy")) else f"{value:.4g}"


def _eval(run: _Run, step: int) -> dict[str, float]:
    """Eval loss and perplexity, then each hook's metrics and text (shown, and written as the
    step's sample)."""
    params = run.state.params
    ev = evaluate(run.trainer, params, run.data.eval_batches(), run.train_cfg.eval_batches)
    texts = []
    for hook in run.hooks:
        metrics, text = hook(step, params)
        ev |= metrics
        texts.append(text)
    extras = "".join(
        f", {k.removeprefix('eval/').replace('_', ' ')} {_show(k, v)}"
        for k, v in ev.items()
        if k not in ("eval/loss", "eval/perplexity")
    )
    text = "\n".join(t for t in texts if t)
    run.say(
        f"step {step}: eval loss {ev['eval/loss']:.3f} (ppl {ev['eval/perplexity']:.1f})"
        f"{extras}" + (f"\n--- sample ---\n{text}\n---" if text else "")
    )
    run.summary.update(ev)
    if text:
        run.writer.write_text(step, "sample", text)
        run.summary["sample"] = text
    return ev


def _save(run: _Run, step: int) -> None:
    """Checkpoint `step` (CheckpointManager.should_save said so) with the data position."""
    with run.clock.pause():
        run.manager.save(
            step,
            run.state,
            {"data": run.data.train_iter.get_state(), "skipped_updates": run.skipped},
            force=True,
        )
    run.last_good = step


def _compile(run: _Run, batch: dict):
    """The train step compiled for the run's state and batch shapes (timed, logged)."""
    t0 = time.perf_counter()
    compiled = run.trainer.train_step.lower(run.state, batch).compile()
    run.summary["compile_s"] = time.perf_counter() - t0
    log.info("train_step compiled in %.1fs", run.summary["compile_s"])
    if run.peak is not None:
        log.info(
            "MFU: %s; %.3g model FLOPs per token, peak %.3g FLOP/s per device",
            flops.ATTENTION_CONVENTION,
            metrics_lib.flops_per_token(run.model_cfg, run.train_cfg.seq_len),
            run.peak,
        )
    run.clock.t = time.perf_counter()
    return compiled


def _train_steps(run: _Run, handler: ckpt_lib.PreemptionHandler) -> None:
    """Steps start+1 .. end. A step's metrics are read during the next step, except at eval
    and save steps, which wait for theirs: an unchecked update is never saved or evaluated."""
    if run.start >= run.end:
        return
    cfg, batch = run.train_cfg, run.data.train_batch(run.start)
    compiled, pending = _compile(run, batch), None
    for step in range(run.start + 1, run.end + 1):
        run.state, metrics = compiled(run.state, batch)
        run.bar.update(1)
        if pending is not None:  # the previous step: finished by now, so no stall
            prev_step, prev = pending[0], _settle(run, *pending)
            if prev_step % cfg.log_every == 0:
                _log_row(run, prev_step, prev)
        pending = (step, metrics)
        stop = handler.should_stop(step)  # every process agrees on the step
        save = run.manager.should_save(step, last_step=run.end, preempted=stop)
        evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
        if save or evaluate_now:
            current, pending = _settle(run, *pending), None
            if evaluate_now:
                with run.clock.pause():
                    current |= _eval(run, step)
            if evaluate_now or step % cfg.log_every == 0 or step == run.end:
                _log_row(run, step, current)
        if save:
            _save(run, step)
        if stop:
            run.summary["preempted"] = True
            run.say(f"preemption signal: saved step {step}, exiting")
            break
        if step < run.end:
            batch = run.data.train_batch(step)


def _finish(run: _Run) -> dict:
    """The summary (also written to summary.json): steps, real tokens trained, skips."""
    summary = run.summary
    summary["end_step"] = int(jax.device_get(run.state.step))
    summary["tokens_trained"] = run.data.ramp.tokens(run.start, summary["end_step"])
    summary["skipped_updates"] = run.skipped
    if run.primary:
        (epath.Path(run.workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _start(
    workdir: str,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    opt_cfg: OptimizerConfig,
    data_cfg: DataConfig,
    trainer: Trainer,
    hooks: MakeHooks | None,
    stop_after: int | None,
) -> _Run:
    """Data, hooks, the run files and the restored (or fresh) state of one invocation."""
    primary = jax.process_index() == 0
    ramp = batches.BatchRamp(opt_cfg, train_cfg)
    if ramp.enabled and not family.family_of(model_cfg).causal_lm:
        raise ValueError(
            "OptimizerConfig.batch_ramp_tokens (GPT-3's batch ramp) is for decoder "
            "models; set it to 0 for encoder and seq2seq runs."
        )
    manager = ckpt_lib.CheckpointManager(
        workdir, checkpoint_every=train_cfg.checkpoint_every, max_to_keep=train_cfg.keep_checkpoints
    )
    if train_cfg.init_from and manager.latest_step() is None:  # a resume ignores init_from
        # Before any data work: the source's model must be this one, its tokenizer the run's.
        workdir_lib.source_config(train_cfg.init_from, model_cfg)
        workdir_lib.adopt_tokenizer(train_cfg.init_from, workdir, data_cfg, save=primary)
    tokenizer, train_iter, eval_factory = batches.prepare_data(
        workdir, model_cfg, data_cfg, train_cfg, primary
    )
    if primary:
        _save_run_files(
            workdir,
            {"model": model_cfg, "train": train_cfg, "optimizer": opt_cfg, "data": data_cfg},
        )
    run_hooks = list(hooks(model_cfg, data_cfg, train_cfg, tokenizer)) if hooks else []
    start, state, skipped, source_step = _restore(manager, trainer, train_iter, train_cfg)
    end = train_cfg.steps if stop_after is None else min(train_cfg.steps, start + stop_after)
    summary = {"start_step": start, "steps": train_cfg.steps, "preempted": False}
    if source_step is not None:
        summary |= {"init_from": train_cfg.init_from, "init_from_step": source_step}
    return _Run(
        workdir=workdir,
        model_cfg=model_cfg,
        train_cfg=train_cfg,
        trainer=trainer,
        data=batches.RunData(
            model_cfg,
            tokenizer,
            train_iter,
            eval_factory,
            ramp,
            train_cfg.seed,
            trainer.mesh,
            trainer.rules,
        ),
        manager=manager,
        writer=metrics_lib.MetricWriter(workdir, enabled=primary),
        hooks=run_hooks,
        state=state,
        start=start,
        end=end,
        skipped=skipped,
        summary=summary,
        clock=Throughput(train_cfg.batch_size * train_cfg.seq_len, start),
        primary=primary,
        peak=train_cfg.peak_flops or metrics_lib.peak_flops(),
        last_good=manager.latest_step(),
    )


def train(
    workdir: str,
    *,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    opt_cfg: OptimizerConfig | None = None,
    data_cfg: DataConfig | None = None,
    mesh_cfg: sharding.MeshConfig | None = None,
    hooks: MakeHooks | None = None,
    stop_after: int | None = None,
    dry_run: bool = False,
) -> dict:
    """Train (or resume) a model in `workdir`; returns a summary dict.

    Configs default to what gin binds. `hooks(model_cfg, data_cfg, train_cfg, tokenizer)`
    builds the hooks run at every eval step (`gptjax.evals.hooks.default_hooks`: the sample
    preview or task exact match); without it an eval is loss and perplexity only.
    `stop_after` ends this invocation after that many steps, as a preemption would (the
    final checkpoint is written); `dry_run` compiles the train step for the configured mesh
    and reports its memory and FLOPs without training.
    """
    model_cfg, train_cfg = model_cfg or family.model_config(), train_cfg or TrainConfig()
    opt_cfg, data_cfg = opt_cfg or OptimizerConfig(), data_cfg or DataConfig()
    mesh_cfg = mesh_cfg or sharding.MeshConfig()
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    setup_compilation_cache(train_cfg.compilation_cache_dir)
    mesh = sharding.make_mesh(mesh_cfg)
    rules = logical.logical_axis_rules(mesh_cfg.rules)
    trainer = make_trainer(model_cfg, opt_cfg, train_cfg.steps, mesh, rules, train_cfg.batch_size)
    if train_cfg.seq_len > model_cfg.max_len:
        raise ValueError(
            f"TrainConfig.seq_len={train_cfg.seq_len} exceeds ModelConfig.max_len="
            f"{model_cfg.max_len}."
        )
    if dry_run:
        from gptjax.training.dry_run import report

        return report(trainer, train_cfg)
    run = _start(workdir, model_cfg, train_cfg, opt_cfg, data_cfg, trainer, hooks, stop_after)
    with contextlib.ExitStack() as stack:
        stack.enter_context(logical.use_mesh(mesh, rules))
        handler = stack.enter_context(ckpt_lib.install_preemption_handler())
        stack.callback(run.writer.close)
        stack.callback(run.manager.close)
        stack.callback(run.manager.wait)
        run.bar = stack.enter_context(
            tqdm(
                total=run.end,
                initial=run.start,
                disable=not run.primary,
                desc="train",
                dynamic_ncols=True,
            )
        )
        _train_steps(run, handler)
    return _finish(run)
