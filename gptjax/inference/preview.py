"""A short text from the current params, per model family, shown during training.

decoder: the sampler continues the prompt; encoder–decoder: greedy decoding with
the prompt as the source; encoder: the prompt with every fourth token masked,
filled in by the masked-LM head. `PREVIEWS` is keyed by `gptjax.models.family`'s
families, so the model layer never imports the sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.inference import decoding, sampling
from gptjax.models import bert, family
from gptjax.models.family import Family

_bert_forward = jax.jit(bert.forward, static_argnums=0)  # traced once per config


def _decoder(cfg, params, tokenizer, prompt: str, n_tokens: int, seed: int) -> str:
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    ids = ids[-max(1, cfg.max_len - n_tokens) :]
    out = sampling.generate(
        cfg,
        params,
        np.array([ids]),
        key=jax.random.key(seed),
        max_new_tokens=min(n_tokens, cfg.max_len - len(ids)),
        temperature=0.8,
        top_k=50,
    )
    return prompt + tokenizer.decode(np.asarray(out.tokens[0, len(ids) :]).tolist())


def _source_ids(cfg, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    return ids[-min(cfg.max_len, 64) :]


def _seq2seq(cfg, params, tokenizer, prompt: str, n_tokens: int, seed: int) -> str:
    out = decoding.greedy(
        cfg,
        params,
        jnp.asarray([_source_ids(cfg, tokenizer, prompt)], jnp.int32),
        start_id=tokenizer.start_id,
        eos_id=tokenizer.eos_id,
        max_len=min(n_tokens, cfg.max_len),
        pad_id=tokenizer.pad_id,
    )
    return f"{prompt} => {tokenizer.decode(np.asarray(out[0]).tolist())}"


def _encoder(cfg, params, tokenizer, prompt: str, n_tokens: int, seed: int) -> str:
    tokens = np.asarray([_source_ids(cfg, tokenizer, prompt)], np.int32)
    masked = tokens.copy()
    masked[:, 1::4] = tokenizer.mask_id
    filled = np.asarray(jnp.argmax(_bert_forward(cfg, params, jnp.asarray(masked)), -1))
    filled = np.where(masked == tokenizer.mask_id, filled, tokens)

    def show(row):
        return "".join(
            "[MASK]" if i == tokenizer.mask_id else tokenizer.decode([i]) for i in row.tolist()
        )

    return f"masked: {show(masked[0])}\nfilled: {show(filled[0])}"


PREVIEWS = {family.DECODER: _decoder, family.ENCODER: _encoder, family.SEQ2SEQ: _seq2seq}


def preview(
    cfg, params, tokenizer, prompt: str, n_tokens: int, seed: int, fam: Family | None = None
) -> str:
    """The family's preview of `prompt` (`n_tokens` at most, sampled with `seed`)."""
    return PREVIEWS[fam or family.family_of(cfg)](cfg, params, tokenizer, prompt, n_tokens, seed)
