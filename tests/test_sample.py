"""gptjax.inference.sampling: filters on hand-made distributions, the cached loop against a
naive no-cache loop, sampling frequencies, stop tokens and exhaustive beam search."""

import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import ModelConfig
from gptjax.inference import beam
from gptjax.inference import sampling as sample
from gptjax.models import gpt as model

CFG = ModelConfig(n_layers=2, d_model=24, n_heads=3, d_ff=40, vocab_size=31, max_len=40)


@pytest.fixture(scope="module")
def params():
    p = model.init_params(CFG, jax.random.key(0))
    # Sharper distributions than init gives, so greedy choices are far from ties.
    return {**p, "wte": p["wte"] * 40}


def test_top_k_filter():
    logits = jnp.array([[1.0, 3.0, 2.0, 5.0], [4.0, 4.0, 1.0, 0.0]])
    out = sample.top_k_filter(logits, 2)
    np.testing.assert_array_equal(out, [[-np.inf, 3, -np.inf, 5], [4, 4, -np.inf, -np.inf]])


def test_top_p_filter():
    probs = jnp.array([[0.05, 0.5, 0.15, 0.3]])
    logits = jnp.log(probs)
    keep = lambda p: np.isfinite(np.asarray(sample.top_p_filter(logits, p)))[0].tolist()
    assert keep(0.7) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert keep(0.5) == [False, True, False, False]  # the top token alone has 0.5
    assert keep(0.1) == [False, True, False, False]  # the top token is always kept
    assert keep(0.96) == [True, True, True, True]
    assert keep(0.9) == [False, True, True, True]


