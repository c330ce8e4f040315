"""The encoder–decoder Transformer (Vaswani et al. 2017) on the decoder's pieces.

The encoder is `gptjax.models.bert`'s bidirectional stack; the decoder layer adds
one sublayer to GPT's: causal self-attention, then cross-attention whose
queries come from the decoder and whose keys/values come from the encoder
output, then the MLP. Source and target share one embedding table (scaled by
sqrt(d_model), as in the paper and Marian's `scale_embedding`), which is also
the tied output projection, plus Marian's `final_logits_bias`.

Params: `wte`, `encoder/h` (the encoder's layers), `decoder/h` (with
`ln_cross` and `cross_attn/{q,kv,c_proj}`), `final_logits_bias`, and for
pre-LN an `ln_f` per stack. Cross-attention K/V are a function of the source
alone (`all_cross_kv`), so cached decoding (`gptjax.inference.decoding`: `greedy`,
`beam_search`) computes them once per source and reuses them at every step.

Shape letters: B batch, S source, T target, D model, N heads, H head dim,
V vocab, L layers, K beams, R = B*K beam rows, U = K*T queries per source.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gptjax.config import Seq2SeqConfig
from gptjax.models import attention as attn_lib
from gptjax.models import bert as encoder
from gptjax.models import gpt as model
from gptjax.models import layers
from gptjax.parallel.logical import constrain

Params = layers.Params


def _decoder_cfg(cfg: Seq2SeqConfig) -> Seq2SeqConfig:
    """The config `run_layers`/`init_params` see for the decoder stack."""
    return cfg.replace(n_layers=cfg.decoder_layers, n_decoder_layers=None)


# ----------------------------------------------------------------------------- init


def init_params(cfg: Seq2SeqConfig, key: jax.Array) -> Params:
    """The decoder's GPT init for both stacks, plus cross-attention (N(0, 0.02))."""
    k_enc, k_dec, k_q, k_kv, k_o = jax.random.split(key, 5)
    dcfg = _decoder_cfg(cfg)
    enc, dec = model.init_params(cfg, k_enc), model.init_params(dcfg, k_dec)
    ld, d, n, h, dt = dcfg.n_layers, cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.weight_dtype
    dec["h"]["ln_cross"] = {"scale": jnp.ones((ld, d), dt), "bias": jnp.zeros((ld, d), dt)}
    dec["h"]["cross_attn"] = {
        "q": {
            "kernel": layers._normal(k_q, (ld, d, n, h), 0.02, dt),
            "bias": jnp.zeros((ld, n, h), dt),
        },
        "kv": {
            "kernel": layers._normal(k_kv, (ld, d, 2, n, h), 0.02, dt),
            "bias": jnp.zeros((ld, 2, n, h), dt),
        },
        "c_proj": {
            "kernel": layers._normal(k_o, (ld, n, h, d), 0.02 / math.sqrt(2 * ld), dt),
            "bias": jnp.zeros((ld, d), dt),
        },
    }
    params = {"wte": enc["wte"], "final_logits_bias": jnp.zeros((cfg.vocab_size,), dt)}
    for name, tree in (("encoder", enc), ("decoder", dec)):
        params[name] = {k: tree[k] for k in ("h", "wpe", "ln_f") if k in tree}
    if not cfg.tie_embeddings:
        params["lm_head"] = enc["lm_head"]
    return params


def param_axes(cfg: Seq2SeqConfig) -> Params:
    """Logical axis names, in the tree of `init_params`."""
    base = model.param_axes(cfg)
    dec_h = dict(base["h"])
    dec_h["ln_cross"] = base["h"]["ln_1"]
    dec_h["cross_attn"] = {
        "q": {
            "kernel": ("layers", "embed", "heads", "head_dim"),
            "bias": ("layers", "heads", "head_dim"),
        },
        "kv": {
            "kernel": ("layers", "embed", None, "heads", "head_dim"),
            "bias": ("layers", None, "heads", "head_dim"),
        },
        "c_proj": base["h"]["attn"]["c_proj"],
    }
    axes = {
        "wte": base["wte"],
        "final_logits_bias": ("vocab",),
        "encoder": {"h": base["h"]},
        "decoder": {"h": dec_h},
    }
    for name in ("encoder", "decoder"):
        axes[name].update({k: base[k] for k in ("wpe", "ln_f") if k in base})
    if not cfg.tie_embeddings:
        axes["lm_head"] = base["lm_head"]
    return axes


