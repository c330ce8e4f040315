"""Numbers, not shapes: schedule values, the decay mask, one AdamW step vs numpy, accumulation."""

import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.training import optimizer as opt

PEAK = 6e-4


def _cfg(**kw):
    base = dict(peak_lr=PEAK, warmup_steps=100, decay="cosine", min_lr_ratio=0.1)
    base.update(kw)
    return opt.OptimizerConfig(**base)


def test_cosine_schedule_values():
    sched = opt.make_schedule(_cfg(), total_steps=1100)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(sched(50), PEAK / 2, rtol=1e-6)
    np.testing.assert_allclose(sched(100), PEAK, rtol=1e-6)
    # Cosine by hand: lr = min + (peak - min) * (1 + cos(pi * t)) / 2, t = fraction of decay.
    for step in (350, 600, 850):
        t = (step - 100) / 1000
        want = 0.1 * PEAK + 0.9 * PEAK * (1 + math.cos(math.pi * t)) / 2
        np.testing.assert_allclose(sched(step), want, rtol=1e-5)
    np.testing.assert_allclose(sched(600), 0.55 * PEAK, rtol=1e-5)  # halfway: mean of ends
    np.testing.assert_allclose(sched(1100), 0.1 * PEAK, rtol=1e-5)
    np.testing.assert_allclose(sched(5000), 0.1 * PEAK, rtol=1e-5)  # holds after the end


def test_linear_constant_and_decay_steps():
    lin = opt.make_schedule(_cfg(decay="linear"), total_steps=1100)
    np.testing.assert_allclose(lin(600), 0.55 * PEAK, rtol=1e-5)
    np.testing.assert_allclose(lin(1100), 0.1 * PEAK, rtol=1e-5)
    const = opt.make_schedule(_cfg(decay="constant"), total_steps=1100)
    np.testing.assert_allclose(
        [const(50), const(100), const(1100)], [PEAK / 2, PEAK, PEAK], rtol=1e-6
    )
    # GPT-3: decay over 260B of 300B tokens, then hold at 10%.
    early = opt.make_schedule(_cfg(decay_steps=600), total_steps=1100)
    np.testing.assert_allclose(
        [early(350), early(600), early(1000)], [0.55 * PEAK, 0.1 * PEAK, 0.1 * PEAK], rtol=1e-5
    )
    nowarm = opt.make_schedule(_cfg(warmup_steps=0), total_steps=1000)
    np.testing.assert_allclose([nowarm(0), nowarm(1000)], [PEAK, 0.1 * PEAK], rtol=1e-5)


def test_schedule_bad_inputs():
    with pytest.raises(ValueError, match="decay must be"):
        opt.OptimizerConfig(decay="exp")


def test_a_run_shorter_than_its_warmup_warms_up_over_what_it_has(caplog):
    """A 5-step smoke test of a config with warmup 715 starts (one warning), rising to the peak."""
    with caplog.at_level("WARNING"):
        sched = opt.make_schedule(_cfg(warmup_steps=715), total_steps=5)
    assert sum("warming up over the first 5 steps" in r.getMessage() for r in caplog.records) == 1
    lrs = [float(sched(s)) for s in range(6)]
    np.testing.assert_allclose(lrs, [PEAK * s / 5 for s in range(6)], rtol=1e-6)


def test_config_is_gin_configurable():
    gin.clear_config()
    try:
        gin.parse_config("OptimizerConfig.peak_lr = 3e-4\nOptimizerConfig.clip_norm = None")
        cfg = opt.OptimizerConfig()
        assert cfg.peak_lr == 3e-4 and cfg.clip_norm is None and cfg.b2 == 0.95
    finally:
        gin.clear_config()


def _stacked_params(L=3, D=5, V=11, T=7):
    z = lambda *s: jnp.zeros(s)
    lin = lambda i, o: {"kernel": z(L, i, o), "bias": z(L, o)}
    ln = lambda *lead: {"scale": z(*lead, D), "bias": z(*lead, D)}
    return {
        "wte": z(V, D),
        "wpe": z(T, D),
        "ln_f": ln(),
        "h": {
            "ln_1": ln(L),
            "ln_2": ln(L),
            "attn": {"c_attn": lin(D, 3 * D), "c_proj": lin(D, D)},
            "mlp": {"c_fc": lin(D, 4 * D), "c_proj": lin(4 * D, D)},
        },
    }


def test_weight_decay_mask_on_stacked_tree():
    mask = opt.weight_decay_mask(_stacked_params())
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, m in flat.items() if m)
    assert decayed == sorted(
        [
            "['wte']",
            "['wpe']",
            "['h']['attn']['c_attn']['kernel']",
            "['h']['attn']['c_proj']['kernel']",
            "['h']['mlp']['c_fc']['kernel']",
            "['h']['mlp']['c_proj']['kernel']",
        ]
    )
    # The per-layer LayerNorm scales are 2-D (L, D) and 1-D biases are (L, D) too: not decayed.
    assert not flat["['h']['ln_1']['scale']"] and not flat["['h']['mlp']['c_fc']['bias']"]
    # Works on abstract params (what optax sees under jit).
    abstract = jax.eval_shape(lambda: _stacked_params())
    assert jax.tree.leaves(opt.weight_decay_mask(abstract)) == jax.tree.leaves(mask)


