"""Model FLOPs of one forward pass, matmul by matmul, from a config's shapes.

Every matmul counts 2 m k n. Not counted: embedding and position lookups (a
gather, not a matmul; an untied lm_head is counted once, as the output matmul it
is), LayerNorm, softmax, activations and biases. Attention scores and values are
2 * 2 * T * d per token and layer, with causal attention counted whole (every
query over all T keys: PaLM's convention, `ATTENTION_CONVENTION`; MaxText halves
it) and a GPT-3 banded layer over its `local_window`. Each model family's
`forward_flops` (`gptjax.models.family`) is one of the functions at the bottom.
"""

from __future__ import annotations

from gptjax.config import ModelConfig, is_local_layer

ATTENTION_CONVENTION = "PaLM convention, causal attention counted whole"


def _matmul(m: int, k: int, n: int) -> int:
    """Forward FLOPs of an (m, k) @ (k, n) matmul: a multiply and an add per term."""
    return 2 * m * k * n


def _self_attention(d: int, t: int, span: int) -> int:
    """t queries, each over `span` keys; N heads of H with N * H = d, so the heads'
    scores and values together are one (t, d) x (d, span) and (t, span) x (span, d)."""
    return (
        _matmul(t, d, 3 * d)  # c_attn: q, k, v
        + _matmul(t, d, span)
        + _matmul(t, span, d)  # q k^T, then p v
        + _matmul(t, d, d)
    )  # c_proj


def _cross_attention(d: int, t: int, s: int) -> int:
    """t decoder queries over s encoder keys; k, v are projected once per source token."""
    return (
        _matmul(t, d, d)
        + _matmul(s, d, 2 * d)  # q; k, v
        + _matmul(t, d, s)
        + _matmul(t, s, d)  # q k^T, then p v
        + _matmul(t, d, d)
    )  # c_proj


def _mlp(d: int, f: int, t: int) -> int:
    return _matmul(t, d, f) + _matmul(t, f, d)


def _key_span(cfg: ModelConfig, layer: int, t: int) -> int:
    """Keys a query sees, counted whole: all T (causal), or the band of a GPT-3 local layer."""
    return min(t, cfg.local_window) if is_local_layer(cfg, layer) else t


def decoder_forward(cfg: ModelConfig, t: int) -> int:
    """GPT: t tokens through causal layers (banded ones over their window), then the unembedding."""
    d, f = cfg.d_model, cfg.ff_dim
    layers = sum(
        _self_attention(d, t, _key_span(cfg, i, t)) + _mlp(d, f, t) for i in range(cfg.n_layers)
    )
    return layers + _matmul(t, d, cfg.vocab_size)  # the unembedding, tied or not


def encoder_forward(cfg: ModelConfig, t: int) -> int:
    """BERT: bidirectional layers, then the MLM head at every position (the loss reads
    only the masked ones, but `encoder.forward` computes all T): transform, tied unembed."""
    d, f = cfg.d_model, cfg.ff_dim
    layers = cfg.n_layers * (_self_attention(d, t, t) + _mlp(d, f, t))
    return layers + _matmul(t, d, d) + _matmul(t, d, cfg.vocab_size)


def encoder_decoder_forward(cfg: ModelConfig, s: int, u: int) -> int:
    """s source tokens through the encoder; u target tokens through the decoder's
    self-attention, cross-attention and MLP; logits on the target side only."""
    d, f = cfg.d_model, cfg.ff_dim
    encoder = cfg.n_layers * (_self_attention(d, s, s) + _mlp(d, f, s))
    decoder = cfg.decoder_layers * (
        _self_attention(d, u, u) + _cross_attention(d, u, s) + _mlp(d, f, u)
    )
    return encoder + decoder + _matmul(u, d, cfg.vocab_size)


def source_target_lengths(seq_len: int) -> tuple[int, int]:
    """How a corpus window of seq_len tokens splits for seq2seq (`family.from_windows`)."""
    return seq_len // 2, seq_len - seq_len // 2
