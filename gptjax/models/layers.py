"""The building blocks every model kind shares, as pure functions over parameter dicts.

The decoder (`gptjax.models.gpt`), the encoder (`gptjax.models.bert`) and the
encoder–decoder (`gptjax.models.transformer`) are made of these: LayerNorm,
dropout, sinusoidal positions, the GELU MLP, the self-attention projections
(with an optional KV cache), and `run_layers`, which runs a stacked layer tree
under `lax.scan` or unrolled, with or without remat.

Shape letters: B batch, T sequence, S key/value slots, D model, F feed-forward,
N heads, H head dim, L layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptjax.config import ModelConfig, is_local_layer
from gptjax.models import attention as attn_lib
from gptjax.parallel.logical import constrain

Params = dict[str, Any]

REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer, recompute everything
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _normal(key, shape, std, dtype):
    """N(0, std) in float32, cast to `dtype` (the same draws for every dtype)."""
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------- pieces


def layer_norm(p: Params, x_BTD: Float[Array, "B T D"], eps: float) -> Float[Array, "B T D"]:
    """LayerNorm with float32 statistics, returned in the input's dtype."""
    f32 = jnp.float32
    y_BTD = _layer_norm(x_BTD.astype(f32), p["scale"].astype(f32), p["bias"].astype(f32), eps)
    return y_BTD.astype(x_BTD.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x_BTD, scale_D, bias_D, eps: float):
    return _layer_norm_fwd(x_BTD, scale_D, bias_D, eps)[0]


def _layer_norm_fwd(x_BTD, scale_D, bias_D, eps: float):
    """y = (x - mean) / std * scale + bias; keeps (x_hat, 1/std, scale) for the backward."""
    centred_BTD = x_BTD - x_BTD.mean(-1, keepdims=True)
    rstd_BT1 = jax.lax.rsqrt(jnp.square(centred_BTD).mean(-1, keepdims=True) + eps)
    xhat_BTD = centred_BTD * rstd_BT1
    return xhat_BTD * scale_D + bias_D, (xhat_BTD, rstd_BT1, scale_D)


