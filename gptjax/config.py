"""Model configuration: one frozen dataclass and a table of named presets.

A `ModelConfig` is hashable, so it is passed to jitted functions as a static
argument; fields are plain words and strings so gin files can bind them
(`ModelConfig.dtype = 'bfloat16'`). Presets follow the papers (see
REFERENCE.md); deviations from the papers' tables are commented in place.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import gin
import jax.numpy as jnp

LN_PLACEMENTS = ("pre", "post")
POS_EMBEDDINGS = ("learned", "sinusoidal", "rope")
ATTENTIONS = ("dense", "gpt3_sparse")
ATTENTION_IMPLS = ("xla", "fused", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer.

    Attributes:
      n_layers, d_model, n_heads, d_ff: the transformer's size (d_ff defaults to
        4 * d_model when None).
      vocab_size: rows of the token embedding.
      max_len: the context length (rows of the learned position table).
      ln_placement: 'pre' (GPT-2/3: LN at each sub-block input plus a final LN)
        or 'post' (GPT-1 / original Transformer: LN after each residual add).
      pos_embedding: 'learned' (GPT), 'sinusoidal' (Vaswani et al.) or 'rope'.
      attention: 'dense' or 'gpt3_sparse' (layers alternate dense and locally
        banded attention; odd layers see only the last `local_window` tokens).
      embd_dropout, attn_dropout, resid_dropout: dropout rates (GPT-2 names).
      tie_embeddings: the unembedding is wte transposed (GPT-1/2/3).
      dtype: compute dtype; params are stored in `param_dtype`. Logits,
        softmax and LayerNorm statistics are always float32.
      remat: activation checkpointing policy per layer.
      scan_layers: run the stacked layers with `lax.scan` (fast compiles) or a
        Python loop (lets XLA fuse across layers; faster on GPU and CPU); None
        (default): unrolled on CPU, scanned on accelerators (`layers.scans`).
      attention_impl: 'xla' (readable einsum reference), 'fused'
        (`jax.nn.dot_product_attention`, XLA or cuDNN picked by JAX) or 'cudnn'
        (force the cuDNN flash kernel; GPU, bf16/fp16 only).
    """

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_ff: int | None = None
    vocab_size: int = 4096
    max_len: int = 256
    ln_placement: str = "pre"
    pos_embedding: str = "learned"
    attention: str = "dense"
    local_window: int = 256
    embd_dropout: float = 0.0
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool | None = None
    attention_impl: str = "xla"

    def __post_init__(self):
        validate(self)

    @property
    def ff_dim(self) -> int:
        """The MLP width: `d_ff`, or the GPT default of four times `d_model`."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ModelConfig.{name}={value!r} is not one of {choices}.")


def validate(cfg: ModelConfig) -> None:
    """Raise a clear ValueError for a config that cannot build a model."""
    for name in ("n_layers", "d_model", "n_heads", "ff_dim", "vocab_size", "max_len"):
        if int(getattr(cfg, name)) <= 0:
            raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(cfg, name)}.")
    if cfg.d_model % cfg.n_heads:
        raise ValueError(
            f"ModelConfig.n_heads={cfg.n_heads} does not divide d_model={cfg.d_model}; "
            f"choose n_heads among the divisors of d_model (head_dim = d_model / n_heads)."
        )
    if cfg.pos_embedding == "rope" and cfg.head_dim % 2:
        raise ValueError(f"rotary positions need an even head_dim, got {cfg.head_dim}.")
    _check_choice("ln_placement", cfg.ln_placement, LN_PLACEMENTS)
    _check_choice("pos_embedding", cfg.pos_embedding, POS_EMBEDDINGS)
    _check_choice("attention", cfg.attention, ATTENTIONS)
    _check_choice("attention_impl", cfg.attention_impl, ATTENTION_IMPLS)
    _check_choice("remat", cfg.remat, REMAT_POLICIES)
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("param_dtype", cfg.param_dtype, DTYPES)
    if cfg.attention == "gpt3_sparse":
        if cfg.local_window <= 0:
            raise ValueError(f"local_window must be positive, got {cfg.local_window}.")
        if cfg.scan_layers is True and cfg.n_layers % 2:
            raise ValueError(
                "gpt3_sparse alternates dense and banded layers; with scan_layers=True "
                f"n_layers must be even (got {cfg.n_layers}); set scan_layers=False otherwise."
            )
    for name in ("embd_dropout", "attn_dropout", "resid_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(cfg, name)}.")


def is_local_layer(cfg: ModelConfig, layer: int) -> bool:
    """GPT-3 alternates dense (even) and locally banded (odd) attention layers."""
    return cfg.attention == "gpt3_sparse" and layer % 2 == 1


# ------------------------------------------------------------ the relatives

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swish")  # functions: gptjax.models.bert


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of {ACTIVATIONS}.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EncoderConfig(ModelConfig):
    """A `ModelConfig` for a bidirectional encoder; BERT's defaults.

    Being a ModelConfig, it runs through the decoder's `self_attention`,
    `run_layers`, `init_params` and sharding rules unchanged.

    Attributes (beyond ModelConfig):
      type_vocab_size: rows of the token-type (segment) table (BERT: 2).
      activation: the MLP nonlinearity, one of `ACTIVATIONS`.
    """

    ln_placement: str = "post"
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 2
    activation: str = "gelu"

    def __post_init__(self):
        super().__post_init__()
        check_activation(self.activation)
        if self.type_vocab_size <= 0:
            raise ValueError(f"type_vocab_size must be positive, got {self.type_vocab_size}.")
        if self.attention != "dense":
            raise ValueError(
                "the encoder's attention is bidirectional; banded 'gpt3_sparse' "
                "layers are causal by construction "
                f"(got attention={self.attention!r})."
            )


def _bert(n_layers, d_model, n_heads) -> EncoderConfig:
    return EncoderConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        vocab_size=30522,
        max_len=512,
        embd_dropout=0.1,
        attn_dropout=0.1,
        resid_dropout=0.1,
    )


_ENCODER_PRESETS: dict[str, ModelConfig] = {
    "bert_base": _bert(12, 768, 12),  # 109,514,298 params (BertForMaskedLM, tied)
    "bert_large": _bert(24, 1024, 16),  # 335,174,458
    # Nano sizes for CPU work and tests (vocab matches a 4k BPE tokenizer).
    "nano_bert_tiny": EncoderConfig(
        n_layers=2, d_model=64, n_heads=4, vocab_size=4096, max_len=128
    ),
    "nano_bert_small": EncoderConfig(
        n_layers=4, d_model=128, n_heads=4, vocab_size=4096, max_len=256
    ),
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(ModelConfig):
    """A `ModelConfig` for the encoder–decoder; `n_layers` is the encoder's depth.

    Attributes (beyond ModelConfig):
      n_decoder_layers: decoder depth (None: same as the encoder).
      activation: MLP nonlinearity (`ACTIVATIONS`; the paper: relu).
      scale_embedding: multiply token embeddings by sqrt(d_model) (paper, Marian).
      label_smoothing: the training loss's eps_ls in [0, 1) (the paper: 0.1).
    """

    ln_placement: str = "post"
    pos_embedding: str = "sinusoidal"
    n_decoder_layers: int | None = None
    activation: str = "relu"
    scale_embedding: bool = True
    label_smoothing: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        check_activation(self.activation)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.pos_embedding not in ("sinusoidal", "learned"):
            raise ValueError(
                "seq2seq positions are 'sinusoidal' or 'learned', got "
                f"{self.pos_embedding!r} (rotary has no meaning across attention)."
            )
        if self.attention != "dense":
            raise ValueError(f"seq2seq attention must be 'dense', got {self.attention!r}.")
        if self.decoder_layers <= 0:
            raise ValueError(f"n_decoder_layers must be positive, got {self.n_decoder_layers}.")

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0


_SEQ2SEQ_PRESETS: dict[str, ModelConfig] = {
    # Transformer base (Vaswani et al. 2017, Table 3): 6+6 layers, 512 wide, 8 heads, d_ff
    # 2048, P_drop 0.1, a shared 37k BPE vocabulary.      63,119,496 params (paper: 65M)
    "transformer_base": Seq2SeqConfig(
        n_layers=6,
        d_model=512,
        n_heads=8,
        d_ff=2048,
        vocab_size=37000,
        max_len=512,
        embd_dropout=0.1,
        attn_dropout=0.1,
        resid_dropout=0.1,
    ),
    "transformer_big": Seq2SeqConfig(
        n_layers=6,
        d_model=1024,
        n_heads=16,
        d_ff=4096,
        vocab_size=37000,
        max_len=512,
        embd_dropout=0.3,
        attn_dropout=0.3,
        resid_dropout=0.3,
    ),  # 214,282,376
    # Nano sizes for CPU work and tests.
    "nano_transformer_tiny": Seq2SeqConfig(
        n_layers=2, d_model=64, n_heads=4, d_ff=256, vocab_size=4096, max_len=128
    ),  # 499,712
    "nano_transformer_small": Seq2SeqConfig(
        n_layers=3, d_model=128, n_heads=4, d_ff=512, vocab_size=4096, max_len=256
    ),  # 1,916,928
}


# ------------------------------------------------------------------ presets


def _gpt2(n_layers, d_model, n_heads) -> ModelConfig:
    return ModelConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        vocab_size=50257,
        max_len=1024,
        embd_dropout=0.1,
        attn_dropout=0.1,
        resid_dropout=0.1,
    )


def _gpt3(n_layers, d_model, n_heads) -> ModelConfig:
    # Dropout: the GPT-3 paper does not state it; modern large-scale practice is 0.
    # local_window: the paper cites the Sparse Transformer without the band
    # width; 256 is our choice (an eighth of the 2048 context).
    return ModelConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        vocab_size=50257,
        max_len=2048,
        attention="gpt3_sparse",
        local_window=256,
    )


PRESETS: dict[str, ModelConfig] = {
    # GPT-1: post-LN, BPE vocab 40,478, 512 context.                 116,534,784 params
    "gpt1": ModelConfig(
        n_layers=12,
        d_model=768,
        n_heads=12,
        vocab_size=40478,
        max_len=512,
        ln_placement="post",
        embd_dropout=0.1,
        attn_dropout=0.1,
        resid_dropout=0.1,
    ),
    "gpt2_small": _gpt2(12, 768, 12),  # 124,439,808 params
    "gpt2_medium": _gpt2(24, 1024, 16),  # 354,823,168
    "gpt2_large": _gpt2(36, 1280, 20),  # 774,030,080
    "gpt2_xl": _gpt2(48, 1600, 25),  # 1,557,611,200
    # GPT-3 (Brown et al. 2020, Table 2.1).
    "gpt3_small": _gpt3(12, 768, 12),  # 125M
    "gpt3_medium": _gpt3(24, 1024, 16),  # 350M
    "gpt3_large": _gpt3(24, 1536, 16),  # 760M, d_head 96
    # The table lists 24 heads of 128 for XL, but 24 * 128 = 3072 != 2048 and would
    # give 1.5B parameters; 16 heads of 128 keeps d_head and the stated 1.3B.
    "gpt3_xl": _gpt3(24, 2048, 16),  # 1.3B
    "gpt3_2.7b": _gpt3(32, 2560, 32),  # 2.7B, d_head 80
    "gpt3_6.7b": _gpt3(32, 4096, 32),  # 6.7B
    # The table's d_model 5140 is not 40 heads * 128; we use 5120 (12.9B parameters).
    "gpt3_13b": _gpt3(40, 5120, 40),  # 13B
    "gpt3_175b": _gpt3(96, 12288, 96),  # 174,604,259,328 params
    # Nano sizes for CPU work and tests (vocab matches a 4k BPE tokenizer).
    "nano_tiny": ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=4096, max_len=128),
    "nano_small": ModelConfig(n_layers=4, d_model=128, n_heads=4, vocab_size=4096, max_len=256),
    "nano_medium": ModelConfig(n_layers=6, d_model=256, n_heads=8, vocab_size=4096, max_len=512),
    **_ENCODER_PRESETS,
    **_SEQ2SEQ_PRESETS,
}


@gin.configurable
def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name (any family), with optional field overrides.

    `get_preset('gpt2_small', dtype='bfloat16')`; `get_preset('bert_base')` is an EncoderConfig.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
