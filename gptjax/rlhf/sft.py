"""InstructGPT stage 1: supervised fine-tuning on prompt/response pairs, loss on responses only.

The model should learn to *answer*, not to predict prompts (which the labelers did not write and
which PPO never samples), so each example carries a `loss_mask` that is 1 exactly where the target
is a response token (its end-of-turn included). That is all SFT adds: the jitted `train_step` of
`training/step.py` already weighs the cross-entropy by `loss_mask`, so SFT reuses it unchanged,
with its shardings and donation; its held-out loss is the one eval path,
`eval_loss.weighted_mean_loss`.

Without a pretrained workdir (`SFTConfig.init_from`), a short unmasked "pretraining" phase on the
task's plain-text corpus runs first, so the SFT model also has an LM loss worth protecting; PPO-ptx
mixes that corpus back in. With one, SFT starts from its params and tokenizer
(`workdir.init_params_from`: params only, a fresh optimizer, step 0).

With `SFTConfig.lora_rank` > 0 the SFT steps train low-rank adapters of the whole policy
(`models.lora`; the pretraining phase, if any, still trains every param), with optimizer state
for the adapters only; the saved policy is the merged one, ordinary params that every reader
of a policy workdir loads unchanged.

Every stage saves its checkpoint once, last (`finished_stage`): a stage workdir that holds one
has finished, and running the stage there again returns its summary instead of training over it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from gptjax.config import ModelConfig
from gptjax.data.config import DataConfig
from gptjax.data.pipeline import encode_documents, pack_windows
from gptjax.data.tokenizer import Tokenizer, check_vocab
from gptjax.models import family, lora
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.rlhf import chat, tasks
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training import metrics as metrics_lib
from gptjax.training import step as step_lib
from gptjax.training import workdir as workdir_lib
from gptjax.training.eval_loss import weighted_mean_loss
from gptjax.training.optimizer import OptimizerConfig, make_optimizer, make_schedule
from gptjax.training.step import TrainConfig, Trainer, TrainState, make_trainer

log = logging.getLogger("gptjax")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Stage 1 hyper-parameters (the optimizer is `sft/OptimizerConfig` in gin).

    pretrain_steps: unmasked LM steps on the task corpus first (skipped with init_from).
    steps: SFT steps on demonstrations; batch_size in sequences of seq_len + 1 tokens.
    n_demonstrations: distinct prompt/response pairs (InstructGPT: ~13k prompts).
    init_from: a workdir to start from (a `gptjax train` run, an imported GPT-2, an earlier
    policy): its params and tokenizer; its model config unless `run_sft` is given one (then
    checked against it: `workdir.check_compatible`).
    tokenizer_vocab_size: the task BPE's size when starting from scratch.
    lora_rank: 0 trains every param; r > 0 trains rank-r adapters of the policy's attention
    and MLP kernels in the SFT steps (`lora.LoRAConfig`), scaled by lora_alpha / r.
    """

    steps: int = 300
    pretrain_steps: int = 200
    batch_size: int = 32
    seq_len: int = 48
    n_demonstrations: int = 4000
    init_from: str | None = None
    tokenizer_vocab_size: int = 512
    log_every: int = 50
    seed: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "n_demonstrations", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SFTConfig.{name} must be positive, got {getattr(self, name)}")
        lora.from_rank(self.lora_rank, self.lora_alpha, "SFTConfig")  # a negative rank raises

    @property
    def lora(self) -> lora.LoRAConfig | None:
        """The SFT steps' LoRA, None for full fine-tuning (lora_rank 0)."""
        return lora.from_rank(self.lora_rank, self.lora_alpha, "SFTConfig")


def stage_mesh(mesh_cfg: sharding.MeshConfig | None = None):
    """(mesh, rules) of a stage; a mesh with fixed sizes takes only that many devices."""
    mesh_cfg = mesh_cfg or sharding.MeshConfig()
    sizes = list(mesh_cfg.shape.values())
    devices = None if -1 in sizes else jax.devices()[: math.prod(sizes)]
    return sharding.make_mesh(mesh_cfg, devices), logical.logical_axis_rules(mesh_cfg.rules)


def make_example(
    prompt_ids: Sequence[int], response_ids: Sequence[int], seq_len: int, pad_id: int
) -> tuple[Int[Array, " T1"], Int[Array, " T"]]:
    """(tokens of T + 1, loss_mask of T): right-padded, loss only where the target is a response.

    A prompt that does not fit loses its oldest tokens (chat history is truncated the same way);
    a response that does not fit is an error, since training on a cut answer teaches cutting.
    """
    if len(response_ids) > seq_len:
        raise ValueError(
            f"a response of {len(response_ids)} tokens does not fit SFTConfig."
            f"seq_len={seq_len}; raise seq_len or shorten the demonstrations"
        )
    prompt_ids = list(prompt_ids)[-(seq_len + 1 - len(response_ids)) :]
    ids = prompt_ids + list(response_ids)
    tokens = np.full(seq_len + 1, pad_id, np.int32)
    tokens[: len(ids)] = ids
    loss_mask = np.zeros(seq_len, np.int32)  # loss_mask[t] scores the prediction of tokens[t+1]
    loss_mask[len(prompt_ids) - 1 : len(ids) - 1] = 1
    return tokens, loss_mask


