"""PPO: rollouts scored consistently with the sampler, KL 0 at the start, ratio 1 at the first
minibatch, the no-stop penalty, and the KL controllers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.optimizer import OptimizerConfig
from gptjax.rlhf import chat, losses, ppo, reward, sft
from gptjax.sharding import MeshConfig

TOK = ByteTokenizer()
CFG = ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=TOK.vocab_size, max_len=40)
PPO = ppo.PPOConfig(batch_size=4, minibatches=2, epochs=2, max_new_tokens=7, temperature=1.0)
PROMPTS = [[72, 105], [1, 2, 3, 4, 5], [9], [40, 41, 42]]


@pytest.fixture(scope="module")
def models():
    policy = model.init_params(CFG, jax.random.key(0))
    rm = reward.from_policy(CFG, model.init_params(CFG, jax.random.key(1)), jax.random.key(2))
    norm = reward.identity_norm()
    return {"policy": policy, "ref": jax.tree.map(jnp.copy, policy), "rm": rm, "norm": norm,
            "critic": ppo.critic_from_reward(rm, norm)}


def _rollout(models, width, temperature=1.0):
    return chat.generate_replies(CFG, models["policy"], TOK, PROMPTS, width, key=jax.random.key(3),
                                 max_new_tokens=PPO.max_new_tokens, temperature=temperature)


@functools.lru_cache
def _experience_fn(width, cfg=PPO):
    return jax.jit(functools.partial(ppo.make_experience, CFG, CFG, cfg, width))


def test_recomputed_logprobs_equal_the_samplers(models):
    out = _rollout(models, width=6)
    fn = jax.jit(functools.partial(ppo.policy_outputs, CFG), static_argnums=(3, 4))
    logp, _ = fn(models["policy"], out["tokens"], out["mask"], 6, 1.0)
    m = out["mask"][:, 6:] != 0
    np.testing.assert_allclose(np.where(m, logp, 0), out["logprobs"], atol=2e-5)


def test_left_padding_does_not_change_the_experience(models):
    out = _rollout(models, width=5)
    extra = 3  # the same rollouts with three more pad slots on the left
    tokens = np.pad(out["tokens"], ((0, 0), (extra, 0)), constant_values=TOK.pad_id)
    mask = np.pad(out["mask"], ((0, 0), (extra, 0)))
    a, sa = _experience_fn(5)(models, out["tokens"], out["mask"], out["done"], 0.1)
    b, sb = _experience_fn(5 + extra)(models, tokens, mask, out["done"], 0.1)
    for k in ("logprobs", "values", "advantages", "returns"):
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)
    for k in ("objective/scores", "objective/kl"):
        assert float(sa[k]) == pytest.approx(float(sb[k]), abs=2e-5)


def test_kl_is_zero_before_the_first_update_and_no_stop_is_penalised(models):
    out = _rollout(models, width=5)
    _, stats = _experience_fn(5)(models, out["tokens"], out["mask"], out["done"], 0.1)
    assert float(stats["objective/kl"]) == 0.0
    # A random byte model rarely emits the end-of-turn byte: force one row done, one not.
    done = np.array([True, False, True, False])
    exp, stats = _experience_fn(5)(models, out["tokens"], out["mask"], done, 0.0)
    rm = jax.jit(functools.partial(reward.scores, CFG))(models["rm"], models["norm"],
                                                         out["tokens"], out["mask"])
    want = np.where(done, rm, PPO.no_stop_penalty).mean()
    assert float(stats["objective/scores"]) == pytest.approx(float(want), rel=1e-5)


def test_first_minibatch_has_ratio_1_and_the_update_moves_the_policy(models):
    mesh, rules = sft.stage_mesh(MeshConfig(shape={"data": 1}))
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=0, decay="constant")
    fns = ppo.make_ppo(CFG, CFG, PPO, opt, 5, mesh, rules)
    state = ppo.init_state(fns, models["policy"], models["critic"], 0)
    batch = _rollout(models, width=5)
    frozen = {k: models[k] for k in ("ref", "rm", "norm")}
    state, stats = ppo.iteration(fns, state, frozen, 0.1, batch, None)
    assert stats["policy/ratio_mean/first_minibatch"] == pytest.approx(1.0, abs=1e-5)
    assert stats["policy/approxkl/first_minibatch"] < 1e-9
    assert stats["policy/clipfrac/first_minibatch"] == 0.0
    assert stats["val/clipfrac/first_minibatch"] == 0.0
    assert stats["policy/approxkl"] > 0  # later minibatches see a moved policy
    # The reference stayed frozen: policy and reference now differ, so KL > 0 somewhere.
    _, after = _experience_fn(5)(frozen | {"policy": state.params["policy"],
                                           "critic": state.params["critic"]},
                                 batch["tokens"], batch["mask"], batch["done"], 0.1)
    assert abs(float(after["objective/kl"])) > 0


def test_ptx_loss_is_added_when_enabled(models):
    cfg = ppo.PPOConfig(batch_size=4, minibatches=2, epochs=1, max_new_tokens=7, ptx_coef=2.0)
    mesh, rules = sft.stage_mesh(MeshConfig(shape={"data": 1}))
    opt = OptimizerConfig(peak_lr=1e-3, warmup_steps=0, decay="constant")
    fns = ppo.make_ppo(CFG, CFG, cfg, opt, 5, mesh, rules)
    state = ppo.init_state(fns, models["policy"], models["critic"], 0)
    ptx = np.random.default_rng(0).integers(0, 256, size=(1, 2, 3, 9)).astype(np.int32)
    frozen = {k: models[k] for k in ("ref", "rm", "norm")}
    _, stats = ppo.iteration(fns, state, frozen, 0.1, _rollout(models, 5), ptx)
    assert stats["ptx/loss"] > 0


def test_adaptive_kl_controller_follows_its_formula():
    cfg = ppo.PPOConfig(kl_coef=0.1, kl_target=2.0, kl_horizon=100, adaptive_kl=True)
    ctl, beta = cfg.controller(), cfg.controller().init()
    want = 0.1
    for kl in (0.0, 1.0, 2.0, 2.2, 10.0):
        beta = ctl.update(beta, kl, 16)
        want *= 1 + np.clip(kl / 2.0 - 1, -0.2, 0.2) * 16 / 100
        assert float(beta) == pytest.approx(want, rel=1e-6)
    fixed = ppo.PPOConfig(kl_coef=0.1, adaptive_kl=False).controller()
    assert float(fixed.update(fixed.init(), 10.0, 16)) == pytest.approx(0.1)


def test_config_errors():
    with pytest.raises(ValueError, match="divisible"):
        ppo.PPOConfig(batch_size=10, minibatches=4)
    with pytest.raises(ValueError, match="temperature"):
        ppo.PPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="kind"):
        losses.kl_estimate(jnp.zeros(2), jnp.zeros(2), "k9")
