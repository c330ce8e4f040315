"""Generation with a preallocated KV cache: sampling and beam search.

Prompts of different lengths are left-padded into one `(B, T)` array with a
`prompt_mask` (1 = real token). Slot t of the cache holds token t of the
padded row; positions count real tokens only, so a padded row generates
exactly what it would alone. Prefill and the whole decode loop run inside
one jitted function (a `lax.while_loop` that stops when every row is done),
compiled once per shape and static setting. Beam search runs `beam.search`
with this model's cached forward as its next-token step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptjax.config import ModelConfig
from gptjax.inference import beam
from gptjax.models import gpt as model
from gptjax.models import layers


@flax.struct.dataclass
class SampleOutput:
    """What `generate` and `beam_search` return.

    tokens: (B, T + max_new_tokens), the (padded) prompt then the continuation;
      after a stop token the row holds `pad_id`.
    logprobs: (B, max_new_tokens), log p(token | context) of each generated token
      under the model itself (raw logits: no temperature or filtering), which is
      what a forward pass scores; 0 after the row stopped.
    mask: (B, T + max_new_tokens), 1 for real tokens (prompt and generated,
      the stop token included).
    done: (B,), whether the row produced a stop token.
    scores: (B,), the summed logprobs (beam search: the length-normalised beam score).
    """

    tokens: Int[Array, "B L"]
    logprobs: Float[Array, "B N"]
    mask: Int[Array, "B L"]
    done: jax.Array
    scores: jax.Array


# --------------------------------------------------------------- logit filters


def apply_repetition_penalty(logits_BV, presence_BV, penalty):
    """CTRL's penalty, sign-aware: seen tokens' positive logits are divided by
    `penalty` and negative ones multiplied, so both become less likely."""
    penalised = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(presence_BV, penalised, logits_BV)


def top_k_filter(logits_BV: Float[Array, "B V"], k: int) -> Float[Array, "B V"]:
    """Keep the k largest logits per row (ties with the k-th are kept too)."""
    kth_B1 = jax.lax.top_k(logits_BV, k)[0][:, -1:]
    return jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)


def top_p_filter(logits_BV: Float[Array, "B V"], p) -> Float[Array, "B V"]:
    """Nucleus filtering: keep the smallest set of most likely tokens whose
    probability reaches p (the most likely token is always kept)."""
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_BV = mass_before_BV < p
    cutoff_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


def process_logits(
    logits_BV, presence_BV, *, temperature, top_k, top_p, repetition_penalty, banned_ids
):
    """Repetition penalty → banned ids → temperature → top-k → top-p (HF's order)."""
    logits_BV = apply_repetition_penalty(logits_BV, presence_BV, repetition_penalty)
    if banned_ids:
        logits_BV = logits_BV.at[:, jnp.asarray(banned_ids)].set(-jnp.inf)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        logits_BV = top_k_filter(logits_BV, top_k)
    if top_p is not None:
        logits_BV = top_p_filter(logits_BV, top_p)
    return logits_BV


# ------------------------------------------------------------------ validation


def _prepare(cfg: ModelConfig, prompt_BT, prompt_mask, max_new_tokens: int):
    prompt_BT = np.asarray(prompt_BT)
    if prompt_BT.ndim != 2:
        raise ValueError(
            f"prompt must be (batch, time), got shape {prompt_BT.shape}; "
            "use left_pad() for a list of prompts."
        )
    mask = np.ones_like(prompt_BT) if prompt_mask is None else np.asarray(prompt_mask)
    if mask.shape != prompt_BT.shape:
        raise ValueError(f"prompt_mask shape {mask.shape} != prompt shape {prompt_BT.shape}.")
    if np.any(np.diff(mask.astype(np.int32), axis=1) < 0) or np.any(mask[:, -1] == 0):
        raise ValueError(
            "prompts must be left-padded: each prompt_mask row is 0s then 1s "
            "and ends with a real token (see left_pad())."
        )
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}.")
    total = prompt_BT.shape[1] + max_new_tokens
    if cfg.pos_embedding == "learned" and total > cfg.max_len:
        raise ValueError(
            f"prompt length {prompt_BT.shape[1]} + max_new_tokens {max_new_tokens}"
            f" = {total} exceeds the model's max_len={cfg.max_len}; shorten the "
            "prompt (keep its last tokens) or generate fewer tokens."
        )
    layers.check_tokens(cfg, prompt_BT, n_slots=total)
    return jnp.asarray(prompt_BT, jnp.int32), jnp.asarray(mask, jnp.int32)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A list of token lists -> (tokens_BT, mask_BT), each prompt right-aligned in T slots.

    T is `width`, or the longest prompt's length when None. A prompt longer than `width`
    keeps its last `width` tokens (the end is what a continuation follows). A fixed width
    gives every batch of a run one shape, so the sampler compiles once.
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("left_pad needs at least one prompt")
    width = max(map(len, prompts)) if width is None else width
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        p = p[-width:]
        tokens[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    return tokens, mask


def _prefill(cfg, params, prompt_BT, mask_BT, n_slots):
    """Run the prompt through the model, filling cache slots [0, T)."""
    b, t = prompt_BT.shape
    cache = layers.init_cache(cfg, b, n_slots)
    kv_valid_BS = jnp.zeros((b, n_slots), bool).at[:, :t].set(mask_BT.astype(bool))
    logits_BTV, cache = model.forward_cached(
        cfg,
        params,
        prompt_BT,
        cache,
        positions_BT=layers.positions_from_mask(mask_BT),
        kv_valid_BS=kv_valid_BS,
        cache_index=0,
    )
    return logits_BTV[:, -1], cache, kv_valid_BS


def _start_state(cfg, params, prompt_BT, mask_BT, key, max_new_tokens: int, pad_id: int):
    """The decode loop's state after the prefill, and each row's next position."""
    b, t = prompt_BT.shape
    last_BV, cache, kv_valid_BS = _prefill(cfg, params, prompt_BT, mask_BT, t + max_new_tokens)
    presence_BV = (
        jnp.zeros((b, cfg.vocab_size), bool)
        .at[jnp.arange(b)[:, None], prompt_BT]
        .max(mask_BT.astype(bool))
    )
    state = dict(
        i=jnp.int32(0),
        out=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        logp=jnp.zeros((b, max_new_tokens)),
        done=jnp.zeros(b, bool),
        cache=cache,
        kv_valid=kv_valid_BS,
        last=last_BV,
        presence=presence_BV,
        key=key,
    )
    return state, mask_BT.sum(axis=1)


def _output(prompt_BT, mask_BT, s: dict) -> SampleOutput:
    """Prompt and continuation, their mask (a row's tokens after its stop are not real)."""
    gen_mask_BN = s["kv_valid"][:, prompt_BT.shape[1] :].astype(jnp.int32)
    return SampleOutput(
        tokens=jnp.concatenate([prompt_BT, s["out"]], axis=1),
        logprobs=s["logp"],
        mask=jnp.concatenate([mask_BT, gen_mask_BN], axis=1),
        done=s["done"],
        scores=s["logp"].sum(-1),
    )


def argmax(x_BV: Float[Array, "B V"]) -> Int[Array, " B"]:
    """`jnp.argmax` over the last axis (the first maximal index; a NaN counts as maximal)
    as two plain reductions: XLA:CPU lowers `jnp.argmax` to a variadic reduce that took
    1.7 ms for (64, 4096) logits, a sixth of a decode step, where max + min take 0.1 ms."""
    max_B1 = x_BV.max(-1, keepdims=True)
    hit_BV = (x_BV == max_B1) | jnp.isnan(x_BV)
    v = x_BV.shape[-1]
    return jnp.min(jnp.where(hit_BV, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def _choose(raw_BV, logits_BV, done_B, key, greedy: bool, pad_id: int):
    """The next token of each row (pad once a row is done) and its log-prob under the raw
    model, not the filtered distribution. Sampling is the Gumbel-max trick (what
    `jax.random.categorical` does) on the fast `argmax`."""
    if not greedy:
        logits_BV = logits_BV + jax.random.gumbel(key, logits_BV.shape, logits_BV.dtype)
    tok_B = argmax(logits_BV)
    tok_B = jnp.where(done_B, pad_id, tok_B.astype(jnp.int32))
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(raw_BV, axis=-1), tok_B[:, None], 1)[:, 0]
    return tok_B, jnp.where(done_B, 0.0, logp_B)


# ---------------------------------------------------------------------- sampling


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "max_new_tokens",
        "top_k",
        "use_top_p",
        "greedy",
        "stop_tokens",
        "banned_ids",
        "pad_id",
    ),
)
def _sample(
    cfg,
    params,
    prompt_BT,
    mask_BT,
    key,
    temperature,
    top_p,
    repetition_penalty,
    *,
    max_new_tokens,
    top_k,
    use_top_p,
    greedy,
    stop_tokens,
    banned_ids,
    pad_id,
):
    b, t = prompt_BT.shape
    state, next_pos_B = _start_state(cfg, params, prompt_BT, mask_BT, key, max_new_tokens, pad_id)
    rows_B = jnp.arange(b)

    def cond(s):
        return (s["i"] < max_new_tokens) & ~jnp.all(s["done"])

    def step(s):
        i, key, sub = s["i"], *jax.random.split(s["key"])
        logits_BV = process_logits(
            s["last"],
            s["presence"],
            temperature=temperature,
            top_k=top_k,
            top_p=top_p if use_top_p else None,
            repetition_penalty=repetition_penalty,
            banned_ids=banned_ids,
        )
        tok_B, lp_B = _choose(s["last"], logits_BV, s["done"], sub, greedy, pad_id)
        kv_valid = s["kv_valid"].at[:, t + i].set(~s["done"])
        logits_B1V, cache = model.forward_cached(
            cfg,
            params,
            tok_B[:, None],
            s["cache"],
            positions_BT=(next_pos_B + i)[:, None],
            kv_valid_BS=kv_valid,
            cache_index=t + i,
        )
        return dict(
            i=i + 1,
            out=s["out"].at[:, i].set(tok_B),
            logp=s["logp"].at[:, i].set(lp_B),
            done=s["done"] | beam.is_stop(tok_B, stop_tokens),
            cache=cache,
            kv_valid=kv_valid,
            last=logits_B1V[:, 0],
            presence=s["presence"].at[rows_B, tok_B].set(True),
            key=key,
        )

    return _output(prompt_BT, mask_BT, jax.lax.while_loop(cond, step, state))


