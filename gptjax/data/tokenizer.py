"""Tokenizers with exact round trips: sentencepiece BPE, bytes, characters and GPT-2's BPE.

Every tokenizer here satisfies ``decode(encode(x)) == x`` for any ``str`` it can represent
(code with tabs, CRLF and blank lines; Chinese; emoji; control characters), because code
corpora and sampled programs are useless if whitespace is silently normalised. All share one
set of special ids (pad, bos, eos, the GPT-1 task tokens start / delimiter / extract, and BERT's
mask; GPT-2's BPE keeps GPT-2's single ``<|endoftext|>`` as pad, bos and eos), which never come
out of ``encode`` on ordinary text, so a literal ``"<s>"`` in a corpus stays text.

Saved forms: sentencepiece as ``tokenizer.model`` (its serialised proto), byte, char and GPT-2
BPE (gpt2_tokenizer.py) as ``tokenizer.json``; ``load_tokenizer`` recognises either file or a
directory holding one, and GPT-2's files as Hugging Face and OpenAI ship them.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm
from etils import epath

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<start>", "<delim>", "<extract>", "<mask>")
SP_FILENAME = "tokenizer.model"
JSON_FILENAME = "tokenizer.json"
# sentencepiece uses U+2581 as its internal space marker, so a literal one decodes as " ".
# We encode it as its three UTF-8 byte pieces instead, which decode back to the character.
SP_SPACE = "\u2581"


@dataclasses.dataclass(frozen=True)
class Specials:
    """A tokenizer's special ids as plain values: what batch formats and task transforms read."""

    pad_id: int
    eos_id: int
    start_id: int
    delimiter_id: int
    extract_id: int
    mask_id: int

    @classmethod
    def of(cls, tokenizer) -> Specials:
        """The special ids of a tokenizer (or a Specials, returned as it is)."""
        if isinstance(tokenizer, Specials):
            return tokenizer
        return cls(**{f.name: int(getattr(tokenizer, f.name)) for f in dataclasses.fields(cls)})