def _layer_norm_bwd(eps: float, res, g_BTD):
    """The closed-form LayerNorm gradient: dx = (g' - mean(g') - x_hat mean(g' x_hat)) / std
    with g' = g * scale. Autodiff of the forward gives the same numbers with more saved
    arrays and more elementwise work, which the CPU backend fuses poorly across layers."""
    xhat_BTD, rstd_BT1, scale_D = res
    gs_BTD = g_BTD * scale_D
    dx_BTD = rstd_BT1 * (
        gs_BTD
        - gs_BTD.mean(-1, keepdims=True)
        - xhat_BTD * (gs_BTD * xhat_BTD).mean(-1, keepdims=True)
    )
    lead = tuple(range(g_BTD.ndim - 1))
    return dx_BTD, (g_BTD * xhat_BTD).sum(lead), g_BTD.sum(lead)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def dropout(x, rate: float, key: jax.Array | None):
    """Inverted dropout: zero each element with probability `rate`, scale the rest by
    1 / (1 - rate); the identity at rate 0 or without a key (evaluation)."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def sinusoidal(positions_BT: Int[Array, "B T"], d: int) -> Float[Array, "B T D"]:
    """Fixed sinusoidal positions (Vaswani et al.), sines in the first half of
    the features and cosines in the second (the tensor2tensor/Marian layout)."""
    inv_freq = jnp.exp(-math.log(10000.0) * jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2))
    angle_BTK = positions_BT[..., None].astype(jnp.float32) * inv_freq
    out = jnp.concatenate([jnp.sin(angle_BTK), jnp.cos(angle_BTK)], axis=-1)
    return jnp.pad(out, ((0, 0), (0, 0), (0, d - out.shape[-1])))


# tanh GELU, recomputed in the backward from its input: saves one (B, T, F) array per layer
# where autodiff would keep three (the input, tanh and its square's factors).
_gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=True))


def mlp(cfg: ModelConfig, p: Params, x_BTD, key=None) -> Float[Array, "B T D"]:
    """The position-wise feed-forward: D -> F, tanh GELU, F -> D, then residual dropout."""
    dt = cfg.compute_dtype
    h_BTF = x_BTD @ p["c_fc"]["kernel"].astype(dt) + p["c_fc"]["bias"].astype(dt)
    h_BTF = constrain(_gelu(h_BTF), ("batch", "seq", "mlp"))
    out_BTD = h_BTF @ p["c_proj"]["kernel"].astype(dt) + p["c_proj"]["bias"].astype(dt)
    return dropout(out_BTD, cfg.resid_dropout, key)


def self_attention(
    cfg: ModelConfig,
    p: Params,
    x_BTD,
    positions_BT,
    mask_B1TS,
    *,
    window=None,
    kv_cache=None,
    cache_layer=0,
    cache_index=None,
    keys=(None, None),
):
    """Multi-head self-attention; with `kv_cache` (`init_cache`'s dict) this layer's new
    keys and values are written at slots [cache_index, cache_index + T) of layer
    `cache_layer` and the queries attend over that layer's slots.

    Returns (out_BTD, the updated cache, or None without one).
    """
    dt = cfg.compute_dtype
    qkv_BT3NH = jnp.einsum("btd,dcnh->btcnh", x_BTD, p["c_attn"]["kernel"].astype(dt)) + p[
        "c_attn"
    ]["bias"].astype(dt)
    qkv_BT3NH = constrain(qkv_BT3NH, ("batch", "seq", None, "heads", "head_dim"))
    q_BTNH, k_BTNH, v_BTNH = (qkv_BT3NH[:, :, i] for i in range(3))
    if cfg.pos_embedding == "rope":
        q_BTNH, k_BTNH = attn_lib.rope(q_BTNH, positions_BT), attn_lib.rope(k_BTNH, positions_BT)
    if kv_cache is not None:
        kv_cache, k_BNSH, v_BNSH = write_cache(kv_cache, cache_layer, cache_index, k_BTNH, v_BTNH)
        out_BTNH = attn_lib.attention_xla(
            q_BTNH, k_BNSH.astype(dt), v_BNSH.astype(dt), mask_B1TS, kv_heads_first=True
        )
    else:
        out_BTNH = attn_lib.attention(
            q_BTNH,
            k_BTNH,
            v_BTNH,
            mask_B1TS,
            impl=cfg.attention_impl,
            window=window,
            dropout_rate=cfg.attn_dropout,
            key=keys[0],
        )
    out_BTNH = constrain(out_BTNH, ("batch", "seq", "heads", "head_dim"))
    out_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, p["c_proj"]["kernel"].astype(dt)) + p["c_proj"][
        "bias"
    ].astype(dt)
    return dropout(out_BTD, cfg.resid_dropout, keys[1]), kv_cache


# ------------------------------------------------------------------- the stack


def _index(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _unstack(tree, n: int) -> list:
    """The `n` per-layer trees of a tree stacked along a leading L axis, by `jnp.split`: its
    gradient is one concatenate, where indexing each layer's slice transposes to `n` pads to
    the full stack, summed (L^2 / 2 stack-sized adds per step; 29% of a 6-layer CPU step)."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [[jnp.squeeze(x, 0) for x in jnp.split(a, n)] for a in leaves]
    return [treedef.unflatten([p[i] for p in parts]) for i in range(n)]


def scans(cfg: ModelConfig) -> bool:
    """Whether the layer stack runs under `lax.scan`: `cfg.scan_layers`, or when it is None,
    unrolled on CPU (faster there: XLA fuses and schedules across layers; see
    benchmarks/RESULTS.md) and scanned on accelerators (compile time flat in depth)."""
    if cfg.scan_layers is not None:
        return cfg.scan_layers
    odd_pairs = cfg.attention == "gpt3_sparse" and cfg.n_layers % 2
    return jax.default_backend() != "cpu" and not odd_pairs


def run_layers(
    cfg: ModelConfig, h: Params, x_BTD, per_layer: dict, layer_fn: Callable
) -> tuple[Any, Any]:
    """Apply `layer_fn(p, x, per_layer_slice, is_local) -> (x, y)` to every layer.

    `x` may be any pytree carried from layer to layer (the cached forward carries the KV
    cache with the activations, so each layer updates it in place); `per_layer` holds
    arrays with a leading L axis (dropout keys, cross-attention K/V, layer indices, as
    NumPy to stay static when unrolled); the `y`s are stacked back along L. With
    `scan_layers` the stack runs under `lax.scan`; GPT-3's alternating layers are scanned
    in pairs so whether a layer is banded stays a Python constant (the fused kernels need
    it static).
    """
    fns = {}
    for local in (False, True):
        fn = functools.partial(layer_fn, is_local=local)
        if cfg.remat != "none":
            fn = jax.checkpoint(fn, policy=REMAT_POLICIES[cfg.remat])
        fns[local] = fn
    if not scans(cfg):
        ys = []
        for i, p in enumerate(_unstack(h, cfg.n_layers)):
            x_BTD, y = fns[is_local_layer(cfg, i)](p, x_BTD, _index(per_layer, i))
            ys.append(y)
        return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *ys)

    group = 2 if cfg.attention == "gpt3_sparse" else 1
    regroup = lambda a: a.reshape(a.shape[0] // group, group, *a.shape[1:])

    def body(x_BTD, xs):
        p_G, extra_G = xs
        ys = []
        for j in range(group):
            x_BTD, y = fns[is_local_layer(cfg, j)](_index(p_G, j), x_BTD, _index(extra_G, j))
            ys.append(y)
        return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *ys)

    x_BTD, ys = jax.lax.scan(body, x_BTD, jax.tree.map(regroup, (h, per_layer)))
    return x_BTD, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), ys)


