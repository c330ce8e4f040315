"""RLHF losses against textbook loops and hand-computed cases, in float64 where it matters.

Masked entries are filled with garbage (huge numbers, NaN) throughout: a masked mean that let
padding in would fail loudly rather than be off by a little.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.rlhf import losses

GARBAGE = 1e30


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _ragged_mask(lengths, T):
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]


# ----------------------------------------------------------------------------- GAE


def _gae_loop(rewards, values, mask, gamma, lam):
    """The textbook double loop: the value after a row's last valid token is 0."""
    B, T = rewards.shape
    adv = np.zeros((B, T))
    for b in range(B):
        length = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_v = values[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


def test_gae_matches_textbook_loop_float64():
    rng = np.random.default_rng(0)
    B, T = 5, 7  # distinct primes: a transposed scan cannot pass
    mask = _ragged_mask([7, 3, 1, 0, 5], T)
    rewards = rng.normal(size=(B, T))
    values = rng.normal(size=(B, T))
    want_adv, want_ret = _gae_loop(rewards, values, mask, gamma=0.9, lam=0.8)
    # Garbage after the last valid token must not leak in through V_{t+1} or the reward.
    rewards_g = np.where(mask, rewards, GARBAGE)
    values_g = np.where(mask, values, -GARBAGE)
    adv, ret = jax.jit(losses.gae)(rewards_g, values_g, mask, 0.9, 0.8)
    assert adv.dtype == jnp.float64
    np.testing.assert_allclose(adv, want_adv, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(adv)[~mask], 0)
    np.testing.assert_array_equal(np.asarray(ret)[~mask], 0)
    np.testing.assert_allclose(np.asarray(ret)[mask], (want_adv + values)[mask], rtol=1e-12)


def test_gae_zero_bootstrap_at_last_token():
    # One row of length 2 then padding with a huge value: A_1 = r_1 - V_1, not r_1 + g*V_2 - V_1.
    rewards = np.array([[0.0, 1.0, 0.0]])
    values = np.array([[0.5, 0.25, 100.0]])
    mask = np.array([[1, 1, 0]])
    adv, _ = losses.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    a1 = 1.0 - 0.25
    a0 = (0.0 + 0.9 * 0.25 - 0.5) + 0.9 * 0.5 * a1
    np.testing.assert_allclose(adv, [[a0, a1, 0.0]], rtol=1e-12)


# ----------------------------------------------------------------------------- PPO policy loss


def _policy_case():
    """Five valid tokens in a (2, 4) batch, eps = 0.2, every branch of the clip exercised:

    A=+1 r=1.1 inside        -> max(-1.1, -1.1) = -1.1  not clipped
    A=+1 r=1.5 above         -> max(-1.5, -1.2) = -1.2  clipped
    A=-2 r=0.5 below         -> max(+1.0, +1.6) = +1.6  clipped
    A=-1 r=1.5 above, A<0    -> max(+1.5, +1.2) = +1.5  not clipped (clip would help, max refuses)
    A=+2 r=0.5 below, A>0    -> max(-1.0, -1.6) = -1.0  not clipped
    """
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    ratio = np.array([[1.1, 1.5, 0.5, 1.0], [1.5, 0.5, 1.0, 1.0]])
    adv = np.array([[1.0, 1.0, -2.0, np.nan], [-1.0, 2.0, np.nan, GARBAGE]])
    old = np.random.default_rng(1).normal(size=ratio.shape) - 3.0
    logp = np.where(mask, old + np.log(ratio), GARBAGE)
    return logp, old, adv, mask, ratio


def test_ppo_policy_loss_hand_computed():
    logp, old, adv, mask, ratio = _policy_case()
    entropy = np.where(mask, [[1.0, 2.0, 3.0, 0], [4.0, 5.0, 0, 0]], np.nan)
    policy_loss = jax.jit(losses.ppo_policy_loss, static_argnums=4)
    loss, stats = policy_loss(logp, old, adv, mask, 0.2, entropy)
    np.testing.assert_allclose(loss, (-1.1 - 1.2 + 1.6 + 1.5 - 1.0) / 5, rtol=1e-12)
    np.testing.assert_allclose(stats["policy/clipfrac"], 2 / 5, rtol=1e-12)
    ratio_mean = (1.1 + 1.5 + 0.5 + 1.5 + 0.5) / 5
    np.testing.assert_allclose(stats["policy/ratio_mean"], ratio_mean, rtol=1e-12)
    kl = 0.5 * (math.log(1.1) ** 2 + 2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 5
    np.testing.assert_allclose(stats["policy/approxkl"], kl, rtol=1e-12)
    np.testing.assert_allclose(stats["policy/entropy"], 3.0, rtol=1e-12)


def test_ppo_policy_gradient_zero_where_clipped_or_masked():
    logp, old, adv, mask, _ = _policy_case()
    grad = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, 0.2)[0])(logp)
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[~mask], 0)
    # Clipped tokens (row 0, positions 1 and 2) get no gradient; d/dlogp(-A r) = -A r / N elsewhere.
    np.testing.assert_allclose(grad[mask], [-1.1 / 5, 0, 0, 1.5 / 5, -1.0 / 5], atol=1e-12)


