"""Greedy prediction and exact match on the number task for the three model families.

`predict` (batched, left-padded or masked, cached decoding) must equal a slow reference decode
that feeds one right-padded example at a time through the plain `forward` of each family and
takes the argmax step by step; and a nano encoder–decoder must learn the task (>= 95% exact
match on unseen numbers) in about a minute.
"""

import collections
import copy
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.config import EncoderConfig, ModelConfig, Seq2SeqConfig, get_preset
from gptjax.data import numbers
from gptjax.data.tokenizer import CharTokenizer, train_sentencepiece
from gptjax.evals import exact_match as task_eval
from gptjax.inference import decoding as seq2seq_decode
from gptjax.inference import sampling as sample
from gptjax.models import bert as encoder
from gptjax.models import gpt as model
from gptjax.models import transformer as seq2seq

TASK, MAX, SEQ = "numbers", 1000, 36  # sources up to 27 chars, targets up to 3 digits
TOK = CharTokenizer.from_texts(numbers.texts(TASK, "all", MAX))
V = TOK.vocab_size + 3  # a model vocabulary larger than the tokenizer's is allowed
# Untied output projections: with tied ones a random model mostly echoes its input token.
SMALL = dict(
    n_layers=2, d_model=32, n_heads=4, d_ff=48, vocab_size=V, max_len=40, tie_embeddings=False
)
FAMILY_NAMES = ("decoder", "encoder", "seq2seq")
CONFIGS = {
    "decoder": ModelConfig(**SMALL),
    "encoder": EncoderConfig(**SMALL),
    "seq2seq": Seq2SeqConfig(**SMALL, n_decoder_layers=3),
}
INITS = {
    "decoder": model.init_params,
    "encoder": encoder.init_params,
    "seq2seq": seq2seq.init_params,
}
# Five sources of four lengths; with batch_size 3 the second batch is padded.
SRCS = ["seven", "nine hundred ninety-nine", "ten", "four hundred twelve", "sixty-one"]
KW = dict(task=TASK, seq_len=SEQ, max_number=MAX, batch_size=3)


