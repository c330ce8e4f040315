"""GPT-1 fine-tuning: input transforms, each head's loss against a direct computation on
unpadded sequences, similarity symmetry, multiple-choice equivariance, L3 = L2 + λ·L1; the same
heads on the encoder (BERT: [CLS] state, token types, padding mask) and the encoder–decoder
(BART: decoder state at <extract>), checked against direct paths and trained on a toy task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.config import EncoderConfig, ModelConfig, Seq2SeqConfig
from gptjax.data.tokenizer import Specials
from gptjax.models import bert as encoder
from gptjax.models import gpt as model
from gptjax.models import transformer as seq2seq
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.research import finetune as ft
from gptjax.research import gpt1_tasks
from gptjax.training.optimizer import OptimizerConfig, make_optimizer
from gptjax.training.step import place_state

SP = Specials(pad_id=0, eos_id=1, start_id=4, delimiter_id=5, extract_id=6, mask_id=7)
# Unrolled layers: eager calls then reuse per-op compilations (a scan re-traces every call).
CFG = ModelConfig(
    n_layers=2, d_model=20, n_heads=5, d_ff=28, vocab_size=31, max_len=16, scan_layers=False
)
GPT = model.init_params(CFG, jax.random.key(0))
HIDDEN = jax.jit(lambda tokens: model.hidden_states(CFG, GPT, tokens))


def _mesh(shape: dict, rules: str = "dp"):
    n = int(np.prod(list(shape.values())))
    return (
        sharding.make_mesh(sharding.MeshConfig(shape=shape), jax.devices()[:n]),
        logical.logical_axis_rules(rules),
    )


ONE_DEVICE = _mesh({"data": 1})


def _train_step(cfg, kind, fc, optimizer, params, mesh_rules=ONE_DEVICE, seed=0):
    """(jitted step, its step-0 state): `ft.make_train_step` as `finetune` builds it."""
    step, shards = ft.make_train_step(cfg, kind, fc, optimizer, params, *mesh_rules)
    return step, place_state(optimizer, params, jax.random.key(seed), shards)


def test_input_transforms_frame_segments_with_the_special_tokens():
    assert gpt1_tasks.transform("classification", [[10, 11]], SP, 8) == [[4, 10, 11, 6]]
    assert gpt1_tasks.transform("entailment", [[10, 11], [20]], SP, 8) == [[4, 10, 11, 5, 20, 6]]
    assert gpt1_tasks.transform("similarity", [[10], [20, 21]], SP, 8) == [
        [4, 10, 5, 20, 21, 6],
        [4, 20, 21, 5, 10, 6],
    ]
    assert gpt1_tasks.transform("multiple_choice", [[10], [20], [21, 22]], SP, 8) == [
        [4, 10, 5, 20, 6],
        [4, 10, 5, 21, 22, 6],
    ]
    # too long: the premise loses its oldest tokens first, then the hypothesis its end
    assert gpt1_tasks.transform("entailment", [[10, 11, 12, 13], [20, 21]], SP, 7) == [
        [4, 12, 13, 5, 20, 21, 6]
    ]
    assert gpt1_tasks.transform("entailment", [[10], [20, 21, 22, 23, 24]], SP, 6) == [
        [4, 5, 20, 21, 22, 6]
    ]
    assert gpt1_tasks.transform("classification", [list(range(10, 20))], SP, 5) == [
        [4, 10, 11, 12, 6]
    ]
    with pytest.raises(ValueError, match="unknown task kind"):
        gpt1_tasks.transform("regression", [[1], [2]], SP, 8)
    with pytest.raises(ValueError, match="two texts"):
        gpt1_tasks.transform("similarity", [[1]], SP, 8)


def test_batch_pads_right_and_marks_extract_and_lm_targets():
    batch = gpt1_tasks.make_batch("entailment", [([[10, 11], [20]], 1), ([[12], [21]], 0)], SP, 8)
    np.testing.assert_array_equal(
        batch["tokens"][:, 0], [[4, 10, 11, 5, 20, 6, 0, 0], [4, 12, 5, 21, 6, 0, 0, 0]]
    )
    np.testing.assert_array_equal(batch["extract"], [[5], [4]])
    np.testing.assert_array_equal(
        batch["lm_mask"][:, 0], [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0]]
    )
    np.testing.assert_array_equal(
        batch["segment"][:, 0], [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]
    )
    one = gpt1_tasks.make_batch("classification", [([[10, 11]], 0)], SP, 6)
    np.testing.assert_array_equal(one["segment"], np.zeros((1, 1, 6)))
    np.testing.assert_array_equal(batch["label"], [1, 0])


EXAMPLES = {
    "classification": [([[10, 11, 12]], 1), ([[13]], 0)],
    "entailment": [([[10, 11], [20]], 1), ([[12], [21, 22, 23]], 0)],
    "similarity": [([[10, 11], [20]], 1), ([[12], [21, 22]], 0)],
    "multiple_choice": [([[10], [20], [21, 22], [23]], 2), ([[11, 12], [24], [25], [26, 27]], 0)],
}


def _direct_loss(kind, head, examples, lm_coef):
    """L2 + λ·L1 from the trunk run on each unpadded sequence separately, by hand."""
    clf_losses, lm_sum, lm_count = [], 0.0, 0
    for segments, label in examples:
        states, seqs = [], gpt1_tasks.transform(kind, segments, SP, CFG.max_len)
        for ids in seqs:
            x = HIDDEN(jnp.array([ids]))
            states.append(np.asarray(x[0, -1], np.float64))  # <extract> is the last token
            logp = np.asarray(jax.nn.log_softmax(model.unembed(CFG, GPT, x)[0], -1), np.float64)
            lm_sum -= sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1))
            lm_count += len(ids) - 1
        w, b = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
        if kind == "multiple_choice":
            logits = np.array([h @ w[:, 0] + b[0] for h in states])
        else:
            logits = sum(states) @ w + b  # similarity sums the two orderings' states
        clf_losses.append(-(logits[label] - np.log(np.exp(logits).sum())))
    return np.mean(clf_losses) + lm_coef * lm_sum / lm_count, np.mean(clf_losses)


@pytest.mark.parametrize("kind", gpt1_tasks.KINDS)
def test_head_loss_equals_direct_computation(kind):
    head = ft.init_head(kind, CFG.d_model, 3, jax.random.key(1))
    head = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), head)
    batch = gpt1_tasks.make_batch(kind, EXAMPLES[kind], SP, CFG.max_len)
    loss, metrics = ft.finetune_loss(CFG, {"gpt": GPT, "head": head}, batch, kind, lm_coef=0.5)
    expected, expected_clf = _direct_loss(kind, head, EXAMPLES[kind], 0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["clf_loss"]) == pytest.approx(expected_clf, rel=1e-5)
    no_aux, _ = ft.finetune_loss(CFG, {"gpt": GPT, "head": head}, batch, kind, lm_coef=0.0)
    assert float(no_aux) == pytest.approx(expected_clf, rel=1e-5)  # λ = 0 leaves L2 alone


def test_similarity_is_symmetric_in_its_two_texts():
    head = ft.init_head("similarity", CFG.d_model, 2, jax.random.key(1))
    params = {"gpt": GPT, "head": head}
    ab = gpt1_tasks.make_batch("similarity", [([[10, 11, 12], [20]], 0)], SP, CFG.max_len)
    ba = gpt1_tasks.make_batch("similarity", [([[20], [10, 11, 12]], 0)], SP, CFG.max_len)
    np.testing.assert_allclose(
        ft.forward(CFG, params, ab, "similarity")[0],
        ft.forward(CFG, params, ba, "similarity")[0],
        rtol=1e-6,
    )


def test_multiple_choice_logits_follow_the_options():
    head = ft.init_head("multiple_choice", CFG.d_model, 1, jax.random.key(1))
    params = {"gpt": GPT, "head": head}
    options = [[20], [21, 22], [23], [24, 25, 26]]
    perm = [2, 0, 3, 1]
    a = gpt1_tasks.make_batch("multiple_choice", [([[10, 11], *options], 0)], SP, CFG.max_len)
    b = gpt1_tasks.make_batch(
        "multiple_choice", [([[10, 11], *[options[p] for p in perm]], 0)], SP, CFG.max_len
    )
    la, lb = (np.asarray(ft.forward(CFG, params, x, "multiple_choice")[0][0]) for x in (a, b))
    np.testing.assert_allclose(lb, la[perm], rtol=1e-5)


def test_finetune_step_fits_one_batch():
    kind = "entailment"
    fc = ft.FinetuneConfig(task="line_follows", steps=20, clf_dropout=0.0)
    optimizer = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=1, decay="linear"), 20)
    step, state = _train_step(
        CFG, kind, fc, optimizer, {"gpt": GPT, "head": ft.init_head(kind, 20, 2, jax.random.key(1))}
    )
    batch = gpt1_tasks.make_batch(kind, EXAMPLES[kind] * 2, SP, CFG.max_len)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["clf_loss"]))
    assert losses[-1] < 0.2 * losses[0]
    assert ft.accuracy(ft.make_logits(CFG, kind), state.params, [batch])[0] == 1.0


def test_finetune_step_on_8_devices_equals_one_device():
    """Rows over data x fsdp, trunk and head `embed` dimensions over fsdp (the head by
    HEAD_AXES): the same metrics and updated params as on one device. (SGD with lr 1, so the
    params move by the gradient; Adam's first step, ±lr, would flip with the sign of the
    tiniest gradients.)"""
    kind = "entailment"
    fc = ft.FinetuneConfig(task="line_follows", batch_size=8, clf_dropout=0.0)
    optimizer = optax.sgd(1.0)
    params = {"gpt": GPT, "head": ft.init_head(kind, 20, 2, jax.random.key(1))}
    batch = gpt1_tasks.make_batch(kind, EXAMPLES[kind] * 4, SP, CFG.max_len)
    out = []
    for mesh_rules in (ONE_DEVICE, _mesh({"data": 2, "fsdp": 4}, "fsdp")):
        step, state = _train_step(CFG, kind, fc, optimizer, params, mesh_rules)
        with logical.use_mesh(*mesh_rules):
            state, metrics = step(state, sharding.make_global_batch(batch, *mesh_rules))
        out.append((jax.device_get(metrics), jax.device_get(state.params)))
    head_spec = state.params["head"]["kernel"].sharding.spec
    assert head_spec[0] == "fsdp" and len(state.params["gpt"]["wte"].sharding.device_set) == 8
    for k in ("loss", "clf_loss", "lm_loss", "grad_norm"):
        np.testing.assert_allclose(out[1][0][k], out[0][0][k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(out[1][1]), jax.tree.leaves(out[0][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_demo_tasks_have_their_kinds_and_valid_labels():
    texts = [
        f"def f{i}(a, b):\n    x = a + b * {i}\n    y = x - a * b\n    return x * y + {i}\n"
        f"print(f{i}(1, 2), 'done')\n"
        for i in range(6)
    ]
    for task, (kind, n_classes) in gpt1_tasks.TASKS.items():
        examples = gpt1_tasks.demo_examples(task, texts, 20, seed=0)
        assert len(examples) == 20 and {lbl for _, lbl in examples} <= set(range(n_classes))
        n_segments = {"classification": 1, "multiple_choice": 5}.get(kind, 2)
        assert all(len(segments) == n_segments for segments, _ in examples)
    for (line,), label in gpt1_tasks.demo_examples("real_or_shuffled", texts, 30, seed=1):
        assert (line in "".join(texts)) == (label == 0)
    with pytest.raises(ValueError, match="unknown fine-tuning task"):
        gpt1_tasks.demo_examples("sentiment", texts, 5, 0)
    with pytest.raises(ValueError, match="FinetuneConfig.task"):
        ft.FinetuneConfig(task="sentiment")


# ------------------------------------------------- encoder and encoder–decoder trunks


def _jiggle(tree, seed, scale=0.1):
    """Random weights far from init (non-unit LNs, non-zero biases, peaked attention), so a
    wrong mask, segment or read position cannot pass. (NumPy noise: nothing to compile.)"""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape).astype(a.dtype)),
        tree,
    )


ENC = EncoderConfig(
    n_layers=2, d_model=20, n_heads=5, d_ff=28, vocab_size=31, max_len=16, scan_layers=False
)
S2S = Seq2SeqConfig(
    n_layers=2,
    n_decoder_layers=3,
    d_model=20,
    n_heads=5,
    d_ff=28,
    vocab_size=37,
    max_len=16,
    ln_placement="pre",
    scan_layers=False,
)
TRUNKS = {
    "decoder": (CFG, GPT),
    "encoder": (ENC, _jiggle(encoder.init_params(ENC, jax.random.key(3)), 4)),
    "seq2seq": (S2S, _jiggle(seq2seq.init_params(S2S, jax.random.key(5)), 6)),
}


def _encoder_cls_state(ids):
    """BERT by hand: the unpadded sequence, token types 1 after the first <delim>, [CLS]."""
    seg = [0] * len(ids)
    if SP.delimiter_id in ids:
        seg[ids.index(SP.delimiter_id) + 1 :] = [1] * (len(ids) - ids.index(SP.delimiter_id) - 1)
    cfg, p = TRUNKS["encoder"]
    return encoder.hidden_states(cfg, p, jnp.array([ids]), segment_ids=jnp.array([seg]))[0, 0]


def _seq2seq_extract_state(ids):
    """The decoder state at <extract>, recovered from `seq2seq.forward`'s logits on the
    unpadded sequence (source = target = ids): logits = h @ wte^T + bias, and wte (V > D) has
    full column rank, so least squares gives h back exactly."""
    cfg, p = TRUNKS["seq2seq"]
    logits_V = np.asarray(
        seq2seq.forward(cfg, p, jnp.array([ids]), jnp.array([ids]))[0, -1], np.float64
    )
    wte_VD = np.asarray(p["wte"], np.float64)
    return np.linalg.lstsq(wte_VD, logits_V - np.asarray(p["final_logits_bias"]), rcond=None)[0]


# Four sequences per batch for every kind (B·C = 4) and lengths 6-7 only, so the eager calls
# below share a handful of shapes and their compilations.
FOUR = {
    "classification": [
        ([[10, 11, 12, 13]], 1),
        ([[13, 14, 15, 16, 17]], 0),
        ([[18, 19, 20, 21]], 2),
        ([[22, 23, 24, 25, 26]], 0),
    ],
    "entailment": [
        ([[10], [20, 21]], 1),
        ([[10, 11], [20, 21]], 0),
        ([[12, 13], [21]], 2),
        ([[13, 14], [22, 23]], 1),
    ],
    "similarity": [([[10, 11], [20]], 1), ([[12], [21, 22, 23]], 0)],
    "multiple_choice": [([[10, 11], [20], [21, 22], [23], [24, 25]], 3)],
}


def _direct_logits(kind, head, examples, state_fn):
    w, b = np.asarray(head["kernel"], np.float64), np.asarray(head["bias"], np.float64)
    out = []
    for segments, _ in examples:
        states = [
            np.asarray(state_fn(ids), np.float64)
            for ids in gpt1_tasks.transform(kind, segments, SP, 16)
        ]
        out.append(
            np.array([h @ w[:, 0] + b[0] for h in states])
            if kind == "multiple_choice"
            else sum(states) @ w + b
        )
    return np.stack(out)


def _head(kind):
    return _jiggle(ft.init_head(kind, 20, 3, jax.random.key(1)), 2, scale=0.3)


@pytest.mark.parametrize("fam", ["decoder", "encoder", "seq2seq"])
def test_right_padding_changes_no_task_logit(fam):
    cfg, trunk = TRUNKS[fam]
    for kind in gpt1_tasks.KINDS:  # the longest sequence in FOUR has 7 tokens
        params = {"gpt": trunk, "head": _head(kind)}
        tight, padded = (
            ft.forward(cfg, params, gpt1_tasks.make_batch(kind, FOUR[kind], SP, t), kind)[0]
            for t in (7, 16)
        )
        np.testing.assert_allclose(padded, tight, rtol=1e-5, atol=1e-6, err_msg=kind)


@pytest.mark.parametrize(
    "fam,state_fn", [("encoder", _encoder_cls_state), ("seq2seq", _seq2seq_extract_state)]
)
def test_task_logits_equal_direct_path_without_padding(fam, state_fn):
    cfg, trunk = TRUNKS[fam]
    for kind in gpt1_tasks.KINDS:
        params = {"gpt": trunk, "head": _head(kind)}
        batch = gpt1_tasks.make_batch(kind, FOUR[kind], SP, 16)
        logits, lm_logits = ft.forward(cfg, params, batch, kind)
        np.testing.assert_allclose(
            logits, _direct_logits(kind, params["head"], FOUR[kind], state_fn), rtol=1e-4, atol=1e-5
        )
        loss, metrics = ft.finetune_loss(cfg, params, batch, kind, lm_coef=0.5)
        assert float(metrics["lm_loss"]) == 0.0  # no auxiliary LM loss for these families
        assert float(loss) == pytest.approx(float(metrics["clf_loss"]), rel=1e-6)
        if fam == "seq2seq" and kind == "entailment":  # every real position's LM logits
            ids = gpt1_tasks.transform(kind, FOUR[kind][1][0], SP, 16)[0]
            direct = seq2seq.forward(cfg, trunk, jnp.array([ids]), jnp.array([ids]))[0]
            np.testing.assert_allclose(lm_logits[1, 0, : len(ids)], direct, rtol=1e-4, atol=1e-5)


def _contains_task(n, seed):
    """Classification: does a random text of 1-6 tokens contain token 10? Balanced."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = list(rng.integers(11, 31, rng.integers(1, 7)))
        if i % 2:
            text[rng.integers(len(text))] = 10
        out.append(([text], i % 2))
    return out


