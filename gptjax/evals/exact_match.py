"""Greedy decoding and exact match on the number-words task, for the three model families.

Each family reads its source the way it was trained (`gptjax.data.numbers` formats):

  decoder   prompt ``[start] s [delim]`` left-padded to the task's longest prompt, then
            ``sample.generate(greedy=True)`` for ``tgt_len`` tokens, stopping at eos.
  encoder   ``[start] s [delim]`` + ``tgt_len`` mask slots, one ``encoder.forward``, argmax at
            the slots (all target tokens in parallel).
  seq2seq   source ``s [eos]``, ``seq2seq_decode.greedy`` (cached decoder) for ``tgt_len`` tokens.

Predictions are cut at the first eos and decoded with ``tokenizer.decode``. Sources go through in
batches of a fixed ``batch_size`` (the last one padded with copies of a real row), so each
(config, shape) compiles once: ``seq2seq_decode.greedy`` and ``sample.generate`` are jitted with the
config static, and so is the encoder's argmax here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.data import numbers
from gptjax.data.tokenizer import Specials
from gptjax.inference import decoding as seq2seq_decode
from gptjax.inference import sampling as sample
from gptjax.models import bert as encoder
from gptjax.models import family


@functools.partial(jax.jit, static_argnums=0)
def _encoder_argmax(cfg, params, tokens_BT, mask_BT) -> jax.Array:
    """The most likely token at every position of a (masked) encoder input."""
    return jnp.argmax(encoder.forward(cfg, params, tokens_BT, mask=mask_BT), axis=-1)


def cut_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    """The ids before the first eos (all of them when there is none)."""
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _decoder_ids(cfg, params, sources, sp: Specials, *, prompt_len: int, tgt_len: int, **_):
    """Generated ids (B, tgt_len) after left-padded ``[start] s [delim]`` prompts."""
    prompts = [[sp.start_id, *s, sp.delimiter_id] for s in sources]
    tokens_BP, mask_BP = sample.left_pad(prompts, sp.pad_id, prompt_len)
    out = sample.generate(
        cfg,
        params,
        tokens_BP,
        key=jax.random.key(0),
        max_new_tokens=tgt_len,
        greedy=True,
        stop_tokens=(sp.eos_id,),
        prompt_mask=mask_BP,
        pad_id=sp.pad_id,
    )
    return np.asarray(out.tokens)[:, prompt_len:]


def _encoder_ids(cfg, params, sources, sp: Specials, *, seq_len: int, tgt_len: int, **_):
    """Argmax ids (B, tgt_len) at the mask slots after ``[start] s [delim]``."""
    numbers.check_fits("slots", [(s, [0] * (tgt_len - 1)) for s in sources], seq_len, tgt_len)
    batch = numbers.format_encoder([(s, []) for s in sources], sp, seq_len, tgt_len)
    argmax_BT = np.asarray(_encoder_argmax(cfg, params, batch["tokens"], batch["mask"]))
    return np.stack(
        [argmax_BT[i, len(s) + 2 : len(s) + 2 + tgt_len] for i, s in enumerate(sources)]
    )


def _seq2seq_ids(cfg, params, sources, sp: Specials, *, seq_len: int, tgt_len: int, **_):
    """Greedy target ids (B, tgt_len) for sources ``s [eos]``."""
    numbers.check_fits("pair", [(s, [0] * (tgt_len - 1)) for s in sources], seq_len, tgt_len)
    batch = numbers.format_seq2seq([(s, []) for s in sources], sp, seq_len)
    return np.asarray(
        seq2seq_decode.greedy(
            cfg,
            params,
            batch["src"],
            batch["src_mask"],
            start_id=sp.start_id,
            eos_id=sp.eos_id,
            max_len=tgt_len,
            pad_id=sp.pad_id,
        )
    )


PREDICTORS = {
    family.DECODER: _decoder_ids,
    family.ENCODER: _encoder_ids,
    family.SEQ2SEQ: _seq2seq_ids,
}


def predict_ids(
    cfg,
    params,
    tokenizer,
    srcs: Sequence[str],
    *,
    task: str,
    seq_len: int,
    max_number: int = 10_000,
    batch_size: int = 64,
) -> list[list[int]]:
    """Greedy target ids per source, cut before the first eos (see `predict`)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    sp = Specials.of(tokenizer)
    max_src, max_tgt = numbers.task_lengths(task, tokenizer, max_number)
    sources = tokenizer.encode_batch(list(srcs))
    widths = dict(
        seq_len=seq_len,
        tgt_len=max_tgt + 1,  # the decoder's prompt: one shape per task
        prompt_len=max(max_src, max(map(len, sources), default=0)) + 2,
    )
    run = PREDICTORS[family.family_of(cfg)]
    out = []
    for start in range(0, len(sources), batch_size):
        chunk = sources[start : start + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))
        ids_BL = run(cfg, params, padded, sp, **widths)
        out += [cut_at_eos(row, sp.eos_id) for row in ids_BL[: len(chunk)]]
    return out


def predict(
    cfg,
    params,
    tokenizer,
    srcs: Sequence[str],
    *,
    task: str,
    seq_len: int,
    max_number: int = 10_000,
    batch_size: int = 64,
) -> list[str]:
    """Greedy predictions (text) of a trained model (any family) for the task's sources.

    Args:
      cfg, params: the model; ``cfg.vocab_size`` must hold the tokenizer's ids.
      srcs: source texts (e.g. ``[src for src, _ in numbers.pairs(task, 'validation')]``).
      task, max_number: fix ``tgt_len`` (and the decoder's prompt width) as in training.
      seq_len: the training ``seq_len``; the encoder and seq2seq rows have this width.
      batch_size: rows per compiled call; the last batch is padded to it.
    """
    ids = predict_ids(
        cfg,
        params,
        tokenizer,
        srcs,
        task=task,
        seq_len=seq_len,
        max_number=max_number,
        batch_size=batch_size,
    )
    return [tokenizer.decode(row) for row in ids]


def exact_match(cfg, params, tokenizer, pairs: Sequence[tuple[str, str]], **kw) -> float:
    """The fraction of ``(src, tgt)`` pairs whose greedy prediction equals ``tgt`` exactly."""
    return score(cfg, params, tokenizer, pairs, n=0, **kw)[0]


def preview(cfg, params, tokenizer, pairs: Sequence[tuple[str, str]], n: int = 4, **kw) -> str:
    """Lines ``src -> prediction (target) ✓/✗`` for the first ``n`` pairs."""
    pairs = list(pairs)[:n]
    return score(cfg, params, tokenizer, pairs, n=n, **kw)[1] if pairs else ""


def score(
    cfg, params, tokenizer, pairs: Sequence[tuple[str, str]], n: int = 4, **kw
) -> tuple[float, str]:
    """(`exact_match`, `preview` of the first ``n``) from one prediction per pair."""
    if not pairs:
        raise ValueError("exact_match needs at least one (src, tgt) pair")
    preds = predict(cfg, params, tokenizer, [src for src, _ in pairs], **kw)
    em = float(np.mean([p == tgt for p, (_, tgt) in zip(preds, pairs)]))
    lines = "\n".join(
        f"{src} -> {pred} ({tgt}) {'✓' if pred == tgt else '✗'}"
        for pred, (src, tgt) in zip(preds[:n], pairs[:n])
    )
    return em, lines
