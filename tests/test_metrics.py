"""FLOPs per token for every model family, per-device peaks by exact device kind, MFU.

The FLOP counts here are written out by hand from the layer shapes, as
2 * m * k * n per (m, k) @ (k, n) matmul and x3 for forward + backward, so
they are an independent count of `metrics.flops_per_token`, not a second
call to it. Dimensions are small and distinct so a swapped shape cannot pass.
"""

import logging
import math
import types

import jax
import jax.numpy as jnp
import pytest

from gptjax.config import PRESETS, EncoderConfig, ModelConfig, Seq2SeqConfig
from gptjax.models import family, flops
from gptjax.training import metrics

L, D, N, F, V = 2, 12, 3, 20, 50  # layers, model, heads, feed-forward, vocab
SMALL = dict(n_layers=L, d_model=D, n_heads=N, d_ff=F, vocab_size=V, max_len=16)


def _device(kind: str, platform: str = "gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


# ------------------------------------------------------------------ peak FLOP/s

TABLE = [  # (device_kind as JAX reports it, platform, dense bf16 peak per JAX device)
    ("TPU v2", "tpu", 45e12 / 2),  # two devices (TensorCores) per chip
    ("TPU v3", "tpu", 123e12 / 2),
    ("TPU v4", "tpu", 275e12),
    ("TPU v5", "tpu", 459e12),  # v5p
    ("TPU v5 lite", "tpu", 197e12),  # v5e
    ("TPU v6 lite", "tpu", 918e12),  # v6e
    ("NVIDIA H100 80GB HBM3", "gpu", 989e12),  # SXM
    ("NVIDIA H100 PCIe", "gpu", 756e12),
    ("NVIDIA H100 NVL", "gpu", 835e12),
    ("NVIDIA H200", "gpu", 989e12),
    ("NVIDIA H200 NVL", "gpu", 835e12),
    ("NVIDIA GH200 480GB", "gpu", 989e12),
    ("NVIDIA B200", "gpu", 2250e12),
    ("NVIDIA A100-SXM4-40GB", "gpu", 312e12),
    ("NVIDIA A100-SXM4-80GB", "gpu", 312e12),
    ("NVIDIA A100-PCIE-40GB", "gpu", 312e12),
    ("NVIDIA A100 80GB PCIe", "gpu", 312e12),
    ("NVIDIA L40S", "gpu", 362e12),
    ("NVIDIA L40", "gpu", 181e12),
    ("NVIDIA L4", "gpu", 121e12),
    ("NVIDIA A10G", "gpu", 70e12),
    ("NVIDIA A10", "gpu", 125e12),
    ("Tesla V100-SXM2-16GB", "gpu", 125e12),  # fp16 tensor cores: V100 has no bf16
    ("Tesla V100-SXM2-32GB", "gpu", 125e12),
    ("Tesla V100-PCIE-16GB", "gpu", 112e12),
    ("Tesla V100-PCIE-32GB", "gpu", 112e12),
]


@pytest.mark.parametrize("kind,platform,peak", TABLE, ids=[k for k, _, _ in TABLE])
def test_every_row_of_the_peak_table(kind, platform, peak):
    assert metrics.peak_flops(_device(kind, platform)) == pytest.approx(peak, rel=1e-3)


@pytest.mark.parametrize(
    "kind,expected,not_this",
    [
        ("NVIDIA L40S", 362e12, 121e12),  # L40S is not an L4 (the old table read it as one)
        ("TPU v5", 459e12, 197e12),  # JAX's "TPU v5" is the v5p, not the v5e
        ("TPU v5 lite", 197e12, 459e12),
        ("NVIDIA H100 PCIe", 756e12, 989e12),  # PCIe is not the SXM
        ("NVIDIA H100 80GB HBM3", 989e12, 756e12),
    ],
)
def test_similar_names_get_their_own_peak(kind, expected, not_this):
    got = metrics.peak_flops(_device(kind, "tpu" if kind.startswith("TPU") else "gpu"))
    assert got == pytest.approx(expected, rel=1e-3) and got != pytest.approx(not_this, rel=1e-3)


def test_device_kind_matches_case_insensitively_after_stripping():
    assert metrics.peak_flops(_device("  nvidia h100 80gb hbm3 ")) == pytest.approx(989e12)
    assert metrics.peak_flops(_device("tpu V5 LITE", "tpu")) == pytest.approx(197e12)


@pytest.mark.parametrize(
    "kind", ["NVIDIA L4 Ultra", "TPU v5 lite pod", "H100", "NVIDIA A100", "NVIDIA GeForce RTX 4090"]
)
def test_no_substring_matching_unknown_kinds_have_no_peak(kind):
    assert metrics.peak_flops(_device(kind)) is None


def test_unknown_kind_warns_once_naming_the_override(caplog):
    kind = "Imaginary Accelerator 9000"
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert metrics.peak_flops(_device(kind)) is None
        assert metrics.peak_flops(_device(kind)) is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert kind in warnings[0].getMessage()
    assert "TrainConfig.peak_flops" in warnings[0].getMessage()


def test_cpu_has_no_made_up_peak(caplog):
    with caplog.at_level(logging.WARNING, logger=metrics.__name__):
        assert metrics.peak_flops(_device("cpu", "cpu")) is None
        assert metrics.peak_flops() is None  # the tests' default device is a CPU
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_mfu_is_none_without_a_peak_and_exact_with_one():
    cfg = ModelConfig(**SMALL)
    assert metrics.mfu(1e4, cfg, 7, 8, None) is None
    # A caller-given peak (TrainConfig.peak_flops) still gives an MFU on CPU.
    expected = 1e4 * metrics.flops_per_token(cfg, 7) / (8 * 1e9)
    assert metrics.mfu(1e4, cfg, 7, 8, 1e9) == pytest.approx(expected, rel=1e-12)


def test_measured_matmul_peak_is_a_positive_rate():
    rate = metrics.measured_matmul_peak(n=128, repeats=2)
    assert math.isfinite(rate) and rate > 1e6  # any CPU does a MFLOP/s


def test_the_attention_convention_is_named():
    assert "PaLM" in flops.ATTENTION_CONVENTION and "whole" in flops.ATTENTION_CONVENTION


# ------------------------------------------------------------- FLOPs per token


def _decoder_layer_forward(t: int, span: int) -> int:
    """One GPT layer over a sequence of t tokens whose queries each see `span` keys."""
    qkv = 2 * t * D * (3 * D)  # x_TD @ c_attn (D, 3NH), N * H = D
    scores = 2 * t * span * D  # q_TNH . k_SNH over H, for every head
    values = 2 * t * span * D  # p_NTS @ v_SNH
    proj = 2 * t * D * D  # out_TNH @ c_proj (NH, D)
    mlp = 2 * t * D * F + 2 * t * F * D  # c_fc, c_proj
    return qkv + scores + values + proj + mlp


def test_decoder_tied_hand_count():
    t = 7
    forward = L * _decoder_layer_forward(t, span=t) + 2 * t * D * V  # + the tied unembedding
    assert forward * 3 / t == 18288  # the same arithmetic, written as one number
    assert metrics.flops_per_token(ModelConfig(**SMALL), t) == 18288


def test_decoder_untied_counts_the_head_once_and_the_lookup_never():
    """Untying adds an lm_head matmul of the same shape as the tied one and makes the
    input lookup no more costly: the count does not change (6N counted V*D twice)."""
    t = 7
    untied = ModelConfig(**SMALL, tie_embeddings=False)
    assert metrics.flops_per_token(untied, t) == 18288
    assert metrics.flops_per_token(untied, t) == metrics.flops_per_token(ModelConfig(**SMALL), t)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_positions_cost_nothing(pos):
    """Position tables are added, not multiplied; rope's rotation is elementwise."""
    assert metrics.flops_per_token(ModelConfig(**SMALL, pos_embedding=pos), 7) == 18288


def test_gpt3_banded_layers_count_their_window():
    """Odd layers of gpt3_sparse see the last `local_window` keys (counted whole too)."""
    t, w = 7, 4
    cfg = ModelConfig(**SMALL, attention="gpt3_sparse", local_window=w)
    forward = _decoder_layer_forward(t, t) + _decoder_layer_forward(t, w) + 2 * t * D * V
    assert metrics.flops_per_token(cfg, t) == forward * 3 / t


def test_encoder_hand_count():
    """BERT: bidirectional layers, then the MLM transform (D x D) and the tied projection,
    at every position (the head runs on all T; the loss picks the masked ones)."""
    t = 7
    transform = 2 * t * D * D
    forward = L * _decoder_layer_forward(t, span=t) + transform + 2 * t * D * V
    assert forward * 3 / t == 19152
    assert metrics.flops_per_token(EncoderConfig(**SMALL), t) == 19152


def test_seq2seq_hand_count_with_cross_attention():
    """A window of 9 tokens: source S = 9 // 2 = 4, target U = 5 (`family.from_windows`);
    "a token" is one of the 9, so tokens/s x FLOPs/token is the loop's FLOP/s."""
    seq_len, s, u, l_enc, l_dec = 9, 4, 5, 2, 3
    cfg = Seq2SeqConfig(**SMALL | {"n_layers": l_enc}, n_decoder_layers=l_dec)
    enc_layer = (
        2 * s * D * 3 * D
        + 2 * s * s * D
        + 2 * s * s * D
        + 2 * s * D * D
        + 2 * s * D * F
        + 2 * s * F * D
    )
    dec_self = 2 * u * D * 3 * D + 2 * u * u * D + 2 * u * u * D + 2 * u * D * D
    dec_cross = (
        2 * u * D * D  # q from the decoder
        + 2 * s * D * 2 * D  # k, v from the encoder output, once per source
        + 2 * u * s * D
        + 2 * u * s * D  # scores, values over the S source keys
        + 2 * u * D * D
    )  # c_proj
    dec_mlp = 2 * u * D * F + 2 * u * F * D
    logits = 2 * u * D * V  # shared embedding as the output projection, target side only
    forward = l_enc * enc_layer + l_dec * (dec_self + dec_cross + dec_mlp) + logits
    assert forward == 78144
    assert metrics.flops_per_token(cfg, seq_len) == forward * 3 / seq_len


def test_seq2seq_counts_every_decoder_layer():
    base = PRESETS["transformer_base"]
    deeper = base.replace(n_decoder_layers=base.n_layers + 2)
    assert metrics.flops_per_token(deeper, 256) > metrics.flops_per_token(base, 256)


def test_gpt2_small_is_close_to_6n_plus_12ldt():
    """The familiar 6 N + 12 L d T (N without the position table) differs only by the
    biases and LayerNorm scales it counts as matmul weights: the convention is PaLM's."""
    cfg, t = PRESETS["gpt2_small"], 1024
    n = family.param_count(cfg) - cfg.max_len * cfg.d_model
    classic = 6 * n + 12 * cfg.n_layers * cfg.d_model * t
    assert metrics.flops_per_token(cfg, t) == pytest.approx(classic, rel=0.01)


# --------------------------------------------------------------------- writers


def test_metric_writer_leaves_out_missing_values(tmp_path):
    """An MFU of None (no known peak) is left out of the row, not written as a number."""
    writer = metrics.MetricWriter(str(tmp_path))
    writer.write(3, {"train/loss": 2.5, "mfu": None})
    writer.close()
    assert metrics.read_metrics(str(tmp_path)) == [{"step": 3, "train/loss": 2.5}]


def _xla_training_flops(cfg, batch) -> float:
    """XLA's own FLOP count of the family loss's gradient (unrolled: a scan body counts once)."""
    params = jax.eval_shape(lambda k: family.init_params(cfg, k), jax.random.key(0))
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
    grad = jax.jit(jax.grad(lambda p, b: family.loss(cfg, p, b)))
    cost = grad.lower(params, batch).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


@pytest.mark.parametrize("name", ["decoder", "encoder", "seq2seq"])
def test_counts_agree_with_xla_cost_analysis(name):
    """A second, independent check: XLA's FLOPs for the real gradient program exceed
    ours only by what we leave out on purpose (softmax, LayerNorm, activations, the loss)."""
    b, t = 2, 32
    shape = dict(
        n_layers=1, d_model=128, n_heads=4, d_ff=320, vocab_size=512, max_len=64, scan_layers=False
    )
    ones = lambda *s: jnp.ones(s, jnp.int32)  # noqa: E731
    if name == "decoder":
        cfg, batch = ModelConfig(**shape, tie_embeddings=False), {"tokens": ones(b, t + 1)}
    elif name == "encoder":
        cfg = EncoderConfig(**shape)
        batch = {"tokens": ones(b, t), "targets": ones(b, t), "loss_mask": ones(b, t)}
    else:
        cfg, (s, u) = Seq2SeqConfig(**shape, n_decoder_layers=2), (t // 2, t - t // 2)
        batch = {
            "src": ones(b, s),
            "src_mask": ones(b, s),
            "tgt_in": ones(b, u),
            "tgt": ones(b, u),
            "tgt_mask": ones(b, u),
        }
    ratio = _xla_training_flops(cfg, batch) / (metrics.flops_per_token(cfg, t) * b * t)
    assert 1.0 <= ratio < 1.1, ratio
