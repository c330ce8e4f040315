"""A TFDS builder over local text files, written as array_record and read without TensorFlow.

Configs:
  * ``stdlib``: the ``.py`` files of the running interpreter's standard library (tests and
    site-packages excluded, ~13 MB), one document per file in sorted path order. Present on every
    machine, so it is the offline default corpus.
  * ``shakespeare``: tiny Shakespeare (a local copy or the public URL; the sha256 of whatever
    file is used is verified), split into paragraphs so there are many documents.
  * ``files_<hash>``: any glob of user files (see ``glob_config``).

Each example is one document ``{'text': Text}`` (reads back as bytes). The validation split
(``validation_split``, see ``splits``) is either the documents whose key hashes below
``validation_fraction`` ('hash', the default: deterministic, independent of file order, stable
when files are added) or the last ``validation_fraction`` of the text's characters ('tail', as
nanoGPT: cut before chunking into paragraphs). A config's name carries any non-default split
(``with_validation_split``), so prepared shards and token caches of two splits never mix.

Build once with ``builder.download_and_prepare()`` (the file format is fixed to array_record by
the constructor) and read with ``builder.as_data_source(split)``.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import os
import sys
import sysconfig
import tokenize
from collections.abc import Callable, Iterator

import tensorflow_datasets as tfds

from gptjax.data.builders import splits
from gptjax.data.builders.splits import Document

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# Directories of the stdlib that are not library source: tests are ~60% of the bytes and
# site-packages holds whatever happens to be installed (not reproducible across machines).
# Besides tests and third-party packages, leave out two directories that are data, not code:
# encodings/ (1.4 MB of codec tables) and pydoc_data/ (one 0.75 MB string of documentation).
STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",
        "pydoc_data",
    }
)


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
    """Where documents come from.

    Attributes:
      source: 'stdlib', 'shakespeare' or 'glob'.
      path: the Shakespeare file (None: download ``SHAKESPEARE_URL``), or the glob pattern.
      chunking: 'file' (one document per file), 'paragraph' (split on blank lines) or 'auto'
        (paragraphs when there is a single file, so one big file still yields many documents).
      validation_split: 'hash' (documents by key hash) or 'tail' (the last characters).
      validation_fraction: the validation split's share: of documents ('hash') or of
        characters ('tail').
      max_files: keep only the first N files (fast tests); None keeps all.
    """

    source: str = "glob"
    path: str | None = None
    chunking: str = "auto"
    validation_split: str = "hash"
    validation_fraction: float = 0.02
    max_files: int | None = None


def stdlib_config(max_files: int | None = None) -> TextConfig:
    """The standard-library corpus; ``max_files`` gives a small, separately cached subset."""
    name = "stdlib" if max_files is None else f"stdlib_first{max_files}"
    return TextConfig(
        name=name,
        source="stdlib",
        chunking="file",
        max_files=max_files,
        description=f"Python {sys.version_info.major}.{sys.version_info.minor} "
        "standard library source",
    )


def shakespeare_config() -> TextConfig:
    """Tiny Shakespeare, from the builder's ``path`` (verified by sha256) or its URL."""
    return TextConfig(
        name="shakespeare",
        source="shakespeare",
        chunking="paragraph",
        validation_fraction=0.03,
        description="tiny Shakespeare (char-rnn)",
    )


def glob_config(pattern: str, chunking: str = "auto") -> TextConfig:
    """User files; the config name carries a hash of the absolute pattern so that two corpora
    never share a prepared dataset directory."""
    pattern = os.path.abspath(os.path.expanduser(pattern))
    digest = hashlib.sha256(f"{pattern}|{chunking}".encode()).hexdigest()[:10]
    return TextConfig(
        name=f"files_{digest}",
        source="glob",
        path=pattern,
        chunking=chunking,
        description=f"text files matching {pattern}",
    )


PREDEFINED = {"stdlib": stdlib_config, "shakespeare": shakespeare_config}


def with_validation_split(
    config: TextConfig | str,
    validation_split: str = "hash",
    validation_fraction: float | None = None,
) -> TextConfig | str:
    """``config`` (a TextConfig or a predefined name) with its validation split set.

    ``validation_fraction=None`` is the rule's default: the config's own fraction for 'hash'
    (2% of documents, 3% of Shakespeare's paragraphs), 10% of the characters for 'tail'. The
    config's own split comes back unchanged; any other gets a name that says it (e.g.
    ``shakespeare_tail0.1``), so it is prepared, and its tokens cached, in its own directory.
    """
    splits.check_split(validation_split, validation_fraction)
    resolved = PREDEFINED[config]() if isinstance(config, str) else config
    if validation_fraction is None:
        validation_fraction = (
            splits.TAIL_FRACTION if validation_split == "tail" else resolved.validation_fraction
        )
    if (validation_split, validation_fraction) == (
        resolved.validation_split,
        resolved.validation_fraction,
    ):
        return config
    return dataclasses.replace(
        resolved,
        name=f"{resolved.name}_{validation_split}{validation_fraction!r}",
        validation_split=validation_split,
        validation_fraction=validation_fraction,
    )


