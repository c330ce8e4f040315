"""From a prepared TFDS split to host-local batches of token windows, resumably.

Stages, each a small function:
  1. ``token_stream``: encode every document once, append EOS after each, cache the flat ids as
     ``.npy`` (uint16 when the vocabulary fits) keyed by split and tokenizer fingerprint.
  2. ``pack_windows``: view the stream as windows of ``seq_len + 1`` tokens. Consecutive windows
     overlap by one token (window i is ``stream[i*T : i*T + T + 1]``), so every token after the
     first is a prediction target exactly once per epoch; a tail shorter than ``T`` tokens is
     dropped. Documents are not aligned to windows; EOS separates them.
  3. ``TokenBatchIterator``: a grain pipeline over the windows (random access, grain's
     global shuffle reseeded per epoch, background read-ahead in threads or worker
     processes) that cuts global batches, hands each process its own rows, and
     saves/restores its position as a small JSON dict.
     An optional ``objective`` turns each batch of windows into another batch format on the
     host, keyed by each window's (seed, epoch, index) (T5's span corruption,
     ``gptjax.data.span_corruption``), so it resumes with the iterator's state.
``make_datasets`` wires them together for the train loop.
"""

from __future__ import annotations

import functools
import glob as glob_lib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np
from absl import flags
from tqdm.auto import tqdm

from gptjax.data import builders
from gptjax.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
ORDER = "grain"  # the window order a saved state refers to (the pre-Grain iterator saved none)

ENCODE_CHUNK_DOCS = 64  # documents per batched encode call: fewer Python round trips


def _stream_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_documents(
    texts: Sequence[str] | Iterator[str],
    tokenizer: Tokenizer,
    total: int | None = None,
    desc: str = "tokenizing",
) -> np.ndarray:
    """One flat id stream: each document's ids followed by EOS, with a progress bar."""
    dtype = _stream_dtype(tokenizer.vocab_size)
    pieces, chunk = [], []

    def flush():
        for ids in tokenizer.encode_batch(chunk):
            pieces.append(np.asarray(ids + [tokenizer.eos_id], dtype=dtype))
        chunk.clear()

    for text in tqdm(texts, total=total, desc=desc, unit="doc", leave=False):
        chunk.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        if len(chunk) >= ENCODE_CHUNK_DOCS:
            flush()
    flush()
    return np.concatenate(pieces) if pieces else np.zeros((0,), dtype)


def cache_path(cache_dir: str | os.PathLike, split: str, tokenizer: Tokenizer) -> str:
    """Cache file name: a different tokenizer (or split) can never reuse stale ids."""
    return os.path.join(os.fspath(cache_dir), f"{split}-{tokenizer.fingerprint[:16]}.npy")


def save_atomic(path: str, array: np.ndarray) -> None:
    """Write to a temporary name then rename, so a crash never leaves a truncated cache."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp_path = f"{path}.tmp-{os.getpid()}"
    with open(tmp_path, "wb") as f:
        np.save(f, array)
    os.replace(tmp_path, path)


def token_stream(
    builder, split: str, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """The split's ids, from cache (memory-mapped) or encoded now and cached.

    The cache lives beside the prepared split (``<builder.data_dir>/tokens``) unless
    ``cache_dir`` says otherwise, so rebuilding the dataset also drops its stale caches.
    """
    path = cache_path(cache_dir or os.path.join(builder.data_dir, "tokens"), split, tokenizer)
    if not os.path.exists(path):
        source = builder.as_data_source(split=split)
        texts = (source[i]["text"] for i in range(len(source)))
        save_atomic(path, encode_documents(texts, tokenizer, len(source), f"tokenizing {split}"))
    return np.load(path, mmap_mode="r")


def pack_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """A (num_windows, seq_len + 1) view of ``stream``; windows overlap by one token.

    No copy: a strided view of a memory-mapped stream stays on disk until batches index it.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    num_windows = (len(stream) - 1) // seq_len
    if num_windows < 1:
        raise ValueError(
            f"the corpus has {len(stream)} tokens, too few for one window of "
            f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or a larger corpus"
        )
    view = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
    return view[: num_windows * seq_len : seq_len]


PREFETCH_BATCHES = 4  # batches a train iterator reads ahead, in background threads
PREFETCH_THREADS = 2


