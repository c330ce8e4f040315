"""What a run reads: `DataConfig` (gin), the tokenizer that goes with a workdir, and the
run's datasets (`run_datasets`).

The tokenizer of a run is saved in its workdir the first time and loaded from
there afterwards, so a resumed run, `gptjax sample` and `gptjax eval` always
use exactly the ids the model was trained on.
"""

from __future__ import annotations

import dataclasses
import os

import gin
from etils import epath

from gptjax.data import numbers, span_corruption
from gptjax.data.builders import splits
from gptjax.data.pipeline import corpus_texts, make_datasets
from gptjax.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    Specials,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

TOKENIZER_KINDS = ("bpe", "byte", "char", "gpt2")
SEQ2SEQ_OBJECTIVES = ("prefix", "span_corruption")


def check_local_data_dir(data_dir: str, what: str) -> str:
    """`data_dir`, if it is a local (or mounted) directory; a clear error for a gs:// one.

    The TFDS shards are array_record files, which array_record's C++ reader and writer open
    with POSIX calls only (no Cloud Storage client), so a bucket must be mounted (gcsfuse)
    and given as its mount point. Workdirs, by contrast, may be gs:// URIs.
    """
    if "://" in data_dir:
        raise ValueError(
            f"{what}={data_dir!r}: the data dir must be a local path. Its array_record shards "
            "are opened with POSIX file calls only (array_record has no Cloud Storage "
            "client); mount the bucket with gcsfuse (e.g. `gcsfuse --implicit-dirs BUCKET "
            "/mnt/BUCKET`) and give the mounted path. The workdir may be a gs:// URI."
        )
    return data_dir


