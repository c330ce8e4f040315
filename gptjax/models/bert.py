"""BERT: the encoder-only relative of GPT, on the decoder's own pieces.

What differs from `gptjax.models.gpt` is small, and only that lives here:
attention sees the whole sequence (a padding mask, never a causal one),
embeddings add a token-type (segment) table and are LayerNormed, the MLP's
activation is a config field (BERT uses the exact erf GELU, GPT the tanh
one), and the head is the masked-LM head of `BertForMaskedLM` (dense + GELU +
LN, then the tied word embeddings plus a bias). Attention projections, the
layer stack (scan / unrolled / remat), LayerNorm, init and sharding axes are
the decoder's, so every mesh preset and the HF key maps carry over.

Params extend the GPT-2 names: `wte`, `wpe`, `wtt` (token types), `ln_embd`,
the stacked `h/{ln_1,attn,ln_2,mlp}`, and `mlm/{dense,ln,bias}`.

Shape letters: B batch, T sequence, S keys, D model, F feed-forward, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from gptjax.config import EncoderConfig, ModelConfig
from gptjax.models import gpt as model
from gptjax.models import layers
from gptjax.parallel.logical import constrain

Params = layers.Params

ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU (BERT, HF "gelu")
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT's tanh approximation
    "relu": jax.nn.relu,  # Vaswani et al. 2017
    "swish": jax.nn.silu,  # Marian's default
}


# ----------------------------------------------------------------------------- init


def init_params(cfg: EncoderConfig, key: jax.Array) -> Params:
    """The decoder's init (N(0, 0.02), unit LNs, zero biases) plus BERT's extras."""
    k_trunk, k_type, k_dense = jax.random.split(key, 3)
    params = model.init_params(cfg, k_trunk)
    d, dt = cfg.d_model, cfg.weight_dtype
    params["wtt"] = layers._normal(k_type, (cfg.type_vocab_size, d), 0.02, dt)
    params["ln_embd"] = {"scale": jnp.ones((d,), dt), "bias": jnp.zeros((d,), dt)}
    params["mlm"] = {
        "dense": {"kernel": layers._normal(k_dense, (d, d), 0.02, dt), "bias": jnp.zeros((d,), dt)},
        "ln": {"scale": jnp.ones((d,), dt), "bias": jnp.zeros((d,), dt)},
        "bias": jnp.zeros((cfg.vocab_size,), dt),
    }
    return params


def param_axes(cfg: EncoderConfig) -> Params:
    """Logical axis names, in the tree of `init_params`."""
    axes = model.param_axes(cfg)
    axes["wtt"] = (None, "embed")
    axes["ln_embd"] = {"scale": ("embed",), "bias": ("embed",)}
    axes["mlm"] = {
        "dense": {"kernel": ("embed", None), "bias": ("embed",)},
        "ln": {"scale": ("embed",), "bias": ("embed",)},
        "bias": ("vocab",),
    }
    return axes


# ----------------------------------------------------------------------- pieces


def padding_mask(valid_BS: Bool[Array, "B S"], t: int) -> Bool[Array, "B 1 T S"]:
    """Every query may see every real key: the bidirectional counterpart of
    `attention.make_mask`. Always pass it: a None mask means *causal* there."""
    valid_BS = valid_BS.astype(bool)
    return jnp.broadcast_to(
        valid_BS[:, None, None, :], (valid_BS.shape[0], 1, t, valid_BS.shape[1])
    )


def ffn(
    cfg: ModelConfig, p: Params, x_BTD: Float[Array, "B T D"], key: jax.Array | None = None
) -> Float[Array, "B T D"]:
    """The decoder's MLP with the activation taken from the config."""
    dt = cfg.compute_dtype
    h_BTF = x_BTD @ p["c_fc"]["kernel"].astype(dt) + p["c_fc"]["bias"].astype(dt)
    h_BTF = constrain(ACTIVATIONS[cfg.activation](h_BTF), ("batch", "seq", "mlp"))
    out_BTD = h_BTF @ p["c_proj"]["kernel"].astype(dt) + p["c_proj"]["bias"].astype(dt)
    return layers.dropout(out_BTD, cfg.resid_dropout, key)


