"""Chain-of-thought vs direct prompting: the problem generator, prompts, answer parsing, scoring
with oracle completions, and greedy generation end to end on the tiny RLHF test model."""

import math
import re

import pytest

from gptjax.evals import chain_of_thought as cot
from gptjax.evals.chain_of_thought import Problem
from gptjax.inference import completions
from tests import rlhf_fixtures as fx

_EQUATION = re.compile(r"(\d+) ([+\-×]) (\d+) = (\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


def test_the_generator_is_deterministic_distinct_and_varied():
    problems = cot.word_problems(300, seed=0)
    assert problems == cot.word_problems(300, seed=0)
    assert problems != cot.word_problems(300, seed=1)
    assert len({p.question for p in problems}) == 300
    ops = {op for p in problems for _, op, _, _ in _EQUATION.findall(p.rationale)}
    assert ops == {"+", "-", "×"}
    first_words = {p.question.split()[0] for p in problems}
    assert len(first_words) >= 10  # names vary
    assert cot.word_problems(0) == []


def test_each_answer_follows_from_its_rationale_and_the_question():
    """Recompute every equation; operands come from the question or earlier steps; the last
    result is the answer, and no count is ever negative."""
    for p in cot.word_problems(500, seed=3) + cot.demo_problems(100, seed=3):
        equations = _EQUATION.findall(p.rationale)
        assert 2 <= len(equations) <= 3, p
        known = {int(x) for x in re.findall(r"\d+", p.question)}
        for a, op, b, result in equations:
            a, b, result = int(a), int(b), int(result)
            assert _OPS[op](a, b) == result, p
            assert {a, b} <= known, p  # every operand was given or computed before
            assert min(a, b, result) >= 0, p
            known.add(result)
        assert int(equations[-1][3]) == p.answer >= 0, p
        assert p.question.endswith("?") and p.rationale.endswith(".")


def test_demonstrations_never_repeat_a_scored_problem():
    problems = cot.word_problems(200, seed=0)
    demos = cot.demo_problems(64, seed=0, exclude=problems)
    assert len(demos) == 64
    assert not {d.question for d in demos} & {p.question for p in problems}
    # Another random stream, not the scored one with its problems skipped.
    assert not {d.question for d in cot.demo_problems(8, seed=0)} & {p.question for p in problems}
    # The exclusion itself works: excluding the pool's own problems gives new ones.
    again = cot.demo_problems(64, seed=0, exclude=demos)
    assert not {d.question for d in again} & {d.question for d in demos}


@pytest.mark.parametrize(
    "text, expected",
    [
        (" Ada starts with 3 apples. 3 + 5 = 8. The answer is 8.", 8),
        (" The answer is 1,000.", 1000),
        (" The answer is 12345", 12345),
        (" The answer is -4.", -4),
        (" The answer is +7", 7),
        (" The answer is 0. The answer is 9.", 0),  # the first one counts
        (" The answer is 6, since 2 × 3 = 6.", 6),
        (" The answer is\n42", 42),
        (" The answer is many. The answer is 5.", None),  # no integer after the first marker
        (" The answer is 6.5.", None),
        (" The answer is 1,00.", None),
        (" 3 + 5 = 8.", None),
        ("", None),
        (" the answer is 8.", None),  # the marker is case-sensitive
    ],
)
def test_parse_answer(text, expected):
    assert cot.parse_answer(text) == expected


_DEMO = Problem(
    "Ada has 3 apples. She buys 5 more and gives 2 to Ben. How many apples does Ada have now?",
    "Ada starts with 3 apples. 3 + 5 = 8. 8 - 2 = 6.",
    6,
)
_QUESTION = Problem("Ben has 2 boxes of 4 pens. How many pens does Ben have?", "2 × 4 = 8.", 8)


def test_one_shot_prompts_in_both_modes():
    assert cot.build_prompt(_QUESTION, [_DEMO], "cot") == (
        "Q: Ada has 3 apples. She buys 5 more and gives 2 to Ben. How many apples does Ada "
        "have now?\nA: Ada starts with 3 apples. 3 + 5 = 8. 8 - 2 = 6. The answer is 6.\n\n"
        "Q: Ben has 2 boxes of 4 pens. How many pens does Ben have?\nA:"
    )
    assert cot.build_prompt(_QUESTION, [_DEMO], "direct") == (
        "Q: Ada has 3 apples. She buys 5 more and gives 2 to Ben. How many apples does Ada "
        "have now?\nA: The answer is 6.\n\n"
        "Q: Ben has 2 boxes of 4 pens. How many pens does Ben have?\nA:"
    )
    zero_shot = "Q: Ben has 2 boxes of 4 pens. How many pens does Ben have?\nA:"
    assert cot.build_prompt(_QUESTION, [], "cot") == cot.build_prompt(_QUESTION, [], "direct")
    assert cot.build_prompt(_QUESTION, [], "cot") == zero_shot
    with pytest.raises(ValueError, match="mode must be one of"):
        cot.build_prompt(_QUESTION, [_DEMO], "scratchpad")


def _oracle(problems, answer=lambda p: f" {cot.ANSWER_MARKER} {p.answer}.", seen=None):
    """complete_fn that finds the scored question (after the last "Q: ") and answers it."""
    by_question = {p.question: p for p in problems}

    def complete_fn(prompts):
        if seen is not None:
            seen.extend(prompts)
        return [answer(by_question[pr.rsplit("Q: ", 1)[1].removesuffix("\nA:")]) for pr in prompts]

    return complete_fn


def test_oracles_score_one_zero_and_unanswered():
    problems = cot.word_problems(20, seed=5)
    demos = cot.demo_problems(8, seed=5, exclude=problems)

    def score(answer, mode, shots=3):
        return cot.evaluate(_oracle(problems, answer), problems, demos, shots, mode)

    right = lambda p: f" {p.rationale} {cot.ANSWER_MARKER} {p.answer}."  # noqa: E731
    wrong = lambda p: f" {p.rationale} {cot.ANSWER_MARKER} {p.answer + 1}."  # noqa: E731
    for mode in cot.MODES:
        out = score(right, mode)
        assert (out["accuracy"], out["accuracy_stderr"], out["answered"]) == (1.0, 0.0, 1.0)
        assert (out["mode"], out["shots"], out["examples"], out["shots_used_mean"]) == (
            mode,
            3,
            20,
            3.0,
        )
        assert (score(wrong, mode)["accuracy"], score(wrong, mode)["answered"]) == (0.0, 1.0)
        unanswered = score(lambda p: f" {p.rationale}", mode)
        assert (unanswered["accuracy"], unanswered["answered"]) == (0.0, 0.0)
    half = score(lambda p: right(p) if p in problems[::2] else wrong(p), "cot")
    assert half["accuracy"] == 0.5
    assert half["accuracy_stderr"] == pytest.approx(math.sqrt(0.25 / 20))


def test_prompts_hold_the_drawn_demos_and_both_modes_draw_the_same_ones():
    problems = cot.word_problems(10, seed=2)
    demos = cot.demo_problems(6, seed=2, exclude=problems)
    prompts = {}
    for mode in cot.MODES:
        seen = []
        cot.evaluate(_oracle(problems, seen=seen), problems, demos, 2, mode, seed=9)
        prompts[mode] = seen
    for cot_prompt, direct_prompt, problem in zip(prompts["cot"], prompts["direct"], problems):
        blocks = cot_prompt.split("\n\n")
        assert len(blocks) == 3 and blocks[-1] == f"Q: {problem.question}\nA:"
        used = [d for d in demos if f"Q: {d.question}\n" in cot_prompt]
        assert len(used) == 2
        assert all(f"Q: {d.question}\n" in direct_prompt for d in used)  # paired across modes
        assert cot_prompt.count(cot.ANSWER_MARKER) == direct_prompt.count(cot.ANSWER_MARKER) == 2
        assert all(d.rationale in cot_prompt and d.rationale not in direct_prompt for d in used)
    with pytest.raises(ValueError, match="shots must be in"):
        cot.evaluate(_oracle(problems), problems, demos, 7, "cot")


def test_demos_that_do_not_fit_are_dropped_from_the_front():
    tok = fx.TOK
    demos = cot.demo_problems(3, seed=1)
    size = lambda ds: len(tok.encode(cot.build_prompt(_QUESTION, ds, "cot")))  # noqa: E731
    assert cot.fit_demos(tok, _QUESTION, demos, "cot", size(demos)) == demos
    assert cot.fit_demos(tok, _QUESTION, demos, "cot", size(demos) - 1) == demos[1:]
    assert cot.fit_demos(tok, _QUESTION, demos, "cot", size(demos[2:])) == demos[2:]
    assert cot.fit_demos(tok, _QUESTION, demos, "cot", size([]) - 1) == []
    # Direct demonstrations are shorter, so more of them fit the same budget.
    budget = len(tok.encode(cot.build_prompt(_QUESTION, demos[1:], "direct")))
    assert cot.fit_demos(tok, _QUESTION, demos, "direct", budget) == demos[1:]
    assert cot.fit_demos(tok, _QUESTION, demos, "cot", budget) == demos[2:]

    problems = cot.word_problems(6, seed=1)
    run = lambda budget: cot.evaluate(  # noqa: E731
        _oracle(problems), problems, demos, 3, "cot", tokenizer=tok, max_prompt_tokens=budget
    )
    roomy, tight = run(10_000), run(20)
    assert (roomy["shots_used_mean"], roomy["truncated"]) == (3.0, 0)
    assert (tight["shots_used_mean"], tight["truncated"]) == (0.0, 6)  # questions > 20 bytes
    assert tight["accuracy"] == 1.0  # the oracle still answers: only prompts were cut
    # A prompt of exactly the budget is not truncated, one token more is.
    lengths = sorted(len(tok.encode(cot.build_prompt(p, [], "direct"))) for p in problems)
    assert lengths == [82, 96, 103, 104, 106, 117]
    for budget, expected in ((103, 3), (102, 4)):
        out = cot.evaluate(
            _oracle(problems), problems, demos, 0, "direct", tokenizer=tok, max_prompt_tokens=budget
        )
        assert out["truncated"] == expected


def test_format_result_is_one_line():
    out = {
        "task": "word_problems",
        "mode": "cot",
        "shots": 4,
        "examples": 100,
        "accuracy": 0.25,
        "accuracy_stderr": math.sqrt(0.25 * 0.75 / 100),
        "answered": 0.9,
        "shots_used_mean": 3.5,
        "truncated": 2,
    }
    assert cot.format_result(out) == (
        "word_problems cot 4-shot: accuracy 0.250 ± 0.043, answered 0.900 (n=100, "
        "shots used 3.50, 2 prompts truncated)"
    )


def test_evaluate_model_end_to_end_on_a_tiny_model():
    """max_len=48 bytes: no question fits 48 - 8 tokens, so every demo is dropped and every
    prompt cut; both modes then share one compiled sampler shape."""
    kwargs = dict(n_examples=4, shots=1, max_new_tokens=8, direct_max_new_tokens=8, batch_size=4)
    first = cot.evaluate_model(fx.CFG, fx.params(), fx.TOK, **kwargs)
    assert first == cot.evaluate_model(fx.CFG, fx.params(), fx.TOK, **kwargs)
    assert [r["mode"] for r in first] == ["direct", "cot"]
    for r in first:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["answered"] <= 1.0
        assert r["accuracy"] <= r["answered"]
        assert (r["examples"], r["shots"], r["max_new_tokens"]) == (4, 1, 8)
        assert (r["shots_used_mean"], r["truncated"]) == (0.0, 4)
        assert "\n" not in cot.format_result(r)
    # The truncation count agrees with the sampler's own (the prompts are the bare questions).
    prompts = [cot.build_prompt(p, [], "cot") for p in cot.word_problems(4)]
    batch = completions.complete(
        fx.CFG, fx.params(), fx.TOK, prompts, max_new_tokens=8, batch_size=4
    )
    assert batch.truncated == first[1]["truncated"]
    with pytest.raises(ValueError, match="mode must be one of"):
        cot.evaluate_model(fx.CFG, fx.params(), fx.TOK, modes=("cot", "guess"), **kwargs)


def test_evaluate_model_fits_demos_to_max_len_less_the_new_tokens(monkeypatch):
    """Short problems around the 48 - 8 = 40 byte budget: a direct prompt of exactly 40 bytes
    keeps its demo, one of 47 loses it (it would fit max_len alone); CoT demos never fit. The
    longest prompt is 40 bytes, the same sampler shape as above."""
    demo = Problem("1+1?", "1 + 1 = 2.", 2)
    problems = [
        Problem("2+22?", "2 + 22 = 24.", 24),
        Problem("What is 6+7?", "6 + 7 = 13.", 13),
        Problem("What is 1 + 2 + 3 + 4 + 5 + 6 + 7?", "1 + 2 = 3. 3 + 3 = 6.", 28),
    ]
    direct = [len(cot.build_prompt(p, [demo], "direct")) for p in problems]
    assert direct == [40, 47, 69] and len(cot.build_prompt(problems[2], [], "cot")) == 40
    monkeypatch.setattr(cot, "word_problems", lambda n, seed=0: problems)
    monkeypatch.setattr(cot, "demo_problems", lambda n, seed=0, exclude=(): [demo])
    kwargs = dict(n_examples=3, shots=1, max_new_tokens=8, direct_max_new_tokens=8, batch_size=4)
    by_mode = {r["mode"]: r for r in cot.evaluate_model(fx.CFG, fx.params(), fx.TOK, **kwargs)}
    assert by_mode["direct"]["shots_used_mean"] == pytest.approx(1 / 3)
    assert by_mode["cot"]["shots_used_mean"] == 0.0
    assert by_mode["direct"]["truncated"] == by_mode["cot"]["truncated"] == 0
