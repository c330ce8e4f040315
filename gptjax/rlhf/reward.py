"""InstructGPT stage 2: a reward model trained on ranked comparisons.

The RM is the SFT model's trunk (the unembedding is simply never applied; an untied `lm_head` is
dropped) plus a scalar head, N(0, 1/sqrt(d + 1)) as in lm-human-preferences, read at each
sequence's *last real token*: for a reply that is the end-of-turn token, so the score has seen the
whole conversation. Training data are K samples per prompt from the SFT policy, ranked by the
task's gold reward, with all C(K, 2) comparisons of a prompt in one batch element
(`losses.reward_ranking_loss`); or HH jsonl `chosen`/`rejected` pairs (K = 2).

The trunk starts from `RewardConfig.init_from` (default: the SFT workdir; any workdir whose
tokenizer is the policy's, since the RM scores the policy's ids), its params only
(`workdir.init_params_from`); the head is always new. The RM's model config is that workdir's.

With `RewardConfig.lora_rank` > 0 the trunk trains as low-rank adapters (`models.lora`) and
the head fully, the optimizer state covering those two only; the saved RM is the merged one.

After training, a gain and bias are fitted so the reference policy's samples score mean 0, std 1:
PPO's KL coefficient and value scale then mean the same thing whatever the RM's raw scale.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import Tokenizer, check_vocab
from gptjax.models import gpt as model
from gptjax.models import lora
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.rlhf import chat, comparisons, losses, sft, tasks
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training import metrics as metrics_lib
from gptjax.training import workdir as workdir_lib
from gptjax.training.optimizer import OptimizerConfig, make_optimizer
from gptjax.training.step import jit_train_step, make_update, place_state

log = logging.getLogger("gptjax")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Stage 2 hyper-parameters (the optimizer is `reward/OptimizerConfig` in gin).

    k: responses ranked per prompt (InstructGPT: 4-9); n_prompts / heldout_prompts: how many
    prompts are labelled for training / for the held-out accuracy.
    steps, batch_size: optimizer steps and prompts (each with its K responses) per step.
    temperature, max_new_tokens: how the SFT policy samples the responses to rank.
    norm_samples, norm_temperature: reference samples that fix the gain and bias (use PPO's
    rollout temperature: that is the distribution PPO starts from).
    hh_path: train on Anthropic HH jsonl(.gz) pairs instead; hh_seq_len tokens per conversation.
    init_from: the workdir whose params the RM's trunk starts from (None: the SFT workdir);
    the scalar head is freshly initialised (`init_head`) whatever the source.
    lora_rank: 0 trains every param; r > 0 trains rank-r adapters of the trunk's attention and
    MLP kernels (scaled by lora_alpha / r) and the whole head.
    """

    k: int = 4
    n_prompts: int = 1024
    heldout_prompts: int = 128
    steps: int = 300
    batch_size: int = 16
    temperature: float = 1.0
    max_new_tokens: int = 16
    norm_samples: int = 512
    norm_temperature: float = 0.7
    hh_path: str | None = None
    hh_seq_len: int = 256
    init_from: str | None = None
    log_every: int = 50
    seed: int = 1
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"RewardConfig.k={self.k}: a ranking needs at least 2 responses")
        for name in ("n_prompts", "heldout_prompts", "steps", "batch_size", "norm_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RewardConfig.{name} must be positive, got {getattr(self, name)}")
        lora.from_rank(self.lora_rank, self.lora_alpha, "RewardConfig")  # a negative rank raises

    @property
    def lora(self) -> lora.LoRAConfig | None:
        """The trunk's LoRA, None for full fine-tuning (lora_rank 0)."""
        return lora.from_rank(self.lora_rank, self.lora_alpha, "RewardConfig")


# ----------------------------------------------------------------------------- the model


def init_head(key: jax.Array, d_model: int) -> dict:
    """The scalar head, N(0, 1/sqrt(d + 1)): unit-scale outputs from unit-scale features."""
    std = 1.0 / np.sqrt(d_model + 1)
    return {
        "kernel": std * jax.random.normal(key, (d_model,), jnp.float32),
        "bias": jnp.zeros((), jnp.float32),
    }


