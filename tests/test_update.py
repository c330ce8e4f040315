"""The one update step (`train.make_update`): token-weighted losses under gradient accumulation
for every trainer, and non-finite updates skipped, never applied.

Each trainer's batch has ragged weights (masks whose token counts differ a lot from row to row,
so the strided microbatches hold very different numbers of target tokens). With
`grad_accum_steps` 1, 2 and 4 the loss and every gradient equal the full-batch mean loss of the
trainer's own mean-form function and its `jax.grad` (fp32, 1e-6). Averaging microbatch means,
as the step did before, is off by far more than that on these batches.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.data.tokenizer import Specials
from gptjax.models import family
from gptjax.research import finetune as ft
from gptjax.research import gpt1_tasks
from gptjax.rlhf import ppo, reward, sft
from gptjax.training.step import family_objective, make_update, weighted_loss_and_grads
from tests.rlhf_fixtures import CFG, TOK, params

ACCUM = (1, 2, 4)


def _ragged_mask(b: int, t: int, seed: int) -> np.ndarray:
    """Right-padded (B, T) masks: row i has 1 + (i * 7 + seed) % t ones, so counts differ."""
    lengths = 1 + (np.arange(b) * 7 + seed) % t
    lengths[::4] = 1  # microbatch 0 (rows 0, 4, ...) gets almost nothing
    return (np.arange(t)[None] < lengths[:, None]).astype(np.float32)


def _check_all_accumulations(objective, mean_loss, params_, batch):
    """weighted_loss_and_grads at 1, 2, 4 microbatches equals the mean loss's value and grad."""
    want_loss, want_grads = jax.jit(jax.value_and_grad(mean_loss))(params_, batch)
    fn = jax.jit(functools.partial(weighted_loss_and_grads, objective), static_argnums=2)
    for accum in ACCUM:
        loss, grads, _ = fn(params_, batch, accum)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=f"accum {accum}")
        for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=f"accum {accum}")
    return float(want_loss)


def _mean_of_microbatch_means(mean_loss, params_, batch, accum):
    """What accumulation computed before: the plain average of each microbatch's own mean."""
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), batch)
    return np.mean(
        [
            float(mean_loss(params_, jax.tree.map(lambda x, m=m: x[:, m], micro)))
            for m in range(accum)
        ]
    )


def _assert_mean_of_means_is_off(mean_loss, params_, batch, want):
    """The test can fail: the old mean of 4 microbatch means misses by > 100x the tolerance."""
    assert abs(_mean_of_microbatch_means(mean_loss, params_, batch, 4) - want) > 1e-4 * abs(want)


def test_pretraining_and_sft_loss_is_token_weighted():
    """The decoder objective on SFT-style prompt masks (`sft.make_example`)."""
    rng = np.random.default_rng(0)
    rows = [
        sft.make_example(
            rng.integers(3, 200, 1 + 9 * (i % 4 == 0)).tolist(),
            rng.integers(3, 200, 1 + (5 * i) % 13).tolist(),
            16,
            TOK.pad_id,
        )
        for i in range(8)
    ]
    batch = {
        "tokens": jnp.asarray(np.stack([t for t, _ in rows])),
        "loss_mask": jnp.asarray(np.stack([m for _, m in rows]), jnp.float32),
    }
    mean_loss = functools.partial(family.loss, CFG)
    want = _check_all_accumulations(family_objective(CFG), mean_loss, params(0), batch)
    _assert_mean_of_means_is_off(mean_loss, params(0), batch, want)


def test_reward_model_loss_is_weighted_by_prompts_with_a_pair():
    b, k, t = 8, 3, 12
    mask = _ragged_mask(b * k, t, 1).reshape(b, k, t)
    tokens = np.random.default_rng(1).integers(3, 200, (b, k, t)) * mask
    ranks = np.tile([0, 1, 2], (b, 1))
    valid = np.ones((b, k), np.int32)
    valid[::4, 1:] = 0  # microbatch 0's prompts have one response: no pair, weight 0
    ranks[1::4] = 0  # all ties: no pair either
    batch = {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "mask": jnp.asarray(mask, jnp.int32),
        "ranks": jnp.asarray(ranks),
        "valid": jnp.asarray(valid),
    }
    rm = reward.from_policy(CFG, params(0), jax.random.key(5))
    mean_loss = lambda p, bt: reward.ranking_loss(CFG, p, bt)[0]  # noqa: E731
    want = _check_all_accumulations(reward.ranking_objective(CFG), mean_loss, rm, batch)
    _assert_mean_of_means_is_off(mean_loss, rm, batch, want)


def test_finetune_loss_weighs_examples_and_lm_tokens_separately():
    sp = Specials(pad_id=0, eos_id=1, start_id=4, delimiter_id=5, extract_id=6, mask_id=7)
    rng = np.random.default_rng(2)
    examples = [
        ([rng.integers(10, 200, 12 if i % 4 == 0 else 1).tolist()], i % 2) for i in range(8)
    ]
    batch = gpt1_tasks.make_batch("classification", examples, sp, 16)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    p = {
        "gpt": params(0),
        "head": ft.init_head("classification", CFG.d_model, 2, jax.random.key(3)),
    }
    terms = lambda q, mb: ft.finetune_terms(CFG, q, mb, "classification", 0.5)  # noqa: E731
    mean_loss = lambda q, mb: ft.finetune_loss(CFG, q, mb, "classification", 0.5)[0]  # noqa: E731
    want = _check_all_accumulations(terms, mean_loss, p, batch)
    _assert_mean_of_means_is_off(mean_loss, p, batch, want)


