"""BERT and the encoder–decoder through the decoder's train step, loop, checkpoints and CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.config import EncoderConfig, ModelConfig, Seq2SeqConfig
from gptjax.data.config import DataConfig
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.evals.hooks import train_with_defaults
from gptjax.evals.in_context import split_perplexity
from gptjax.models import bert as encoder
from gptjax.models import family
from gptjax.models import transformer as seq2seq
from gptjax.parallel import mesh as sharding
from gptjax.training.metrics import read_metrics
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig, loss_fn
from gptjax.training.workdir import load_run
from tests.reference import decoder_param_count

ENC = EncoderConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=300, max_len=32)
S2S = Seq2SeqConfig(
    n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=300, max_len=32, n_decoder_layers=1
)
ALL_DEVICES = sharding.MeshConfig(shape={"data": 2, "fsdp": 2, "tensor": 2}, rules="fsdp_tp")


def test_family_of_and_model_config():
    assert family.family_of(ModelConfig()) is family.DECODER
    assert family.family_of(ENC) is family.ENCODER and family.family_of(S2S) is family.SEQ2SEQ
    assert isinstance(family.model_config("seq2seq"), Seq2SeqConfig)
    with pytest.raises(ValueError, match="not one of"):
        family.model_config("rnn")
    # param_count counts each family's own init
    for cfg, init in ((ENC, encoder.init_params), (S2S, seq2seq.init_params)):
        shapes = jax.eval_shape(lambda k, cfg=cfg, init=init: init(cfg, k), jax.random.key(0))
        assert family.param_count(cfg) == sum(x.size for x in jax.tree.leaves(shapes))
    assert family.param_count(ModelConfig()) == decoder_param_count(ModelConfig())


def test_encoder_windows_are_bert_masked_and_the_loss_is_the_mlm_loss():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    window = {"tokens": rng.integers(0, 256, (4, 33)).astype(np.int32)}
    window["tokens"][:, 5] = tok.eos_id  # a document separator: never chosen
    batch = family.from_windows(ENC, window, tok, jax.random.key(1))
    assert set(batch) == {"tokens", "targets", "loss_mask"}
    np.testing.assert_array_equal(batch["targets"], window["tokens"][:, :-1])
    assert not batch["loss_mask"][:, 5].any() and batch["loss_mask"].sum() > 0
    changed = batch["tokens"] != batch["targets"]
    assert not (changed & (batch["loss_mask"] == 0)).any()  # only chosen positions differ
    params = encoder.init_params(ENC, jax.random.key(0))
    logits = encoder.forward(ENC, params, jnp.asarray(batch["tokens"]))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(loss_fn(ENC, params, batch), expected, rtol=1e-5)


def test_seq2seq_windows_split_source_and_target_and_the_loss_is_label_smoothed():
    tok = ByteTokenizer()
    tokens = np.arange(2 * 17, dtype=np.int32).reshape(2, 17)
    batch = family.from_windows(S2S, {"tokens": tokens}, tok, jax.random.key(0))
    np.testing.assert_array_equal(batch["src"], tokens[:, :8])
    np.testing.assert_array_equal(batch["tgt"], tokens[:, 8:16])
    np.testing.assert_array_equal(batch["tgt_in"][:, 0], tok.start_id)
    np.testing.assert_array_equal(batch["tgt_in"][:, 1:], tokens[:, 8:15])
    params = seq2seq.init_params(S2S, jax.random.key(0))
    logits = seq2seq.forward(S2S, params, batch["src"], batch["tgt_in"])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["tgt"][..., None], -1)[..., 0]
    eps = S2S.label_smoothing
    expected = ((1 - eps) * nll - eps * logp.mean(-1)).mean()
    np.testing.assert_allclose(loss_fn(S2S, params, batch), expected, rtol=1e-5)
    sums = family.eval_sums(S2S, params, batch)
    np.testing.assert_allclose(sums["loss_sum"] / sums["tokens"], nll.mean(), rtol=1e-5)


@pytest.mark.parametrize("cfg", [ENC, S2S], ids=["encoder", "seq2seq"])
def test_loop_trains_resumes_and_reloads_each_family(corpus, tmp_path, cfg):
    """8 fake devices under fsdp_tp: the loss falls, a stopped BERT run resumes to the same
    losses as an uninterrupted one (its masks are keyed by the step), and load_run gives
    back the family's config and parameter tree; `gptjax eval`'s perplexity at the loop's
    eval batches (the same masks) is the loop's eval loss."""

    def run(workdir, stop_after=None):
        train_cfg = TrainConfig(
            steps=12,
            batch_size=8,
            seq_len=32,
            log_every=1,
            eval_every=6,
            eval_batches=2,
            checkpoint_every=3,
            sample_tokens=8,
            sample_prompt="def ",
            compilation_cache_dir=str(tmp_path / "jax_cache"),
        )
        return train_with_defaults(
            str(workdir),
            model_cfg=cfg,
            train_cfg=train_cfg,
            opt_cfg=OptimizerConfig(peak_lr=3e-3, warmup_steps=2),
            data_cfg=DataConfig(dataset=corpus, tokenizer="byte", data_dir=str(tmp_path / "data")),
            mesh_cfg=ALL_DEVICES,
            stop_after=stop_after,
        )

    summary = run(tmp_path / "a")
    losses = {
        r["step"]: r["train/loss"] for r in read_metrics(str(tmp_path / "a")) if "train/loss" in r
    }
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)])
    assert np.isfinite(summary["eval/loss"]) and summary["sample"]
    if family.family_of(cfg) is family.ENCODER:  # masks are keyed by step: a resume is exact
        run(tmp_path / "b", stop_after=5)
        run(tmp_path / "b")
        resumed = {
            r["step"]: r["train/loss"]
            for r in read_metrics(str(tmp_path / "b"))
            if "train/loss" in r
        }
        np.testing.assert_allclose(
            [resumed[s] for s in range(6, 13)], [losses[s] for s in range(6, 13)], rtol=1e-4
        )
    loaded_cfg, params, tokenizer, configs, _ = load_run(str(tmp_path / "a"))
    assert loaded_cfg == cfg
    out = split_perplexity(loaded_cfg, params, tokenizer, configs, batch_size=8, max_batches=2)
    np.testing.assert_allclose(out["loss"], summary["eval/loss"], rtol=1e-5)
    with open(tmp_path / "a" / "config.json") as f:
        assert json.load(f)["family"] == family.family_of(cfg).name
    assert jax.tree.structure(params) == jax.tree.structure(
        family.init_params(cfg, jax.random.key(0))
    )


