"""Cached greedy and beam decoding for the encoder–decoder (`gptjax.models.transformer`).

Cross-attention K/V are a function of the source alone, so they are computed
once per source (`prepare`); `greedy` and `beam_search` reuse them at every
step and, for beams, share one copy among a source's K hypotheses (see
`seq2seq.cross_attention`). Only the decoder's self-attention K/V are cached
(`init_cache`) and grow with the output.

Shape letters: B batch, S source, T target, V vocab, K beams, R = B*K beam rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from gptjax.models import transformer as seq2seq
from gptjax.inference.sampling import check_length_penalty_kind, length_normalised
from gptjax.models.transformer import Params, Seq2SeqConfig


def init_cache(cfg: Seq2SeqConfig, batch: int, max_len: int) -> dict:
    """The decoder self-attention cache, `(L, B, T, N, H)` per key/value."""
    shape = (cfg.decoder_layers, batch, max_len, cfg.n_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.compute_dtype), "v": jnp.zeros(shape, cfg.compute_dtype)}


def prepare(cfg: Seq2SeqConfig, params: Params, src_BS: Int[Array, "B S"],
            src_mask: Int[Array, "B S"] | None = None) -> dict:
    """What decoding needs from the source, computed once: cross K/V and its mask."""
    valid_BS = jnp.ones(src_BS.shape, bool) if src_mask is None else src_mask.astype(bool)
    enc_BSD = seq2seq.encode(cfg, params, src_BS, valid_BS)
    return {"cross": seq2seq.all_cross_kv(cfg, params, enc_BSD), "src_valid": valid_BS}


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "start_id", "eos_id", "pad_id"))
def greedy(cfg: Seq2SeqConfig, params: Params, src_BS: Int[Array, "B S"],
           src_mask: Int[Array, "B S"] | None = None, *, start_id: int, eos_id: int,
           max_len: int, pad_id: int = 0) -> Int[Array, "B T"]:
    """Greedy decoding with the K/V caches; `max_len` tokens per row, the first
    `eos_id` included and `pad_id` after it. The start token is not returned."""
    source = prepare(cfg, params, src_BS, src_mask)
    b = src_BS.shape[0]

    def step(carry, i):
        tok_B, cache, done_B = carry
        logits_B1V, cache = seq2seq.decode(cfg, params, tok_B[:, None], source["cross"],
                                           source["src_valid"], cache=cache, cache_index=i)
        next_B = jnp.where(done_B, pad_id, jnp.argmax(logits_B1V[:, 0], axis=-1))
        return (next_B, cache, done_B | (next_B == eos_id)), next_B

    init = (jnp.full((b,), start_id, src_BS.dtype), init_cache(cfg, b, max_len),
            jnp.zeros((b,), bool))
    _, tokens_TB = jax.lax.scan(step, init, jnp.arange(max_len))
    return tokens_TB.T.astype(src_BS.dtype)


class BeamOutput(NamedTuple):
    """The best beam per source, laid out like `greedy`'s tokens.

    tokens: (B, max_len), the first `eos_id` included and `pad_id` after it.
    logprobs: (B, max_len), log p(token | source, prefix) under the model; 0 after eos.
    scores: (B,), `sample.length_normalised(sum(logprobs), length, length_penalty,
      length_penalty_kind)`, the length counting eos.
    """

    tokens: Int[Array, "B T"]
    logprobs: Float[Array, "B T"]
    scores: Float[Array, "B"]


@functools.partial(jax.jit, static_argnames=("cfg", "num_beams", "max_len", "start_id",
                                             "eos_id", "pad_id", "length_penalty_kind"))
def beam_search(cfg: Seq2SeqConfig, params: Params, src_BS: Int[Array, "B S"],
                src_mask: Int[Array, "B S"] | None = None, *, num_beams: int, start_id: int,
                eos_id: int, max_len: int, pad_id: int = 0,
                length_penalty: float = 1.0, length_penalty_kind: str = "hf") -> BeamOutput:
    """The most likely translation found by `num_beams` hypotheses per source.

    As `sample.beam_search`: a hypothesis ends at `eos_id` and then keeps its
    score; candidates are ranked by `sample.length_normalised` — "hf" divides
    sum(logprobs) by length**length_penalty (0: raw likelihood, favouring short
    outputs; 1: per-token average), "gnmt" by ((5 + length) / 6)**length_penalty
    (Wu et al. 2016). The source is encoded once and its cross K/V shared by its
    beams; the self-attention cache follows each beam's parent every step.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
    check_length_penalty_kind(length_penalty_kind)
    source = prepare(cfg, params, src_BS, src_mask)  # (L, B, S, N, H): never repeated
    b, k, v = src_BS.shape[0], num_beams, cfg.vocab_size
    flat = lambda a_BK: a_BK.reshape(b * k, *a_BK.shape[2:])
    pad_only_V = jnp.where(jnp.arange(v) == pad_id, 0.0, -jnp.inf)
    state = dict(i=jnp.int32(0), tok=jnp.full((b * k,), start_id, jnp.int32),
                 # Only beam 0 is live at first, so step 0 does not pick K copies.
                 score=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (b, 1)),
                 length=jnp.zeros((b, k), jnp.int32), done=jnp.zeros((b, k), bool),
                 out=jnp.full((b * k, max_len), pad_id, jnp.int32),
                 logp=jnp.zeros((b * k, max_len)), cache=init_cache(cfg, b * k, max_len))

    def step(s):
        i = s["i"]
        logits_R1V, cache = seq2seq.decode(cfg, params, s["tok"][:, None], source["cross"],
                                           source["src_valid"], cache=s["cache"], cache_index=i)
        logp_BKV = jax.nn.log_softmax(logits_R1V[:, 0], axis=-1).reshape(b, k, v)
        # A finished beam may only continue with pad at no cost: it keeps its score.
        logp_BKV = jnp.where(s["done"][..., None], pad_only_V, logp_BKV)
        cand_BKV = s["score"][..., None] + logp_BKV
        length_BK = jnp.where(s["done"], s["length"], i + 1)
        rank_BKV = length_normalised(cand_BKV, length_BK[..., None], length_penalty,
                                     length_penalty_kind)
        _, idx_BK = jax.lax.top_k(rank_BKV.reshape(b, k * v), k)
        beam_BK, tok_BK = idx_BK // v, (idx_BK % v).astype(jnp.int32)
        pick = lambda a_BKV: jnp.take_along_axis(a_BKV.reshape(b, k * v), idx_BK, axis=1)
        take = lambda a_BK: jnp.take_along_axis(a_BK, beam_BK, axis=1)
        parent_R = flat(jnp.arange(b)[:, None] * k + beam_BK)  # rows of the B*K layout
        return dict(i=i + 1, tok=flat(tok_BK), score=pick(cand_BKV), length=take(length_BK),
                    done=take(s["done"]) | (tok_BK == eos_id),
                    out=s["out"][parent_R].at[:, i].set(flat(tok_BK)),
                    logp=s["logp"][parent_R].at[:, i].set(flat(pick(logp_BKV))),
                    cache=jax.tree.map(lambda a: jnp.take(a, parent_R, axis=1), cache))

    s = jax.lax.while_loop(lambda s: (s["i"] < max_len) & ~jnp.all(s["done"]), step, state)
    final_BK = length_normalised(s["score"], jnp.maximum(s["length"], 1), length_penalty,
                                 length_penalty_kind)
    best_B = jnp.argmax(final_BK, axis=1)
    best = lambda a_R: a_R.reshape(b, k, *a_R.shape[1:])[jnp.arange(b), best_B]
    return BeamOutput(tokens=best(s["out"]).astype(src_BS.dtype), logprobs=best(s["logp"]),
                      scores=best(final_BK.reshape(-1)))
