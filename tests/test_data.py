"""TFDS builders (array_record, no TensorFlow) and the packing / batching pipeline."""

import json
import os
import sys

import numpy as np
import pytest

from gptjax.data import builders, pipeline
from gptjax.data.pipeline import TokenBatchIterator, make_datasets, pack_windows
from gptjax.data.tokenizer import ByteTokenizer, CharTokenizer, train_sentencepiece

SHAKESPEARE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare", "input.txt"
)


def texts_of(builder, split):
    source = builder.as_data_source(split=split)
    return [source[i]["text"] for i in range(len(source))]


@pytest.fixture(scope="session")
def stdlib_dir(tmp_path_factory):
    """The full stdlib corpus, prepared once per session (about a second)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    builders.prepare("stdlib", data_dir)
    return data_dir


@pytest.fixture
def corpus_glob(tmp_path):
    """Twenty small files of distinct text; their documents are easy to recognise."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i:02d}.txt").write_text(f"document {i}\n" + "line\tof text\r\n" * (i + 1))
    return str(corpus / "*.txt")


# --- builders -------------------------------------------------------------------------------


def test_stdlib_builder_writes_array_record_read_without_tensorflow(stdlib_dir):
    builder = builders.make_builder("stdlib", stdlib_dir)
    files = os.listdir(builder.data_dir)
    assert any(".array_record-" in f for f in files)
    assert not any("tfrecord" in f for f in files)
    train, validation = texts_of(builder, "train"), texts_of(builder, "validation")
    assert "tensorflow" not in sys.modules
    assert isinstance(train[0], bytes) and b"def " in b"".join(train[:20])
    assert len(validation) >= 5 and len(train) > 20 * len(validation)
    assert not set(train) & set(validation)
    assert sum(map(len, train + validation)) > 5_000_000  # ~12 MB of library source


def test_split_is_deterministic_by_key():
    keys = [f"pkg/module{i}.py" for i in range(5000)]
    picked = [k for k in keys if builders.splits.is_validation(k, 0.02)]
    assert picked == [k for k in keys if builders.splits.is_validation(k, 0.02)]
    assert 50 < len(picked) < 150


def test_stdlib_subset_rebuilds_identically(tmp_path):
    config = builders.stdlib_config(max_files=30)
    first = builders.prepare(config, tmp_path / "a")
    second = builders.prepare(builders.stdlib_config(max_files=30), tmp_path / "b")
    assert first.builder_config.name == "stdlib_first30"
    for split in ("train", "validation"):
        assert texts_of(first, split) == texts_of(second, split)
    assert len(texts_of(first, "train")) + len(texts_of(first, "validation")) >= 25


def test_glob_builder_covers_every_file_once(corpus_glob, tmp_path):
    builder = builders.prepare(builders.glob_config(corpus_glob), tmp_path / "tfds")
    train, validation = texts_of(builder, "train"), texts_of(builder, "validation")
    assert validation, "a tiny corpus still gets a validation document"
    heads = sorted(t.split(b"\n")[0] for t in train + validation)
    assert heads == sorted(f"document {i}".encode() for i in range(20))
    assert b"line\tof text\r\n" in train[0]  # CRLF and tabs survive the builder


def test_glob_config_names_differ_per_pattern():
    assert builders.glob_config("a/*.txt").name != builders.glob_config("b/*.txt").name
    assert builders.glob_config("a/*.txt").name == builders.glob_config("a/*.txt").name


def test_missing_files_raise_clear_errors(tmp_path):
    missing = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(FileNotFoundError, match="no files match .*nothing"):
        builders.prepare(builders.glob_config(missing), tmp_path / "tfds")
    with pytest.raises(FileNotFoundError, match="tiny Shakespeare not found at .*absent.txt"):
        builders.prepare("shakespeare", tmp_path / "tfds", path=tmp_path / "absent.txt")
    wrong = tmp_path / "input.txt"
    wrong.write_text("To be or not to be\n\nthat is the question\n")
    with pytest.raises(ValueError, match="sha256"):
        builders.prepare("shakespeare", tmp_path / "tfds", path=wrong)
    with pytest.raises(FileNotFoundError, match="neither 'stdlib'"):
        pipeline.resolve_config("no_such_corpus")