@pytest.mark.parametrize("vocab", [400, 4096])
def test_the_study_families_are_matched_in_size(vocab):
    """experiments/models/families.gin: the three families within 3% of each other."""
    import gin

    from gptjax.experiments import parse_gin

    counts = {}
    try:
        for name in family.FAMILIES:
            parse_gin(
                ["models/families.gin"],
                [f"VOCAB = {vocab}", "MAX_LEN = 64", f"model_config.family = {name!r}"],
            )
            cfg = family.model_config()
            assert family.family_of(cfg).name == name
            counts[name] = family.param_count(cfg)
    finally:
        gin.clear_config()
    assert max(counts.values()) / min(counts.values()) < 1.03, counts


def test_cli_trains_the_numbers_task_and_decodes_it(tmp_path, capsys):
    """`gptjax train` on experiments/seq2seq_numbers.gin (shortened), then `gptjax sample`
    with beams; an encoder-only model refuses to sample, with a clear error."""
    import gin

    from gptjax.cli.main import main

    work = tmp_path / "numbers"
    short = [
        "STEPS = 40",
        "WARMUP_STEPS = 5",
        "BATCH_SIZE = 32",
        "TrainConfig.eval_every = 40",
        "TrainConfig.checkpoint_every = 40",
        "TrainConfig.eval_batches = 2",
        f"TrainConfig.compilation_cache_dir = '{tmp_path / 'cache'}'",
        f"DataConfig.data_dir = '{tmp_path / 'data'}'",
    ]
    try:
        assert main(
            [
                "train",
                "--gin_file=experiments/seq2seq_numbers.gin",
                f"--workdir={work}",
                *(f"--gin_bindings={b}" for b in short),
            ]
        ) in (0, None)
    finally:
        gin.clear_config()
    rows = read_metrics(str(work))
    assert 0.0 <= rows[-1]["eval/exact_match"] <= 1.0 and rows[-1]["eval/loss"] < 3.0
    capsys.readouterr()
    assert main(
        ["sample", f"--workdir={work}", "--prompt=forty-two", "--num_beams=2", "--max_new_tokens=6"]
    ) in (0, None)
    assert "forty-two" in capsys.readouterr().out
    loaded_cfg, *_ = load_run(str(work))
    assert family.family_of(loaded_cfg) is family.SEQ2SEQ
    from gptjax.cli.main import _sample_family

    with pytest.raises(ValueError, match="does not generate"):
        _sample_family(None, ENC, None, None, 0)
