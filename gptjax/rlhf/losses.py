"""The math of RLHF: reward-model ranking loss, PPO losses, GAE, KL penalties and controllers.

Everything is a small pure function of arrays, so it jits, differentiates and runs in float64
(the tests compare against textbook loops that way). Names and logged stats follow
openai/lm-human-preferences (`policy/approxkl`, `policy/clipfrac`, `val/clipfrac`, ...), so curves
can be read against theirs.

Masks mark real response tokens: 1s then 0s per row (padding after the stop token). Every mean is
over the *whole batch's* valid tokens, `sum(x * mask) / sum(mask)`, never a mean of per-row means,
so long responses weigh more, as in the open implementations. Masked entries may hold garbage
(even inf/NaN): they are replaced by 0 with `jnp.where` before any arithmetic, so they change
neither the values nor the gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

Mask = Bool[Array, " ..."] | Float[Array, " ..."]
Scalar = Float[Array, ""]
Stats = dict[str, Scalar]


def _check_shapes(name: str, *arrays: Array) -> None:
    """Shapes are static, so a mismatch is caught at trace time with a readable message."""
    shapes = [jnp.shape(a) for a in arrays]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"{name}: all inputs must have the same shape, got {shapes}")


def _safe_div(num: Array, den: Array) -> Array:
    """num / den, and 0 where den == 0: an empty batch logs 0 instead of NaN-poisoning a run."""
    return jnp.where(den != 0, num / jnp.where(den != 0, den, 1), 0)


# ----------------------------------------------------------------------------- masked statistics


def masked_mean(
    x: Float[Array, " ..."], mask: Mask, axis: int | None = None
) -> Float[Array, " ..."]:
    """sum(x * mask) / sum(mask); garbage under the mask is dropped, an empty mask gives 0."""
    _check_shapes("masked_mean", x, mask)
    m = jnp.asarray(mask).astype(jnp.result_type(x, jnp.float32))
    total = jnp.sum(jnp.where(m != 0, x, 0) * m, axis=axis)
    return _safe_div(total, jnp.sum(m, axis=axis))


def masked_var(x: Float[Array, " ..."], mask: Mask, unbiased: bool = True) -> Scalar:
    """Variance over valid entries only; `unbiased` applies Bessel's n / (n - 1), as trl does."""
    x = jnp.where(jnp.asarray(mask) != 0, x, 0)  # inf under the mask would NaN the gradient
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        n = jnp.sum(jnp.asarray(mask).astype(var.dtype))
        var = var * _safe_div(n, n - 1)
    return var


def masked_whiten(
    x: Float[Array, " ..."], mask: Mask, shift_mean: bool = True
) -> Float[Array, " ..."]:
    """(x - mean) / std over valid entries; 0 where masked.

    Padding must not enter the statistics, or short responses would shift everyone's advantages.
    `shift_mean=False` adds the mean back: lm-human-preferences whitens rewards that way, keeping
    their sign (a good response stays positive) while fixing their scale.
    """
    valid = jnp.asarray(mask) != 0
    x = jnp.where(valid, x, 0)  # inf under the mask would NaN the gradient of mean and var
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(valid, whitened, 0)


# ----------------------------------------------------------------------------- advantages


