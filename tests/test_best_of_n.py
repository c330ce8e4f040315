"""Best-of-n: the closed-form KL against the exact KL of best-of-n over a fine discrete
distribution, and selection of the reward model's best sample among n real draws."""

import jax
import numpy as np
import pytest

from gptjax.rlhf import best_of_n, reward
from tests.rlhf_fixtures import CFG, TOK, params


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_analytic_kl_is_the_exact_kl_without_ties(n):
    """Over M outcomes with distinct rewards (sorted), best-of-n picks outcome i with
    probability F_i^n - F_{i-1}^n; its KL to the base tends to log n - (n-1)/n as the
    outcomes get finer (the formula is exact for continuous rewards)."""
    p = np.random.default_rng(n).dirichlet(np.ones(20_000))
    cdf = np.cumsum(p)
    q = cdf**n - np.concatenate([[0.0], cdf[:-1]]) ** n
    exact = float(np.sum(q * np.log(np.where(q > 0, q / p, 1.0))))
    np.testing.assert_allclose(best_of_n.analytic_kl(n), exact, atol=2e-3)
    assert best_of_n.analytic_kl(1) == 0.0


def test_keeps_the_best_scored_sample_of_each_prompt():
    policy = params(0)
    rm = reward.from_policy(CFG, params(1), jax.random.key(2))
    norm = reward.identity_norm()
    prompts = [[("Human", "hi")], [("Human", "how are you")], [("Human", "ok")]]
    out = best_of_n.best_of_n(
        CFG,
        policy,
        TOK,
        CFG,
        rm,
        norm,
        prompts,
        20,
        n=4,
        key=jax.random.key(3),
        max_new_tokens=6,
        chunk=4,
    )
    assert out["all_scores"].shape == (3, 4) and out["tokens"].shape == (3, 26)
    np.testing.assert_allclose(out["scores"], out["all_scores"].max(axis=1))
    # Rescoring the kept rows on their own gives the kept scores: they are the argmax rows.
    again = best_of_n.score_rows(CFG, rm, norm, out["tokens"], out["mask"], chunk=4)
    np.testing.assert_allclose(again, out["scores"], rtol=1e-5, atol=1e-6)
    assert len(set(map(tuple, np.round(out["all_scores"], 5)))) == 3  # draws differ
    np.testing.assert_allclose(out["kl"], np.log(4) - 3 / 4)


def test_n_below_one_raises():
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n.analytic_kl(0)
