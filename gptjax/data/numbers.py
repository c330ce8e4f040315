"""An offline sequence-to-sequence task: English number words <-> digits.

``"three hundred forty-two" -> "342"`` ('numbers') and its reverse ('numbers_reverse'), over
``0 <= n < max_number``. No downloads, an exact answer per source, and a split where every
validation number is unseen in training, so exact match measures generalisation. One task, three
batch formats, so the three model families of the repo train and are scored on the same data
(each family names its format, `gptjax.models.family.Family.task_format`):

  causal  (GPT)      ``[start] s [delim] t [eos]``; the loss scores t and eos only.
  slots   (BERT)     ``[start] s [delim]`` then ``tgt_len`` mask slots predicted at once.
  pair    (Vaswani)  source ``s [eos]``; target ``t [eos]``, decoder input ``[start] t``.

Range: ``max_number=10_000`` (0..9999: 8,983 train / 1,017 validation numbers) is the default
because it is what a nano encoder–decoder learns on a CPU in a test: ``nano_transformer_tiny``
(0.26M params) with a 400-piece BPE reaches 99.4-100% validation exact match in 800 steps of 64
(35-75 s on 2 shared cores; tests/test_task_eval.py); with a char tokenizer (sources up to 42
tokens instead of 7) one 800-step run reached 97%, at about 3x the cost per step. Every number word
already occurs below 10,000, so the larger ranges (up to 10**6) only add longer compositions.

Pure Python / numpy: nothing here needs jax.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from gptjax.data import pipeline, span_corruption
from gptjax.data.tokenizer import Specials

ONES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
)
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
LIMIT = 10**6  # number_to_words covers 0 <= n < LIMIT
SPLITS = ("train", "validation")
FORMATS = ("causal", "slots", "pair")  # the batch layouts below; each model family names one


# ------------------------------------------------------------------------------ the words


def _below_thousand(n: int) -> str:
    """1 <= n < 1000 in words ("three hundred forty-two")."""
    hundreds, rest = divmod(n, 100)
    if rest < 20:
        tail = ONES[rest] if rest else ""
    else:
        tens, ones = divmod(rest, 10)
        tail = TENS[tens] + (f"-{ONES[ones]}" if ones else "")
    head = f"{ONES[hundreds]} hundred" if hundreds else ""
    return " ".join(part for part in (head, tail) if part)


def number_to_words(n: int) -> str:
    """American English words for ``0 <= n < 10**6``, without "and".

    0 "zero", 42 "forty-two", 100000 "one hundred thousand",
    342105 "three hundred forty-two thousand one hundred five".
    """
    if not isinstance(n, (int, np.integer)) or not 0 <= n < LIMIT:
        raise ValueError(f"number_to_words takes an integer in [0, {LIMIT}), got {n!r}")
    n = int(n)
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    head = f"{_below_thousand(thousands)} thousand" if thousands else ""
    return " ".join(part for part in (head, _below_thousand(rest) if rest else "") if part)


def _words_to_digits(n: int) -> tuple[str, str]:
    return number_to_words(n), str(n)


def _digits_to_words(n: int) -> tuple[str, str]:
    return str(n), number_to_words(n)


# Task name -> n -> (source text, target text).
TASKS: dict[str, Callable[[int], tuple[str, str]]] = {
    "numbers": _words_to_digits,
    "numbers_reverse": _digits_to_words,
}


# ------------------------------------------------------------------------------ the split


def is_validation(n: int) -> bool:
    """Whether ``n`` is a validation number: a fixed (unsalted) hash, not its position.

    sha256 of the decimal string, first 8 bytes mod 10 == 0: about 10%, independent of
    ``max_number`` (a number never changes split when the range grows) and of n's digits.
    (Knuth's ``n * 2654435761 % 2**32 % 10`` is not usable: its parity is n's, so only even
    numbers would validate.) 0 always trains: it is the only number whose words say "zero",
    which a model could never produce (or read) otherwise.
    """
    if n == 0:
        return False
    digest = hashlib.sha256(str(int(n)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10 == 0


def _check(task: str, split: str, max_number: int, splits=SPLITS) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {tuple(TASKS)}")
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; choose one of {splits}")
    if not 0 < max_number <= LIMIT:
        raise ValueError(f"max_number must be in [1, {LIMIT}], got {max_number}")


def numbers(split: str, max_number: int = 10_000) -> list[int]:
    """The split's numbers in ``[0, max_number)``, ascending."""
    _check("numbers", split, max_number)
    want = split == "validation"
    return [n for n in range(max_number) if is_validation(n) == want]


