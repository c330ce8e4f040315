"""The BERT-style encoder: bidirectional by gradient, padding inert, MLM masking rates."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import PRESETS, EncoderConfig, get_preset
from gptjax.models import bert as encoder

# Odd sizes so a wrong transpose or axis cannot pass.
CFG = EncoderConfig(
    n_layers=3, d_model=35, n_heads=5, d_ff=47, vocab_size=97, max_len=29, type_vocab_size=3
)


# Jitted once per shape: eager calls would recompile the layer scan every time.
forward = jax.jit(encoder.forward, static_argnums=0)


@functools.cache  # init is eager (per-shape compiles): once per config
def _params(cfg=CFG, seed=0):
    """Random init, perturbed (numpy) so LayerNorms and biases are non-trivial."""
    params = jax.tree.map(np.asarray, encoder.init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def perturb(x):
        if x.ndim <= 2 and x.shape[0] < 60:  # biases, LayerNorms, small tables
            return jnp.asarray(x + 0.3 * rng.normal(size=x.shape), jnp.float32)
        return jnp.asarray(x * 8.0)

    return jax.tree.map(perturb, params)


def _tokens(shape=(3, 19), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, CFG.vocab_size, shape))


def test_attention_is_bidirectional_and_padding_is_inert_by_gradient():
    params = _params()
    b, t = 2, 13
    x_BTD = jax.random.normal(jax.random.key(3), (b, t, CFG.d_model))
    valid_BT = jnp.arange(t)[None] < jnp.array([[t], [8]])
    positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))

    def first_token_out(x_BTD):
        mask = encoder.padding_mask(valid_BT, t)
        return encoder.run_encoder(CFG, params["h"], x_BTD, positions_BT, mask)[:, 0].sum()

    g_BT = np.abs(np.asarray(jax.grad(first_token_out)(x_BTD))).sum(-1)
    assert (g_BT[0] > 1e-6).all(), "position 0 must see every later real token"
    assert (g_BT[1, :8] > 1e-6).all()
    np.testing.assert_array_equal(g_BT[1, 8:], 0.0)  # padding has exactly no influence


def test_padded_batch_equals_unpadded_rows():
    params = _params()
    tokens = _tokens((1, 11))
    segments = jnp.asarray([[0] * 6 + [1] * 5])
    ref = forward(CFG, params, tokens, segment_ids=segments)
    padded = jnp.pad(tokens, ((0, 0), (0, 6)), constant_values=5)
    out = forward(
        CFG,
        params,
        padded,
        segment_ids=jnp.pad(segments, ((0, 0), (0, 6))),
        mask=(jnp.arange(17) < 11)[None].astype(jnp.int32),
    )
    np.testing.assert_allclose(out[:, :11], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        dict(scan_layers=False),
        dict(remat="full"),
        dict(attention_impl="fused"),
        dict(ln_placement="pre"),
    ],
)
def test_variants_agree(changes):
    cfg = CFG.replace(**changes)
    params = _params(cfg)
    ref_cfg = CFG.replace(ln_placement=cfg.ln_placement)
    tokens, mask = _tokens(), (jnp.arange(19)[None] < jnp.array([[19], [12], [7]]))
    ref = forward(ref_cfg, params, tokens, mask=mask)
    out = forward(cfg, params, tokens, mask=mask)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_param_axes_cover_every_parameter_with_matching_rank():
    for ln in ("post", "pre"):
        cfg = CFG.replace(ln_placement=ln, tie_embeddings=ln == "post")
        shapes = jax.eval_shape(lambda k, cfg=cfg: encoder.init_params(cfg, k), jax.random.key(0))
        axes = encoder.param_axes(cfg)
        is_axes = lambda x: isinstance(x, tuple)
        assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=is_axes)
        jax.tree.map(lambda s, a: assert_rank(s, a), shapes, axes, is_leaf=is_axes)


def assert_rank(shape, axes):
    assert len(shape.shape) == len(axes), (shape.shape, axes)


def test_dropout_only_with_a_key():
    cfg = CFG.replace(embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
    params, tokens = _params(cfg), _tokens()
    a = forward(cfg, params, tokens)
    np.testing.assert_array_equal(a, forward(cfg, params, tokens))
    b = forward(cfg, params, tokens, key=jax.random.key(0))
    assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_mask_tokens_rates_and_specials():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, (400, 512))
    tokens[:, 0], tokens[:, -40:] = 1, 0  # [CLS] = 1, padding = 0
    inputs, targets, loss_mask = map(
        np.asarray,
        encoder.mask_tokens(
            jnp.asarray(tokens), jax.random.key(0), mask_id=2, vocab_size=1000, special_ids=(0, 1)
        ),
    )
    np.testing.assert_array_equal(targets, tokens)
    chosen = loss_mask.astype(bool)
    assert not chosen[:, 0].any() and not chosen[:, -40:].any(), "specials are never chosen"
    eligible = tokens.size - 41 * 400
    assert abs(chosen.sum() / eligible - 0.15) < 0.003
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])  # untouched elsewhere
    n = chosen.sum()
    masked = (inputs[chosen] == 2).sum() / n
    kept = (inputs[chosen] == tokens[chosen]).sum() / n  # includes ~0.1% random == original
    assert abs(masked - 0.8) < 0.006 and abs(kept - 0.1) < 0.005
    assert abs(1 - masked - kept - 0.1) < 0.005  # random replacements


def test_mlm_loss_touches_only_chosen_positions():
    params, tokens = _params(), _tokens()
    inputs, targets, loss_mask = encoder.mask_tokens(
        tokens, jax.random.key(1), mask_id=3, vocab_size=CFG.vocab_size, rate=0.3
    )
    logits = forward(CFG, params, inputs)
    g = np.asarray(jax.grad(encoder.mlm_loss)(logits, targets, loss_mask))
    touched = np.abs(g).sum(-1) > 0
    np.testing.assert_array_equal(touched, np.asarray(loss_mask).astype(bool))
    nll = -jax.nn.log_softmax(logits)[jnp.arange(3)[:, None], jnp.arange(19), targets]
    expected = (nll * loss_mask).sum() / loss_mask.sum()
    np.testing.assert_allclose(encoder.mlm_loss(logits, targets, loss_mask), expected, rtol=1e-6)


def test_bad_inputs_get_clear_errors():
    params, tokens = _params(), _tokens()
    with pytest.raises(ValueError, match="segment_ids must lie"):
        encoder.forward(CFG, params, tokens, segment_ids=jnp.full(tokens.shape, 3))
    with pytest.raises(ValueError, match="must match tokens"):
        forward(CFG, params, tokens, mask=jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="max_len"):
        forward(CFG, params, _tokens((1, 30)))
    with pytest.raises(ValueError, match="activation"):
        EncoderConfig(activation="tanh")
    with pytest.raises(ValueError, match="Unknown model preset"):
        get_preset("bert_huge")


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if type(c) is EncoderConfig))
def test_model_gin_file_equals_preset(name):
    import gin

    from gptjax.cli import main as cli

    fname = name if name.startswith("bert") else "bert_" + name.replace("nano_bert_", "nano_")
    gin.clear_config()
    try:
        cli.parse_gin([f"models/{fname}.gin"], [])
        assert EncoderConfig() == PRESETS[name]
    finally:
        gin.clear_config()


# ------------------------------------------------------------- Hugging Face gradients


def assert_grads_match_hf(ours: dict, ref: dict, rtol: float = 1e-4) -> None:
    """Each HF gradient `ref[key]` equals ours mapped to that key by the exporter: to `rtol`,
    with an absolute floor of `rtol` times the tensor's largest entry (float32 noise is
    ~1e-6 of it).

    Attention key biases are checked apart: softmax ignores a shift shared by every key,
    so their gradient is exactly zero and both sides hold rounding noise."""
    scale = max(np.abs(g).max() for g in ref.values())
    for name, want in ref.items():
        got = np.asarray(ours[name])
        if name.endswith(("key.bias", "k_proj.bias")):
            assert max(np.abs(got).max(), np.abs(want).max()) < 1e-6 * scale, name
            continue
        np.testing.assert_allclose(
            got, want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name
        )


def hf_grads(hf, loss) -> tuple[dict, set]:
    """({name: gradient} of HF's parameters after `loss.backward()`, {names without one})."""
    loss.backward()
    named = dict(hf.named_parameters())  # a tied tensor appears once, with the summed gradient
    return (
        {n: p.grad.numpy() for n, p in named.items() if p.grad is not None},
        {n for n, p in named.items() if p.grad is None},
    )


def test_mlm_gradients_match_hf_bert():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from gptjax import hf as convert_family
    from tests.test_convert_family import BERT_SIZES, _hf_bert, _state_dict

    size = BERT_SIZES[0]  # tied: the word embeddings get input + output gradients
    hf, hf_cfg = _hf_bert(*size)
    cfg, params = convert_family.from_hf_bert(_state_dict(hf), hf_cfg.to_dict())
    rng = np.random.default_rng(1)
    b, t, v = 3, 13, size[4]
    tokens, weights = rng.integers(1, v, (b, t)), rng.normal(size=(b, t, v)).astype(np.float32)
    segments = (np.arange(t)[None] >= rng.integers(3, t, (b, 1))).astype(np.int64)
    mask = (np.arange(t)[None] < np.array([[t], [t - 4], [7]])).astype(np.int64)
    logits = hf(
        input_ids=torch.tensor(tokens),
        token_type_ids=torch.tensor(segments),
        attention_mask=torch.tensor(mask),
    ).logits
    ref, unused = hf_grads(hf, (logits * torch.tensor(weights)).sum())
    assert not unused

    def loss(p):  # every logit gets its own cotangent
        return (
            encoder.forward(
                cfg,
                p,
                jnp.asarray(tokens),
                segment_ids=jnp.asarray(segments),
                mask=jnp.asarray(mask),
            )
            * weights
        ).sum()

    grads = jax.jit(jax.grad(loss))(params)
    assert_grads_match_hf(convert_family.to_hf_bert(cfg, grads)[0], ref)