def test_ppo_policy_loss_at_old_equals_new():
    rng = np.random.default_rng(2)
    mask = _ragged_mask([4, 1, 3], 5)
    logp = rng.normal(size=mask.shape)
    adv = rng.normal(size=mask.shape)
    loss, stats = losses.ppo_policy_loss(logp, logp, adv, mask, 0.2)
    np.testing.assert_allclose(loss, -adv[mask].mean(), rtol=1e-12)
    np.testing.assert_allclose(stats["policy/ratio_mean"], 1.0, rtol=1e-12)
    assert float(stats["policy/approxkl"]) == 0.0
    assert float(stats["policy/clipfrac"]) == 0.0
    assert "policy/entropy" not in stats


def test_ppo_policy_loss_ignores_masked_entries():
    logp, old, adv, mask, _ = _policy_case()
    base = losses.ppo_policy_loss(logp, old, adv, mask, 0.2)
    rng = np.random.default_rng(3)
    junk = lambda x: np.where(mask, x, rng.normal(size=x.shape) * 1e6)  # noqa: E731
    other = losses.ppo_policy_loss(junk(logp), junk(old), junk(adv), mask, 0.2)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), base, other)


# ----------------------------------------------------------------------------- PPO value loss


def test_ppo_value_loss_hand_computed():
    """eps = 0.2; four valid tokens, one pad of garbage:

    v=1.0 old=0.9 R=2: inside, errors 1 and 1            -> 1      not clipped
    v=1.5 old=1.0 R=0: v_clip=1.2, errors 2.25 and 1.44  -> 2.25   not clipped (clip helps)
    v=1.5 old=1.0 R=3: v_clip=1.2, errors 2.25 and 3.24  -> 3.24   clipped
    v=0.0 old=1.0 R=1: v_clip=0.8, errors 1 and 0.04     -> 1      not clipped
    """
    mask = np.array([[1, 1, 0], [1, 1, 0]], bool)
    v = np.array([[1.0, 1.5, GARBAGE], [1.5, 0.0, np.nan]])
    old = np.array([[0.9, 1.0, np.nan], [1.0, 1.0, -GARBAGE]])
    ret = np.array([[2.0, 0.0, GARBAGE], [3.0, 1.0, 7.0]])
    loss, stats = jax.jit(losses.ppo_value_loss, static_argnums=4)(v, old, ret, mask, 0.2)
    np.testing.assert_allclose(loss, 0.5 * (1 + 2.25 + 3.24 + 1) / 4, rtol=1e-12)
    np.testing.assert_allclose(stats["val/clipfrac"], 0.25, rtol=1e-12)
    np.testing.assert_allclose(stats["val/error"], (1 + 2.25 + 2.25 + 1) / 4, rtol=1e-12)
    np.testing.assert_allclose(stats["val/mean"], 1.0, rtol=1e-12)
    grad = np.asarray(jax.grad(lambda x: losses.ppo_value_loss(x, old, ret, mask, 0.2)[0])(v))
    # Only the clipped token (row 1, t 0) loses its gradient; 0.5 * 2 (v - R) / 4 elsewhere.
    np.testing.assert_allclose(grad, [[-0.25, 0.375, 0], [0, -0.25, 0]], atol=1e-12)