def pairs(task: str, split: str, max_number: int = 10_000) -> list[tuple[str, str]]:
    """(source text, target text) for every number of the split, ascending."""
    _check(task, split, max_number)
    return [TASKS[task](n) for n in numbers(split, max_number)]


def texts(task: str, split: str = "all", max_number: int = 10_000) -> list[str]:
    """Every source and target string of a split ('all': both), e.g. to build a tokenizer.

    Build tokenizers from 'all' (or 'train', which has every character since 0 trains): the
    alphabet is no leak of which number maps to which.
    """
    _check(task, split, max_number, SPLITS + ("all",))
    chosen = SPLITS if split == "all" else (split,)
    return [text for s in chosen for pair in pairs(task, s, max_number) for text in pair]


_LENGTHS: dict[tuple, np.ndarray] = {}


def _token_lengths(task: str, tokenizer, max_number: int) -> np.ndarray:
    """(max_number, 2) source and target lengths in tokens, cached per (task, tokenizer
    fingerprint, max_number)."""
    key = (task, tokenizer.fingerprint, max_number)
    if key not in _LENGTHS:
        _check(task, "train", max_number)
        srcs, tgts = zip(*(TASKS[task](n) for n in range(max_number)))
        _LENGTHS[key] = np.array(
            [[len(ids) for ids in tokenizer.encode_batch(list(side))] for side in (srcs, tgts)]
        ).T
    return _LENGTHS[key]


def task_lengths(task: str, tokenizer, max_number: int = 10_000) -> tuple[int, int]:
    """(longest source, longest target) in tokens over the task's whole range (both splits),
    so train and eval formats agree."""
    src_max, tgt_max = _token_lengths(task, tokenizer, max_number).max(axis=0)
    return int(src_max), int(tgt_max)


def tgt_len_of(task: str, tokenizer, max_number: int = 10_000) -> int:
    """Target slots a row reserves: the longest target plus its eos."""
    return task_lengths(task, tokenizer, max_number)[1] + 1


def min_seq_len(fmt: str, task: str, tokenizer, max_number: int = 10_000) -> int:
    """The smallest ``seq_len`` that fits every example of the task in format ``fmt``."""
    lengths = _token_lengths(task, tokenizer, max_number)
    slots = tgt_len_of(task, tokenizer, max_number)
    return max(_needed(fmt, int(s), int(t), slots) for s, t in set(map(tuple, lengths)))


# ---------------------------------------------------------------------------- batch formats


_NEEDED = {  # the seq_len one example needs in each format (causal rows are seq_len + 1 tokens)
    "causal": lambda src, tgt, slots: src + tgt + 2,  # [start] s [delim] t [eos]
    "slots": lambda src, tgt, slots: src + 2 + slots,  # [start] s [delim] + slots
    "pair": lambda src, tgt, slots: max(src, tgt) + 1,  # s [eos] and t [eos]
}


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown batch format {fmt!r}; choose one of {FORMATS}")


def _needed(fmt: str, src_len: int, tgt_len: int, slots: int) -> int:
    _check_format(fmt)
    return _NEEDED[fmt](src_len, tgt_len, slots)


def check_fits(
    fmt: str, examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, tgt_len: int
) -> None:
    """Raise a clear ValueError when an example does not fit ``seq_len`` (or ``tgt_len``)."""
    _check_format(fmt)
    if not examples:
        return
    if fmt == "slots":
        longest = max(len(t) for _, t in examples)
        if longest + 1 > tgt_len:
            raise ValueError(
                f"a target of {longest} tokens plus eos needs tgt_len >= "
                f"{longest + 1}, got tgt_len={tgt_len}"
            )
    s, t = max(examples, key=lambda e: _needed(fmt, len(e[0]), len(e[1]), tgt_len))
    need = _needed(fmt, len(s), len(t), tgt_len)
    if need > seq_len:
        raise ValueError(
            f"seq_len={seq_len} is too small for the {fmt!r} format: an example "
            f"with a {len(s)}-token source and a {len(t)}-token target needs "
            f"seq_len >= {need}"
        )


