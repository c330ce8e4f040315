"""gptjax.models.gpt and gptjax.models.attention against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.config import PRESETS, ModelConfig, get_preset
from gptjax.models import attention as attn_lib
from gptjax.models import gpt as model
from gptjax.models import layers
from tests.reference import decoder_param_count as param_count
from tests.reference import reference_logits

# Odd, distinct sizes so a wrong transpose or reshape cannot pass.
BASE = dict(n_layers=2, d_model=30, n_heads=5, d_ff=44, vocab_size=53, max_len=19)


def _randomize(params, key, std=0.3):
    """Non-trivial values everywhere (init zeroes biases and sets LN scales to 1)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def _setup(seed=0, **overrides):
    cfg = ModelConfig(**{**BASE, **overrides})
    params = _randomize(model.init_params(cfg, jax.random.key(seed)), jax.random.key(seed + 1))
    tokens = jax.random.randint(jax.random.key(seed + 2), (3, 13), 0, cfg.vocab_size)
    return cfg, params, tokens


def _loss(cfg, params, tokens, **kw):
    logits = model.forward(cfg, params, tokens[:, :-1], **kw)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


VARIANTS = {
    "gpt2": {},
    "gpt1_post_ln": dict(ln_placement="post"),
    "gpt3_sparse": dict(attention="gpt3_sparse", local_window=3, n_layers=4),
    "rope": dict(pos_embedding="rope", n_heads=3),  # head_dim 10
    "sinusoidal_untied": dict(pos_embedding="sinusoidal", tie_embeddings=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_numpy_reference(variant):
    cfg, params, tokens = _setup(**VARIANTS[variant])
    logits = model.forward(cfg, params, tokens)
    for b in range(tokens.shape[0]):
        expected = reference_logits(cfg, params, np.asarray(tokens[b]))
        np.testing.assert_allclose(logits[b], expected, rtol=1e-4, atol=1e-4)


def test_sparse_band_actually_limits_attention():
    # Same weights, dense vs banded: identical inside the band, different beyond it.
    cfg, params, tokens = _setup(attention="gpt3_sparse", local_window=3, n_layers=2)
    dense = model.forward(cfg.replace(attention="dense"), params, tokens)
    sparse = model.forward(cfg, params, tokens)
    np.testing.assert_allclose(dense[:, :3], sparse[:, :3], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(dense[:, 3:] - sparse[:, 3:]).max()) > 1e-3


@pytest.mark.parametrize("variant", ["gpt2", "gpt1_post_ln", "rope"])
def test_causality_by_gradient(variant):
    """d logits[t] / d input embedding[s] is zero exactly when s > t."""
    cfg, params, tokens = _setup(**VARIANTS[variant])
    t = tokens.shape[1]
    x_TD = model.embed(cfg, params, tokens[:1], jnp.arange(t)[None])[0]

    def logits_at(x_TD, pos):
        h = x_TD[None]
        h, _ = layers.run_layers(
            cfg,
            params["h"],
            h,
            {},
            lambda p, x, e, is_local: (
                model.block(cfg, p, x, jnp.arange(t)[None], None, is_local=is_local)[0],
                None,
            ),
        )
        return model.unembed(cfg, params, h)[0, pos].sum()

    for pos in (0, 5, t - 1):
        g_TD = jax.grad(logits_at)(x_TD, pos)
        norms = jnp.abs(g_TD).sum(-1)
        assert float(norms[pos + 1 :].max(initial=0.0)) == 0.0
        assert float(norms[: pos + 1].min()) > 0.0


def test_causality_of_full_forward_via_position_table():
    cfg, params, tokens = _setup()
    for pos in (2, 9):
        g = jax.grad(
            lambda wpe, pos=pos: model.forward(cfg, {**params, "wpe": wpe}, tokens)[:, pos].sum()
        )(params["wpe"])
        rows = jnp.abs(g).sum(-1)
        assert float(rows[pos + 1 :].max()) == 0.0 and float(rows[: pos + 1].min()) > 0


@pytest.mark.parametrize("variant", ["gpt2", "gpt3_sparse", "gpt1_post_ln"])
def test_scan_equals_unrolled_and_remat_equals_plain(variant):
    cfg, params, tokens = _setup(**VARIANTS[variant])
    cfg = cfg.replace(scan_layers=True)
    ref_loss, ref_grads = jax.value_and_grad(lambda p: _loss(cfg, p, tokens))(params)
    for change in (
        dict(scan_layers=False),
        dict(remat="full"),
        dict(remat="dots"),
        dict(remat="dots_no_batch", scan_layers=False),
    ):
        c = cfg.replace(**change)
        loss, grads = jax.jit(jax.value_and_grad(lambda p, c=c: _loss(c, p, tokens)))(params)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "gpt3_sparse", "rope", "sinusoidal_untied"])
