"""Critic-free online RL: RLOO's leave-one-out and GRPO's group-normalised advantages over K
samples per prompt, and GRPO's clipped token-level loss with the k3 KL to the reference, on
PPO's surrogate (`losses.ppo_policy_terms`).

The trainers are PPO's (`ppo.make_ppo` with `PPOConfig.algo='rloo'|'grpo'`): the same sampler,
scoring (`scoring.score_rollout`), epochs of minibatch updates and KL controller, with
`group_experience` and `group_minibatch_terms` in place of GAE and the critic.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from gptjax.config import ModelConfig
from gptjax.rlhf import losses, scoring
from gptjax.rlhf.losses import (
    Mask,
    Scalar,
    Stats,
    _check_shapes,
    _safe_div,
    kl_k3,
    masked_sum,
    ppo_policy_terms,
)

GROUP_BASELINES = ("rloo", "grpo")


def group_advantages(
    scores_BK: Float[Array, "B K"], valid_BK: Mask, kind: str, eps: float = 1e-4
) -> Float[Array, "B K"]:
    """Critic-free advantages of K sampled responses per prompt (0 for invalid ones).

    'rloo': s_i minus the mean of the prompt's other valid responses (Ahmadian et al. 2024's
      leave-one-out baseline, unbiased since it does not depend on s_i);
    'grpo': (s_i - group mean) / (group std + eps) (Shao et al. 2024), the std with Bessel's
      correction as TRL computes it.
    A prompt with a single valid response gets 0: it has no baseline.
    """
    if kind not in GROUP_BASELINES:
        raise ValueError(f"group baseline {kind!r} is not one of {GROUP_BASELINES}.")
    _check_shapes("group_advantages", scores_BK, valid_BK)
    m_BK = (jnp.asarray(valid_BK) != 0).astype(jnp.result_type(scores_BK, jnp.float32))
    s_BK = jnp.where(m_BK != 0, scores_BK, 0)
    n_B1 = jnp.sum(m_BK, axis=1, keepdims=True)
    total_B1 = jnp.sum(s_BK * m_BK, axis=1, keepdims=True)
    if kind == "rloo":
        adv_BK = s_BK - _safe_div(total_B1 - s_BK, n_B1 - 1)
    else:
        mean_B1 = _safe_div(total_B1, n_B1)
        var_B1 = _safe_div(jnp.sum(jnp.square(s_BK - mean_B1) * m_BK, 1, keepdims=True), n_B1 - 1)
        adv_BK = (s_BK - mean_B1) / (jnp.sqrt(var_B1) + eps)
    return jnp.where((m_BK != 0) & (n_B1 > 1), adv_BK, 0)


def grpo_policy_terms(
    logprobs_BT: Float[Array, "B T"],
    old_logprobs_BT: Float[Array, "B T"],
    ref_logprobs_BT: Float[Array, "B T"],
    advantages_B: Float[Array, " B"],
    mask_BT: Mask,
    clip_eps: float,
    kl_coef: float,
) -> tuple[Scalar, Scalar, Stats]:
    """GRPO's loss before its one division: PPO's clipped token-level surrogate with each
    response's advantage on all its tokens, plus kl_coef times the k3 estimate of
    KL(pi || pi_ref) per token, in the loss rather than the reward (Shao et al. 2024). The
    mean is over the batch's valid tokens, as every loss here. At the first minibatch of a
    rollout (old = current) the ratio is 1 and clipfrac 0; with pi = pi_ref the KL is 0."""
    adv_BT = jnp.broadcast_to(advantages_B[:, None], logprobs_BT.shape)
    total, count, stats = ppo_policy_terms(logprobs_BT, old_logprobs_BT, adv_BT, mask_BT, clip_eps)
    valid_BT = jnp.asarray(mask_BT) != 0
    kl_BT = kl_k3(jnp.where(valid_BT, logprobs_BT, 0), jnp.where(valid_BT, ref_logprobs_BT, 0))
    kl_total, _ = masked_sum(kl_BT, mask_BT)
    stats["policy/kl_ref"] = _safe_div(kl_total, count)
    return total + kl_coef * kl_total, count, stats


# ------------------------------------------------------------------- the trainers' pieces


def group_experience(
    cfg: ModelConfig,
    rm_model_cfg: ModelConfig,
    ppo_cfg,
    width: int,
    models: dict,
    tokens_BL,
    mask_BL,
    done_B,
    kl_coef,
) -> tuple[dict, dict]:
    """A rollout of K = `group_size` consecutive replies per prompt, scored for RLOO or GRPO
    (`ppo_cfg.algo`); pure, jitted by the caller. No critic: `models` holds 'policy', 'ref',
    'rm' and 'norm'.

    RLOO's reward is the sequence-level RM score minus β · the summed KL estimate (Ahmadian
    et al. 2024, as TRL's RLOO), baselined leave-one-out; GRPO's is the score alone, group-
    normalised, with the KL to the reference in the loss (`grpo_policy_terms`) at β.
    """
    s = scoring.score_rollout(cfg, rm_model_cfg, ppo_cfg, width, models, tokens_BL, mask_BL, done_B)
    k, b = ppo_cfg.group_size, tokens_BL.shape[0]
    reward_B = s["score"]
    if ppo_cfg.algo == "rloo":
        reward_B = reward_B - kl_coef * s["kl"].sum(axis=1)
    reward_GK = reward_B.reshape(b // k, k)
    adv_B = group_advantages(reward_GK, jnp.ones_like(reward_GK), ppo_cfg.algo).reshape(b)
    exp = {
        "tokens": tokens_BL,
        "mask": mask_BL,
        "resp_mask": s["resp_mask"],
        "logprobs": s["logprobs"],
        "ref_logprobs": s["ref_logprobs"],
        "advantages": adv_B,
        "kl_coef": jnp.full((b,), kl_coef, jnp.float32),
    }
    stats = scoring.objective_stats(s, done_B, kl_coef) | {
        "group/reward_std_within": jnp.std(reward_GK, axis=1).mean(),
        "group/advantage_abs": jnp.abs(adv_B).mean(),
    }
    return exp, stats


def group_minibatch_terms(cfg: ModelConfig, ppo_cfg, width: int, params: dict, mb: dict):
    """RLOO's / GRPO's loss in `step.make_update`'s form (sums, weights, stats): the clipped
    token-level surrogate with each reply's advantage (GRPO: plus β · k3 KL to the reference,
    RLOO: the KL is in its reward), plus PPO-ptx's LM term when `mb` carries 'ptx_tokens'."""
    logp_BR, entropy_BR = scoring.policy_outputs(
        cfg, params["policy"], mb["tokens"], mb["mask"], width, ppo_cfg.temperature
    )
    beta = mb["kl_coef"][0] if ppo_cfg.algo == "grpo" else 0.0
    total, count, stats = grpo_policy_terms(
        logp_BR,
        mb["logprobs"],
        mb["ref_logprobs"],
        mb["advantages"],
        mb["resp_mask"],
        ppo_cfg.clip_eps,
        beta,
    )
    stats["policy/entropy"] = losses.masked_mean(entropy_BR, mb["resp_mask"])
    sums, weights = {"policy": total}, {"policy": count}
    scoring.add_ptx(cfg, ppo_cfg.ptx_coef, params["policy"], mb, sums, weights, stats)
    return sums, weights, stats