def _row(tokens: Sequence[int], width: int, fill: int) -> np.ndarray:
    out = np.full((width,), fill, np.int32)
    out[: len(tokens)] = tokens
    return out


def format_decoder(examples, sp: Specials, seq_len: int) -> dict[str, np.ndarray]:
    """``tokens`` (B, T+1) ``[start] s [delim] t [eos] pad…``; ``loss_mask`` (B, T) is 1 where
    the next-token target ``tokens[:, j+1]`` is a token of t or the eos."""
    tokens = np.full((len(examples), seq_len + 1), sp.pad_id, np.int32)
    loss_mask = np.zeros((len(examples), seq_len), np.float32)
    for i, (s, t) in enumerate(examples):
        row = [sp.start_id, *s, sp.delimiter_id, *t, sp.eos_id]
        tokens[i, : len(row)] = row
        first = len(s) + 1  # input position of [delim], whose target is t[0]
        loss_mask[i, first : first + len(t) + 1] = 1.0
    return {"tokens": tokens, "loss_mask": loss_mask}


def format_encoder(examples, sp: Specials, seq_len: int, tgt_len: int) -> dict[str, np.ndarray]:
    """``tokens`` ``[start] s [delim]`` then ``tgt_len`` mask slots then pad; ``targets`` at
    the slots are ``t [eos]`` padded with pad_id (0 elsewhere); ``loss_mask`` 1 on the slots;
    ``mask`` 1 on every non-pad position."""
    b = len(examples)
    out = {
        "tokens": np.full((b, seq_len), sp.pad_id, np.int32),
        "targets": np.zeros((b, seq_len), np.int32),
        "loss_mask": np.zeros((b, seq_len), np.float32),
        "mask": np.zeros((b, seq_len), np.int32),
    }
    for i, (s, t) in enumerate(examples):
        first = len(s) + 2
        slots = slice(first, first + tgt_len)
        out["tokens"][i, : first + tgt_len] = [
            sp.start_id,
            *s,
            sp.delimiter_id,
            *[sp.mask_id] * tgt_len,
        ]
        out["targets"][i, slots] = _row([*t, sp.eos_id], tgt_len, sp.pad_id)
        out["loss_mask"][i, slots] = 1.0
        out["mask"][i, : first + tgt_len] = 1
    return out


def format_seq2seq(examples, sp: Specials, seq_len: int) -> dict[str, np.ndarray]:
    """``src`` = s [eos], ``tgt`` = t [eos], ``tgt_in`` = [start] t (tgt shifted right), all
    right-padded with pad_id; ``src_mask`` / ``tgt_mask`` 1 on the real source / target."""
    pairs = [([*s, sp.eos_id], [*t, sp.eos_id]) for s, t in examples]
    return span_corruption.pair_batch(pairs, sp, seq_len, seq_len)


_FORMATTERS = {
    "causal": lambda examples, sp, seq_len, tgt_len: format_decoder(examples, sp, seq_len),
    "slots": format_encoder,
    "pair": lambda examples, sp, seq_len, tgt_len: format_seq2seq(examples, sp, seq_len),
}


def format_batch(
    fmt: str,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    specials,
    seq_len: int,
    tgt_len: int,
) -> dict[str, np.ndarray]:
    """The batch dict of format ``fmt`` for tokenized ``(source ids, target ids)`` examples.

    Args:
      fmt: 'causal', 'slots' or 'pair' (see the module docstring for each layout).
      specials: a ``Specials`` or any tokenizer (pad, eos, start, delimiter and mask ids).
      seq_len: T; decoder batches hold T + 1 tokens (inputs and shifted targets).
      tgt_len: the encoder format's target slots (``tgt_len_of(task, tokenizer)``); the
        decoder and seq2seq rows end at each target's eos and ignore it.

    Raises:
      ValueError: naming ``seq_len`` (and the length needed) when an example does not fit.
    """
    check_fits(fmt, examples, seq_len, tgt_len)
    sp = Specials.of(specials)
    return _FORMATTERS[fmt](examples, sp, seq_len, tgt_len)


