"""In-context evaluation: prompt construction, log-likelihood scoring against a direct
computation, accuracy under each selection rule (a tiny model and a fake scorer with known
log-probs), task files and their errors, perplexity."""

import json
import math
import random

import jax
import numpy as np
import optax
import pytest

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.evals import in_context as ev
from gptjax.models import gpt as model

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


TASK = ev.Task(
    "toy",
    examples=(
        ev.Example("1+1=", ("2", "11"), 0),
        ev.Example("a b ", ("c", "z z"), 0),
        ev.Example("x", ("yy", "y"), 1),
    ),
    demos=(ev.Example("2+2=", ("4", "22"), 0), ev.Example("p q ", ("z", "r"), 1)),
    separator="\n",
)


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


def _hits_by_hand(scores, candidates, label, uncond=None):
    """Which rules pick `label`, in plain python: sum, per token, per character, minus the
    unconditional log-likelihood."""
    n_tok = [len(TOK.encode(c)) for c in candidates]
    rules = {
        "acc": list(scores),
        "acc_per_token": [s / n for s, n in zip(scores, n_tok)],
        "acc_per_char": [s / len(c) for s, c in zip(scores, candidates)],
    }
    if uncond is not None:
        rules["acc_uncond"] = [s - u for s, u in zip(scores, uncond)]
    return {k: max(range(len(v)), key=v.__getitem__) == label for k, v in rules.items()}


