"""Reward model: head init, scores at the last real token, K-way rankings, normalisation, HH
data."""

import functools
import gzip
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.data.tokenizer import ByteTokenizer
from gptjax.rlhf import comparisons, losses, reward
from tests.rlhf_fixtures import CFG, params

HH_LINES = [
    {
        "chosen": "\n\nHuman: hi\n\nAssistant: Hello! How can I help?",
        "rejected": "\n\nHuman: hi\n\nAssistant: Go away.",
    },
    {
        "chosen": "\n\nHuman: Is it safe?\n\nAssistant: Yes.\n\nHuman: Sure?\n\nAssistant: Quite.",
        "rejected": "\n\nHuman: Is it safe?\n\nAssistant: Yes.\n\nHuman: Sure?\n\nAssistant: No.",
    },
]


raw_scores = jax.jit(functools.partial(reward.raw_scores, CFG))  # eager ops are slow on CPU


@pytest.fixture(scope="module")
def rm_params():
    return reward.from_policy(CFG, params(0), jax.random.key(1))


def test_head_init_scale():
    head = reward.init_head(jax.random.key(0), 4095)
    assert float(jnp.std(head["kernel"])) == pytest.approx(1 / math.sqrt(4096), rel=0.05)
    assert float(head["bias"]) == 0.0


def test_score_lands_on_the_last_real_token(rm_params):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(3, 11)).astype(np.int32)
    mask = np.ones((3, 11), np.int32)
    mask[0, 7:] = 0  # right padding after the reply
    mask[1, :3] = 0  # left padding before the prompt
    np.testing.assert_array_equal(reward.last_index(jnp.asarray(mask)), [6, 10, 10])
    s = raw_scores(rm_params, tokens, mask)
    v = jax.jit(functools.partial(reward.head_values, CFG))(rm_params, tokens, mask)
    np.testing.assert_allclose(s, [v[0, 6], v[1, 10], v[2, 10]], rtol=1e-6)
    # Padding after the last real token is invisible; the last real token is not.
    t2 = tokens.copy()
    t2[0, 7:] = 5
    np.testing.assert_allclose(raw_scores(rm_params, t2, mask)[0], s[0], rtol=1e-5)
    t2[0, 6] = (tokens[0, 6] + 1) % 256
    assert abs(float(raw_scores(rm_params, t2, mask)[0] - s[0])) > 1e-6


def test_rank_by_reward_is_dense_with_ties():
    np.testing.assert_array_equal(
        comparisons.rank_by_reward([[0.5, -1.0, 0.5], [0.0, 1.0, 2.0]]), [[0, 1, 0], [2, 1, 0]]
    )


def test_k3_ranking_loss_by_hand():
    """K = 3, gold [0.5, -1, 0.5]: two pairs (0 > 1, 2 > 1), the tie forms none."""
    ranks = comparisons.rank_by_reward([[0.5, -1.0, 0.5]])
    s = jnp.array([[2.0, 1.0, -0.5]])
    loss, stats = losses.reward_ranking_loss(s, ranks, jnp.ones((1, 3)))
    want = 0.5 * (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.5))))
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(stats["reward/accuracy"]) == 0.5


def test_ranking_loss_through_the_model_matches_scores(rm_params):
    rng = np.random.default_rng(1)
    batch = {
        "tokens": rng.integers(0, 256, size=(2, 3, 9)).astype(np.int32),
        "mask": np.ones((2, 3, 9), np.int32),
        "ranks": np.array([[0, 1, 2], [1, 0, 1]]),
        "valid": np.ones((2, 3), np.int32),
    }
    loss, _ = jax.jit(functools.partial(reward.ranking_loss, CFG))(rm_params, batch)
    s = raw_scores(rm_params, batch["tokens"].reshape(6, 9), batch["mask"].reshape(6, 9)).reshape(
        2, 3
    )
    want, _ = losses.reward_ranking_loss(s, batch["ranks"], batch["valid"])
    assert float(loss) == pytest.approx(float(want), rel=1e-6)


def test_normalisation_gives_mean_0_std_1_on_reference_samples(rm_params):
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 256, size=(40, 12)).astype(np.int32)
    mask = (np.arange(12)[None] < rng.integers(3, 13, size=(40, 1))).astype(np.int32)
    norm = reward.fit_norm(raw_scores(rm_params, tokens, mask))
    s = np.asarray(jax.jit(functools.partial(reward.scores, CFG))(rm_params, norm, tokens, mask))
    assert abs(s.mean()) < 1e-5 and s.std() == pytest.approx(1.0, rel=1e-5)


def _write(path, lines, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("gz", [False, True])
def test_hh_jsonl_parsing(tmp_path, gz):
    path = _write(
        tmp_path / ("hh.jsonl.gz" if gz else "hh.jsonl"), [json.dumps(x) for x in HH_LINES], gz
    )
    pairs = comparisons.load_hh_jsonl(path)
    assert pairs[1] == (HH_LINES[1]["chosen"], HH_LINES[1]["rejected"])
    tok = ByteTokenizer()
    arrays = comparisons.hh_arrays(tok, pairs, seq_len=48)
    assert arrays["tokens"].shape == (2, 2, 48)
    np.testing.assert_array_equal(arrays["ranks"], [[0, 1], [0, 1]])
    # The score is read at the end-of-turn token closing the last Assistant turn.
    last = np.asarray(reward.last_index(jnp.asarray(arrays["mask"].reshape(4, 48))))
    assert (arrays["tokens"].reshape(4, 48)[np.arange(4), last] == tok.eos_id).all()
    # Long conversations keep their end (truncated from the oldest tokens).
    assert arrays["mask"][1].sum(axis=-1).max() == 48


def test_hh_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"hh.jsonl:2: not valid JSON"):
        comparisons.load_hh_jsonl(_write(tmp_path / "hh.jsonl", [json.dumps(HH_LINES[0]), "{oops"]))
    with pytest.raises(ValueError, match="'chosen' and 'rejected'"):
        comparisons.load_hh_jsonl(_write(tmp_path / "b.jsonl", [json.dumps({"chosen": "x"})]))
    with pytest.raises(ValueError, match="no comparisons"):
        comparisons.load_hh_jsonl(_write(tmp_path / "c.jsonl", [""]))
    with pytest.raises(FileNotFoundError):
        comparisons.load_hh_jsonl(str(tmp_path / "missing.jsonl"))


def test_config_errors():
    with pytest.raises(ValueError, match="at least 2"):
        reward.RewardConfig(k=1)
    with pytest.raises(ValueError, match="steps"):
        reward.RewardConfig(steps=0)