def stdlib_files(max_files: int | None = None) -> list[str]:
    """The stdlib's library .py files in sorted order (deterministic on a given interpreter)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS)
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    files.sort(key=lambda f: os.path.relpath(f, root))
    return files[:max_files]


def read_source(path: str) -> str | None:
    """Python source decoded per its PEP 263 coding line; None for undecodable files (the
    stdlib ships a few deliberately broken ones)."""
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (SyntaxError, UnicodeDecodeError):
        return None


def read_text(path: str) -> str:
    # newline='' keeps CRLF: the corpus is tokenized exactly as it is on disk.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        return f.read()


def sha256_of_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def paragraphs(text: str) -> list[str]:
    """Blank-line separated chunks, each ending in one newline (the separator becomes EOS)."""
    return [p.strip("\n") + "\n" for p in text.split("\n\n") if p.strip("\n")]


def check_shakespeare(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tiny Shakespeare not found at {path}; download {SHAKESPEARE_URL} there, or pass "
            "path=None to let TFDS download it"
        )
    actual = sha256_of_file(path)
    if actual != SHAKESPEARE_SHA256:
        raise ValueError(
            f"{path} has sha256 {actual}, expected {SHAKESPEARE_SHA256} (tiny "
            f"Shakespeare from {SHAKESPEARE_URL}); the file is corrupt or different"
        )
    return path


def download_shakespeare(dl_manager) -> str:
    try:
        return os.fspath(dl_manager.download(SHAKESPEARE_URL))
    except OSError as e:  # requests' ConnectionError is an OSError
        raise OSError(
            f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({e}); fetch "
            "it by other means and pass its local path (path=...)"
        ) from e


def file_documents(
    files: list[str], root: str, reader: Callable[[str], str | None]
) -> list[Document]:
    """One document per file, keyed by path relative to ``root``, so the split does not depend
    on where the corpus lives."""
    return [
        (
            os.path.relpath(path, root) if len(files) > 1 else os.path.basename(path),
            lambda p=path: reader(p),
        )
        for path in files
    ]


def resolve_chunking(chunking: str, n_files: int) -> str:
    """'auto' is 'paragraph' for a single file (so it still yields many documents), else 'file'."""
    if chunking == "auto":
        chunking = "paragraph" if n_files == 1 else "file"
    if chunking not in ("file", "paragraph"):
        raise ValueError(f"chunking must be 'file', 'paragraph' or 'auto', got {chunking!r}")
    return chunking


def chunk_documents(docs: list[Document], chunking: str) -> list[Document]:
    """The documents as they are ('file'), or each one's paragraphs keyed ``<key>#<index>``."""
    if chunking == "file":
        return docs
    return [
        (f"{key}#{i:06d}", lambda c=c: c)
        for key, load in docs
        for i, c in enumerate(paragraphs(load() or ""))
    ]


def glob_files(pattern: str) -> list[str]:
    files = sorted(f for f in glob_lib.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(
            f"no files match {pattern!r}; check the path (globs like "
            "'data/**/*.txt' are recursive) or use the 'stdlib' corpus"
        )
    return files


class GptjaxText(tfds.core.GeneratorBasedBuilder):
    """Local text corpora as one-document-per-example array_record shards."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "stdlib: without the encodings/ codec tables and pydoc_data/.",
    }
    BUILDER_CONFIGS = [stdlib_config(), shakespeare_config()]
    DEFAULT_CONFIG_NAME = "stdlib"

    def __init__(self, *, path: str | None = None, **kwargs):
        """``path`` overrides the config's path: how a local Shakespeare copy reaches the
        predefined ``shakespeare`` config (TFDS forbids a custom config with its name)."""
        self._path_override = None if path is None else os.fspath(path)
        # array_record is the only format readable without TensorFlow (random access too).
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage="https://github.com/karpathy/char-rnn",
            disable_shuffling=True,  # reproducible order: same corpus, same bytes, same batches
        )

    def _files(self, dl_manager) -> tuple[list[Document], str]:
        """(one document per source file, in corpus order; how to chunk them)."""
        config: TextConfig = self.builder_config
        path = self._path_override or config.path
        if config.source == "stdlib":
            files = stdlib_files(config.max_files)
            return file_documents(files, sysconfig.get_paths()["stdlib"], read_source), "file"
        if config.source == "shakespeare":
            path = check_shakespeare(path or download_shakespeare(dl_manager))
            return file_documents([path], "", read_text), "paragraph"
        if config.source == "glob":
            files = glob_files(path or "")[: config.max_files]
            root = os.path.commonpath(files) if len(files) > 1 else ""
            return file_documents(files, root, read_text), resolve_chunking(
                config.chunking, len(files)
            )
        raise ValueError(f"unknown source {config.source!r}; use 'stdlib', 'shakespeare' or 'glob'")

    def _split_generators(self, dl_manager):
        config: TextConfig = self.builder_config
        splits.check_split(config.validation_split, config.validation_fraction)
        files, chunking = self._files(dl_manager)
        if config.validation_split == "tail":  # cut the text, then chunk each side
            train, validation = splits.tail_split(files, config.validation_fraction)
            train, validation = (
                chunk_documents(train, chunking),
                chunk_documents(validation, chunking),
            )
        else:  # chunk, then pick documents
            train, validation = splits.hash_split(
                chunk_documents(files, chunking), config.validation_fraction
            )
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
        }

    def _generate_examples(self, docs: list[Document]) -> Iterator[tuple[str, dict]]:
        for key, load in docs:
            text = load()
            if text:
                yield key, {"text": text}


def make_builder(
    config: TextConfig | str, data_dir: str | os.PathLike, path: str | os.PathLike | None = None
) -> GptjaxText:
    """The builder for ``config`` (a TextConfig or a predefined name) under an explicit data_dir;
    ``path`` is a local file for the ``shakespeare`` config."""
    return GptjaxText(config=config, data_dir=os.fspath(data_dir), path=path)


def prepare(
    config: TextConfig | str, data_dir: str | os.PathLike, path: str | os.PathLike | None = None
) -> GptjaxText:
    """Build the array_record shards once (a no-op when already prepared) and return the builder."""
    builder = make_builder(config, data_dir, path)
    builder.download_and_prepare()
    return builder