# ------------------------------------------------------------------------------ batching


class TaskBatchIterator(pipeline.TokenBatchIterator):
    """``TokenBatchIterator``'s order, sharding and resume, over examples instead of windows.

    The parent iterates an ``(n, 1)`` array of example indices (its "windows"), so epochs,
    ``global_batch_size``, per-process rows, ``get_state``/``set_state``, ``shuffle``/``repeat``
    and the dropped partial batch are exactly its own; ``_batch`` formats the chosen
    examples in format ``fmt``.
    """

    def __init__(
        self,
        examples: Sequence[tuple[Sequence[int], Sequence[int]]],
        fmt: str,
        specials,
        seq_len: int,
        tgt_len: int,
        global_batch_size: int,
        **kwargs,
    ):
        check_fits(fmt, examples, seq_len, tgt_len)  # fail now, not at batch 10,000
        if len(examples) < global_batch_size:
            raise ValueError(
                f"only {len(examples)} examples, fewer than one global batch of "
                f"{global_batch_size}; lower the batch size or raise max_number"
            )
        self.examples, self.fmt = list(examples), fmt
        self.specials = Specials.of(specials)
        self.seq_len, self.tgt_len = seq_len, tgt_len
        super().__init__(np.arange(len(examples))[:, None], global_batch_size, **kwargs)

    def _batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return format_batch(
            self.fmt, [self.examples[i] for i in rows], self.specials, self.seq_len, self.tgt_len
        )


def tokenize_pairs(pairs_: Sequence[tuple[str, str]], tokenizer) -> list[tuple[list, list]]:
    """(source ids, target ids) per text pair, in one batched encode per side."""
    if not pairs_:
        return []
    srcs, tgts = zip(*pairs_)
    return list(zip(tokenizer.encode_batch(list(srcs)), tokenizer.encode_batch(list(tgts))))


def make_task_datasets(
    task: str,
    fmt: str,
    tokenizer,
    seq_len: int,
    global_batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    max_number: int = 10_000,
    eval_batch_size: int | None = None,
    *,
    state: dict | None = None,
) -> tuple[TaskBatchIterator, Callable[[], TaskBatchIterator]]:
    """The task's train iterator and eval factory, with ``pipeline.make_datasets``' contract.

    Returns:
      ``(train_iter, eval_iter_factory)``: an infinite shuffled iterator over the train split
      (resumed from ``state`` when given), and a function returning a fresh single in-order
      pass over the validation split (raises here if validation is smaller than one batch).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    tgt_len = tgt_len_of(task, tokenizer, max_number)
    common = dict(
        fmt=fmt,
        specials=tokenizer,
        seq_len=seq_len,
        tgt_len=tgt_len,
        process_index=process_index,
        process_count=process_count,
    )
    train_iter = TaskBatchIterator(
        tokenize_pairs(pairs(task, "train", max_number), tokenizer),
        global_batch_size=global_batch_size,
        seed=seed,
        state=state,
        **common,
    )
    eval_examples = tokenize_pairs(pairs(task, "validation", max_number), tokenizer)
    eval_batch_size = eval_batch_size or global_batch_size
    if len(eval_examples) < eval_batch_size:
        raise ValueError(
            f"the {task!r} validation split has {len(eval_examples)} examples "
            f"(max_number={max_number}), fewer than one eval batch of "
            f"{eval_batch_size}; lower eval_batch_size or raise max_number"
        )

    def eval_iter_factory() -> TaskBatchIterator:
        return TaskBatchIterator(
            eval_examples, global_batch_size=eval_batch_size, shuffle=False, repeat=False, **common
        )

    eval_iter_factory()
    return train_iter, eval_iter_factory