@pytest.mark.parametrize("fam", ["encoder", "seq2seq"])
def test_short_finetune_learns_a_toy_task(fam):
    """One layer per stack keeps the compile short. Every batch is new, so the accuracy the
    step reports (before updating on that batch, classifier dropout on) is held-out."""
    cfg = TRUNKS[fam][0].replace(n_layers=1)
    init = encoder.init_params if fam == "encoder" else seq2seq.init_params
    if fam == "seq2seq":
        cfg = cfg.replace(n_decoder_layers=1)
    kind, steps, bs = "classification", 80, 32
    optimizer = make_optimizer(
        OptimizerConfig(peak_lr=3e-3, warmup_steps=10, decay="linear"), steps
    )
    params = {
        "gpt": init(cfg, jax.random.key(7)),
        "head": ft.init_head(kind, 20, 2, jax.random.key(8)),
    }
    step, state = _train_step(
        cfg, kind, ft.FinetuneConfig(steps=steps, clf_dropout=0.1), optimizer, params
    )
    data, accs = _contains_task(steps * bs, seed=0), []
    for s in range(steps):
        batch = gpt1_tasks.make_batch(kind, data[s * bs : (s + 1) * bs], SP, 8)
        state, metrics = step(state, batch)
        accs.append(float(metrics["accuracy"]))
    print(
        f"{fam}: held-out accuracy, first 10 batches {np.mean(accs[:10]):.3f}, "
        f"last 20 batches {np.mean(accs[-20:]):.3f} (chance 0.5)"
    )
    assert np.mean(accs[-20:]) > 0.85
