"""GPT-2 / GPT-1 interop: logits, gradients and greedy text equal Hugging Face's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gptjax import hf as convert
from gptjax.inference import sampling as sample  # noqa: E402
from gptjax.models import gpt as model

# (layers, width, heads, d_ff or None, vocab, context, tied): odd sizes on purpose.
SIZES = [
    (3, 35, 5, 51, 97, 23, True),
    (2, 24, 3, None, 61, 17, True),
    (2, 21, 7, 33, 89, 19, False),
]


def _hf_gpt2(layers, width, heads, d_ff, vocab, ctx, tied, seed=0):
    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        n_inner=d_ff,
        vocab_size=vocab,
        n_positions=ctx,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, larger weights
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p)) if p.ndim == 1 else p.mul_(8.0)
    return hf, hf_cfg


def _state_dict(hf):
    return {k: v.detach().numpy() for k, v in hf.state_dict().items()}


def _tokens(vocab, shape=(3, 15), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.mark.parametrize("size", SIZES)
def test_logits_and_gradients_match_hf_gpt2(size):
    hf, hf_cfg = _hf_gpt2(*size)
    cfg, params = convert.from_hf_gpt2(_state_dict(hf), hf_cfg.to_dict())
    tokens = _tokens(size[4])

    hf_out = hf(torch.tensor(tokens), labels=torch.tensor(tokens))
    hf_out.loss.backward()
    ours = model.forward(cfg, params, jnp.asarray(tokens))
    ref = hf_out.logits.detach().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    def loss_fn(p):
        logits = model.forward(cfg, p, jnp.asarray(tokens[:, :-1]))
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(jax.tree.map(jnp.asarray, params))
    np.testing.assert_allclose(loss, hf_out.loss.item(), rtol=1e-5)
    hf_grads = {k: p.grad.numpy() for k, p in hf.named_parameters()}
    if size[-1]:  # tied: HF reports the shared weight's gradient once
        hf_grads["lm_head.weight"] = hf_grads["transformer.wte.weight"]
    _, expected = convert.from_hf_gpt2(hf_grads, hf_cfg.to_dict())
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected)):
        scale = np.abs(e).max() + 1e-12
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * scale, err_msg=str(path))


def test_greedy_continuation_matches_hf_generate():
    hf, hf_cfg = _hf_gpt2(*SIZES[0])
    cfg, params = convert.from_hf_gpt2(_state_dict(hf), hf_cfg.to_dict())
    prompt = _tokens(cfg.vocab_size, (2, 6), seed=3)
    hf_tokens = hf.generate(
        torch.tensor(prompt),
        attention_mask=torch.ones(2, 6, dtype=torch.long),
        do_sample=False,
        max_new_tokens=10,
        min_new_tokens=10,
        pad_token_id=0,
    ).numpy()
    ours = sample.generate(
        cfg, params, prompt, key=jax.random.key(0), max_new_tokens=10, greedy=True
    )
    np.testing.assert_array_equal(ours.tokens, hf_tokens)


def test_left_padded_batch_matches_hf_with_attention_mask():
    hf, hf_cfg = _hf_gpt2(*SIZES[1])
    cfg, params = convert.from_hf_gpt2(_state_dict(hf), hf_cfg.to_dict())
    tokens, mask = sample.left_pad([[5, 9, 2, 7, 1, 3], [8, 4, 4]])
    position_ids = np.maximum(np.cumsum(mask, 1) - 1, 0)
    ref = (
        hf(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(position_ids),
        )
        .logits.detach()
        .numpy()
    )
    ours = model.forward(cfg, params, tokens, mask=mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], ref[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", SIZES)
def test_export_import_round_trip_is_exact(size, tmp_path):
    hf, hf_cfg = _hf_gpt2(*size)
    sd = _state_dict(hf)
    cfg, params = convert.from_hf_gpt2(sd, hf_cfg.to_dict())
    sd2, hf_config2 = convert.to_hf_gpt2(cfg, params)
    assert set(sd2) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(sd2[k], sd[k], err_msg=k)
    # Files: what we write, Hugging Face reads, and gives the same logits.
    convert.save_hf_gpt2(str(tmp_path), cfg, params)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    tokens = torch.tensor(_tokens(size[4]))
    np.testing.assert_array_equal(
        reloaded(tokens).logits.detach().numpy(), hf(tokens).logits.detach().numpy()
    )
    cfg3, params3 = convert.load_hf_gpt2(str(tmp_path))
    assert cfg3 == cfg
    for a, b in zip(jax.tree.leaves(params3), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_pytorch_bin_directory_loads(tmp_path):
    hf, hf_cfg = _hf_gpt2(*SIZES[1])
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf_cfg.to_json_string())
    cfg, params = convert.load_hf_gpt2(str(tmp_path))
    tokens = _tokens(cfg.vocab_size)
    np.testing.assert_allclose(
        model.forward(cfg, params, tokens),
        hf(torch.tensor(tokens)).logits.detach().numpy(),
        rtol=1e-4,
        atol=1e-4,
    )


def test_gpt1_post_ln_matches_hf_openai_gpt():
    torch.manual_seed(0)
    hf_cfg = transformers.OpenAIGPTConfig(
        n_layer=2,
        n_embd=28,
        n_head=4,
        vocab_size=67,
        n_positions=16,
        afn="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    hf = transformers.OpenAIGPTLMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.3 * torch.randn_like(p)) if p.ndim == 1 else p.mul_(8.0)
    cfg, params = convert.from_hf_openai_gpt(_state_dict(hf), hf_cfg.to_dict())
    assert cfg.ln_placement == "post"
    tokens = _tokens(67)
    ref = hf(torch.tensor(tokens)).logits.detach().numpy()
    np.testing.assert_allclose(
        model.forward(cfg, params, tokens), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max()
    )


def test_conversion_errors_are_clear(tmp_path):
    hf, hf_cfg = _hf_gpt2(*SIZES[1])
    bad = hf_cfg.to_dict() | {"activation_function": "relu"}
    with pytest.raises(ValueError, match="tanh-approximated GELU"):
        convert.from_hf_gpt2(_state_dict(hf), bad)
    sd = _state_dict(hf)
    del sd["transformer.h.1.mlp.c_fc.weight"]
    with pytest.raises(KeyError, match="h.1.mlp.c_fc.weight"):
        convert.from_hf_gpt2(sd, hf_cfg.to_dict())
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.load_hf_gpt2(str(tmp_path))
    cfg, params = convert.from_hf_gpt2(_state_dict(hf), hf_cfg.to_dict())
    with pytest.raises(ValueError, match="only GPT-2-shaped"):
        convert.to_hf_gpt2(cfg.replace(ln_placement="post"), params)