def epoch_order_dataset(num_windows: int, seed: int, shuffle: bool) -> grain.MapDataset:
    """Window index at flat position ``epoch * num_windows + j``: grain's global shuffle.

    ``MapDataset.shuffle`` is a random-access permutation (index_shuffle) reseeded each
    epoch: position ``e * n + j`` reads position ``j`` of epoch ``e``'s own permutation. The
    seed is hashed first, because grain seeds epoch ``e`` with ``seed + e``: seeds 0 and 1
    would otherwise share all but one epoch.
    """
    order = grain.MapDataset.range(num_windows)  # index i reads i % n: repeats unshuffled
    if not shuffle:
        return order
    return order.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))


class TokenBatchIterator:
    """Deterministic, resumable, per-process batches ``{'tokens': int32 (B_local, T + 1)}``.

    A grain pipeline: ``windows`` (``pack_windows``' (num_windows, T + 1) array, memory-mapped
    is fine) is read by random access in ``epoch_order_dataset`` order, cut into global batches
    of ``global_batch_size`` (the partial batch at an epoch's end is dropped, so shapes stay
    static for jit), and read ahead by ``prefetch`` batches in ``threads`` grain threads (or
    ``workers`` processes, ``mp_prefetch``) so the host never stalls the step. Process ``p``
    of ``P`` reads rows ``[p * B/P, (p+1) * B/P)`` of each global batch: processes never
    overlap and together form the one-process batch. ``repeat=True`` runs over epochs forever
    (train); ``False`` stops after one pass (eval). ``take(n)`` hands out a global batch of only
    ``n`` real rows (GPT-3's batch ramp), read by index: the cursor moves by ``n`` windows, so
    no data is skipped, and the read-ahead restarts at the new cursor.

    The state is the cursor of batches handed out (not of batches read ahead): the epoch and
    the window position in it, a small JSON dict that the checkpoint saves. Grain's own
    iterator state (``{'next_index': k}``) counts batches from where the pipeline was started,
    so the pipeline is rebuilt at the cursor instead of saving it.

    ``objective(tokens_BT1, keys_B3) -> batch``, when given, replaces ``{'tokens': ...}`` (in
    the prefetch threads): ``keys_B3`` holds each row's (seed, epoch, window index), unique per
    example and epoch, so its randomness depends on the data position alone.
    """

    def __init__(
        self,
        windows: np.ndarray,
        global_batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        state: dict | None = None,
        objective: Callable[[np.ndarray, np.ndarray], dict] | None = None,
        prefetch: int = PREFETCH_BATCHES,
        threads: int = PREFETCH_THREADS,
        workers: int = 0,
    ):
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be positive and "
                f"divisible by process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if min(prefetch, threads, workers) < 0:
            raise ValueError(f"prefetch={prefetch}, threads={threads}, workers={workers} < 0")
        self.windows = windows
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.batches_per_epoch = len(windows) // global_batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"only {len(windows)} windows of {windows.shape[1]} tokens, "
                f"fewer than one global batch of {global_batch_size}; lower the "
                "batch size or seq_len, or use a larger corpus"
            )
        self.epoch_windows = self.batches_per_epoch * global_batch_size  # the tail is dropped
        self.shuffle, self.repeat = shuffle, repeat
        self.process_index = process_index
        self.prefetch, self.threads, self.workers = prefetch, threads, workers
        self.objective = objective
        self._stream = None  # the grain iterator of full batches from the cursor, lazily
        self._set_cursor(seed, 0, 0)
        if state is not None:
            self.set_state(state)

    def _set_cursor(self, seed: int, epoch: int, window: int) -> None:
        self.close()
        if seed != getattr(self, "seed", None):
            self._order = epoch_order_dataset(len(self.windows), seed, self.shuffle)
        self.seed, self.epoch, self.window = seed, epoch, window

    def get_state(self) -> dict:
        """JSON-serialisable position: save it with the checkpoint."""
        return {"epoch": self.epoch, "window": self.window, "seed": self.seed, "order": ORDER}

    def set_state(self, state: dict) -> None:
        """Continue exactly where ``get_state`` was taken (the seed comes from the state).

        A state from before the row cursor (``position``, in whole batches) is read too.
        """
        epoch = int(state["epoch"])
        window = (
            int(state["window"])
            if "window" in state
            else int(state["position"]) * self.global_batch_size
        )
        if epoch < 0 or not 0 <= window <= self.epoch_windows:
            raise ValueError(f"bad iterator state {state}: {self.epoch_windows} windows/epoch")
        if state.get("order") != ORDER and window > 0 and self.shuffle:
            logger.warning(
                "the data position (epoch %d, window %d) was saved by the iterator before Grain, "
                "whose window order differs: the rest of epoch %d may repeat or skip some "
                "windows (later epochs are unaffected)",
                epoch,
                window,
                epoch,
            )
        self._set_cursor(int(state.get("seed", self.seed)), epoch, window)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All window indices of ``epoch`` in visiting order (for inspection and tests)."""
        return self._rows(epoch, 0, len(self.windows))

    def _rows(self, epoch: int, start: int, count: int) -> np.ndarray:
        """Window indices at positions ``[start, start + count)`` of ``epoch``'s order."""
        base = epoch * len(self.windows) + start
        return np.asarray([self._order[i] for i in range(base, base + count)], np.int64)

    def _batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of window indices ``rows`` (a subclass formats other examples)."""
        return {"tokens": np.asarray(self.windows[rows], dtype=np.int32)}

    def _load(self, epoch: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        if self.objective is None:
            return self._batch(rows)
        tokens = np.asarray(self.windows[rows], dtype=np.int32)
        keys_B3 = np.stack([np.full_like(rows, self.seed), np.full_like(rows, epoch), rows], 1)
        return self.objective(tokens, keys_B3)

    def _full_batch(self, k: int, first: tuple[int, int]) -> tuple[int, int, dict]:
        """(epoch, start window, this process's rows) of the k-th full batch from ``first``."""
        epoch, window = first
        b = self.global_batch_size
        in_first = (self.epoch_windows - window) // b  # full batches left in the first epoch
        if k < in_first:
            start = window + k * b
        else:
            more, k = divmod(k - in_first, self.batches_per_epoch)
            epoch, start = epoch + 1 + more, k * b
        offset = start + self.process_index * self.local_batch_size
        return epoch, start, self._load(epoch, self._rows(epoch, offset, self.local_batch_size))

    def _open_stream(self):
        """The grain pipeline of full batches from the cursor, reading ahead in the background."""
        left = (self.epoch_windows - self.window) // self.global_batch_size
        count = sys.maxsize if self.repeat else left
        first = (self.epoch, self.window)
        batches = grain.MapDataset.range(count).map(
            functools.partial(self._full_batch, first=first)
        )
        read = grain.ReadOptions(num_threads=self.threads, prefetch_buffer_size=self.prefetch)
        stream = batches.to_iter_dataset(read)
        if self.workers:
            if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags' defaults
                flags.FLAGS.mark_as_parsed()
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        return iter(stream)

    def close(self) -> None:
        """Stop the read-ahead (threads or worker processes); the next batch restarts it."""
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None and hasattr(stream, "close"):
            stream.close()

    def __getstate__(self) -> dict:
        """Pickled (for ``workers`` processes) without the running stream."""
        return {**self.__dict__, "_stream": None}

    def __iter__(self) -> TokenBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self.take(self.global_batch_size)[0]

    def take(self, n_global: int) -> tuple[dict[str, np.ndarray], int]:
        """(this process's batch, its number of real rows) from the next ``n_global`` windows.

        The real rows come first; the rest of the B/P rows repeat one of them as padding, for
        static shapes, and the caller zeroes their loss mask. ``next(it)`` is ``take(B)``.
        """
        if not 1 <= n_global <= self.global_batch_size:
            raise ValueError(f"take({n_global}): need 1 <= rows <= {self.global_batch_size}")
        full = n_global == self.global_batch_size
        if self.window + n_global > self.epoch_windows:
            if not self.repeat:
                raise StopIteration
            if not full:
                self._set_cursor(self.seed, self.epoch + 1, 0)
        if full:
            if self._stream is None:
                self._stream = self._open_stream()
            self.epoch, start, batch = next(self._stream)
            self.window = start + n_global
            return batch, self.local_batch_size
        self.close()  # the read-ahead was cut for full batches from the old cursor
        first = self.process_index * self.local_batch_size
        real = int(np.clip(n_global - first, 0, self.local_batch_size))
        rows = self._rows(self.epoch, self.window + (first if real else 0), max(real, 1))
        rows = np.concatenate([rows[:real], np.full(self.local_batch_size - real, rows[0])])
        self.window += n_global
        return self._load(self.epoch, rows), real


def resolve_config(
    name_or_glob: str, validation_split: str = "hash", validation_fraction: float | None = None
) -> builders.TextConfig | str:
    """The builder config: 'stdlib' and 'shakespeare' name the ready configs, anything else is a
    file glob; with the validation split of ``builders.with_validation_split`` (its name says a
    non-default split, so each split is prepared and its tokens cached apart)."""
    if name_or_glob in ("stdlib", "shakespeare"):
        config = name_or_glob
    elif not glob_lib.has_magic(name_or_glob) and not os.path.exists(name_or_glob):
        raise FileNotFoundError(
            f"dataset {name_or_glob!r} is neither 'stdlib', 'shakespeare' nor "
            "an existing file or glob of text files"
        )
    else:
        config = builders.glob_config(name_or_glob)
    return builders.with_validation_split(config, validation_split, validation_fraction)


def corpus_texts(
    name_or_glob: str,
    data_dir: str | os.PathLike,
    split: str = "train",
    path: str | None = None,
    *,
    validation_split: str = "hash",
    validation_fraction: float | None = None,
) -> Iterator[str]:
    """The documents of a prepared corpus split as str, e.g. to train a tokenizer on."""
    config = resolve_config(name_or_glob, validation_split, validation_fraction)
    builder = builders.prepare(config, data_dir, path=path)
    source = builder.as_data_source(split=split)
    return (source[i]["text"].decode("utf-8") for i in range(len(source)))


def make_datasets(
    name_or_glob: str,
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch_size: int,
    data_dir: str | os.PathLike,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    *,
    path: str | None = None,
    validation_split: str = "hash",
    validation_fraction: float | None = None,
    eval_batch_size: int | None = None,
    state: dict | None = None,
    objective: Callable[[np.ndarray, np.ndarray], dict] | None = None,
) -> tuple[TokenBatchIterator, Callable[[], TokenBatchIterator]]:
    """Prepare, tokenize (cached) and pack a corpus; return the train iterator and an eval factory.

    Args:
      name_or_glob: 'stdlib' (offline default), 'shakespeare', or a glob of text files.
      tokenizer: any ``Tokenizer``; its fingerprint keys the token cache.
      seq_len: model context T; batches hold T + 1 tokens (inputs and shifted targets).
      global_batch_size: rows per step over all processes; each process gets B / process_count.
      data_dir: where TFDS shards and token caches live (always explicit).
      seed: shuffling seed of the train iterator.
      path: a local file for 'shakespeare' (else it is downloaded).
      validation_split, validation_fraction: how validation is cut from the corpus: 'hash'
        (documents by key hash) or 'tail' (the last characters); see ``builders.splits``.
      eval_batch_size: global eval batch, default ``global_batch_size``.
      state: a train iterator state from ``get_state()`` to resume from (its seed wins).
      objective: a batch transform for both iterators (``TokenBatchIterator``), e.g.
        ``span_corruption.WindowSpanCorruption``; None yields the windows.

    Returns:
      ``(train_iter, eval_iter_factory)``: an infinite shuffled iterator over the train split, and
      a function returning a fresh single in-order pass over the validation split.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    config = resolve_config(name_or_glob, validation_split, validation_fraction)
    builder = builders.prepare(config, data_dir, path=path)
    shard = dict(process_index=process_index, process_count=process_count, objective=objective)
    train_windows = pack_windows(token_stream(builder, "train", tokenizer), seq_len)
    train_iter = TokenBatchIterator(
        train_windows, global_batch_size, seed=seed, state=state, **shard
    )
    eval_windows = pack_windows(token_stream(builder, "validation", tokenizer), seq_len)
    eval_batch_size = eval_batch_size or global_batch_size

    def eval_iter_factory() -> TokenBatchIterator:
        return TokenBatchIterator(
            eval_windows, eval_batch_size, shuffle=False, repeat=False, **shard
        )

    eval_iter_factory()  # fail now, not at the first eval, if validation is too small
    return train_iter, eval_iter_factory