def test_accuracy_is_argmax_of_each_rule_over_model_scores():
    # "é" is two byte tokens but one character, so per-token and per-character differ.
    task = ev.Task(
        "toy",
        examples=TASK.examples + (ev.Example("q", ("éé", "ab", "a"), 0),),
        demos=TASK.demos,
        separator="\n",
    )
    for shots in (0, 2):
        out = ev.evaluate_task(
            CFG,
            PARAMS,
            TOK,
            task,
            shots=shots,
            seed=0,
            batch_size=4,
            unconditional=True,
            uncond_prompt="A:",
        )
        rng, hits = random.Random(0), []
        for i, example in enumerate(task.examples):
            prompt = ev.build_prompt(task, example, ev.choose_demos(task, i, shots, rng))
            scores = [_direct_score(prompt, c) for c in example.candidates]
            uncond = [_direct_score("A:", c) for c in example.candidates]
            hits.append(_hits_by_hand(scores, example.candidates, example.label, uncond))
        for key in ("acc", "acc_per_token", "acc_per_char", "acc_uncond"):
            p = np.mean([h[key] for h in hits])
            assert out[key] == pytest.approx(p), key
            assert out[f"{key}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 4)), key
        assert "acc_norm" not in out and out["uncond_prompt"] == "A:"
        assert out["shots"] == shots and out["examples"] == 4
        assert out["chance"] == pytest.approx((3 * 0.5 + 1 / 3) / 4)
    plain = ev.evaluate_task(CFG, PARAMS, TOK, task, shots=2, seed=0, batch_size=4)
    assert "acc_uncond" not in plain and "uncond_prompt" not in plain
    assert all(plain[k] == out[k] for k in ("acc", "acc_per_token", "acc_per_char"))


# Per-token log-probs a fake scorer gives each candidate, after the question ("cond") or after
# the unconditional prompt. Token counts (bytes) and characters differ for "éé" (4 vs 2):
#            sum    /token  /char  minus uncond
#   "a"      -1.0   -1.0    -1.0   -1.0 - -1.5 = 0.5   <- acc (summed) picks "a"
#   "éé"     -2.4   -0.6    -1.2   -2.4 - -3.0 = 0.6   <- acc_per_token picks "éé"
#   "bcdefg" -4.2   -0.7    -0.7   -4.2 - -5.0 = 0.8   <- acc_per_char picks "bcdefg"
#   "xy"     -3.0   -1.5    -1.5   -3.0 - -10  = 7.0   <- acc_uncond picks "xy"
FAKE_LOGP = {
    ("cond", "a"): [-1.0],
    ("cond", "éé"): [-0.3, -0.9, -0.5, -0.7],
    ("cond", "bcdefg"): [-0.2, -1.0, -0.5, -0.9, -0.6, -1.0],
    ("cond", "xy"): [-2.0, -1.0],
    ("uncond", "a"): [-1.5],
    ("uncond", "éé"): [-1.0, -0.5, -1.0, -0.5],
    ("uncond", "bcdefg"): [-0.5, -1.0, -1.0, -1.0, -1.0, -0.5],
    ("uncond", "xy"): [-6.0, -4.0],
}
FAKE_CANDIDATES = ("a", "éé", "bcdefg", "xy")


def _fake_scorer(seen_prompts):
    """score_requests from FAKE_LOGP: the request's prompt (decoded) says which table."""

    def score(cfg, params, requests, batch_size=16):
        sums = []
        for ids, n in requests:
            prompt, candidate = TOK.decode(ids[1:-n]), TOK.decode(ids[-n:])
            seen_prompts.append(prompt)
            logp = FAKE_LOGP[("cond" if prompt.startswith("Q") else "uncond", candidate)]
            assert len(logp) == n, "the fake table must match the byte tokenizer"
            sums.append(sum(logp))
        return np.array(sums), np.array([n for _, n in requests])

    return score


def test_four_rules_pick_four_different_candidates(monkeypatch):
    # 1, 2, 3, 4 examples whose answer is the pick of acc, per token, per char, uncond.
    labels = [0] + [1] * 2 + [2] * 3 + [3] * 4
    task = ev.Task(
        "fake", tuple(ev.Example(f"Q{i}:", FAKE_CANDIDATES, y) for i, y in enumerate(labels))
    )
    seen = []
    monkeypatch.setattr(ev, "score_requests", _fake_scorer(seen))
    out = ev.evaluate_task(CFG, PARAMS, TOK, task, unconditional=True, uncond_prompt="Answer:")
    by_hand = []
    for y in labels:
        scores = [sum(FAKE_LOGP[("cond", c)]) for c in FAKE_CANDIDATES]
        uncond = [sum(FAKE_LOGP[("uncond", c)]) for c in FAKE_CANDIDATES]
        by_hand.append(_hits_by_hand(scores, FAKE_CANDIDATES, y, uncond))
    for key, want in (
        ("acc", 0.1),
        ("acc_per_token", 0.2),
        ("acc_per_char", 0.3),
        ("acc_uncond", 0.4),
    ):
        assert out[key] == pytest.approx(want) == np.mean([h[key] for h in by_hand]), key
        assert out[f"{key}_stderr"] == pytest.approx(math.sqrt(want * (1 - want) / 10)), key
    # Each candidate's unconditional score is computed once, not once per example.
    assert seen.count("Answer:") == len(FAKE_CANDIDATES)
    line = ev.format_result(out)
    assert all(f"{k} " in line for k in ("acc", "acc_per_token", "acc_per_char", "acc_uncond"))


def test_unconditional_prompt_is_configurable_and_off_by_default(monkeypatch):
    task = ev.Task("fake", (ev.Example("Q:", FAKE_CANDIDATES, 3),))
    seen = []
    monkeypatch.setattr(ev, "score_requests", _fake_scorer(seen))
    plain = ev.evaluate_task(CFG, PARAMS, TOK, task)
    assert "acc_uncond" not in plain and set(seen) == {"Q:"}
    assert "acc_uncond" not in ev.format_result(plain)
    seen.clear()
    out = ev.evaluate_task(CFG, PARAMS, TOK, task, unconditional=True, uncond_prompt="A: ")
    assert out["acc_uncond"] == 1.0 and set(seen) == {"Q:", "A: "}
    assert (
        ev.evaluate_task(CFG, PARAMS, TOK, task, unconditional=True)["uncond_prompt"] == "Answer:"
    )
    with pytest.raises(ValueError, match="uncond_prompt must be a string"):
        ev.evaluate_task(CFG, PARAMS, TOK, task, unconditional=True, uncond_prompt=None)


def test_demonstrations_are_dropped_to_fit_the_context():
    long_demo = ev.Example("z" * 30, ("a", "b"), 0)
    task = ev.Task("t", (ev.Example("q", ("a", "b"), 0),), demos=(long_demo, long_demo))
    out = ev.evaluate_task(CFG, PARAMS, TOK, task, shots=2)
    assert out["shots_used_mean"] == 1.0  # 2 x 31 tokens do not fit in 40; one does


def test_jsonl_tasks_load_and_bad_lines_say_where(tmp_path):
    good = tmp_path / "mine.jsonl"
    lines = [
        {"context": "1+1=", "candidates": ["2", "3"], "label": 0},
        {"context": "2+2=", "candidates": ["4", "5"], "label": 0, "split": "demo"},
        {},
    ]
    good.write_text("\n".join(json.dumps(x) for x in lines[:2]) + "\n\n")
    task = ev.get_task(str(good))
    assert task.name == "mine" and len(task.examples) == 1 and len(task.demos) == 1
    assert ev.evaluate_task(CFG, PARAMS, TOK, task, shots=1)["examples"] == 1
    bad = tmp_path / "bad.jsonl"
    for content, message in [
        (
            '{"context": "a", "candidates": ["b", "c"], "label": 0}\n{oops',
            "bad.jsonl:2: not valid JSON",
        ),
        ('{"context": "a", "candidates": ["b", "c"], "label": 2}', "'label' 2 is not an index"),
        ('{"context": "a", "candidates": ["b"], "label": 0}', "at least two"),
        ('{"context": "a", "label": 0}', r"missing field\(s\) \['candidates'\]"),
        ("[1, 2]", "expected a JSON object"),
        ('{"context": "a", "candidates": ["b", "c"], "label": 0, "split": "x"}', "'split'"),
        ("", "no examples"),
    ]:
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            ev.load_jsonl_task(str(bad))
    with pytest.raises(FileNotFoundError):
        ev.get_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown task 'nope'.*stdlib_next_line"):
        ev.get_task("nope")


def test_builtin_tasks_from_texts_are_well_formed():
    texts = [
        f"def f{i}(a, b, c):\n    x = a + b * c - {i}\n    y = x * x + a\n"
        f"    return x + y + {i}\n" * 3
        for i in range(12)
    ]
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
    losses = [
        optax.softmax_cross_entropy_with_integer_labels(
            FORWARD(b["tokens"][:, :-1]), b["tokens"][:, 1:]
        ).mean()
        for b in batches
    ]
    assert out["loss"] == pytest.approx(float(np.mean(losses)), rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))
    assert out["tokens"] == 2 * 3 * 16
