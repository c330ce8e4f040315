"""GPT-1's task inputs: the input transforms, their batches, and offline demo tasks.

Radford et al. 2018, section 3.3: every task becomes one or more token sequences framed by
learned special tokens — `<start>`, `<delim>` between segments, `<extract>` at the end
(`gptjax.data.tokenizer.Specials`). The heads and the loss that read them are in
`gptjax.research.finetune`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from gptjax.data.tokenizer import Specials

KINDS = ("classification", "entailment", "similarity", "multiple_choice")


# ------------------------------------------------------------ input transforms


def _fit(first: list[int], second: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Cut a pair to `budget` tokens: the first segment loses its start (a context's oldest
    tokens matter least), then the second its end."""
    first = first[max(0, len(first) + len(second) - budget) :]
    return first, second[: budget - len(first)]


def transform(
    kind: str, segments: Sequence[Sequence[int]], sp: Specials, max_len: int
) -> list[list[int]]:
    """GPT-1's input transform: the token sequences one example becomes (C of them).

    `segments` is (text,) for classification, (premise, hypothesis) for entailment, (a, b) for
    similarity and (context, answer_1, ..., answer_K) for multiple choice.
    """
    segs = [list(s) for s in segments]
    if kind == "classification":
        if len(segs) != 1:
            raise ValueError(f"classification takes one text, got {len(segs)}.")
        return [[sp.start_id] + segs[0][: max_len - 2] + [sp.extract_id]]
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}; choose one of {KINDS}.")
    if len(segs) < 2 or (kind != "multiple_choice" and len(segs) != 2):
        wants = "a context and answers" if kind == "multiple_choice" else "two texts"
        raise ValueError(f"{kind} takes {wants}, got {len(segs)} segments.")
    pair = lambda a, b: [sp.start_id, *a, sp.delimiter_id, *b, sp.extract_id]  # noqa: E731
    if kind == "similarity":
        orders = [(segs[0], segs[1]), (segs[1], segs[0])]
    else:  # entailment: one (premise, hypothesis); multiple choice: (context, answer_k) each
        orders = [(segs[0], answer) for answer in segs[1:]]
    return [pair(*_fit(a, b, max_len - 3)) for a, b in orders]


def make_batch(
    kind: str, examples: Sequence[tuple[Sequence[Sequence[int]], int]], sp: Specials, max_len: int
) -> dict[str, np.ndarray]:
    """Transform and right-pad a list of (segments, label) into the arrays the loss takes."""
    seqs = [transform(kind, segments, sp, max_len) for segments, _ in examples]
    b, c = len(seqs), len(seqs[0])
    if any(len(s) != c for s in seqs):
        raise ValueError("every example in a batch needs the same number of answers.")
    tokens = np.full((b, c, max_len), sp.pad_id, np.int32)
    extract = np.zeros((b, c), np.int32)
    segment = np.zeros((b, c, max_len), np.int32)
    lm_mask = np.zeros((b, c, max_len - 1), np.float32)
    for i, example_seqs in enumerate(seqs):
        for j, ids in enumerate(example_seqs):
            tokens[i, j, : len(ids)] = ids
            extract[i, j] = len(ids) - 1
            if sp.delimiter_id in ids:  # BERT's token types: 1 after the first <delim>, pads 0
                segment[i, j, ids.index(sp.delimiter_id) + 1 : len(ids)] = 1
            lm_mask[i, j, : len(ids) - 1] = 1.0  # every real next token, the specials included
    label = np.array([lbl for _, lbl in examples], np.int32)
    return {
        "tokens": tokens,
        "extract": extract,
        "segment": segment,
        "lm_mask": lm_mask,
        "label": label,
    }


# ------------------------------------------------------------------ demo tasks


def _doc_lines(texts: Sequence[str]) -> list[list[str]]:
    """Each document's code lines worth a question: 8-100 characters, not comments."""
    docs = []
    for text in texts:
        lines = [x.rstrip() for x in text.split("\n")]
        docs.append(
            [x for x in lines if 8 <= len(x.strip()) <= 100 and not x.strip().startswith("#")]
        )
    return [d for d in docs if len(d) >= 4]


def _shuffle_words(line: str, rng: random.Random) -> str:
    words = line.split()
    shuffled = words[:]
    while shuffled == words and len(set(words)) > 1:
        rng.shuffle(shuffled)
    return line[: len(line) - len(line.lstrip())] + " ".join(shuffled)


def demo_examples(
    task: str, texts: Sequence[str], n: int, seed: int
) -> list[tuple[tuple[str, ...], int]]:
    """Offline labelled examples made from a corpus: (segments, label) pairs.

    real_or_shuffled (classification): is this line real, or its words shuffled?
    line_follows (entailment): does the hypothesis line come right after the premise line?
    same_file (similarity): are the two lines from the same file?
    next_line (multiple choice): which of 4 lines follows the 2-line context?
    """
    if task not in TASKS:
        raise ValueError(f"unknown fine-tuning task {task!r}; choose one of {', '.join(TASKS)}.")
    rng = random.Random(seed)
    docs = _doc_lines(texts)
    if len(docs) < 2:
        raise ValueError("the corpus has too few documents with usable lines for a demo task.")
    out = []
    for _ in range(n):
        d = rng.randrange(len(docs))
        lines, other = docs[d], docs[(d + rng.randrange(1, len(docs))) % len(docs)]
        i = rng.randrange(2, len(lines) - 1)
        label = rng.randrange(2)
        if task == "real_or_shuffled":
            line = lines[i] if len(set(lines[i].split())) > 1 else lines[i] + " = 0"
            out.append(((_shuffle_words(line, rng) if label else line,), label))
        elif task == "line_follows":
            out.append(((lines[i], lines[i + 1] if label else rng.choice(other)), label))
        elif task == "same_file":
            out.append(((lines[i], rng.choice(lines if label else other)), label))
        else:
            options = [lines[i]] + [rng.choice(docs[rng.randrange(len(docs))]) for _ in range(3)]
            order = rng.sample(range(4), 4)
            out.append(
                (("\n".join(lines[i - 2 : i]), *[options[k] for k in order]), order.index(0))
            )
    return out


TASKS = {
    "real_or_shuffled": ("classification", 2),
    "line_follows": ("entailment", 2),
    "same_file": ("similarity", 2),
    "next_line": ("multiple_choice", 4),
}


def encode_examples(tokenizer, examples) -> list[tuple[list[list[int]], int]]:
    return [([tokenizer.encode(s) for s in segments], label) for segments, label in examples]