def sublayer(cfg: ModelConfig, ln: Params, x_BTD, fn: Callable) -> Float[Array, "B T D"]:
    """A residual around `fn`: LN on the input (pre-LN) or after the add (post-LN)."""
    eps = cfg.layer_norm_eps
    if cfg.ln_placement == "pre":
        return x_BTD + fn(layers.layer_norm(ln, x_BTD, eps))
    return layers.layer_norm(ln, x_BTD + fn(x_BTD), eps)


def encoder_block(
    cfg: ModelConfig,
    p: Params,
    x_BTD: Float[Array, "B T D"],
    positions_BT,
    mask_B1TS: Bool[Array, "B 1 T T"],
    key=None,
) -> Float[Array, "B T D"]:
    """One encoder layer: bidirectional self-attention, then the MLP."""
    keys = (None, None, None) if key is None else tuple(jax.random.split(key, 3))

    def attend(y_BTD):
        return layers.self_attention(cfg, p["attn"], y_BTD, positions_BT, mask_B1TS, keys=keys[:2])[
            0
        ]

    x_BTD = sublayer(cfg, p["ln_1"], x_BTD, attend)
    x_BTD = sublayer(cfg, p["ln_2"], x_BTD, lambda y: ffn(cfg, p["mlp"], y, keys[2]))
    return constrain(x_BTD, ("batch", "seq", "embed"))


def run_encoder(
    cfg: ModelConfig, h: Params, x_BTD: Float[Array, "B T D"], positions_BT, mask_B1TS, key=None
) -> Float[Array, "B T D"]:
    """The stacked encoder layers through the decoder's `run_layers` (scan/remat)."""
    per_layer = {} if key is None else {"key": jax.random.split(key, cfg.n_layers)}

    def layer_fn(p, x_BTD, extra, is_local):
        del is_local  # always dense
        return encoder_block(cfg, p, x_BTD, positions_BT, mask_B1TS, extra.get("key")), None

    return layers.run_layers(cfg, h, x_BTD, per_layer, layer_fn)[0]


def _check_inputs(cfg: EncoderConfig, tokens_BT, segment_ids, mask) -> None:
    layers.check_tokens(cfg, tokens_BT)
    for name, a in (("segment_ids", segment_ids), ("mask", mask)):
        if a is not None and a.shape != tokens_BT.shape:
            raise ValueError(f"{name} has shape {a.shape}; it must match tokens {tokens_BT.shape}.")
    concrete = segment_ids is not None and not isinstance(segment_ids, jax.core.Tracer)
    if concrete and segment_ids.size:  # noqa: SIM102  (the bounds are read only when concrete)
        if np.min(segment_ids) < 0 or np.max(segment_ids) >= cfg.type_vocab_size:
            raise ValueError(
                f"segment_ids must lie in [0, {cfg.type_vocab_size}) (type_vocab_size)."
            )


def embed(
    cfg: EncoderConfig, params: Params, tokens_BT, segment_ids_BT, positions_BT, key=None
) -> Float[Array, "B T D"]:
    """Word + position + token-type embeddings, then LayerNorm and dropout (BERT)."""
    x_BTD = model.embed(cfg, params, tokens_BT, positions_BT)
    x_BTD += jnp.take(params["wtt"], segment_ids_BT, axis=0).astype(cfg.compute_dtype)
    x_BTD = layers.layer_norm(params["ln_embd"], x_BTD, cfg.layer_norm_eps)
    return constrain(layers.dropout(x_BTD, cfg.embd_dropout, key), ("batch", "seq", "embed"))


