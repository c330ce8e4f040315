"""Data: tokenizers, TFDS builders over local text, and the packed-window batch pipeline.

This package knows tokens, never models.
"""

from gptjax.data.gpt2_tokenizer import GPT2Tokenizer
from gptjax.data.pipeline import (
    TokenBatchIterator,
    corpus_texts,
    encode_documents,
    make_datasets,
    pack_windows,
    token_stream,
)
from gptjax.data.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    check_vocab,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "GPT2Tokenizer",
    "SentencePieceTokenizer",
    "TokenBatchIterator",
    "Tokenizer",
    "check_vocab",
    "corpus_texts",
    "encode_documents",
    "load_tokenizer",
    "make_datasets",
    "pack_windows",
    "token_stream",
    "train_sentencepiece",
]
