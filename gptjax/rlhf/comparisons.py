"""The reward model's comparisons: K ranked samples per prompt, or HH chosen/rejected pairs.

Ranking arrays, one row per prompt: `tokens`, `mask` (N, K, T) right-padded, `ranks` (N, K)
(0 = best; equal ranks make no pair) and `valid` (N, K). They come from the SFT policy's K
samples per task prompt ranked by the task's gold reward (`task_rankings`), or from an
Anthropic HH jsonl file of `chosen`/`rejected` conversations (`hh_arrays`, K = 2).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.rlhf import chat, tasks

if TYPE_CHECKING:
    from gptjax.rlhf.reward import RewardConfig


def rank_by_reward(gold_BK: np.ndarray) -> np.ndarray:
    """Dense ranks, 0 = best; equal rewards share a rank (no preference, no pair)."""
    gold_BK = np.asarray(gold_BK)
    ranks = np.zeros(gold_BK.shape, np.int32)
    for b, row in enumerate(gold_BK):
        levels = np.unique(row)[::-1]
        ranks[b] = np.searchsorted(-levels, -row)
    return ranks


def load_hh_jsonl(path: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(chosen, rejected) conversations from an Anthropic HH jsonl (optionally .gz) file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"HH preference file {path!r} does not exist")
    opener = gzip.open if path.endswith(".gz") else open
    pairs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) for k in ("chosen", "rejected")
            ):
                raise ValueError(
                    f"{path}:{n}: expected an object with string 'chosen' and "
                    f"'rejected' fields, got {str(row)[:80]!r}"
                )
            pairs.append((row["chosen"], row["rejected"]))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise ValueError(f"{path}: no comparisons found")
    return pairs


def encode_conversation(tokenizer: Tokenizer, text: str, seq_len: int) -> list[int]:
    """HH text in our chat ids (end-of-turn after each Assistant turn), oldest tokens cut."""
    return chat.encode_turns(tokenizer, chat.parse_dialogue(text))[-seq_len:]


def hh_arrays(
    tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int
) -> dict[str, np.ndarray]:
    """K = 2 ranking arrays: tokens/mask (N, 2, T) right-padded, ranks [0, 1], all valid."""
    n = len(pairs)
    tokens = np.full((n, 2, seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, 2, seq_len), np.int32)
    for i, pair in enumerate(pairs):
        for j, text in enumerate(pair):
            ids = encode_conversation(tokenizer, text, seq_len)
            tokens[i, j, : len(ids)], mask[i, j, : len(ids)] = ids, 1
    return {
        "tokens": tokens,
        "mask": mask,
        "ranks": np.tile([0, 1], (n, 1)).astype(np.int32),
        "valid": np.ones((n, 2), np.int32),
    }


def task_rankings(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    task,
    prompts: list,
    rm_cfg: RewardConfig,
    key: jax.Array,
    width: int,
) -> dict[str, np.ndarray]:
    """K policy samples per prompt, ranked by the task's gold reward: (N, K, T) arrays."""
    k = rm_cfg.k
    ids = [chat.prompt_ids(tokenizer, p) for p in prompts for _ in range(k)]
    out = chat.generate_replies(
        cfg,
        params,
        tokenizer,
        ids,
        width,
        key=key,
        max_new_tokens=rm_cfg.max_new_tokens,
        temperature=rm_cfg.temperature,
        chunk=256,
    )
    gold = np.array(
        [
            task.gold_reward(prompts[i // k], chat.decode_reply(tokenizer, row[width:]))
            for i, row in enumerate(out["tokens"])
        ]
    ).reshape(-1, k)
    n, t = len(prompts), out["tokens"].shape[1]
    return {
        "tokens": out["tokens"].reshape(n, k, t),
        "mask": out["mask"].reshape(n, k, t),
        "ranks": rank_by_reward(gold),
        "valid": np.ones((n, k), np.int32),
        "gold": gold,
    }


def comparison_data(
    cfg: ModelConfig,
    policy_params,
    tokenizer: Tokenizer,
    task,
    rm_cfg: RewardConfig,
    key: jax.Array,
) -> tuple[dict, dict, int]:
    """(train, held-out) ranking arrays and the prompt width: HH pairs from `rm_cfg.hh_path`
    (a tenth held out), or K policy samples per task prompt ranked by the gold reward."""
    all_prompts = tasks.prompts(task, rm_cfg.n_prompts + rm_cfg.heldout_prompts, rm_cfg.seed)
    width = max(len(chat.prompt_ids(tokenizer, p)) for p in all_prompts)
    if rm_cfg.hh_path:
        data = hh_arrays(tokenizer, load_hh_jsonl(rm_cfg.hh_path), rm_cfg.hh_seq_len)
        n_held = max(1, len(data["tokens"]) // 10)
    else:
        data = task_rankings(
            cfg,
            policy_params,
            tokenizer,
            task,
            all_prompts,
            rm_cfg,
            jax.random.fold_in(key, 1),
            width,
        )
        n_held = rm_cfg.heldout_prompts
    train = {k: v[n_held:] for k, v in data.items()}
    held = {k: v[:n_held] for k, v in data.items()}
    return train, held, width
