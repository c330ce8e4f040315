"""Cached greedy and beam decoding for the encoder–decoder (`gptjax.models.transformer`).

Cross-attention K/V are a function of the source alone, so they are computed
once per source (`prepare`); `greedy` and `beam_search` reuse them at every
step and, for beams, share one copy among a source's K hypotheses (see
`seq2seq.cross_attention`). Only the decoder's self-attention K/V are cached
(`layers.init_cache`) and grow with the output. Beam search is `beam.search`
with the decoder's cached step as its next-token logits.

Shape letters: B batch, S source, T target, V vocab, K beams, R = B*K beam rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from gptjax.inference import beam
from gptjax.models import layers
from gptjax.models import transformer as seq2seq
from gptjax.models.transformer import Params, Seq2SeqConfig


def prepare(
    cfg: Seq2SeqConfig,
    params: Params,
    src_BS: Int[Array, "B S"],
    src_mask: Int[Array, "B S"] | None = None,
) -> dict:
    """What decoding needs from the source, computed once: cross K/V and its mask."""
    valid_BS = jnp.ones(src_BS.shape, bool) if src_mask is None else src_mask.astype(bool)
    enc_BSD = seq2seq.encode(cfg, params, src_BS, valid_BS)
    return {"cross": seq2seq.all_cross_kv(cfg, params, enc_BSD), "src_valid": valid_BS}


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "start_id", "eos_id", "pad_id"))
def greedy(
    cfg: Seq2SeqConfig,
    params: Params,
    src_BS: Int[Array, "B S"],
    src_mask: Int[Array, "B S"] | None = None,
    *,
    start_id: int,
    eos_id: int,
    max_len: int,
    pad_id: int = 0,
) -> Int[Array, "B T"]:
    """Greedy decoding with the K/V caches; `max_len` tokens per row, the first
    `eos_id` included and `pad_id` after it. The start token is not returned."""
    source = prepare(cfg, params, src_BS, src_mask)
    b = src_BS.shape[0]

    def step(carry, i):
        tok_B, cache, done_B = carry
        logits_B1V, cache = seq2seq.decode(
            cfg,
            params,
            tok_B[:, None],
            source["cross"],
            source["src_valid"],
            cache=cache,
            cache_index=i,
        )
        next_B = jnp.where(done_B, pad_id, jnp.argmax(logits_B1V[:, 0], axis=-1))
        return (next_B, cache, done_B | (next_B == eos_id)), next_B

    cache = layers.init_cache(cfg, b, max_len, cfg.decoder_layers)
    init = (jnp.full((b,), start_id, src_BS.dtype), cache, jnp.zeros((b,), bool))
    _, tokens_TB = jax.lax.scan(step, init, jnp.arange(max_len))
    return tokens_TB.T.astype(src_BS.dtype)


class BeamOutput(NamedTuple):
    """The best beam per source, laid out like `greedy`'s tokens.

    tokens: (B, max_len), the first `eos_id` included and `pad_id` after it.
    logprobs: (B, max_len), log p(token | source, prefix) under the model; 0 after eos.
    scores: (B,), `beam.length_normalised(sum(logprobs), length, length_penalty,
      length_penalty_kind)`, the length counting eos.
    """

    tokens: Int[Array, "B T"]
    logprobs: Float[Array, "B T"]
    scores: Float[Array, " B"]


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "num_beams",
        "max_len",
        "start_id",
        "eos_id",
        "pad_id",
        "length_penalty_kind",
    ),
)
def beam_search(
    cfg: Seq2SeqConfig,
    params: Params,
    src_BS: Int[Array, "B S"],
    src_mask: Int[Array, "B S"] | None = None,
    *,
    num_beams: int,
    start_id: int,
    eos_id: int,
    max_len: int,
    pad_id: int = 0,
    length_penalty: float = 1.0,
    length_penalty_kind: str = "hf",
) -> BeamOutput:
    """The most likely translation found by `num_beams` hypotheses per source.

    As `sampling.beam_search` (both are `beam.search`): a hypothesis ends at `eos_id`
    and then keeps its score; candidates are ranked by `beam.length_normalised` — "hf"
    divides sum(logprobs) by length**length_penalty (0: raw likelihood, favouring short
    outputs; 1: per-token average), "gnmt" by ((5 + length) / 6)**length_penalty
    (Wu et al. 2016). The source is encoded once and its cross K/V shared by its
    beams; the self-attention cache follows each beam's parent every step.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
    beam.check_length_penalty_kind(length_penalty_kind)
    source = prepare(cfg, params, src_BS, src_mask)  # (L, B, S, N, H): never repeated
    b = src_BS.shape[0]
    decode = lambda tok_R1, cache, i: seq2seq.decode(
        cfg, params, tok_R1, source["cross"], source["src_valid"], cache=cache, cache_index=i
    )
    start_B1 = jnp.full((b, 1), start_id, jnp.int32)
    cache = layers.init_cache(cfg, b, max_len, cfg.decoder_layers)
    logits_B1V, cache = decode(start_B1, cache, 0)

    def advance(beams, cache, i):
        """Logits after token i of every beam; the start token holds slot 0."""
        logits_R1V, cache = decode(beams.tokens_RN[:, i, None], cache, i + 1)
        return logits_R1V[:, 0], cache

    best = beam.search(
        logits_B1V[:, 0],
        cache,
        advance,
        num_beams=num_beams,
        max_new_tokens=max_len,
        stop_tokens=(eos_id,),
        pad_id=pad_id,
        length_penalty=length_penalty,
        length_penalty_kind=length_penalty_kind,
    )
    return BeamOutput(
        tokens=best.tokens.astype(src_BS.dtype), logprobs=best.logprobs, scores=best.score
    )