# ----------------------------------------------------------------------- pieces


def embed(
    cfg: Seq2SeqConfig, params: Params, stack: Params, tokens_BT, positions_BT, key=None
) -> Float[Array, "B T D"]:
    """Shared token embedding times `embed_scale`, plus this stack's positions."""
    x_BTD = jnp.take(params["wte"], tokens_BT, axis=0).astype(cfg.compute_dtype)
    x_BTD = x_BTD * jnp.asarray(cfg.embed_scale, cfg.compute_dtype)
    if cfg.pos_embedding == "sinusoidal":
        x_BTD += layers.sinusoidal(positions_BT, cfg.d_model).astype(cfg.compute_dtype)
    else:
        x_BTD += jnp.take(stack["wpe"], positions_BT, axis=0).astype(cfg.compute_dtype)
    return constrain(layers.dropout(x_BTD, cfg.embd_dropout, key), ("batch", "seq", "embed"))


def cross_kv(
    cfg: Seq2SeqConfig, p: Params, enc_BSD: Float[Array, "B S D"]
) -> tuple[Float[Array, "B S N H"], Float[Array, "B S N H"]]:
    """One layer's cross-attention keys and values: a function of the source only."""
    dt = cfg.compute_dtype
    kv_BS2NH = jnp.einsum("bsd,dcnh->bscnh", enc_BSD.astype(dt), p["kv"]["kernel"].astype(dt)) + p[
        "kv"
    ]["bias"].astype(dt)
    return kv_BS2NH[:, :, 0], kv_BS2NH[:, :, 1]


def cross_attention(
    cfg: Seq2SeqConfig,
    p: Params,
    x_BTD: Float[Array, "B T D"],
    k_BSNH,
    v_BSNH,
    mask_B1TS: Bool[Array, "B 1 T S"],
    keys=(None, None),
) -> Float[Array, "B T D"]:
    """Queries from the decoder, keys/values from the encoder output.

    `x_BTD` may hold K consecutive rows per source (beams: B*K rows for B
    sources); they are attended as one row of K*T queries, which is exact
    because cross-attention has no mask between queries, so the source K/V
    (and `mask_B1TS`, built for K*T queries) are never copied K times.
    """
    dt = cfg.compute_dtype
    rows, t = x_BTD.shape[:2]
    b = k_BSNH.shape[0]
    q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, p["q"]["kernel"].astype(dt)) + p["q"][
        "bias"
    ].astype(dt)
    q_BUNH = q_BTNH.reshape(b, rows // b * t, *q_BTNH.shape[2:])  # U = K*T queries per source
    out_BUNH = attn_lib.attention(
        q_BUNH,
        k_BSNH.astype(dt),
        v_BSNH.astype(dt),
        mask_B1TS,
        impl=cfg.attention_impl,
        dropout_rate=cfg.attn_dropout,
        key=keys[0],
    )
    out_BTNH = out_BUNH.reshape(q_BTNH.shape)
    out_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, p["c_proj"]["kernel"].astype(dt)) + p["c_proj"][
        "bias"
    ].astype(dt)
    return layers.dropout(out_BTD, cfg.resid_dropout, keys[1])


def decoder_block(
    cfg: Seq2SeqConfig,
    p: Params,
    x_BTD,
    positions_BT,
    self_mask_B1TS,
    cross_mask_B1TS,
    kv_BSNH,
    *,
    kv_cache=None,
    cache_layer=0,
    cache_index=None,
    key=None,
):
    """Causal self-attention, cross-attention, MLP; returns (x, the updated self-attention
    KV cache or None)."""
    keys = [None] * 5 if key is None else list(jax.random.split(key, 5))
    self_kv = [None]

    def attend(y_BTD):
        out_BTD, self_kv[0] = layers.self_attention(
            cfg,
            p["attn"],
            y_BTD,
            positions_BT,
            self_mask_B1TS,
            kv_cache=kv_cache,
            cache_layer=cache_layer,
            cache_index=cache_index,
            keys=keys[:2],
        )
        return out_BTD

    x_BTD = encoder.sublayer(cfg, p["ln_1"], x_BTD, attend)
    x_BTD = encoder.sublayer(
        cfg,
        p["ln_cross"],
        x_BTD,
        lambda y: cross_attention(cfg, p["cross_attn"], y, *kv_BSNH, cross_mask_B1TS, keys[2:4]),
    )
    x_BTD = encoder.sublayer(
        cfg, p["ln_2"], x_BTD, lambda y: encoder.ffn(cfg, p["mlp"], y, keys[4])
    )
    return constrain(x_BTD, ("batch", "seq", "embed")), self_kv[0]


