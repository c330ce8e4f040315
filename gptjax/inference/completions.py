"""Text in, text out: many prompts completed by the KV-cache sampler, cut at stop strings.

What generative evaluation needs (HumanEval's n samples per problem, chain-of-thought answers):
prompts are encoded, left-padded to one width and sent through `sampling.generate` in batches of
a fixed `batch_size` (the last one padded with copies of a real row), so a run compiles once.
Each continuation is decoded, then cut before the first of the `stop` strings. Stop *strings*,
not token ids: a BPE merges "\\ndef" with its neighbours into tokens that differ from context to
context, so the cut happens on the decoded text (as Codex did). Generation itself stops at the
tokenizer's end-of-text or after `max_new_tokens`.

A prompt longer than the context leaves room for `max_new_tokens` by keeping its last tokens;
`CompletionBatch.truncated` counts those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.inference import sampling


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` before the earliest occurrence of any stop string (all of it when none occurs)."""
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


@dataclasses.dataclass(frozen=True)
class CompletionBatch:
    """The completions (one per prompt, in order) and how many prompts lost their start."""

    texts: list[str]
    truncated: int


def prompt_width(cfg: ModelConfig, ids: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """The padded prompt width: the longest prompt, capped so `max_new_tokens` still fit."""
    room = cfg.max_len - max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
            f"max_len={cfg.max_len}; lower max_new_tokens."
        )
    return min(room, max(len(p) for p in ids))


def complete(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    temperature: float = 1.0,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int = 0,
    batch_size: int = 16,
    progress=None,
) -> CompletionBatch:
    """One completion per prompt (repeat a prompt for n samples of it).

    Args:
      cfg, params, tokenizer: a decoder and its tokenizer.
      prompts: texts; an empty prompt starts from end-of-text.
      max_new_tokens: tokens generated at most per prompt.
      stop: strings; each completion ends before the first one it contains.
      temperature, top_p, greedy: the sampler's settings (`sampling.generate`).
      seed: batch i samples with `fold_in(key(seed), i)`, so results do not depend on what else
        runs in the process.
      batch_size: rows per compiled call.
      progress: an optional callable given the number of prompts done after each batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not prompts:
        return CompletionBatch([], 0)
    ids = [p or [tokenizer.eos_id] for p in tokenizer.encode_batch(list(prompts))]
    width = prompt_width(cfg, ids, max_new_tokens)
    key = jax.random.key(seed)
    texts = []
    for b, start in enumerate(range(0, len(ids), batch_size)):
        chunk = ids[start : start + batch_size]
        tokens_BP, mask_BP = sampling.left_pad(
            chunk + [chunk[0]] * (batch_size - len(chunk)), tokenizer.pad_id, width
        )
        out = sampling.generate(
            cfg,
            params,
            tokens_BP,
            key=jax.random.fold_in(key, b),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
            stop_tokens=(tokenizer.eos_id,),
            prompt_mask=mask_BP,
            pad_id=tokenizer.pad_id,
        )
        new_BN = np.asarray(out.tokens)[: len(chunk), width:]
        mask_BN = np.asarray(out.mask)[: len(chunk), width:]
        for row, keep in zip(new_BN, mask_BN):
            row = [int(t) for t, m in zip(row, keep) if m and t != tokenizer.eos_id]
            texts.append(cut_at_stops(tokenizer.decode(row), stop))
        if progress is not None:
            progress(len(chunk))
    return CompletionBatch(texts, sum(len(p) > width for p in ids))