def test_left_padding_scores_exactly_like_unpadded(variant):
    cfg, params, tokens = _setup(**VARIANTS[variant])
    lengths = [13, 7, 10]
    padded = np.zeros((3, 13), np.int32)
    mask = np.zeros((3, 13), np.int32)
    for i, n in enumerate(lengths):
        padded[i, 13 - n :], mask[i, 13 - n :] = tokens[i, :n], 1
    logits = model.forward(cfg, params, jnp.asarray(padded), mask=jnp.asarray(mask))
    for i, n in enumerate(lengths):
        alone = model.forward(cfg, params, tokens[i : i + 1, :n])[0]
        np.testing.assert_allclose(logits[i, 13 - n :], alone, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(logits)).all()  # pad rows are finite too


@pytest.mark.parametrize(
    "variant,scan",
    [("gpt2", False), ("gpt3_sparse", False), ("rope", False), ("gpt1_post_ln", False)]
    + [("gpt2", True), ("gpt3_sparse", True)],  # the stacked cache of a scanned stack
)
def test_kv_cache_decoding_equals_full_forward(variant, scan):
    cfg, params, tokens = _setup(**VARIANTS[variant], scan_layers=scan)
    b, t, prompt = tokens.shape[0], tokens.shape[1], 4
    full = model.forward(cfg, params, tokens)
    cache = layers.init_cache(cfg, b, t)
    valid = jnp.zeros((b, t), bool).at[:, :prompt].set(True)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, cache = model.forward_cached(
        cfg,
        params,
        tokens[:, :prompt],
        cache,
        positions_BT=pos[:, :prompt],
        kv_valid_BS=valid,
        cache_index=0,
    )
    np.testing.assert_allclose(logits, full[:, :prompt], rtol=1e-5, atol=1e-5)
    step = jax.jit(
        lambda tok, cache, valid, i: model.forward_cached(
            cfg,
            params,
            tok,
            cache,
            positions_BT=jnp.full((b, 1), i),
            kv_valid_BS=valid,
            cache_index=i,
        )
    )
    for i in range(prompt, t):
        valid = valid.at[:, i].set(True)
        logits, cache = step(tokens[:, i : i + 1], cache, valid, i)
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


def test_fused_attention_matches_einsum_reference():
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(kk, (2, 7, 3, 8)) for kk in jax.random.split(key, 3))
    for window in (None, 3):
        ref = attn_lib.attention(q, k, v, None, impl="xla", window=window)
        fused = attn_lib.attention(q, k, v, None, impl="fused", window=window)
        np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-5)
    valid = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7], bool)
    mask = attn_lib.make_mask(jnp.arange(7), valid, window=4)
    np.testing.assert_allclose(
        attn_lib.attention(q, k, v, mask, impl="fused")[:, 2:],
        attn_lib.attention(q, k, v, mask, impl="xla")[:, 2:],
        rtol=1e-5,
        atol=1e-5,
    )


def test_dropout_is_driven_by_the_key():
    cfg, params, tokens = _setup(embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
    clean = model.forward(cfg, params, tokens)
    a = model.forward(cfg, params, tokens, key=jax.random.key(1))
    b = model.forward(cfg, params, tokens, key=jax.random.key(1))
    c = model.forward(cfg, params, tokens, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - clean).max()) > 1e-3 and float(jnp.abs(a - c).max()) > 1e-3
    np.testing.assert_array_equal(
        clean,
        model.forward(
            cfg.replace(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0),
            params,
            tokens,
            key=jax.random.key(1),
        ),
    )


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg, params, tokens = _setup()
    ref = model.forward(cfg, params, tokens)
    bf = model.forward(cfg.replace(dtype="bfloat16"), params, tokens)
    assert bf.dtype == jnp.float32
    assert float(jnp.abs(bf - ref).max()) < 0.1 * float(jnp.abs(ref).max())
    assert all(
        x.dtype == jnp.float32
        for x in jax.tree.leaves(
            model.init_params(cfg.replace(dtype="bfloat16"), jax.random.key(0))
        )
    )


