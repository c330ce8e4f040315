"""Three model families on one training path: decoder (GPT), encoder (BERT), seq2seq.

The config's type picks the family — `ModelConfig` (decoder-only GPT),
`EncoderConfig` (BERT) or `Seq2SeqConfig` (the original
Transformer) — and this module maps each to its init, logical axes, training
loss and eval sums, so `train.py`, `sharding.py` and the loop stay
family-agnostic. In gin, pick one with `model_config.family = 'encoder'` and
bind that class's fields (`EncoderConfig.d_model = 128`, ...).

Batches (numpy, leading dim B; every leaf is 2-D so one batch sharding fits all):

  decoder   tokens (B, T+1) [, loss_mask (B, T)]                 next-token loss
  encoder   tokens, targets, loss_mask (B, T) [, mask (B, T)]    masked-LM loss on loss_mask
  seq2seq   src, src_mask (B, S), tgt_in, tgt, tgt_mask (B, T)   label-smoothed loss on tgt_mask

A corpus yields decoder windows; `from_windows` turns them into the family's
objective on the host: BERT's 80/10/10 masking, or a prefix-to-suffix split
for the encoder–decoder (the first half of a window is the source, the
decoder continues it). Task datasets (`gptjax.data.numbers`) emit each
family's format directly.
"""

from __future__ import annotations

from typing import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.models import bert as encoder

from gptjax.models import gpt as model

from gptjax.models import transformer as seq2seq

from gptjax.inference import decoding as seq2seq_decode
from gptjax.config import ModelConfig
from gptjax.config import EncoderConfig, Seq2SeqConfig

FAMILIES = ("decoder", "encoder", "seq2seq")
_CLASSES = {"decoder": ModelConfig, "encoder": EncoderConfig,
            "seq2seq": Seq2SeqConfig}


def family_of(cfg: ModelConfig) -> str:
    """'seq2seq', 'encoder' or 'decoder', from the config's type."""
    if isinstance(cfg, Seq2SeqConfig):
        return "seq2seq"
    if isinstance(cfg, EncoderConfig):
        return "encoder"
    return "decoder"


def config_class(family: str) -> type:
    if family not in _CLASSES:
        raise ValueError(f"model family {family!r} is not one of {FAMILIES}.")
    return _CLASSES[family]


@gin.configurable
def model_config(family: str = "decoder") -> ModelConfig:
    """The run's model config: that family's class, built from its gin bindings."""
    return config_class(family)()


def _module(cfg: ModelConfig):
    return {"decoder": model, "encoder": encoder, "seq2seq": seq2seq}[family_of(cfg)]


def init_params(cfg: ModelConfig, key: jax.Array) -> model.Params:
    return _module(cfg).init_params(cfg, key)


def param_axes(cfg: ModelConfig) -> model.Params:
    return _module(cfg).param_axes(cfg)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the family's `init_params`, from shapes alone."""
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


# ---------------------------------------------------------------- objectives


def _token_nll(logits_BTV, targets_BT) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                           targets_BT)


def _token_losses(cfg: ModelConfig, params, batch: dict, key=None):
    """(per-token training loss, per-token plain NLL, weights), each (B, T).

    The training loss is the NLL, except the encoder–decoder's label-smoothed one;
    dropout runs when `key` is given.
    """
    family = family_of(cfg)
    if family == "decoder":
        tokens = batch["tokens"]
        nll_BT = _token_nll(model.forward(cfg, params, tokens[:, :-1], key=key), tokens[:, 1:])
        w_BT = batch.get("loss_mask", jnp.ones(nll_BT.shape, jnp.float32))
        return nll_BT, nll_BT, w_BT
    if family == "encoder":
        logits_BTV = encoder.forward(cfg, params, batch["tokens"], mask=batch.get("mask"),
                                     segment_ids=batch.get("segment_ids"), key=key)
        nll_BT = _token_nll(logits_BTV, batch["targets"])
        return nll_BT, nll_BT, batch["loss_mask"]
    logits_BTV = seq2seq.forward(cfg, params, batch["src"], batch["tgt_in"],
                                 src_mask=batch.get("src_mask"), key=key)
    loss_BT, nll_BT = seq2seq.label_smoothed_token_losses(logits_BTV, batch["tgt"],
                                                          cfg.label_smoothing)
    return loss_BT, nll_BT, batch["tgt_mask"]