def test_ppo_value_loss_no_clipping_when_values_unchanged():
    rng = np.random.default_rng(4)
    mask = _ragged_mask([3, 5], 5)
    v, ret = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    loss, stats = losses.ppo_value_loss(v, v, ret, mask, 0.2)
    np.testing.assert_allclose(loss, 0.5 * ((v - ret) ** 2)[mask].mean(), rtol=1e-12)
    assert float(stats["val/clipfrac"]) == 0.0


# ----------------------------------------------------------------------------- reward ranking


def _ranking_by_hand(scores, ranks, valid):
    """Per prompt, mean of -log sigmoid(s_i - s_j) over valid i strictly better than j."""
    per_prompt, margins = [], []
    for s, r, ok in zip(scores, ranks, valid):
        pairs = [
            (i, j)
            for i, j in itertools.permutations(range(len(s)), 2)
            if ok[i] and ok[j] and r[i] < r[j]
        ]
        if pairs:
            per_prompt.append(np.mean([math.log1p(math.exp(-(s[i] - s[j]))) for i, j in pairs]))
            margins += [s[i] - s[j] for i, j in pairs]
    margins = np.array(margins)
    return np.mean(per_prompt), np.mean(margins > 0), margins.mean()


def test_ranking_k2_equals_pairwise():
    rng = np.random.default_rng(5)
    chosen, rejected = rng.normal(size=7), rng.normal(size=7)
    loss, stats = losses.pairwise_loss(chosen, rejected)
    want = np.mean(-np.log(1 / (1 + np.exp(-(chosen - rejected)))))
    np.testing.assert_allclose(loss, want, rtol=1e-12)
    # The same numbers as a K = 2 ranking with the chosen response listed second.
    loss2, stats2 = losses.reward_ranking_loss(
        np.stack([rejected, chosen], 1), np.tile([1, 0], (7, 1)), np.ones((7, 2), bool)
    )
    np.testing.assert_allclose(loss2, want, rtol=1e-12)
    np.testing.assert_allclose(stats["reward/accuracy"], np.mean(chosen > rejected), rtol=1e-12)
    np.testing.assert_allclose(stats2["reward/margin"], np.mean(chosen - rejected), rtol=1e-12)


def test_ranking_k4_by_hand_with_ties_and_invalid():
    scores = np.array(
        [
            [0.3, -1.2, 2.0, 0.7],  # full ranking: 6 pairs
            [1.0, 0.5, -0.5, np.nan],  # 4th response invalid, and ranks 0 and 1 tied: 2 pairs
            [0.1, 0.2, GARBAGE, 0.0],  # all valid ones tied: no pairs, prompt left out
            [5.0, -5.0, 0.0, 0.0],  # one valid response only: no pairs
        ]
    )
    ranks = np.array([[2, 3, 0, 1], [0, 0, 1, 7], [1, 1, 0, 1], [0, 1, 2, 3]])
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 0, 0]], bool)
    loss, stats = jax.jit(losses.reward_ranking_loss)(scores, ranks, valid)
    want_loss, want_acc, want_margin = _ranking_by_hand(scores, ranks, valid)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    np.testing.assert_allclose(stats["reward/accuracy"], want_acc, rtol=1e-12)
    np.testing.assert_allclose(stats["reward/margin"], want_margin, rtol=1e-12)
    grad = jax.grad(lambda s: losses.reward_ranking_loss(s, ranks, valid)[0])(scores)
    assert np.isfinite(np.asarray(grad)).all()


