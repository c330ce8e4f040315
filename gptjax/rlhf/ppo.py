"""InstructGPT stage 3: PPO against the reward model, with a KL penalty and PPO-ptx.

One iteration: sample replies with the jitted KV-cache sampler (left-padded prompts, stop at the
end-of-turn token) → score them in one jitted pass (policy and reference log-probs, critic values,
RM score at the last real token, a fixed penalty score for replies that never stop) → per-token
reward −β·KL plus the score at the last token → GAE (γ = 1, λ = 0.95) and whitened advantages →
`epochs` × `minibatches` clipped policy/value updates inside one jitted function (a `lax.scan`),
optionally plus γ_ptx · LM loss on pretraining batches (PPO-ptx) → the KL controller updates β.

Log-probs are those of the *sampling* policy, softmax(logits / temperature), for the policy and
the reference alike (as lm-human-preferences does), so ratio and KL compare like with like. The
critic is a separate network initialised from the reward model (InstructGPT); the reference and
reward models are frozen: plain param trees sharded like the policy, with no optimizer state.

RLOO and GRPO (`PPOConfig.algo`) are this trainer with K replies per prompt and the group
baselines of `group_rl.py` in place of the critic and GAE.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.config import ModelConfig
from gptjax.models import family
from gptjax.models import gpt as model
from gptjax.models import lora as lora_lib
from gptjax.parallel import mesh as sharding
from gptjax.rlhf import chat, group_rl, losses, reward, scoring
from gptjax.rlhf.scoring import critic_values, policy_outputs
from gptjax.training.optimizer import make_optimizer
from gptjax.training.step import TrainState, jit_train_step, make_update, place_state

log = logging.getLogger("gptjax")

ALGOS = ("ppo", "rloo", "grpo")
# Logged for the first minibatch of each rollout too, where the policy is still the sampler's
# (ratio 1, approxkl 0, clipfrac 0; for GRPO at the first iteration kl_ref 0 as well).
FIRST_MINIBATCH_CHECKS = (
    "policy/approxkl",
    "policy/clipfrac",
    "policy/ratio_mean",
    "policy/kl_ref",
    "val/clipfrac",
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Stage 3 hyper-parameters (the optimizer is `ppo/OptimizerConfig` in gin).

    steps: PPO iterations, each on `batch_size` fresh rollouts, `epochs` passes of
    `minibatches` updates. kl_coef is β (InstructGPT: 0.02); with adaptive_kl it follows
    Ziegler et al.'s controller towards kl_target nats per reply over kl_horizon samples.
    no_stop_penalty: the score of a reply without an end-of-turn token (it is cut there).
    ptx_coef: γ of PPO-ptx (0 = plain PPO); ptx_batch_size pretraining rows per minibatch.
    init_from: the workdir whose params the policy starts from (None: the SFT workdir, which
    is always the KL reference; e.g. an earlier PPO run's to go on from it).
    critic_init_from: the value model's start (None: the reward workdir, its normalisation
    folded into the head); another reward workdir likewise, any other workdir gives the trunk
    with a fresh head. Its model config must be the reward model's.
    algo: 'ppo' (GAE with a critic), or the critic-free 'rloo' / 'grpo' (`group_rl.py`), which
    sample group_size = K replies for each of batch_size / K prompts per iteration, so every
    algorithm sees batch_size sampled replies per iteration.
    lora_rank: 0 trains every policy param; r > 0 trains rank-r adapters of the policy's
    attention and MLP kernels (`models.lora`, scaled by lora_alpha / r), the optimizer state
    over the adapters only; the critic is trained in full. The saved policy is merged.
    """

    algo: str = "ppo"
    group_size: int = 4
    steps: int = 60
    batch_size: int = 64
    minibatches: int = 4
    epochs: int = 4
    max_new_tokens: int = 16
    temperature: float = 0.7
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    vf_clip_eps: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    kl_coef: float = 0.02
    adaptive_kl: bool = True
    kl_target: float = 6.0
    kl_horizon: float = 10_000
    kl_estimator: str = "k1"
    no_stop_penalty: float = -1.0
    ptx_coef: float = 0.0
    ptx_batch_size: int = 16
    n_prompts: int = 2048
    eval_prompts: int = 256
    init_from: str | None = None
    critic_init_from: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    seed: int = 2

    def __post_init__(self):
        lora_lib.from_rank(self.lora_rank, self.lora_alpha, "PPOConfig")  # rank < 0 raises
        if self.algo not in ALGOS:
            raise ValueError(f"PPOConfig.algo {self.algo!r} is not one of {ALGOS}.")
        if self.algo != "ppo" and self.group_size < 2:
            raise ValueError(
                f"PPOConfig.group_size={self.group_size}: {self.algo} needs K >= 2 replies per "
                "prompt (its baseline is the other replies'); set group_size to 2 or more."
            )
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"PPOConfig.batch_size={self.batch_size} is not divisible by "
                f"group_size={self.group_size} ({self.algo} samples K replies per prompt)"
            )
        if self.batch_size % self.minibatches:
            raise ValueError(
                f"PPOConfig.batch_size={self.batch_size} is not divisible by "
                f"minibatches={self.minibatches}"
            )
        if self.temperature <= 0:
            raise ValueError(f"PPOConfig.temperature must be > 0, got {self.temperature}")
        for name in ("steps", "epochs", "max_new_tokens", "eval_prompts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PPOConfig.{name} must be positive, got {getattr(self, name)}")

    @property
    def lora(self) -> lora_lib.LoRAConfig | None:
        """The policy's LoRA, None for full training (lora_rank 0)."""
        return lora_lib.from_rank(self.lora_rank, self.lora_alpha, "PPOConfig")

    @property
    def samples_per_prompt(self) -> int:
        return 1 if self.algo == "ppo" else self.group_size

    @property
    def has_critic(self) -> bool:
        return self.algo == "ppo"

    def controller(self):
        if self.adaptive_kl:
            return losses.AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
        return losses.FixedKLController(self.kl_coef)


