"""The one dialogue format of SFT, the reward model, PPO and `gptjax chat`.

A conversation is text in the Anthropic HH layout, alternating turns that each open with
"\\n\\nHuman:" or "\\n\\nAssistant:"; in token space every Assistant turn ends with the
tokenizer's `eos_id`, which is the end-of-turn token: the sampler stops there, PPO ends the episode
there, and the reward model reads its score there (the last real token). The prompt for a reply is
the history followed by "\\n\\nAssistant:"; the reply's text starts with the space after the colon,
exactly as in the HH data, so one string split gives the same ids everywhere.

History that does not fit the context is truncated from the oldest turn, since the newest turns
are what a reply must answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TextIO

import jax
import numpy as np

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.inference import sampling as sample

HUMAN, ASSISTANT = "Human", "Assistant"
ROLES = (HUMAN, ASSISTANT)
Turn = tuple[str, str]  # (role, text without the leading space)
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")


def parse_dialogue(text: str) -> list[Turn]:
    """HH text -> [(role, text), ...]; raises ValueError when it has no turn markers.

    Only "\\n\\nHuman:" / "\\n\\nAssistant:" split turns, so blank lines inside a turn (lists in
    HH answers) stay in that turn.
    """
    parts = _TURN_RE.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(
            f"not a Human/Assistant dialogue (expected text starting with "
            f"'\\n\\nHuman:'): {text[:60]!r}"
        )
    return [
        (role, body[1:] if body.startswith(" ") else body)
        for role, body in zip(parts[1::2], parts[2::2])
    ]


def render(turns: Sequence[Turn]) -> str:
    """[(role, text)] -> HH text (no end-of-turn tokens: those exist only as ids)."""
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


def encode_turns(tokenizer: Tokenizer, turns: Sequence[Turn]) -> list[int]:
    """Ids of a conversation: each turn's text, with `eos_id` closing every Assistant turn."""
    ids: list[int] = []
    for role, text in turns:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; turns are {ROLES}")
        ids += tokenizer.encode(f"\n\n{role}: {text}")
        if role == ASSISTANT:
            ids.append(tokenizer.eos_id)
    return ids


def prompt_ids(tokenizer: Tokenizer, turns: Sequence[Turn]) -> list[int]:
    """The history, then the "\\n\\nAssistant:" cue that asks the model for the next reply."""
    return encode_turns(tokenizer, turns) + tokenizer.encode(f"\n\n{ASSISTANT}:")


def response_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A reply as SFT trains it and the sampler emits it: " text" then end-of-turn."""
    return tokenizer.encode(f" {text}") + [tokenizer.eos_id]


def decode_reply(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Text of a generated reply, cut at the end-of-turn token."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    text = tokenizer.decode(ids)
    return text[1:] if text.startswith(" ") else text


def truncate_history(
    tokenizer: Tokenizer, turns: Sequence[Turn], budget: int
) -> tuple[list[Turn], list[int]]:
    """Drop whole turns from the oldest until the reply prompt fits in `budget` tokens.

    Returns the kept turns and the prompt ids. If even the newest turn alone is too long, its
    last `budget` tokens are kept (the end of a question is what the reply follows).
    """
    if budget <= 0:
        raise ValueError(
            f"history budget must be positive, got {budget} (is max_new_tokens "
            "as large as the model's context?)"
        )
    turns = list(turns)
    ids = prompt_ids(tokenizer, turns)
    while len(ids) > budget and len(turns) > 1:
        turns = turns[1:]
        ids = prompt_ids(tokenizer, turns)
    return turns, ids[-budget:]


def reply(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    *,
    key: jax.Array,
    max_new_tokens: int,
    **sampling,
) -> tuple[str, list[Turn]]:
    """One Assistant reply to `turns` (truncated to fit), and the turns that were kept."""
    new = min(max_new_tokens, cfg.max_len - 1)
    budget = cfg.max_len - new
    kept, ids = truncate_history(tokenizer, turns, budget)
    width = min(budget, -(-len(ids) // 32) * 32)  # a few prompt shapes: few sampler compiles
    tokens, mask = sample.left_pad([ids], tokenizer.pad_id, width)
    out = sample.generate(
        cfg,
        params,
        tokens,
        prompt_mask=mask,
        key=key,
        max_new_tokens=new,
        stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id,
        **sampling,
    )
    return decode_reply(tokenizer, np.asarray(out.tokens[0, width:]).tolist()), kept


def chat_loop(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    lines: Iterable[str],
    out: TextIO,
    *,
    seed: int = 0,
    max_new_tokens: int = 64,
    **sampling,
) -> list[Turn]:
    """Read Human lines (a terminal or a pipe), print each reply; returns the full transcript.

    The model only ever sees the truncated history; the transcript keeps everything.
    """
    transcript: list[Turn] = []
    key = jax.random.key(seed)
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            break
        transcript.append((HUMAN, line))
        key, sub = jax.random.split(key)
        text, _ = reply(
            cfg, params, tokenizer, transcript, key=sub, max_new_tokens=max_new_tokens, **sampling
        )
        transcript.append((ASSISTANT, text))
        print(f"Assistant: {text}", file=out, flush=True)
    return transcript


def generate_replies(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    width: int,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float,
    chunk: int | None = None,
) -> dict[str, np.ndarray]:
    """Sample one reply per prompt, `chunk` rows at a time (one compiled shape).

    Returns numpy 'tokens' and 'mask' (B, width + max_new_tokens), 'done' (B,) and 'logprobs'
    (B, max_new_tokens) as `sample.generate` gives them; rows stop at the end-of-turn token.
    """
    chunk = min(chunk or len(prompts), len(prompts))
    outs = []
    for start in range(0, len(prompts), chunk):
        part = list(prompts[start : start + chunk])
        n_real = len(part)
        part += [part[-1]] * (chunk - n_real)  # pad the last chunk: same shape, no recompile
        tokens, mask = sample.left_pad(part, tokenizer.pad_id, width)
        key, sub = jax.random.split(key)
        out = sample.generate(
            cfg,
            params,
            tokens,
            prompt_mask=mask,
            key=sub,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            stop_tokens=(tokenizer.eos_id,),
            pad_id=tokenizer.pad_id,
        )
        out = jax.device_get(out)
        outs.append(
            {
                "tokens": out.tokens[:n_real],
                "mask": out.mask[:n_real],
                "done": out.done[:n_real],
                "logprobs": out.logprobs[:n_real],
            }
        )
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
