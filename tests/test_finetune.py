"""GPT-1 fine-tuning: input transforms, each head's loss against a direct computation on
unpadded sequences, similarity symmetry, multiple-choice equivariance, L3 = L2 + λ·L1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import finetune as ft
from gptjax import model
from gptjax.config import ModelConfig
from gptjax.optimizer import OptimizerConfig, make_optimizer

SP = ft.Specials(start=4, delim=5, extract=6, pad=0)
CFG = ModelConfig(n_layers=2, d_model=20, n_heads=5, d_ff=28, vocab_size=31, max_len=16)
GPT = model.init_params(CFG, jax.random.key(0))
HIDDEN = jax.jit(lambda tokens: model.hidden_states(CFG, GPT, tokens))


def test_input_transforms_frame_segments_with_the_special_tokens():
    assert ft.transform("classification", [[10, 11]], SP, 8) == [[4, 10, 11, 6]]
    assert ft.transform("entailment", [[10, 11], [20]], SP, 8) == [[4, 10, 11, 5, 20, 6]]
    assert ft.transform("similarity", [[10], [20, 21]], SP, 8) == [[4, 10, 5, 20, 21, 6],
                                                                  [4, 20, 21, 5, 10, 6]]
    assert ft.transform("multiple_choice", [[10], [20], [21, 22]], SP, 8) == [
        [4, 10, 5, 20, 6], [4, 10, 5, 21, 22, 6]]
    # too long: the premise loses its oldest tokens first, then the hypothesis its end
    assert ft.transform("entailment", [[10, 11, 12, 13], [20, 21]], SP, 7) == [
        [4, 12, 13, 5, 20, 21, 6]]
    assert ft.transform("entailment", [[10], [20, 21, 22, 23, 24]], SP, 6) == [
        [4, 5, 20, 21, 22, 6]]
    assert ft.transform("classification", [list(range(10, 20))], SP, 5) == [[4, 10, 11, 12, 6]]
    with pytest.raises(ValueError, match="unknown task kind"):
        ft.transform("regression", [[1], [2]], SP, 8)
    with pytest.raises(ValueError, match="two texts"):
        ft.transform("similarity", [[1]], SP, 8)


def test_batch_pads_right_and_marks_extract_and_lm_targets():
    batch = ft.make_batch("entailment", [([[10, 11], [20]], 1), ([[12], [21]], 0)], SP, 8)
    np.testing.assert_array_equal(batch["tokens"][:, 0], [[4, 10, 11, 5, 20, 6, 0, 0],
                                                          [4, 12, 5, 21, 6, 0, 0, 0]])
    np.testing.assert_array_equal(batch["extract"], [[5], [4]])
    np.testing.assert_array_equal(batch["lm_mask"][:, 0], [[1, 1, 1, 1, 1, 0, 0],
                                                           [1, 1, 1, 1, 0, 0, 0]])
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
        states, seqs = [], ft.transform(kind, segments, SP, CFG.max_len)
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


@pytest.mark.parametrize("kind", ft.KINDS)
def test_head_loss_equals_direct_computation(kind):
    head = ft.init_head(kind, CFG.d_model, 3, jax.random.key(1))
    head = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), head)
    batch = ft.make_batch(kind, EXAMPLES[kind], SP, CFG.max_len)
    loss, metrics = ft.finetune_loss(CFG, {"gpt": GPT, "head": head}, batch, kind, lm_coef=0.5)
    expected, expected_clf = _direct_loss(kind, head, EXAMPLES[kind], 0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(metrics["clf_loss"]) == pytest.approx(expected_clf, rel=1e-5)
    no_aux, _ = ft.finetune_loss(CFG, {"gpt": GPT, "head": head}, batch, kind, lm_coef=0.0)
    assert float(no_aux) == pytest.approx(expected_clf, rel=1e-5)  # λ = 0 leaves L2 alone


def test_similarity_is_symmetric_in_its_two_texts():
    head = ft.init_head("similarity", CFG.d_model, 2, jax.random.key(1))
    params = {"gpt": GPT, "head": head}
    ab = ft.make_batch("similarity", [([[10, 11, 12], [20]], 0)], SP, CFG.max_len)
    ba = ft.make_batch("similarity", [([[20], [10, 11, 12]], 0)], SP, CFG.max_len)
    np.testing.assert_allclose(ft.forward(CFG, params, ab, "similarity")[0],
                               ft.forward(CFG, params, ba, "similarity")[0], rtol=1e-6)


def test_multiple_choice_logits_follow_the_options():
    head = ft.init_head("multiple_choice", CFG.d_model, 1, jax.random.key(1))
    params = {"gpt": GPT, "head": head}
    options = [[20], [21, 22], [23], [24, 25, 26]]
    perm = [2, 0, 3, 1]
    a = ft.make_batch("multiple_choice", [([[10, 11], *options], 0)], SP, CFG.max_len)
    b = ft.make_batch("multiple_choice", [([[10, 11], *[options[p] for p in perm]], 0)], SP,
                      CFG.max_len)
    la, lb = (np.asarray(ft.forward(CFG, params, x, "multiple_choice")[0][0]) for x in (a, b))
    np.testing.assert_allclose(lb, la[perm], rtol=1e-5)


def test_finetune_step_fits_one_batch():
    kind = "entailment"
    fc = ft.FinetuneConfig(task="line_follows", steps=20, clf_dropout=0.0)
    optimizer = make_optimizer(OptimizerConfig(peak_lr=1e-2, warmup_steps=1, decay="linear"), 20)
    step, logits_fn = ft._make_step(CFG, kind, fc, optimizer)
    params = jax.tree.map(jnp.copy, {"gpt": GPT, "head": ft.init_head(kind, 20, 2,
                                                                      jax.random.key(1))})
    batch = ft.make_batch(kind, EXAMPLES[kind] * 2, SP, CFG.max_len)
    opt_state, losses = optimizer.init(params), []
    for s in range(20):
        params, opt_state, metrics = step(params, opt_state, batch, jax.random.key(s))
        losses.append(float(metrics["clf_loss"]))
    assert losses[-1] < 0.2 * losses[0]
    assert ft.accuracy(logits_fn, params, [batch])[0] == 1.0


def test_demo_tasks_have_their_kinds_and_valid_labels():
    texts = [f"def f{i}(a, b):\n    x = a + b * {i}\n    y = x - a * b\n    return x * y + {i}\n"
             f"print(f{i}(1, 2), 'done')\n" for i in range(6)]
    for task, (kind, n_classes) in ft.TASKS.items():
        examples = ft.demo_examples(task, texts, 20, seed=0)
        assert len(examples) == 20 and {lbl for _, lbl in examples} <= set(range(n_classes))
        n_segments = {"classification": 1, "multiple_choice": 5}.get(kind, 2)
        assert all(len(segments) == n_segments for segments, _ in examples)
    for (line,), label in ft.demo_examples("real_or_shuffled", texts, 30, seed=1):
        assert (line in "".join(texts)) == (label == 0)
    with pytest.raises(ValueError, match="unknown fine-tuning task"):
        ft.demo_examples("sentiment", texts, 5, 0)
    with pytest.raises(ValueError, match="FinetuneConfig.task"):
        ft.FinetuneConfig(task="sentiment")
