"""DPO / cDPO / IPO losses over K-way rankings against a float64 loop over pairs, the closed-form
DPO gradient, and the sanity checks (policy = reference: loss log 2, accuracy 0)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.rlhf import dpo


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _loop(logps, ref, ranks, valid, beta, eps, kind):
    """The textbook definition, one pair at a time, in float64."""
    per_prompt = []
    for b in range(logps.shape[0]):
        terms = []
        for i, j in itertools.permutations(range(logps.shape[1]), 2):
            if not (valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]):
                continue
            h = (logps[b, i] - ref[b, i]) - (logps[b, j] - ref[b, j])
            if kind == "ipo":
                terms.append((h - 1 / (2 * beta)) ** 2)
            else:
                sig = lambda z: 1 / (1 + math.exp(-z))
                terms.append(-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)))
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


def _batch(seed=0, b=5, k=4):
    rng = np.random.default_rng(seed)
    logps = rng.normal(-20, 5, (b, k))
    ref = logps + rng.normal(0, 1, (b, k))
    ranks = rng.integers(0, 3, (b, k))  # ties: no pair
    valid = rng.random((b, k)) > 0.2
    valid[0] = [True, False, False, False]  # a prompt without any pair is left out
    return logps, ref, ranks, valid


@pytest.mark.parametrize(
    "kind,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.3, 0.0)]
)
def test_loss_equals_a_float64_loop_over_pairs(kind, beta, eps):
    logps, ref, ranks, valid = _batch()
    got, stats = dpo.dpo_loss(
        jnp.asarray(logps),
        jnp.asarray(ref),
        jnp.asarray(ranks),
        jnp.asarray(valid),
        beta=beta,
        label_smoothing=eps,
        loss_type=kind,
    )
    np.testing.assert_allclose(got, _loop(logps, ref, ranks, valid, beta, eps, kind), rtol=1e-12)
    np.testing.assert_allclose(stats["dpo/loss"], got, rtol=1e-12)


def test_k2_gradient_is_the_closed_form():
    """d loss / d log pi(chosen) = -beta sigmoid(-m) / B, and the opposite for rejected."""
    rng = np.random.default_rng(1)
    logps, ref = rng.normal(-10, 3, (6, 2)), rng.normal(-10, 3, (6, 2))
    ranks, valid, beta = np.tile([0, 1], (6, 1)), np.ones((6, 2), bool), 0.2
    grad = jax.grad(lambda lp: dpo.dpo_loss(lp, ref, ranks, valid, beta=beta)[0])(logps)
    m = beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
    expected = -beta / (1 + np.exp(m)) / 6
    np.testing.assert_allclose(grad[:, 0], expected, rtol=1e-10)
    np.testing.assert_allclose(grad[:, 1], -expected, rtol=1e-10)


def test_at_the_reference_the_loss_is_log2_and_stats_are_zero():
    logps, _, ranks, valid = _batch(2)
    loss, stats = dpo.dpo_loss(logps, logps, ranks, valid, beta=0.1)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-12)
    for name in ("dpo/accuracy", "dpo/margin", "dpo/chosen_reward", "dpo/rejected_reward"):
        assert float(stats[name]) == 0.0, name


def test_stats_are_means_over_pairs():
    logps = jnp.array([[-1.0, -3.0, -2.0]])
    ref = jnp.zeros((1, 3))
    ranks, valid = jnp.array([[0, 1, 2]]), jnp.ones((1, 3), bool)
    _, stats = dpo.dpo_loss(logps, ref, ranks, valid, beta=1.0)
    # Pairs by rank (0 best): (0>1), (0>2), (1>2); better sides -1, -1, -3; worse -3, -2, -2.
    np.testing.assert_allclose(stats["dpo/chosen_logp"], -5 / 3)
    np.testing.assert_allclose(stats["dpo/rejected_logp"], -7 / 3)
    np.testing.assert_allclose(stats["dpo/accuracy"], 2 / 3)  # the 1 > 2 pair is wrong
    np.testing.assert_allclose(stats["dpo/margin"], (2 + 1 - 1) / 3)


def test_bad_options_raise():
    x = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="not one of"):
        dpo.dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.dpo_loss(x, x, x, x, beta=0.1, label_smoothing=0.5)