def _numpy_adamw(p, g, lr, b1, b2, eps, wd, decay):
    """PyTorch-style AdamW, first step (t=1), on numpy float64."""
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    mhat, vhat = m / (1 - b1), v / (1 - b2)
    p = p * (1 - lr * wd) if decay else p
    return p - lr * mhat / (np.sqrt(vhat) + eps)


def test_one_adamw_step_matches_numpy():
    rng = np.random.default_rng(0)
    params = {
        "wte": rng.normal(size=(7, 3)),
        "h": {
            "ln_1": {"scale": rng.normal(size=(2, 3))},
            "c_fc": {"kernel": rng.normal(size=(2, 3, 5)), "bias": rng.normal(size=(2, 5))},
        },
    }
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape) * 1e-2, params)
    params32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
    # warmup 0 and a constant schedule: the first update uses the peak lr; big clip = no clip.
    cfg = _cfg(warmup_steps=0, decay="constant", peak_lr=1e-2, weight_decay=0.1, clip_norm=1e6)
    tx = opt.make_optimizer(cfg, total_steps=10)
    updates, _ = tx.update(grads32, tx.init(params32), params32)
    new = jax.tree.map(lambda p, u: p + u, params32, updates)
    mask = opt.weight_decay_mask(params)
    want = jax.tree.map(
        lambda p, g, d: _numpy_adamw(p, g, 1e-2, 0.9, 0.95, 1e-8, 0.1, d), params, grads, mask
    )
    for got, exp in zip(jax.tree.leaves(new), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-7)
    # Decay really applied to the kernel and not to the scale: differs from the no-decay answer.
    no_decay = _numpy_adamw(
        params["h"]["c_fc"]["kernel"],
        grads["h"]["c_fc"]["kernel"],
        1e-2,
        0.9,
        0.95,
        1e-8,
        0.0,
        False,
    )
    assert np.abs(np.asarray(new["h"]["c_fc"]["kernel"]) - no_decay).max() > 1e-4


def _adam_mu(state):
    return [
        s.mu for s in jax.tree.leaves(state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")
    ][0]


def test_clipping_kicks_in_above_clip_norm():
    """The Adam moments see the clipped gradient: mu = (1 - b1) * g * min(1, clip / norm)."""
    grads = {"a": jnp.full((4,), 3.0), "b": {"kernel": jnp.full((2, 2), 4.0)}}  # norm sqrt(100)
    np.testing.assert_allclose(optax.tree.norm(grads), 10.0, rtol=1e-6)
    params = jax.tree.map(jnp.zeros_like, grads)
    # (clip, factor): clipped to norm 1; norm 10 < clip 20 untouched; clipping off.
    for clip_norm, factor in ((1.0, 0.1), (20.0, 1.0), (None, 1.0), (0.0, 1.0)):
        tx = opt.make_optimizer(_cfg(clip_norm=clip_norm), total_steps=1000)
        _, state = tx.update(grads, tx.init(params), params)
        mu = _adam_mu(state)
        np.testing.assert_allclose(mu["a"], 0.1 * 3.0 * factor, rtol=1e-6)
        np.testing.assert_allclose(mu["b"]["kernel"], 0.1 * 4.0 * factor, rtol=1e-6)


def test_batch_ramp():
    seq, full = 1024, 2**19  # GPT-3 Small: 0.5M tokens = 512 sequences of 1024
    off = opt.OptimizerConfig()
    assert opt.batch_size_at(0, off, full, seq) == 512
    cfg = opt.OptimizerConfig(batch_ramp_tokens=4_000_000_000, batch_ramp_start=32768)
    assert opt.batch_size_at(0, cfg, full, seq) == 32  # 32k tokens
    # Halfway: (32768 + 524288) / 2 tokens = 278528 tokens = 272 sequences.
    assert opt.batch_size_at(2_000_000_000, cfg, full, seq) == 272
    assert opt.batch_size_at(4_000_000_000, cfg, full, seq) == 512
    assert opt.batch_size_at(10**12, cfg, full, seq) == 512
    # Never below one sequence, even when the start is smaller than a sequence.
    tiny = opt.OptimizerConfig(batch_ramp_tokens=1000, batch_ramp_start=10)
    assert opt.batch_size_at(0, tiny, 64 * 16, 64) == 1
    sizes = [opt.batch_size_at(t, cfg, full, seq) for t in range(0, 5_000_000_000, 10**8)]
    assert sizes == sorted(sizes)  # monotone
