"""Best-of-n (rejection sampling): draw n replies per prompt from the policy and keep the one the
reward model scores highest.

No training: the "policy" is the selection, whose KL to the sampling policy is known in closed
form, KL(best-of-n || pi) = log n - (n - 1) / n (Stiennon et al. 2020, appendix; exact when
rewards do not tie). That makes best-of-n the reference point of Gao et al. (2022)'s
over-optimisation curves: proxy and gold reward against sqrt(KL), next to PPO's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.rlhf import chat, reward


def analytic_kl(n: int) -> float:
    """KL(best-of-n || pi) in nats: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}.")
    return math.log(n) - (n - 1) / n


def score_rows(rm_cfg, rm_params, norm, tokens, mask, chunk: int) -> np.ndarray:
    """The reward model's normalised score of each row, `chunk` rows per call."""
    raw = reward.batched_raw_scores(rm_cfg, rm_params, tokens, mask, batch_size=chunk)
    return np.asarray(norm["gain"]) * raw + np.asarray(norm["bias"])


def best_of_n(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    rm_cfg: ModelConfig,
    rm_params: dict,
    norm: dict,
    prompts: Sequence,
    width: int,
    *,
    n: int,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    chunk: int = 32,
) -> dict[str, np.ndarray]:
    """The best of `n` sampled replies per prompt (dialogue turns, as PPO's prompts).

    Returns 'tokens' and 'mask' (B, width + max_new_tokens) of the kept replies, 'scores' (B,)
    their proxy reward, 'all_scores' (B, n) every sample's (the first m columns give best-of-m
    for m < n from the same draws), 'all_tokens' / 'all_mask' (B, n, L) every sample, and
    'kl' = analytic_kl(n).
    """
    ids = [chat.prompt_ids(tokenizer, p) for p in prompts]
    repeated = [p for p in ids for _ in range(n)]  # row b * n + j: prompt b, sample j
    out = chat.generate_replies(
        cfg,
        params,
        tokenizer,
        repeated,
        width,
        key=key,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        chunk=chunk,
    )
    scores_BN = score_rows(rm_cfg, rm_params, norm, out["tokens"], out["mask"], chunk)
    scores_BN = scores_BN.reshape(len(prompts), n)
    rows_B = np.arange(len(prompts)) * n + scores_BN.argmax(axis=1)
    return {
        "tokens": out["tokens"][rows_B],
        "mask": out["mask"][rows_B],
        "scores": scores_BN.max(axis=1),
        "all_scores": scores_BN,
        "all_tokens": out["tokens"].reshape(len(prompts), n, -1),
        "all_mask": out["mask"].reshape(len(prompts), n, -1),
        "kl": np.float64(analytic_kl(n)),
    }
