"""Evaluation: perplexity on a split, and zero/one/few-shot tasks scored by log-likelihood.

In-context evaluation follows GPT-3 (Brown et al. 2020, section 2.4): the prompt is K
demonstrations `context + answer`, joined by a separator, then the example's context; each
candidate completion is scored by its log-likelihood given that prompt, with no gradient
updates. The prediction is the candidate with the highest score under each rule (`RULES`):

    acc            summed log-likelihood, log P(candidate | prompt); favours short candidates
    acc_per_token  divided by the candidate's token count (GPT-3's normalisation, section 2.4)
    acc_per_char   divided by its length in characters: what lm-evaluation-harness reports as
                   `acc_norm`; unlike per-token it does not depend on the tokenizer
    acc_uncond     log P(candidate | prompt) - log P(candidate | "Answer:"), GPT-3's
                   unconditional normalisation (used on ARC, OpenBookQA and RACE), which
                   discounts answers that are likely whatever the question; only when
                   `evaluate_task(..., unconditional=True)`, the prompt set by `uncond_prompt`

Each accuracy comes with its binomial standard error, sqrt(p (1 - p) / n).

Tasks: built-in offline ones made from the standard-library corpus (`TASKS`), or a JSONL file,
one example per line:

    {"context": "x = [1, 2", "candidates": ["]", ")"], "label": 0}
    {"context": "...", "candidates": [...], "label": 1, "split": "demo"}

`label` indexes `candidates`; lines with `"split": "demo"` only serve as demonstrations (when
there are none, demonstrations are drawn from the other examples).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptjax.config import ModelConfig
from gptjax.data.config import run_datasets
from gptjax.data.tokenizer import Tokenizer
from gptjax.models import family
from gptjax.models import gpt as model
from gptjax.training.batches import EVAL_KEY_OFFSET, objective_key
from gptjax.training.eval_loss import weighted_mean_loss


@dataclasses.dataclass(frozen=True)
class Example:
    """A multiple-choice item: the prompt text, its candidate completions, the right one."""

    context: str
    candidates: tuple[str, ...]
    label: int


@dataclasses.dataclass(frozen=True)
class Task:
    """Scored examples, a demonstration pool (may be empty) and the prompt's separator."""

    name: str
    examples: tuple[Example, ...]
    demos: tuple[Example, ...] = ()
    separator: str = "\n\n"


# ------------------------------------------------------------------ task files


def _example_from_json(obj: object, where: str) -> tuple[Example, str]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with context, candidates, label.")
    missing = [k for k in ("context", "candidates", "label") if k not in obj]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {missing}; each line needs "
            '{"context": str, "candidates": [str, ...], "label": int}.'
        )
    context, candidates, label = obj["context"], obj["candidates"], obj["label"]
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'context' must be a string.")
    if (
        not isinstance(candidates, list)
        or len(candidates) < 2
        or not all(isinstance(c, str) and c for c in candidates)
    ):
        raise ValueError(f"{where}: 'candidates' must be a list of at least two non-empty strings.")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(candidates):
        raise ValueError(
            f"{where}: 'label' {label!r} is not an index into the {len(candidates)} candidates."
        )
    split = obj.get("split", "test")
    if split not in ("test", "demo"):
        raise ValueError(f"{where}: 'split' must be 'test' or 'demo', got {split!r}.")
    return Example(context, tuple(candidates), label), split


