"""In-context evaluation: prompt construction, log-likelihood scoring against a direct
computation, accuracy, task files and their errors, perplexity."""

import json
import math
import random

import jax
import numpy as np
import optax
import pytest

from gptjax import evaluate as ev
from gptjax import model
from gptjax.config import ModelConfig
from gptjax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
# Prime-ish sizes so a wrong axis cannot pass; vocab covers the byte tokenizer's 263 ids.
CFG = ModelConfig(n_layers=2, d_model=20, n_heads=5, d_ff=28, vocab_size=263, max_len=40)
PARAMS = model.init_params(CFG, jax.random.key(3))
FORWARD = jax.jit(lambda tokens: model.forward(CFG, PARAMS, tokens))


def _direct_score(prompt: str, candidate: str) -> float:
    """Sum of log-softmax(model.forward) at the candidate's tokens, computed by hand."""
    ids = [TOK.eos_id] + TOK.encode(prompt) + TOK.encode(candidate)
    logits = np.asarray(FORWARD(np.array([ids[:-1]])))[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float64), axis=-1))
    n = len(TOK.encode(candidate))
    return sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1 - n, len(ids) - 1))


TASK = ev.Task("toy", examples=(ev.Example("1+1=", ("2", "11"), 0),
                                ev.Example("a b ", ("c", "z z"), 0),
                                ev.Example("x", ("yy", "y"), 1)),
               demos=(ev.Example("2+2=", ("4", "22"), 0), ev.Example("p q ", ("z", "r"), 1)),
               separator="\n")


def test_prompt_is_demonstrations_with_answers_then_context():
    prompt = ev.build_prompt(TASK, TASK.examples[0], TASK.demos)
    assert prompt == "2+2=4\np q r\n1+1="
    assert ev.build_prompt(TASK, TASK.examples[0], []) == "1+1="  # zero-shot


def test_demonstrations_never_include_the_scored_example():
    task = ev.Task("t", tuple(ev.Example(str(i), ("a", "b"), 0) for i in range(5)))
    for i in range(5):
        demos = ev.choose_demos(task, i, 4, random.Random(i))
        assert task.examples[i] not in demos and len(set(demos)) == 4
    with pytest.raises(ValueError, match="5 shots asked.*only 4"):
        ev.choose_demos(task, 0, 5, random.Random(0))


def test_candidate_scores_equal_direct_log_softmax_sums():
    prompt = "def f(x):\n    return"
    candidates = [" x", " x + 1\n", "!"]  # different lengths: padding must not leak
    sums, lengths = ev.score_candidates(CFG, PARAMS, TOK, prompt, candidates)
    assert list(lengths) == [2, 7, 1]
    np.testing.assert_allclose(sums, [_direct_score(prompt, c) for c in candidates], rtol=1e-5)


def test_accuracy_is_argmax_of_summed_and_per_token_scores():
    for shots in (0, 2):
        out = ev.evaluate_task(CFG, PARAMS, TOK, TASK, shots=shots, seed=0, batch_size=4)
        rng, hits, hits_norm = random.Random(0), [], []
        for i, example in enumerate(TASK.examples):
            demos = ev.choose_demos(TASK, i, shots, rng)
            prompt = ev.build_prompt(TASK, example, demos)
            scores = ev.score_candidates(CFG, PARAMS, TOK, prompt, example.candidates)[0]
            norm = [s / len(TOK.encode(c)) for s, c in zip(scores, example.candidates)]
            hits.append(int(np.argmax(scores)) == example.label)
            hits_norm.append(int(np.argmax(norm)) == example.label)
        assert out["acc"] == pytest.approx(np.mean(hits))
        assert out["acc_norm"] == pytest.approx(np.mean(hits_norm))
        p = np.mean(hits)
        assert out["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 3))
        assert out["shots"] == shots and out["examples"] == 3 and out["chance"] == 0.5


def test_demonstrations_are_dropped_to_fit_the_context():
    long_demo = ev.Example("z" * 30, ("a", "b"), 0)
    task = ev.Task("t", (ev.Example("q", ("a", "b"), 0),), demos=(long_demo, long_demo))
    out = ev.evaluate_task(CFG, PARAMS, TOK, task, shots=2)
    assert out["shots_used_mean"] == 1.0  # 2 x 31 tokens do not fit in 40; one does


def test_jsonl_tasks_load_and_bad_lines_say_where(tmp_path):
    good = tmp_path / "mine.jsonl"
    lines = [{"context": "1+1=", "candidates": ["2", "3"], "label": 0},
             {"context": "2+2=", "candidates": ["4", "5"], "label": 0, "split": "demo"}, {}]
    good.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n")
    task = ev.get_task(str(good))
    assert task.name == "mine" and len(task.examples) == 1 and len(task.demos) == 1
    assert ev.evaluate_task(CFG, PARAMS, TOK, task, shots=1)["examples"] == 1
    bad = tmp_path / "bad.jsonl"
    for content, message in [
        ('{"context": "a", "candidates": ["b", "c"], "label": 0}\n{oops', "bad.jsonl:2: not valid JSON"),
        ('{"context": "a", "candidates": ["b", "c"], "label": 2}', "'label' 2 is not an index"),
        ('{"context": "a", "candidates": ["b"], "label": 0}', "at least two"),
        ('{"context": "a", "label": 0}', r"missing field\(s\) \['candidates'\]"),
        ('[1, 2]', "expected a JSON object"),
        ('{"context": "a", "candidates": ["b", "c"], "label": 0, "split": "x"}', "'split'"),
        ('', "no examples"),
    ]:
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            ev.load_jsonl_task(str(bad))
    with pytest.raises(FileNotFoundError):
        ev.get_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown task 'nope'.*stdlib_next_line"):
        ev.get_task("nope")


def test_builtin_tasks_from_texts_are_well_formed():
    texts = [f"def f{i}(a, b, c):\n    x = a + b * c - {i}\n    y = x * x + a\n"
             f"    return x + y + {i}\n" * 3 for i in range(12)]
    for builder in ev.TASKS.values():
        task = builder(texts, 10, seed=1)
        assert len(task.examples) == 10 and len(task.demos) == 10
        for e in task.examples + task.demos:
            assert 0 <= e.label < len(e.candidates) and len(set(e.candidates)) == len(e.candidates)
    real = ev.real_or_shuffled_task(texts, 10, seed=1)
    for e in real.examples:  # label 0: the line is a real one
        line = e.context.split("\n")[0]
        assert (line in "".join(texts)) == (e.label == 0)


def test_perplexity_equals_mean_cross_entropy():
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 262, (3, 17))} for _ in range(2)]
    out = ev.perplexity(CFG, PARAMS, batches, max_batches=5)
    losses = [optax.softmax_cross_entropy_with_integer_labels(
        FORWARD(b["tokens"][:, :-1]), b["tokens"][:, 1:]).mean()
        for b in batches]
    assert out["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert out["tokens"] == 2 * 3 * 16
