"""Validation splits of the text builders (gptjax/data/builders/splits.py): the contiguous tail
against nanoGPT's rule computed here from the raw files, no overlap with train, the split in the
prepared-data and token-cache keys, and one-line errors."""

import os

import numpy as np
import pytest

from gptjax.data import builders, pipeline
from gptjax.data.config import DataConfig
from gptjax.data.tokenizer import ByteTokenizer, CharTokenizer

SHAKESPEARE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare", "input.txt"
)


def texts_of(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i]["text"].decode() for i in range(len(source))]


@pytest.fixture
def files(tmp_path):
    """Seven files of different lengths and distinct characters per file (so a misplaced
    piece shows), with tabs and CRLF; returns (glob, their texts in order)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"file {i}:\t" + chr(ord("a") + i) * (11 * i + 5) + "\r\n" for i in range(7)]
    for i, text in enumerate(texts):
        (corpus / f"f{i}.txt").write_bytes(text.encode())
    return str(corpus / "*.txt"), texts


def prepare(pattern, tmp_path, split="tail", fraction=None, chunking="auto"):
    config = builders.with_validation_split(
        builders.glob_config(pattern, chunking), split, fraction
    )
    return builders.prepare(config, tmp_path / "tfds")


@pytest.mark.parametrize("fraction, train_share", [(0.1, 0.9), (0.25, 0.75), (0.5, 0.5)])
def test_tail_is_the_last_fraction_of_the_characters(files, tmp_path, fraction, train_share):
    pattern, texts = files
    builder = prepare(pattern, tmp_path, fraction=fraction)
    train, validation = texts_of(builder, "train"), texts_of(builder, "validation")
    text = "".join(texts)
    cut = int(len(text) * train_share)  # nanoGPT: data[:int(n*0.9)], data[int(n*0.9):]
    assert "".join(train) == text[:cut] and "".join(validation) == text[cut:]
    assert sum(map(len, train + validation)) == len(text)  # nothing twice, nothing lost
    # Every cut here falls inside a file: its two pieces end train and start validation.
    assert len(train) + len(validation) == len(texts) + 1
    assert train[-1] + validation[0] in texts and train[:-1] == texts[: len(train) - 1]


def test_tail_of_one_file_cuts_then_chunks_paragraphs(tmp_path):
    paragraphs = [f"Speaker {i}:\n" + "word " * (i % 7 + 1) + f"line {i}\n" for i in range(40)]
    text = "\n".join(paragraphs)  # paragraphs end in '\n', so a blank line separates them
    path = tmp_path / "play.txt"
    path.write_text(text)
    builder = prepare(str(path), tmp_path)
    train, validation = texts_of(builder, "train"), texts_of(builder, "validation")
    cut = int(len(text) * 0.9)
    assert train[0] == paragraphs[0] and len(train) + len(validation) in (40, 41)
    # Chunking moves newlines only: the characters are the text's, cut at the same place.
    assert "".join(train).replace("\n", "") == text[:cut].replace("\n", "")
    assert "".join(validation).replace("\n", "") == text[cut:].replace("\n", "")


def test_hash_split_default_is_unchanged_and_interleaved(files, tmp_path):
    pattern, _ = files
    config = builders.glob_config(pattern)
    assert builders.with_validation_split(config) is config  # old caches stay valid
    assert builders.with_validation_split("shakespeare") == "shakespeare"
    assert builders.with_validation_split("stdlib", "hash", 0.02) == "stdlib"
    builder = prepare(pattern, tmp_path, split="hash", fraction=0.3)
    picked = [i for i in range(7) if builders.splits.is_validation(f"f{i}.txt", 0.3)]
    heads = [t.split(":")[0] for t in texts_of(builder, "validation")]
    assert heads == [f"file {i}" for i in picked]
    assert min(picked) < 5 < max(picked) and 5 not in picked  # file 5 trains between them


def test_each_split_has_its_own_prepared_data_and_token_cache(files, tmp_path):
    pattern, texts = files
    names = {
        pipeline.resolve_config(pattern).name,
        pipeline.resolve_config(pattern, "hash", 0.3).name,
        pipeline.resolve_config(pattern, "tail").name,
        pipeline.resolve_config(pattern, "tail", 0.25).name,
    }
    assert len(names) == 4
    assert pipeline.resolve_config("shakespeare", "tail").name == "shakespeare_tail0.1"
    tok = ByteTokenizer()
    streams = {}
    for split in ("hash", "tail"):  # one data_dir: the second must not reuse the first's data
        _, eval_factory = pipeline.make_datasets(
            pattern, tok, 8, 2, tmp_path, validation_split=split, validation_fraction=0.3
        )
        windows = eval_factory().windows  # the stream up to a tail shorter than 8 tokens
        streams[split] = np.concatenate([windows[:, :-1].ravel(), windows[-1, -1:]])
    text = "".join(texts)
    cut, f6_start = int(len(text) * 0.7), len(text) - len(texts[6])
    assert f6_start - len(texts[5]) < cut < f6_start  # the cut is inside file 5
    tail = tok.encode(text[cut:f6_start]) + [tok.eos_id] + tok.encode(texts[6]) + [tok.eos_id]
    hashed = tok.encode(texts[4]) + [tok.eos_id] + tok.encode(texts[6]) + [tok.eos_id]
    assert len(tail) - 8 < len(streams["tail"]) <= len(tail)
    np.testing.assert_array_equal(streams["tail"], tail[: len(streams["tail"])])
    np.testing.assert_array_equal(streams["hash"], hashed[: len(streams["hash"])])
    for split in ("hash", "tail"):
        config = pipeline.resolve_config(pattern, split, 0.3)
        tokens = os.path.join(builders.make_builder(config, tmp_path).data_dir, "tokens")
        assert len(os.listdir(tokens)) == 2, f"{split}: its own train and validation caches"


def test_data_config_passes_the_split_through(files, tmp_path):
    pattern, texts = files
    text = "".join(texts)
    cfg = DataConfig(
        dataset=pattern, tokenizer="char", data_dir=str(tmp_path), validation_split="tail"
    )
    from gptjax.data.config import build_tokenizer, run_datasets

    tok = build_tokenizer(cfg)
    assert isinstance(tok, CharTokenizer)
    assert set(tok.chars) == set(text[: int(len(text) * 0.9)])  # trained on train only
    _, eval_factory = run_datasets(cfg, tok, task_format="decoder", seq_len=4, batch_size=2)
    first = eval_factory().windows[0]
    assert tok.decode(first) == text[int(len(text) * 0.9) :][:5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(validation_split="random"), "DataConfig.validation_split='random' is not one of"),
        (dict(validation_fraction=1.5), "DataConfig.validation_fraction=1.5 must be in (0, 1)"),
        (dict(validation_fraction=0.0), "must be in (0, 1)"),
        (dict(dataset="numbers", validation_split="tail"), "apply to text corpora"),
    ],
)
def test_bad_split_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        DataConfig(**kwargs)
    assert message in str(e.value).splitlines()[0]  # gin appends its call site below


def test_bad_split_errors_from_the_builder(files, tmp_path):
    pattern, _ = files
    with pytest.raises(ValueError, match="validation_split='middle' is not one of"):
        builders.with_validation_split("stdlib", "middle")
    with pytest.raises(ValueError, match="leaves an empty split"):
        prepare(pattern, tmp_path, fraction=0.999)  # int(336 * 0.001) == 0 train characters
    config = builders.TextConfig(name="bad", path=pattern, validation_split="Tail")
    with pytest.raises(ValueError, match="is not one of"):
        builders.prepare(config, tmp_path / "tfds")


def test_cli_reports_a_bad_split_in_one_line(tmp_path, capsys):
    import gin

    from gptjax.cli import main as cli

    argv = ["train", f"--workdir={tmp_path}", "--gin_bindings=DataConfig.validation_split = 'x'"]
    try:
        assert cli.main(argv) == 1
    finally:
        gin.clear_config()  # the bad binding must not reach the tests that run after this one
    err = capsys.readouterr().err
    first = err.splitlines()[0]  # gin's "In call to configurable" line may follow
    assert first.startswith("gptjax train: error: DataConfig.validation_split='x' is not one of")
    assert "Traceback" not in err


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="no local tiny Shakespeare")
def test_shakespeare_tail_is_nanogpts_validation_text(tmp_path):
    config = pipeline.resolve_config("shakespeare", "tail")
    builder = builders.prepare(config, tmp_path, path=SHAKESPEARE)
    with open(SHAKESPEARE, encoding="utf-8") as f:
        raw = f.read()
    assert len(raw) == 1_115_394 and int(len(raw) * 0.9) == 1_003_854  # nanoGPT's prepare.py
    validation = texts_of(builder, "validation")
    assert "".join(validation).replace("\n", "") == raw[1_003_854:].replace("\n", "")
    tok = CharTokenizer.from_texts(raw)
    stream = pipeline.token_stream(builder, "validation", tok)
    # nanoGPT's val.bin holds 111,540 ids; here each blank line's second newline is EOS.
    assert abs(len(stream) - 111_540) <= 3
