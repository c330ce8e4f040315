"""What differs per model kind, in one place: a `Family` per config class.

Three families share one training path: the decoder (GPT, `ModelConfig`), the
encoder (BERT, `EncoderConfig`) and the encoder–decoder (the original
Transformer, `Seq2SeqConfig`). `family_of(cfg)` looks the family up from the
config's type, once; everything that differs is a field of the `Family` it
returns, so no other module asks which family it holds. In gin, pick one with
`model_config.family = 'encoder'` and bind that class's fields
(`EncoderConfig.d_model = 128`, ...).

Batches (numpy, leading dim B; every leaf is 2-D so one batch sharding fits all):

  decoder   tokens (B, T+1) [, loss_mask (B, T)]                 next-token loss
  encoder   tokens, targets, loss_mask (B, T) [, mask (B, T)]    masked-LM loss on loss_mask
  seq2seq   src, src_mask (B, S), tgt_in, tgt, tgt_mask (B, T)   label-smoothed loss on tgt_mask

A corpus yields decoder windows; `from_windows` turns them into the family's
objective on the host: BERT's 80/10/10 masking, or a prefix-to-suffix split
for the encoder–decoder (the first half of a window is the source, the
decoder continues it). Task datasets (`gptjax.data.numbers`) emit the format
a family names (`Family.task_format`) directly, and so does the encoder–decoder's
other corpus objective, T5's span corruption (`DataConfig.seq2seq_objective =
'span_corruption'`, `gptjax.data.span_corruption`): a token transform, so data/
owns it (models never import data) and its batches pass `from_windows` unchanged.

Adding a fourth family (say, a mixture-of-experts decoder) is a model module,
one `Family(...)` below and one row in each table keyed by Family
(`gptjax.inference.preview.PREVIEWS`, `gptjax.evals.exact_match.PREDICTORS`,
`gptjax.research.finetune.TRUNKS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.config import EncoderConfig, ModelConfig, Seq2SeqConfig
from gptjax.models import bert, flops, gpt, layers, transformer

TokenLosses = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Family:
    """One model kind: its functions and what it can do.

    Attributes:
      name: how workdirs and gin name it (`model_config.family`).
      config_class: the config dataclass that selects it.
      init_params, param_axes: `(cfg, key) -> params` and `(cfg) -> logical axes`.
      token_losses: `(cfg, params, batch, key) -> (training loss, plain NLL, weights)`,
        each (B, T): the objective, per target token.
      from_windows: `(cfg, tokens_BT, tokenizer, key) -> batch`: the T tokens of a corpus
        batch's decoder windows as this family's objective (host side); None when the
        windows are the objective already (the decoder).
      forward_flops: `(cfg, seq_len) -> int`: matmul FLOPs of one forward pass over a
        corpus window of seq_len tokens.
      task_format: the `gptjax.data.numbers` batch format it trains on.
      causal_lm: it has a next-token LM over `tokens` (GPT-1's auxiliary loss, PPO-ptx,
        the GPT-3 batch ramp's padded rows, sampling with `gptjax.inference.sampling`).
      generates: it writes text (the decoder continues a prompt, the encoder–decoder
        decodes a source); the encoder only fills in masks.
    """

    name: str
    config_class: type
    init_params: Callable
    param_axes: Callable
    token_losses: TokenLosses
    from_windows: Callable | None
    forward_flops: Callable[[ModelConfig, int], int]
    task_format: str
    causal_lm: bool
    generates: bool


# ---------------------------------------------------------------- objectives


def _token_nll(logits_BTV, targets_BT) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BTV.astype(jnp.float32), targets_BT
    )


def _decoder_losses(cfg: ModelConfig, params, batch: dict, key=None):
    tokens = batch["tokens"]
    nll_BT = _token_nll(gpt.forward(cfg, params, tokens[:, :-1], key=key), tokens[:, 1:])
    w_BT = batch.get("loss_mask", jnp.ones(nll_BT.shape, jnp.float32))
    return nll_BT, nll_BT, w_BT


def _encoder_losses(cfg: EncoderConfig, params, batch: dict, key=None):
    logits_BTV = bert.forward(
        cfg,
        params,
        batch["tokens"],
        mask=batch.get("mask"),
        segment_ids=batch.get("segment_ids"),
        key=key,
    )
    nll_BT = _token_nll(logits_BTV, batch["targets"])
    return nll_BT, nll_BT, batch["loss_mask"]


def _seq2seq_losses(cfg: Seq2SeqConfig, params, batch: dict, key=None):
    logits_BTV = transformer.forward(
        cfg, params, batch["src"], batch["tgt_in"], src_mask=batch.get("src_mask"), key=key
    )
    loss_BT, nll_BT = transformer.label_smoothed_token_losses(
        logits_BTV, batch["tgt"], cfg.label_smoothing
    )
    return loss_BT, nll_BT, batch["tgt_mask"]


# ----------------------------------------------------------- corpus windows


def _is_window_batch(batch: dict) -> bool:
    """A corpus batch (decoder windows), not one already in a family's task format."""
    return not set(batch) - {"tokens", "loss_mask"}


def _encoder_windows(cfg: EncoderConfig, tokens_BT: np.ndarray, tokenizer, key: jax.Array) -> dict:
    """BERT's 80/10/10 masking of the window's T tokens (special ids are never chosen)."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        inputs, targets, chosen = bert.mask_tokens(
            tokens_BT,
            key,
            mask_id=tokenizer.mask_id,
            vocab_size=tokenizer.vocab_size,
            special_ids=tuple(sorted(tokenizer.special_ids)),
        )
    return {
        "tokens": np.asarray(inputs, np.int32),
        "targets": np.asarray(targets, np.int32),
        "loss_mask": np.asarray(chosen, np.float32),
    }


def _seq2seq_windows(cfg: Seq2SeqConfig, tokens_BT: np.ndarray, tokenizer, key) -> dict:
    """The first T // 2 tokens are the source; the decoder produces the rest."""
    src_len, _ = flops.source_target_lengths(tokens_BT.shape[1])
    src, tgt = tokens_BT[:, :src_len], tokens_BT[:, src_len:]
    tgt_in = np.concatenate([np.full_like(tgt[:, :1], tokenizer.start_id), tgt[:, :-1]], 1)
    return {
        "src": src.astype(np.int32),
        "src_mask": np.ones(src.shape, np.int32),
        "tgt_in": tgt_in.astype(np.int32),
        "tgt": tgt.astype(np.int32),
        "tgt_mask": np.ones(tgt.shape, np.float32),
    }


# ------------------------------------------------------------------ families

DECODER = Family(
    name="decoder",
    config_class=ModelConfig,
    init_params=gpt.init_params,
    param_axes=gpt.param_axes,
    token_losses=_decoder_losses,
    from_windows=None,
    forward_flops=flops.decoder_forward,
    task_format="causal",
    causal_lm=True,
    generates=True,
)

ENCODER = Family(
    name="encoder",
    config_class=EncoderConfig,
    init_params=bert.init_params,
    param_axes=bert.param_axes,
    token_losses=_encoder_losses,
    from_windows=_encoder_windows,
    forward_flops=flops.encoder_forward,
    task_format="slots",
    causal_lm=False,
    generates=False,
)

SEQ2SEQ = Family(
    name="seq2seq",
    config_class=Seq2SeqConfig,
    init_params=transformer.init_params,
    param_axes=transformer.param_axes,
    token_losses=_seq2seq_losses,
    from_windows=_seq2seq_windows,
    forward_flops=lambda cfg, t: flops.encoder_decoder_forward(
        cfg, *flops.source_target_lengths(t)
    ),
    task_format="pair",
    causal_lm=False,
    generates=True,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (DECODER, ENCODER, SEQ2SEQ)}
_BY_CLASS: dict[type, Family] = {f.config_class: f for f in FAMILIES.values()}


def family_of(cfg: ModelConfig) -> Family:
    """The family of a config, from its type (the nearest registered class in its MRO)."""
    for cls in type(cfg).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    raise TypeError(
        f"{type(cfg).__name__} is not a model config; use one of "
        f"{', '.join(c.__name__ for c in _BY_CLASS)}."
    )


def by_name(name: str) -> Family:
    """The family a workdir or gin file names ('decoder', 'encoder' or 'seq2seq')."""
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is not one of {tuple(FAMILIES)}.")
    return FAMILIES[name]


@gin.configurable
def model_config(family: str = "decoder") -> ModelConfig:
    """The run's model config: that family's class, built from its gin bindings."""
    return by_name(family).config_class()


# --------------------------------------------------- the family's functions


def init_params(cfg: ModelConfig, key: jax.Array) -> layers.Params:
    return family_of(cfg).init_params(cfg, key)


def param_axes(cfg: ModelConfig) -> layers.Params:
    return family_of(cfg).param_axes(cfg)


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the family's `init_params`, from shapes alone."""
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def loss_sums(
    cfg: ModelConfig, params, batch: dict, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(the family's training loss summed over the weighted target tokens, their weight).

    decoder: next-token cross-entropy (over `loss_mask` when present); encoder:
    masked-LM cross-entropy on the chosen positions; seq2seq: label-smoothed
    cross-entropy (`cfg.label_smoothing`) over real target tokens. The weight
    depends on the batch alone, so a trainer can divide by the whole batch's
    weight however it is cut into microbatches (`training.step.make_update`).
    """
    loss_BT, _, w_BT = family_of(cfg).token_losses(cfg, params, batch, key)
    w_BT = w_BT.astype(jnp.float32)
    return (loss_BT * w_BT).sum(), w_BT.sum()


def loss(cfg: ModelConfig, params, batch: dict, key: jax.Array | None = None) -> jax.Array:
    """The family's training loss, a mean over the weighted target tokens (`loss_sums`)."""
    total, weight = loss_sums(cfg, params, batch, key)
    return total / jnp.maximum(weight, 1.0)


def eval_sums(cfg: ModelConfig, params, batch: dict) -> dict:
    """Summed plain NLL and the number of scored tokens (eval loss = their ratio)."""
    _, nll_BT, w_BT = family_of(cfg).token_losses(cfg, params, batch)
    w_BT = w_BT.astype(jnp.float32)
    return {"loss_sum": (nll_BT * w_BT).sum(), "tokens": w_BT.sum()}


def from_windows(cfg: ModelConfig, batch: dict, tokenizer, key: jax.Array) -> dict:
    """A corpus batch (`tokens` (B, T+1)) as the family's objective, on the host.

    decoder: unchanged. encoder: `bert.mask_tokens` on the first T tokens. seq2seq:
    the first T // 2 tokens are the source and the decoder produces the rest. A
    batch already in a task format (a task dataset's, or span-corrupted windows from
    the data pipeline) passes through. `key` makes the masking
    reproducible (the loop folds in the step).
    """
    fam = family_of(cfg)
    if fam.from_windows is None or not _is_window_batch(batch):
        return batch  # the windows are the objective, or a task batch already in its format
    return fam.from_windows(cfg, np.asarray(batch["tokens"])[:, :-1], tokenizer, key)


def batch_rows(batch: dict) -> int:
    """B of any family's batch."""
    return next(iter(batch.values())).shape[0]