@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="no local tiny Shakespeare")
def test_shakespeare_from_local_copy_is_chunked_into_paragraphs(tmp_path):
    assert builders.text_files.sha256_of_file(SHAKESPEARE) == builders.SHAKESPEARE_SHA256
    builder = builders.prepare("shakespeare", tmp_path, path=SHAKESPEARE)
    train, validation = texts_of(builder, "train"), texts_of(builder, "validation")
    assert train[0] == b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    assert len(train) > 6000 and 100 < len(validation) < 400
    total = sum(map(len, train + validation))
    assert 1_000_000 < total < 1_115_394  # all text, minus the blank lines between paragraphs


# --- packing --------------------------------------------------------------------------------


def test_pack_windows_boundaries():
    stream = np.arange(23)
    windows = pack_windows(stream, seq_len=5)
    assert windows.shape == (4, 6)  # (23 - 1) // 5 windows; tokens 21, 22 are the tail
    for i, window in enumerate(windows):
        np.testing.assert_array_equal(window, np.arange(5 * i, 5 * i + 6))
    # Inputs of all windows plus the final target reproduce the stream up to the tail,
    # so every token is a target exactly once.
    rebuilt = np.concatenate([windows[:, :-1].ravel(), windows[-1, -1:]])
    np.testing.assert_array_equal(rebuilt, stream[:21])
    assert pack_windows(np.arange(6), 5).shape == (1, 6)  # exactly one window
    with pytest.raises(ValueError, match="too few for one window"):
        pack_windows(np.arange(5), 5)
    with pytest.raises(ValueError, match="seq_len must be positive"):
        pack_windows(stream, 0)


def test_encode_documents_puts_eos_after_each_document():
    tok = ByteTokenizer()
    stream = pipeline.encode_documents([b"ab", "", "c"], tok)
    assert stream.dtype == np.uint16
    np.testing.assert_array_equal(stream, [97, 98, tok.eos_id, tok.eos_id, 99, tok.eos_id])


# --- batch iterator -------------------------------------------------------------------------

SEQ_LEN, NUM_WINDOWS, BATCH = 3, 43, 8  # 5 batches per epoch, 3 windows dropped each epoch


def windows():
    return pack_windows(np.arange(NUM_WINDOWS * SEQ_LEN + 1), SEQ_LEN)


def window_ids(batch):
    """Which window each row is (window i starts at token i * SEQ_LEN)."""
    return list(batch["tokens"][:, 0] // SEQ_LEN)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_iterator_epochs_are_permutations_and_seeded():
    it = TokenBatchIterator(windows(), BATCH, seed=1)
    batches = take(it, 10)
    assert batches[0]["tokens"].shape == (BATCH, SEQ_LEN + 1)
    assert batches[0]["tokens"].dtype == np.int32
    epochs = [sum((window_ids(b) for b in batches[e * 5 : (e + 1) * 5]), []) for e in (0, 1)]
    for ids in epochs:
        assert len(set(ids)) == 40 and set(ids) <= set(range(NUM_WINDOWS))
    assert epochs[0] != epochs[1], "each epoch has its own order"
    again = take(TokenBatchIterator(windows(), BATCH, seed=1), 10)
    other = take(TokenBatchIterator(windows(), BATCH, seed=2), 10)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(batches, other))


