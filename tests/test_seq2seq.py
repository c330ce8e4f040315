"""The encoder–decoder: causal decoder, exact cross-attention, padding, cached decoding, loss."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.config import PRESETS, Seq2SeqConfig, get_preset
from gptjax.inference import decoding as seq2seq_decode
from gptjax.models import bert as encoder
from gptjax.models import layers
from gptjax.models import transformer as seq2seq
from tests.test_encoder import assert_grads_match_hf, hf_grads

# Odd sizes; head_dim 7; 2 encoder and 3 decoder layers so the two depths cannot be swapped.
CFG = Seq2SeqConfig(
    n_layers=2,
    n_decoder_layers=3,
    d_model=42,
    n_heads=6,
    d_ff=37,
    vocab_size=61,
    max_len=40,
    activation="swish",
)
PAD, START, EOS = 0, 0, 1
# Jitted once per shape: eager calls would recompile the layer scan every time.
forward = jax.jit(seq2seq.forward, static_argnums=0)
decode = jax.jit(seq2seq.decode, static_argnums=0)


@functools.cache  # init is eager (per-shape compiles): once per config
def _params(cfg=CFG, seed=0):
    """Random init, perturbed (numpy) so LayerNorms and biases are non-trivial."""
    params = jax.tree.map(np.asarray, seq2seq.init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        if "bias" in str(path) or "scale" in str(path):
            return jnp.asarray(x + 0.3 * rng.normal(size=x.shape), jnp.float32)
        return jnp.asarray(x * 4.0)

    return jax.tree_util.tree_map_with_path(perturb, params)


@functools.cache
def _varied_params(vocab_size=CFG.vocab_size):
    """`_params` with plain LayerNorms, zero biases and 5x the weights, for decoding
    tests: random post-LN models repeat one token (the LN biases dominate), these vary
    more. The start/pad id is never predicted (Marian's bad_words_ids), so pad after
    EOS is unambiguous. A smaller vocabulary keeps the first rows of the tables."""

    def reset(path, x):
        where = jax.tree_util.keystr(path)
        return (
            jnp.ones_like(x)
            if "scale" in where
            else jnp.zeros_like(x)
            if "bias" in where
            else x * 5.0
        )

    params = jax.tree_util.tree_map_with_path(reset, _params())
    params["wte"] = params["wte"][:vocab_size]
    params["final_logits_bias"] = params["final_logits_bias"][:vocab_size].at[PAD].set(-1e4)
    return params


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
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(7) + np.where(valid, 0, -np.inf)[:, None, None]
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bsnh,nhd->btd", w, v, p["c_proj"]["kernel"]) + p["c_proj"]["bias"]
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
    kv = seq2seq.cross_kv(CFG, p32, jnp.asarray(enc, jnp.float32))
    out = seq2seq.cross_attention(
        CFG, p32, jnp.asarray(x, jnp.float32), *kv, encoder.padding_mask(jnp.asarray(valid), 5)
    )
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_padded_source_equals_unpadded():
    params, src, tgt = _params(), _ints((1, 6), 2), _ints((1, 5), 3)
    ref = forward(CFG, params, src, tgt)
    padded = jnp.pad(src, ((0, 0), (0, 5)), constant_values=PAD)
    out = forward(CFG, params, padded, tgt, src_mask=(jnp.arange(11) < 6)[None])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])  # per-layer / stacked cache buffers
def test_cached_decoding_equals_full_forward_at_every_step(scan):
    cfg = CFG.replace(scan_layers=scan)
    params, src, tgt = _params(), _ints((3, 9), 4), _ints((3, 8), 5)
    src_mask = (jnp.arange(9)[None] < jnp.array([[9], [6], [3]])).astype(jnp.int32)
    full = forward(cfg, params, src, tgt, src_mask=src_mask)
    source = seq2seq_decode.prepare(cfg, params, src, src_mask)
    cache = layers.init_cache(cfg, 3, 8, cfg.decoder_layers)
    for i in range(8):
        step, cache = decode(
            cfg,
            params,
            tgt[:, i : i + 1],
            source["cross"],
            source["src_valid"],
            cache=cache,
            cache_index=i,
        )
        np.testing.assert_allclose(step[:, 0], full[:, i], rtol=1e-5, atol=1e-5, err_msg=str(i))


def test_greedy_equals_uncached_argmax_loop():
    params, src = _params(), _ints((3, 9), 6)
    out = np.asarray(
        seq2seq_decode.greedy(CFG, params, src, start_id=START, eos_id=EOS, max_len=10)
    )
    tgt = jnp.full((3, 11), START)  # causal: the zeros after position i do not matter
    for i in range(10):
        tgt = tgt.at[:, i + 1].set(jnp.argmax(forward(CFG, params, src, tgt)[:, i], -1))
    expected = np.asarray(tgt[:, 1:])
    for row, exp in zip(out, expected):
        stop = list(exp).index(EOS) + 1 if EOS in exp else len(exp)
        np.testing.assert_array_equal(row[:stop], exp[:stop])
        assert (row[stop:] == PAD).all()


# ----------------------------------------------------------------- beam search


def _teacher_forced(cfg, params, src, src_mask, tokens, eos, length_penalty, kind="hf"):
    """Per-token log-probs of `tokens` (B, T) under `forward`, up to the first `eos` (0
    after), and the beam score: sum / length**length_penalty ("hf") or
    sum / ((5 + length) / 6)**length_penalty ("gnmt"), `eos` counted in the length."""
    tokens = np.asarray(tokens)
    logits = forward(
        cfg, params, src, seq2seq.shift_right(jnp.asarray(tokens), START), src_mask=src_mask
    )
    logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), tokens[..., None], -1)[
        ..., 0
    ]
    is_eos = tokens == eos
    length = np.where(is_eos.any(1), is_eos.argmax(1) + 1, tokens.shape[1])
    logp = np.where(np.arange(tokens.shape[1])[None] < length[:, None], logp, 0.0)
    penalty = length**length_penalty if kind == "hf" else ((5 + length) / 6) ** length_penalty
    return logp, logp.sum(1) / penalty, length


SRC_MASK = (jnp.arange(9)[None] < jnp.array([[9], [6], [3]])).astype(jnp.int32)


def _greedy(params, src, eos, max_len=8):
    return np.asarray(
        seq2seq_decode.greedy(
            CFG, params, src, SRC_MASK, start_id=START, eos_id=eos, max_len=max_len
        )
    )


def test_beam_of_one_is_greedy_with_padded_sources():
    params, src = _varied_params(), _ints((3, 9), 11)
    eos = int(_greedy(params, src, EOS)[0, 1])  # ends row 0 by its second token
    greedy = _greedy(params, src, eos)
    beam = seq2seq_decode.beam_search(
        CFG, params, src, SRC_MASK, num_beams=1, start_id=START, eos_id=eos, max_len=8
    )
    np.testing.assert_array_equal(beam.tokens, greedy)
    ended = (greedy == eos).any(1)
    assert ended.any() and not ended.all(), "cover finished and unfinished rows"
    assert (greedy[0, 2:] == PAD).all()


# (kind, alpha) of the exhaustive comparison: both length penalties, GNMT's at 0 included.
PENALTIES = [("hf", 0.0), ("gnmt", 0.0), ("hf", 1.0), ("gnmt", 1.0), ("hf", 2.0), ("gnmt", 2.0)]


def test_wide_beam_equals_exhaustive_search_under_each_length_penalty():
    cfg = CFG.replace(vocab_size=5)  # 0 = start and pad (never predicted), 1 = EOS
    params, t, n_seq = _varied_params(5), 3, 5**3
    src = jnp.asarray(np.random.default_rng(12).integers(2, 5, (3, 9)))
    seqs = np.array(list(itertools.product(range(5), repeat=t)))  # every target of length 3
    all_src, all_mask = (jnp.repeat(a, n_seq, axis=0) for a in (src, SRC_MASK))
    ended_early, best_of = 0, {}
    for kind, alpha in PENALTIES:
        # K = V**(t-1): no prefix is ever pruned, so the beam must find the optimum.
        out = seq2seq_decode.beam_search(
            cfg,
            params,
            src,
            SRC_MASK,
            num_beams=25,
            start_id=START,
            eos_id=EOS,
            max_len=t,
            length_penalty=alpha,
            length_penalty_kind=kind,
        )
        _, score, length = _teacher_forced(
            cfg, params, all_src, all_mask, np.tile(seqs, (3, 1)), EOS, alpha, kind
        )
        for b in range(3):
            i = b * n_seq + int(np.argmax(score[b * n_seq : (b + 1) * n_seq]))
            best = np.where(np.arange(t) < length[i], seqs[i % n_seq], PAD)
            np.testing.assert_array_equal(out.tokens[b], best, err_msg=f"{kind} {alpha} {b}")
            np.testing.assert_allclose(out.scores[b], score[i], rtol=1e-5)
            ended_early += int(length[i] < t)
            best_of[kind, alpha, b] = tuple(best)
    assert 0 < ended_early < 3 * len(PENALTIES), "optima should end at EOS and run full length"
    assert any(
        best_of["hf", a, b] != best_of["gnmt", a, b] for a in (1.0, 2.0) for b in range(3)
    ), "the two kinds should pick different optima somewhere, or this test cannot tell them apart"


def test_beam_logprobs_and_scores_equal_teacher_forced_forward():
    params, src = _varied_params(), _ints((3, 9), 11)
    out = seq2seq_decode.beam_search(
        CFG,
        params,
        src,
        SRC_MASK,
        num_beams=4,
        start_id=START,
        eos_id=EOS,
        max_len=8,
        length_penalty=0.6,
    )
    logp, score, _ = _teacher_forced(CFG, params, src, SRC_MASK, out.tokens, EOS, 0.6)
    np.testing.assert_allclose(out.logprobs, logp, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.scores, score, rtol=1e-5)
    assert not np.array_equal(out.tokens, _greedy(params, src, EOS)), (
        "4 beams should change some translation"
    )


@pytest.mark.parametrize(
    "changes", [dict(scan_layers=False), dict(remat="full"), dict(attention_impl="fused")]
)
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
    jax.tree.map(
        lambda a, ax: None if a.ndim == len(ax) else pytest.fail(f"{a.shape} {ax}"),
        params,
        axes,
        is_leaf=is_axes,
    )
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
        Seq2SeqConfig(pos_embedding="rope")
    with pytest.raises(ValueError, match="n_decoder_layers"):
        Seq2SeqConfig(n_decoder_layers=0)
    for eps in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
            Seq2SeqConfig(label_smoothing=eps)
    assert Seq2SeqConfig(label_smoothing=0.0).label_smoothing == 0.0
    with pytest.raises(ValueError, match="src_mask"):
        forward(CFG, _params(), _ints((2, 9), 0), _ints((2, 4), 1), src_mask=jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="Unknown model preset"):
        get_preset("transformer_huge")
    with pytest.raises(ValueError, match="3 target rows cannot share 2 sources"):
        seq2seq.decode(CFG, _params(), _ints((3, 1), 0), {}, jnp.ones((2, 9), bool))
    with pytest.raises(ValueError, match="num_beams"):
        seq2seq_decode.beam_search(
            CFG, _params(), _ints((1, 3), 0), num_beams=0, start_id=START, eos_id=EOS, max_len=2
        )
    with pytest.raises(ValueError, match="length_penalty_kind must be 'hf'.*'gnmt'"):
        seq2seq_decode.beam_search(
            CFG,
            _params(),
            _ints((1, 3), 0),
            num_beams=2,
            start_id=START,
            eos_id=EOS,
            max_len=2,
            length_penalty_kind="wu",
        )


# --------------------------------------------------------------- Hugging Face Marian


def _marian_fixtures():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests import test_convert_family as fixtures

    return fixtures


@pytest.mark.parametrize("which", [0, 1])  # tied + scaled embeddings; untied
def test_marian_export_is_the_exact_inverse_of_import(which):
    import torch

    from gptjax import hf as convert_family

    fx = _marian_fixtures()
    hf, hf_cfg = fx._hf_marian(*fx.MARIAN_SIZES[which])
    sd = fx._state_dict(hf)
    cfg, params = convert_family.from_hf_marian(sd, hf_cfg.to_dict())
    out, out_cfg = convert_family.to_hf_marian(cfg, params)
    assert set(out) == set(sd)
    for key, value in sd.items():  # positions: our float32 table, as the import check
        np.testing.assert_allclose(
            out[key], value, rtol=0, atol=1e-5 if "positions" in key else 0, err_msg=key
        )
    # The exported config builds the same model, and re-import gives the same config.
    fresh = type(hf)(type(hf_cfg)(**out_cfg)).eval()
    fresh.load_state_dict({k: torch.tensor(v) for k, v in out.items()}, strict=True)
    assert convert_family.from_hf_marian(fx._state_dict(fresh), fresh.config.to_dict())[0] == cfg
    with pytest.raises(ValueError, match="Marian-shaped"):
        convert_family.to_hf_marian(cfg.replace(ln_placement="pre"), params)


def test_translation_gradients_match_hf_marian():
    import torch

    from gptjax import hf as convert_family

    fx = _marian_fixtures()
    size = fx.MARIAN_SIZES[0]  # tied: one table for source, target and output
    hf, hf_cfg = fx._hf_marian(*size)
    cfg, params = convert_family.from_hf_marian(fx._state_dict(hf), hf_cfg.to_dict())
    rng = np.random.default_rng(1)
    src, tgt = rng.integers(2, size[5], (3, 11)), rng.integers(2, size[5], (3, 7))
    src_mask = (np.arange(11)[None] < np.array([[11], [8], [5]])).astype(np.int64)
    weights = rng.normal(size=(3, 7, size[5])).astype(np.float32)
    logits = hf(
        input_ids=torch.tensor(src),
        attention_mask=torch.tensor(src_mask),
        decoder_input_ids=torch.tensor(tgt),
    ).logits
    ref, unused = hf_grads(hf, (logits * torch.tensor(weights)).sum())
    assert unused == {f"model.{s}.embed_positions.weight" for s in ("encoder", "decoder")}

    def loss(p):  # every logit gets its own cotangent
        return (
            seq2seq.forward(
                cfg, p, jnp.asarray(src), jnp.asarray(tgt), src_mask=jnp.asarray(src_mask)
            )
            * weights
        ).sum()

    grads = jax.jit(jax.grad(loss))(params)
    assert_grads_match_hf(convert_family.to_hf_marian(cfg, grads)[0], ref)
    # HF keeps final_logits_bias as a buffer; its gradient is the weights summed over B, T.
    np.testing.assert_allclose(grads["final_logits_bias"], weights.sum((0, 1)), atol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if type(c) is Seq2SeqConfig))
def test_model_gin_file_equals_preset(name):
    import gin

    from gptjax.cli import main as cli

    fname = (
        name
        if name.startswith("transformer")
        else "transformer_" + name.replace("nano_transformer_", "nano_")
    )
    gin.clear_config()
    try:
        cli.parse_gin([f"models/{fname}.gin"], [])
        assert Seq2SeqConfig() == PRESETS[name]
    finally:
        gin.clear_config()