def load_jsonl_task(path: str) -> Task:
    """A task from a JSONL file (format in the module docstring), with line-numbered errors."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"task file {path!r} does not exist.")
    parsed = {"test": [], "demo": []}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}).") from None
            example, split = _example_from_json(obj, f"{path}:{number}")
            parsed[split].append(example)
    if not parsed["test"]:
        raise ValueError(f"{path}: no examples to score (every line is empty or a demo).")
    name = os.path.splitext(os.path.basename(path))[0]
    return Task(name, tuple(parsed["test"]), tuple(parsed["demo"]))


# ------------------------------------------------------------- built-in tasks


def _code_lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.split("\n")]


def _usable(line: str) -> bool:
    body = line.strip()
    return 8 <= len(body) <= 100 and not body.startswith("#")


def _interleave(groups: list[list], rng: random.Random) -> list:
    """Items of every group, round robin over shuffled groups, so no one document (say, a
    codec's table of 256 similar lines) dominates a task."""
    for g in groups:
        rng.shuffle(g)
    rng.shuffle(groups)
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def next_line_task(
    texts: Iterable[str],
    n_examples: int,
    seed: int = 0,
    n_candidates: int = 4,
    context_lines: int = 3,
) -> Task:
    """Which line comes next? The true line against random lines of other documents."""
    docs = [_code_lines(t) for t in texts]
    rng = random.Random(seed)
    spots = _interleave(
        [
            [
                (d, i)
                for i in range(context_lines, len(lines))
                if _usable(lines[i]) and any(lines[i - context_lines : i])
            ]
            for d, lines in enumerate(docs)
        ],
        rng,
    )
    if len(docs) < 2 or len(spots) < 2 * n_examples:
        raise ValueError(f"the corpus has too few usable lines for {n_examples} examples.")

    def make(d: int, i: int) -> Example:
        others = [docs[e][j] for e, j in rng.sample(spots, 4 * n_candidates) if e != d]
        distractors = list(dict.fromkeys(o for o in others if o != docs[d][i]))[: n_candidates - 1]
        options = [docs[d][i]] + distractors
        rng.shuffle(options)
        context = "\n".join(docs[d][i - context_lines : i]) + "\n"
        return Example(context, tuple(o + "\n" for o in options), options.index(docs[d][i]))

    return Task(
        "stdlib_next_line",
        tuple(make(*s) for s in spots[:n_examples]),
        tuple(make(*s) for s in spots[n_examples : 2 * n_examples]),
    )


def real_or_shuffled_task(texts: Iterable[str], n_examples: int, seed: int = 0) -> Task:
    """Is this line of code real, or are its words shuffled? (two candidates)"""
    rng = random.Random(seed)
    lines = _interleave(
        [
            [line for line in _code_lines(t) if _usable(line) and len(line.split()) >= 4]
            for t in texts
        ],
        rng,
    )
    if len(lines) < 2 * n_examples:
        raise ValueError(f"the corpus has too few usable lines for {n_examples} examples.")
    candidates = (" real\n", " shuffled\n")

    def make(line: str) -> Example:
        words = line.split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        fake = rng.random() < 0.5
        indent = line[: len(line) - len(line.lstrip())]
        text = indent + " ".join(shuffled) if fake else line
        return Example(f"{text}\n# this line is", candidates, int(fake))

    return Task(
        "stdlib_real_or_shuffled",
        tuple(make(x) for x in lines[:n_examples]),
        tuple(make(x) for x in lines[n_examples : 2 * n_examples]),
    )


TASKS: dict[str, Callable[..., Task]] = {
    "stdlib_next_line": next_line_task,
    "stdlib_real_or_shuffled": real_or_shuffled_task,
}


def get_task(
    name_or_path: str, data_dir: str | None = None, n_examples: int = 200, seed: int = 0
) -> Task:
    """A built-in task (from the stdlib validation split) or a JSONL file's task."""
    if name_or_path.endswith(".jsonl") or os.path.exists(name_or_path):
        task = load_jsonl_task(name_or_path)
        return dataclasses.replace(task, examples=task.examples[:n_examples])
    if name_or_path not in TASKS:
        raise ValueError(
            f"unknown task {name_or_path!r}; built-in tasks: {', '.join(TASKS)}, "
            "or give a .jsonl file of {context, candidates, label} lines."
        )
    from gptjax.data.config import default_data_dir
    from gptjax.data.pipeline import corpus_texts

    texts = list(corpus_texts("stdlib", data_dir or default_data_dir(), "validation"))
    return TASKS[name_or_path](texts, n_examples, seed)


# ---------------------------------------------------------------- prompting


def choose_demos(task: Task, index: int, shots: int, rng: random.Random) -> list[Example]:
    """K demonstrations drawn at random from the pool, never the scored example itself."""
    pool = list(task.demos) or [e for i, e in enumerate(task.examples) if i != index]
    if shots > len(pool):
        raise ValueError(
            f"{shots} shots asked but task {task.name!r} has only {len(pool)} demonstrations."
        )
    return rng.sample(pool, shots)


def build_prompt(task: Task, example: Example, demos: Sequence[Example]) -> str:
    """Demonstrations (context + right answer), the separator between, then the context."""
    return (
        "".join(d.context + d.candidates[d.label] + task.separator for d in demos) + example.context
    )


def encode_request(
    tokenizer: Tokenizer, prompt: str, candidate: str, max_len: int
) -> tuple[list[int], int]:
    """EOS + prompt + candidate ids (the prompt cut on the left to fit) and the candidate's length.

    The sequence starts with EOS, the document separator of pretraining, so the first prompt
    token is predicted as at the start of a document. Prompt and candidate are encoded
    separately, so the scored tokens are exactly the candidate's.
    """
    cand = tokenizer.encode(candidate)
    if not cand or len(cand) >= max_len:
        raise ValueError(
            f"candidate {candidate[:40]!r} has {len(cand)} tokens; it must have "
            f"between 1 and {max_len - 1} (the model's max_len - 1)."
        )
    ids = [tokenizer.eos_id] + tokenizer.encode(prompt) + cand
    return ids[-(max_len + 1) :], len(cand)


def token_logprobs(cfg: ModelConfig, params, tokens_BT: Int[Array, "B T"]) -> Float[Array, "B T1"]:
    """log p(token t+1 | tokens <= t) at every position; causal, so right padding changes
    nothing before it."""
    logits_BTV = model.forward(cfg, params, tokens_BT[:, :-1])
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    return jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]