def test_repetition_penalty_is_sign_aware():
    logits = jnp.array([[2.0, -2.0, 1.0, -1.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(
        sample.apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 1.0, -1.0]]
    )


def _naive_greedy(params, tokens, mask, steps):
    """No cache: rescore the whole (left-padded) sequence at every step."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    for _ in range(steps):
        logits = model.forward(CFG, params, tokens, mask=mask)
        nxt = np.asarray(jnp.argmax(logits[:, -1], -1))[:, None]
        tokens, mask = (
            np.concatenate([tokens, nxt], 1),
            np.concatenate([mask, mask[:, -1:] * 0 + 1], 1),
        )
    return tokens


def test_left_pad_to_fixed_width():
    tokens, mask = sample.left_pad([[5, 6], [1, 2, 3, 4]], pad_id=0, width=3)
    np.testing.assert_array_equal(tokens, [[0, 5, 6], [2, 3, 4]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="empty"):
        sample.left_pad([[]], width=3)


def test_cached_greedy_equals_naive_loop_with_ragged_prompts(params):
    tokens, mask = sample.left_pad([[3, 7, 1, 9, 4], [8, 2], [5, 5, 6]])
    out = sample.generate(
        CFG, params, tokens, prompt_mask=mask, key=jax.random.key(0), max_new_tokens=8, greedy=True
    )
    np.testing.assert_array_equal(out.tokens, _naive_greedy(params, tokens, mask, 8))
    # Each row generates what it generates alone (no padding).
    for i, prompt in enumerate([[3, 7, 1, 9, 4], [8, 2], [5, 5, 6]]):
        alone = sample.generate(
            CFG, params, np.array([prompt]), key=jax.random.key(0), max_new_tokens=8, greedy=True
        )
        np.testing.assert_array_equal(out.tokens[i, 5:], alone.tokens[0, len(prompt) :])


def test_logprobs_equal_forward_scoring(params):
    tokens, mask = sample.left_pad([[3, 7, 1, 9], [8, 2]])
    out = sample.generate(
        CFG,
        params,
        tokens,
        prompt_mask=mask,
        key=jax.random.key(1),
        max_new_tokens=6,
        temperature=0.7,
        top_k=10,
    )
    logp = jax.nn.log_softmax(model.forward(CFG, params, out.tokens, mask=out.mask), -1)
    expected = jnp.take_along_axis(logp[:, 3:-1], out.tokens[:, 4:, None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, expected, rtol=1e-4, atol=1e-5)


def test_seed_reproduces_and_seeds_differ(params):
    prompt = np.array([[1, 2, 3]] * 4)
    a = sample.generate(
        CFG, params, prompt, key=jax.random.key(7), max_new_tokens=12, temperature=20.0
    )
    b = sample.generate(
        CFG, params, prompt, key=jax.random.key(7), max_new_tokens=12, temperature=20.0
    )
    c = sample.generate(
        CFG, params, prompt, key=jax.random.key(8), max_new_tokens=12, temperature=20.0
    )
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_sampling_frequencies_follow_the_filtered_distribution():
    cfg = CFG.replace(vocab_size=7)
    p = model.init_params(cfg, jax.random.key(3))
    p = {**p, "wte": p["wte"] * 60}
    prompt = np.full((4000, 2), 3)
    logits = model.forward(cfg, p, prompt[:1])[0, -1]
    for kw in (dict(temperature=0.8), dict(temperature=1.3, top_k=3), dict(top_p=0.8)):
        out = sample.generate(cfg, p, prompt, key=jax.random.key(0), max_new_tokens=1, **kw)
        filtered = sample.process_logits(
            logits[None],
            jnp.zeros((1, 7), bool),
            temperature=kw.get("temperature", 1.0),
            top_k=kw.get("top_k"),
            top_p=kw.get("top_p"),
            repetition_penalty=1.0,
            banned_ids=(),
        )
        expected = np.asarray(jax.nn.softmax(filtered[0]))
        freq = np.bincount(np.asarray(out.tokens[:, -1]), minlength=7) / len(prompt)
        np.testing.assert_allclose(freq, expected, atol=0.03, err_msg=str(kw))
        assert np.all(freq[expected == 0] == 0)


def test_stop_tokens_end_rows(params):
    prompt = np.array([[4, 9, 1], [2, 2, 8]])
    free = sample.generate(
        CFG, params, prompt, key=jax.random.key(0), max_new_tokens=10, greedy=True
    )
    stop = int(free.tokens[0, 5])  # the third generated token of row 0
    out = sample.generate(
        CFG,
        params,
        prompt,
        key=jax.random.key(0),
        max_new_tokens=10,
        greedy=True,
        stop_tokens=(stop,),
        pad_id=0,
    )
    first = int(np.argmax(np.asarray(free.tokens[0, 3:]) == stop))
    np.testing.assert_array_equal(out.tokens[0, : 3 + first + 1], free.tokens[0, : 3 + first + 1])
    assert np.all(np.asarray(out.tokens[0, 3 + first + 1 :]) == 0)
    assert np.all(np.asarray(out.mask[0, 3 + first + 1 :]) == 0) and bool(out.done[0])
    assert np.all(np.asarray(out.logprobs[0, first + 1 :]) == 0)


def test_banned_ids_never_appear(params):
    prompt = np.array([[1, 2, 3]] * 8)
    banned = tuple(range(0, 31, 2))
    out = sample.generate(
        CFG, params, prompt, key=jax.random.key(0), max_new_tokens=10, banned_ids=banned
    )
    assert not np.isin(np.asarray(out.tokens[:, 3:]), banned).any()


def test_repetition_penalty_changes_greedy_choices(params):
    prompt = np.array([[1, 2, 3]])
    plain = sample.generate(
        CFG, params, prompt, key=jax.random.key(0), max_new_tokens=20, greedy=True
    )
    penal = sample.generate(
        CFG,
        params,
        prompt,
        key=jax.random.key(0),
        max_new_tokens=20,
        greedy=True,
        repetition_penalty=50.0,
    )
    n_unique = lambda t: len(set(np.asarray(t)[0, 3:].tolist()))
    assert n_unique(penal.tokens) > n_unique(plain.tokens)


def test_beam_of_one_is_greedy(params):
    tokens, mask = sample.left_pad([[3, 7, 1, 9], [8, 2]])
    greedy = sample.generate(
        CFG, params, tokens, prompt_mask=mask, key=jax.random.key(0), max_new_tokens=7, greedy=True
    )
    beam = sample.beam_search(
        CFG, params, tokens, prompt_mask=mask, num_beams=1, max_new_tokens=7, length_penalty=0.0
    )
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)


def test_length_penalty_kinds_by_hand():
    score, length = jnp.array([-6.0, -6.0, -3.0]), jnp.array([1, 3, 7])
    for alpha in (0.0, 0.6, 1.0, 2.0):
        hf = [s / n**alpha for s, n in zip([-6.0, -6.0, -3.0], [1, 3, 7])]
        gnmt = [s / ((5 + n) / 6) ** alpha for s, n in zip([-6.0, -6.0, -3.0], [1, 3, 7])]
        np.testing.assert_allclose(beam.length_normalised(score, length, alpha), hf, rtol=1e-6)
        np.testing.assert_allclose(
            beam.length_normalised(score, length, alpha, "gnmt"), gnmt, rtol=1e-6
        )
    # GNMT at alpha = 0 is the raw likelihood (as is HF's).
    np.testing.assert_array_equal(beam.length_normalised(score, length, 0.0, "gnmt"), score)
    with pytest.raises(ValueError, match="length_penalty_kind must be 'hf'.*'gnmt'.*'wu'"):
        beam.length_normalised(score, length, 1.0, "wu")


# (kind, alpha) for the exhaustive comparison; at alpha 1 and 2 the two kinds pick different
# optima on some row, so a beam search that ignored the kind would fail.
PENALTIES = [("hf", 0.0), ("gnmt", 0.0), ("hf", 1.0), ("gnmt", 1.0), ("hf", 2.0), ("gnmt", 2.0)]


def _all_continuations(cfg, p, prompt_T, n_new, stop, pad):
    """Every continuation of `n_new` tokens, cut after the first `stop` (pad after it),
    scored by one full forward pass: (prompt + tokens, summed log-prob, length)."""
    seqs = np.array(
        [list(prompt_T) + list(c) for c in itertools.product(range(cfg.vocab_size), repeat=n_new)]
    )
    t = len(prompt_T)
    logp = jax.nn.log_softmax(model.forward(cfg, p, seqs), -1)
    tok_lp = np.asarray(jnp.take_along_axis(logp[:, t - 1 : -1], seqs[:, t:, None], -1)[..., 0])
    is_stop = seqs[:, t:] == stop
    length = np.where(is_stop.any(1), is_stop.argmax(1) + 1, n_new)
    kept = np.arange(n_new)[None] < length[:, None]
    seqs[:, t:] = np.where(kept, seqs[:, t:], pad)
    return seqs, np.where(kept, tok_lp, 0.0).sum(1), length


def test_wide_beam_finds_the_exhaustive_optimum_under_each_length_penalty():
    cfg = CFG.replace(vocab_size=5)
    p = model.init_params(cfg, jax.random.key(2))
    p = {**p, "wte": p["wte"] * 2}  # soft enough that stopping early sometimes wins
    prompt = np.array([[1, 3], [4, 0]])
    rows = [_all_continuations(cfg, p, prompt[b], 3, 2, 0) for b in range(2)]
    best, ended_early = {}, 0
    for kind, alpha in PENALTIES:
        # K = V**(n_new - 1): no prefix is ever pruned, so the beam must find the optimum.
        out = sample.beam_search(
            cfg,
            p,
            prompt,
            num_beams=25,
            max_new_tokens=3,
            stop_tokens=(2,),
            length_penalty=alpha,
            length_penalty_kind=kind,
        )
        for b, (seqs, total, length) in enumerate(rows):
            penalty = length**alpha if kind == "hf" else ((5 + length) / 6) ** alpha
            i = int(np.argmax(total / penalty))
            np.testing.assert_array_equal(out.tokens[b], seqs[i], err_msg=f"{kind} {alpha} {b}")
            np.testing.assert_allclose(out.scores[b], total[i] / penalty[i], rtol=1e-5)
            best[kind, alpha, b], ended_early = tuple(seqs[i]), ended_early + int(length[i] < 3)
        if alpha == 0.0:  # raw likelihood: at least as likely as the greedy continuation
            greedy = sample.generate(
                cfg,
                p,
                prompt,
                key=jax.random.key(0),
                max_new_tokens=3,
                greedy=True,
                stop_tokens=(2,),
            )
            assert np.all(np.asarray(out.scores) >= np.asarray(greedy.scores) - 1e-6)
    assert 0 < ended_early < 2 * len(PENALTIES), "optima should end early and run full length"
    assert any(best["hf", a, b] != best["gnmt", a, b] for a in (1.0, 2.0) for b in range(2)), (
        "the two kinds should pick different optima somewhere, or this test cannot tell them apart"
    )


def test_beam_search_stops_and_pads():
    cfg = CFG.replace(vocab_size=5)
    p = model.init_params(cfg, jax.random.key(5))
    p = {**p, "wte": p["wte"] * 30}
    out = sample.beam_search(
        cfg,
        p,
        np.array([[1, 3]]),
        num_beams=3,
        max_new_tokens=6,
        stop_tokens=(2,),
        length_penalty=1.0,
    )
    gen = np.asarray(out.tokens[0, 2:])
    if 2 in gen.tolist():
        end = gen.tolist().index(2)
        assert np.all(gen[end + 1 :] == 0) and bool(out.done[0])
        assert np.asarray(out.mask[0, 2:]).sum() == end + 1
    np.testing.assert_allclose(
        out.scores[0],
        float(out.logprobs[0].sum()) / float(np.asarray(out.mask[0, 2:]).sum()),
        rtol=1e-5,
    )


def test_bad_inputs_raise_clear_errors(params):
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        sample.generate(
            CFG, params, np.zeros((1, 35), np.int32), key=jax.random.key(0), max_new_tokens=10
        )
    with pytest.raises(ValueError, match="left-padded"):
        sample.generate(
            CFG,
            params,
            np.array([[1, 2, 0]]),
            prompt_mask=np.array([[1, 1, 0]]),
            key=jax.random.key(0),
            max_new_tokens=2,
        )
    with pytest.raises(ValueError, match="token ids must lie"):
        sample.generate(CFG, params, np.array([[1, 99]]), key=jax.random.key(0), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        sample.generate(
            CFG, params, np.array([[1]]), key=jax.random.key(0), max_new_tokens=2, top_p=1.5
        )
    with pytest.raises(ValueError, match="length_penalty_kind must be 'hf'"):
        sample.beam_search(
            CFG, params, np.array([[1]]), num_beams=2, max_new_tokens=2, length_penalty_kind="GNMT"
        )
    with pytest.raises(ValueError, match="greedy=True"):
        sample.generate(
            CFG, params, np.array([[1]]), key=jax.random.key(0), max_new_tokens=2, temperature=0.0
        )


def test_argmax_equals_jnp_argmax_with_ties_and_nans():
    x = np.random.default_rng(0).integers(0, 4, (200, 9)).astype(np.float32)  # many ties
    x[3, 5] = x[7, 0] = x[7, 4] = np.nan
    np.testing.assert_array_equal(sample.argmax(jnp.asarray(x)), np.argmax(x, axis=-1))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_loop_moves_no_cache_sized_array(scan_layers):
    """Each decode step writes one slot of the KV cache in place: inside the loop nothing
    but the in-place update (and, scanned, the read of the layer's slice of the stacked
    buffer) produces an array as big as one layer's cache. Slicing layers out of a stacked
    cache and restacking them copied it whole three times a step."""
    cfg = ModelConfig(
        n_layers=2, d_model=8, n_heads=2, d_ff=8, vocab_size=31, max_len=32, scan_layers=scan_layers
    )
    b, t, new = 4, 2, 30
    layer_cache = b * cfg.n_heads * (t + new) * cfg.head_dim  # 1024; every weight is smaller
    params = model.init_params(cfg, jax.random.key(0))
    hlo = (
        sample._sample.lower(
            cfg,
            params,
            jnp.ones((b, t), jnp.int32),
            jnp.ones((b, t), jnp.int32),
            jax.random.key(0),
            jnp.float32(1),
            jnp.float32(1),
            jnp.float32(1),
            max_new_tokens=new,
            top_k=None,
            use_top_p=False,
            greedy=True,
            stop_tokens=(),
            banned_ids=(),
            pad_id=0,
        )
        .compile()
        .as_text()
    )
    moved = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \w+\[([\d,]*)\]\S* ([\w-]+)\(", line)
        if not m or "while/body" not in line or not m.group(2):
            continue
        name, dims, op = m.groups()
        free = ("dynamic-update-slice", "bitcast", "get-tuple-element", "parameter")
        in_place = op in free or "dynamic-update-slice" in name
        in_place |= scan_layers and "dynamic-slice" in op + name
        if math.prod(map(int, dims.split(","))) >= layer_cache and not in_place:
            moved.append(f"{name} = {op}[{dims}]")
    assert not moved, moved


def test_generation_works_under_x64(params):
    """Cache indices keep one dtype when Python ints become int64 (jax_enable_x64)."""
    prompt = np.array([[3, 4, 5]], np.int32)
    want = sample.generate(
        CFG, params, prompt, key=jax.random.key(0), max_new_tokens=4, greedy=True
    )
    with jax.enable_x64(True):
        got = sample.generate(
            CFG, params, prompt, key=jax.random.key(0), max_new_tokens=4, greedy=True
        )
    np.testing.assert_array_equal(got.tokens, want.tokens)
