"""Chain-of-thought prompting: few-shot worked solutions vs direct answers, by generation.

Wei et al. (2022) showed that a language model given K demonstrations that *reason step by
step* before answering ("Ada starts with 3 apples. 3 + 5 = 8. 8 - 2 = 6. The answer is 6.")
solves multi-step arithmetic word problems that it fails when the demonstrations give only the
answer ("The answer is 6."); the gain appears only at scale. This module measures that gap on
a small offline task: `word_problems` generates 2-3 step problems (+, -, × over small
integers, never a negative count), each with a worked `rationale` and its integer `answer`.

Prompts (`build_prompt`), GPT-3 style: K demonstrations, then the scored question,

    Q: <question>\\nA: <rationale> The answer is <n>.      (mode "cot")
    Q: <question>\\nA: The answer is <n>.                  (mode "direct")

joined by a blank line, ending in `Q: <question>\\nA:`. The model continues greedily until the
next `Q:`; `parse_answer` reads the integer after the first "The answer is", and a problem is
right when that integer is its answer. Problems without such an integer count as wrong (and
lower `answered`). Accuracy comes with its binomial standard error sqrt(p (1 - p) / n).

Demonstrations come from their own pool (`demo_problems`, another random stream, never a scored
question). Each scored problem draws its K demonstrations at random from the pool; the draw
depends on the seed only, so both modes see the same demonstrations for the same problem (a
paired comparison). Demonstrations that do not fit the prompt budget (the model's max_len less
`max_new_tokens`) are dropped from the front, as GPT-3 caps K by the context window;
`shots_used_mean` reports how many remained, `truncated` how many prompts still lost their start.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Callable, Sequence

import numpy as np

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.inference import completions

TASK_NAME = "word_problems"
ANSWER_MARKER = "The answer is"
MODES = ("direct", "cot")
STOPS = ("\n\nQ:", "\nQ:")  # the model starting the next question ends its answer
DEMO_POOL = 32  # demonstration problems to draw the K shots from
DEMO_SEED_OFFSET = 1_000_003  # the demonstration stream's seed is seed + this


@dataclasses.dataclass(frozen=True)
class Problem:
    """A word problem, its worked solution (the equations, one sentence each) and answer."""

    question: str
    rationale: str
    answer: int


# ------------------------------------------------------------------ generator

_PEOPLE = (
    ("Ada", "She"), ("Ben", "He"), ("Cleo", "She"), ("Dev", "He"), ("Eli", "He"),
    ("Fay", "She"), ("Gus", "He"), ("Hana", "She"), ("Ivo", "He"), ("Jun", "She"),
    ("Kai", "He"), ("Lena", "She"), ("Omar", "He"), ("Pia", "She"), ("Ravi", "He"),
    ("Sara", "She"),
)  # fmt: skip
_OBJECTS = (
    "apples", "pens", "marbles", "stickers", "cookies", "shells", "cards", "books", "eggs",
    "crayons", "stamps", "buttons",
)  # fmt: skip
_CONTAINERS = ("boxes", "bags", "packs", "jars", "baskets", "crates")
_GAIN = ("buys", "finds", "gets", "picks up", "wins")
_GIVE = ("gives", "sends", "hands", "lends")
_LOSE = (("loses", "lose"), ("sells", "sell"), ("uses", "use"), ("drops", "drop"))


def _gain_then_give(r: random.Random, a, b, obj) -> tuple[str, str, int]:
    x, y = r.randint(2, 15), r.randint(1, 12)
    s = x + y
    z = r.randint(1, s)
    q = (
        f"{a[0]} has {x} {obj}. {a[1]} {r.choice(_GAIN)} {y} more and {r.choice(_GIVE)} {z} "
        f"to {b[0]}. How many {obj} does {a[0]} have now?"
    )
    return q, f"{a[0]} starts with {x} {obj}. {x} + {y} = {s}. {s} - {z} = {s - z}.", s - z


def _three_steps(r: random.Random, a, b, obj) -> tuple[str, str, int]:
    x, y = r.randint(2, 15), r.randint(1, 12)
    z, w = r.randint(1, x + y), r.randint(1, 9)
    s, t = x + y, x + y - z
    q = (
        f"{a[0]} has {x} {obj}. {a[1]} {r.choice(_GAIN)} {y} more, {r.choice(_GIVE)} {z} to "
        f"{b[0]}, and then {r.choice(_GAIN)} {w} more. How many {obj} does {a[0]} have now?"
    )
    why = f"{a[0]} starts with {x} {obj}. {x} + {y} = {s}. {s} - {z} = {t}. {t} + {w} = {t + w}."
    return q, why, t + w


def _boxes_plus(r: random.Random, a, b, obj) -> tuple[str, str, int]:
    n, k, y, box = r.randint(2, 6), r.randint(2, 9), r.randint(1, 12), r.choice(_CONTAINERS)
    q = (
        f"{a[0]} has {n} {box} of {k} {obj}. {a[1]} {r.choice(_GAIN)} {y} more {obj}. "
        f"How many {obj} does {a[0]} have?"
    )
    why = f"{n} {box} of {k} {obj} is {n} × {k} = {n * k}. {n * k} + {y} = {n * k + y}."
    return q, why, n * k + y


def _boxes_minus(r: random.Random, a, b, obj) -> tuple[str, str, int]:
    n, k, box = r.randint(2, 6), r.randint(2, 9), r.choice(_CONTAINERS)
    z = r.randint(1, n * k)
    q = (
        f"{a[0]} buys {n} {box} of {k} {obj} and {r.choice(_LOSE)[0]} {z} of them. "
        f"How many {obj} are left?"
    )
    why = f"{n} {box} of {k} {obj} is {n} × {k} = {n * k}. {n * k} - {z} = {n * k - z}."
    return q, why, n * k - z


def _more_than(r: random.Random, a, b, obj) -> tuple[str, str, int]:
    x, y = r.randint(1, 15), r.randint(1, 12)
    q = (
        f"{a[0]} has {x} {obj}. {b[0]} has {y} more {obj} than {a[0]}. "
        f"How many {obj} do they have together?"
    )
    why = f"{b[0]} has {x} + {y} = {x + y} {obj}. {x} + {x + y} = {2 * x + y}."
    return q, why, 2 * x + y


def _boxes_given_away(r: random.Random, a, b, obj) -> tuple[str, str, int]:
    n, k, box = r.randint(3, 9), r.randint(2, 8), r.choice(_CONTAINERS)
    z = r.randint(1, n - 1)
    q = (
        f"{a[0]} has {n} {box} with {k} {obj} in each. {a[1]} {r.choice(_GIVE)} {z} {box} "
        f"to {b[0]}. How many {obj} does {a[0]} have left?"
    )
    why = f"{n} - {z} = {n - z} {box} are left. {n - z} × {k} = {(n - z) * k}."
    return q, why, (n - z) * k


def _pair_buys(r: random.Random, a, b, obj) -> tuple[str, str, int]:
    n, k, box = r.randint(2, 5), r.randint(2, 6), r.choice(_CONTAINERS)
    p = n * k
    z = r.randint(1, 2 * p)
    q = (
        f"{a[0]} and {b[0]} each buy {n} {box} of {k} {obj}. They {r.choice(_LOSE)[1]} {z} of "
        f"them. How many {obj} do they have now?"
    )
    why = (
        f"{a[0]} buys {n} × {k} = {p} {obj}. Together they buy {p} + {p} = {2 * p}. "
        f"{2 * p} - {z} = {2 * p - z}."
    )
    return q, why, 2 * p - z


_TEMPLATES = (
    _gain_then_give,
    _three_steps,
    _boxes_plus,
    _boxes_minus,
    _more_than,
    _boxes_given_away,
    _pair_buys,
)


def _generate(n: int, rng: random.Random, exclude: frozenset[str] = frozenset()) -> list[Problem]:
    """`n` problems with distinct questions, none of them in `exclude`."""
    out, seen = [], set(exclude)
    for _ in range(100 * n + 100):
        if len(out) == n:
            break
        template = rng.choice(_TEMPLATES)
        a, b = rng.sample(_PEOPLE, 2)
        question, rationale, answer = template(rng, a, b, rng.choice(_OBJECTS))
        if question not in seen:
            seen.add(question)
            out.append(Problem(question, rationale, answer))
    if len(out) < n:
        raise ValueError(f"could not generate {n} distinct word problems.")
    return out


def word_problems(n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct 2-3 step arithmetic word problems, the same ones for the same seed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}.")
    return _generate(n, random.Random(seed))


def demo_problems(n: int, seed: int = 0, exclude: Sequence[Problem] = ()) -> list[Problem]:
    """`n` demonstration problems from their own stream, none with a question in `exclude`."""
    rng = random.Random(seed + DEMO_SEED_OFFSET)
    return _generate(n, rng, frozenset(p.question for p in exclude))


# -------------------------------------------------------------------- prompts


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")


def demo_text(problem: Problem, mode: str) -> str:
    """A solved demonstration: the rationale then the answer ("cot"), or the answer alone."""
    _check_mode(mode)
    reasoning = f"{problem.rationale} " if mode == "cot" else ""
    return f"Q: {problem.question}\nA: {reasoning}{ANSWER_MARKER} {problem.answer}."


def build_prompt(problem: Problem, demos: Sequence[Problem], mode: str) -> str:
    """The demonstrations, a blank line between each, then `Q: <question>\\nA:`."""
    return "\n\n".join([demo_text(d, mode) for d in demos] + [f"Q: {problem.question}\nA:"])


def fit_demos(
    tokenizer: Tokenizer, problem: Problem, demos: list[Problem], mode: str, max_tokens: int
) -> list[Problem]:
    """Drop the earliest demonstrations until the prompt has at most `max_tokens` tokens (the
    question alone may still be longer; the sampler then keeps its end)."""
    while demos and len(tokenizer.encode(build_prompt(problem, demos, mode))) > max_tokens:
        demos = demos[1:]
    return demos


_ANSWER = re.compile(re.escape(ANSWER_MARKER) + r"\s*([+-]?)(\d[\d,]*\d|\d)(?!\d|\.\d)")


def parse_answer(text: str) -> int | None:
    """The integer right after the first "The answer is" (sign, thousands commas and a final
    period allowed: "1,000." is 1000); None when the marker is missing or no integer follows."""
    at = text.find(ANSWER_MARKER)
    if at == -1:
        return None
    m = _ANSWER.match(text, at)
    if m is None:
        return None
    sign, digits = m.groups()
    if "," in digits and not re.fullmatch(r"\d{1,3}(,\d{3})+", digits):
        return None  # "1,00" is not a number
    value = int(digits.replace(",", ""))
    return -value if sign == "-" else value


# ------------------------------------------------------------------- scoring


def evaluate(
    complete_fn: Callable[[list[str]], list[str]],
    problems: Sequence[Problem],
    demos: Sequence[Problem],
    shots: int,
    mode: str,
    *,
    tokenizer: Tokenizer | None = None,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
    task: str = TASK_NAME,
) -> dict:
    """Accuracy of `complete_fn`'s answers to `problems`, each prompted with `shots` demos.

    Args:
      complete_fn: prompts -> one continuation each (the text after "A:").
      problems: the scored problems.
      demos: the demonstration pool; each problem draws `shots` of them (`random.Random(seed)`).
      mode: "cot" (demonstrations show their rationale) or "direct" (answers only).
      tokenizer, max_prompt_tokens: when both are given, demonstrations are dropped from the
        front until a prompt fits `max_prompt_tokens` (`fit_demos`), and prompts still longer
        are counted in `truncated`.
    """
    _check_mode(mode)
    if not problems:
        raise ValueError("no problems to score.")
    if not 0 <= shots <= len(demos):
        raise ValueError(f"shots must be in [0, {len(demos)}] (the demo pool), got {shots}.")
    fit = tokenizer is not None and max_prompt_tokens is not None
    rng = random.Random(seed)
    prompts, used = [], []
    for problem in problems:
        chosen = rng.sample(list(demos), shots)
        if fit:
            chosen = fit_demos(tokenizer, problem, chosen, mode, max_prompt_tokens)
        used.append(len(chosen))
        prompts.append(build_prompt(problem, chosen, mode))
    texts = complete_fn(prompts)
    if len(texts) != len(prompts):
        raise ValueError(f"complete_fn gave {len(texts)} completions for {len(prompts)} prompts.")
    parsed = [parse_answer(t) for t in texts]
    n = len(problems)
    p = float(np.mean([g == q.answer for g, q in zip(parsed, problems)]))
    truncated = (
        sum(len(ids) > max_prompt_tokens for ids in tokenizer.encode_batch(prompts)) if fit else 0
    )
    return {
        "task": task,
        "mode": mode,
        "shots": shots,
        "examples": n,
        "accuracy": p,
        "accuracy_stderr": math.sqrt(p * (1 - p) / n),
        "answered": float(np.mean([g is not None for g in parsed])),
        "shots_used_mean": float(np.mean(used)),
        "truncated": int(truncated),
    }


def evaluate_model(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    *,
    n_examples: int = 100,
    shots: int = 4,
    modes: Sequence[str] = MODES,
    max_new_tokens: int = 128,
    direct_max_new_tokens: int | None = 24,
    batch_size: int = 16,
    seed: int = 0,
    progress=None,
) -> list[dict]:
    """One result per mode: a decoder's greedy answers to `n_examples` word problems.

    CoT continuations get `max_new_tokens` tokens; direct ones `direct_max_new_tokens` (enough
    for " The answer is 123." even in bytes; None: `max_new_tokens`). Each mode's prompts must
    fit `cfg.max_len - <its max_new_tokens>` tokens. `seed` picks the problems and the
    demonstrations; greedy decoding uses no randomness.
    """
    for mode in modes:
        _check_mode(mode)
    problems = word_problems(n_examples, seed)
    demos = demo_problems(max(DEMO_POOL, shots), seed, exclude=problems)
    results = []
    for mode in modes:
        new = (
            max_new_tokens
            if mode == "cot" or direct_max_new_tokens is None
            else direct_max_new_tokens
        )

        def complete_fn(prompts: list[str], new: int = new) -> list[str]:
            return completions.complete(
                cfg,
                params,
                tokenizer,
                prompts,
                max_new_tokens=new,
                stop=STOPS,
                greedy=True,
                seed=seed,
                batch_size=batch_size,
                progress=progress,
            ).texts

        out = evaluate(
            complete_fn,
            problems,
            demos,
            shots,
            mode,
            tokenizer=tokenizer,
            max_prompt_tokens=cfg.max_len - new,
            seed=seed,
        )
        results.append({**out, "max_new_tokens": new})
    return results


def format_result(out: dict) -> str:
    """One line: accuracy ± its standard error, the answered share, shots used, truncation."""
    return (
        f"{out['task']} {out['mode']} {out['shots']}-shot: accuracy {out['accuracy']:.3f} ± "
        f"{out['accuracy_stderr']:.3f}, answered {out['answered']:.3f} (n={out['examples']}, "
        f"shots used {out['shots_used_mean']:.2f}, {out['truncated']} prompts truncated)"
    )