def default_data_dir() -> str:
    path = os.environ.get("GPTJAX_DATA_DIR", os.path.expanduser("~/.cache/gptjax/data"))
    return check_local_data_dir(path, "$GPTJAX_DATA_DIR")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The corpus and its tokenizer.

    Attributes:
      dataset: 'stdlib' (the running Python's standard library source, offline
        default), 'shakespeare' (tiny Shakespeare; give `path` to a local copy),
        a glob of your own text files, or a generated seq2seq task ('numbers':
        number words -> digits, 'numbers_reverse'; see gptjax.data.numbers).
      path: a local file for 'shakespeare'.
      tokenizer: 'bpe' (sentencepiece, trained on the corpus), 'byte', 'char' or 'gpt2'
        (GPT-2's byte-level BPE, read from `tokenizer_path`: a directory with Hugging Face's
        or OpenAI's GPT-2 tokenizer files; nothing is downloaded).
      tokenizer_vocab_size: the BPE vocabulary to train.
      tokenizer_path: use this saved tokenizer instead of building one.
      data_dir: TFDS shards and token caches (default $GPTJAX_DATA_DIR or
        ~/.cache/gptjax/data).
      task_max_number: the numbers tasks use 0 .. task_max_number - 1.
      validation_split: how a text corpus's validation split is cut: 'hash' (documents whose
        key hashes below the fraction, interleaved with the training text) or 'tail' (the
        last fraction of the characters, contiguous, as nanoGPT's prepare.py); see
        gptjax.data.builders.splits. Each split is prepared and cached on its own.
      validation_fraction: the validation share; None is the rule's default ('hash': 2% of
        documents, 3% of Shakespeare's paragraphs; 'tail': 10% of the characters).
      seq2seq_objective: what the encoder–decoder learns from a text corpus's windows:
        'prefix' (the first half is the source, the decoder writes the second;
        `gptjax.models.family`) or 'span_corruption' (T5's: 15% of the tokens dropped in
        spans of mean length 3, each replaced by a sentinel id above the tokenizer's ids
        and specials; the decoder writes the spans; `gptjax.data.span_corruption`). The
        model's vocab_size must then hold the sentinels (6 more ids at seq_len 128).
        Other families always learn their own objective and accept only 'prefix'.
      noise_density, mean_noise_span_length: span corruption's rates (T5: 0.15 and 3.0).
    """

    dataset: str = "stdlib"
    path: str | None = None
    tokenizer: str = "bpe"
    tokenizer_vocab_size: int = 4096
    tokenizer_path: str | None = None
    data_dir: str | None = None
    task_max_number: int = 10_000
    validation_split: str = "hash"
    validation_fraction: float | None = None
    seq2seq_objective: str = "prefix"
    noise_density: float = span_corruption.NOISE_DENSITY
    mean_noise_span_length: float = span_corruption.MEAN_NOISE_SPAN_LENGTH

    def __post_init__(self):
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ValueError(
                f"DataConfig.tokenizer={self.tokenizer!r} is not one of {TOKENIZER_KINDS}."
            )
        if self.tokenizer == "gpt2" and not self.tokenizer_path:
            raise ValueError(
                "DataConfig.tokenizer='gpt2' reads GPT-2's tokenizer files: set "
                "DataConfig.tokenizer_path to a directory with vocab.json + merges.txt, "
                "tokenizer.json, or encoder.json + vocab.bpe (e.g. a downloaded gpt2/)."
            )
        splits.check_split(self.validation_split, self.validation_fraction, "DataConfig.")
        if self.data_dir:
            check_local_data_dir(self.data_dir, "DataConfig.data_dir")
        if self.dataset in numbers.TASKS and (
            self.validation_split != "hash" or self.validation_fraction is not None
        ):
            raise ValueError(
                f"DataConfig.validation_split/validation_fraction apply to text corpora; the "
                f"generated task {self.dataset!r} has its own train and validation numbers."
            )
        if self.seq2seq_objective not in SEQ2SEQ_OBJECTIVES:
            raise ValueError(
                f"DataConfig.seq2seq_objective={self.seq2seq_objective!r} is not one of "
                f"{SEQ2SEQ_OBJECTIVES}."
            )
        if self.uses_span_corruption and self.dataset in numbers.TASKS:
            raise ValueError(
                "DataConfig.seq2seq_objective='span_corruption' corrupts a text corpus's "
                f"windows; the generated task {self.dataset!r} has its own pairs."
            )
        span_corruption.check_rates(self.noise_density, self.mean_noise_span_length)

    @property
    def uses_span_corruption(self) -> bool:
        return self.seq2seq_objective == "span_corruption"

    @property
    def corpus_split(self) -> dict:
        """The validation split's keyword arguments for `corpus_texts` and `make_datasets`."""
        return dict(
            validation_split=self.validation_split, validation_fraction=self.validation_fraction
        )

    @property
    def resolved_data_dir(self) -> str:
        return self.data_dir or default_data_dir()


def _workdir_tokenizer(workdir: str) -> str | None:
    for name in ("tokenizer.model", "tokenizer.json"):
        path = epath.Path(workdir) / name  # a local path or a gs:// (any etils.epath) one
        if path.exists():
            return os.fspath(path)
    return None


def build_tokenizer(data_cfg: DataConfig) -> Tokenizer:
    """A new tokenizer for the configured corpus (a BPE trains in seconds)."""
    if data_cfg.tokenizer_path:
        return load_tokenizer(data_cfg.tokenizer_path)
    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    if data_cfg.dataset in numbers.TASKS:
        texts = numbers.texts(data_cfg.dataset, "train", data_cfg.task_max_number)
    else:
        texts = corpus_texts(
            data_cfg.dataset,
            data_cfg.resolved_data_dir,
            "train",
            path=data_cfg.path,
            **data_cfg.corpus_split,
        )
    if data_cfg.tokenizer == "char":
        return CharTokenizer.from_texts(texts)
    return train_sentencepiece(texts, data_cfg.tokenizer_vocab_size)


def workdir_tokenizer(
    workdir: str, data_cfg: DataConfig | None = None, save: bool = True
) -> Tokenizer:
    """The workdir's tokenizer; built from `data_cfg` and saved there if it has none."""
    path = _workdir_tokenizer(workdir)
    if path is not None:
        return load_tokenizer(path)
    if data_cfg is None:
        raise FileNotFoundError(
            f"no tokenizer in {workdir!r}: save the model's tokenizer there "
            "(Tokenizer.save), or check that it is a gptjax workdir"
        )
    tokenizer = build_tokenizer(data_cfg)
    if save:
        tokenizer.save(workdir)
    return tokenizer


def run_datasets(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    task_format: str,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    model_vocab_size: int | None = None,
):
    """(train iterator, eval factory) of a run: a corpus's windows, or a number task's batches
    in `task_format` (the model family's `Family.task_format`), this process's share of each.

    With `data_cfg.seq2seq_objective = 'span_corruption'` (the 'pair' format only) the corpus
    batches come span-corrupted; `model_vocab_size` is then checked to hold the sentinels.
    """
    shard = dict(seed=seed, process_index=process_index, process_count=process_count)
    if data_cfg.dataset in numbers.TASKS:
        return numbers.make_task_datasets(
            data_cfg.dataset,
            task_format,
            tokenizer,
            seq_len,
            batch_size,
            max_number=data_cfg.task_max_number,
            **shard,
        )
    return make_datasets(
        data_cfg.dataset,
        tokenizer,
        seq_len,
        batch_size,
        data_cfg.resolved_data_dir,
        path=data_cfg.path,
        **data_cfg.corpus_split,
        **shard,
        objective=_corpus_objective(data_cfg, tokenizer, task_format, seq_len, model_vocab_size),
    )


def _corpus_objective(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    task_format: str,
    seq_len: int,
    model_vocab_size: int | None,
) -> span_corruption.WindowSpanCorruption | None:
    """The batch transform of a corpus's windows: None (the family's own, on the host), or
    span corruption for the encoder–decoder."""
    if not data_cfg.uses_span_corruption:
        return None
    if task_format != "pair":
        raise ValueError(
            "DataConfig.seq2seq_objective='span_corruption' is the encoder–decoder's corpus "
            f"objective; this model family trains on the {task_format!r} format "
            "(set model_config.family = 'seq2seq', or leave the objective 'prefix')."
        )
    if model_vocab_size is None:
        raise ValueError("span corruption needs model_vocab_size to check its sentinel ids.")
    rates = (data_cfg.noise_density, data_cfg.mean_noise_span_length)
    first = span_corruption.sentinel_start(tokenizer)
    span_corruption.check_sentinel_vocab(first, model_vocab_size, seq_len, *rates)
    return span_corruption.WindowSpanCorruption(Specials.of(tokenizer), first, *rates)