def test_ranking_permutation_invariant_within_prompt():
    rng = np.random.default_rng(6)
    B, K = 3, 5
    scores, ranks = rng.normal(size=(B, K)), rng.integers(0, 4, size=(B, K))
    valid = rng.random((B, K)) > 0.2
    base = losses.reward_ranking_loss(scores, ranks, valid)
    perm = rng.permutation(K)
    other = losses.reward_ranking_loss(scores[:, perm], ranks[:, perm], valid[:, perm])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), base, other)


def test_ranking_gradient_raises_better_scores():
    scores = jnp.array([[0.0, 0.0, 0.0]])
    ranks = jnp.array([[1, 0, 2]])
    valid = jnp.ones((1, 3), bool)
    grad = jax.grad(lambda s: losses.reward_ranking_loss(s, ranks, valid)[0])(scores)
    # Gradient descent moves scores by -grad: the best goes up, the worst down, the middle stays.
    assert grad[0, 1] < 0 < grad[0, 2]
    np.testing.assert_allclose(grad[0, 0], 0.0, atol=1e-12)


def test_ranking_large_margin_is_finite():
    loss, _ = losses.pairwise_loss(jnp.array([-1000.0]), jnp.array([1000.0]))
    np.testing.assert_allclose(loss, 2000.0, rtol=1e-12)


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_are_unbiased_for_categoricals():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    q = np.array([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = float(np.sum(p * np.log(p / q)))
    x = np.random.default_rng(7).choice(len(p), size=200_000, p=p)
    logp, logq = np.log(p)[x], np.log(q)[x]
    for kind in ("k1", "k3"):
        est = losses.kl_estimate(logp, logq, kind)
        np.testing.assert_allclose(np.mean(est), exact, atol=5e-3, err_msg=kind)
    # k2 is biased but close for nearby distributions; here it only has to be the right size.
    assert 0.5 * exact < np.mean(losses.kl_estimate(logp, logq, "k2")) < 2 * exact


def test_k3_nonnegative_and_all_zero_at_equality():
    rng = np.random.default_rng(8)
    for scale in (1e-9, 1e-4, 1.0, 10.0):
        logp, ref = rng.normal(size=1000) * scale, rng.normal(size=1000) * scale
        for dtype in (np.float32, np.float64):
            assert np.all(np.asarray(losses.kl_k3(logp.astype(dtype), ref.astype(dtype))) >= 0)
    for fn in (losses.kl_k1, losses.kl_k2, losses.kl_k3):
        np.testing.assert_array_equal(fn(ref, ref), 0)
    with pytest.raises(ValueError, match="kind"):
        losses.kl_estimate(ref, ref, "k4")


def test_per_token_rewards_score_on_last_valid_token():
    mask = _ragged_mask([3, 1, 0, 4], 4)
    kl = np.where(mask, np.arange(16.0).reshape(4, 4), np.nan)
    scores = np.array([10.0, 20.0, 30.0, 40.0])
    got = jax.jit(losses.per_token_rewards)(scores, kl, mask, 0.5)
    want = np.array(
        [
            [-0.0, -0.5, -1.0 + 10.0, 0.0],
            [-2.0 + 20.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],  # no valid token: the score has nowhere to go
            [-6.0, -6.5, -7.0, -7.5 + 40.0],
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ----------------------------------------------------------------------------- masked statistics


def test_whiten_ignores_padding_and_normalises():
    rng = np.random.default_rng(9)
    mask = _ragged_mask([5, 2, 7], 7)
    x = rng.normal(size=(3, 7)) * 3.0 + 2.0
    w = losses.masked_whiten(x, mask)
    w2 = losses.masked_whiten(np.where(mask, x, rng.normal(size=x.shape) * 1e6), mask)
    np.testing.assert_array_equal(w, w2)
    np.testing.assert_array_equal(np.asarray(w)[~mask], 0)
    np.testing.assert_allclose(np.mean(np.asarray(w)[mask]), 0, atol=1e-12)
    np.testing.assert_allclose(np.var(np.asarray(w)[mask], ddof=1), 1, rtol=1e-6)
    np.testing.assert_allclose(losses.masked_mean(w, mask), 0, atol=1e-12)
    np.testing.assert_allclose(losses.masked_var(w, mask), 1, rtol=1e-6)
    # shift_mean=False: the scale is fixed but the mean kept, as lm-human-preferences does rewards.
    w_keep = losses.masked_whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(np.mean(np.asarray(w_keep)[mask]), x[mask].mean(), rtol=1e-12)
    np.testing.assert_allclose(np.var(np.asarray(w_keep)[mask], ddof=1), 1, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(w_keep)[~mask], 0)


def test_masked_mean_var_match_numpy():
    rng = np.random.default_rng(10)
    mask = _ragged_mask([2, 5, 3], 5)
    x = np.where(mask, rng.normal(size=(3, 5)), np.inf)
    np.testing.assert_allclose(losses.masked_mean(x, mask), x[mask].mean(), rtol=1e-12)
    row_means = [x[i, mask[i]].mean() for i in range(3)]
    np.testing.assert_allclose(losses.masked_mean(x, mask, axis=1), row_means, rtol=1e-12)
    np.testing.assert_allclose(losses.masked_var(x, mask), np.var(x[mask], ddof=1), rtol=1e-12)
    biased = losses.masked_var(x, mask, unbiased=False)
    np.testing.assert_allclose(biased, np.var(x[mask]), rtol=1e-12)
    grad = jax.grad(lambda y: losses.masked_whiten(y, mask).sum() + losses.masked_var(y, mask))(x)
    assert np.isfinite(np.asarray(grad)).all()
    assert float(losses.masked_mean(x, np.zeros_like(mask))) == 0.0  # empty mask: 0, not NaN


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="ppo_policy_loss"):
        a, b = jnp.zeros((2, 3)), jnp.zeros((3, 2))
        losses.ppo_policy_loss(a, b, a, jnp.ones((2, 3)), 0.2)
    with pytest.raises(ValueError, match="gae"):
        losses.gae(jnp.zeros((2, 3)), jnp.zeros((2, 4)), jnp.ones((2, 3)), 1.0, 0.95)


# ----------------------------------------------------------------------------- KL controllers


@pytest.mark.parametrize(
    "kl, e",
    [(6.0, 0.0), (6.6, 0.1), (5.4, -0.1), (12.0, 0.2), (0.0, -0.2)],  # last two: e clipped at +-0.2
)
def test_adaptive_kl_controller_formula(kl, e):
    ctl = losses.AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    beta = jax.jit(ctl.update)(ctl.init(), kl, 512)
    np.testing.assert_allclose(beta, 0.1 * (1 + e * 512 / 10_000), rtol=1e-12)


def test_adaptive_kl_controller_sequence_and_fixed():
    ctl = losses.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    beta, want = ctl.init(), 0.2
    for kl, e in [(9.0, 0.2), (3.0, -0.2), (6.3, 0.05)]:
        beta, want = ctl.update(beta, kl, 1000), want * (1 + e * 0.1)
        np.testing.assert_allclose(beta, want, rtol=1e-12)
    fixed = losses.FixedKLController(init_kl_coef=0.02)
    np.testing.assert_allclose(fixed.update(fixed.init(), 100.0, 10_000), 0.02)
    beta = losses.update_kl_coef(0.02, 7.2, 256)  # defaults: target 6, horizon 10k; e = 0.2
    np.testing.assert_allclose(beta, 0.02 * (1 + 0.2 * 256 / 10_000), rtol=1e-12)
