"""What every online RL method here computes on a sampled rollout, before its own advantages.

Log-probs are those of the *sampling* policy, softmax(logits / temperature), for the policy and
the reference alike (as lm-human-preferences does), so ratios and KL compare like with like.
The reward model's score is read at the last real token; a reply that never stopped gets the
fixed `no_stop_penalty` instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from gptjax.config import ModelConfig
from gptjax.models import family
from gptjax.models import gpt as model
from gptjax.rlhf import losses, reward


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


def score_rollout(
    cfg: ModelConfig,
    rm_model_cfg: ModelConfig,
    ppo_cfg,
    width: int,
    models: dict,
    tokens_BL,
    mask_BL,
    done_B,
) -> dict:
    """Policy and reference log-probs, entropy, the per-token KL estimate (`kl_estimator`,
    0 off the reply), the RM score and the score with the no-stop penalty, of a rollout.

    `models` holds 'policy', 'ref' and 'rm' params and the RM 'norm'; `ppo_cfg` gives
    temperature, kl_estimator and no_stop_penalty.
    """
    resp_mask_BR = mask_BL[:, width:]
    logp_BR, entropy_BR = policy_outputs(
        cfg, models["policy"], tokens_BL, mask_BL, width, ppo_cfg.temperature
    )
    ref_logp_BR, _ = policy_outputs(
        cfg, models["ref"], tokens_BL, mask_BL, width, ppo_cfg.temperature
    )
    kl_BR = losses.kl_estimate(logp_BR, ref_logp_BR, ppo_cfg.kl_estimator)
    rm_B = reward.scores(rm_model_cfg, models["rm"], models["norm"], tokens_BL, mask_BL)
    return {
        "resp_mask": resp_mask_BR,
        "logprobs": logp_BR,
        "ref_logprobs": ref_logp_BR,
        "entropy": entropy_BR,
        "kl": jnp.where(resp_mask_BR != 0, kl_BR, 0),
        "rm": rm_B,
        "score": jnp.where(done_B, rm_B, ppo_cfg.no_stop_penalty),
    }


def objective_stats(s: dict, done_B, kl_coef) -> dict:
    """The `objective/*` numbers every method logs from `score_rollout`'s output."""
    kl_B = s["kl"].sum(axis=1)
    return {
        "objective/kl": kl_B.mean(),
        "objective/kl_coef": jnp.asarray(kl_coef),
        "objective/scores": s["score"].mean(),
        "objective/rm_scores": s["rm"].mean(),
        "objective/score_total": (s["score"] - kl_coef * kl_B).mean(),
        "objective/entropy": losses.masked_mean(s["entropy"], s["resp_mask"]),
        "ppo/stop_rate": done_B.astype(jnp.float32).mean(),
        "ppo/response_length": s["resp_mask"].sum(axis=1).astype(jnp.float32).mean(),
    }


def add_ptx(cfg: ModelConfig, ptx_coef: float, policy, mb: dict, sums, weights, stats) -> None:
    """PPO-ptx: ptx_coef · the LM loss summed over `mb['ptx_tokens']`' targets, when given
    (in place, in `step.make_update`'s (sums, weights, stats) form)."""
    if "ptx_tokens" in mb:
        ptx_sum, n_ptx = family.loss_sums(cfg, policy, {"tokens": mb["ptx_tokens"]})
        sums["ptx"], weights["ptx"] = ptx_coef * ptx_sum, n_ptx
        stats["ptx/loss"] = ptx_sum / jnp.maximum(n_ptx, 1.0)