def test_init_statistics_follow_gpt2():
    cfg = ModelConfig(n_layers=8, d_model=256, n_heads=4, vocab_size=512, max_len=128)
    p = model.init_params(cfg, jax.random.key(0))
    np.testing.assert_allclose(p["wte"].std(), 0.02, rtol=0.05)
    np.testing.assert_allclose(p["wpe"].std(), 0.01, rtol=0.05)
    np.testing.assert_allclose(p["h"]["mlp"]["c_fc"]["kernel"].std(), 0.02, rtol=0.05)
    np.testing.assert_allclose(p["h"]["attn"]["c_proj"]["kernel"].std(), 0.02 / 4, rtol=0.05)
    np.testing.assert_allclose(p["h"]["mlp"]["c_proj"]["kernel"].std(), 0.02 / 4, rtol=0.05)
    assert float(jnp.abs(p["h"]["attn"]["c_attn"]["bias"]).max()) == 0.0
    np.testing.assert_array_equal(p["h"]["ln_1"]["scale"], 1.0)


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if type(c) is ModelConfig))
def test_preset_param_counts_and_axes(name):
    cfg = get_preset(name)
    shapes = jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == param_count(cfg)
    axes = model.param_axes(cfg)
    assert jax.tree.structure(shapes) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, tuple)
    )
    for shape, names in zip(
        jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    ):
        assert len(shape.shape) == len(names)


def test_known_parameter_counts():
    expected = {
        "gpt2_small": 124_439_808,
        "gpt2_medium": 354_823_168,
        "gpt2_large": 774_030_080,
        "gpt2_xl": 1_557_611_200,
        "gpt3_175b": 174_604_259_328,
    }
    for name, count in expected.items():
        assert param_count(get_preset(name)) == count, name
    gpt3 = {
        "gpt3_small": 125e6,
        "gpt3_medium": 350e6,
        "gpt3_large": 760e6,
        "gpt3_xl": 1.3e9,
        "gpt3_2.7b": 2.7e9,
        "gpt3_6.7b": 6.7e9,
        "gpt3_13b": 13.0e9,
    }
    for name, approx in gpt3.items():  # the paper's rounded sizes
        assert abs(param_count(get_preset(name)) / approx - 1) < 0.03, name
    assert get_preset("gpt1").ln_placement == "post" and get_preset("gpt1").max_len == 512
    assert get_preset("gpt3_small").attention == "gpt3_sparse"


def test_nano_model_overfits_one_batch():
    cfg = get_preset("nano_tiny", vocab_size=64, max_len=32)
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 33), 0, cfg.vocab_size)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: _loss(cfg, p, tokens))(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    first = None
    for _ in range(300):
        params, state, loss = step(params, state)
        first = loss if first is None else first
    assert float(first) > 3.5 and float(loss) < 0.05, (float(first), float(loss))


def test_layers_scan_on_accelerators_and_unroll_on_cpu_unless_told():
    cfg = ModelConfig(n_layers=3, attention="gpt3_sparse")  # odd: only the unrolled loop takes it
    assert layers.scans(cfg) is False  # CPU, where unrolled is faster
    assert layers.scans(cfg.replace(attention="dense", scan_layers=True)) is True
    assert layers.scans(cfg.replace(scan_layers=False)) is False


def test_hand_written_gradients_equal_autodiff_of_the_formulas():
    """LayerNorm's closed-form backward, the output-only softmax backward and the
    recomputed GELU against autodiff of the textbook forward, in float64-free float32."""
    x_BTD = jax.random.normal(jax.random.key(0), (2, 5, 16)) * 3 + 1
    p = {"scale": jnp.linspace(0.5, 2.0, 16), "bias": jnp.linspace(-1, 1, 16)}
    w_BTD = jax.random.normal(jax.random.key(1), x_BTD.shape)

    def plain_ln(p, x):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]

    got = jax.grad(lambda p, x: (layers.layer_norm(p, x, 1e-5) * w_BTD).sum(), (0, 1))(p, x_BTD)
    want = jax.grad(lambda p, x: (plain_ln(p, x) * w_BTD).sum(), (0, 1))(p, x_BTD)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)

    def plain_softmax(x):
        e = jnp.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    got = jax.grad(lambda x: (attn_lib.softmax(x) * w_BTD).sum())(x_BTD)
    want = jax.grad(lambda x: (plain_softmax(x) * w_BTD).sum())(x_BTD)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    def plain_gelu(x):
        return 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    got = jax.grad(lambda x: (layers._gelu(x) * w_BTD).sum())(x_BTD)
    want = jax.grad(lambda x: (plain_gelu(x) * w_BTD).sum())(x_BTD)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="does not divide d_model"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="not one of"):
        ModelConfig(ln_placement="middle")
    cfg, params, tokens = _setup()
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        model.forward(cfg, params, jnp.zeros((1, cfg.max_len + 1), jnp.int32))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 53\)"):
        model.forward(cfg, params, tokens.at[0, 0].set(53))
    with pytest.raises(ValueError, match="must be even"):
        ModelConfig(attention="gpt3_sparse", n_layers=3, scan_layers=True)
    with pytest.raises(ValueError, match="Unknown model preset"):
        get_preset("gpt4")
