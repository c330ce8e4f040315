"""T5's span corruption (Raffel et al. 2020, section 3.1.4) as the encoder–decoder's corpus
objective.

A window of T tokens loses round(T * noise_density) of them (15%) in
round(noise / mean_noise_span_length) spans (mean length 3). The input keeps the rest, each
dropped span replaced by one sentinel; the target lists each sentinel followed by the span it
stands for, in order; both end with EOS, as T5's preprocessors leave them (a picture, not
to scale: 10 tokens would lose 2, in one span)::

    window   a b c d e f g h i j
    noise        c d         i j
    inputs   a b <0> e f g h <1> </s>
    targets  <0> c d <1> i j </s>

The noise mask follows t5 / seqio's ``random_spans_noise_mask`` exactly: the noise and the
non-noise token counts are each cut into that many non-empty segments at random (every
segmentation equally likely), interleaved starting with non-noise, so the window never starts
with noise and always ends with it (T5 adds no random roll either). Windows shorter than 2 are
treated as length 2 and cut back, as T5 does, so a single token is never dropped.

Sentinels. Our tokenizers have no T5 ``<extra_id_k>`` pieces and their top ids are real
pieces, so sentinel k is ``sentinel_start + k``, ascending in span order, where
``sentinel_start(tokenizer)`` is the first id above everything the tokenizer emits and all its
specials (pad / bos / eos / start / delim / extract / mask): ``tokenizer.vocab_size`` for
sentencepiece, byte and char tokenizers, whose specials lie inside the vocabulary, and
``vocab_size + 4`` for GPT-2's BPE without task tokens, whose start / delim / extract / mask
ids lie just past it. The model's embedding must hold them: ``vocab_size >= sentinel_start +
num_sentinels(T)`` (``check_sentinel_vocab``; 6 more ids for T = 128, 26 for T = 512).
``tokenizer.decode`` skips them, as it skips any id past its vocabulary.

Randomness: every window has its own ``np.random.Generator``; on the corpus path
(``WindowSpanCorruption``) it is seeded by (seed, epoch, window index), the position the
checkpointed ``TokenBatchIterator`` state restores, so a resumed run corrupts every window
exactly as an uninterrupted one, on any number of processes.

Pure numpy: nothing here needs jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Int

from gptjax.data.tokenizer import Specials

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
_SEED_TAG = 0x5BA7  # keeps window seeds apart from the iterator's (seed, epoch) shuffles


def check_rates(noise_density: float, mean_noise_span_length: float) -> None:
    """Clear errors for rates T5's algorithm cannot use."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}.")
    if not mean_noise_span_length >= 1.0:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}.")


