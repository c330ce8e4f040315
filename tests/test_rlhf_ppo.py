"""PPO: rollouts scored consistently with the sampler, KL 0 at the start, ratio 1 at the first
minibatch, the no-stop penalty, PPO-ptx, and the KL controllers.

One set of jitted PPO functions (built once, PPO-ptx on) and one scored rollout serve the whole
module: compiling the update is most of these tests' time. The plain-PPO path (no ptx) has the
same first-minibatch checks in test_rlhf_pipeline.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.parallel.mesh import MeshConfig
from gptjax.rlhf import chat, losses, ppo, reward, sft
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import loss_fn
from tests.rlhf_fixtures import CFG, TOK, params

WIDTH = 5
PPO = ppo.PPOConfig(
    batch_size=4,
    minibatches=2,
    epochs=2,
    max_new_tokens=7,
    temperature=1.0,
    ptx_coef=2.0,
    ptx_batch_size=3,
)
PROMPTS = [[72, 105], [1, 2, 3, 4, 5], [9], [40, 41, 42]]


@pytest.fixture(scope="module")
def fns():
    mesh, rules = sft.stage_mesh(MeshConfig(shape={"data": 1}))
    opt = OptimizerConfig(peak_lr=1e-2, warmup_steps=0, decay="constant")
    return ppo.make_ppo(CFG, CFG, PPO, opt, WIDTH, mesh, rules)


@pytest.fixture(scope="module")
def models(fns):
    """Policy, reference, RM and critic, placed as the PPO driver places them (one compile)."""
    shard = fns.state_shardings.params
    policy = params(0)
    rm = reward.from_policy(CFG, params(1), jax.random.key(2))
    norm = reward.identity_norm()
    put = lambda tree, s: jax.device_put(jax.device_get(tree), s)  # noqa: E731
    return {
        "policy": put(policy, shard["policy"]),
        "ref": put(policy, shard["policy"]),
        "rm": put(rm, shard["critic"]),
        "norm": put(norm, fns.state_shardings.step),
        "critic": put(ppo.critic_from_reward(rm, norm), shard["critic"]),
    }


@pytest.fixture(scope="module")
def batch(models):
    """Replies of the policy to PROMPTS, left-padded to WIDTH."""
    return chat.generate_replies(
        CFG,
        models["policy"],
        TOK,
        PROMPTS,
        WIDTH,
        key=jax.random.key(3),
        max_new_tokens=PPO.max_new_tokens,
        temperature=PPO.temperature,
    )


@pytest.fixture(scope="module")
def scored(fns, models, batch):
    return fns.experience(models, batch["tokens"], batch["mask"], batch["done"], 0.1)


def test_recomputed_logprobs_equal_the_samplers(batch, scored):
    exp, _ = scored
    valid = batch["mask"][:, WIDTH:] != 0
    assert valid.sum() > len(PROMPTS)  # the replies have tokens to compare
    np.testing.assert_allclose(np.where(valid, exp["logprobs"], 0), batch["logprobs"], atol=2e-5)


def test_left_padding_does_not_change_the_experience(models, batch, scored):
    extra = 3  # the same rollouts with three more pad slots on the left
    tokens = np.pad(batch["tokens"], ((0, 0), (extra, 0)), constant_values=TOK.pad_id)
    mask = np.pad(batch["mask"], ((0, 0), (extra, 0)))
    wide = jax.jit(functools.partial(ppo.make_experience, CFG, CFG, PPO, WIDTH + extra))
    (a, sa), (b, sb) = scored, wide(models, tokens, mask, batch["done"], 0.1)
    for k in ("logprobs", "values", "advantages", "returns"):
        np.testing.assert_allclose(a[k], b[k], atol=2e-5, err_msg=k)
    for k in ("objective/scores", "objective/kl"):
        assert float(sa[k]) == pytest.approx(float(sb[k]), abs=2e-5)


def test_kl_is_zero_before_the_first_update_and_no_stop_is_penalised(fns, models, batch, scored):
    assert float(scored[1]["objective/kl"]) == 0.0
    # A random byte model rarely emits the end-of-turn byte: force one row done, one not.
    done = np.array([True, False, True, False])
    _, stats = fns.experience(models, batch["tokens"], batch["mask"], done, 0.0)
    rm = jax.jit(functools.partial(reward.scores, CFG))(
        models["rm"], models["norm"], batch["tokens"], batch["mask"]
    )
    want = np.where(done, rm, PPO.no_stop_penalty).mean()
    assert float(stats["objective/scores"]) == pytest.approx(float(want), rel=1e-5)
    assert float(stats["objective/rm_scores"]) == pytest.approx(float(np.mean(rm)), rel=1e-5)


def test_first_minibatch_has_ratio_1_ptx_is_added_and_the_update_moves_the_policy(
    fns, models, batch
):
    state = ppo.init_state(fns, models["policy"], models["critic"], 0)
    shape = (PPO.epochs, PPO.minibatches, PPO.ptx_batch_size, 9)
    ptx = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.int32)
    frozen = {k: models[k] for k in ("ref", "rm", "norm")}
    state, stats = ppo.iteration(fns, state, frozen, 0.1, batch, ptx)
    assert stats["policy/ratio_mean/first_minibatch"] == pytest.approx(1.0, abs=1e-5)
    assert stats["policy/approxkl/first_minibatch"] < 1e-9
    assert stats["policy/clipfrac/first_minibatch"] == 0.0
    assert stats["val/clipfrac/first_minibatch"] == 0.0
    assert stats["policy/approxkl"] > 0  # later minibatches see a moved policy
    # PPO-ptx: total = policy + vf_coef * value + ptx_coef * LM loss, minibatch by minibatch
    # (so also in the means), and the LM loss is that of the pretraining rows.
    want = stats["policy/loss"] + PPO.vf_coef * stats["val/loss"] + PPO.ptx_coef * stats["ptx/loss"]
    assert stats["ppo/loss/total"] == pytest.approx(want, rel=1e-5)
    first = float(jax.jit(functools.partial(loss_fn, CFG))(models["policy"], {"tokens": ptx[0, 0]}))
    assert first > 1.0 and stats["ptx/loss"] == pytest.approx(first, rel=0.2)
    # The reference stayed frozen: policy and reference now differ, so KL > 0 somewhere.
    _, after = fns.experience(
        frozen | {"policy": state.params["policy"], "critic": state.params["critic"]},
        batch["tokens"],
        batch["mask"],
        batch["done"],
        0.1,
    )
    assert abs(float(after["objective/kl"])) > 0


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