_token_logprobs = jax.jit(token_logprobs, static_argnums=0)


def score_requests(
    cfg: ModelConfig, params, requests: Sequence[tuple[list[int], int]], batch_size: int = 16
) -> tuple[Float[np.ndarray, " R"], Int[np.ndarray, " R"]]:
    """Summed log-likelihood of each request's last `n` tokens, and `n`.

    Rows are right-padded to a multiple of 32 tokens (few distinct shapes, few compiles) and
    batches padded to `batch_size` rows so every call has a static shape.
    """
    sums, lengths = np.zeros(len(requests)), np.array([n for _, n in requests])
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        width = min(-(-max(len(ids) for ids, _ in chunk) // 32) * 32, cfg.max_len + 1)
        tokens_BT = np.zeros((batch_size, width), np.int32)
        mask_BT = np.zeros((batch_size, width - 1), bool)
        for row, (ids, n) in enumerate(chunk):
            tokens_BT[row, : len(ids)] = ids
            mask_BT[row, len(ids) - 1 - n : len(ids) - 1] = True  # targets of the candidate
        logp_BT = np.asarray(_token_logprobs(cfg, params, jnp.asarray(tokens_BT)))
        sums[start : start + len(chunk)] = (logp_BT * mask_BT).sum(-1)[: len(chunk)]
    return sums, lengths


def score_candidates(
    cfg: ModelConfig, params, tokenizer: Tokenizer, prompt: str, candidates: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-likelihood, token count) of each candidate as the continuation of `prompt`."""
    requests = [encode_request(tokenizer, prompt, c, cfg.max_len) for c in candidates]
    return score_requests(cfg, params, requests, batch_size=len(requests))


def fit_demos(
    tokenizer: Tokenizer, task: Task, example: Example, demos: list[Example], max_len: int
) -> list[Example]:
    """Drop the earliest demonstrations until prompt and longest candidate fit the context
    (GPT-3 likewise caps K by the context window); the context itself may still be cut."""
    longest = max(len(tokenizer.encode(c)) for c in example.candidates)
    while (
        demos
        and 1 + len(tokenizer.encode(build_prompt(task, example, demos))) + longest > max_len + 1
    ):
        demos = demos[1:]
    return demos


UNCOND_PROMPT = "Answer:"  # GPT-3's unconditional context (section 2.4)
RULES = ("acc", "acc_per_token", "acc_per_char", "acc_uncond")


def candidate_scores(
    loglik_C: Sequence[float],
    n_tokens_C: Sequence[int],
    candidates: Sequence[str],
    uncond_C: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Each rule's score of an example's C candidates (the module docstring says why each
    exists); the prediction under a rule is the argmax of its scores."""
    loglik_C = np.asarray(loglik_C, np.float64)
    scores = {
        "acc": loglik_C,
        "acc_per_token": loglik_C / np.asarray(n_tokens_C),
        "acc_per_char": loglik_C / np.array([len(c) for c in candidates]),
    }
    if uncond_C is not None:
        scores["acc_uncond"] = loglik_C - np.asarray(uncond_C, np.float64)
    return scores


def unconditional_logliks(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    candidates: Iterable[str],
    uncond_prompt: str,
    batch_size: int = 16,
) -> dict[str, float]:
    """log P(candidate | uncond_prompt) of each distinct candidate. It does not depend on
    the example, so a candidate shared by many examples is scored once."""
    unique = list(dict.fromkeys(candidates))
    requests = [encode_request(tokenizer, uncond_prompt, c, cfg.max_len) for c in unique]
    loglik_R, _ = score_requests(cfg, params, requests, batch_size)
    return dict(zip(unique, loglik_R.tolist()))


def _hits(task: Task, loglik_R, n_tokens_R, uncond: dict | None) -> dict[str, list[bool]]:
    """Per rule, whether each example's best-scored candidate is its label (requests R are the
    examples' candidates in order)."""
    hits, start = {}, 0
    for example in task.examples:
        part = slice(start, start + len(example.candidates))
        scores = candidate_scores(
            loglik_R[part],
            n_tokens_R[part],
            example.candidates,
            None if uncond is None else [uncond[c] for c in example.candidates],
        )
        for rule, scores_C in scores.items():
            hits.setdefault(rule, []).append(int(np.argmax(scores_C)) == example.label)
        start = part.stop
    return hits


def evaluate_task(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    task: Task,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    unconditional: bool = False,
    uncond_prompt: str = UNCOND_PROMPT,
) -> dict:
    """Accuracy under each rule of `RULES` with standard errors, K shots; `acc_uncond` (one
    extra request per distinct candidate) only when `unconditional`."""
    if unconditional and not isinstance(uncond_prompt, str):
        raise ValueError(
            f"uncond_prompt must be a string such as {UNCOND_PROMPT!r}, got {uncond_prompt!r}."
        )
    rng = random.Random(seed)
    requests, used = [], []
    for i, example in enumerate(task.examples):
        demos = fit_demos(tokenizer, task, example, choose_demos(task, i, shots, rng), cfg.max_len)
        used.append(len(demos))
        prompt = build_prompt(task, example, demos)
        requests += [encode_request(tokenizer, prompt, c, cfg.max_len) for c in example.candidates]
    loglik_R, n_tokens_R = score_requests(cfg, params, requests, batch_size)
    uncond = (
        unconditional_logliks(
            cfg,
            params,
            tokenizer,
            (c for e in task.examples for c in e.candidates),
            uncond_prompt,
            batch_size,
        )
        if unconditional
        else None
    )
    hits = _hits(task, loglik_R, n_tokens_R, uncond)
    n = len(task.examples)
    out = {
        "task": task.name,
        "shots": shots,
        "examples": n,
        "chance": float(np.mean([1 / len(e.candidates) for e in task.examples])),
        "shots_used_mean": float(np.mean(used)),
    }
    for rule, rule_hits in hits.items():
        p = float(np.mean(rule_hits))
        out[rule], out[f"{rule}_stderr"] = p, math.sqrt(p * (1 - p) / n)
    if unconditional:
        out["uncond_prompt"] = uncond_prompt
    return out


def format_result(out: dict) -> str:
    """One line: every reported rule's accuracy ± its standard error."""
    rules = ", ".join(f"{r} {out[r]:.3f} ± {out[r + '_stderr']:.3f}" for r in RULES if r in out)
    return (
        f"{out['task']} {out['shots']}-shot: {rules} (n={out['examples']}, "
        f"chance {out['chance']:.3f})"
    )


# ----------------------------------------------------------------- perplexity


@functools.partial(jax.jit, static_argnums=0)
def _loss_sum(cfg: ModelConfig, params, tokens_BT: Int[Array, "B T"]) -> Float[Array, ""]:
    return -token_logprobs(cfg, params, tokens_BT).sum()


def perplexity(cfg: ModelConfig, params, batches: Iterable[dict], max_batches: int) -> dict:
    """Token-weighted mean next-token loss and its exp over up to `max_batches` batches
    (`weighted_mean_loss`, every target token weighted 1)."""

    def sums(batch: dict) -> dict:
        tokens_BT = jnp.asarray(batch["tokens"])
        return {
            "loss_sum": _loss_sum(cfg, params, tokens_BT),
            "tokens": tokens_BT.shape[0] * (tokens_BT.shape[1] - 1),
        }

    out = weighted_mean_loss(sums, batches, max_batches)
    return {**out, "tokens": int(out["tokens"])}


def split_perplexity(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    configs: dict,
    split: str = "validation",
    batch_size: int = 16,
    max_batches: int = 50,
) -> dict:
    """Loss and perplexity of a trained run on its own data's split, in its family's
    objective (next token, masked LM or target given source): the training loop's eval,
    with its masks (`training.batches.objective_key`), at another batch size."""
    if split not in ("validation", "train"):
        raise ValueError(f"--split must be 'validation' or 'train', got {split!r}.")
    data_cfg, seed = configs["data"], configs["train"].seed
    train_iter, eval_factory = run_datasets(
        data_cfg,
        tokenizer,
        task_format=family.family_of(cfg).task_format,
        seq_len=configs["train"].seq_len,
        batch_size=batch_size,
        seed=seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        model_vocab_size=cfg.vocab_size,
    )
    sums_fn = jax.jit(functools.partial(family.eval_sums, cfg))
    batches = eval_factory() if split == "validation" else train_iter
    prepared = (
        family.from_windows(cfg, batch, tokenizer, objective_key(seed, EVAL_KEY_OFFSET + i))
        for i, batch in enumerate(batches)
    )
    out = weighted_mean_loss(lambda batch: sums_fn(params, batch), prepared, max_batches)
    return {**out, "tokens": int(out["tokens"])}