class Tokenizer(abc.ABC):
    """Common interface: text <-> ids, special ids, save, and a fingerprint for caches."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    start_id: int
    delimiter_id: int
    extract_id: int
    mask_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; never emits special ids."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, skipping special ids and ids outside the vocabulary.

        Ids past ``vocab_size`` are skipped rather than rejected because a model's embedding is
        often padded beyond the tokenizer (e.g. to a multiple of 128) and may sample them.
        """

    @abc.abstractmethod
    def serialize(self) -> bytes:
        """The exact bytes ``save`` writes; also the tokenizer's identity for caches."""

    @property
    @abc.abstractmethod
    def filename(self) -> str:
        """File name used by ``save`` inside a directory."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts; subclasses override when a batched call is faster."""
        return [self.encode(t) for t in texts]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(
            (
                self.pad_id,
                self.bos_id,
                self.eos_id,
                self.start_id,
                self.delimiter_id,
                self.extract_id,
                self.mask_id,
            )
        )

    @property
    def fingerprint(self) -> str:
        """sha256 of the saved form: equal fingerprints encode identically."""
        return hashlib.sha256(self.serialize()).hexdigest()

    def save(self, directory: str | os.PathLike) -> str:
        """Write the tokenizer into ``directory`` (local, or gs:// and any etils.epath URI) and
        return the file's path."""
        path = epath.Path(directory) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if "://" in os.fspath(path):  # an object appears whole when its upload completes
            path.write_bytes(self.serialize())
            return os.fspath(path)
        tmp_path = f"{path}.tmp-{os.getpid()}"
        with open(tmp_path, "wb") as f:
            f.write(self.serialize())
        os.replace(tmp_path, path)  # atomic: a reader never sees half a tokenizer
        return os.fspath(path)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece BPE model trained by ``train_sentencepiece`` (or any byte-fallback model
    with pad, bos, eos and the control symbols ``<start>``, ``<delim>``, ``<extract>``,
    ``<mask>``).

    Round trips are exact for every str except lone surrogates (U+D800..U+DFFF), which have no
    UTF-8 form to hand to sentencepiece; ByteTokenizer takes those too.
    """

    def __init__(self, model_proto: bytes):
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        sp = self._sp
        self.vocab_size = sp.vocab_size()
        self.pad_id, self.bos_id, self.eos_id = sp.pad_id(), sp.bos_id(), sp.eos_id()
        self.start_id, self.delimiter_id, self.extract_id, self.mask_id = (
            self._required_piece(p) for p in SPECIAL_TOKENS[3:]
        )
        self._space_ids = [self._required_piece(f"<0x{b:02X}>") for b in SP_SPACE.encode()]
        self._skip_ids = self.special_ids | {sp.unk_id()}

    def _required_piece(self, piece: str) -> int:
        piece_id = self._sp.piece_to_id(piece)
        if piece_id == self._sp.unk_id():
            raise ValueError(
                f"sentencepiece model lacks the piece {piece!r}; train it with "
                "gptjax.data.tokenizer.train_sentencepiece (byte_fallback and the "
                "GPT-1 task and mask tokens are required)"
            )
        return piece_id

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        return cls(epath.Path(path).read_bytes())

    @property
    def filename(self) -> str:
        return SP_FILENAME

    def serialize(self) -> bytes:
        return self._proto

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Split on the literal U+2581, encode the parts in one threaded call, rejoin with its bytes.
        parts_per_text = [t.split(SP_SPACE) for t in texts]
        flat = [p for parts in parts_per_text for p in parts]
        flat_ids = iter(self._sp.encode(flat, num_threads=os.cpu_count() or 1))
        out = []
        for parts in parts_per_text:
            ids = list(next(flat_ids))
            for _ in parts[1:]:
                ids += self._space_ids + next(flat_ids)
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        return self._sp.decode(
            [i for i in ids if 0 <= i < self.vocab_size and i not in self._skip_ids]
        )

    def id_to_piece(self, piece_id: int) -> str:
        return self._sp.id_to_piece(piece_id)


def _training_lines(texts_or_files: Iterable[str], max_chars: int) -> Iterator[str]:
    """Lines for sentencepiece, which trains on sentences: '\\n' is a user-defined piece anyway,
    so splitting on it loses nothing, and short lines stay under max_sentence_length."""
    total = 0
    for item in texts_or_files:
        if os.path.isfile(item):
            with open(item, encoding="utf-8", errors="replace", newline="") as f:
                item = f.read()
        for line in item.replace(SP_SPACE, " ").split("\n"):
            if not line:
                continue
            yield line
            total += len(line)
            if total >= max_chars:
                return


# sentencepiece options under which decode(encode(x)) == x for any text: no normalisation,
# whitespace kept, newline and tab as their own pieces, unknown characters as bytes.
EXACT_BPE = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    user_defined_symbols=["\n", "\t"],
    control_symbols=list(SPECIAL_TOKENS[3:]),
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    hard_vocab_limit=False,
    shuffle_input_sentence=True,
    max_sentence_length=16384,
    minloglevel=2,
)


def train_sentencepiece(
    texts_or_files: Iterable[str],
    vocab_size: int,
    out_path: str | os.PathLike | None = None,
    *,
    max_chars: int = 20_000_000,
    input_sentence_size: int = 2_000_000,
    num_threads: int | None = None,
) -> SentencePieceTokenizer:
    """Train a BPE model in-process whose round trips are exact.

    Args:
      texts_or_files: documents, or paths of UTF-8 text files (an item naming an existing file
        is read).
      vocab_size: the target size; a corpus too small for it gets a smaller vocabulary
        (``hard_vocab_limit=False``) instead of an error, so tiny test corpora train.
      out_path: where to write the model (a file, or a directory to get ``tokenizer.model``);
        None keeps it in memory only.
      max_chars: stop reading input after this many characters, which bounds training time
        (the 13 MB stdlib trains a 4k BPE in seconds on 2 cores).
      input_sentence_size: at most this many lines are sampled by sentencepiece.
    """
    if vocab_size < 300:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 256 ids "
            "plus specials; use >= 300, or ByteTokenizer/CharTokenizer"
        )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts_or_files, max_chars),
        model_writer=model,
        vocab_size=vocab_size,
        input_sentence_size=input_sentence_size,
        num_threads=num_threads or os.cpu_count() or 1,
        **EXACT_BPE,
    )
    tokenizer = SentencePieceTokenizer(model.getvalue())
    if out_path is not None:
        out_path = os.fspath(out_path)
        if os.path.isdir(out_path) or not out_path.endswith(".model"):
            tokenizer.save(out_path)
        else:
            os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
            with open(out_path, "wb") as f:
                f.write(tokenizer.serialize())
    return tokenizer


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, specials after them: any str round-trips, no training."""

    def __init__(self):
        (
            self.pad_id,
            self.bos_id,
            self.eos_id,
            self.start_id,
            self.delimiter_id,
            self.extract_id,
            self.mask_id,
        ) = range(256, 256 + len(SPECIAL_TOKENS))
        self.vocab_size = 256 + len(SPECIAL_TOKENS)

    @property
    def filename(self) -> str:
        return JSON_FILENAME

    def serialize(self) -> bytes:
        return json.dumps({"kind": "byte"}).encode()

    def encode(self, text: str) -> list[int]:
        # surrogatepass: lone surrogates are legal in a Python str and must round-trip too.
        return list(text.encode("utf-8", errors="surrogatepass"))

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:  # sampled bytes may be invalid UTF-8: never crash a sampler
            return data.decode("utf-8", errors="replace")


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (e.g. tiny Shakespeare's 65), for tiny runs.

    Ids: the specials, ``<unk>``, then the sorted characters. A character outside the alphabet
    encodes as ``unk_id`` and decodes as U+FFFD, so prompts never crash a sampler; round trips
    are exact for text within the alphabet.
    """

    UNK = "\ufffd"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise ValueError("CharTokenizer needs a non-empty set of single characters")
        (
            self.pad_id,
            self.bos_id,
            self.eos_id,
            self.start_id,
            self.delimiter_id,
            self.extract_id,
            self.mask_id,
            self.unk_id,
        ) = range(len(SPECIAL_TOKENS) + 1)
        offset = len(SPECIAL_TOKENS) + 1
        self._char_to_id = {c: i + offset for i, c in enumerate(self.chars)}
        self._id_to_char = {i: c for c, i in self._char_to_id.items()} | {self.unk_id: self.UNK}
        self.vocab_size = offset + len(self.chars)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(chars)

    @property
    def filename(self) -> str:
        return JSON_FILENAME

    def serialize(self) -> bytes:
        return json.dumps({"kind": "char", "chars": self.chars}, ensure_ascii=True).encode()

    def encode(self, text: str) -> list[int]:
        return [self._char_to_id.get(c, self.unk_id) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._id_to_char.get(int(i), "") for i in ids)


def load_tokenizer(path_or_directory: str | os.PathLike) -> Tokenizer:
    """Load what ``Tokenizer.save`` wrote, or GPT-2's BPE files as Hugging Face or OpenAI ship them.

    Accepts a ``.model`` file, a ``tokenizer.json`` (gptjax's, which has a ``"kind"``, or
    Hugging Face's, which has ``"model": {"type": "BPE"}``), or a directory holding one of
    them, ``vocab.json`` + ``merges.txt``, or ``encoder.json`` + ``vocab.bpe``.
    """
    # Imported here: gpt2_tokenizer builds on this module's Tokenizer (and loads tiktoken).
    from gptjax.data.gpt2_tokenizer import KIND, GPT2Tokenizer, find_bpe_files

    path = epath.Path(path_or_directory)  # local, or gs:// and any etils.epath URI
    if path.is_dir():
        found = [path / n for n in (SP_FILENAME, JSON_FILENAME) if (path / n).is_file()]
        if not found:
            pair = find_bpe_files(path)
            if pair is not None:
                return GPT2Tokenizer.from_files(*pair)
            raise FileNotFoundError(
                f"no {SP_FILENAME}, {JSON_FILENAME}, vocab.json + merges.txt or encoder.json + "
                f"vocab.bpe in {path}; train one with `gptjax tokenizer`, call "
                "Tokenizer.save(directory), or copy GPT-2's tokenizer files there"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    data = path.read_bytes()
    path = os.fspath(path)
    if data.lstrip().startswith(b"{"):
        spec = json.loads(data)
        if spec.get("kind") == "byte":
            return ByteTokenizer()
        if spec.get("kind") == "char":
            return CharTokenizer(spec["chars"])
        if spec.get("kind") == KIND or ("kind" not in spec and "model" in spec):
            return GPT2Tokenizer.from_spec(spec, source=path)
        raise ValueError(f"{path}: unknown tokenizer kind {spec.get('kind')!r}")
    try:
        return SentencePieceTokenizer(data)
    except RuntimeError as e:
        raise ValueError(
            f"{path} is neither a tokenizer JSON nor a sentencepiece model ({e})"
        ) from e


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fail early when the model's embedding cannot hold every id the tokenizer emits.

    A larger model vocabulary is fine (padding to a multiple of 64/128 is common for speed).
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{model_vocab_size}; set the model's vocab_size to at least {tokenizer.vocab_size} "
            f"(e.g. {-(-tokenizer.vocab_size // 128) * 128}, a multiple of 128) or train a "
            "smaller tokenizer"
        )