@pytest.mark.parametrize("steps_before_save", [0, 3, 5, 7, 11])
def test_resume_equals_uninterrupted(steps_before_save):
    reference = take(TokenBatchIterator(windows(), BATCH, seed=7), 16)
    it = TokenBatchIterator(windows(), BATCH, seed=7)
    take(it, steps_before_save)
    state = json.loads(json.dumps(it.get_state()))
    # The epoch advances lazily: after exactly 5 batches the state is (epoch 0, window 5 B).
    epoch = max(steps_before_save - 1, 0) // 5
    assert state == {
        "epoch": epoch,
        "window": (steps_before_save - 5 * epoch) * BATCH,
        "seed": 7,
        "order": "grain",
    }
    legacy = {
        "epoch": epoch,
        "position": steps_before_save - 5 * epoch,
        "seed": 7,
        "order": "grain",
    }
    np.testing.assert_array_equal(  # a state saved before the row cursor still resumes
        next(TokenBatchIterator(windows(), BATCH, state=legacy))["tokens"],
        reference[steps_before_save]["tokens"],
    )
    resumed = TokenBatchIterator(windows(), BATCH, seed=0, state=state)  # seed comes from state
    rest = take(resumed, 16 - steps_before_save)
    for a, b in zip(reference[steps_before_save:], rest):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    fresh = TokenBatchIterator(windows(), BATCH)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["tokens"], rest[0]["tokens"])


