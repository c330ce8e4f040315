"""LoRA adapters: exact at init, merged = base + (alpha/r) BA against NumPy, gradients by the
chain rule from the kernel gradient, only adapters updated, and optimizer-state memory."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.config import ModelConfig, get_preset
from gptjax.models import gpt, lora

CFG = ModelConfig(n_layers=2, d_model=16, n_heads=2, d_ff=24, vocab_size=37, max_len=12)
LORA = lora.LoRAConfig(rank=3, alpha=6.0)


def _setup():
    params = gpt.init_params(CFG, jax.random.key(0))
    adapters = lora.init_adapters(LORA, params, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
    return params, adapters, tokens


def _randomize_b(adapters, seed=3):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    )


def _loss(params, tokens):
    logits = gpt.forward(CFG, params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def test_fresh_adapters_leave_the_model_exactly_as_it_was():
    params, adapters, tokens = _setup()
    merged = lora.merge(LORA, params, adapters)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(a, b)
    assert all(float(jnp.abs(x["b"]).max()) == 0 for x in _pairs(adapters))
    assert all(float(jnp.abs(x["a"]).max()) > 0 for x in _pairs(adapters))


def _pairs(adapters):
    return [pair for module in adapters["h"].values() for pair in module.values()]


def test_merged_kernel_is_base_plus_scaled_ba():
    params, adapters, _ = _setup()
    adapters = _randomize_b(adapters)
    merged = lora.merge(LORA, params, adapters)
    for target in LORA.targets:
        module, name = target.split(".")
        w = np.asarray(params["h"][module][name]["kernel"], np.float64)
        pair = {k: np.asarray(v, np.float64) for k, v in adapters["h"][module][name].items()}
        for layer in range(CFG.n_layers):
            ba = (pair["a"][layer] @ pair["b"][layer]).reshape(w.shape[1:])
            expected = w[layer] + LORA.alpha / LORA.rank * ba
            np.testing.assert_allclose(
                merged["h"][module][name]["kernel"][layer], expected, rtol=1e-5, atol=1e-6
            )
        # Everything else (biases, LayerNorms, embeddings) is the base's, untouched.
        np.testing.assert_array_equal(
            merged["h"][module][name]["bias"], params["h"][module][name]["bias"]
        )
    np.testing.assert_array_equal(merged["wte"], params["wte"])


def test_adapter_gradients_follow_from_the_kernel_gradient():
    """d/da = s G b^T and d/db = s a^T G per layer, G the loss's gradient w.r.t. the merged
    kernel (flattened to (in, out)): an independent route to the same numbers."""
    params, adapters, tokens = _setup()
    adapters = _randomize_b(adapters)
    merged = lora.merge(LORA, params, adapters)
    g_merged = jax.grad(_loss)(merged, tokens)
    g_adapters = jax.grad(lambda ad: _loss(lora.merge(LORA, params, ad), tokens))(adapters)
    s = LORA.alpha / LORA.rank
    for target in LORA.targets:
        module, name = target.split(".")
        pair = adapters["h"][module][name]
        g_w = np.asarray(g_merged["h"][module][name]["kernel"], np.float64)
        for layer in range(CFG.n_layers):
            a, b = (np.asarray(pair[k][layer], np.float64) for k in "ab")
            g = g_w[layer].reshape(a.shape[0], b.shape[1])
            got = g_adapters["h"][module][name]
            np.testing.assert_allclose(got["a"][layer], s * g @ b.T, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(got["b"][layer], s * a.T @ g, rtol=1e-4, atol=1e-7)


def test_an_adapter_step_changes_the_model_and_never_the_base():
    params, adapters, tokens = _setup()
    base_before = jax.tree.map(np.array, params)
    opt = optax.adam(1e-2)
    state = opt.init(adapters)
    loss_of = lambda ad: _loss(lora.merge(LORA, params, ad), tokens)
    losses = []
    for _ in range(3):
        loss, grads = jax.value_and_grad(loss_of)(adapters)
        updates, state = opt.update(grads, state)
        adapters = optax.apply_updates(adapters, updates)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_adapter_axes_name_the_kernel_input_and_output():
    axes = lora.adapter_axes(LORA, gpt.param_axes(CFG))
    assert axes["h"]["mlp"]["c_fc"] == {
        "a": ("layers", "embed", None),
        "b": ("layers", None, "mlp"),
    }
    # The out-projection's input is (heads, head_dim): two axes, so a is replicated there.
    assert axes["h"]["attn"]["c_proj"]["a"] == ("layers", None, None)
    assert axes["h"]["attn"]["c_attn"]["b"] == ("layers", None, None)


@pytest.mark.parametrize("preset", ["gpt2_small", "gpt2_xl"])
def test_optimizer_state_memory_from_shapes(preset):
    cfg = get_preset(preset)
    params = jax.eval_shape(lambda: gpt.init_params(cfg, jax.random.key(0)))
    adapters = jax.eval_shape(
        lambda: lora.init_adapters(lora.LoRAConfig(rank=8), params, jax.random.key(0))
    )
    opt = optax.adamw(1e-4)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    # Per layer, rank 8: c_attn 8 (D + 3D), out-proj 8 (D + D), c_fc 8 (D + 4D), c_proj 8 (4D + D).
    n_adapter = cfg.n_layers * 8 * cfg.d_model * (4 + 2 + 5 + 5)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(adapters)) == n_adapter
    full, small = (lora.optimizer_state_bytes(opt, t) for t in (params, adapters))
    # Adam keeps two float32 moments per parameter (plus a step counter).
    assert abs(full - 8 * n_params) <= 16 and abs(small - 8 * n_adapter) <= 16
    assert full / small > 90