def from_policy(cfg: ModelConfig, policy_params, key: jax.Array) -> dict:
    """RM params from a policy: its trunk (no unembedding) and a fresh scalar head."""
    trunk = {k: v for k, v in policy_params.items() if k != "lm_head"}
    return {"trunk": trunk, "head": init_head(key, cfg.d_model)}


def identity_norm() -> dict:
    return {"gain": jnp.ones((), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def last_index(mask_BT: Int[Array, "B T"]) -> Int[Array, " B"]:
    """Index of each row's last real token (left or right padding alike)."""
    t = mask_BT.shape[1]
    return t - 1 - jnp.argmax(jnp.flip(mask_BT, axis=1) != 0, axis=1)


def head_values(
    cfg: ModelConfig, params: dict, tokens_BT: Int[Array, "B T"], mask_BT: Int[Array, "B T"]
) -> Float[Array, "B T"]:
    """The head at every position (a critic's values; the RM reads one of them)."""
    x_BTD = model.hidden_states(cfg, params["trunk"], tokens_BT, mask=mask_BT)
    return x_BTD.astype(jnp.float32) @ params["head"]["kernel"] + params["head"]["bias"]


def raw_scores(
    cfg: ModelConfig, params: dict, tokens_BT: Int[Array, "B T"], mask_BT: Int[Array, "B T"]
) -> Float[Array, " B"]:
    """Unnormalised RM score: the head at the last real token (not the padding after it)."""
    v_BT = head_values(cfg, params, tokens_BT, mask_BT)
    return jnp.take_along_axis(v_BT, last_index(mask_BT)[:, None], axis=1)[:, 0]


def scores(
    cfg: ModelConfig,
    params: dict,
    norm: dict,
    tokens_BT: Int[Array, "B T"],
    mask_BT: Int[Array, "B T"],
) -> Float[Array, " B"]:
    """The normalised reward PPO optimises: gain * raw + bias."""
    return norm["gain"] * raw_scores(cfg, params, tokens_BT, mask_BT) + norm["bias"]


def fit_norm(raw_N: Float[Array, " N"]) -> dict:
    """Gain and bias that map these (reference-policy) scores to mean 0, std 1."""
    raw_N = jnp.asarray(raw_N, jnp.float32)
    std = jnp.maximum(jnp.std(raw_N), 1e-6)
    return {"gain": 1.0 / std, "bias": -jnp.mean(raw_N) / std}


# ----------------------------------------------------------------------------- training


def ranking_terms(cfg: ModelConfig, params: dict, batch: dict):
    """`losses.reward_ranking_terms` of a batch of prompts, each with its K responses:
    the per-prompt loss summed over prompts, and the number of prompts with a pair."""
    b, k, t = batch["tokens"].shape
    s_BK = raw_scores(
        cfg, params, batch["tokens"].reshape(b * k, t), batch["mask"].reshape(b * k, t)
    ).reshape(b, k)
    return losses.reward_ranking_terms(s_BK, batch["ranks"], batch["valid"])


def ranking_loss(cfg: ModelConfig, params: dict, batch: dict):
    """reward_ranking_loss over a batch of prompts, each with its K responses."""
    stats = ranking_terms(cfg, params, batch)[2]
    return stats["reward/loss"], stats


def ranking_objective(cfg: ModelConfig):
    """The RM's loss as `step.make_update` wants it (one term, weighted by prompts)."""

    def objective(params, mb: dict):
        total, n_prompts, stats = ranking_terms(cfg, params, mb)
        return {"loss": total}, {"loss": n_prompts}, stats

    return objective


def _step_metrics(m: dict, step) -> dict:
    """The RM's logged names: its ranking stats and the update's, under `reward/`."""
    stats = {k: v for k, v in m.items() if k.startswith("reward/")}
    return stats | {
        "reward/loss": m["loss"],
        "reward/grad_norm": m["grad_norm"],
        "reward/update_skipped": m["update_skipped"],
    }


def param_shardings(cfg: ModelConfig, mesh, rules, lcfg: lora.LoRAConfig | None = None) -> dict:
    """Trunk sharded like the policy (same logical axes; with `lcfg`, an adapted trunk:
    `mesh.lora_shardings`); the tiny head replicated."""
    trunk = sharding.param_shardings(cfg, mesh, rules)
    trunk = {k: v for k, v in trunk.items() if k != "lm_head"}
    if lcfg is not None:
        trunk = sharding.lora_shardings(lcfg, trunk, model.param_axes(cfg), mesh, rules)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return {"trunk": trunk, "head": {"kernel": rep, "bias": rep}}


def make_train_step(
    cfg: ModelConfig,
    optimizer,
    params,
    mesh,
    rules,
    grad_accum_steps: int = 1,
    lcfg: lora.LoRAConfig | None = None,
):
    """(step, state shardings): the RM's `step.jit_train_step` over `step.make_update`; with
    `lcfg`, of an RM whose trunk is adapted (`lora.attach`)."""
    objective = lora.wrap_objective(lcfg, ranking_objective(cfg))
    update = make_update(objective, optimizer, grad_accum_steps)
    return jit_train_step(
        lambda p, o, batch, key: update(p, o, batch),
        optimizer,
        params,
        param_shardings(cfg, mesh, rules, lcfg),
        (sharding.batch_sharding(mesh, rules, ndim=1),),
        mesh,
        _step_metrics,
    )


@functools.partial(jax.jit, static_argnums=0)
def _ranking_stats(cfg: ModelConfig, params: dict, batch: dict) -> dict:
    return ranking_loss(cfg, params, batch)[1]


def accuracy(cfg: ModelConfig, params: dict, arrays: dict, batch_size: int = 64) -> float:
    """Fraction of held-out comparisons (all strict pairs) the RM orders correctly."""
    fn = functools.partial(_ranking_stats, cfg)  # jitted once per config, not per call
    correct = total = 0.0
    for i in range(0, len(arrays["tokens"]), batch_size):
        b = {
            k: jnp.asarray(arrays[k][i : i + batch_size])
            for k in ("tokens", "mask", "ranks", "valid")
        }
        stats = fn(params, b)
        pairs = float(np.sum(_n_pairs(np.asarray(b["ranks"]), np.asarray(b["valid"]))))
        correct += float(stats["reward/accuracy"]) * pairs
        total += pairs
    return correct / max(total, 1.0)


def _n_pairs(ranks_BK, valid_BK):
    v = valid_BK != 0
    return ((ranks_BK[:, :, None] < ranks_BK[:, None, :]) & v[:, :, None] & v[:, None, :]).sum()


def save_reward(
    workdir: str,
    cfg: ModelConfig,
    params: dict,
    norm: dict,
    extra: dict,
    tokenizer: Tokenizer | None = None,
) -> None:
    """config.json (the model, `extra` as 'rlhf'), the tokenizer whose ids the RM scores (so
    PPO can check it is the policy's) and one checkpoint of {'params', 'norm'}."""
    os.makedirs(workdir, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"model": dataclasses.asdict(cfg), "rlhf": extra}, f, indent=2)
    with ckpt_lib.CheckpointManager(workdir, max_to_keep=1) as manager:
        manager.save(int(extra.get("steps", 0)), {"params": params, "norm": norm}, {}, force=True)


def is_reward_workdir(workdir: str) -> bool:
    """Whether `workdir` holds a reward model (`save_reward`), not a policy."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return (json.load(f).get("rlhf") or {}).get("stage") == "reward"


def load_reward(workdir: str, mesh=None, rules=None) -> tuple[ModelConfig, dict, dict]:
    """(model_cfg, params, norm) of a reward workdir, sharded on `mesh` (default: 1 device)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no reward model in {workdir!r}; run `gptjax reward` first")
    with open(path) as f:
        cfg = ModelConfig(**json.load(f)["model"])
    if mesh is None:
        mesh, rules = sft.stage_mesh(sharding.MeshConfig(shape={"data": 1}))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = jax.eval_shape(
        lambda: {
            "params": from_policy(
                cfg, model.init_params(cfg, jax.random.key(0)), jax.random.key(0)
            ),
            "norm": identity_norm(),
        }
    )
    shards = {"params": param_shardings(cfg, mesh, rules), "norm": {"gain": rep, "bias": rep}}
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards
    )
    with ckpt_lib.CheckpointManager(workdir, read_only=True) as manager:
        restored = manager.restore(abstract)
    if restored is None:
        raise FileNotFoundError(f"no reward checkpoint in {workdir!r}/checkpoints")
    _, state, _ = restored
    return cfg, state["params"], state["norm"]


