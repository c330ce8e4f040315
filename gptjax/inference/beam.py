"""Beam search for every model kind: one beam step, one loop, one cache reordering.

A search keeps K hypotheses per source in R = B*K rows (row b*K + j is beam j
of source b). Each step scores every one-token continuation of every beam,
keeps the K best per source (`step`) and gathers each kept beam's history and
KV cache from its parent row (`reorder`). What differs between model kinds is
only how the next token's logits come out of their cache: the caller's
`advance` (`sampling.beam_search` for the decoder, `decoding.beam_search` for
the encoder–decoder).

A hypothesis ends at a stop token and then keeps its score: it may only go on
with `pad_id` at no cost. Candidates rank by `length_normalised` score.

Shape letters: B sources, K beams, R = B*K beam rows, V vocab, N new tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

LENGTH_PENALTY_KINDS = ("hf", "gnmt")


def check_length_penalty_kind(kind: str) -> None:
    if kind not in LENGTH_PENALTY_KINDS:
        raise ValueError(
            f"length_penalty_kind must be 'hf' (length**alpha) or 'gnmt' "
            f"(((5 + length) / 6)**alpha), got {kind!r}."
        )


def length_normalised(score, length, alpha, kind: str = "hf"):
    """A hypothesis' summed log-prob divided by its length penalty, the beam ranking score.

    Raw likelihood favours short hypotheses (every token costs log-probability), so beams
    rank by score / lp(length). `kind` names the penalty:
      "hf":   lp = length**alpha, Hugging Face's `length_penalty` (0: raw likelihood,
              1: per-token average);
      "gnmt": lp = ((5 + length) / 6)**alpha, Wu et al. 2016 (GNMT) eq. 14: 1 at length
              1, so it tempers short outputs less than "hf" at the same alpha.
    Both are 1 at alpha = 0 and depend on the length only, so hypotheses of one length keep
    their raw order.
    """
    check_length_penalty_kind(kind)
    length = jnp.asarray(length, jnp.float32)
    lp = length**alpha if kind == "hf" else ((5.0 + length) / 6.0) ** alpha
    return score / lp


def is_stop(tok, stop_tokens: Sequence[int]):
    """Whether each token is one of `stop_tokens` (a static tuple; none: never)."""
    if not stop_tokens:
        return jnp.zeros(tok.shape, bool)
    return jnp.isin(tok, jnp.asarray(stop_tokens))


def reorder(tree, parent_R: Int[Array, " R"]):
    """Every array of `tree` with its beam rows (axis 0) gathered from `parent_R`."""
    return jax.tree.map(lambda a: jnp.take(a, parent_R, axis=0), tree)


@flax.struct.dataclass
class Beams:
    """The K live hypotheses of each source.

    score_BK: summed log-probs (-inf for beams not started: only beam 0 is live at
      first, so step 0 does not pick K copies of one token).
    done_BK: whether the hypothesis has produced a stop token.
    tokens_RN, logprobs_RN, mask_RN: its tokens so far (`pad_id` after the stop),
      their log-probs (0 after the stop) and 1 for real tokens (the stop included).
    """

    score_BK: Float[Array, "B K"]
    done_BK: Bool[Array, "B K"]
    tokens_RN: Int[Array, "R N"]
    logprobs_RN: Float[Array, "R N"]
    mask_RN: Int[Array, "R N"]

    @classmethod
    def start(cls, b: int, k: int, max_new_tokens: int, pad_id: int) -> Beams:
        r = b * k
        return cls(
            score_BK=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (b, 1)),
            done_BK=jnp.zeros((b, k), bool),
            tokens_RN=jnp.full((r, max_new_tokens), pad_id, jnp.int32),
            logprobs_RN=jnp.zeros((r, max_new_tokens)),
            mask_RN=jnp.zeros((r, max_new_tokens), jnp.int32),
        )

    def length_BK(self) -> Int[Array, "B K"]:
        return self.mask_RN.sum(-1).reshape(self.done_BK.shape)


def step(
    beams: Beams,
    logits_RV: Float[Array, "R V"],
    i,
    *,
    stop_tokens: Sequence[int],
    pad_id: int,
    length_penalty,
    length_penalty_kind: str,
) -> tuple[Beams, Int[Array, " R"]]:
    """One beam step: the K best one-token continuations per source, written at index `i`.

    Returns the new beams and each new row's parent row (to `reorder` caches by).
    """
    b, k = beams.score_BK.shape
    v = logits_RV.shape[-1]
    logp_BKV = jax.nn.log_softmax(logits_RV, axis=-1).reshape(b, k, v)
    # A finished beam may only continue with pad at no cost: it keeps its score.
    pad_only_V = jnp.where(jnp.arange(v) == pad_id, 0.0, -jnp.inf)
    logp_BKV = jnp.where(beams.done_BK[..., None], pad_only_V, logp_BKV)
    cand_BKV = beams.score_BK[..., None] + logp_BKV
    length_BK = jnp.where(beams.done_BK, beams.length_BK(), i + 1)
    # Alive candidates share one length, so among them this is the raw order; the
    # normalisation decides between finished and alive ones.
    rank_BKV = length_normalised(
        cand_BKV, length_BK[..., None], length_penalty, length_penalty_kind
    )
    _, idx_BK = jax.lax.top_k(rank_BKV.reshape(b, k * v), k)
    beam_BK, tok_BK = idx_BK // v, (idx_BK % v).astype(jnp.int32)
    pick = lambda a_BKV: jnp.take_along_axis(a_BKV.reshape(b, k * v), idx_BK, axis=1)
    parent_done_BK = jnp.take_along_axis(beams.done_BK, beam_BK, axis=1)
    parent_R = (jnp.arange(b)[:, None] * k + beam_BK).reshape(-1)
    rows = reorder((beams.tokens_RN, beams.logprobs_RN, beams.mask_RN), parent_R)
    new = Beams(
        score_BK=pick(cand_BKV),
        done_BK=parent_done_BK | is_stop(tok_BK, stop_tokens),
        tokens_RN=rows[0].at[:, i].set(tok_BK.reshape(-1)),
        logprobs_RN=rows[1].at[:, i].set(pick(logp_BKV).reshape(-1)),
        mask_RN=rows[2].at[:, i].set(~parent_done_BK.reshape(-1)),
    )
    return new, parent_R


class Best(NamedTuple):
    """The winning hypothesis per source (fields as in `Beams`, one row per source)."""

    tokens: Int[Array, "B N"]
    logprobs: Float[Array, "B N"]
    mask: Int[Array, "B N"]
    done: Bool[Array, " B"]
    score: Float[Array, " B"]


# advance(beams, cache, i) -> (logits_RV, cache): the next-token logits after the tokens
# at index i (`beams.tokens_RN[:, i]`), given a cache already reordered to their parents.
Advance = Callable[[Beams, dict, jax.Array], tuple[jax.Array, dict]]


def search(
    logits_BV: Float[Array, "B V"],
    cache: dict,
    advance: Advance,
    *,
    num_beams: int,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    length_penalty=1.0,
    length_penalty_kind: str = "hf",
) -> Best:
    """Beam search from each source's first next-token logits and its KV cache.

    `cache` holds arrays with rows on axis 0 (`layers.init_cache`'s buffers);
    both it and the logits are copied to each source's K beams. The loop stops once
    every hypothesis has finished; the last step's tokens are never fed back. The
    winner maximises `length_normalised(sum(logprobs), length)`, eos counted.
    """
    b, k = logits_BV.shape[0], num_beams
    state = dict(
        i=jnp.int32(0),
        beams=Beams.start(b, k, max_new_tokens, pad_id),
        logits=jnp.repeat(logits_BV, k, axis=0),
        cache=jax.tree.map(lambda a: jnp.repeat(a, k, axis=0), cache),
    )

    def body(s):
        i = s["i"]
        beams, parent_R = step(
            s["beams"],
            s["logits"],
            i,
            stop_tokens=stop_tokens,
            pad_id=pad_id,
            length_penalty=length_penalty,
            length_penalty_kind=length_penalty_kind,
        )
        logits, cache = jax.lax.cond(
            i + 1 < max_new_tokens,
            lambda: advance(beams, reorder(s["cache"], parent_R), i),
            lambda: (s["logits"], s["cache"]),
        )
        return dict(i=i + 1, beams=beams, logits=logits, cache=cache)

    def cond(s):
        return (s["i"] < max_new_tokens) & ~jnp.all(s["beams"].done_BK)

    beams = jax.lax.while_loop(cond, body, state)["beams"]
    return _best(beams, b, k, length_penalty, length_penalty_kind)


def _best(beams: Beams, b: int, k: int, length_penalty, length_penalty_kind: str) -> Best:
    """Each source's best hypothesis under the length-normalised score (eos counted)."""
    final_BK = length_normalised(
        beams.score_BK, jnp.maximum(beams.length_BK(), 1), length_penalty, length_penalty_kind
    )
    best_B = jnp.argmax(final_BK, axis=1)
    rows = jnp.arange(b)
    best = lambda a_R: a_R.reshape(b, k, *a_R.shape[1:])[rows, best_B]
    return Best(
        tokens=best(beams.tokens_RN),
        logprobs=best(beams.logprobs_RN),
        mask=best(beams.mask_RN),
        done=beams.done_BK[rows, best_B],
        score=final_BK[rows, best_B],
    )
