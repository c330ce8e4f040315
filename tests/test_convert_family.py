"""BERT / Marian interop: MLM and translation logits equal Hugging Face's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gptjax import hf as convert
from gptjax.config import PRESETS, EncoderConfig
from gptjax.inference import decoding as seq2seq_decode  # noqa: E402
from gptjax.models import bert as encoder
from gptjax.models import family
from gptjax.models import transformer as seq2seq

# (layers, width, heads, d_ff, vocab, positions, token types, activation, tied): odd sizes.
BERT_SIZES = [(3, 35, 5, 51, 97, 23, 3, "gelu", True), (2, 21, 7, 33, 89, 19, 2, "relu", False)]


def _perturb(hf, seed):
    """Non-trivial LayerNorms and biases, larger weights (HF init leaves them 1 / 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in hf.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if p.ndim == 1 else p.mul_(8.0)
    return hf


def _state_dict(hf):
    return {k: v.detach().numpy() for k, v in hf.state_dict().items()}


def _hf_bert(layers, width, heads, d_ff, vocab, ctx, types, act, tied, seed=0):
    torch.manual_seed(seed)
    hf_cfg = transformers.BertConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        num_attention_heads=heads,
        intermediate_size=d_ff,
        vocab_size=vocab,
        max_position_embeddings=ctx,
        type_vocab_size=types,
        hidden_act=act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        tie_word_embeddings=tied,
        pad_token_id=0,
    )
    return _perturb(transformers.BertForMaskedLM(hf_cfg).eval(), seed + 1), hf_cfg


def _close(ours, ref, rtol=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("size", BERT_SIZES)
def test_mlm_logits_match_hf_bert_with_padding_and_segments(size):
    hf, hf_cfg = _hf_bert(*size)
    cfg, params = convert.from_hf_bert(_state_dict(hf), hf_cfg.to_dict())
    assert cfg.activation == {"gelu": "gelu", "relu": "relu"}[size[7]]
    rng = np.random.default_rng(0)
    b, t = 3, 17
    tokens = rng.integers(1, size[4], (b, t))
    segments = (np.arange(t)[None] >= rng.integers(3, t, (b, 1))).astype(np.int64)
    segments = np.minimum(segments * rng.integers(1, size[6], (b, 1)), size[6] - 1)
    mask = (np.arange(t)[None] < np.array([[t], [t - 5], [9]])).astype(np.int64)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(tokens),
            token_type_ids=torch.tensor(segments),
            attention_mask=torch.tensor(mask),
        ).logits.numpy()
    ours = encoder.forward(
        cfg, params, jnp.asarray(tokens), segment_ids=jnp.asarray(segments), mask=jnp.asarray(mask)
    )
    # Padded queries are garbage in both models but see the same keys: compare everything.
    _close(ours, ref)


@pytest.mark.parametrize("size", BERT_SIZES)
def test_bert_export_import_round_trip_is_exact(size):
    cfg = EncoderConfig(
        n_layers=size[0],
        d_model=size[1],
        n_heads=size[2],
        d_ff=size[3],
        vocab_size=size[4],
        max_len=size[5],
        type_vocab_size=size[6],
        activation=size[7],
        tie_embeddings=size[8],
    )
    params = jax.tree.map(np.asarray, encoder.init_params(cfg, jax.random.key(1)))
    sd, hf_config = convert.to_hf_bert(cfg, params)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**hf_config)).eval()
    hf_keys = set(hf.state_dict())
    assert set(sd) == hf_keys, set(sd) ^ hf_keys
    missing, unexpected = hf.load_state_dict(
        {k: torch.tensor(v) for k, v in sd.items()}, strict=True
    )
    cfg2, params2 = convert.from_hf_bert(_state_dict(hf), hf.config.to_dict())
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bert_presets_match_hf_parameter_counts():
    for name, kwargs in (
        ("bert_base", {}),
        (
            "bert_large",
            dict(
                num_hidden_layers=24,
                hidden_size=1024,
                num_attention_heads=16,
                intermediate_size=4096,
            ),
        ),
    ):
        with torch.device("meta"):
            hf = transformers.BertForMaskedLM(transformers.BertConfig(**kwargs))
        expected = sum(p.numel() for p in hf.parameters())  # tied decoder counted once
        assert family.param_count(PRESETS[name]) == expected, name


# (enc layers, dec layers, width, heads, d_ff, vocab, activation, scale_embedding, tied);
# head_dim 7. d_model is even: Marian's sinusoidal layout for odd widths differs.
MARIAN_SIZES = [
    (2, 3, 42, 6, 37, 61, "gelu", True, True),
    (3, 2, 30, 5, 29, 53, "swish", False, False),
]


def _hf_marian(
    enc, dec, width, heads, d_ff, vocab, act, scale, tied, seed=0, init_std=0.02, perturb=True
):
    torch.manual_seed(seed)
    hf_cfg = transformers.MarianConfig(
        vocab_size=vocab,
        d_model=width,
        encoder_layers=enc,
        decoder_layers=dec,
        encoder_attention_heads=heads,
        decoder_attention_heads=heads,
        encoder_ffn_dim=d_ff,
        decoder_ffn_dim=d_ff,
        max_position_embeddings=40,
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=1,
        activation_function=act,
        scale_embedding=scale,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        tie_word_embeddings=tied,
        init_std=init_std,
    )
    hf = transformers.MarianMTModel(hf_cfg).eval()
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # perturb everything but the fixed sinusoidal tables
        for name, p in hf.named_parameters():
            if perturb and "embed_positions" not in name:
                p.add_(0.3 * torch.randn_like(p)) if p.ndim == 1 else p.mul_(4.0)
        hf.final_logits_bias.add_(0.3 * perturb * torch.randn_like(hf.final_logits_bias))
        if not tied:  # transformers 5 then unties the stacks' inputs too; share them again
            for stack in (hf.model.encoder, hf.model.decoder):
                stack.embed_tokens.weight.copy_(hf.model.shared.weight)
    return hf, hf_cfg


