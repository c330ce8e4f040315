"""Causal self-attention: masks, rotary positions and the attention kernel.

Shapes: B batch, T queries, S keys/values, N heads, H head dim.

Masks are boolean `(B, 1, T, S)` arrays (True = may attend) built from
*slots*: the index of a token in the sequence buffer (the KV cache or the
input). Causality and the GPT-3 local band compare slots, so a left-padded
row (whose positions are its slots shifted by the pad count) gets exactly
the same pattern as the unpadded row.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

# Added to masked logits. Finite, so a row with nothing to attend to (a pad
# query) yields a harmless uniform average instead of NaN; exp() of it
# underflows to exactly 0 next to any real logit.
_MASK_VALUE = -1e30


def make_mask(
    q_slot_T: Int[Array, " T"], kv_valid_BS: Bool[Array, "B S"], window: int | None = None
) -> Bool[Array, "B 1 T S"]:
    """Causal (and optionally banded) mask over a buffer of S slots.

    A query in slot i may attend to slot j when j <= i, slot j holds a real
    token, and (banded layers) i - j < window.
    """
    kv_slot_S = jnp.arange(kv_valid_BS.shape[1])
    allowed_TS = kv_slot_S[None, :] <= q_slot_T[:, None]
    if window is not None:
        allowed_TS &= q_slot_T[:, None] - kv_slot_S[None, :] < window
    return allowed_TS[None, None, :, :] & kv_valid_BS[:, None, None, :]


def causal_mask(t: int, window: int | None = None) -> Bool[Array, "1 1 T T"]:
    """The plain causal (banded) mask of a full, unpadded sequence."""
    return make_mask(jnp.arange(t), jnp.ones((1, t), bool), window)


def rope(
    x_BTNH: Float[Array, "B T N H"], positions_BT: Int[Array, "B T"], base: float = 10000.0
) -> Float[Array, "B T N H"]:
    """Rotary position embedding (Su et al. 2021), rotating halves of each head."""
    h = x_BTNH.shape[-1]
    inv_freq_K = 1.0 / base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    angle_BTK = positions_BT[..., None].astype(jnp.float32) * inv_freq_K
    sin_BT1K, cos_BT1K = jnp.sin(angle_BTK)[:, :, None], jnp.cos(angle_BTK)[:, :, None]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1K - x2 * sin_BT1K, x2 * cos_BT1K + x1 * sin_BT1K], -1)
    return out.astype(x_BTNH.dtype)


@jax.custom_vjp
def softmax(x_BNTS: Float[Array, "B N T S"]) -> Float[Array, "B N T S"]:
    """Softmax over the last axis whose backward keeps only its output (one (B, N, T, S)
    array per layer; `jax.nn.softmax` under autodiff keeps more on the CPU backend)."""
    return jax.nn.softmax(x_BNTS, axis=-1)


def _softmax_fwd(x_BNTS):
    y_BNTS = jax.nn.softmax(x_BNTS, axis=-1)
    return y_BNTS, y_BNTS


def _softmax_bwd(y_BNTS, g_BNTS):
    return (y_BNTS * (g_BNTS - (g_BNTS * y_BNTS).sum(-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def attention_xla(
    q_BTNH, k_BSNH, v_BSNH, mask_B1TS, *, dropout_rate=0.0, key=None, kv_heads_first=False
):
    """The readable reference: softmax(q k^T / sqrt(H)) v with fp32 logits and softmax.

    `kv_heads_first`: keys and values come as `(B, N, S, H)` (the KV cache's layout).
    """
    scale = q_BTNH.shape[-1] ** -0.5
    kv = "bnsh" if kv_heads_first else "bsnh"
    logits_BNTS = (
        jnp.einsum(f"btnh,{kv}->bnts", q_BTNH, k_BSNH, preferred_element_type=jnp.float32) * scale
    )
    logits_BNTS = jnp.where(mask_B1TS, logits_BNTS, _MASK_VALUE)
    probs_BNTS = softmax(logits_BNTS)
    if dropout_rate > 0.0 and key is not None:
        keep_BNTS = jax.random.bernoulli(key, 1.0 - dropout_rate, probs_BNTS.shape)
        probs_BNTS = jnp.where(keep_BNTS, probs_BNTS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum(f"bnts,{kv}->btnh", probs_BNTS.astype(v_BSNH.dtype), v_BSNH)


def attention(
    q_BTNH: Float[Array, "B T N H"],
    k_BSNH: Float[Array, "B S N H"],
    v_BSNH: Float[Array, "B S N H"],
    mask_B1TS: Bool[Array, "B 1 T S"] | None,
    *,
    impl: str = "xla",
    window: int | None = None,
    dropout_rate: float = 0.0,
    key: jax.Array | None = None,
) -> Float[Array, "B T N H"]:
    """Scaled dot-product attention.

    Args:
      mask_B1TS: who may attend to whom; None means a plain causal mask over
        an unpadded sequence (T == S), banded by `window` when given. Passing
        None lets the fused kernels use their built-in causal/banded masking.
      impl: 'xla' (the einsum reference above), 'fused' (jax.nn's kernel,
        implementation chosen by JAX) or 'cudnn' (force the cuDNN kernel).
        Attention dropout is only implemented by 'xla'; the fused paths fall
        back to it while dropout is active.
    """
    use_dropout = dropout_rate > 0.0 and key is not None
    if use_dropout and impl != "xla":
        warnings.warn(
            f"attention_impl={impl!r} has no attention dropout; using the 'xla' "
            "reference while attn_dropout > 0 (set ModelConfig.attn_dropout = 0.0 "
            "to use the fused kernel in training).",
            stacklevel=2,
        )
    if impl == "xla" or use_dropout:
        if mask_B1TS is None:
            mask_B1TS = causal_mask(q_BTNH.shape[1], window)
        return attention_xla(q_BTNH, k_BSNH, v_BSNH, mask_B1TS, dropout_rate=dropout_rate, key=key)
    implementation = "cudnn" if impl == "cudnn" else None
    if mask_B1TS is None:
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(
            q_BTNH,
            k_BSNH,
            v_BSNH,
            is_causal=True,
            local_window_size=local,
            implementation=implementation,
        )
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSNH, v_BSNH, mask=mask_B1TS, implementation=implementation
    )