def _final_ln(cfg, stack, x_BTD):
    return (
        layers.layer_norm(stack["ln_f"], x_BTD, cfg.layer_norm_eps)
        if cfg.ln_placement == "pre"
        else x_BTD
    )


def _positions(b: int, t: int, start=0) -> Int[Array, "B T"]:
    return jnp.broadcast_to(start + jnp.arange(t), (b, t))


def encode(
    cfg: Seq2SeqConfig,
    params: Params,
    src_BS: Int[Array, "B S"],
    src_valid_BS: Bool[Array, "B S"],
    key=None,
) -> Float[Array, "B S D"]:
    """The encoder stack's output (padding keys masked; padded rows are unused)."""
    layers.check_tokens(cfg, src_BS)
    b, s = src_BS.shape
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    x_BSD = embed(cfg, params, params["encoder"], src_BS, _positions(b, s), keys[0])
    x_BSD = encoder.run_encoder(
        cfg,
        params["encoder"]["h"],
        x_BSD,
        _positions(b, s),
        encoder.padding_mask(src_valid_BS, s),
        keys[1],
    )
    return _final_ln(cfg, params["encoder"], x_BSD)


def all_cross_kv(cfg: Seq2SeqConfig, params: Params, enc_BSD) -> dict:
    """Every decoder layer's cross K/V, `(L, B, S, N, H)`: computed once per source."""
    k, v = jax.vmap(lambda p: cross_kv(cfg, p, enc_BSD))(params["decoder"]["h"]["cross_attn"])
    return {"k": k, "v": v}


def logits(cfg: Seq2SeqConfig, params: Params, x_BTD) -> Float[Array, "B T V"]:
    """Tied (or separate) output projection plus Marian's `final_logits_bias`."""
    out = model.unembed(cfg, params, x_BTD) + params["final_logits_bias"].astype(jnp.float32)
    return constrain(out, ("batch", "seq", "vocab"))


