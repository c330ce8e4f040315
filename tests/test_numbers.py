"""The number-words task: words, the split, the three batch formats, batching and resume."""

import json

import numpy as np
import pytest

from gptjax.data import numbers
from gptjax.data.numbers import format_batch, make_task_datasets, number_to_words
from gptjax.data.tokenizer import ByteTokenizer, CharTokenizer, Specials

# --- words ---------------------------------------------------------------------------------

HAND = {
    0: "zero",
    7: "seven",
    10: "ten",
    15: "fifteen",
    19: "nineteen",
    20: "twenty",
    42: "forty-two",
    99: "ninety-nine",
    100: "one hundred",
    101: "one hundred one",
    110: "one hundred ten",
    342: "three hundred forty-two",
    1000: "one thousand",
    1001: "one thousand one",
    7019: "seven thousand nineteen",
    12345: "twelve thousand three hundred forty-five",
    100000: "one hundred thousand",
    342105: "three hundred forty-two thousand one hundred five",
    999999: "nine hundred ninety-nine thousand nine hundred ninety-nine",
}

_SMALL_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
SMALL = {w: i for i, w in enumerate(_SMALL_WORDS.split())}  # noqa: SIM905
TENS = {
    w: 10 * i
    for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)  # noqa: SIM905
}


def _group(words: list[str]) -> int:
    """A strict parser of 1..999 words: [ONE hundred] [TENS[-ONE] | TEEN/ONE]."""
    value = 0
    if len(words) >= 2 and words[1] == "hundred":
        assert words[0] in SMALL and 1 <= SMALL[words[0]] <= 9, words
        value, words = 100 * SMALL[words[0]], words[2:]
    if words:
        assert len(words) == 1, words
        tens, _, ones = words[0].partition("-")
        if ones:
            assert tens in TENS and 1 <= SMALL[ones] <= 9, words
            value += TENS[tens] + SMALL[ones]
        else:
            assert tens in TENS or 1 <= SMALL[tens] <= 19, words
            value += TENS.get(tens) or SMALL[tens]
    assert value > 0
    return value


def words_to_number(text: str) -> int:
    """An independent inverse of number_to_words that rejects non-canonical forms."""
    if text == "zero":
        return 0
    words = text.split(" ")
    if "thousand" in words:
        i = words.index("thousand")
        high, words = _group(words[:i]), words[i + 1 :]
        return 1000 * high + (_group(words) if words else 0)
    return _group(words)


def test_number_words_hand_cases():
    for n, words in HAND.items():
        assert number_to_words(n) == words, n


def test_number_words_invert_over_the_range():
    seen = set()
    for n in range(100_000):
        words = number_to_words(n)
        assert words_to_number(words) == n, words
        assert "and" not in words.split() and "  " not in words and words == words.strip()
        seen.add(words)
    assert len(seen) == 100_000
    for n in (100_001, 250_019, 999_999, 512_700):  # spot checks above 10**5
        assert words_to_number(number_to_words(n)) == n


def test_number_words_reject_out_of_range():
    for bad in (-1, 10**6, 2.0):
        with pytest.raises(ValueError, match=r"\[0, 1000000\)"):
            number_to_words(bad)


def test_tasks_are_the_two_directions():
    assert numbers.TASKS["numbers"](342) == ("three hundred forty-two", "342")
    assert numbers.TASKS["numbers_reverse"](342) == ("342", "three hundred forty-two")


# --- split ---------------------------------------------------------------------------------


def test_split_is_disjoint_stable_and_about_ten_percent():
    train, val = numbers.numbers("train", 10_000), numbers.numbers("validation", 10_000)
    assert set(train).isdisjoint(val) and sorted(train + val) == list(range(10_000))
    assert 0.09 < len(val) / 10_000 < 0.11
    # Golden values: the split is a fixed hash. If you change it on purpose, update these.
    assert numbers.numbers("validation", 30) == [7, 9, 10]
    assert len(val) == 1017
    assert 0 in train  # the only number that says "zero"
    # Growing the range never moves a number between splits.
    assert numbers.numbers("validation", 1000) == [n for n in val if n < 1000]
    # Every last digit validates (a Knuth hash's low bits would leave only even numbers).
    assert {n % 10 for n in val} == set(range(10))


def test_pairs_and_texts():
    val = numbers.pairs("numbers", "validation", 30)
    assert val == [("seven", "7"), ("nine", "9"), ("ten", "10")]
    assert numbers.pairs("numbers_reverse", "validation", 30)[0] == ("7", "seven")
    assert len(numbers.pairs("numbers", "train", 30)) == 27
    texts = numbers.texts("numbers", "all", 30)
    assert len(texts) == 60 and "twenty-nine" in texts and "29" in texts
    assert set("".join(numbers.texts("numbers", "train"))) == set(
        "".join(numbers.texts("numbers", "all"))
    )
    with pytest.raises(ValueError, match="unknown task"):
        numbers.pairs("letters", "train")
    with pytest.raises(ValueError, match="unknown split"):
        numbers.pairs("numbers", "test")
    with pytest.raises(ValueError, match="max_number"):
        numbers.pairs("numbers", "train", 10**6 + 1)


