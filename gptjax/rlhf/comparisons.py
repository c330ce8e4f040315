"""The reward model's comparisons: K ranked samples per prompt, or HH chosen/rejected pairs.

Ranking arrays, one row per prompt: `tokens`, `mask` (N, K, T) right-padded, `ranks` (N, K)
(0 = best; equal ranks make no pair) and `valid` (N, K). They come from the SFT policy's K
samples per task prompt ranked by the task's gold reward (`task_rankings`), or from an
Anthropic HH jsonl file of `chosen`/`rejected` conversations (`hh_arrays`, K = 2).

Bad input fails early with one line: a malformed HH row, or one whose two sides are the same
text, names its file and line; task prompts too long for the policy's context name the numbers.
An HH pair longer than `seq_len` tokens loses its oldest tokens, at one start for both sides
where that keeps both final replies (`encode_pair`); a pair left with no preference (both sides
the same window, or a side with no final reply of its own) is dropped and counted in the log,
and an error is raised only when every pair is dropped.
"""

from __future__ import annotations

import gzip
import json
import logging
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

log = logging.getLogger("gptjax")


def rank_by_reward(gold_BK: np.ndarray) -> np.ndarray:
    """Dense ranks, 0 = best; equal rewards share a rank (no preference, no pair)."""
    gold_BK = np.asarray(gold_BK)
    ranks = np.zeros(gold_BK.shape, np.int32)
    for b, row in enumerate(gold_BK):
        levels = np.unique(row)[::-1]
        ranks[b] = np.searchsorted(-levels, -row)
    return ranks


def load_hh_jsonl(path: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(chosen, rejected) conversations from an Anthropic HH jsonl (optionally .gz) file;
    the first `limit` rows only when given. Each row is checked (`_check_hh_row`)."""
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
                raise ValueError(
                    f"{path}:{n}: not valid JSON ({e.msg}); fix or remove the line"
                ) from None
            pairs.append(_check_hh_row(row, f"{path}:{n}"))
            if limit is not None and len(pairs) >= limit:
                break
    if not pairs:
        raise ValueError(f"{path}: no comparisons found")
    return pairs


def _check_hh_row(row, where: str) -> tuple[str, str]:
    """(chosen, rejected) of one parsed row, or a ValueError that starts with `where`."""
    if not isinstance(row, dict) or not all(
        isinstance(row.get(k), str) for k in ("chosen", "rejected")
    ):
        raise ValueError(
            f"{where}: expected an object with string 'chosen' and 'rejected' fields, "
            f"got {str(row)[:80]!r}; fix or remove the line"
        )
    if row["chosen"] == row["rejected"]:
        raise ValueError(
            f"{where}: 'chosen' and 'rejected' are the same text, so there is no preference "
            "to learn from; remove the line"
        )
    for side in ("chosen", "rejected"):
        try:
            chat.parse_dialogue(row[side])
        except ValueError as e:
            raise ValueError(f"{where}: {side!r} is {e}") from None
    return row["chosen"], row["rejected"]


def encode_conversation(tokenizer: Tokenizer, text: str, seq_len: int) -> list[int]:
    """HH text in our chat ids (end-of-turn after each Assistant turn), oldest tokens cut."""
    return chat.encode_turns(tokenizer, chat.parse_dialogue(text))[-seq_len:]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    differs = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(differs[0]) if len(differs) else n


def encode_pair(
    tokenizer: Tokenizer, chosen: str, rejected: str, seq_len: int
) -> tuple[list[int], list[int]] | None:
    """Both sides' ids in at most `seq_len` tokens, or None when no preference is left.

    Both are cut at one start (the longer keeps its last `seq_len` tokens), so the history
    they share stays aligned and DPO's response mask (`dpo.response_mask`) is their replies;
    when that start would cut away the shorter side's whole final reply, each side keeps its
    own last `seq_len` tokens instead. None: the two windows are equal (their difference was
    cut off) or a side has no token after the shared history (no final reply of its own).
    """
    ids = [chat.encode_turns(tokenizer, chat.parse_dialogue(t)) for t in (chosen, rejected)]
    shared = _common_prefix(*ids)
    if min(map(len, ids)) <= shared:
        return None
    start = max(0, max(map(len, ids)) - seq_len)
    if min(map(len, ids)) > max(start, shared):
        cut = [x[start:] for x in ids]
    else:
        cut = [x[-seq_len:] for x in ids]
    return None if cut[0] == cut[1] else (cut[0], cut[1])


def hh_arrays(
    tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], seq_len: int
) -> dict[str, np.ndarray]:
    """K = 2 ranking arrays: tokens/mask (N, 2, T) right-padded, ranks [0, 1], all valid;
    pairs `encode_pair` finds no preference in are dropped (counted in the log)."""
    kept = [encode_pair(tokenizer, c, r, seq_len) for c, r in pairs]
    dropped = [i for i, p in enumerate(kept) if p is None]
    kept = [p for p in kept if p is not None]
    if not kept:
        raise ValueError(
            f"all {len(pairs)} HH pairs lose their preference when cut to hh_seq_len={seq_len} "
            "tokens (the two sides become equal or a final reply is gone); raise hh_seq_len"
        )
    if dropped:
        log.warning(
            "HH: dropped %d of %d pairs with no preference left at %d tokens (0-based indices %s)",
            len(dropped),
            len(pairs),
            seq_len,
            dropped[:10],
        )
    n = len(kept)
    tokens = np.full((n, 2, seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, 2, seq_len), np.int32)
    for i, pair in enumerate(kept):
        for j, ids in enumerate(pair):
            tokens[i, j, : len(ids)], mask[i, j, : len(ids)] = ids, 1
    return {
        "tokens": tokens,
        "mask": mask,
        "ranks": np.tile([0, 1], (n, 1)).astype(np.int32),
        "valid": np.ones((n, 2), np.int32),
    }


def check_prompt_fits(
    cfg: ModelConfig, width: int, max_new_tokens: int, field: str = "RewardConfig.max_new_tokens"
) -> None:
    """Raise unless task prompts of `width` tokens plus sampled replies (`field`, the config
    field that sets their length) fit the policy's context."""
    if width + max_new_tokens > cfg.max_len:
        raise ValueError(
            f"task prompts of up to {width} tokens + {field}="
            f"{max_new_tokens} = {width + max_new_tokens} exceed the policy's max_len "
            f"{cfg.max_len}; set max_new_tokens <= {cfg.max_len - width} or start from a "
            "model with a longer context"
        )


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
    check_prompt_fits(cfg, width, rm_cfg.max_new_tokens)
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
    (the first tenth held out), or K policy samples per task prompt ranked by the gold
    reward. Either way the task prompts must leave room for `max_new_tokens` in the policy's
    context: the reward model's normalisation samples replies to them."""
    all_prompts = tasks.prompts(task, rm_cfg.n_prompts + rm_cfg.heldout_prompts, rm_cfg.seed)
    width = max(len(chat.prompt_ids(tokenizer, p)) for p in all_prompts)
    check_prompt_fits(cfg, width, rm_cfg.max_new_tokens)
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