def hidden_states(
    cfg: EncoderConfig,
    params: Params,
    tokens_BT: Int[Array, "B T"],
    *,
    segment_ids: Int[Array, "B T"] | None = None,
    mask: Int[Array, "B T"] | None = None,
    key: jax.Array | None = None,
) -> Float[Array, "B T D"]:
    """The trunk's final states; task heads read `[:, 0]` (the [CLS] token).

    Args:
      mask: 1 for real tokens, 0 for padding (BERT pads on the right).
      key: dropout randomness; no dropout when None.
    """
    _check_inputs(cfg, tokens_BT, segment_ids, mask)
    b, t = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    segment_ids = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
    valid_BT = jnp.ones((b, t), bool) if mask is None else mask
    embd_key = layers_key = None
    if key is not None:
        embd_key, layers_key = jax.random.split(key)
    x_BTD = embed(cfg, params, tokens_BT, segment_ids, positions_BT, embd_key)
    x_BTD = run_encoder(
        cfg, params["h"], x_BTD, positions_BT, padding_mask(valid_BT, t), layers_key
    )
    if cfg.ln_placement == "pre":
        x_BTD = layers.layer_norm(params["ln_f"], x_BTD, cfg.layer_norm_eps)
    return x_BTD


def mlm_head(cfg: EncoderConfig, params: Params, x_BTD) -> Float[Array, "B T V"]:
    """BERT's prediction head: transform (dense, activation, LN), then the tied
    word embeddings plus a per-token bias; float32 logits."""
    p, dt = params["mlm"], cfg.compute_dtype
    h_BTD = x_BTD @ p["dense"]["kernel"].astype(dt) + p["dense"]["bias"].astype(dt)
    h_BTD = layers.layer_norm(p["ln"], ACTIVATIONS[cfg.activation](h_BTD), cfg.layer_norm_eps)
    return model.unembed(cfg, params, h_BTD) + p["bias"].astype(jnp.float32)


def forward(
    cfg: EncoderConfig,
    params: Params,
    tokens_BT: Int[Array, "B T"],
    *,
    segment_ids: Int[Array, "B T"] | None = None,
    mask: Int[Array, "B T"] | None = None,
    key: jax.Array | None = None,
) -> Float[Array, "B T V"]:
    """Masked-LM logits (float32) at every position (`BertForMaskedLM`'s output)."""
    x_BTD = hidden_states(cfg, params, tokens_BT, segment_ids=segment_ids, mask=mask, key=key)
    return constrain(mlm_head(cfg, params, x_BTD), ("batch", "seq", "vocab"))


# ------------------------------------------------------------------ the objective


def mask_tokens(
    tokens_BT: Int[Array, "B T"],
    key: jax.Array,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids=(),
    rate: float = 0.15,
) -> tuple[Int[Array, "B T"], Int[Array, "B T"], Int[Array, "B T"]]:
    """BERT's corruption as a pure data transform: (inputs, targets, loss_mask).

    Each non-special token is chosen with probability `rate`; a chosen token
    becomes [MASK] 80% of the time, a uniformly random token 10%, and stays
    itself 10% (so the model cannot learn that only [MASK] needs predicting).
    `targets` are the original tokens; `loss_mask` is 1 exactly on the chosen
    positions. Put the pad id in `special_ids` so padding is never chosen.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}.")
    k_choose, k_kind, k_random = jax.random.split(key, 3)
    tokens_BT = jnp.asarray(tokens_BT)
    special_BT = jnp.zeros(tokens_BT.shape, bool)
    for s in special_ids:
        special_BT |= tokens_BT == s
    chosen_BT = jax.random.bernoulli(k_choose, rate, tokens_BT.shape) & ~special_BT
    u_BT = jax.random.uniform(k_kind, tokens_BT.shape)
    random_BT = jax.random.randint(k_random, tokens_BT.shape, 0, vocab_size, tokens_BT.dtype)
    corrupted_BT = jnp.where(u_BT < 0.8, mask_id, jnp.where(u_BT < 0.9, random_BT, tokens_BT))
    inputs_BT = jnp.where(chosen_BT, corrupted_BT, tokens_BT).astype(tokens_BT.dtype)
    return inputs_BT, tokens_BT, chosen_BT.astype(jnp.int32)


def mlm_loss(
    logits_BTV: Float[Array, "B T V"],
    targets_BT: Int[Array, "B T"],
    loss_mask_BT: Int[Array, "B T"],
) -> Float[Array, ""]:
    """Mean cross-entropy over the chosen positions only (0 when none are chosen)."""
    nll_BT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), targets_BT
    )
    w_BT = loss_mask_BT.astype(jnp.float32)
    return (nll_BT * w_BT).sum() / jnp.maximum(w_BT.sum(), 1.0)
