"""GPT-2's tokenizer: byte-level BPE with 50,257 tokens, ``<|endoftext|>`` = 50256.

The BPE itself is tiktoken's (Rust, OpenAI's reference for GPT-2), built from local files; this
module only reads the vocabulary in its three common layouts, checks that it is one tiktoken can
run exactly, and fits it to gptjax's ``Tokenizer`` contract:

- a Hugging Face ``tokenizer.json`` (``model.type == "BPE"``, ``model.vocab`` + ``model.merges``);
- Hugging Face's ``vocab.json`` + ``merges.txt``;
- OpenAI's original ``encoder.json`` + ``vocab.bpe`` (the same formats under other names).

Saved form: gptjax's own self-contained ``tokenizer.json`` with ``"kind": "gpt2_bpe"``;
``export_hf`` writes the files ``transformers.GPT2TokenizerFast.from_pretrained`` reads.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import tiktoken

from gptjax.data.tokenizer import JSON_FILENAME, Tokenizer

KIND = "gpt2_bpe"
EOT = "<|endoftext|>"
# The GPT-1 task tokens and BERT's mask, appended after the vocabulary by ``with_task_tokens``.
TASK_TOKENS = ("<|start|>", "<|delimiter|>", "<|extract|>", "<|mask|>")
# (vocabulary, merges) file names: Hugging Face's, then OpenAI's original ones.
BPE_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
# GPT-2's pre-tokenizer regex as tiktoken writes it (tiktoken_ext.openai_public.r50k_pat_str):
# equivalent to GPT-2's original, with possessive quantifiers for speed.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
_SURROGATE_RUNS = re.compile("([\ud800-\udfff]+)")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map, under which every byte string is printable text.

    BPE vocabularies are stored as text, so GPT-2 writes each byte as one visible character:
    the 188 printable Latin-1 bytes as themselves, the other 68 (controls, space, NBSP, soft
    hyphen) as U+0100.. in byte order, which is why a leading space shows as "Ġ" (U+0120).
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(0x100 + n) for n, b in enumerate(others)}


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _merge_pair(merge: str | Sequence[str], where: str) -> tuple[str, str]:
    """A merge as (left, right): "a b" in merges.txt and old tokenizer.json, [a, b] in new."""
    parts = merge.split(" ") if isinstance(merge, str) else list(merge)
    if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise ValueError(f"{where}: merge {merge!r} is not two tokens 'left right'")
    return parts[0], parts[1]


def _mergeable_ranks(
    vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], source: str
) -> dict[bytes, int]:
    """tiktoken's ranks (token bytes -> id), checking the vocabulary is one it runs exactly.

    tiktoken merges the adjacent pair whose concatenation has the lowest id, so ids double as
    merge priorities: this holds when every token but ``<|endoftext|>`` is a byte or a merge's
    result and merge results have rising ids, which is GPT-2's layout (bytes 0..255, merge n
    makes 256 + n). Anything else is refused here rather than tokenized differently.
    """
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{source}: the token ids are not 0..{len(vocab) - 1}, each once")
    ranks, previous = {}, -1
    for b, char in _BYTE_TO_CHAR.items():
        if char not in vocab:
            raise ValueError(
                f"{source}: no token for byte {b} ({char!r}); not a byte-level BPE like GPT-2's"
            )
        ranks[bytes([b])] = vocab[char]
    for n, (left, right) in enumerate(merges):
        for part in (left, right, left + right):
            if part not in vocab:
                raise ValueError(
                    f"{source}: merge {n} ({left!r} {right!r}) needs {part!r}, which is not in "
                    "the vocabulary; the vocab and merges files do not belong together"
                )
        rank = vocab[left + right]
        if rank <= previous:
            raise ValueError(
                f"{source}: merge {n} ({left!r} {right!r}) makes id {rank}, not above the "
                f"previous merge's {previous}; tiktoken needs ids in merge order as in GPT-2"
            )
        previous = rank
        if not set(left + right) <= _CHAR_TO_BYTE.keys():
            raise ValueError(
                f"{source}: merge {n} ({left!r} {right!r}) has characters outside GPT-2's byte "
                "alphabet (bytes_to_unicode); not a byte-level BPE"
            )
        ranks[bytes(_CHAR_TO_BYTE[c] for c in left + right)] = rank
    if EOT not in vocab:
        raise ValueError(f"{source}: no {EOT!r} token; GPT-2's end-of-text token is required")
    made = {_BYTE_TO_CHAR[b] for b in range(256)} | {a + b for a, b in merges} | {EOT}
    if extra := sorted(set(vocab) - made):
        raise ValueError(
            f"{source}: {len(extra)} tokens are neither bytes nor made by a merge (e.g. "
            f"{', '.join(map(repr, extra[:3]))}); only {EOT!r} may be"
        )
    return ranks


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE (or any vocabulary laid out like it), run by tiktoken.

    Special ids follow GPT-2 / Hugging Face: ``eos_id == bos_id == pad_id == 50256``
    (``<|endoftext|>``), since GPT-2 separates documents with that one token and has no pad.
    The GPT-1/BERT task tokens start, delimiter, extract and mask are 50257..50260: by default
    ``vocab_size`` is 50257 and they lie outside it; ``with_task_tokens()`` returns a tokenizer
    with ``vocab_size`` 50261 for fine-tunes that use them (the model's embedding must grow to
    match). ``encode`` never emits a special id: a literal "<|endoftext|>" in text stays
    ordinary tokens (tiktoken's ``encode_ordinary``; Hugging Face's encode would give 50256).

    Round trips are exact for every str. Lone surrogates (U+D800..U+DFFF) have no UTF-8 form
    for tiktoken, which would turn them into U+FFFD, so each run of them is encoded as the byte
    tokens of its "surrogatepass" UTF-8 (3 bytes each) and decoded back the same way; the text
    around such a run is pre-tokenized as if the run split it. Text without them gets GPT-2's ids.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[str | Sequence[str]],
        *,
        task_tokens: bool = False,
        source: str = "GPT-2 BPE",
    ):
        self._vocab = {t: int(i) for t, i in sorted(vocab.items(), key=lambda item: item[1])}
        self._merges = [_merge_pair(m, source) for m in merges]
        ranks = _mergeable_ranks(self._vocab, self._merges, source)
        self._encoding = tiktoken.Encoding(
            "gptjax_gpt2_bpe",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: self._vocab[EOT]},
        )
        self._byte_ids = [ranks[bytes([b])] for b in range(256)]
        self.pad_id = self.bos_id = self.eos_id = self._vocab[EOT]
        self.start_id, self.delimiter_id, self.extract_id, self.mask_id = range(
            len(self._vocab), len(self._vocab) + len(TASK_TOKENS)
        )
        self._set_task_tokens(task_tokens)

    def _set_task_tokens(self, task_tokens: bool) -> None:
        self.task_tokens = bool(task_tokens)
        self.vocab_size = len(self._vocab) + (len(TASK_TOKENS) if self.task_tokens else 0)
        self._serialized: bytes | None = None

    def with_task_tokens(self, task_tokens: bool = True) -> GPT2Tokenizer:
        """This tokenizer with the task tokens inside ``vocab_size`` (or, with False, outside)."""
        tokenizer = copy.copy(self)  # shares the tiktoken encoding: the BPE is the same
        tokenizer._set_task_tokens(task_tokens)
        return tokenizer

    # --- reading the three file layouts and gptjax's own ---

    @classmethod
    def from_spec(cls, spec: Mapping, source: str = JSON_FILENAME) -> GPT2Tokenizer:
        """From a parsed ``tokenizer.json``: gptjax's (``"kind": "gpt2_bpe"``) or Hugging Face's."""
        if spec.get("kind") == KIND:
            return cls(
                spec["vocab"], spec["merges"], task_tokens=spec["task_tokens"], source=source
            )
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(
                f"{source}: not a gptjax tokenizer (no 'kind') nor a Hugging Face BPE "
                f"tokenizer.json (model type {model.get('type')!r}, expected 'BPE')"
            )
        _check_hf_options(spec, source)
        added = {int(t["id"]): t["content"] for t in spec.get("added_tokens") or []}
        vocab = dict(model["vocab"])
        if EOT not in vocab and added.get(len(vocab)) == EOT:  # some exports keep it added only
            vocab[EOT] = len(vocab)
        return cls(
            vocab, model["merges"], task_tokens=_task_tokens_in(added, vocab, source), source=source
        )

    @classmethod
    def from_files(
        cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike
    ) -> GPT2Tokenizer:
        """From ``vocab.json`` + ``merges.txt`` or ``encoder.json`` + ``vocab.bpe``.

        A ``tokenizer_config.json`` beside them that adds the task tokens (as ``export_hf``
        writes) turns them on.
        """
        vocab_path, merges_path = os.fspath(vocab_path), os.fspath(merges_path)
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = [line.rstrip("\r") for line in f.read().split("\n")]
        merges = [line for line in lines if line and not line.startswith("#version")]
        config_path = os.path.join(os.path.dirname(vocab_path), "tokenizer_config.json")
        added = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                decoder = json.load(f).get("added_tokens_decoder") or {}
            added = {int(i): t["content"] for i, t in decoder.items()}
        source = f"{vocab_path} + {os.path.basename(merges_path)}"
        task_tokens = _task_tokens_in(added, vocab, source)
        return cls(vocab, merges, task_tokens=task_tokens, source=source)

    # --- the Tokenizer contract ---

    @property
    def filename(self) -> str:
        return JSON_FILENAME

    def serialize(self) -> bytes:
        # Deterministic bytes (ids in order, fixed separators, ASCII) so fingerprints are stable.
        if self._serialized is None:
            spec = {
                "kind": KIND,
                "vocab": self._vocab,
                "merges": [f"{a} {b}" for a, b in self._merges],
                "task_tokens": self.task_tokens,
            }
            self._serialized = json.dumps(spec, ensure_ascii=True, separators=(",", ":")).encode()
        return self._serialized

    def encode(self, text: str) -> list[int]:
        if _SURROGATE_RUNS.search(text):
            return self._encode_with_surrogates(text)
        return self._encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        odd = {i for i, t in enumerate(texts) if _SURROGATE_RUNS.search(t)}
        plain = iter(
            self._encoding.encode_ordinary_batch(
                [t for i, t in enumerate(texts) if i not in odd], num_threads=os.cpu_count() or 1
            )
        )
        return [
            self._encode_with_surrogates(t) if i in odd else next(plain)
            for i, t in enumerate(texts)
        ]

    def _encode_with_surrogates(self, text: str) -> list[int]:
        ids = []
        for n, part in enumerate(_SURROGATE_RUNS.split(text)):  # odd parts are surrogate runs
            if n % 2:
                ids += [self._byte_ids[b] for b in part.encode("utf-8", errors="surrogatepass")]
            elif part:
                ids += self._encoding.encode_ordinary(part)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        n_ordinary = len(self._vocab)
        kept = [i for i in map(int, ids) if 0 <= i < n_ordinary and i != self.eos_id]
        data = self._encoding.decode_bytes(kept)
        try:
            return data.decode("utf-8", errors="surrogatepass")
        except UnicodeDecodeError:  # sampled ids may split a character: never crash a sampler
            return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one ordinary id stands for (e.g. b" Hello" for 18435)."""
        return self._encoding.decode_single_token_bytes(token_id)

    # --- export for Hugging Face ---

    def export_hf(self, directory: str | os.PathLike) -> str:
        """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
        ``special_tokens_map.json``: what ``transformers.GPT2TokenizerFast.from_pretrained``
        reads (``<|endoftext|>`` as bos, eos, unk and pad; task tokens as added special tokens
        at their ids when on). Returns the directory."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        added = {self.eos_id: EOT}
        if self.task_tokens:
            added |= dict(
                zip((self.start_id, self.delimiter_id, self.extract_id, self.mask_id), TASK_TOKENS)
            )
        specials = {k: EOT for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        if self.task_tokens:
            specials["additional_special_tokens"] = list(TASK_TOKENS)
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "errors": "replace",
            **specials,
            "added_tokens_decoder": {
                str(i): {
                    "content": token,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for i, token in added.items()
            },
        }
        files = {
            "vocab.json": json.dumps(self._vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._merges),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(specials, indent=2),
        }
        for name, text in files.items():
            with open(os.path.join(directory, name), "w", encoding="utf-8", newline="") as f:
                f.write(text)
        return directory


def _check_hf_options(spec: Mapping, source: str) -> None:
    """Refuse a Hugging Face tokenizer.json whose options change GPT-2's tokenization."""
    pre = spec.get("pre_tokenizer") or {}
    model = spec["model"]
    problems = []
    if spec.get("normalizer"):
        problems.append(f"normalizer {spec['normalizer'].get('type')!r}")
    if (
        pre.get("type") != "ByteLevel"
        or pre.get("add_prefix_space")
        or not pre.get("use_regex", True)
    ):
        problems.append(f"pre_tokenizer {pre!r} (GPT-2's is ByteLevel, no prefix space, regex)")
    if (
        model.get("dropout")
        or model.get("continuing_subword_prefix")
        or model.get("end_of_word_suffix")
    ):
        problems.append("BPE dropout, continuing_subword_prefix or end_of_word_suffix")
    if problems:
        raise ValueError(f"{source}: not GPT-2's byte-level BPE: {'; '.join(problems)}")


