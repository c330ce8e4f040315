"""How a corpus is cut into train and validation: by hash of document keys, or the contiguous tail.

* ``'hash'``: the documents whose key hashes below ``fraction`` (a deterministic sample,
  independent of file order and stable when files are added). Validation documents sit between
  training documents, so the task is a little easier than held-out text.
* ``'tail'``: the last ``fraction`` of the corpus's characters, as nanoGPT's ``prepare.py``
  (``data[:int(n * 0.9)]`` / ``data[int(n * 0.9):]``). The corpus is its source files' texts
  concatenated in order; train is the first ``int(n * (1 - fraction))`` characters, validation
  the rest, so the cut falls at that exact character, inside a file or a paragraph if need be.
  The builder cuts before it chunks a file into paragraphs; chunking then treats the two pieces
  like any paragraph (each ends in one newline, then EOS), so tiny Shakespeare's validation is
  nanoGPT's ``val.bin`` with each blank line's newline read as EOS.

A document is ``(key, loader)``: loading is deferred so a hash split reads each file once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

Document = tuple[str, Callable[[], str]]

VALIDATION_SPLITS = ("hash", "tail")
TAIL_FRACTION = 0.1  # nanoGPT's data/shakespeare_char/prepare.py


def check_split(validation_split: str, validation_fraction: float | None, owner: str = "") -> None:
    """A one-line ValueError for an unknown split rule or a fraction outside (0, 1); ``owner``
    (e.g. 'DataConfig.') prefixes the field names in the message."""
    if validation_split not in VALIDATION_SPLITS:
        raise ValueError(
            f"{owner}validation_split={validation_split!r} is not one of {VALIDATION_SPLITS} "
            "('hash': documents by key hash; 'tail': the last fraction of the text)"
        )
    if validation_fraction is not None and not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"{owner}validation_fraction={validation_fraction!r} must be in (0, 1)")


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic split by hash of the document key (not Python's salted hash())."""
    bucket = int.from_bytes(_digest(key)[:8], "big") / 2.0**64
    return bucket < fraction


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def hash_split(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation): validation holds the documents whose key hashes below ``fraction``,
    or, for a corpus too small to have one, the single lowest-hashing document."""
    if len(docs) < 2:
        raise ValueError(
            f"the corpus yields {len(docs)} document(s); the 'hash' split needs at least 2 "
            "(the 'tail' split cuts even one document)"
        )
    validation = {k for k, _ in docs if is_validation(k, fraction)}
    if not validation:  # tiny corpora: still an eval split, still chosen by hash
        validation = {min((k for k, _ in docs), key=_digest)}
    return [d for d in docs if d[0] not in validation], [d for d in docs if d[0] in validation]


def tail_split(docs: list[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, validation): the first ``int(n * (1 - fraction))`` of the ``n`` characters of the
    documents concatenated in order, and the rest. The document the cut falls in is split there;
    its two pieces keep its key, one in each split."""
    texts = [(key, load() or "") for key, load in docs]
    n = sum(len(text) for _, text in texts)
    cut = int(n * (1.0 - fraction))
    if not 0 < cut < n:
        raise ValueError(
            f"validation_fraction={fraction!r} of {n} characters leaves an empty split; "
            "use a fraction that leaves both sides at least one character"
        )
    train: list[Document] = []
    validation: list[Document] = []
    start = 0
    for key, text in texts:
        head, tail = text[: max(cut - start, 0)], text[max(cut - start, 0) :]
        if head:
            train.append((key, lambda t=head: t))
        if tail:
            validation.append((key, lambda t=tail: t))
        start += len(text)
    return train, validation