def decode_hidden(
    cfg: Seq2SeqConfig,
    params: Params,
    tgt_BT: Int[Array, "B T"],
    cross: dict,
    src_valid_BS,
    *,
    cache: dict | None = None,
    cache_index=0,
    key=None,
) -> tuple[Float[Array, "B T D"], dict | None]:
    """The decoder's final states (after its final LN) for `tgt_BT` at target
    slots [cache_index, cache_index + T), and the updated cache.

    Without a cache the whole target is read at once (teacher forcing); with
    one (`layers.init_cache`), new self-attention K/V are written into
    it and the queries attend over every slot filled so far. `cross` and
    `src_valid_BS` may be those of B / K sources, each shared by K consecutive
    target rows (beams; see `cross_attention`).
    """
    dcfg = _decoder_cfg(cfg)
    n_slots = tgt_BT.shape[1] if cache is None else layers.cache_slots(cache)
    layers.check_tokens(cfg, tgt_BT, n_slots)
    b, t = tgt_BT.shape
    if b % src_valid_BS.shape[0]:
        raise ValueError(f"{b} target rows cannot share {src_valid_BS.shape[0]} sources evenly.")
    positions_BT = _positions(b, t, cache_index)
    q_slot_T = cache_index + jnp.arange(t)
    self_mask = attn_lib.make_mask(
        q_slot_T, jnp.broadcast_to(jnp.arange(n_slots) < cache_index + t, (b, n_slots))
    )
    cross_mask = encoder.padding_mask(src_valid_BS, b // src_valid_BS.shape[0] * t)
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    x_BTD = embed(cfg, params, params["decoder"], tgt_BT, positions_BT, keys[0])
    per_layer = {"ck": cross["k"], "cv": cross["v"], "layer": np.arange(dcfg.n_layers)}
    if keys[1] is not None:
        per_layer["key"] = jax.random.split(keys[1], dcfg.n_layers)

    def layer_fn(p, carry, extra, is_local):
        del is_local
        x_BTD, cache = carry
        out = decoder_block(
            dcfg,
            p,
            x_BTD,
            positions_BT,
            self_mask,
            cross_mask,
            (extra["ck"], extra["cv"]),
            kv_cache=cache,
            cache_layer=extra["layer"],
            cache_index=cache_index,
            key=extra.get("key"),
        )
        return out, None

    h = params["decoder"]["h"]
    (x_BTD, cache), _ = layers.run_layers(dcfg, h, (x_BTD, cache), per_layer, layer_fn)
    return _final_ln(cfg, params["decoder"], x_BTD), cache


def decode(
    cfg: Seq2SeqConfig,
    params: Params,
    tgt_BT: Int[Array, "B T"],
    cross: dict,
    src_valid_BS,
    *,
    cache: dict | None = None,
    cache_index=0,
    key=None,
) -> tuple[Float[Array, "B T V"], dict | None]:
    """`decode_hidden`, then the output projection: (logits, updated cache)."""
    x_BTD, cache = decode_hidden(
        cfg, params, tgt_BT, cross, src_valid_BS, cache=cache, cache_index=cache_index, key=key
    )
    return logits(cfg, params, x_BTD), cache


def forward(
    cfg: Seq2SeqConfig,
    params: Params,
    src_BS: Int[Array, "B S"],
    tgt_BT: Int[Array, "B T"],
    *,
    src_mask: Int[Array, "B S"] | None = None,
    key: jax.Array | None = None,
) -> Float[Array, "B T V"]:
    """Next-token logits (float32) for decoder inputs `tgt_BT` given the source.

    Args:
      src_mask: 1 for real source tokens, 0 for padding (pad on the right).
      key: dropout randomness; no dropout when None.
    """
    src_valid_BS = (
        jnp.ones(src_BS.shape, bool) if src_mask is None else jnp.asarray(src_mask).astype(bool)
    )
    if src_valid_BS.shape != src_BS.shape:
        raise ValueError(
            f"src_mask has shape {src_valid_BS.shape}; it must match src {src_BS.shape}."
        )
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    enc_BSD = encode(cfg, params, src_BS, src_valid_BS, keys[0])
    cross = all_cross_kv(cfg, params, enc_BSD)
    return decode(cfg, params, tgt_BT, cross, src_valid_BS, key=keys[1])[0]


# ------------------------------------------------------------------- objective


def shift_right(tgt_BT: Int[Array, "B T"], start_id: int) -> Int[Array, "B T"]:
    """Teacher-forcing decoder inputs: the start token, then the targets but the last."""
    return jnp.concatenate([jnp.full_like(tgt_BT[:, :1], start_id), tgt_BT[:, :-1]], axis=1)


def label_smoothed_token_losses(
    logits_BTV: Float[Array, "B T V"], targets_BT: Int[Array, "B T"], smoothing: float = 0.1
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """(smoothed loss, plain NLL) of each target token.

    The smoothed target puts 1 - eps on the label and eps / V on every class
    (the paper's eps_ls = 0.1; `optax.smooth_labels`), so loss =
    (1 - eps) * nll + eps * mean_v(-log p_v).
    """
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return (1.0 - smoothing) * nll_BT - smoothing * logp_BTV.mean(-1), nll_BT


def label_smoothed_loss(
    logits_BTV: Float[Array, "B T V"],
    targets_BT: Int[Array, "B T"],
    mask_BT: Int[Array, "B T"],
    smoothing: float = 0.1,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(smoothed loss, plain NLL), each the mean over real target tokens (mask 1);
    padding (mask 0) contributes nothing."""
    loss_BT, nll_BT = label_smoothed_token_losses(logits_BTV, targets_BT, smoothing)
    w_BT = mask_BT.astype(jnp.float32)
    denom = jnp.maximum(w_BT.sum(), 1.0)
    return (loss_BT * w_BT).sum() / denom, (nll_BT * w_BT).sum() / denom