def gae(
    rewards_BT: Float[Array, "B T"],
    values_BT: Float[Array, "B T"],
    mask_BT: Mask,
    gamma: float,
    lam: float,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Generalized advantage estimation (Schulman et al. 2016) with a reverse `lax.scan`.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}. The episode
    ends at a row's last valid token, so the value (and advantage) after it is 0: the response is
    over and no future reward can come, whatever the value head says about the padding.
    A scan, not a Python loop, so the trace is O(1) in T. Returns (advantages, advantages + values),
    both 0 where masked.
    """
    _check_shapes("gae", rewards_BT, values_BT, mask_BT)
    valid_BT = jnp.asarray(mask_BT) != 0
    m_BT = valid_BT.astype(jnp.result_type(rewards_BT, values_BT, jnp.float32))
    r_BT = jnp.where(valid_BT, rewards_BT, 0)
    v_BT = jnp.where(valid_BT, values_BT, 0)
    # V_{t+1} is already 0 after the last valid token because v_BT is masked.
    next_v_BT = jnp.pad(v_BT[:, 1:], ((0, 0), (0, 1)))
    next_m_BT = jnp.pad(m_BT[:, 1:], ((0, 0), (0, 1)))
    delta_BT = r_BT + gamma * next_v_BT - v_BT

    def step(next_adv_B, xs):
        delta_B, next_m_B = xs
        adv_B = delta_B + gamma * lam * next_m_B * next_adv_B
        return adv_B, adv_B

    zeros_B = jnp.zeros(delta_BT.shape[:1], delta_BT.dtype)
    _, adv_TB = jax.lax.scan(step, zeros_B, (delta_BT.T, next_m_BT.T), reverse=True)
    adv_BT = adv_TB.T * m_BT
    return adv_BT, (adv_BT + v_BT) * m_BT


# ----------------------------------------------------------------------------- PPO


def masked_sum(x: Float[Array, " ..."], mask: Mask) -> tuple[Scalar, Scalar]:
    """(sum(x * mask), sum(mask)) over valid entries: a masked mean before its division."""
    _check_shapes("masked_sum", x, mask)
    m = jnp.asarray(mask).astype(jnp.result_type(x, jnp.float32))
    return jnp.sum(jnp.where(m != 0, x, 0) * m), jnp.sum(m)


def ppo_policy_terms(
    logprobs_BT: Float[Array, "B T"],
    old_logprobs_BT: Float[Array, "B T"],
    advantages_BT: Float[Array, "B T"],
    mask_BT: Mask,
    clip_eps: float,
    entropy_BT: Float[Array, "B T"] | None = None,
) -> tuple[Scalar, Scalar, Stats]:
    """(clipped surrogate summed over valid tokens, their count, stats): see `ppo_policy_loss`."""
    _check_shapes("ppo_policy_loss", logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT)
    valid_BT = jnp.asarray(mask_BT) != 0
    log_ratio_BT = jnp.where(valid_BT, logprobs_BT - old_logprobs_BT, 0)
    adv_BT = jnp.where(valid_BT, advantages_BT, 0)
    ratio_BT = jnp.exp(log_ratio_BT)
    loss_unclipped_BT = -adv_BT * ratio_BT
    loss_clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1 - clip_eps, 1 + clip_eps)
    total, count = masked_sum(jnp.maximum(loss_unclipped_BT, loss_clipped_BT), mask_BT)
    stats = {
        "policy/loss": _safe_div(total, count),
        "policy/approxkl": 0.5 * masked_mean(jnp.square(log_ratio_BT), mask_BT),
        "policy/clipfrac": masked_mean(
            (loss_clipped_BT > loss_unclipped_BT).astype(total.dtype), mask_BT
        ),
        "policy/ratio_mean": masked_mean(ratio_BT, mask_BT),
    }
    if entropy_BT is not None:
        _check_shapes("ppo_policy_loss(entropy)", entropy_BT, mask_BT)
        stats["policy/entropy"] = masked_mean(entropy_BT, mask_BT)
    return total, count, stats


def ppo_policy_loss(
    logprobs_BT: Float[Array, "B T"],
    old_logprobs_BT: Float[Array, "B T"],
    advantages_BT: Float[Array, "B T"],
    mask_BT: Mask,
    clip_eps: float,
    entropy_BT: Float[Array, "B T"] | None = None,
) -> tuple[Scalar, Stats]:
    """Clipped surrogate: masked mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    The max (of losses) is the pessimistic bound: the policy gets no credit for moving a token's
    probability further than eps in the direction the advantage likes, which keeps several epochs
    on one rollout batch from running away. `policy/clipfrac` is the fraction of tokens where the
    clipped term won (its gradient is zero there); with `policy/approxkl` it is the first thing to
    watch: at the first minibatch of an epoch both are 0 and the ratio is 1.
    """
    total, count, stats = ppo_policy_terms(
        logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT, clip_eps, entropy_BT
    )
    return _safe_div(total, count), stats


def ppo_value_terms(
    values_BT: Float[Array, "B T"],
    old_values_BT: Float[Array, "B T"],
    returns_BT: Float[Array, "B T"],
    mask_BT: Mask,
    clip_eps: float,
) -> tuple[Scalar, Scalar, Stats]:
    """(0.5 * clipped squared error summed over valid tokens, their count, stats):
    see `ppo_value_loss`."""
    _check_shapes("ppo_value_loss", values_BT, old_values_BT, returns_BT, mask_BT)
    valid_BT = jnp.asarray(mask_BT) != 0
    v_BT = jnp.where(valid_BT, values_BT, 0)
    old_BT = jnp.where(valid_BT, old_values_BT, 0)
    ret_BT = jnp.where(valid_BT, returns_BT, 0)
    v_clipped_BT = old_BT + jnp.clip(v_BT - old_BT, -clip_eps, clip_eps)
    err_BT = jnp.square(v_BT - ret_BT)
    err_clipped_BT = jnp.square(v_clipped_BT - ret_BT)
    total, count = masked_sum(0.5 * jnp.maximum(err_BT, err_clipped_BT), mask_BT)
    stats = {
        "val/loss": _safe_div(total, count),
        "val/clipfrac": masked_mean((err_clipped_BT > err_BT).astype(total.dtype), mask_BT),
        "val/error": masked_mean(err_BT, mask_BT),
        "val/mean": masked_mean(v_BT, mask_BT),
    }
    return total, count, stats


def ppo_value_loss(
    values_BT: Float[Array, "B T"],
    old_values_BT: Float[Array, "B T"],
    returns_BT: Float[Array, "B T"],
    mask_BT: Mask,
    clip_eps: float,
) -> tuple[Scalar, Stats]:
    """0.5 * masked mean of max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2).

    Clipping the value around the rollout-time value mirrors the policy clip: the value head
    cannot jump far from where it was in one PPO epoch. Taking the max means clipping only ever
    removes gradient (when the clipped error is larger), never adds a bigger step.
    """
    total, count, stats = ppo_value_terms(values_BT, old_values_BT, returns_BT, mask_BT, clip_eps)
    return _safe_div(total, count), stats


# ----------------------------------------------------------------------------- reward model


def ranked_pairs(s_BK, ranks_BK, valid_BK):
    """(pair_BKK, margin_BKK): response i strictly better than j (both real), and s_i - s_j
    there (0 elsewhere). Every ranking loss (reward model, DPO, IPO) is a function of these."""
    valid_BK = jnp.asarray(valid_BK) != 0
    s_BK = jnp.where(valid_BK, s_BK, 0)
    both_BKK = valid_BK[:, :, None] & valid_BK[:, None, :]
    pair_BKK = both_BKK & (ranks_BK[:, :, None] < ranks_BK[:, None, :])
    margin_BKK = jnp.where(pair_BKK, s_BK[:, :, None] - s_BK[:, None, :], 0)
    return pair_BKK, margin_BKK


def per_prompt_mean(nll_BKK, pair_f_BKK) -> tuple[Scalar, Scalar, Scalar]:
    """(sum over prompts of each prompt's mean pair loss, prompts with a pair, pairs)."""
    n_pairs_B = jnp.sum(pair_f_BKK, axis=(1, 2))
    has_pair_B = (n_pairs_B > 0).astype(nll_BKK.dtype)
    per_prompt_B = _safe_div(jnp.sum(nll_BKK * pair_f_BKK, axis=(1, 2)), n_pairs_B)
    return jnp.sum(per_prompt_B * has_pair_B), jnp.sum(has_pair_B), jnp.sum(n_pairs_B)


def reward_ranking_terms(
    scores_BK: Float[Array, "B K"],
    ranks_BK: Int[Array, "B K"] | Float[Array, "B K"],
    valid_BK: Mask,
) -> tuple[Scalar, Scalar, Stats]:
    """(sum over prompts of each prompt's mean pair loss, the number of prompts with a pair,
    stats): `reward_ranking_loss` before its one division, for gradient accumulation."""
    _check_shapes("reward_ranking_loss", scores_BK, ranks_BK, valid_BK)
    pair_BKK, margin_BKK = ranked_pairs(scores_BK, ranks_BK, valid_BK)
    pair_f_BKK = pair_BKK.astype(margin_BKK.dtype)
    total, n_prompts, n_pairs = per_prompt_mean(-jax.nn.log_sigmoid(margin_BKK), pair_f_BKK)
    correct = jnp.sum((margin_BKK > 0).astype(margin_BKK.dtype) * pair_f_BKK)
    stats = {
        "reward/loss": _safe_div(total, n_prompts),
        "reward/accuracy": _safe_div(correct, n_pairs),
        "reward/margin": _safe_div(jnp.sum(margin_BKK), n_pairs),
    }
    return total, n_prompts, stats


def reward_ranking_loss(
    scores_BK: Float[Array, "B K"],
    ranks_BK: Int[Array, "B K"] | Float[Array, "B K"],
    valid_BK: Mask,
) -> tuple[Scalar, Stats]:
    """InstructGPT's RM loss: per prompt, the mean of -log sigmoid(s_better - s_worse) over pairs.

    All C(K, 2) comparisons of a prompt form one batch element (Ouyang et al. 2022): each
    completion is seen in one forward pass rather than K - 1 separate elements, which the paper
    found overfits. Rank 0 is best; equal ranks express no preference and form no pair; invalid
    responses (padding when prompts have different K) form none either. Prompts without any pair
    are left out of the mean over prompts. `log_sigmoid` keeps large margins finite.
    """
    total, n_prompts, stats = reward_ranking_terms(scores_BK, ranks_BK, valid_BK)
    return _safe_div(total, n_prompts), stats


def pairwise_loss(
    chosen_B: Float[Array, " B"], rejected_B: Float[Array, " B"]
) -> tuple[Scalar, Stats]:
    """The K = 2 case: mean of -log sigmoid(s_chosen - s_rejected), with the same stats."""
    _check_shapes("pairwise_loss", chosen_B, rejected_B)
    scores_BK = jnp.stack([chosen_B, rejected_B], axis=1)
    ranks_BK = jnp.broadcast_to(jnp.array([0, 1]), scores_BK.shape)
    return reward_ranking_loss(scores_BK, ranks_BK, jnp.ones(scores_BK.shape, bool))


# ----------------------------------------------------------------------------- KL penalty


def kl_k1(
    logprobs: Float[Array, " ..."], ref_logprobs: Float[Array, " ..."]
) -> Float[Array, " ..."]:
    """log p - log q: unbiased for KL(p||q) under samples from p, but high variance and can be < 0.

    The per-token penalty of InstructGPT and lm-human-preferences; see Schulman, "Approximating
    KL divergence" (2020) for k1/k2/k3.
    """
    return logprobs - ref_logprobs


def kl_k2(
    logprobs: Float[Array, " ..."], ref_logprobs: Float[Array, " ..."]
) -> Float[Array, " ..."]:
    """0.5 (log p - log q)^2: biased but low variance, always >= 0; what `policy/approxkl` uses."""
    return 0.5 * jnp.square(logprobs - ref_logprobs)


def kl_k3(
    logprobs: Float[Array, " ..."], ref_logprobs: Float[Array, " ..."]
) -> Float[Array, " ..."]:
    """(r - 1) - log r with r = q/p: unbiased and always >= 0 (since log r <= r - 1).

    Written as expm1(log r) - log r so that near r = 1 the two nearly-equal terms do not cancel.
    """
    log_r = ref_logprobs - logprobs
    return jnp.expm1(log_r) - log_r


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(
    logprobs: Float[Array, " ..."], ref_logprobs: Float[Array, " ..."], kind: str = "k1"
) -> Float[Array, " ..."]:
    """Per-token estimate of KL(policy || ref) from the sampled tokens' log-probs; kind k1|k2|k3."""
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"kl_estimate: kind must be one of {sorted(_KL_ESTIMATORS)}, got {kind!r}")
    _check_shapes("kl_estimate", logprobs, ref_logprobs)
    return _KL_ESTIMATORS[kind](logprobs, ref_logprobs)


