"""Tokenizers: exact round trips, special ids, save/load, vocabulary checks."""

import os

import pytest

from gptjax.data import builders
from gptjax.data.tokenizer import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    check_vocab,
    load_tokenizer,
    train_sentencepiece,
)

CODE = "def f(x):\r\n\tif x:\n\t\treturn  x  \n\n\n    # trailing   \n\n\tpass\t\n"
CHINESE = "中文文本，测试分词器。\n第二行"
EMOJI = "smile 😀 family 👨‍👩‍👧 flag 🇺🇳"
SPACE_MARK = "\u2581"  # sentencepiece's own whitespace marker, as a literal character
CONTROL = "".join(chr(i) for i in range(32)) + "\x7f\x85\u200b\u2028\u2029\ufeff"
# Every 251st code point (surrogates cannot be encoded as UTF-8 by sentencepiece).
CODE_POINTS = "".join(chr(i) for i in range(1, 0x110000, 251) if not 0xD800 <= i < 0xE000)
TEXTS = [
    CODE,
    CHINESE,
    EMOJI,
    CONTROL,
    CODE_POINTS,
    "",
    " ",
    "\n",
    "\r\n\r\n",
    "  leading",
    SPACE_MARK,
    f"a{SPACE_MARK}b",
    f"{SPACE_MARK}{SPACE_MARK} {SPACE_MARK}x{SPACE_MARK}",
    "literal specials <s></s><pad><unk><start><delim><extract>",
    "digits 1234567890 3.14159",
]
TEXT_IDS = [
    "code",
    "chinese",
    "emoji",
    "control",
    "code_points",
    "empty",
    "space",
    "newline",
    "crlf",
    "leading",
    "mark",
    "mark_inside",
    "marks",
    "specials",
    "digits",
]


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A small BPE trained on a few stdlib files: ASCII code, so Chinese, emoji and most code
    points in TEXTS are outside the training text and exercise byte fallback."""
    files = builders.text_files.stdlib_files(max_files=25)
    return train_sentencepiece(files, vocab_size=800)


def all_tokenizers(sp_tokenizer):
    return {
        "sentencepiece": sp_tokenizer,
        "byte": ByteTokenizer(),
        "char": CharTokenizer.from_texts(TEXTS),
    }


@pytest.mark.parametrize("kind", ["sentencepiece", "byte", "char"])
@pytest.mark.parametrize("text", TEXTS, ids=TEXT_IDS)
def test_round_trip_is_exact(sp_tokenizer, kind, text):
    tok = all_tokenizers(sp_tokenizer)[kind]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert not set(ids) & tok.special_ids, "plain text must never encode to special ids"


def test_sentencepiece_round_trips_real_code(sp_tokenizer):
    for path in builders.text_files.stdlib_files()[200:260]:
        text = builders.text_files.read_source(path) or ""
        assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text, path


def test_sentencepiece_learns_merges_and_byte_fallback(sp_tokenizer):
    assert 600 < sp_tokenizer.vocab_size <= 800
    assert len(sp_tokenizer.encode("return self")) < len("return self") / 2
    assert [sp_tokenizer.id_to_piece(i) for i in sp_tokenizer.encode("\n\t")] == ["\n", "\t"]
    # A character never seen in training becomes its UTF-8 byte pieces.
    pieces = [sp_tokenizer.id_to_piece(i) for i in sp_tokenizer.encode("😀")]
    assert pieces == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # The literal marker is encoded as its bytes, not as sentencepiece's space.
    pieces = [sp_tokenizer.id_to_piece(i) for i in sp_tokenizer.encode(SPACE_MARK)]
    assert pieces == ["<0xE2>", "<0x96>", "<0x81>"]


def test_encode_batch_equals_encode(sp_tokenizer):
    assert sp_tokenizer.encode_batch(TEXTS) == [sp_tokenizer.encode(t) for t in TEXTS]


def test_byte_tokenizer_handles_lone_surrogates_and_bad_bytes():
    tok = ByteTokenizer()
    text = "a\ud800b"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"  # sampled invalid UTF-8 does not crash


@pytest.mark.parametrize("kind", ["sentencepiece", "byte", "char"])
def test_special_ids_distinct_in_range_and_skipped_by_decode(sp_tokenizer, kind):
    tok = all_tokenizers(sp_tokenizer)[kind]
    specials = [
        tok.pad_id,
        tok.bos_id,
        tok.eos_id,
        tok.start_id,
        tok.delimiter_id,
        tok.extract_id,
        tok.mask_id,
    ]
    assert len(set(specials)) == len(SPECIAL_TOKENS)
    assert all(0 <= i < tok.vocab_size for i in specials)
    ids = tok.encode("if")
    noisy = [tok.bos_id, tok.start_id] + ids[:1] + [tok.delimiter_id, tok.pad_id] + ids[1:]
    noisy += [
        tok.extract_id,
        tok.mask_id,
        tok.eos_id,
        tok.vocab_size + 3,
    ]  # past the vocab: a padded model
    assert tok.decode(noisy) == "if"


def test_char_tokenizer_unknown_characters():
    tok = CharTokenizer.from_texts(["abc"])
    assert tok.vocab_size == len(SPECIAL_TOKENS) + 1 + 3
    assert tok.encode("abz") == [tok.encode("a")[0], tok.encode("b")[0], tok.unk_id]
    assert tok.decode(tok.encode("abz")) == "ab\ufffd"
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer([])


@pytest.mark.parametrize("kind", ["sentencepiece", "byte", "char"])
def test_save_load_gives_identical_encodings(sp_tokenizer, kind, tmp_path):
    tok = all_tokenizers(sp_tokenizer)[kind]
    path = tok.save(tmp_path / kind)
    for where in (path, tmp_path / kind):
        loaded = load_tokenizer(where)
        assert type(loaded) is type(tok)
        assert loaded.fingerprint == tok.fingerprint
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.special_ids == tok.special_ids
        assert [loaded.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    assert not [f for f in os.listdir(tmp_path / kind) if ".tmp" in f]


def test_fingerprints_differ_between_tokenizers(sp_tokenizer):
    prints = {t.fingerprint for t in all_tokenizers(sp_tokenizer).values()}
    prints.add(CharTokenizer.from_texts(["other alphabet"]).fingerprint)
    assert len(prints) == 4


def test_train_sentencepiece_writes_model_file_and_respects_max_chars(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    tok = train_sentencepiece([str(corpus)], vocab_size=320, out_path=tmp_path / "sp.model")
    assert isinstance(load_tokenizer(tmp_path / "sp.model"), SentencePieceTokenizer)
    assert load_tokenizer(tmp_path / "sp.model").fingerprint == tok.fingerprint
    # With a tiny budget only the first text is seen, so the second one's words are not merged.
    small = train_sentencepiece(
        ["aaaa bbbb " * 50, "zyxw vuts " * 500], vocab_size=400, max_chars=300
    )
    assert len(small.encode("zyxw")) == 4
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(["abc"], vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer(tmp_path / "junk.model")
    (tmp_path / "tokenizer.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path)


def test_check_vocab():
    tok = ByteTokenizer()
    check_vocab(tok, tok.vocab_size)
    check_vocab(tok, 384)  # a padded model vocabulary is fine
    with pytest.raises(ValueError, match=r"263 ids.*vocab_size is 256.*at least 263.*384"):
        check_vocab(tok, 256)