# ----------------------------------------------------------------------------- scoring


def critic_from_reward(rm_params: dict, norm: dict) -> dict:
    """The critic starts as the RM with its normalisation folded into the head."""
    head = {
        "kernel": rm_params["head"]["kernel"] * norm["gain"],
        "bias": rm_params["head"]["bias"] * norm["gain"] + norm["bias"],
    }
    return {"trunk": rm_params["trunk"], "head": head}


def make_experience(
    cfg: ModelConfig,
    rm_model_cfg: ModelConfig,
    ppo_cfg: PPOConfig,
    width: int,
    models: dict,
    tokens_BL,
    mask_BL,
    done_B,
    kl_coef,
) -> tuple[dict, dict]:
    """Score a rollout batch and turn it into advantages and returns (pure; jitted by caller).

    `models` holds 'policy', 'ref', 'critic', 'rm' params and the RM 'norm'.
    """
    s = scoring.score_rollout(cfg, rm_model_cfg, ppo_cfg, width, models, tokens_BL, mask_BL, done_B)
    resp_mask_BR = s["resp_mask"]
    values_BR = critic_values(rm_model_cfg, models["critic"], tokens_BL, mask_BL, width)
    rewards_BR = losses.per_token_rewards(s["score"], s["kl"], resp_mask_BR, kl_coef)
    adv_BR, returns_BR = losses.gae(rewards_BR, values_BR, resp_mask_BR, ppo_cfg.gamma, ppo_cfg.lam)
    if ppo_cfg.whiten_advantages:
        adv_BR = losses.masked_whiten(adv_BR, resp_mask_BR)
    exp = {
        "tokens": tokens_BL,
        "mask": mask_BL,
        "resp_mask": resp_mask_BR,
        "logprobs": s["logprobs"],
        "values": values_BR,
        "advantages": adv_BR,
        "returns": returns_BR,
    }
    stats = scoring.objective_stats(s, done_B, kl_coef) | {
        "ppo/returns/mean": losses.masked_mean(returns_BR, resp_mask_BR),
        "ppo/returns/var": losses.masked_var(returns_BR, resp_mask_BR),
        "ppo/val/mean": losses.masked_mean(values_BR, resp_mask_BR),
    }
    return exp, stats