@functools.cache
def _params(family, std=0.1, seed=0):
    """Random weights from numpy in `init_params`' tree (no threefry compile): N(0, std)
    matrices, LayerNorm scales 1 + N(0, 0.1), biases N(0, 0.1). At std 0.1 (not the 0.02
    init) the random models' greedy outputs differ across sources and steps (asserted)."""
    shapes = jax.eval_shape(lambda k: INITS[family](CONFIGS[family], k), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = str(path)
        base, sd = (1.0, 0.1) if "scale" in name else (0.0, 0.1 if "bias" in name else std)
        return jnp.asarray(base + sd * rng.normal(size=x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _with_eos(eos_id):
    """The char tokenizer with another eos id (a token the models emit mid-row)."""
    tok = copy.copy(TOK)
    tok.eos_id = eos_id
    return tok


# --- slow references: right-padded rows, the plain forward, argmax per step -------------------

_decoder_forward = jax.jit(model.forward, static_argnums=0)
_encoder_forward = jax.jit(encoder.forward, static_argnums=0)
_seq2seq_forward = jax.jit(seq2seq.forward, static_argnums=0)
WIDTH = 33  # the references' row width: not SEQ, nor predict's left-padded prompt width


def _right_pad(ids, width=WIDTH):
    row = np.full((1, width), TOK.pad_id, np.int32)
    row[0, : len(ids)] = ids
    mask = np.zeros((1, width), np.int32)
    mask[0, : len(ids)] = 1
    return jnp.asarray(row), jnp.asarray(mask)


def _reference_ids(family, tok, src: str) -> list[int]:
    """Greedy ids by full forwards on one right-padded row: causal models never see the
    padding after their last real token; the encoder and the seq2seq source get a mask."""
    cfg, params, sp = CONFIGS[family], _params(family), tok
    s, tgt_len = tok.encode(src), numbers.tgt_len_of(TASK, tok, MAX)
    if family == "encoder":
        tokens, mask = _right_pad([sp.start_id, *s, sp.delimiter_id] + [sp.mask_id] * tgt_len)
        logits = _encoder_forward(cfg, params, tokens, mask=mask)[0]
        return task_eval.cut_at_eos(
            np.argmax(logits[len(s) + 2 : len(s) + 2 + tgt_len], -1), sp.eos_id
        )
    prefix = [sp.start_id, *s, sp.delimiter_id] if family == "decoder" else [sp.start_id]
    src, src_mask = _right_pad([*s, sp.eos_id])
    out = []
    for _ in range(tgt_len):
        seq = prefix + out
        row = _right_pad(seq)[0]
        logits = (
            _decoder_forward(cfg, params, row)
            if family == "decoder"
            else _seq2seq_forward(cfg, params, src, row, src_mask=src_mask)
        )
        out.append(int(np.argmax(logits[0, len(seq) - 1])))
        if out[-1] == sp.eos_id:
            break
    return task_eval.cut_at_eos(out, sp.eos_id)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_predict_equals_slow_reference_decode(family):
    cfg, params = CONFIGS[family], _params(family)
    expected = [_reference_ids(family, TOK, src) for src in SRCS]
    assert task_eval.predict_ids(cfg, params, TOK, SRCS, **KW) == expected
    assert len({tuple(e) for e in expected}) >= 3, "sources must lead to different outputs"
    assert len({t for e in expected for t in e}) >= 4, "steps must emit different tokens"
    assert task_eval.predict(cfg, params, TOK, SRCS, **KW) == [TOK.decode(ids) for ids in expected]
    # An eos the models do emit mid-row: rows stop (and are cut) at different lengths.
    counts = collections.Counter(t for e in expected for t in e[1:])
    tok = _with_eos(counts.most_common(1)[0][0])
    expected = [_reference_ids(family, tok, src) for src in SRCS]
    assert task_eval.predict_ids(cfg, params, tok, SRCS, **KW) == expected
    assert len({len(e) for e in expected}) >= 2, "the eos must cut some rows"


@pytest.mark.parametrize(
    "family,jitted",
    [
        ("decoder", sample._sample),
        ("encoder", task_eval._encoder_argmax),
        ("seq2seq", seq2seq_decode.greedy),
    ],
)
def test_predict_compiles_once_per_shape(family, jitted):
    cfg, params = CONFIGS[family], _params(family)
    task_eval.predict(cfg, params, TOK, SRCS, **KW)
    compiled = jitted._cache_size()
    task_eval.predict(cfg, params, TOK, ["one", "two hundred"], **KW)
    task_eval.predict(cfg, params, TOK, SRCS[::-1] * 2, **KW)
    assert jitted._cache_size() == compiled


def test_exact_match_and_preview_score_strings():
    cfg, params = CONFIGS["seq2seq"], _params("seq2seq")
    preds = task_eval.predict(cfg, params, TOK, SRCS, **KW)
    pairs = [(s, p if i % 2 == 0 else p + "0") for i, (s, p) in enumerate(zip(SRCS, preds))]
    assert task_eval.exact_match(cfg, params, TOK, pairs, **KW) == pytest.approx(3 / 5)
    lines = task_eval.preview(cfg, params, TOK, pairs, n=2, **KW).split("\n")
    assert lines == [
        f"{SRCS[0]} -> {preds[0]} ({preds[0]}) ✓",
        f"{SRCS[1]} -> {preds[1]} ({preds[1]}0) ✗",
    ]


def test_predict_errors_are_clear():
    cfg, params = CONFIGS["encoder"], _params("encoder")
    with pytest.raises(TypeError, match="dict is not a model config"):
        task_eval.predict({"n_layers": 2}, params, TOK, SRCS, **KW)
    with pytest.raises(ValueError, match="seq_len=20 is too small for the 'slots' format"):
        task_eval.predict(cfg, params, TOK, SRCS, **{**KW, "seq_len": 20})


# --- learning ----------------------------------------------------------------------------------

STEPS, BATCH, LR = 800, 64, 3e-3


def test_nano_encoder_decoder_learns_number_words():
    """Words -> digits over 0..9999 (the default range): >= 95% exact match on unseen numbers.

    A 400-piece BPE makes each number word one or two tokens (sources <= 7 tokens), so the nano
    Transformer (post-LN, 2+2 layers, d 64) learns the task in 800 steps of 64, 35-75 s on 2
    shared CPU cores. Measured: 99.4-100% on the 339 numbers scored here over init/data seeds
    0-5 (the misses are rare short forms like "seven" -> "70").
    """
    tok = train_sentencepiece(numbers.texts(TASK, "train"), 400, num_threads=1)
    seq_len = numbers.min_seq_len("pair", TASK, tok)
    cfg = get_preset("nano_transformer_tiny", vocab_size=tok.vocab_size, max_len=seq_len)
    train_iter, _ = numbers.make_task_datasets(TASK, "pair", tok, seq_len, BATCH)
    # The rbg generator: threefry's init compiles ~3x slower on CPU, for the same distribution.
    params = jax.jit(seq2seq.init_params, static_argnums=0)(cfg, jax.random.key(0, impl="rbg"))
    schedule = optax.warmup_cosine_decay_schedule(0.0, LR, 50, STEPS, LR / 10)
    # Clipping matters: without it some seeds sit on the "digit frequencies" plateau
    # (nll ~2.0) for all 800 steps; with it, seeds 0-5 all pass 99% by step 500.
    opt = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.98, weight_decay=0.01)
    )
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        def loss_fn(p):
            logits = seq2seq.forward(
                cfg, p, batch["src"], batch["tgt_in"], src_mask=batch["src_mask"]
            )
            return seq2seq.label_smoothed_loss(logits, batch["tgt"], batch["tgt_mask"])

        (_, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, nll

    start = time.time()
    for _ in range(STEPS):
        params, opt_state, nll = train_step(params, opt_state, next(train_iter))
    val = numbers.pairs(TASK, "validation")[::3]  # 339 numbers spread over the range
    kw = dict(task=TASK, seq_len=seq_len, batch_size=128)
    accuracy = task_eval.exact_match(cfg, params, tok, val, **kw)
    print(
        f"\n{STEPS} steps, {time.time() - start:.0f}s, nll {float(nll):.3f}, exact match "
        f"{accuracy:.3f}\n" + task_eval.preview(cfg, params, tok, val, **kw)
    )
    assert accuracy >= 0.95
