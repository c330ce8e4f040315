"""Train state, the jitted train/eval steps, and their shardings.

Exactly three functions are jitted here, once each, with explicit shardings:
`init_train_state` (eval_shape → shardings → jit(init, out_shardings)),
`train_step(state, batch) -> (state, metrics)` with the state donated, and
`eval_step(params, batch) -> sums`. The loop that drives them is in `loop.py`;
it traces and calls them inside `sharding.use_mesh(mesh, rules)`, which is
what the model's activation constraints read.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import gin
import jax
import jax.numpy as jnp
import optax

from gptjax import family, sharding
from gptjax.config import ModelConfig
from gptjax.optimizer import OptimizerConfig, accumulate_gradients, global_norm, make_optimizer, make_schedule


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how a run trains, evaluates, logs and checkpoints.

    batch_size is the global batch in sequences (split over devices, processes
    and `OptimizerConfig.grad_accum_steps` microbatches); seq_len is the
    context T (batches hold T + 1 tokens).
    """

    steps: int = 1000
    batch_size: int = 32
    seq_len: int = 256
    log_every: int = 50
    eval_every: int = 500
    eval_batches: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    seed: int = 0
    sample_tokens: int = 64
    sample_prompt: str = ""
    peak_flops: float | None = None
    compilation_cache_dir: str | None = "~/.cache/gptjax/jax_cache"

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}.")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, and nothing else (a pytree).

    `rng` holds raw key data (uint32) so checkpoints store it as a plain array.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def loss_fn(cfg: ModelConfig, params, batch: dict, key: jax.Array | None = None) -> jax.Array:
    """The model family's training loss (`family.loss`). For GPT: mean next-token
    cross-entropy of `batch['tokens']` (B, T + 1), over `batch['loss_mask']` (B, T)
    when present."""
    return family.loss(cfg, params, batch, key)


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The static pieces a run's jitted functions close over (not a pytree).

    Build it with `make_trainer`; its fields are the three jitted functions
    plus what is needed to call them.
    """

    cfg: ModelConfig
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    rules: tuple
    state_shardings: Any
    batch_sharding: Any
    init_train_state: Any
    train_step: Any
    eval_step: Any


def _init(cfg: ModelConfig, optimizer, seed: int) -> TrainState:
    init_key, rng = jax.random.split(jax.random.key(seed))
    params = family.init_params(cfg, init_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=jax.random.key_data(rng))


def _train_step(cfg: ModelConfig, optimizer, schedule, num_micro: int, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    # Dropout keys ride along as a per-row batch leaf, so the microbatch
    # split hands each microbatch its own (it reads its first row's key).
    b = family.batch_rows(batch)
    batch = {**batch, "dropout_key": jax.random.key_data(jax.random.split(key, b))}

    def loss_for(params, mb):
        return loss_fn(cfg, params, mb, jax.random.wrap_key_data(mb["dropout_key"][0]))

    loss, grads, _ = accumulate_gradients(jax.value_and_grad(loss_for), state.params, batch,
                                          num_micro)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train/loss": loss, "grad_norm": global_norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _eval_step(cfg: ModelConfig, params, batch: dict) -> dict:
    return family.eval_sums(cfg, params, batch)


def make_trainer(cfg: ModelConfig, opt_cfg: OptimizerConfig, total_steps: int,
                 mesh: jax.sharding.Mesh, rules: tuple, global_batch_size: int) -> Trainer:
    """Shardings from the logical axes, then the three jitted functions."""
    optimizer = make_optimizer(opt_cfg, total_steps)
    schedule = make_schedule(opt_cfg, total_steps)
    if global_batch_size % opt_cfg.grad_accum_steps:
        raise ValueError(f"TrainConfig.batch_size={global_batch_size} is not divisible by "
                         f"OptimizerConfig.grad_accum_steps={opt_cfg.grad_accum_steps}.")
    sharding.check_divisible(cfg, mesh, rules, global_batch_size // opt_cfg.grad_accum_steps)
    abstract = jax.eval_shape(functools.partial(_init, cfg, optimizer), 0)
    p_shard = sharding.param_shardings(cfg, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = TrainState(
        step=replicated, params=p_shard, rng=replicated,
        opt_state=sharding.opt_state_shardings(optimizer, abstract.params, p_shard, mesh))
    batch_sharding = sharding.batch_sharding(mesh, rules)
    init = jax.jit(functools.partial(_init, cfg, optimizer), static_argnums=0,
                   out_shardings=state_shardings)
    step = jax.jit(functools.partial(_train_step, cfg, optimizer, schedule,
                                     opt_cfg.grad_accum_steps),
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(functools.partial(_eval_step, cfg),
                       in_shardings=(p_shard, batch_sharding), out_shardings=replicated)
    return Trainer(cfg=cfg, optimizer=optimizer, schedule=schedule, mesh=mesh, rules=rules,
                   state_shardings=state_shardings, batch_sharding=batch_sharding,
                   init_train_state=init, train_step=step, eval_step=evaluate)


def abstract_state(trainer: Trainer) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (what a restore fills in)."""
    shapes = jax.eval_shape(functools.partial(_init, trainer.cfg, trainer.optimizer), 0)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, trainer.state_shardings)