# --- batch formats -------------------------------------------------------------------------

SP = Specials(pad_id=1, eos_id=2, start_id=3, delimiter_id=4, extract_id=6, mask_id=5)
EXAMPLES = [([10, 11, 12], [20, 21]), ([13], [22, 23, 24])]


def _check(batch, expected):
    assert set(batch) == set(expected)
    for key, (dtype, rows) in expected.items():
        assert batch[key].dtype == dtype, key
        np.testing.assert_array_equal(batch[key], rows, err_msg=key)


def test_decoder_format():
    batch = format_batch("causal", EXAMPLES, SP, seq_len=8, tgt_len=4)
    _check(
        batch,
        {
            "tokens": (
                np.int32,
                [[3, 10, 11, 12, 4, 20, 21, 2, 1], [3, 13, 4, 22, 23, 24, 2, 1, 1]],
            ),
            "loss_mask": (np.float32, [[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 0, 0]]),
        },
    )
    # The scored next-token targets are exactly t then eos.
    targets = batch["tokens"][:, 1:]
    for row, (_, t) in enumerate(EXAMPLES):
        assert list(targets[row][batch["loss_mask"][row] == 1]) == t + [SP.eos_id]


def test_encoder_format():
    batch = format_batch("slots", EXAMPLES, SP, seq_len=9, tgt_len=4)
    _check(
        batch,
        {
            "tokens": (np.int32, [[3, 10, 11, 12, 4, 5, 5, 5, 5], [3, 13, 4, 5, 5, 5, 5, 1, 1]]),
            "targets": (np.int32, [[0, 0, 0, 0, 0, 20, 21, 2, 1], [0, 0, 0, 22, 23, 24, 2, 0, 0]]),
            "loss_mask": (np.float32, [[0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0, 0]]),
            "mask": (np.int32, [[1] * 9, [1, 1, 1, 1, 1, 1, 1, 0, 0]]),
        },
    )


def test_seq2seq_format():
    batch = format_batch("pair", EXAMPLES, SP, seq_len=5, tgt_len=4)
    _check(
        batch,
        {
            "src": (np.int32, [[10, 11, 12, 2, 1], [13, 2, 1, 1, 1]]),
            "src_mask": (np.int32, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
            "tgt_in": (np.int32, [[3, 20, 21, 1, 1], [3, 22, 23, 24, 1]]),
            "tgt": (np.int32, [[20, 21, 2, 1, 1], [22, 23, 24, 2, 1]]),
            "tgt_mask": (np.float32, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]),
        },
    )
    # tgt_in is tgt shifted right behind start, wherever the target is real.
    shifted = np.concatenate([np.full((2, 1), SP.start_id), batch["tgt"][:, :-1]], axis=1)
    real = batch["tgt_mask"] == 1
    np.testing.assert_array_equal(batch["tgt_in"][real], shifted[real])


def test_format_takes_a_tokenizer_as_specials():
    tok = ByteTokenizer()
    batch = format_batch("pair", [([65], [66])], tok, seq_len=3, tgt_len=2)
    np.testing.assert_array_equal(batch["src"], [[65, tok.eos_id, tok.pad_id]])
    np.testing.assert_array_equal(batch["tgt_in"], [[tok.start_id, 66, tok.pad_id]])


@pytest.mark.parametrize(
    "family,seq_len,tgt_len,match",
    [
        ("causal", 6, 4, "seq_len=6 is too small for the 'causal' format.*needs seq_len >= 7"),
        ("slots", 8, 4, "seq_len=8 is too small for the 'slots' format.*needs seq_len >= 9"),
        ("slots", 20, 3, "needs tgt_len >= 4, got tgt_len=3"),
        ("pair", 3, 4, "seq_len=3 is too small for the 'pair' format.*needs seq_len >= 4"),
        ("bert", 20, 4, "unknown batch format 'bert'"),
    ],
)
def test_rows_that_do_not_fit_raise(family, seq_len, tgt_len, match):
    with pytest.raises(ValueError, match=match):
        format_batch(family, EXAMPLES, SP, seq_len=seq_len, tgt_len=tgt_len)