def init_reward(
    cfg: ModelConfig,
    policy_params,
    opt_cfg: OptimizerConfig,
    steps: int,
    mesh,
    rules,
    key: jax.Array,
    lcfg: lora.LoRAConfig | None = None,
):
    """(jitted step, step-0 TrainState) of an RM made from the policy's trunk (with `lcfg`:
    adapters on the trunk, the optimizer over them and the head only)."""
    optimizer = make_optimizer(opt_cfg, steps)
    # From host memory: the step donates its state, the sampler still needs the policy.
    params = from_policy(cfg, jax.device_get(policy_params), jax.random.fold_in(key, 2))
    if lcfg is not None:
        optimizer = lora.freeze_frozen(optimizer)
        params["trunk"] = lora.attach(lcfg, params["trunk"], jax.random.fold_in(key, 5))
    step_fn, state_shard = make_train_step(
        cfg, optimizer, params, mesh, rules, opt_cfg.grad_accum_steps, lcfg
    )
    return step_fn, place_state(optimizer, params, jax.random.fold_in(key, 4), state_shard)


def train_steps(
    step_fn, state, batch_iter, steps: int, log_every: int, mesh, rules, writer, prefix
):
    """`steps` updates on `batch_iter`'s batches, every `log_every`-th (and the last) logged
    with `prefix`'s loss and accuracy (the reward model's and DPO's loop); the final state."""
    for i in range(1, steps + 1):
        state, stats = step_fn(state, sharding.make_global_batch(next(batch_iter), mesh, rules))
        if i % log_every == 0 or i == steps:
            stats = {k: float(v) for k, v in jax.device_get(stats).items()}
            writer.write(i, stats)
            log.info(
                "%s step %d: loss %.4f, accuracy %.3f",
                prefix,
                i,
                stats[f"{prefix}/loss"],
                stats[f"{prefix}/accuracy"],
            )
    return state