@pytest.mark.parametrize("size", MARIAN_SIZES)
def test_translation_logits_match_hf_marian_with_source_padding(size):
    hf, hf_cfg = _hf_marian(*size)
    cfg, params = convert.from_hf_marian(_state_dict(hf), hf_cfg.to_dict())
    assert (cfg.n_layers, cfg.decoder_layers, cfg.scale_embedding) == (size[0], size[1], size[7])
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(2, size[5], (3, 11)), rng.integers(2, size[5], (3, 7))
    src_mask = (np.arange(11)[None] < np.array([[11], [8], [5]])).astype(np.int64)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(src_mask),
            decoder_input_ids=torch.tensor(tgt),
        ).logits.numpy()
    ours = seq2seq.forward(
        cfg, params, jnp.asarray(src), jnp.asarray(tgt), src_mask=jnp.asarray(src_mask)
    )
    _close(ours, ref)


def test_cached_greedy_matches_hf_marian_generate():
    # Random Marians repeat one token; wider unperturbed weights vary more.
    hf, hf_cfg = _hf_marian(*MARIAN_SIZES[0], init_std=0.2, perturb=False)
    cfg, params = convert.from_hf_marian(_state_dict(hf), hf_cfg.to_dict())
    src = np.random.default_rng(1).integers(2, cfg.vocab_size, (3, 9))
    src_mask = (np.arange(9)[None] < np.array([[9], [7], [4]])).astype(np.int64)
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(src_mask),
            do_sample=False,
            num_beams=1,
            max_new_tokens=12,
            min_new_tokens=12,
            bad_words_ids=None,
            forced_eos_token_id=None,
        ).numpy()
    ref = ref[:, 1:]  # drop the start token
    ours = np.asarray(
        seq2seq_decode.greedy(
            cfg, params, jnp.asarray(src), jnp.asarray(src_mask), start_id=0, eos_id=1, max_len=12
        )
    )
    assert len(np.unique(ref)) >= 3, "degenerate continuation: the test would prove little"
    np.testing.assert_array_equal(ours, ref)


def test_marian_import_refuses_what_it_cannot_represent():
    hf, hf_cfg = _hf_marian(*MARIAN_SIZES[1])
    sd = _state_dict(hf)
    bad = dict(
        sd,
        **{
            "model.encoder.embed_positions.weight": sd["model.encoder.embed_positions.weight"] + 0.1
        },
    )
    with pytest.raises(ValueError, match="sinusoidal"):
        convert.from_hf_marian(bad, hf_cfg.to_dict())
    with pytest.raises(ValueError, match="share"):
        convert.from_hf_marian(sd, dict(hf_cfg.to_dict(), share_encoder_decoder_embeddings=False))
    untied = dict(sd, **{"model.decoder.embed_tokens.weight": sd["model.shared.weight"] * 2})
    with pytest.raises(ValueError, match="embed_tokens differ"):
        convert.from_hf_marian(untied, hf_cfg.to_dict())
    with pytest.raises(ValueError, match="decoder_attention_heads"):
        convert.from_hf_marian(sd, dict(hf_cfg.to_dict(), decoder_attention_heads=3))


@pytest.mark.parametrize("family", ["bert", "marian"])
def test_directory_round_trip_through_hf_from_pretrained(family, tmp_path):
    """save_hf writes what `from_pretrained` reads (tied and untied); load_hf reads it back."""
    for tied in (True, False):
        if family == "bert":
            hf, hf_cfg = _hf_bert(*BERT_SIZES[0][:-1], tied)
            cfg, params = convert.from_hf_bert(_state_dict(hf), hf_cfg.to_dict())
            inputs = dict(input_ids=torch.tensor(np.arange(2, 14)[None] % cfg.vocab_size))
        else:
            hf, hf_cfg = _hf_marian(*MARIAN_SIZES[0][:-1], tied)
            cfg, params = convert.from_hf_marian(_state_dict(hf), hf_cfg.to_dict())
            inputs = dict(
                input_ids=torch.tensor([[5, 9, 2, 7]]), decoder_input_ids=torch.tensor([[0, 3, 8]])
            )
        path = str(tmp_path / f"{family}_{tied}")
        convert.save_hf(path, cfg, params)
        reloaded = type(hf).from_pretrained(path).eval()
        with torch.no_grad():  # Marian: our float32 position table, within 1e-5 of HF's
            _close(reloaded(**inputs).logits.numpy(), hf(**inputs).logits.numpy(), rtol=1e-5)
        hf.save_pretrained(path + "_hf")  # what HF writes: tied aliases stored once
        for directory in (path, path + "_hf"):
            cfg2, params2 = convert.load_hf(directory)
            assert cfg2 == cfg
            jax.tree.map(np.testing.assert_array_equal, params2, params)