def demonstration_arrays(
    tokenizer: Tokenizer, pairs: Sequence[tuple[list, str]], seq_len: int
) -> dict[str, np.ndarray]:
    """All demonstrations as {'tokens': (N, T + 1), 'loss_mask': (N, T)} in the chat format."""
    rows = [
        make_example(
            chat.prompt_ids(tokenizer, p),
            chat.response_ids(tokenizer, r),
            seq_len,
            tokenizer.pad_id,
        )
        for p, r in pairs
    ]
    return {"tokens": np.stack([t for t, _ in rows]), "loss_mask": np.stack([m for _, m in rows])}


def corpus_windows(tokenizer: Tokenizer, documents: Sequence[str], seq_len: int) -> np.ndarray:
    """Plain-text documents packed into (N, T + 1) windows (the pretraining / ptx data)."""
    stream = encode_documents(documents, tokenizer, total=len(documents), desc="corpus")
    return np.ascontiguousarray(pack_windows(stream.astype(np.int32), seq_len))


def batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches of the rows of `arrays` (reshuffled every epoch)."""
    rng = np.random.default_rng(seed)
    n = len(next(iter(arrays.values())))
    if n < batch_size:
        raise ValueError(f"{n} examples are fewer than one batch of {batch_size}")
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield {k: v[order[i : i + batch_size]] for k, v in arrays.items()}


def lm_batches(windows: np.ndarray, batch_size: int, seed: int) -> Iterator[dict]:
    """Unmasked LM batches in the SFT batch layout (so one jitted step serves both)."""
    mask = np.ones((len(windows), windows.shape[1] - 1), np.int32)
    return batches({"tokens": windows, "loss_mask": mask}, batch_size, seed)


def save_policy(
    workdir: str,
    state: TrainState,
    cfg: ModelConfig,
    opt_cfg: OptimizerConfig,
    tokenizer: Tokenizer,
    train_cfg: TrainConfig,
    extra: dict | None = None,
) -> None:
    """A workdir that `gptjax sample`, `gptjax chat` and `load_run` read like a trained one."""
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(workdir)
    configs = {
        "model": dataclasses.asdict(cfg),
        "train": dataclasses.asdict(train_cfg),
        "optimizer": dataclasses.asdict(opt_cfg),
        "data": dataclasses.asdict(DataConfig(tokenizer_path=None)),
        "rlhf": extra or {},
    }
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(configs, f, indent=2)
    with ckpt_lib.CheckpointManager(workdir, max_to_keep=1) as manager:
        manager.save(int(jax.device_get(state.step)), state, {}, force=True)


def load_policy(workdir: str):
    """(model_cfg, params, tokenizer) of a policy workdir (SFT, PPO or `gptjax train`)."""
    cfg, params, tokenizer, _, _ = workdir_lib.load_run(workdir)
    return cfg, params, tokenizer


def finished_stage(workdir: str) -> dict | None:
    """The summary of the stage that already ran in `workdir`, or None if none did.

    A stage writes summary.json, then its one checkpoint, last: a checkpoint means the stage
    finished. It is kept, never trained over (the stage's init_from is then ignored), and
    a pipeline rerun after a crash goes on from the first unfinished stage.
    """
    if not os.path.isdir(os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)):
        return None
    with ckpt_lib.CheckpointManager(workdir, read_only=True) as manager:
        step = manager.latest_step()
    if step is None:
        return None
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{workdir!r} holds a checkpoint (step {step}) but no summary.json, so its stage "
            f"did not finish; move {os.path.join(workdir, ckpt_lib.CHECKPOINT_DIR)} away to "
            "run the stage again."
        )
    log.info("%s already holds its finished stage (step %d): not run again", workdir, step)
    with open(path) as f:
        return json.load(f)


def write_summary(workdir: str, summary: dict) -> None:
    """summary.json of a stage (before its checkpoint: see `finished_stage`)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def _train(
    trainer, state, batch_iter, n_steps: int, writer, prefix: str, log_every: int, start: int
) -> tuple[TrainState, float]:
    loss = float("nan")
    for i in range(1, n_steps + 1):
        batch = sharding.make_global_batch(next(batch_iter), trainer.mesh, trainer.rules)
        state, metrics = trainer.train_step(state, batch)
        if i % log_every == 0 or i == n_steps:
            loss = float(metrics["train/loss"])
            if not math.isfinite(loss):
                raise RuntimeError(f"{prefix} loss became {loss}; lower the learning rate")
            writer.write(start + i, {f"{prefix}/loss": loss, f"{prefix}/lr": float(metrics["lr"])})
            log.info("%s step %d: loss %.4f", prefix, i, loss)
    return state, loss


_eval_sums = jax.jit(family.eval_sums, static_argnums=0)  # jitted once per config


def masked_eval_loss(
    cfg: ModelConfig, params, arrays: dict[str, np.ndarray], batch_size: int
) -> float:
    """Mean masked loss over whole batches of `arrays` (`eval_loss.weighted_mean_loss`:
    token-weighted, like the train loss)."""
    n = len(arrays["tokens"]) // batch_size
    batches = (
        {k: jnp.asarray(v[i * batch_size : (i + 1) * batch_size]) for k, v in arrays.items()}
        for i in range(n)
    )
    return weighted_mean_loss(lambda b: _eval_sums(cfg, params, b), batches)["loss"]


def _starting_policy(sft_cfg: SFTConfig, model_cfg: ModelConfig | None, task):
    """(config, tokenizer): `init_from`'s (its config checked against `model_cfg` when one
    is given), or a fresh model's (`model_cfg`, else gin's ModelConfig) with a tokenizer
    trained on the task."""
    if sft_cfg.init_from:
        cfg = workdir_lib.source_config(sft_cfg.init_from, model_cfg)
        return cfg, workdir_lib.source_tokenizer(sft_cfg.init_from, required=True)
    tokenizer = tasks.build_tokenizer(task, sft_cfg.tokenizer_vocab_size, sft_cfg.seed)
    return model_cfg or ModelConfig(), tokenizer


def _initial_state(trainer, sft_cfg: SFTConfig) -> TrainState:
    """Step 0: `init_from`'s params on the trainer's shardings (fresh optimizer), or random."""
    if sft_cfg.init_from:
        return workdir_lib.init_state_from(sft_cfg.init_from, trainer, sft_cfg.seed)[0]
    return trainer.init_train_state(sft_cfg.seed)


def _base_params(trainer: Trainer, sft_cfg: SFTConfig):
    """The params LoRA adapts when SFT is the first phase: `init_from`'s on the trainer's
    shardings (no optimizer state for them), or a random init."""
    if sft_cfg.init_from:
        return workdir_lib.init_params_from(
            sft_cfg.init_from,
            trainer.cfg,
            trainer.mesh,
            trainer.rules,
            trainer.state_shardings.params,
        ).params
    return trainer.init_train_state(sft_cfg.seed).params


def make_lora_trainer(
    trainer: Trainer, opt_cfg: OptimizerConfig, sft_cfg: SFTConfig, base
) -> tuple[Trainer, TrainState]:
    """(trainer, step-0 state) of SFT over `sft_cfg.lora` adapters of `base` (the policy):
    `trainer`'s loss, batches and mesh, an optimizer (its own schedule over `sft_cfg.steps`)
    whose state covers the adapters only (`lora.freeze_frozen`)."""
    lcfg, cfg, mesh = sft_cfg.lora, trainer.cfg, trainer.mesh
    schedule = make_schedule(opt_cfg, sft_cfg.steps)
    optimizer = lora.freeze_frozen(make_optimizer(opt_cfg, sft_cfg.steps, schedule))
    k_adapters, k_rng = jax.random.split(jax.random.key(sft_cfg.seed + 1))
    params = lora.attach(lcfg, base, k_adapters)
    shardings = sharding.lora_shardings(
        lcfg, trainer.state_shardings.params, family.param_axes(cfg), mesh, trainer.rules
    )
    objective = lora.wrap_objective(lcfg, step_lib.family_objective(cfg))
    update = step_lib.make_update(objective, optimizer, opt_cfg.grad_accum_steps)
    train_step, state_shardings = step_lib.jit_train_step(
        step_lib.with_dropout_keys(update),
        optimizer,
        params,
        shardings,
        (trainer.batch_sharding,),
        mesh,
        step_lib._train_metrics(schedule),  # make_trainer's names: train/loss, lr
    )
    adapted = dataclasses.replace(
        trainer,
        optimizer=optimizer,
        schedule=schedule,
        state_shardings=state_shardings,
        train_step=train_step,
        init_train_state=None,
    )
    return adapted, step_lib.place_state(optimizer, params, k_rng, state_shardings)


def merged_state(lcfg: lora.LoRAConfig, state: TrainState, step: int) -> TrainState:
    """A LoRA run's state as a policy workdir saves it: the merged params at `step`, no
    optimizer state (nothing reads a stage's moments; the adapters' fit no other params)."""
    params = lora.merged_params(lcfg, state.params)
    return state.replace(step=jnp.asarray(step, jnp.int32), params=params, opt_state={})


def _pretrain(trainer, state, task, tokenizer, sft_cfg: SFTConfig, steps: int, writer):
    """Next-token pretraining on the task's documents before SFT: (state, last loss)."""
    docs = task.pretrain_documents(2000, np.random.default_rng(sft_cfg.seed + 1))
    windows = corpus_windows(tokenizer, docs, sft_cfg.seq_len)
    batches_ = lm_batches(windows, sft_cfg.batch_size, sft_cfg.seed)
    return _train(trainer, state, batches_, steps, writer, "pretrain", sft_cfg.log_every, 0)


def _before_sft(
    trainer, opt_cfg, sft_cfg: SFTConfig, task, tokenizer, pretrain: int, writer, summary
):
    """(trainer, state) the SFT steps start from: the initial state, after `pretrain`
    pretraining steps (their last loss into `summary`); with `sft_cfg.lora`, the LoRA trainer
    over those params (`make_lora_trainer`)."""
    state = None  # LoRA from init_from: its params only, no full optimizer state
    if sft_cfg.lora is None or pretrain:
        state = _initial_state(trainer, sft_cfg)
    if pretrain:
        state, summary["pretrain/loss"] = _pretrain(
            trainer, state, task, tokenizer, sft_cfg, pretrain, writer
        )
    if sft_cfg.lora is None:
        return trainer, state
    base = _base_params(trainer, sft_cfg) if state is None else state.params
    return make_lora_trainer(trainer, opt_cfg, sft_cfg, base)


def run_sft(
    workdir: str,
    *,
    model_cfg: ModelConfig | None = None,
    sft_cfg: SFTConfig | None = None,
    opt_cfg: OptimizerConfig | None = None,
    task=None,
    mesh_cfg: sharding.MeshConfig | None = None,
) -> dict:
    """Stage 1 end to end: tokenizer, (pretraining,) SFT, save; returns a summary dict (the
    saved one if `workdir` already holds the finished stage: `finished_stage`)."""
    sft_cfg, task = sft_cfg or SFTConfig(), task or tasks.make_task()
    if opt_cfg is None:
        with gin.config_scope("sft"):
            opt_cfg = OptimizerConfig()
    if (done := finished_stage(workdir)) is not None:
        return done
    model_cfg, tokenizer = _starting_policy(sft_cfg, model_cfg, task)
    check_vocab(tokenizer, model_cfg.vocab_size)
    pretrain = 0 if sft_cfg.init_from else sft_cfg.pretrain_steps
    total = pretrain + sft_cfg.steps
    mesh, rules = stage_mesh(mesh_cfg)
    trainer = make_trainer(model_cfg, opt_cfg, total, mesh, rules, sft_cfg.batch_size)
    pairs = tasks.demonstrations(task, sft_cfg.n_demonstrations + 256, sft_cfg.seed)
    demos = demonstration_arrays(tokenizer, pairs, sft_cfg.seq_len)
    train_demos = {k: v[256:] for k, v in demos.items()}
    heldout = {k: v[:256] for k, v in demos.items()}
    summary: dict = {
        "sft/steps": sft_cfg.steps,
        "sft/pretrain_steps": pretrain,
        "sft/init_from": sft_cfg.init_from,
        "sft/lora_rank": sft_cfg.lora_rank,
    }
    writer = metrics_lib.MetricWriter(workdir)
    try:
        with logical.use_mesh(mesh, rules):
            sft_trainer, state = _before_sft(
                trainer, opt_cfg, sft_cfg, task, tokenizer, pretrain, writer, summary
            )
            state, summary["sft/loss"] = _train(
                sft_trainer,
                state,
                batches(train_demos, sft_cfg.batch_size, sft_cfg.seed),
                sft_cfg.steps,
                writer,
                "sft",
                sft_cfg.log_every,
                pretrain,
            )
            if sft_cfg.lora is not None:
                state = merged_state(sft_cfg.lora, state, total)
            summary["sft/heldout_loss"] = masked_eval_loss(model_cfg, state.params, heldout, 32)
    finally:
        writer.close()
    train_cfg = TrainConfig(steps=total, batch_size=sft_cfg.batch_size, seq_len=sft_cfg.seq_len)
    meta = {
        "stage": "sft",
        "task": task.name,
        "init_from": sft_cfg.init_from,
        "lora_rank": sft_cfg.lora_rank,
    }
    write_summary(workdir, summary)
    save_policy(workdir, state, model_cfg, opt_cfg, tokenizer, train_cfg, meta)
    return summary
