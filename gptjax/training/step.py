"""Train state, the jitted train/eval steps, and their shardings.

Three functions are jitted here, once each, with explicit shardings:
`init_train_state` (eval_shape → shardings → jit(init, out_shardings)),
`train_step(state, batch) -> (state, metrics)` with the state donated, and
`eval_step(params, batch) -> sums`; and `state_from_params`, the step-0 state of a
run that starts from given params (`init_from`). The loop that drives them is in `loop.py`;
it traces and calls them inside `logical.use_mesh(mesh, rules)`, which is
what the model's activation constraints read.

`jit_train_step` is the one jitted, sharded, donated `train_step(state, batch)` of every
trainer: `make_trainer` (pretraining, SFT), the reward model, fine-tuning and PPO's
epochs of minibatch updates each hand it their update and their shardings.

`make_update(loss_fn, optimizer, num_micro)` is the one grad → clip → update → apply
of every trainer (pretraining, SFT, the reward model, fine-tuning, PPO's minibatches).
Its losses are weighted *sums* with their *weights*, divided once by the weights of
the whole batch, so gradient accumulation gives the full-batch loss and gradient
however unevenly the masked tokens fall into microbatches (the bug Hugging Face
transformers fixed in 4.46); and an update whose loss or gradient is not finite is
skipped, never applied.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import gin
import jax
import jax.numpy as jnp
import optax

from gptjax.config import ModelConfig
from gptjax.models import family
from gptjax.parallel import mesh as sharding
from gptjax.training.optimizer import OptimizerConfig, make_optimizer, make_schedule

# loss_fn(params, batch) -> (sums, weights, aux): see `weighted_loss_and_grads`.
LossFn = Callable[[Any, dict], tuple[dict, dict, dict]]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how a run trains, evaluates, logs and checkpoints.

    batch_size is the global batch in sequences (split over devices, processes
    and `OptimizerConfig.grad_accum_steps` microbatches); seq_len is the
    context T (batches hold T + 1 tokens). An update with a non-finite loss or
    gradient is skipped (params unchanged, counted in `skipped_updates`); more
    than `max_consecutive_skips` in a row stop the run before it saves.
    peak_flops: the per-device peak for MFU, where the device table has none
    (on CPU there is no honest one, so MFU is not shown unless this is set).
    init_from: a workdir whose params the run starts from (continued pretraining of an
    earlier run or an imported GPT-2): its newest good checkpoint's params only, with a
    fresh optimizer state, step 0 and the run's own data order; its tokenizer becomes the
    run's (`workdir.init_params_from`, `workdir.adopt_tokenizer`). Ignored once the run's
    own workdir has a checkpoint: that is resumed, never overwritten.
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
    max_consecutive_skips: int = 5
    compilation_cache_dir: str | None = "~/.cache/gptjax/jax_cache"
    init_from: str | None = None

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "log_every",
            "eval_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.max_consecutive_skips < 0:
            raise ValueError(
                f"TrainConfig.max_consecutive_skips must be >= 0, got {self.max_consecutive_skips}."
            )


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
    """The model family's training loss, a mean (`family.loss`). For GPT: next-token
    cross-entropy of `batch['tokens']` (B, T + 1), over `batch['loss_mask']` (B, T)
    when present."""
    return family.loss(cfg, params, batch, key)


def family_objective(cfg: ModelConfig) -> LossFn:
    """The family's training loss as `make_update` wants it: one term, summed over the
    scored tokens of a (micro)batch, with the dropout key its rows carry."""

    def objective(params, mb: dict):
        total, weight = family.loss_sums(cfg, params, mb, dropout_key(mb))
        return {"loss": total}, {"loss": weight}, {}

    return objective


# ---------------------------------------------------------------------------------- update


def split_microbatches(batch: dict, num_micro: int) -> dict:
    """Reshape every leaf (n, ...) -> (num_micro, n // num_micro, ...), strided.

    Microbatch m takes rows m, m + num_micro, m + 2 num_micro, ...: with the batch axis sharded
    over devices, each device's contiguous rows feed every microbatch equally, so all devices
    stay busy in each scan iteration (a contiguous split would put microbatch 0 on device 0 only).
    Leaves may have different leading sizes (PPO's rollout rows and its pretraining rows).
    """
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError("the batch has no arrays to split into microbatches")
    for path, x in leaves:
        if not x.ndim or x.shape[0] % num_micro:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} of shape {x.shape} does not divide into "
                f"{num_micro} microbatches; choose grad_accum_steps dividing the per-step batch"
            )

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def weighted_loss_and_grads(loss_fn: LossFn, params, batch: dict, num_micro: int = 1):
    """(loss, grads, aux) of `batch`, `num_micro` microbatches at a time, exactly.

    `loss_fn(params, mb) -> (sums, weights, aux)`: per named term, the loss *summed* over the
    microbatch's units (target tokens, examples, prompts; a coefficient folded in) and how many
    units it summed. Weights must depend on the batch alone (masks and counts), never on
    params. The loss is sum over terms of sums / weights, the weights counted over the *whole*
    batch: one call of `loss_fn` on it whose model outputs jit drops as dead code, so only the
    mask sums run. Each microbatch then contributes its sums divided by the global weights,
    and the loss and its gradient do not depend on how the batch is cut. (Averaging microbatch
    means instead weighs a microbatch with few target tokens like one with many.)
    Gradients are summed in float32 inside `jax.lax.scan`; aux is each leaf's microbatch mean.
    """
    weights = jax.lax.stop_gradient(loss_fn(params, batch)[1])
    denom = {k: jnp.where(w > 0, w, 1).astype(jnp.float32) for k, w in weights.items()}

    def total(p, mb):
        sums, _, aux = loss_fn(p, mb)
        return sum(sums[k].astype(jnp.float32) / denom[k] for k in sums), aux

    value_and_grad = jax.value_and_grad(total, has_aux=True)
    if num_micro == 1:
        (loss, aux), grads = value_and_grad(params, batch)
        return loss, grads, aux

    micro = split_microbatches(batch, num_micro)
    out_shape = jax.eval_shape(value_and_grad, params, jax.tree.map(lambda x: x[0], micro))

    def body(acc, mb):
        (loss, aux), grads = value_and_grad(params, mb)
        return jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc, (loss, grads, aux)), None

    init = jax.tree.map(
        lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
        (out_shape[0][0], out_shape[1], out_shape[0][1]),
    )
    (loss, grads, aux), _ = jax.lax.scan(body, init, micro)
    grads = jax.tree.map(lambda g, s: g.astype(s.dtype), grads, out_shape[1])
    return loss, grads, jax.tree.map(lambda a: a / num_micro, aux)


def make_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, num_micro: int = 1):
    """`update(params, opt_state, batch) -> (params, opt_state, metrics)`: the one update step.

    Weighted loss and gradients (`weighted_loss_and_grads`), then the optimizer (clipping is
    its first link), then apply. A step whose loss or gradient norm is not finite (a bf16
    overflow in the backward pass gives inf gradients under a finite loss) leaves params and
    optimizer state exactly as they were, and says so in `metrics['update_skipped']`; the
    caller decides when too many skips mean divergence. Pure: the caller jits it (or scans it).
    metrics: `loss`, `grad_norm` (before clipping), `update_skipped` (0 or 1), and aux.
    """

    def update(params, opt_state, batch: dict):
        loss, grads, aux = weighted_loss_and_grads(loss_fn, params, batch, num_micro)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new = (optax.apply_updates(params, updates), new_opt_state)
        params, opt_state = jax.tree.map(
            lambda n, o: jnp.where(finite, n, o), new, (params, opt_state)
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_skipped": 1.0 - finite.astype(jnp.float32),
        }
        return params, opt_state, metrics | aux

    return update


# ------------------------------------------------------------------------------ the step

# update(params, opt_state, *batch, key=key) -> (params, opt_state, metrics): what a train
# step runs on its batch arguments, with that step's key (e.g. `make_update`'s update under
# `with_dropout_keys`).
StepUpdate = Callable[..., tuple[Any, Any, dict]]


def with_dropout_keys(update, rows: Callable[[dict], int] = family.batch_rows) -> StepUpdate:
    """`update(params, opt_state, batch)` as a `StepUpdate` that hands each batch row its own
    dropout key, split from the step's key.

    The keys ride along as a per-row batch leaf `dropout_key`, so the microbatch split gives
    each microbatch its own; the objective reads it with `dropout_key(mb)`.
    """

    def keyed(params, opt_state, batch: dict, *, key: jax.Array):
        keys = jax.random.key_data(jax.random.split(key, rows(batch)))
        return update(params, opt_state, {**batch, "dropout_key": keys})

    return keyed


def dropout_key(mb: dict) -> jax.Array | None:
    """The dropout key of a (micro)batch built by `with_dropout_keys`: its first row's."""
    return jax.random.wrap_key_data(mb["dropout_key"][0]) if "dropout_key" in mb else None


def state_shardings(
    optimizer: optax.GradientTransformation, params, param_shardings, mesh: jax.sharding.Mesh
) -> TrainState:
    """Shardings of a TrainState over `params` (arrays or ShapeDtypeStructs): the params as
    given, the optimizer moments like their params, step and rng replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return TrainState(
        step=replicated,
        params=param_shardings,
        rng=replicated,
        opt_state=sharding.opt_state_shardings(optimizer, params, param_shardings, mesh),
    )


def initial_state(optimizer: optax.GradientTransformation, params, key: jax.Array) -> TrainState:
    """Step 0: `params`, their fresh optimizer state and the run's key."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(key),
    )


def place_state(
    optimizer: optax.GradientTransformation, params, key: jax.Array, shardings: TrainState
) -> TrainState:
    """A step-0 TrainState of `params`, fresh optimizer state and `key`, on `shardings`.

    The params go through host memory, so the state never shares buffers with arrays the
    caller keeps (a reference model, a sampler's policy): the train step donates it.
    """
    return jax.device_put(initial_state(optimizer, jax.device_get(params), key), shardings)


def jit_train_step(
    update: StepUpdate,
    optimizer: optax.GradientTransformation,
    params,
    param_shardings,
    batch_shardings: tuple,
    mesh: jax.sharding.Mesh,
    metrics: Callable[[dict, jax.Array], dict] | None = None,
):
    """(train_step, state shardings): the one jitted, sharded, donated step of every trainer.

    `train_step(state, *batch) -> (state, metrics)` runs `update(params, opt_state, *batch,
    key=key)` with the step's key (the run's key folded with the step count), advances the
    step count and returns `metrics(update's metrics, step)` (default: as they are),
    replicated. It is jitted once, with the state's shardings (`state_shardings` over
    `params`, which may be abstract) in and out, `batch_shardings` (one per batch argument,
    each a prefix of its pytree) in, and the state donated.
    """
    shardings = state_shardings(optimizer, params, param_shardings, mesh)

    def train_step(state: TrainState, *batch) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        new_params, opt_state, m = update(state.params, state.opt_state, *batch, key=key)
        m = m if metrics is None else metrics(m, state.step)
        return state.replace(step=state.step + 1, params=new_params, opt_state=opt_state), m

    step = jax.jit(
        train_step,
        in_shardings=(shardings, *batch_shardings),
        out_shardings=(shardings, shardings.step),
        donate_argnums=0,
    )
    return step, shardings


# ---------------------------------------------------------------------------- pretraining


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
    return initial_state(optimizer, family.init_params(cfg, init_key), rng)


def _init_from_params(optimizer, params, seed) -> TrainState:
    _, rng = jax.random.split(jax.random.key(seed))  # the rng `_init` gives the same seed
    return initial_state(optimizer, params, rng)


def state_from_params(trainer: Trainer, params, seed: int) -> TrainState:
    """Step 0 of a run that starts from `params` (already on the trainer's param shardings,
    e.g. from `workdir.init_params_from`): fresh optimizer state (zero moments), the rng that
    `init_train_state(seed)` has. Jitted onto the state shardings with `params` donated, so
    no host copy (a pod's params are not on one host) and no second copy of the params."""
    init = jax.jit(
        functools.partial(_init_from_params, trainer.optimizer),
        out_shardings=trainer.state_shardings,
        donate_argnums=0,
    )
    return init(params, seed)


def _train_metrics(schedule):
    def metrics(m: dict, step: jax.Array) -> dict:
        return {
            "train/loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "update_skipped": m["update_skipped"],
            "lr": schedule(step),
        }

    return metrics


def make_trainer(
    cfg: ModelConfig,
    opt_cfg: OptimizerConfig,
    total_steps: int,
    mesh: jax.sharding.Mesh,
    rules: tuple,
    global_batch_size: int,
) -> Trainer:
    """Shardings from the logical axes, then the three jitted functions."""
    schedule = make_schedule(opt_cfg, total_steps)
    optimizer = make_optimizer(opt_cfg, total_steps, schedule)
    if global_batch_size % opt_cfg.grad_accum_steps:
        raise ValueError(
            f"TrainConfig.batch_size={global_batch_size} is not divisible by "
            f"OptimizerConfig.grad_accum_steps={opt_cfg.grad_accum_steps}."
        )
    sharding.check_divisible(cfg, mesh, rules, global_batch_size // opt_cfg.grad_accum_steps)
    abstract = jax.eval_shape(functools.partial(_init, cfg, optimizer), 0)
    p_shard = sharding.param_shardings(cfg, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    update = make_update(family_objective(cfg), optimizer, opt_cfg.grad_accum_steps)
    step, state_shards = jit_train_step(
        with_dropout_keys(update),
        optimizer,
        abstract.params,
        p_shard,
        (batch_sharding,),
        mesh,
        _train_metrics(schedule),
    )
    init = jax.jit(
        functools.partial(_init, cfg, optimizer), static_argnums=0, out_shardings=state_shards
    )
    evaluate = jax.jit(
        functools.partial(family.eval_sums, cfg),
        in_shardings=(p_shard, batch_sharding),
        out_shardings=replicated,
    )
    return Trainer(
        cfg=cfg,
        optimizer=optimizer,
        schedule=schedule,
        mesh=mesh,
        rules=rules,
        state_shardings=state_shards,
        batch_sharding=batch_sharding,
        init_train_state=init,
        train_step=step,
        eval_step=evaluate,
    )


def abstract_state(trainer: Trainer) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings (what a restore fills in)."""
    shapes = jax.eval_shape(functools.partial(_init, trainer.cfg, trainer.optimizer), 0)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        trainer.state_shardings,
    )
