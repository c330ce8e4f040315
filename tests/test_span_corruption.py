"""T5's span corruption: T5's noise statistics, exact reconstruction, sentinels, determinism,
the seq2seq batch format, the corpus path (resumable), a loss on it, and the study's sweep."""

import functools
import types

import gin
import jax
import numpy as np
import pytest

from gptjax import experiments
from gptjax.config import Seq2SeqConfig
from gptjax.data import span_corruption as sc
from gptjax.data.config import DataConfig, run_datasets
from gptjax.data.pipeline import TokenBatchIterator
from gptjax.data.tokenizer import ByteTokenizer, Specials
from gptjax.evals.hooks import train_with_defaults
from gptjax.models import family
from gptjax.parallel import mesh as sharding
from gptjax.research import sweep as sw
from gptjax.training.metrics import read_metrics
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig

TOK = ByteTokenizer()
SP = Specials.of(TOK)
BASE = TOK.vocab_size  # the first sentinel
S2S = Seq2SeqConfig(
    n_layers=2, d_model=32, n_heads=4, d_ff=64, vocab_size=300, max_len=32, n_decoder_layers=1
)


def _corrupt(tokens, seed, **kw):
    return sc.corrupt(
        tokens, np.random.default_rng(seed), sentinel_start=BASE, eos_id=SP.eos_id, **kw
    )