def _task_tokens_in(added: Mapping[int, str], vocab: Mapping[str, int], source: str) -> bool:
    """Whether the added tokens (id -> text) beyond the vocabulary are the task tokens at
    len(vocab).. in order (True), none (False), or anything else (an error)."""
    beyond = {i: t for i, t in added.items() if vocab.get(t) != i}
    if not beyond:
        return False
    expected = dict(zip(range(len(vocab), len(vocab) + len(TASK_TOKENS)), TASK_TOKENS))
    if beyond != expected:
        raise ValueError(
            f"{source}: added tokens {beyond} are not supported; only {EOT!r} and the task "
            f"tokens {expected} may be added"
        )
    return True


def find_bpe_files(directory: str | os.PathLike) -> tuple[str, str] | None:
    """The (vocabulary, merges) paths in ``directory``, or None when it has neither pair.

    Raises when the only files there are one half of a pair, which is a broken download.
    """
    directory = os.fspath(directory)
    halves = []
    for pair in BPE_FILE_PAIRS:
        paths = [os.path.join(directory, n) for n in pair]
        present = [os.path.isfile(p) for p in paths]
        if all(present):
            return paths[0], paths[1]
        if any(present):
            halves.append(pair if present[0] else pair[::-1])
    if halves:
        have, lack = halves[0]
        raise FileNotFoundError(f"{directory} has {have} but no {lack}; copy both files")
    return None
