"""Direct preference optimisation: DPO (Rafailov et al. 2023), cDPO's label smoothing and IPO
(Azar et al. 2023) over K-way rankings, on the reward model's pair machinery
(`losses.ranked_pairs`): the same data, the same pairs, a different score per response.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from gptjax.rlhf.losses import (
    Mask,
    Scalar,
    Stats,
    _check_shapes,
    _safe_div,
    per_prompt_mean,
    ranked_pairs,
)

DPO_LOSSES = ("sigmoid", "ipo")


def dpo_terms(
    logps_BK: Float[Array, "B K"],
    ref_logps_BK: Float[Array, "B K"],
    ranks_BK: Int[Array, "B K"] | Float[Array, "B K"],
    valid_BK: Mask,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[Scalar, Scalar, Stats]:
    """Direct preference optimisation over K ranked responses per prompt, before its one
    division (sum over prompts of each prompt's mean pair loss, prompts with a pair, stats).

    The implicit reward of a response is r = beta (log pi(y|x) - log pi_ref(y|x)) (its summed
    response log-probs under the policy and the frozen reference). For each better/worse
    pair, with h = (log-ratio of the better) - (log-ratio of the worse) and m = beta h:
      'sigmoid': -(1 - eps) log sigmoid(m) - eps log sigmoid(-m) (Rafailov et al. 2023; eps is
        cDPO's label smoothing, the chance a label is flipped);
      'ipo': (h - 1 / (2 beta))^2 (Azar et al. 2023, with tau = beta).
    Pairs are formed as for the reward model (`reward_ranking_terms`): all C(K, 2) of a
    prompt in one batch element, equal ranks and padding forming none; K = 2 is HH's
    chosen/rejected. Stats (means over pairs): accuracy (r_better > r_worse), margin, each
    side's implicit reward and log-prob.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"DPO loss_type {loss_type!r} is not one of {DPO_LOSSES}.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}.")
    _check_shapes("dpo_loss", logps_BK, ref_logps_BK, ranks_BK, valid_BK)
    rewards_BK = beta * (logps_BK - ref_logps_BK)
    pair_BKK, margin_BKK = ranked_pairs(rewards_BK, ranks_BK, valid_BK)
    pair_f_BKK = pair_BKK.astype(margin_BKK.dtype)
    if loss_type == "sigmoid":
        eps = label_smoothing
        nll_BKK = -(1 - eps) * jax.nn.log_sigmoid(margin_BKK) - eps * jax.nn.log_sigmoid(
            -margin_BKK
        )
    else:
        nll_BKK = (margin_BKK / beta - 1 / (2 * beta)) ** 2
    total, n_prompts, n_pairs = per_prompt_mean(nll_BKK, pair_f_BKK)
    valid_BK = jnp.asarray(valid_BK) != 0

    def side_mean(x_BK, better: bool):
        x_BK = jnp.where(valid_BK, x_BK, 0)
        x_BKK = x_BK[:, :, None] if better else x_BK[:, None, :]
        return _safe_div(jnp.sum(x_BKK * pair_f_BKK), n_pairs)

    stats = {
        "dpo/loss": _safe_div(total, n_prompts),
        "dpo/accuracy": _safe_div(jnp.sum((margin_BKK > 0) * pair_f_BKK), n_pairs),
        "dpo/margin": _safe_div(jnp.sum(margin_BKK), n_pairs),
        "dpo/chosen_reward": side_mean(rewards_BK, True),
        "dpo/rejected_reward": side_mean(rewards_BK, False),
        "dpo/chosen_logp": side_mean(logps_BK, True),
        "dpo/rejected_logp": side_mean(logps_BK, False),
    }
    return total, n_prompts, stats


def dpo_loss(logps_BK, ref_logps_BK, ranks_BK, valid_BK, **kw) -> tuple[Scalar, Stats]:
    """`dpo_terms` divided once: the mean over prompts of each prompt's mean pair loss."""
    total, n_prompts, stats = dpo_terms(logps_BK, ref_logps_BK, ranks_BK, valid_BK, **kw)
    return _safe_div(total, n_prompts), stats