def _spans(mask):
    """Lengths of the runs of True in a 1-D mask."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)


@pytest.mark.parametrize("lengths", ["mixed 64..512", 512])
def test_noise_density_and_mean_span_length_on_100k_tokens(lengths):
    rng = np.random.default_rng(0)
    noise = spans = total = 0
    while total < 100_000:
        length = int(rng.integers(64, 513)) if lengths == "mixed 64..512" else lengths
        mask = sc.noise_mask(length, rng)
        runs = _spans(mask)
        assert len(runs) == sc.num_sentinels(length) and runs.min() >= 1
        assert not mask[0] and mask[-1]  # T5 interleaves from non-noise and ends in noise
        noise, spans, total = noise + mask.sum(), spans + len(runs), total + length
    assert abs(noise / total - 0.15) <= 0.005, noise / total
    assert abs(noise / spans - 3.0) <= 0.1, noise / spans


def test_span_lengths_vary_and_noise_is_spread_over_the_window():
    rng = np.random.default_rng(1)
    masks = np.stack([sc.noise_mask(128, rng) for _ in range(2000)])
    assert (masks.sum(1) == 19).all()  # round(128 * 0.15), in round(19 / 3) = 6 spans
    lengths = np.concatenate([_spans(m) for m in masks])
    assert len(lengths) == 6 * 2000 and lengths.max() >= 8 and (lengths == 1).mean() > 0.2
    # The first token is never noise and the last always is (T5 interleaves from non-noise
    # and ends in noise), so noise thins at the start and thickens at the end; inside, alike.
    interior = masks[:, 8:-10].mean(0)
    assert interior.min() > 0.1 and interior.max() < 0.17


def test_inputs_and_targets_reconstruct_the_window_with_sentinels_in_order():
    rng = np.random.default_rng(2)
    lengths = [*range(1, 21)] * 20 + list(rng.integers(21, 600, 100))
    for i, length in enumerate(lengths):
        window = rng.integers(0, TOK.vocab_size, length)  # specials (eos too) included
        inputs, targets = _corrupt(window, seed=i)
        assert inputs[-1] == SP.eos_id and targets[-1] == SP.eos_id
        assert (len(inputs), len(targets)) == sc.corrupted_lengths(length)
        back = sc.reconstruct(inputs, targets, sentinel_start=BASE, eos_id=SP.eos_id)
        np.testing.assert_array_equal(back, window)
        n = sc.num_sentinels(length) if length > 1 else 0
        expected = BASE + np.arange(n)
        np.testing.assert_array_equal(inputs[inputs >= BASE], expected)  # unique, ascending
        target_sentinels = targets[targets >= BASE]
        np.testing.assert_array_equal(target_sentinels, BASE + np.arange(max(n, 1)))
        assert targets[0] == BASE  # the target opens with the first sentinel
        kept = inputs[:-1][inputs[:-1] < BASE]
        assert len(kept) == length - (len(targets) - 1 - len(target_sentinels))


def test_the_docstring_example_and_a_single_token():
    inputs, targets = sc.corrupt(
        np.arange(10) + 10, np.random.default_rng(0), sentinel_start=100, eos_id=1
    )
    assert len(targets) == 2 + 1 + 1 and targets[0] == 100  # round(1.5) = 2 tokens, 1 span
    inputs, targets = _corrupt(np.array([42]), seed=0)
    assert inputs.tolist() == [42, SP.eos_id] and targets.tolist() == [BASE, SP.eos_id]
    inputs, targets = sc.corrupt(
        np.array([5, 6, 7]), np.random.default_rng(0), sentinel_start=9, eos_id=None
    )
    assert sc.reconstruct(inputs, targets, sentinel_start=9, eos_id=None).tolist() == [5, 6, 7]


def test_sentinels_never_collide_with_real_or_special_ids():
    assert sc.sentinel_start(TOK) == BASE == TOK.vocab_size
    assert all(i < BASE for i in TOK.special_ids) and max(TOK.encode("x\n\t<s>é")) < BASE
    # GPT-2's BPE keeps start / delim / extract / mask just past its vocabulary: above them.
    gpt2_like = types.SimpleNamespace(vocab_size=50257, special_ids={50256, *range(50257, 50261)})
    assert sc.sentinel_start(gpt2_like) == 50261
    with pytest.raises(ValueError, match="collide"):
        _corrupt(np.array([1, 2, BASE, 3]), seed=0)
    with pytest.raises(ValueError, match="at least 265"):  # 263 ids + 2 sentinels at T = 32
        sc.check_sentinel_vocab(TOK.vocab_size, 264, 32)
    sc.check_sentinel_vocab(TOK.vocab_size, 265, 32)
    with pytest.raises(ValueError, match="noise_density"):
        sc.noise_mask(10, np.random.default_rng(0), noise_density=1.0)


def test_the_same_seed_gives_the_same_corruption():
    window = np.arange(200) % 250
    a, b = _corrupt(window, 7), _corrupt(window, 7)
    np.testing.assert_array_equal(a[0], b[0]) and np.testing.assert_array_equal(a[1], b[1])
    others = [_corrupt(window, s)[0] for s in range(8, 12)]
    assert all(not np.array_equal(a[0], o) for o in others)
    objective = sc.WindowSpanCorruption(SP, BASE)
    windows = np.tile(window[:33], (3, 1))
    keys = np.array([[0, 0, 5], [0, 0, 5], [0, 1, 5]])
    out = objective(windows, keys)
    np.testing.assert_array_equal(out["src"][0], out["src"][1])  # same (seed, epoch, window)
    assert not np.array_equal(out["src"][0], out["src"][2])  # another epoch: other spans


def test_pair_batch_pads_and_masks_like_the_prefix_split():
    pairs = [_corrupt(np.arange(n) + 10, n) for n in (5, 20, 12)]
    batch = sc.pair_batch(pairs, SP, src_len=24, tgt_len=9)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "src": ((3, 24), np.int32),
        "src_mask": ((3, 24), np.int32),
        "tgt_in": ((3, 9), np.int32),
        "tgt": ((3, 9), np.int32),
        "tgt_mask": ((3, 9), np.float32),
    }
    for i, (s, t) in enumerate(pairs):
        np.testing.assert_array_equal(batch["src"][i, : len(s)], s)
        np.testing.assert_array_equal(batch["tgt"][i, : len(t)], t)
        np.testing.assert_array_equal(batch["tgt_in"][i, : len(t)], [SP.start_id, *t[:-1]])
        assert (batch["src"][i, len(s) :] == SP.pad_id).all()
        assert (batch["tgt"][i, len(t) :] == SP.pad_id).all()
        assert batch["src_mask"][i].sum() == len(s) and batch["src_mask"][i, : len(s)].all()
        assert batch["tgt_mask"][i].sum() == len(t) and batch["tgt_mask"][i, : len(t)].all()
    assert sc.pair_batch(pairs, SP)["src"].shape == (3, max(len(s) for s, _ in pairs))
    with pytest.raises(ValueError, match="more than the widths"):
        sc.pair_batch(pairs, SP, src_len=8)
    full = sc.WindowSpanCorruption(SP, BASE)(np.zeros((2, 129), np.int64) + 70, np.zeros((2, 3)))
    assert full["src"].shape == (2, 116) and full["tgt"].shape == (2, 26)
    assert full["src_mask"].all() and full["tgt_mask"].all()  # full windows need no padding


def test_loss_on_span_corrupted_batches_is_finite_and_ignores_padding():
    windows = np.random.default_rng(3).integers(0, TOK.vocab_size, (4, 33))
    keys = np.stack([np.zeros(4), np.zeros(4), np.arange(4)], 1)
    corrupted = sc.WindowSpanCorruption(SP, BASE)(windows, keys)
    batch = family.from_windows(S2S, corrupted, TOK, None)
    assert batch is corrupted  # already in the seq2seq format: from_windows passes it
    assert batch["src"].shape == (4, 30) and batch["tgt"].max() >= BASE  # sentinels are targets
    params = jax.jit(family.init_params, static_argnums=0)(S2S, jax.random.key(0))
    loss_and_grads = jax.jit(jax.value_and_grad(functools.partial(family.loss, S2S)))
    loss, grads = loss_and_grads(params, batch)
    assert np.isfinite(loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.log(S2S.vocab_size) * 0.5 < loss < np.log(S2S.vocab_size) * 1.5
    # The same rows padded wider: the loss over the real tokens does not move.
    pairs = [(batch["src"][i], batch["tgt"][i]) for i in range(4)]
    padded = sc.pair_batch(pairs, SP, src_len=32, tgt_len=12)
    np.testing.assert_allclose(loss_and_grads(params, padded)[0], loss, rtol=1e-5)


def test_run_datasets_span_corrupts_resumably_and_checks_its_inputs(corpus, tmp_path):
    cfg = DataConfig(
        dataset=corpus,
        tokenizer="byte",
        data_dir=str(tmp_path),
        seq2seq_objective="span_corruption",
    )
    kw = dict(task_format="pair", seq_len=32, batch_size=4, seed=3, model_vocab_size=300)
    train, eval_factory = run_datasets(cfg, TOK, **kw)
    assert isinstance(train, TokenBatchIterator)
    for _ in range(3):
        next(train)
    state = train.get_state()
    expected = [next(train) for _ in range(2)]
    resumed, _ = run_datasets(cfg, TOK, **kw)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert set(got) == {"src", "src_mask", "tgt_in", "tgt", "tgt_mask"}
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    first, again = next(eval_factory()), next(eval_factory())  # every eval: the same spans
    np.testing.assert_array_equal(first["tgt"], again["tgt"])
    with pytest.raises(ValueError, match="encoder–decoder's corpus objective"):
        run_datasets(cfg, TOK, **{**kw, "task_format": "causal"})
    with pytest.raises(ValueError, match="at least 265"):
        run_datasets(cfg, TOK, **{**kw, "model_vocab_size": 263})
    with pytest.raises(ValueError, match="not one of"):
        DataConfig(seq2seq_objective="t5")
    with pytest.raises(ValueError, match="its own pairs"):
        DataConfig(dataset="numbers", seq2seq_objective="span_corruption")


def test_loop_trains_and_resumes_exactly_on_span_corruption(corpus, tmp_path):
    """The loop on 8 fake devices (data parallel): the loss falls, and a stopped run resumes
    to the same losses (a window's spans are keyed by its position, which the checkpoint
    restores)."""

    def run(workdir, stop_after=None):
        return train_with_defaults(
            str(workdir),
            model_cfg=S2S,
            train_cfg=TrainConfig(
                steps=8,
                batch_size=8,
                seq_len=32,
                log_every=1,
                eval_every=8,
                eval_batches=1,
                checkpoint_every=4,
                sample_tokens=4,
                sample_prompt="def ",
                compilation_cache_dir=str(tmp_path / "jax_cache"),
            ),
            opt_cfg=OptimizerConfig(peak_lr=3e-3, warmup_steps=2),
            data_cfg=DataConfig(
                dataset=corpus,
                tokenizer="byte",
                data_dir=str(tmp_path / "data"),
                seq2seq_objective="span_corruption",
            ),
            mesh_cfg=sharding.MeshConfig(),
            stop_after=stop_after,
        )

    def losses(workdir):
        return {r["step"]: r["train/loss"] for r in read_metrics(str(workdir)) if "train/loss" in r}

    summary = run(tmp_path / "a")
    assert np.isfinite(summary["eval/loss"])
    full = losses(tmp_path / "a")
    assert np.mean([full[s] for s in (6, 7, 8)]) < np.mean([full[s] for s in (1, 2, 3)])
    run(tmp_path / "b", stop_after=4)
    run(tmp_path / "b")
    resumed = losses(tmp_path / "b")
    np.testing.assert_allclose(
        [resumed[s] for s in range(5, 9)], [full[s] for s in range(5, 9)], rtol=1e-4
    )


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_the_study_sweep_builds_a_span_corruption_variant_of_matched_size(clean_gin):
    experiments.parse_gin(["sweeps/encoder_vs_decoder_span.gin"], [])
    sweep = sw.Sweep()
    variants = {v.name: v for v in sw.expand(sweep)}
    assert sweep.baseline in variants and len(variants) == 4
    sizes = {}
    for name, variant in variants.items():
        sw.parse_experiment(sweep.base, sw.run_bindings(sweep, variant, 0))
        cfg, data_cfg, train_cfg = family.model_config(), DataConfig(), TrainConfig()
        sizes[name] = family.param_count(cfg)
        if data_cfg.uses_span_corruption:
            assert family.family_of(cfg) is family.SEQ2SEQ
            sc.check_sentinel_vocab(
                data_cfg.tokenizer_vocab_size, cfg.vocab_size, train_cfg.seq_len
            )
            assert sc.corrupted_lengths(train_cfg.seq_len)[0] <= cfg.max_len
    seq2seq = [n for n in sizes if n.startswith("family=seq2seq")]
    assert len(seq2seq) == 2 and sizes[seq2seq[0]] == sizes[seq2seq[1]]
    assert max(sizes.values()) / min(sizes.values()) < 1.03