def test_ppo_minibatch_loss_is_token_weighted_with_ptx():
    width, r = 4, 10
    b = 8
    cfg_ppo = ppo.PPOConfig(batch_size=8, minibatches=1, ptx_coef=2.0, vf_coef=0.3)
    rng = np.random.default_rng(4)
    resp_mask = _ragged_mask(b, r, 2)
    mask = np.concatenate([np.ones((b, width)), resp_mask], 1).astype(np.int32)
    tokens = (rng.integers(3, 200, (b, width + r)) * mask).astype(np.int32)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    mb = {
        "tokens": jnp.asarray(tokens),
        "mask": jnp.asarray(mask),
        "resp_mask": jnp.asarray(resp_mask),
        "logprobs": f(b, r) - 5.0,
        "values": f(b, r),
        "advantages": f(b, r),
        "returns": f(b, r),
        "ptx_tokens": jnp.asarray(rng.integers(3, 200, (4, 13)), jnp.int32),
    }
    p = {"policy": params(0), "critic": reward.from_policy(CFG, params(1), jax.random.key(6))}
    terms = functools.partial(ppo.minibatch_terms, CFG, CFG, cfg_ppo, width)
    mean_loss = lambda q, m: ppo.minibatch_loss(CFG, CFG, cfg_ppo, width, q, m)[0]  # noqa: E731
    want = _check_all_accumulations(terms, mean_loss, p, mb)
    _assert_mean_of_means_is_off(mean_loss, p, mb, want)


def test_trainers_thread_grad_accum_steps_into_their_steps():
    """The jitted steps of the reward model and fine-tuning really accumulate: one step with 1
    and with 4 microbatches gives the same loss and gradient norm on a ragged batch."""
    from gptjax.parallel import logical
    from gptjax.parallel import mesh as sharding
    from gptjax.training.step import TrainState

    mesh, rules = sft.stage_mesh(sharding.MeshConfig(shape={"data": 1}))
    b, k, t = 8, 2, 12
    mask = _ragged_mask(b * k, t, 3).reshape(b, k, t)
    batch = {
        "tokens": jnp.asarray(
            np.random.default_rng(7).integers(3, 200, (b, k, t)) * mask, jnp.int32
        ),
        "mask": jnp.asarray(mask, jnp.int32),
        "ranks": jnp.asarray(np.tile([0, 1], (b, 1))),
        "valid": jnp.ones((b, k), jnp.int32),
    }
    out = []
    for accum in (1, 4):
        opt = optax.sgd(0.0)
        rm = jax.device_get(reward.from_policy(CFG, params(0), jax.random.key(5)))
        step, shard = reward.make_train_step(CFG, opt, rm, mesh, rules, grad_accum_steps=accum)
        state = jax.device_put(
            TrainState(
                step=jnp.zeros((), jnp.int32),
                params=rm,
                opt_state=opt.init(rm),
                rng=jax.random.key_data(jax.random.key(0)),
            ),
            shard,
        )
        with logical.use_mesh(mesh, rules):
            _, stats = step(state, batch)
        out.append((float(stats["reward/loss"]), float(stats["reward/grad_norm"])))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)


# ------------------------------------------------------------------------ non-finite updates


def _poisoned_loss(w_ref):
    """Loss sqrt(|w - w_ref|) summed: finite (0) at w = w_ref, its gradient there is not."""

    def objective(p, mb):
        total = jnp.sum(jnp.sqrt(jnp.abs(p["w"] - w_ref)) * mb["x"].sum())
        return {"loss": total}, {"loss": jnp.float32(mb["x"].shape[0])}, {}

    return objective


def test_an_inf_gradient_with_a_finite_loss_is_skipped_not_applied():
    w_ref = jnp.array([1.0, 2.0, 3.0])
    opt = optax.adamw(1e-1)
    update = jax.jit(make_update(_poisoned_loss(w_ref), opt))
    p = {"w": w_ref}  # at w_ref: loss 0, gradient 0/0 and inf
    state = opt.init(p)
    new_p, new_state, m = update(p, state, {"x": jnp.ones((4, 2))})
    assert np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"]))
    assert float(m["update_skipped"]) == 1.0
    np.testing.assert_array_equal(new_p["w"], p["w"])
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)  # Adam's moments and count did not move either
    # Away from the singular point the same step applies.
    p2 = {"w": w_ref + 0.5}
    new_p2, _, m2 = update(p2, opt.init(p2), {"x": jnp.ones((4, 2))})
    assert float(m2["update_skipped"]) == 0.0
    assert not np.allclose(new_p2["w"], p2["w"])
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new_p2))


def test_weights_are_counted_without_running_the_model_twice():
    """The global weights come from a call of the loss whose model outputs jit drops: the
    lowered weights computation holds no matmul."""
    batch = {"tokens": jnp.zeros((4, 9), jnp.int32), "loss_mask": jnp.ones((4, 8))}
    weights_only = jax.jit(lambda p, b: family_objective(CFG)(p, b)[1])
    assert "dot_general" not in weights_only.lower(params(0), batch).as_text()