def per_token_rewards(
    scores_B: Float[Array, " B"],
    kl_BT: Float[Array, "B T"],
    mask_BT: Mask,
    kl_coef: float | Scalar,
) -> Float[Array, "B T"]:
    """-kl_coef * KL at every valid token, plus the RM score at each row's last valid token.

    The reward model scores the whole response, so its score arrives when the episode ends: at the
    last real token, not on the padding after it (where GAE would never see it). Rows without a
    valid token get nothing.
    """
    _check_shapes("per_token_rewards", kl_BT, mask_BT)
    if jnp.shape(scores_B) != jnp.shape(kl_BT)[:1]:
        raise ValueError(
            f"per_token_rewards: scores {jnp.shape(scores_B)} vs kl {jnp.shape(kl_BT)}"
        )
    valid_BT = jnp.asarray(mask_BT) != 0
    rewards_BT = -kl_coef * jnp.where(valid_BT, kl_BT, 0)
    last_B = jnp.sum(valid_BT, axis=1) - 1  # -1 for an empty row: one_hot gives all zeros
    last_BT = jax.nn.one_hot(last_B, kl_BT.shape[1], dtype=rewards_BT.dtype)
    return rewards_BT + last_BT * scores_B[:, None].astype(rewards_BT.dtype)


# ----------------------------------------------------------------------------- KL controllers