# ----------------------------------------------------------------------------- the update


def minibatch_terms(
    cfg: ModelConfig,
    rm_model_cfg: ModelConfig,
    ppo_cfg: PPOConfig,
    width: int,
    params: dict,
    mb: dict,
):
    """PPO's loss in `step.make_update`'s form: (sums, weights, stats).

    The clipped policy loss and vf_coef · the clipped value loss are sums over response
    tokens; PPO-ptx adds ptx_coef · the LM loss summed over `mb['ptx_tokens']`' targets.
    """
    logp_BR, entropy_BR = policy_outputs(
        cfg, params["policy"], mb["tokens"], mb["mask"], width, ppo_cfg.temperature
    )
    values_BR = critic_values(rm_model_cfg, params["critic"], mb["tokens"], mb["mask"], width)
    pg_sum, n_tokens, stats = losses.ppo_policy_terms(
        logp_BR, mb["logprobs"], mb["advantages"], mb["resp_mask"], ppo_cfg.clip_eps, entropy_BR
    )
    vf_sum, _, vf_stats = losses.ppo_value_terms(
        values_BR, mb["values"], mb["returns"], mb["resp_mask"], ppo_cfg.vf_clip_eps
    )
    sums = {"policy": pg_sum, "value": ppo_cfg.vf_coef * vf_sum}
    weights = {"policy": n_tokens, "value": n_tokens}
    stats |= vf_stats
    scoring.add_ptx(cfg, ppo_cfg.ptx_coef, params["policy"], mb, sums, weights, stats)
    return sums, weights, stats


def minibatch_loss(
    cfg: ModelConfig,
    rm_model_cfg: ModelConfig,
    ppo_cfg: PPOConfig,
    width: int,
    params: dict,
    mb: dict,
    ptx_tokens=None,
) -> tuple[jax.Array, dict]:
    """Clipped policy loss + vf_coef · clipped value loss (+ ptx_coef · LM loss), a mean."""
    mb = mb if ptx_tokens is None else {**mb, "ptx_tokens": ptx_tokens}
    sums, weights, stats = minibatch_terms(cfg, rm_model_cfg, ppo_cfg, width, params, mb)
    loss = sum(sums[k] / jnp.maximum(weights[k], 1.0) for k in sums)
    return loss, stats | {"ppo/loss/total": loss}


def _minibatch_stats(m: dict) -> dict:
    stats = {k: v for k, v in m.items() if "/" in k}
    return stats | {
        "ppo/loss/total": m["loss"],
        "ppo/grad_norm": m["grad_norm"],
        "ppo/update_skipped": m["update_skipped"],
    }