def train_reward(step_fn, state, train: dict, rm_cfg: RewardConfig, mesh, rules, writer):
    """`rm_cfg.steps` RM steps on shuffled batches of `train`, logged; the final state."""
    it = sft.batches(
        {k: train[k] for k in ("tokens", "mask", "ranks", "valid")}, rm_cfg.batch_size, rm_cfg.seed
    )
    return train_steps(
        step_fn, state, it, rm_cfg.steps, rm_cfg.log_every, mesh, rules, writer, "reward"
    )


def reference_norm(
    cfg: ModelConfig,
    params: dict,
    policy_params,
    tokenizer: Tokenizer,
    task,
    rm_cfg: RewardConfig,
    width: int,
    key: jax.Array,
    policy_cfg: ModelConfig | None = None,
) -> tuple[np.ndarray, dict]:
    """(raw scores, norm) of the reference policy's own samples at PPO's temperature; the
    policy's config is `policy_cfg` when it is not the RM's `cfg`."""
    norm_prompts = tasks.prompts(task, rm_cfg.norm_samples, rm_cfg.seed + 7)
    ref = chat.generate_replies(
        policy_cfg or cfg,
        policy_params,
        tokenizer,
        [chat.prompt_ids(tokenizer, p) for p in norm_prompts],
        width,
        key=jax.random.fold_in(key, 3),
        max_new_tokens=rm_cfg.max_new_tokens,
        temperature=rm_cfg.norm_temperature,
        chunk=256,
    )
    raw = batched_raw_scores(cfg, params, ref["tokens"], ref["mask"])
    return raw, fit_norm(raw)


def start_reward(
    source: str,
    tokenizer: Tokenizer,
    opt_cfg: OptimizerConfig,
    steps: int,
    mesh,
    rules,
    key: jax.Array,
    lcfg: lora.LoRAConfig | None = None,
):
    """(RM model config, jitted step, step-0 TrainState): the trunk from `source`'s params
    (its config; its tokenizer checked to be the policy's `tokenizer`), a fresh head; with
    `lcfg`, LoRA on the trunk (`init_reward`)."""
    workdir_lib.check_tokenizer(source, tokenizer, "the SFT policy's")
    src = workdir_lib.init_params_from(source, None, mesh, rules)
    check_vocab(tokenizer, src.cfg.vocab_size)
    step_fn, state = init_reward(src.cfg, src.params, opt_cfg, steps, mesh, rules, key, lcfg)
    return src.cfg, step_fn, state