def loss_sums(cfg: ModelConfig, params, batch: dict,
              key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(the family's training loss summed over the weighted target tokens, their weight).

    decoder: next-token cross-entropy (over `loss_mask` when present); encoder:
    masked-LM cross-entropy on the chosen positions; seq2seq: label-smoothed
    cross-entropy (`cfg.label_smoothing`) over real target tokens. The weight
    depends on the batch alone, so a trainer can divide by the whole batch's
    weight however it is cut into microbatches (`train.make_update`).
    """
    loss_BT, _, w_BT = _token_losses(cfg, params, batch, key)
    w_BT = w_BT.astype(jnp.float32)
    return (loss_BT * w_BT).sum(), w_BT.sum()


def loss(cfg: ModelConfig, params, batch: dict, key: jax.Array | None = None) -> jax.Array:
    """The family's training loss, a mean over the weighted target tokens (`loss_sums`)."""
    total, weight = loss_sums(cfg, params, batch, key)
    return total / jnp.maximum(weight, 1.0)


def eval_sums(cfg: ModelConfig, params, batch: dict) -> dict:
    """Summed plain NLL and the number of scored tokens (eval loss = their ratio)."""
    _, nll_BT, w_BT = _token_losses(cfg, params, batch)
    w_BT = w_BT.astype(jnp.float32)
    return {"loss_sum": (nll_BT * w_BT).sum(), "tokens": w_BT.sum()}


# ----------------------------------------------------------- corpus windows


def from_windows(cfg: ModelConfig, batch: dict, tokenizer, key: jax.Array) -> dict:
    """A corpus batch (`tokens` (B, T+1)) as the family's objective, on the host.

    decoder: unchanged. encoder: `encoder.mask_tokens` on the first T tokens
    (special ids such as the document separator are never chosen). seq2seq: the
    first T // 2 tokens are the source and the decoder produces the rest.
    `key` makes the masking reproducible (the loop folds in the step).
    """
    family = family_of(cfg)
    if family == "decoder" or set(batch) - {"tokens", "loss_mask"}:
        return batch  # a decoder batch, or already in the family's format (a task dataset)
    tokens_BT = np.asarray(batch["tokens"])[:, :-1]
    if family == "encoder":
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            inputs, targets, chosen = encoder.mask_tokens(
                tokens_BT, key, mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                special_ids=tuple(sorted(tokenizer.special_ids)))
        return {"tokens": np.asarray(inputs, np.int32), "targets": np.asarray(targets, np.int32),
                "loss_mask": np.asarray(chosen, np.float32)}
    half = tokens_BT.shape[1] // 2
    src, tgt = tokens_BT[:, :half], tokens_BT[:, half:]
    tgt_in = np.concatenate([np.full_like(tgt[:, :1], tokenizer.start_id), tgt[:, :-1]], 1)
    return {"src": src.astype(np.int32), "src_mask": np.ones(src.shape, np.int32),
            "tgt_in": tgt_in.astype(np.int32), "tgt": tgt.astype(np.int32),
            "tgt_mask": np.ones(tgt.shape, np.float32)}


def batch_rows(batch: dict) -> int:
    """B of any family's batch."""
    return next(iter(batch.values())).shape[0]


# ------------------------------------------------------------------ preview

_encoder_forward = jax.jit(encoder.forward, static_argnums=0)  # traced once per config


def preview(cfg: ModelConfig, params, tokenizer, prompt: str, n_tokens: int, seed: int,
            generate: Callable) -> str:
    """A short text from the current params, shown during training.

    decoder: `generate` (the loop's sampler) continues the prompt; seq2seq:
    greedy decoding with the prompt as the source; encoder: the prompt with
    every fourth token masked, filled in by the masked-LM head.
    """
    family = family_of(cfg)
    if family == "decoder":
        return generate(cfg, params, tokenizer, prompt, n_tokens, seed)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    ids = ids[-min(cfg.max_len, 64):]
    if family == "seq2seq":
        out = seq2seq_decode.greedy(cfg, params, jnp.asarray([ids], jnp.int32),
                                    start_id=tokenizer.start_id, eos_id=tokenizer.eos_id,
                                    max_len=min(n_tokens, cfg.max_len), pad_id=tokenizer.pad_id)
        return f"{prompt} => {tokenizer.decode(np.asarray(out[0]).tolist())}"
    tokens = np.asarray([ids], np.int32)
    masked = tokens.copy()
    masked[:, 1::4] = tokenizer.mask_id
    logits = _encoder_forward(cfg, params, jnp.asarray(masked))
    filled = np.asarray(jnp.argmax(logits, -1))
    filled = np.where(masked == tokenizer.mask_id, filled, tokens)
    show = lambda row: "".join("[MASK]" if i == tokenizer.mask_id else tokenizer.decode([i])  # noqa: E731
                               for i in row.tolist())
    return f"masked: {show(masked[0])}\nfilled: {show(filled[0])}"