def epochs_update(
    ppo_cfg: PPOConfig, update, params, opt_state, exp: dict, ptx_EMbT=None, *, key: jax.Array
):
    """`epochs` shuffled passes of `minibatches` Adam steps (`update`) over one rollout batch
    `exp` (with PPO-ptx, pretraining rows `ptx_EMbT` for each minibatch); a `step.StepUpdate`.

    Returns per-minibatch stats stacked as (epochs, minibatches): [0, 0] is the first update,
    where the policy still equals the sampler (ratio 1, approxkl 0, clipfrac 0).
    """
    b, m = exp["tokens"].shape[0], ppo_cfg.minibatches

    def minibatch(carry, xs):
        idx, ptx = xs
        mb = jax.tree.map(lambda x: x[idx], exp)
        if ptx is not None:
            mb["ptx_tokens"] = ptx
        params, opt_state, stats = update(*carry, mb)
        return (params, opt_state), _minibatch_stats(stats)

    def epoch(carry, xs):
        e, ptx_MbT = xs
        idx_MB = jax.random.permutation(jax.random.fold_in(key, e), b).reshape(m, b // m)
        return jax.lax.scan(minibatch, carry, (idx_MB, ptx_MbT))

    (params, opt_state), stats = jax.lax.scan(
        epoch, (params, opt_state), (jnp.arange(ppo_cfg.epochs), ptx_EMbT)
    )
    return params, opt_state, stats


@dataclasses.dataclass(frozen=True)
class PPOFunctions:
    """The jitted pieces of a PPO run (built once by `make_ppo`).

    experience(models, tokens, mask, done, kl_coef) -> (experience, stats);
    update(state, experience, ptx_EMbT or None) -> (state, stats).
    """

    experience: object
    update: object
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    lora: lora_lib.LoRAConfig | None = None

    def params(self, state: TrainState) -> dict:
        """The state's params as the models run them: the policy merged with its LoRA
        adapters when it has them (what rollouts, evaluation and the saved policy use)."""
        return lora_lib.merged_params(self.lora, state.params)


def _abstract_params(cfg: ModelConfig, rm_model_cfg: ModelConfig, ppo_cfg: PPOConfig) -> dict:
    key, has_critic = jax.random.key(0), ppo_cfg.has_critic

    def init():
        params = {"policy": model.init_params(cfg, key)}
        if ppo_cfg.lora is not None:
            params["policy"] = lora_lib.attach(ppo_cfg.lora, params["policy"], key)
        if has_critic:
            trunk = model.init_params(rm_model_cfg, key)
            params["critic"] = reward.from_policy(rm_model_cfg, trunk, key)
        return params

    return jax.eval_shape(init)


def make_ppo(
    cfg: ModelConfig,
    rm_model_cfg: ModelConfig,
    ppo_cfg: PPOConfig,
    opt_cfg,
    width: int,
    mesh,
    rules,
) -> PPOFunctions:
    """Jit experience scoring, and the update as a `step.jit_train_step` (explicit shardings,
    the state donated): PPO's GAE and critic, or RLOO's / GRPO's group baselines without one
    (`ppo_cfg.algo`), on the same rollouts, epochs of minibatches and optimizer."""
    lcfg = ppo_cfg.lora
    optimizer = make_optimizer(opt_cfg, ppo_cfg.steps * ppo_cfg.epochs * ppo_cfg.minibatches)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_shard = {"policy": sharding.param_shardings(cfg, mesh, rules)}
    if lcfg is not None:
        optimizer = lora_lib.freeze_frozen(optimizer)
        axes = family.param_axes(cfg)
        p_shard["policy"] = sharding.lora_shardings(lcfg, p_shard["policy"], axes, mesh, rules)
    if ppo_cfg.has_critic:
        p_shard["critic"] = reward.param_shardings(rm_model_cfg, mesh, rules)
        experience_fn = functools.partial(make_experience, cfg, rm_model_cfg, ppo_cfg, width)
        objective = functools.partial(minibatch_terms, cfg, rm_model_cfg, ppo_cfg, width)
    else:
        experience_fn = functools.partial(
            group_rl.group_experience, cfg, rm_model_cfg, ppo_cfg, width
        )
        objective = functools.partial(group_rl.group_minibatch_terms, cfg, ppo_cfg, width)
    rows = sharding.batch_sharding(mesh, rules, ndim=1)
    experience = jax.jit(experience_fn, out_shardings=(rows, rep))
    objective = lora_lib.wrap_objective(lcfg, objective)
    minibatch_update = make_update(objective, optimizer, opt_cfg.grad_accum_steps)
    update, state_shard = jit_train_step(
        functools.partial(epochs_update, ppo_cfg, minibatch_update),
        optimizer,
        _abstract_params(cfg, rm_model_cfg, ppo_cfg),
        p_shard,
        (rows, rep),
        mesh,
    )
    return PPOFunctions(experience, update, optimizer, state_shard, lcfg)


def init_state(fns: PPOFunctions, policy_params, critic_params, seed: int) -> TrainState:
    """Trainable policy + critic (None for RLOO / GRPO) with their optimizer state, on the
    state shardings.

    Params go through host memory, so the policy never shares buffers with the frozen
    reference (the update donates its state).
    """
    params = {"policy": policy_params}
    if fns.lora is not None:  # fresh adapters (b = 0: the policy is unchanged at step 0)
        key = jax.random.fold_in(jax.random.key(seed), 7)
        params["policy"] = lora_lib.attach(fns.lora, jax.device_get(policy_params), key)
    if critic_params is not None:
        params["critic"] = critic_params
    return place_state(fns.optimizer, params, jax.random.key(seed), fns.state_shardings)


def gold_rewards(task, tokenizer, prompts: list, tokens: np.ndarray, width: int) -> np.ndarray:
    """The task's gold reward of each sampled reply (the labeler PPO never sees)."""
    return np.array(
        [
            task.gold_reward(p, chat.decode_reply(tokenizer, row[width:]))
            for p, row in zip(prompts, tokens)
        ],
        np.float64,
    )


def evaluate(
    cfg, params, tokenizer, task, prompts: list, width: int, ppo_cfg: PPOConfig, key
) -> dict[str, float]:
    """Gold reward (mean, std over samples) of the policy on fixed prompts, at its temperature."""
    ids = [chat.prompt_ids(tokenizer, p) for p in prompts]
    out = chat.generate_replies(
        cfg,
        params,
        tokenizer,
        ids,
        width,
        key=key,
        max_new_tokens=ppo_cfg.max_new_tokens,
        temperature=ppo_cfg.temperature,
        chunk=ppo_cfg.batch_size,
    )
    gold = gold_rewards(task, tokenizer, prompts, out["tokens"], width)
    return {
        "gold_reward": float(gold.mean()),
        "gold_reward_std": float(gold.std()),
        "stop_rate": float(out["done"].mean()),
    }


def iteration(
    fns: PPOFunctions,
    state: TrainState,
    models: dict,
    kl_coef,
    batch: dict,
    ptx_EMbT,
    params: dict | None = None,
) -> tuple[TrainState, dict]:
    """Score one rollout batch, update on it; returns host-side stats of both. `params`:
    `fns.params(state)` when the caller already has it (the rollout's)."""
    exp, stats = fns.experience(
        models | (fns.params(state) if params is None else params),
        batch["tokens"],
        batch["mask"],
        batch["done"],
        kl_coef,
    )
    state, train_stats = fns.update(state, exp, ptx_EMbT)
    train_stats = jax.device_get(train_stats)
    out = {k: float(v) for k, v in jax.device_get(stats).items()}
    out |= {k: float(np.mean(v)) for k, v in train_stats.items()}
    out |= {
        f"{k}/first_minibatch": float(train_stats[k][0, 0])
        for k in FIRST_MINIBATCH_CHECKS
        if k in train_stats
    }
    return state, out


def rollout(cfg, params, tokenizer, prompts: list, width: int, ppo_cfg: PPOConfig, key) -> dict:
    """One batch of replies from the current policy (numpy, plus prompt turns)."""
    t0 = time.perf_counter()
    out = chat.generate_replies(
        cfg,
        params,
        tokenizer,
        [chat.prompt_ids(tokenizer, p) for p in prompts],
        width,
        key=key,
        max_new_tokens=ppo_cfg.max_new_tokens,
        temperature=ppo_cfg.temperature,
    )
    return out | {"time": time.perf_counter() - t0}