def noise_counts(
    length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` (>= 2, T5's degeneracy guards):
    at least one noise and one kept token, at least one span, and no more spans than tokens
    of either kind (never binding at T5's 0.15 / 3.0)."""
    check_rates(noise_density, mean_noise_span_length)
    length = max(int(length), 2)
    num_noise = min(max(int(np.round(length * noise_density)), 1), length - 1)
    num_spans = max(int(np.round(num_noise / mean_noise_span_length)), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def num_sentinels(
    length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> int:
    """Sentinel ids a window of `length` uses (its number of noise spans)."""
    return noise_counts(length, noise_density, mean_noise_span_length)[1]


def corrupted_lengths(
    length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """(input length, target length) of a corrupted window of `length`, EOS included; the
    same for every window of that length (T = 128: 116 and 26). The input is never longer
    than the window from T = 10 on (below, one noise span of one token leaves it T + 1)."""
    if length < 2:  # one kept token, no span in the input; the target is one sentinel
        return length + 1, 2
    noise, spans = noise_counts(length, noise_density, mean_noise_span_length)
    return length - noise + spans + 1, noise + spans + 1


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator):
    """Lengths of `num_segments` non-empty segments of `num_items`, each cut equally likely
    (T5's: shuffle num_segments - 1 segment starts among the num_items - 1 gaps)."""
    starts = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(np.concatenate([[0], starts]))
    return np.bincount(segment_id, minlength=num_segments)


def noise_mask(
    length: int,
    rng: np.random.Generator,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> Bool[np.ndarray, " T"]:
    """T5's random_spans_noise_mask: True on the tokens to drop."""
    if length < 1:
        raise ValueError(f"span corruption needs at least one token, got length {length}.")
    padded = max(length, 2)
    num_noise, num_spans = noise_counts(padded, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    kept_lengths = _random_segmentation(padded - num_noise, num_spans, rng)
    interleaved = np.stack([kept_lengths, noise_lengths], 1).reshape(-1)
    return np.repeat(np.tile([False, True], num_spans), interleaved)[:length]


def _spans_to_sentinels(tokens_T, mask_T, sentinel_start: int):
    """Each run of masked tokens as one sentinel (numbered from 0, in order); others kept."""
    first_T = mask_T & ~np.concatenate([[False], mask_T[:-1]])
    out_T = np.where(first_T, sentinel_start + np.cumsum(first_T) - 1, tokens_T)
    return out_T[~mask_T | first_T]


def corrupt(
    tokens_T: Int[np.ndarray, " T"],
    rng: np.random.Generator,
    *,
    sentinel_start: int,
    eos_id: int | None,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[Int[np.ndarray, " S"], Int[np.ndarray, " U"]]:
    """(inputs, targets) of one window; both end with `eos_id` (None: no EOS appended).

    Every id of the window must be below `sentinel_start`.
    """
    tokens_T = np.asarray(tokens_T, np.int64)
    if tokens_T.ndim != 1:
        raise ValueError(f"corrupt takes one 1-D window, got shape {tokens_T.shape}.")
    if tokens_T.size and (tokens_T.max() >= sentinel_start or tokens_T.min() < 0):
        raise ValueError(
            f"window ids must lie in [0, sentinel_start={sentinel_start}); got "
            f"{tokens_T.min()}..{tokens_T.max()}: the sentinels would collide with real ids."
        )
    mask_T = noise_mask(len(tokens_T), rng, noise_density, mean_noise_span_length)
    inputs = _spans_to_sentinels(tokens_T, mask_T, sentinel_start)
    targets = _spans_to_sentinels(tokens_T, ~mask_T, sentinel_start)
    if eos_id is not None:
        inputs, targets = np.append(inputs, eos_id), np.append(targets, eos_id)
    return inputs, targets


def reconstruct(
    inputs_S: Int[np.ndarray, " S"],
    targets_U: Int[np.ndarray, " U"],
    *,
    sentinel_start: int,
    eos_id: int | None,
) -> Int[np.ndarray, " T"]:
    """The window `corrupt` was given: each input sentinel replaced by the tokens that follow
    the same sentinel in the targets (a final EOS on each, when `eos_id`, is dropped first)."""
    inputs_S, targets_U = np.asarray(inputs_S), np.asarray(targets_U)
    if eos_id is not None:
        if inputs_S[-1:].tolist() != [eos_id] or targets_U[-1:].tolist() != [eos_id]:
            raise ValueError("inputs and targets must each end with eos_id.")
        inputs_S, targets_U = inputs_S[:-1], targets_U[:-1]
    marks = np.flatnonzero(targets_U >= sentinel_start)
    spans = {
        int(targets_U[m]): targets_U[m + 1 : end]
        for m, end in zip(marks, [*marks[1:], len(targets_U)], strict=True)
    }
    pieces = [spans.pop(int(t), None) if t >= sentinel_start else [t] for t in inputs_S]
    if any(p is None for p in pieces):
        raise ValueError("an input sentinel has no span in the targets.")
    if any(len(rest) for rest in spans.values()):
        raise ValueError(f"target spans of sentinels missing from the inputs: {sorted(spans)}.")
    return np.concatenate([np.asarray(p, inputs_S.dtype) for p in pieces] or [inputs_S[:0]])


def pair_batch(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    specials: Specials,
    src_len: int | None = None,
    tgt_len: int | None = None,
) -> dict[str, np.ndarray]:
    """(inputs, targets) pairs as the seq2seq batch (`gptjax.models.family`'s seq2seq row):
    ``src`` = inputs, ``tgt`` = targets, ``tgt_in`` = [start] + targets[:-1], right-padded with
    pad_id to `src_len` / `tgt_len` (default: the longest); ``src_mask`` (int32) and
    ``tgt_mask`` (float32) are 1 on the real tokens."""
    b = len(pairs)
    src_len = src_len or max(len(s) for s, _ in pairs)
    tgt_len = tgt_len or max(len(t) for _, t in pairs)
    out = {
        "src": np.full((b, src_len), specials.pad_id, np.int32),
        "src_mask": np.zeros((b, src_len), np.int32),
        "tgt_in": np.full((b, tgt_len), specials.pad_id, np.int32),
        "tgt": np.full((b, tgt_len), specials.pad_id, np.int32),
        "tgt_mask": np.zeros((b, tgt_len), np.float32),
    }
    for i, (s, t) in enumerate(pairs):
        if len(s) > src_len or len(t) > tgt_len:
            raise ValueError(
                f"row {i} has {len(s)} input and {len(t)} target tokens, more than the "
                f"widths src_len={src_len}, tgt_len={tgt_len}."
            )
        out["src"][i, : len(s)], out["src_mask"][i, : len(s)] = s, 1
        out["tgt"][i, : len(t)], out["tgt_mask"][i, : len(t)] = t, 1.0
        out["tgt_in"][i, : len(t)] = [specials.start_id, *t[:-1]]
    return out


@dataclasses.dataclass(frozen=True)
class WindowSpanCorruption:
    """The corpus objective `TokenBatchIterator(objective=...)` applies to each batch: the
    first T of each window's T + 1 tokens span-corrupted (the same T tokens the prefix split
    uses), as a seq2seq batch of fixed widths `corrupted_lengths(T)`.

    Attributes:
      specials: the tokenizer's special ids (eos ends inputs and targets, start begins
        tgt_in, pad fills).
      sentinel_start: the first sentinel id (`sentinel_start(tokenizer)`).
    """

    specials: Specials
    sentinel_start: int
    noise_density: float = NOISE_DENSITY
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH

    def __post_init__(self):
        check_rates(self.noise_density, self.mean_noise_span_length)

    def __call__(
        self, windows_BT1: Int[np.ndarray, "B T1"], keys_B3: Int[np.ndarray, "B 3"]
    ) -> dict[str, np.ndarray]:
        """`keys_B3`: each row's (seed, epoch, window index), which seeds its Generator."""
        tokens_BT = np.asarray(windows_BT1)[:, :-1]
        pairs = [
            corrupt(
                row_T,
                np.random.default_rng([_SEED_TAG, *map(int, key)]),
                sentinel_start=self.sentinel_start,
                eos_id=self.specials.eos_id,
                noise_density=self.noise_density,
                mean_noise_span_length=self.mean_noise_span_length,
            )
            for row_T, key in zip(tokens_BT, keys_B3, strict=True)
        ]
        widths = corrupted_lengths(
            tokens_BT.shape[1], self.noise_density, self.mean_noise_span_length
        )
        return pair_batch(pairs, self.specials, *widths)


def sentinel_start(tokenizer) -> int:
    """The first sentinel id: above the tokenizer's vocabulary and every special id."""
    return max(int(tokenizer.vocab_size), 1 + max(int(i) for i in tokenizer.special_ids))


def check_sentinel_vocab(
    first_sentinel: int,
    model_vocab_size: int,
    seq_len: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> None:
    """Fail early when the model's embedding cannot hold a window's sentinels."""
    need = first_sentinel + num_sentinels(seq_len, noise_density, mean_noise_span_length)
    if model_vocab_size < need:
        raise ValueError(
            f"span corruption of {seq_len}-token windows uses sentinel ids "
            f"{first_sentinel}..{need - 1}, above the tokenizer's ids, but the model's "
            f"vocab_size is {model_vocab_size}; set it to at least {need} "
            f"(e.g. {-(-need // 64) * 64}, a multiple of 64)."
        )