def _check_fits(cfg: ModelConfig, *arrays: dict) -> None:
    longest = max(a["tokens"].shape[-1] for a in arrays)
    if longest > cfg.max_len:
        raise ValueError(
            f"comparisons of {longest} tokens exceed the reward model's max_len {cfg.max_len}; "
            "start it from a longer-context workdir (RewardConfig.init_from) or shorten them."
        )


def run_reward(
    workdir: str,
    sft_workdir: str,
    *,
    rm_cfg: RewardConfig | None = None,
    opt_cfg: OptimizerConfig | None = None,
    task=None,
    mesh_cfg: sharding.MeshConfig | None = None,
) -> dict:
    """Stage 2 end to end: label comparisons (with the SFT policy's samples), train the RM
    (trunk from `rm_cfg.init_from`, default the SFT workdir), held-out accuracy, normalise,
    save. Returns the summary (the saved one if `workdir` already holds the finished stage)."""
    rm_cfg, task = rm_cfg or RewardConfig(), task or tasks.make_task()
    if opt_cfg is None:
        with gin.config_scope("reward"):
            opt_cfg = OptimizerConfig()
    if (done := sft.finished_stage(workdir)) is not None:
        return done
    cfg, policy_params, tokenizer = sft.load_policy(sft_workdir)
    source = rm_cfg.init_from or sft_workdir
    mesh, rules = sft.stage_mesh(mesh_cfg)
    key = jax.random.key(rm_cfg.seed)
    train, held, width = comparisons.comparison_data(
        cfg, policy_params, tokenizer, task, rm_cfg, key
    )
    writer = metrics_lib.MetricWriter(workdir)
    summary: dict = {}
    try:
        with logical.use_mesh(mesh, rules):
            rm_model_cfg, step_fn, state = start_reward(
                source, tokenizer, opt_cfg, rm_cfg.steps, mesh, rules, key, rm_cfg.lora
            )
            _check_fits(rm_model_cfg, train, held)
            params = lora.merged_params(rm_cfg.lora, state.params)
            summary["reward/heldout_accuracy_start"] = accuracy(rm_model_cfg, params, held)
            state = train_reward(step_fn, state, train, rm_cfg, mesh, rules, writer)
            params = lora.merged_params(rm_cfg.lora, state.params)  # ordinary RM params
            summary["reward/heldout_accuracy"] = accuracy(rm_model_cfg, params, held)
        # Outside the RM's mesh: the policy samples on its own (one-device) params, as in
        # `comparison_data`; inside a larger mesh jit refuses them.
        raw, norm = reference_norm(
            rm_model_cfg, params, policy_params, tokenizer, task, rm_cfg, width, key, policy_cfg=cfg
        )
    finally:
        writer.close()
    summary |= {
        "reward/raw_mean": float(np.mean(raw)),
        "reward/raw_std": float(np.std(raw)),
        "reward/n_train_prompts": int(len(train["tokens"])),
    }
    writer = metrics_lib.MetricWriter(workdir)
    writer.write(rm_cfg.steps, summary)
    writer.close()
    summary |= {"reward/init_from": source, "reward/lora_rank": rm_cfg.lora_rank}
    sft.write_summary(workdir, summary)
    meta = {"stage": "reward", "steps": rm_cfg.steps, "task": task.name, "init_from": source}
    save_reward(
        workdir,
        rm_model_cfg,
        jax.device_get(params),
        jax.device_get(norm),
        meta | {"lora_rank": rm_cfg.lora_rank},
        tokenizer,
    )
    return summary


_jit_raw_scores = jax.jit(raw_scores, static_argnums=0)


def batched_raw_scores(
    cfg: ModelConfig, params: dict, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """raw_scores over many rows, in fixed-size (padded) chunks so it compiles once."""
    fn = functools.partial(_jit_raw_scores, cfg)  # jitted once per config, not per call
    out = []
    for i in range(0, len(tokens), batch_size):
        t, m = tokens[i : i + batch_size], mask[i : i + batch_size]
        n = len(t)
        pad = batch_size - n
        t, m = (
            np.concatenate([t, np.repeat(t[-1:], pad, 0)]),
            np.concatenate([m, np.repeat(m[-1:], pad, 0)]),
        )
        out.append(np.asarray(fn(params, t, m))[:n])
    return np.concatenate(out)
