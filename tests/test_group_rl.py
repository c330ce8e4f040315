"""RLOO / GRPO: group advantages against float64 loops, and GRPO's loss sanity checks (ratio 1
and clipfrac 0 at the first minibatch, KL 0 at the reference, the loss as a token loop)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.rlhf import group_rl as group


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _scores(seed=0, b=4, k=5):
    rng = np.random.default_rng(seed)
    scores, valid = rng.normal(size=(b, k)), rng.random((b, k)) > 0.25
    valid[0] = [True, False, False, False, False]  # one response: no baseline
    scores[~valid] = np.nan  # garbage under the mask must not leak
    return scores, valid


def test_rloo_is_the_leave_one_out_baseline():
    scores, valid = _scores()
    got = np.asarray(group.group_advantages(scores, valid, "rloo"))
    for b in range(scores.shape[0]):
        idx = np.flatnonzero(valid[b])
        for i in range(scores.shape[1]):
            others = [scores[b, j] for j in idx if j != i]
            want = scores[b, i] - sum(others) / len(others) if valid[b, i] and others else 0.0
            np.testing.assert_allclose(got[b, i], want, rtol=1e-12, atol=1e-15)


def test_grpo_normalises_each_group():
    scores, valid = _scores(1)
    got = np.asarray(group.group_advantages(scores, valid, "grpo", eps=1e-4))
    for b in range(scores.shape[0]):
        s = scores[b, valid[b]]
        for i in range(scores.shape[1]):
            if valid[b, i] and len(s) > 1:
                want = (scores[b, i] - s.mean()) / (s.std(ddof=1) + 1e-4)
            else:
                want = 0.0
            np.testing.assert_allclose(got[b, i], want, rtol=1e-12, atol=1e-15)


def test_grpo_loss_at_the_first_minibatch_and_the_reference():
    rng = np.random.default_rng(2)
    logp = rng.normal(-2, 1, (6, 7))
    mask = np.arange(7)[None] < np.array([[7], [5], [3], [7], [1], [4]])
    adv = rng.normal(size=6)
    total, count, stats = group.grpo_policy_terms(logp, logp, logp, adv, mask, 0.2, 0.05)
    # ratio 1: the loss is -A per token, averaged over the batch's valid tokens.
    want = sum(-adv[b] * mask[b].sum() for b in range(6)) / mask.sum()
    np.testing.assert_allclose(total / count, want, rtol=1e-12)
    assert float(stats["policy/clipfrac"]) == 0.0 and float(stats["policy/kl_ref"]) == 0.0
    np.testing.assert_allclose(stats["policy/ratio_mean"], 1.0)


def test_grpo_loss_equals_a_token_loop():
    rng = np.random.default_rng(3)
    logp, old, ref = (rng.normal(-2, 0.5, (3, 4)) for _ in range(3))
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    adv, eps, beta = rng.normal(size=3), 0.2, 0.1
    terms = []
    for b, t in zip(*np.nonzero(mask)):
        ratio = math.exp(logp[b, t] - old[b, t])
        surrogate = max(-adv[b] * ratio, -adv[b] * min(max(ratio, 1 - eps), 1 + eps))
        r = math.exp(ref[b, t] - logp[b, t])
        terms.append(surrogate + beta * (r - 1 - math.log(r)))
    total, count, _ = group.grpo_policy_terms(jnp.asarray(logp), old, ref, adv, mask, eps, beta)
    np.testing.assert_allclose(total / count, sum(terms) / len(terms), rtol=1e-12)


def test_unknown_baseline_raises():
    with pytest.raises(ValueError, match="not one of"):
        group.group_advantages(jnp.zeros((1, 2)), jnp.ones((1, 2)), "ppo")
