"""RLOO / GRPO as the PPO trainer runs them: K consecutive rollout rows form a prompt's group,
the advantages equal a float64 loop over groups, and the GRPO loss at the first minibatch has
ratio 1 with the k3 KL to a *different* reference in it."""

import functools

import jax
import numpy as np
import pytest

from gptjax.rlhf import group_rl, ppo, reward, scoring
from tests.rlhf_fixtures import CFG, params

WIDTH, K, B = 4, 4, 8


def _cfg(algo):
    return ppo.PPOConfig(
        algo=algo, group_size=K, batch_size=B, minibatches=1, max_new_tokens=6, temperature=1.0
    )


@pytest.fixture(scope="module")
def rollout():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, size=(B, WIDTH + 6)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[:3, :2] = 0  # left padding
    mask[5, WIDTH + 3 :] = 0  # a reply that stopped early
    models = {
        "policy": params(0),
        "ref": params(1),  # a different reference: KL != 0
        "rm": reward.from_policy(CFG, params(2), jax.random.key(3)),
        "norm": reward.identity_norm(),
    }
    done = np.array([True] * 6 + [False, True])
    return models, tokens, mask, done


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_group_advantages_equal_a_float64_loop_over_consecutive_groups(rollout, algo):
    models, tokens, mask, done = rollout
    cfg, beta = _cfg(algo), 0.3
    exp, _ = jax.jit(functools.partial(group_rl.group_experience, CFG, CFG, cfg, WIDTH))(
        models, tokens, mask, done, beta
    )
    s = jax.device_get(scoring.score_rollout(CFG, CFG, cfg, WIDTH, models, tokens, mask, done))
    r = np.asarray(s["score"], np.float64)
    if algo == "rloo":
        r = r - beta * np.asarray(s["kl"], np.float64).sum(axis=1)
    want = np.zeros(B)
    for g in range(B // K):
        grp = r[g * K : (g + 1) * K]
        for j in range(K):
            if algo == "rloo":
                want[g * K + j] = grp[j] - (grp.sum() - grp[j]) / (K - 1)
            else:
                want[g * K + j] = (grp[j] - grp.mean()) / (grp.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(exp["advantages"], want, rtol=2e-4, atol=1e-5)
    assert float(np.abs(np.asarray(s["kl"])).sum()) > 0


def test_grpo_first_minibatch_ratio_1_and_kl_in_the_loss(rollout):
    models, tokens, mask, done = rollout
    cfg, beta = _cfg("grpo"), 0.5
    exp, _ = group_rl.group_experience(CFG, CFG, cfg, WIDTH, models, tokens, mask, done, beta)
    sums, weights, stats = group_rl.group_minibatch_terms(
        CFG, cfg, WIDTH, {"policy": models["policy"]}, exp
    )
    assert float(stats["policy/ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
    assert float(stats["policy/clipfrac"]) == 0.0
    # At ratio 1 the surrogate is -mean(A) over tokens; the KL term is beta * k3 summed.
    resp = np.asarray(mask[:, WIDTH:], np.float64)
    logp, ref = np.asarray(exp["logprobs"], np.float64), np.asarray(exp["ref_logprobs"], np.float64)
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    adv = np.asarray(exp["advantages"], np.float64)[:, None]
    want = (-(adv * resp).sum() + beta * (k3 * resp).sum()) / resp.sum()
    assert float(sums["policy"] / weights["policy"]) == pytest.approx(want, rel=1e-4)
    assert float(stats["policy/kl_ref"]) == pytest.approx((k3 * resp).sum() / resp.sum(), rel=1e-4)


def test_k_below_2_and_ragged_batches_raise():
    with pytest.raises(ValueError, match="K >= 2"):
        ppo.PPOConfig(algo="grpo", group_size=1)
    with pytest.raises(ValueError, match="divisible by group_size"):
        ppo.PPOConfig(algo="rloo", group_size=3, batch_size=16)
    with pytest.raises(ValueError, match="not one of"):
        ppo.PPOConfig(algo="reinforce")