def positions_from_mask(mask_BT) -> Int[Array, "B T"]:
    """Position ids that count only real tokens, so left padding shifts nothing."""
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=1) - 1, 0)


def check_tokens(cfg: ModelConfig, tokens_BT, n_slots: int | None = None) -> None:
    """Clear errors for inputs the model cannot score (values checked when concrete)."""
    if tokens_BT.ndim != 2:
        raise ValueError(f"tokens must be a (batch, time) array, got shape {tokens_BT.shape}.")
    length = tokens_BT.shape[1] if n_slots is None else n_slots
    if cfg.pos_embedding == "learned" and length > cfg.max_len:
        raise ValueError(
            f"sequence of {length} tokens exceeds the model's max_len="
            f"{cfg.max_len}; truncate the input or use a longer-context config."
        )
    if not isinstance(tokens_BT, jax.core.Tracer) and tokens_BT.size:
        lo, hi = int(np.min(tokens_BT)), int(np.max(tokens_BT))
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {cfg.vocab_size}) (the model's vocab_size)"
                f"; got min {lo}, max {hi}. Is the tokenizer the model's?"
            )


def init_cache(cfg: ModelConfig, batch: int, n_slots: int, n_layers: int | None = None) -> dict:
    """A preallocated self-attention KV cache in the compute dtype, rows on axis 0.

    For "k" and "v": a tuple of L `(B, N, S, H)` buffers when the stack is unrolled, or one
    `(B, L, N, S, H)` buffer when it is scanned. L is `n_layers` (default `cfg.n_layers`;
    the seq2seq decoder's depth). Heads come before slots so attention reads a layer's keys
    without a transpose, and each layer updates its buffer in place (`write_cache`), so a
    decode step touches only the new slot. Slicing each layer out of one stacked buffer
    and restacking it copied the whole cache three times a step: 0.5 ms per row per step
    at the quickstart's shapes (benchmarks/RESULTS.md, "Decode on CPU").
    """
    n_layers = cfg.n_layers if n_layers is None else n_layers
    dims = (cfg.n_heads, n_slots, cfg.head_dim)
    shapes = [(batch, n_layers, *dims)] if scans(cfg) else [(batch, *dims)] * n_layers
    zeros = lambda: tuple(jnp.zeros(shape, cfg.compute_dtype) for shape in shapes)
    return {"k": zeros(), "v": zeros()}


def cache_slots(cache: dict) -> int:
    """S, the number of token slots of an `init_cache` cache."""
    return cache["k"][0].shape[-2]


def write_cache(cache: dict, layer, cache_index, k_BTNH, v_BTNH):
    """Write layer `layer`'s new keys and values at slots [cache_index, cache_index + T).

    `layer` is a concrete int for a per-layer cache (unrolled) and may be traced for a
    stacked one (scanned). Returns the updated cache and that layer's `(B, N, S, H)` keys
    and values.
    """
    stacked = cache["k"][0].ndim == 5
    zero = jnp.int32(0)  # one index dtype, also under jax_enable_x64
    cache_index = jnp.asarray(cache_index, jnp.int32)
    out, read = {}, []
    for name, x_BTNH in (("k", k_BTNH), ("v", v_BTNH)):
        bufs = list(cache[name])
        x_BNTH = jnp.swapaxes(x_BTNH, 1, 2).astype(bufs[0].dtype)
        if stacked:
            start = (zero, jnp.asarray(layer, jnp.int32), zero, cache_index, zero)
            buf = jax.lax.dynamic_update_slice(bufs[0], x_BNTH[:, None], start)
            bufs[0] = constrain(buf, ("batch", "layers", "heads", "kv_seq", "head_dim"))
            read.append(jax.lax.dynamic_index_in_dim(bufs[0], layer, 1, keepdims=False))
        else:
            layer = int(layer)
            start = (zero, zero, cache_index, zero)
            buf = jax.lax.dynamic_update_slice(bufs[layer], x_BNTH, start)
            bufs[layer] = constrain(buf, ("batch", "heads", "kv_seq", "head_dim"))
            read.append(bufs[layer])
        out[name] = tuple(bufs)
    return out, *read
