"""The GPT decoder as pure functions over a nested dict of parameters.

Parameter names follow the GPT-2 checkpoint (`wte`, `wpe`, `h/attn/c_attn`,
`h/mlp/c_fc`, `ln_f`, ...), so weight import is a key map. The layer stack `h`
is stored stacked, with a leading `layers` axis, so `lax.scan` can run it.
Attention kernels keep heads as their own axes (`c_attn` is D x 3 x N x H)
so tensor parallelism can split heads without splitting q/k/v apart. The
shared pieces (LayerNorm, MLP, attention projections, `run_layers`, the KV
cache) live in `gptjax.models.layers`; this module puts the decoder together.

Shape letters: B batch, T sequence, S key/value slots, D model, F feed-forward,
N heads, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptjax.config import ModelConfig
from gptjax.models import attention as attn_lib
from gptjax.models.layers import (
    Params,
    _normal,
    check_tokens,
    dropout,
    layer_norm,
    mlp,
    positions_from_mask,
    run_layers,
    self_attention,
    sinusoidal,
)
from gptjax.parallel.logical import constrain

# ----------------------------------------------------------------------------- init


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """GPT-2 initialisation: N(0, 0.02) weights, N(0, 0.01) positions, zero
    biases, unit LayerNorm scales, and residual output projections scaled by
    1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
    d, f, n, h, layers = cfg.d_model, cfg.ff_dim, cfg.n_heads, cfg.head_dim, cfg.n_layers
    dt = cfg.weight_dtype
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * layers)
    keys = iter(jax.random.split(key, 8))
    zeros, ones = (lambda *s: jnp.zeros(s, dt)), (lambda *s: jnp.ones(s, dt))
    params: Params = {
        "wte": _normal(next(keys), (cfg.vocab_size, d), std, dt),
        "h": {
            "ln_1": {"scale": ones(layers, d), "bias": zeros(layers, d)},
            "attn": {
                "c_attn": {
                    "kernel": _normal(next(keys), (layers, d, 3, n, h), std, dt),
                    "bias": zeros(layers, 3, n, h),
                },
                "c_proj": {
                    "kernel": _normal(next(keys), (layers, n, h, d), resid_std, dt),
                    "bias": zeros(layers, d),
                },
            },
            "ln_2": {"scale": ones(layers, d), "bias": zeros(layers, d)},
            "mlp": {
                "c_fc": {
                    "kernel": _normal(next(keys), (layers, d, f), std, dt),
                    "bias": zeros(layers, f),
                },
                "c_proj": {
                    "kernel": _normal(next(keys), (layers, f, d), resid_std, dt),
                    "bias": zeros(layers, d),
                },
            },
        },
    }
    if cfg.pos_embedding == "learned":
        params["wpe"] = _normal(next(keys), (cfg.max_len, d), 0.01, dt)
    if cfg.ln_placement == "pre":
        params["ln_f"] = {"scale": ones(d), "bias": zeros(d)}
    if not cfg.tie_embeddings:
        params["lm_head"] = _normal(next(keys), (d, cfg.vocab_size), std, dt)
    return params


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter, in the same tree as `init_params`."""
    ln = {"scale": ("layers", "embed"), "bias": ("layers", "embed")}
    axes: Params = {
        "wte": ("vocab", "embed"),
        "h": {
            "ln_1": ln,
            "attn": {
                "c_attn": {
                    "kernel": ("layers", "embed", None, "heads", "head_dim"),
                    "bias": ("layers", None, "heads", "head_dim"),
                },
                "c_proj": {
                    "kernel": ("layers", "heads", "head_dim", "embed"),
                    "bias": ("layers", "embed"),
                },
            },
            "ln_2": ln,
            "mlp": {
                "c_fc": {"kernel": ("layers", "embed", "mlp"), "bias": ("layers", "mlp")},
                "c_proj": {"kernel": ("layers", "mlp", "embed"), "bias": ("layers", "embed")},
            },
        },
    }
    if cfg.pos_embedding == "learned":
        axes["wpe"] = (None, "embed")
    if cfg.ln_placement == "pre":
        axes["ln_f"] = {"scale": ("embed",), "bias": ("embed",)}
    if not cfg.tie_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


# ----------------------------------------------------------------------- pieces


def embed(cfg: ModelConfig, params: Params, tokens_BT, positions_BT) -> Float[Array, "B T D"]:
    """Token embedding plus absolute positions (none for rotary: it acts in attention)."""
    x_BTD = jnp.take(params["wte"], tokens_BT, axis=0).astype(cfg.compute_dtype)
    if cfg.pos_embedding == "learned":
        x_BTD += jnp.take(params["wpe"], positions_BT, axis=0).astype(cfg.compute_dtype)
    elif cfg.pos_embedding == "sinusoidal":
        x_BTD += sinusoidal(positions_BT, cfg.d_model).astype(cfg.compute_dtype)
    return x_BTD


def unembed(cfg: ModelConfig, params: Params, x_BTD) -> Float[Array, "B T V"]:
    """Logits in float32 (bf16 inputs, f32 accumulation) for a stable softmax."""
    dt = cfg.compute_dtype
    if cfg.tie_embeddings:
        return jnp.einsum(
            "btd,vd->btv",
            x_BTD.astype(dt),
            params["wte"].astype(dt),
            preferred_element_type=jnp.float32,
        )
    return jnp.einsum(
        "btd,dv->btv",
        x_BTD.astype(dt),
        params["lm_head"].astype(dt),
        preferred_element_type=jnp.float32,
    )


def block(
    cfg: ModelConfig,
    p: Params,
    x_BTD,
    positions_BT,
    masks,
    *,
    is_local: bool,
    kv_cache=None,
    cache_layer=0,
    cache_index=None,
    key=None,
):
    """One transformer layer, pre-LN (GPT-2/3) or post-LN (GPT-1); returns (x, the updated
    KV cache or None)."""
    mask_B1TS = None if masks is None else masks[is_local]
    window = cfg.local_window if is_local else None
    keys = (None, None, None) if key is None else tuple(jax.random.split(key, 3))
    eps = cfg.layer_norm_eps
    attend = functools.partial(
        self_attention,
        cfg,
        p["attn"],
        positions_BT=positions_BT,
        mask_B1TS=mask_B1TS,
        window=window,
        kv_cache=kv_cache,
        cache_layer=cache_layer,
        cache_index=cache_index,
        keys=keys[:2],
    )
    if cfg.ln_placement == "pre":
        a_BTD, kv = attend(layer_norm(p["ln_1"], x_BTD, eps))
        x_BTD = x_BTD + a_BTD
        x_BTD = x_BTD + mlp(cfg, p["mlp"], layer_norm(p["ln_2"], x_BTD, eps), keys[2])
    else:
        a_BTD, kv = attend(x_BTD)
        x_BTD = layer_norm(p["ln_1"], x_BTD + a_BTD, eps)
        x_BTD = layer_norm(p["ln_2"], x_BTD + mlp(cfg, p["mlp"], x_BTD, keys[2]), eps)
    return constrain(x_BTD, ("batch", "seq", "embed")), kv


# ------------------------------------------------------------------- the trunk


def _masks(cfg: ModelConfig, q_slot_T, kv_valid_BS):
    """The (dense, banded) pair of masks indexed by `is_local`."""
    dense = attn_lib.make_mask(q_slot_T, kv_valid_BS)
    if cfg.attention != "gpt3_sparse":
        return (dense, dense)
    return (dense, attn_lib.make_mask(q_slot_T, kv_valid_BS, cfg.local_window))


def hidden_states(
    cfg: ModelConfig, params: Params, tokens_BT, *, positions=None, mask=None, key=None
) -> Float[Array, "B T D"]:
    """The trunk: embeddings through every layer (and the final LN for pre-LN)."""
    check_tokens(cfg, tokens_BT)
    b, t = tokens_BT.shape
    if positions is None:
        positions = (
            jnp.broadcast_to(jnp.arange(t), (b, t)) if mask is None else positions_from_mask(mask)
        )
    masks = None if mask is None else _masks(cfg, jnp.arange(t), mask.astype(bool))
    embd_key = layer_keys = None
    if key is not None:
        embd_key, layers_key = jax.random.split(key)
        layer_keys = jax.random.split(layers_key, cfg.n_layers)
    x_BTD = dropout(embed(cfg, params, tokens_BT, positions), cfg.embd_dropout, embd_key)
    x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))

    def layer_fn(p, x_BTD, extra, is_local):
        x_BTD, _ = block(cfg, p, x_BTD, positions, masks, is_local=is_local, key=extra.get("key"))
        return x_BTD, None

    per_layer = {} if layer_keys is None else {"key": layer_keys}
    x_BTD, _ = run_layers(cfg, params["h"], x_BTD, per_layer, layer_fn)
    if cfg.ln_placement == "pre":
        x_BTD = layer_norm(params["ln_f"], x_BTD, cfg.layer_norm_eps)
    return x_BTD


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens_BT: Int[Array, "B T"],
    *,
    positions: Int[Array, "B T"] | None = None,
    mask: Int[Array, "B T"] | None = None,
    key: jax.Array | None = None,
) -> Float[Array, "B T V"]:
    """Next-token logits (float32) for every position.

    Args:
      mask: 1 for real tokens, 0 for padding (left padding for generation);
        positions then count real tokens only, unless given explicitly.
      key: dropout randomness; no dropout when None (evaluation).
    """
    x_BTD = hidden_states(cfg, params, tokens_BT, positions=positions, mask=mask, key=key)
    return constrain(unembed(cfg, params, x_BTD), ("batch", "seq", "vocab"))


# ---------------------------------------------------------------- cached decoding


def forward_cached(
    cfg: ModelConfig,
    params: Params,
    tokens_BT,
    cache: dict,
    *,
    positions_BT,
    kv_valid_BS,
    cache_index,
) -> tuple[Float[Array, "B T V"], dict]:
    """Logits for `tokens_BT` placed at slots [cache_index, cache_index + T) of the cache.

    Used for both prefill (the whole prompt at index 0) and decode (one token).
    `kv_valid_BS` marks slots that hold real tokens, including the new ones.
    """
    t = tokens_BT.shape[1]
    masks = _masks(cfg, cache_index + jnp.arange(t), kv_valid_BS)
    x_BTD = embed(cfg, params, tokens_BT, positions_BT)

    def layer_fn(p, carry, extra, is_local):
        x_BTD, cache = carry
        out = block(
            cfg,
            p,
            x_BTD,
            positions_BT,
            masks,
            is_local=is_local,
            kv_cache=cache,
            cache_layer=extra["layer"],
            cache_index=cache_index,
        )
        return out, None

    per_layer = {"layer": np.arange(cfg.n_layers)}
    (x_BTD, cache), _ = run_layers(cfg, params["h"], (x_BTD, cache), per_layer, layer_fn)
    if cfg.ln_placement == "pre":
        x_BTD = layer_norm(params["ln_f"], x_BTD, cfg.layer_norm_eps)
    return unembed(cfg, params, x_BTD), cache