def update_kl_coef(
    kl_coef: float | Scalar,
    current_kl: float | Scalar,
    n_steps: int | Scalar,
    target: float = 6.0,
    horizon: float = 10_000,
) -> Scalar:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon).

    A proportional controller on log beta: too much KL raises the penalty, too little lowers it;
    the clip bounds the step so one noisy batch cannot swing beta, and n / horizon (samples in the
    batch over ~10k samples) makes the speed independent of the batch size.
    """
    error = jnp.clip(jnp.asarray(current_kl) / target - 1, -0.2, 0.2)
    return jnp.asarray(kl_coef) * (1 + error * n_steps / horizon)


@dataclasses.dataclass(frozen=True)
class AdaptiveKLController:
    """Hyper-parameters of the adaptive controller; the state is the kl_coef you pass around.

    Frozen and hashable, so it can be a static argument of a jitted step.
    """

    init_kl_coef: float = 0.02  # InstructGPT's beta
    target: float = 6.0  # nats per response
    horizon: float = 10_000  # samples

    def init(self) -> Scalar:
        return jnp.asarray(self.init_kl_coef)

    def update(
        self, kl_coef: float | Scalar, current_kl: float | Scalar, n_steps: int | Scalar
    ) -> Scalar:
        return update_kl_coef(kl_coef, current_kl, n_steps, self.target, self.horizon)


@dataclasses.dataclass(frozen=True)
class FixedKLController:
    """A constant beta, with the same interface as `AdaptiveKLController`."""

    init_kl_coef: float = 0.02

    def init(self) -> Scalar:
        return jnp.asarray(self.init_kl_coef)

    def update(
        self, kl_coef: float | Scalar, current_kl: float | Scalar, n_steps: int | Scalar
    ) -> Scalar:
        del current_kl, n_steps  # a fixed penalty ignores the measured KL
        return jnp.asarray(kl_coef)
