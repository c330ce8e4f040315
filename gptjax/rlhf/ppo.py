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
from jaxtyping import Array, Float, Int

from gptjax.config import ModelConfig
from gptjax.models import family
from gptjax.models import gpt as model
from gptjax.parallel import mesh as sharding
from gptjax.rlhf import chat, losses, reward
from gptjax.training.optimizer import make_optimizer
from gptjax.training.step import TrainState, jit_train_step, make_update, place_state

log = logging.getLogger("gptjax")


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
    """

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
    seed: int = 2

    def __post_init__(self):
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

    def controller(self):
        if self.adaptive_kl:
            return losses.AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon)
        return losses.FixedKLController(self.kl_coef)


# ----------------------------------------------------------------------------- scoring


def policy_outputs(
    cfg: ModelConfig,
    params,
    tokens_BL: Int[Array, "B L"],
    mask_BL: Int[Array, "B L"],
    width: int,
    temperature: float,
) -> tuple[Float[Array, "B R"], Float[Array, "B R"]]:
    """Log-prob and entropy of each response token (slots width..L-1) under softmax(logits/τ)."""
    logits_BRV = model.forward(cfg, params, tokens_BL, mask=mask_BL)[:, width - 1 : -1]
    logp_BRV = jax.nn.log_softmax(logits_BRV / temperature, axis=-1)
    logp_BR = jnp.take_along_axis(logp_BRV, tokens_BL[:, width:, None], axis=-1)[..., 0]
    entropy_BR = -jnp.sum(jnp.exp(logp_BRV) * logp_BRV, axis=-1)
    return logp_BR, entropy_BR


def critic_values(
    cfg: ModelConfig, params, tokens_BL: Int[Array, "B L"], mask_BL: Int[Array, "B L"], width: int
) -> Float[Array, "B R"]:
    """V(state before response token t), read where the policy's logits for token t are."""
    return reward.head_values(cfg, params, tokens_BL, mask_BL)[:, width - 1 : -1]


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
    resp_mask_BR = mask_BL[:, width:]
    valid_BR = resp_mask_BR != 0
    logp_BR, entropy_BR = policy_outputs(
        cfg, models["policy"], tokens_BL, mask_BL, width, ppo_cfg.temperature
    )
    ref_logp_BR, _ = policy_outputs(
        cfg, models["ref"], tokens_BL, mask_BL, width, ppo_cfg.temperature
    )
    values_BR = critic_values(rm_model_cfg, models["critic"], tokens_BL, mask_BL, width)
    rm_B = reward.scores(rm_model_cfg, models["rm"], models["norm"], tokens_BL, mask_BL)
    score_B = jnp.where(done_B, rm_B, ppo_cfg.no_stop_penalty)
    kl_BR = jnp.where(valid_BR, losses.kl_estimate(logp_BR, ref_logp_BR, ppo_cfg.kl_estimator), 0)
    rewards_BR = losses.per_token_rewards(score_B, kl_BR, resp_mask_BR, kl_coef)
    adv_BR, returns_BR = losses.gae(rewards_BR, values_BR, resp_mask_BR, ppo_cfg.gamma, ppo_cfg.lam)
    if ppo_cfg.whiten_advantages:
        adv_BR = losses.masked_whiten(adv_BR, resp_mask_BR)
    kl_B = kl_BR.sum(axis=1)
    exp = {
        "tokens": tokens_BL,
        "mask": mask_BL,
        "resp_mask": resp_mask_BR,
        "logprobs": logp_BR,
        "values": values_BR,
        "advantages": adv_BR,
        "returns": returns_BR,
    }
    stats = {
        "objective/kl": kl_B.mean(),
        "objective/kl_coef": jnp.asarray(kl_coef),
        "objective/scores": score_B.mean(),
        "objective/rm_scores": rm_B.mean(),
        "objective/score_total": (score_B - kl_coef * kl_B).mean(),
        "objective/entropy": losses.masked_mean(entropy_BR, resp_mask_BR),
        "ppo/returns/mean": losses.masked_mean(returns_BR, resp_mask_BR),
        "ppo/returns/var": losses.masked_var(returns_BR, resp_mask_BR),
        "ppo/val/mean": losses.masked_mean(values_BR, resp_mask_BR),
        "ppo/stop_rate": done_B.astype(jnp.float32).mean(),
        "ppo/response_length": resp_mask_BR.sum(axis=1).astype(jnp.float32).mean(),
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
    if "ptx_tokens" in mb:
        ptx_sum, n_ptx = family.loss_sums(cfg, params["policy"], {"tokens": mb["ptx_tokens"]})
        sums["ptx"], weights["ptx"] = ppo_cfg.ptx_coef * ptx_sum, n_ptx
        stats["ptx/loss"] = ptx_sum / jnp.maximum(n_ptx, 1.0)
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


def _abstract_params(cfg: ModelConfig, rm_model_cfg: ModelConfig) -> dict:
    key = jax.random.key(0)
    return jax.eval_shape(
        lambda: {
            "policy": model.init_params(cfg, key),
            "critic": reward.from_policy(rm_model_cfg, model.init_params(rm_model_cfg, key), key),
        }
    )


def make_ppo(
    cfg: ModelConfig,
    rm_model_cfg: ModelConfig,
    ppo_cfg: PPOConfig,
    opt_cfg,
    width: int,
    mesh,
    rules,
) -> PPOFunctions:
    """Jit experience scoring, and the PPO update as a `step.jit_train_step` (explicit
    shardings, the state donated)."""
    optimizer = make_optimizer(opt_cfg, ppo_cfg.steps * ppo_cfg.epochs * ppo_cfg.minibatches)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_shard = {
        "policy": sharding.param_shardings(cfg, mesh, rules),
        "critic": reward.param_shardings(rm_model_cfg, mesh, rules),
    }
    rows = sharding.batch_sharding(mesh, rules, ndim=1)
    experience = jax.jit(
        functools.partial(make_experience, cfg, rm_model_cfg, ppo_cfg, width),
        out_shardings=(rows, rep),
    )
    objective = functools.partial(minibatch_terms, cfg, rm_model_cfg, ppo_cfg, width)
    minibatch_update = make_update(objective, optimizer, opt_cfg.grad_accum_steps)
    update, state_shard = jit_train_step(
        functools.partial(epochs_update, ppo_cfg, minibatch_update),
        optimizer,
        _abstract_params(cfg, rm_model_cfg),
        p_shard,
        (rows, rep),
        mesh,
    )
    return PPOFunctions(experience, update, optimizer, state_shard)


def init_state(fns: PPOFunctions, policy_params, critic_params, seed: int) -> TrainState:
    """Trainable policy + critic with their optimizer state, on the state shardings.

    Params go through host memory, so the policy never shares buffers with the frozen
    reference (the update donates its state).
    """
    return place_state(
        fns.optimizer,
        {"policy": policy_params, "critic": critic_params},
        jax.random.key(seed),
        fns.state_shardings,
    )


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
    fns: PPOFunctions, state: TrainState, models: dict, kl_coef, batch: dict, ptx_EMbT
) -> tuple[TrainState, dict]:
    """Score one rollout batch, update on it; returns host-side stats of both."""
    exp, stats = fns.experience(
        models | {"policy": state.params["policy"], "critic": state.params["critic"]},
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
        for k in ("policy/approxkl", "policy/clipfrac", "policy/ratio_mean", "val/clipfrac")
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