@pytest.mark.parametrize("process_count", [1, 2])
def test_take_hands_out_only_real_rows_and_skips_no_data(process_count):
    """GPT-3's ramp takes 1, 3, 8, 5 ... rows: the real rows of each global batch are the next
    windows of the epoch order, in every process's share, so no window is skipped; the
    padding rows repeat a real one and are reported as padding."""
    sizes = [1, 3, 8, 5, 2, 8]
    its = [
        TokenBatchIterator(windows(), BATCH, seed=3, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    order = its[0].epoch_order(0)
    got, local = [], BATCH // process_count
    for n in sizes:
        parts = [it.take(n) for it in its]
        for p, (batch, real) in enumerate(parts):
            assert batch["tokens"].shape == (local, windows().shape[1])
            assert real == int(np.clip(n - p * local, 0, local))
        got += sum((window_ids({"tokens": b["tokens"][:r]}) for b, r in parts), [])
    assert got == [int(i) for i in order[: sum(sizes)]]  # consecutive: nothing skipped
    assert its[0].get_state() == {"epoch": 0, "window": sum(sizes), "seed": 3, "order": "grain"}
    with pytest.raises(ValueError, match="take"):
        its[0].take(BATCH + 1)


def test_eval_iterator_is_one_ordered_pass():
    it = TokenBatchIterator(windows(), BATCH, shuffle=False, repeat=False)
    ids = sum((window_ids(b) for b in it), [])
    assert ids == list(range(40))
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_the_global_batch(process_count):
    whole = take(TokenBatchIterator(windows(), BATCH, seed=3), 12)
    parts = [
        take(
            TokenBatchIterator(
                windows(), BATCH, seed=3, process_index=p, process_count=process_count
            ),
            12,
        )
        for p in range(process_count)
    ]
    for step, global_batch in enumerate(whole):
        local = [part[step]["tokens"] for part in parts]
        assert all(x.shape == (BATCH // process_count, SEQ_LEN + 1) for x in local)
        np.testing.assert_array_equal(np.concatenate(local), global_batch["tokens"])
        ids = [set(x[:, 0]) for x in local]
        assert sum(map(len, ids)) == len(set().union(*ids)) == BATCH  # disjoint


def test_iterator_errors():
    with pytest.raises(ValueError, match="divisible by process_count=3"):
        TokenBatchIterator(windows(), BATCH, process_count=3)
    with pytest.raises(ValueError, match="process_index=2"):
        TokenBatchIterator(windows(), BATCH, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="fewer than one global batch of 64"):
        TokenBatchIterator(windows(), 64)
    with pytest.raises(ValueError, match="bad iterator state"):
        TokenBatchIterator(windows(), BATCH, state={"epoch": 0, "position": 99, "seed": 0})


def tag_objective(tokens_BT1, keys_B3):
    """A module-level (picklable for worker processes) objective that keeps its keys."""
    return {"tokens": tokens_BT1, "keys": keys_B3}


def ramp_and_epochs(**kw):
    """Partial takes, full batches from an unaligned cursor and an epoch boundary."""
    it = TokenBatchIterator(windows(), BATCH, seed=4, process_index=1, process_count=2, **kw)
    out = [it.take(n) for n in (3, 8, 8, 5)] + [it.take(BATCH) for _ in range(7)]
    state = it.get_state()
    it.close()
    return out, state


@pytest.mark.parametrize("objective", [None, tag_objective])
def test_read_ahead_in_threads_or_workers_hands_out_the_same_batches(objective):
    """Grain's read-ahead changes when a batch is read, never which: threads and worker
    processes give exactly the batches (and state) of reading in the caller."""
    inline, inline_state = ramp_and_epochs(prefetch=0, threads=0, objective=objective)
    assert inline_state == {"epoch": 1, "window": 5 * BATCH, "seed": 4, "order": "grain"}
    for kw in (dict(threads=2, prefetch=3), dict(workers=2)):
        got, state = ramp_and_epochs(objective=objective, **kw)
        assert state == inline_state
        for (a, real_a), (b, real_b) in zip(inline, got, strict=True):
            assert real_a == real_b and set(a) == set(b)
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


def test_epoch_order_is_grains_reseeded_shuffle():
    it = TokenBatchIterator(windows(), BATCH, seed=5)
    orders = [it.epoch_order(e) for e in (0, 1)]
    assert all(sorted(o) == list(range(NUM_WINDOWS)) for o in orders)
    assert list(orders[0]) != list(orders[1])
    # hashed seeds: seed 6's first epoch is not seed 5's second (grain seeds epoch e by seed + e)
    assert list(TokenBatchIterator(windows(), BATCH, seed=6).epoch_order(0)) != list(orders[1])
    ids = sum((window_ids(next(it)) for _ in range(5)), [])
    assert ids == list(orders[0][:40])


def test_state_resumes_through_the_orbax_checkpoint(tmp_path):
    """The iterator's state is the checkpoint's meta (JSON, checksummed): saved mid-epoch with
    batches read ahead, restored into a fresh iterator, the next batches are the same."""
    import jax
    import jax.numpy as jnp

    from gptjax.training import checkpoint as ck

    it = TokenBatchIterator(windows(), BATCH, seed=9, prefetch=4)
    for _ in range(7):
        next(it)  # the read-ahead is past the cursor now
    state = {"w": jnp.arange(3.0)}
    with ck.CheckpointManager(tmp_path, checkpoint_every=1) as mgr:
        assert mgr.save(7, state, {"data": it.get_state()})
        mgr.wait()
        step, _, meta = mgr.restore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    expected = [next(it)["tokens"] for _ in range(4)]
    resumed = TokenBatchIterator(windows(), BATCH)
    resumed.set_state(meta["data"])
    assert step == 7 and meta["data"] == {
        "epoch": 1,
        "window": 2 * BATCH,
        "seed": 9,
        "order": "grain",
    }
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], want)


# --- token cache and the entry point --------------------------------------------------------


def test_token_cache_reuse_and_invalidation(corpus_glob, tmp_path, monkeypatch):
    builder = builders.prepare(builders.glob_config(corpus_glob), tmp_path / "tfds")
    byte_tok = ByteTokenizer()
    first = pipeline.token_stream(builder, "train", byte_tok)
    expected = pipeline.encode_documents(texts_of(builder, "train"), byte_tok)
    np.testing.assert_array_equal(first, expected)
    cache_dir = os.path.join(builder.data_dir, "tokens")
    assert len(os.listdir(cache_dir)) == 1

    def fail(*args, **kwargs):
        raise AssertionError("a cached split was encoded again")

    monkeypatch.setattr(pipeline, "encode_documents", fail)
    np.testing.assert_array_equal(pipeline.token_stream(builder, "train", ByteTokenizer()), first)
    monkeypatch.undo()

    char_tok = CharTokenizer.from_texts(t.decode() for t in texts_of(builder, "train"))
    second = pipeline.token_stream(builder, "train", char_tok)
    assert len(os.listdir(cache_dir)) == 2, "a new tokenizer gets its own cache file"
    assert char_tok.decode(second) == byte_tok.decode(first)
    assert not any(".tmp" in f for f in os.listdir(cache_dir))


def test_make_datasets_end_to_end(corpus_glob, tmp_path):
    tok = ByteTokenizer()
    train, eval_factory = make_datasets(
        corpus_glob,
        tok,
        seq_len=16,
        global_batch_size=4,
        data_dir=tmp_path,
        seed=5,
        eval_batch_size=2,
    )
    batch = next(train)["tokens"]
    assert batch.shape == (4, 17) and batch.dtype == np.int32
    all_windows = {tuple(w) for w in np.asarray(train.windows)}
    assert all(tuple(row) in all_windows for row in batch)
    assert set(tok.decode(batch.ravel())) <= set("document0123456789\nline\tof text\r")
    state = train.get_state()
    expected = take(train, 3)
    resumed, _ = make_datasets(corpus_glob, tok, 16, 4, tmp_path, state=state)
    for a, b in zip(expected, take(resumed, 3)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    passes = [[b["tokens"] for b in eval_factory()] for _ in range(2)]
    assert passes[0] and all(np.array_equal(a, b) for a, b in zip(*passes))
    assert all(b.shape == (2, 17) for b in passes[0])


def test_make_datasets_errors(corpus_glob, tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="seq_len must be positive"):
        make_datasets(corpus_glob, tok, 0, 4, tmp_path)
    with pytest.raises(ValueError, match="too few for one window"):
        make_datasets(corpus_glob, tok, 100_000, 4, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing_corpus"):
        make_datasets(str(tmp_path / "missing_corpus"), tok, 16, 4, tmp_path)


def test_make_datasets_stdlib_default(stdlib_dir):
    tok = ByteTokenizer()
    train, eval_factory = make_datasets(
        "stdlib",
        tok,
        seq_len=256,
        global_batch_size=8,
        data_dir=stdlib_dir,
        process_index=1,
        process_count=2,
    )
    assert train.batches_per_epoch > 1000
    assert next(train)["tokens"].shape == (4, 257)
    assert next(eval_factory())["tokens"].shape == (4, 257)


def test_tokenizer_trained_on_corpus_texts_feeds_the_pipeline(corpus_glob, tmp_path):
    texts = list(pipeline.corpus_texts(corpus_glob, tmp_path))
    assert len(texts) == 19 and all(isinstance(t, str) for t in texts)
    tok = train_sentencepiece(texts, vocab_size=320)
    train, _ = make_datasets(corpus_glob, tok, seq_len=8, global_batch_size=2, data_dir=tmp_path)
    batch = next(train)["tokens"]
    assert batch.shape == (2, 9) and batch.max() < tok.vocab_size


def test_a_state_saved_before_grain_resumes_with_a_warning(caplog):
    """The pre-Grain iterator's states carry no `order`: same position, another window order,
    so resuming one mid-epoch says so (a fresh or epoch-start state is silent)."""
    it = TokenBatchIterator(windows(), BATCH, seed=1)
    with caplog.at_level("WARNING", logger="gptjax.data.pipeline"):
        it.set_state({"epoch": 0, "window": 0, "seed": 1})
        it.set_state(it.get_state())
        assert caplog.records == []
        it.set_state({"epoch": 1, "window": 2 * BATCH, "seed": 1})
    assert "saved by the iterator before Grain" in caplog.text
    assert it.get_state() == {"epoch": 1, "window": 2 * BATCH, "seed": 1, "order": "grain"}
