"""The encoder–decoder: causal decoder, exact cross-attention, padding, cached decoding, loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import encoder, seq2seq

# Odd sizes; head_dim 7; 2 encoder and 3 decoder layers so the two depths cannot be swapped.
CFG = seq2seq.Seq2SeqConfig(n_layers=2, n_decoder_layers=3, d_model=42, n_heads=6, d_ff=37,
                            vocab_size=61, max_len=40, activation="swish")
PAD, START, EOS = 0, 0, 1
# Jitted once per shape: eager calls would recompile the layer scan every time.
forward = jax.jit(seq2seq.forward, static_argnums=0)
decode = jax.jit(seq2seq.decode, static_argnums=0)


@functools.lru_cache(maxsize=None)  # init is eager (per-shape compiles): once per config
def _params(cfg=CFG, seed=0):
    """Random init, perturbed (numpy) so LayerNorms and biases are non-trivial."""
    params = jax.tree.map(np.asarray, seq2seq.init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        if "bias" in str(path) or "scale" in str(path):
            return jnp.asarray(x + 0.3 * rng.normal(size=x.shape), jnp.float32)
        return jnp.asarray(x * 4.0)

    return jax.tree_util.tree_map_with_path(perturb, params)


def _ints(shape, seed, lo=2):
    return jnp.asarray(np.random.default_rng(seed).integers(lo, CFG.vocab_size, shape))


def test_decoder_is_causal_and_sees_the_whole_source():
    params, src, tgt = _params(), _ints((2, 9), 0), _ints((2, 8), 1)
    ref = forward(CFG, params, src, tgt)
    for j in (0, 3, 7):
        out = forward(CFG, params, src, tgt.at[:, j].set((tgt[:, j] + 1) % 61))
        np.testing.assert_array_equal(out[:, :j], ref[:, :j])  # the past never sees the future
        assert np.abs(np.asarray(out[:, j] - ref[:, j])).max() > 1e-3
    out = forward(CFG, params, src.at[:, -1].set(src[:, -1] % 60 + 2), tgt)
    assert (np.abs(np.asarray(out - ref)).max(-1) > 1e-4).all()  # every position sees the source


def test_cross_attention_equals_einsum_reference():
    params = _params()
    p = jax.tree.map(lambda a: np.asarray(a[1], np.float64), params["decoder"]["h"]["cross_attn"])
    rng = np.random.default_rng(0)
    x, enc = rng.normal(size=(2, 5, 42)), rng.normal(size=(2, 7, 42))
    valid = np.arange(7)[None] < np.array([[7], [4]])
    q = np.einsum("btd,dnh->btnh", x, p["q"]["kernel"]) + p["q"]["bias"]
    k = np.einsum("bsd,dnh->bsnh", enc, p["kv"]["kernel"][:, 0]) + p["kv"]["bias"][0]
    v = np.einsum("bsd,dnh->bsnh", enc, p["kv"]["kernel"][:, 1]) + p["kv"]["bias"][1]
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(7) + np.where(valid, 0, -np.inf)[:, None,
                                                                                     None]
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bsnh,nhd->btd", w, v, p["c_proj"]["kernel"]) + p["c_proj"]["bias"]
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    kv = seq2seq.cross_kv(CFG, p32, jnp.asarray(enc, jnp.float32))
    out = seq2seq.cross_attention(CFG, p32, jnp.asarray(x, jnp.float32), *kv,
                                  encoder.padding_mask(jnp.asarray(valid), 5))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_padded_source_equals_unpadded():
    params, src, tgt = _params(), _ints((1, 6), 2), _ints((1, 5), 3)
    ref = forward(CFG, params, src, tgt)
    padded = jnp.pad(src, ((0, 0), (0, 5)), constant_values=PAD)
    out = forward(CFG, params, padded, tgt, src_mask=(jnp.arange(11) < 6)[None])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_forward_at_every_step():
    params, src, tgt = _params(), _ints((3, 9), 4), _ints((3, 8), 5)
    src_mask = (jnp.arange(9)[None] < jnp.array([[9], [6], [3]])).astype(jnp.int32)
    full = forward(CFG, params, src, tgt, src_mask=src_mask)
    source = seq2seq.prepare(CFG, params, src, src_mask)
    cache = seq2seq.init_cache(CFG, 3, 8)
    for i in range(8):
        step, cache = decode(CFG, params, tgt[:, i:i + 1], source["cross"],
                                     source["src_valid"], cache=cache, cache_index=i)
        np.testing.assert_allclose(step[:, 0], full[:, i], rtol=1e-5, atol=1e-5, err_msg=str(i))


def test_greedy_equals_uncached_argmax_loop():
    params, src = _params(), _ints((3, 9), 6)
    out = np.asarray(seq2seq.greedy(CFG, params, src, start_id=START, eos_id=EOS, max_len=10))
    tgt = jnp.full((3, 11), START)  # causal: the zeros after position i do not matter
    for i in range(10):
        tgt = tgt.at[:, i + 1].set(jnp.argmax(forward(CFG, params, src, tgt)[:, i], -1))
    expected = np.asarray(tgt[:, 1:])
    for row, exp in zip(out, expected):
        stop = list(exp).index(EOS) + 1 if EOS in exp else len(exp)
        np.testing.assert_array_equal(row[:stop], exp[:stop])
        assert (row[stop:] == PAD).all()


@pytest.mark.parametrize("changes", [dict(scan_layers=False), dict(remat="full"),
                                     dict(attention_impl="fused")])
def test_variants_agree(changes):
    params, src, tgt = _params(), _ints((2, 9), 7), _ints((2, 6), 8)
    mask = jnp.arange(9)[None] < jnp.array([[9], [5]])
    ref = forward(CFG, params, src, tgt, src_mask=mask)
    out = forward(CFG.replace(**changes), params, src, tgt, src_mask=mask)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_pre_ln_learned_positions_untied_build_and_axes_match():
    cfg = CFG.replace(ln_placement="pre", pos_embedding="learned", tie_embeddings=False)
    params = _params(cfg)
    is_axes = lambda x: isinstance(x, tuple)
    axes = seq2seq.param_axes(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=is_axes)
    jax.tree.map(lambda a, ax: None if a.ndim == len(ax) else pytest.fail(f"{a.shape} {ax}"),
                 params, axes, is_leaf=is_axes)
    out = forward(cfg, params, _ints((2, 9), 0), _ints((2, 4), 1))
    assert np.isfinite(np.asarray(out)).all() and out.shape == (2, 4, 61)


def test_label_smoothed_loss_matches_optax_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 61)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 61, (2, 5)))
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss, nll = seq2seq.label_smoothed_loss(logits, targets, mask, 0.1)
    smooth = optax.smooth_labels(jax.nn.one_hot(targets, 61), 0.1)
    per_tok = optax.softmax_cross_entropy(logits, smooth)
    np.testing.assert_allclose(loss, (per_tok * mask).sum() / 8, rtol=1e-6)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(nll, (plain * mask).sum() / 8, rtol=1e-6)
    g = jax.grad(lambda lg: seq2seq.label_smoothed_loss(lg, targets, mask)[0])(logits)
    np.testing.assert_array_equal(g[0, 3:], 0.0)


def test_bad_configs_and_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="rotary"):
        seq2seq.Seq2SeqConfig(pos_embedding="rope")
    with pytest.raises(ValueError, match="n_decoder_layers"):
        seq2seq.Seq2SeqConfig(n_decoder_layers=0)
    with pytest.raises(ValueError, match="src_mask"):
        forward(CFG, _params(), _ints((2, 9), 0), _ints((2, 4), 1),
                        src_mask=jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="Unknown seq2seq preset"):
        seq2seq.get_seq2seq_preset("transformer_huge")


@pytest.mark.parametrize("name", sorted(seq2seq.PRESETS))
def test_model_gin_file_equals_preset(name):
    import gin

    from gptjax import main as cli

    fname = (name if name.startswith("transformer")
             else "transformer_" + name.replace("nano_transformer_", "nano_"))
    gin.clear_config()
    try:
        cli.parse_gin([f"models/{fname}.gin"], [])
        assert seq2seq.Seq2SeqConfig() == seq2seq.PRESETS[name]
    finally:
        gin.clear_config()