def generate(
    cfg: ModelConfig,
    params,
    prompt_BT,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] = (),
    greedy: bool = False,
    prompt_mask=None,
    banned_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> SampleOutput:
    """Sample `max_new_tokens` after each (left-padded) prompt.

    Rows that emit one of `stop_tokens` stop there (the stop token is kept);
    the loop ends early once every row has stopped.
    """
    prompt_BT, mask_BT = _prepare(cfg, prompt_BT, prompt_mask, max_new_tokens)
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy=True instead.")
    if top_k is not None and not 0 < top_k <= cfg.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={cfg.vocab_size}], got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}.")
    return _sample(
        cfg,
        params,
        prompt_BT,
        mask_BT,
        key,
        jnp.float32(temperature if not greedy else 1.0),
        jnp.float32(1.0 if top_p is None else top_p),
        jnp.float32(repetition_penalty),
        max_new_tokens=max_new_tokens,
        top_k=top_k,
        use_top_p=top_p is not None,
        greedy=greedy,
        stop_tokens=tuple(int(x) for x in stop_tokens),
        banned_ids=tuple(int(x) for x in banned_ids),
        pad_id=pad_id,
    )


# ------------------------------------------------------------------ beam search


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "num_beams",
        "max_new_tokens",
        "stop_tokens",
        "pad_id",
        "length_penalty_kind",
    ),
)
def _beam_search(
    cfg,
    params,
    prompt_BT,
    mask_BT,
    length_penalty,
    *,
    num_beams,
    max_new_tokens,
    stop_tokens,
    pad_id,
    length_penalty_kind,
):
    t = prompt_BT.shape[1]
    last_BV, cache, _ = _prefill(cfg, params, prompt_BT, mask_BT, t + max_new_tokens)
    prompt_valid_RT = jnp.repeat(mask_BT.astype(bool), num_beams, axis=0)
    next_pos_R = jnp.repeat(mask_BT.sum(axis=1), num_beams)

    def advance(beams, cache, i):
        """Logits after token i of every beam, written at cache slot t + i."""
        kv_valid_RS = jnp.concatenate([prompt_valid_RT, beams.mask_RN.astype(bool)], axis=1)
        logits_R1V, cache = model.forward_cached(
            cfg,
            params,
            beams.tokens_RN[:, i, None],
            cache,
            positions_BT=(next_pos_R + i)[:, None],
            kv_valid_BS=kv_valid_RS,
            cache_index=t + i,
        )
        return logits_R1V[:, 0], cache

    best = beam.search(
        last_BV,
        cache,
        advance,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        stop_tokens=stop_tokens,
        pad_id=pad_id,
        length_penalty=length_penalty,
        length_penalty_kind=length_penalty_kind,
    )
    return SampleOutput(
        tokens=jnp.concatenate([prompt_BT, best.tokens], axis=1),
        logprobs=best.logprobs,
        mask=jnp.concatenate([mask_BT, best.mask], axis=1),
        done=best.done,
        scores=best.score,
    )


def beam_search(
    cfg: ModelConfig,
    params,
    prompt_BT,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    length_penalty_kind: str = "hf",
    stop_tokens: Sequence[int] = (),
    prompt_mask=None,
    pad_id: int = 0,
) -> SampleOutput:
    """The most likely continuation found by a beam of `num_beams` hypotheses.

    A hypothesis ends at a stop token and then keeps its score; the winner
    maximises `beam.length_normalised(sum(logprobs), length, length_penalty,
    length_penalty_kind)`, the length counting the stop token: "hf" divides by
    length**length_penalty (0 = raw likelihood, which favours short outputs;
    1 = per-token average), "gnmt" by ((5 + length) / 6)**length_penalty.
    """
    prompt_BT, mask_BT = _prepare(cfg, prompt_BT, prompt_mask, max_new_tokens)
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}.")
    beam.check_length_penalty_kind(length_penalty_kind)
    return _beam_search(
        cfg,
        params,
        prompt_BT,
        mask_BT,
        jnp.float32(length_penalty),
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        stop_tokens=tuple(int(x) for x in stop_tokens),
        pad_id=pad_id,
        length_penalty_kind=length_penalty_kind,
    )