def test_min_seq_len_is_tight():
    tok = CharTokenizer.from_texts(numbers.texts("numbers", "all", 1000))
    assert numbers.task_lengths("numbers", tok, 1000) == (len("seven hundred seventy-seven"), 3)
    examples = numbers.tokenize_pairs(numbers.pairs("numbers", "train", 1000), tok)
    tgt_len = numbers.tgt_len_of("numbers", tok, 1000)
    for family in numbers.FORMATS:
        seq_len = numbers.min_seq_len(family, "numbers", tok, 1000)
        format_batch(family, examples, tok, seq_len, tgt_len)
        with pytest.raises(ValueError, match="too small"):
            format_batch(family, examples, tok, seq_len - 1, tgt_len)


# --- datasets ------------------------------------------------------------------------------

MAX, SEQ, BATCH = 1000, 36, 32  # 898 train numbers: 28 batches per epoch


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.from_texts(numbers.texts("numbers", "all", MAX))


def _texts_of_row(family, batch, row, tok):
    """Recover (src, tgt) text from one row of a batch, through the format's masks."""
    if family == "causal":
        tokens, scored = batch["tokens"][row], batch["loss_mask"][row] == 1
        delim = list(tokens).index(tok.delimiter_id)
        return tok.decode(tokens[1:delim]), tok.decode(tokens[1:][scored])
    if family == "slots":
        tokens, slots = batch["tokens"][row], batch["loss_mask"][row] == 1
        delim = list(tokens).index(tok.delimiter_id)
        return tok.decode(tokens[1:delim]), tok.decode(batch["targets"][row][slots])
    src = batch["src"][row][batch["src_mask"][row] == 1]
    return tok.decode(src), tok.decode(batch["tgt"][row][batch["tgt_mask"][row] == 1])


@pytest.mark.parametrize("task", numbers.TASKS)
@pytest.mark.parametrize("family", numbers.FORMATS)
def test_eval_pass_holds_the_validation_pairs_in_order(family, task, tok):
    train_iter, eval_factory = make_task_datasets(
        task, family, tok, SEQ, BATCH, max_number=MAX, eval_batch_size=16
    )
    val = numbers.pairs(task, "validation", MAX)
    batches = list(eval_factory())
    assert len(batches) == len(val) // 16  # the last partial batch is dropped
    got = [_texts_of_row(family, b, r, tok) for b in batches for r in range(16)]
    assert got == val[: len(got)]
    train = set(numbers.pairs(task, "train", MAX))
    batch = next(train_iter)
    assert {_texts_of_row(family, batch, r, tok) for r in range(BATCH)} <= train
    assert len(list(eval_factory())) == len(batches)  # a fresh pass each call


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("family,steps", [("causal", 0), ("slots", 5), ("pair", 30)])
def test_resume_gives_the_same_next_batches(family, steps, tok):
    reference = _take(
        make_task_datasets("numbers", family, tok, SEQ, BATCH, seed=3, max_number=MAX)[0], steps + 4
    )
    it = make_task_datasets("numbers", family, tok, SEQ, BATCH, seed=3, max_number=MAX)[0]
    _take(it, steps)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make_task_datasets("numbers", family, tok, SEQ, BATCH, max_number=MAX, state=state)[0]
    _assert_same(_take(resumed, 4), reference[steps:])
    fresh = make_task_datasets("numbers", family, tok, SEQ, BATCH, max_number=MAX)[0]
    fresh.set_state(state)
    _assert_same(_take(fresh, 1), reference[steps : steps + 1])
    other = make_task_datasets("numbers", family, tok, SEQ, BATCH, seed=4, max_number=MAX)[0]
    assert not np.array_equal(
        next(other)[next(iter(reference[0]))], reference[0][next(iter(reference[0]))]
    )


@pytest.mark.parametrize("family", numbers.FORMATS)
def test_two_processes_concatenate_to_one(family, tok):
    whole = _take(
        make_task_datasets("numbers", family, tok, SEQ, BATCH, seed=1, max_number=MAX)[0], 30
    )
    parts = [
        _take(
            make_task_datasets(
                "numbers",
                family,
                tok,
                SEQ,
                BATCH,
                seed=1,
                process_index=p,
                process_count=2,
                max_number=MAX,
            )[0],
            30,
        )
        for p in (0, 1)
    ]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            assert parts[0][step][key].shape[0] == BATCH // 2
            np.testing.assert_array_equal(
                np.concatenate([parts[0][step][key], parts[1][step][key]]), value
            )


def test_dataset_errors_are_clear(tok):
    with pytest.raises(ValueError, match="validation split has 13 examples.*eval batch of 16"):
        make_task_datasets("numbers", "pair", tok, SEQ, 16, max_number=100)
    with pytest.raises(ValueError, match="seq_len=20 is too small for the 'causal' format"):
        make_task_datasets("numbers", "causal", tok, 20, BATCH, max_number=MAX)
    with pytest.raises(ValueError, match="fewer than one global batch of 1024"):
        make_task_datasets("numbers", "pair", tok, SEQ, 1024, max_number=MAX)
