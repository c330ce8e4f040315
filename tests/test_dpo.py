"""DPO / cDPO / IPO losses over K-way rankings against a float64 loop over pairs, the closed-form
DPO gradient, and the sanity checks (policy = reference: loss log 2, accuracy 0)."""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.rlhf import dpo


@pytest.fixture
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
def test_loss_equals_a_float64_loop_over_pairs(kind, beta, eps, x64):
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


def test_k2_gradient_is_the_closed_form(x64):
    """d loss / d log pi(chosen) = -beta sigmoid(-m) / B, and the opposite for rejected."""
    rng = np.random.default_rng(1)
    logps, ref = rng.normal(-10, 3, (6, 2)), rng.normal(-10, 3, (6, 2))
    ranks, valid, beta = np.tile([0, 1], (6, 1)), np.ones((6, 2), bool), 0.2
    grad = jax.grad(lambda lp: dpo.dpo_loss(lp, ref, ranks, valid, beta=beta)[0])(logps)
    m = beta * ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]))
    expected = -beta / (1 + np.exp(m)) / 6
    np.testing.assert_allclose(grad[:, 0], expected, rtol=1e-10)
    np.testing.assert_allclose(grad[:, 1], -expected, rtol=1e-10)


def test_at_the_reference_the_loss_is_log2_and_stats_are_zero(x64):
    logps, _, ranks, valid = _batch(2)
    loss, stats = dpo.dpo_loss(logps, logps, ranks, valid, beta=0.1)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-12)
    for name in ("dpo/accuracy", "dpo/margin", "dpo/chosen_reward", "dpo/rejected_reward"):
        assert float(stats[name]) == 0.0, name


def test_stats_are_means_over_pairs(x64):
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


# ----------------------------------------------------------------------------- the trainer


def test_response_mask_by_width_and_by_shared_prefix():
    tokens = np.array([[[5, 5, 1, 2, 0], [5, 5, 1, 3, 4]]])
    mask = np.array([[[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]])
    np.testing.assert_array_equal(
        dpo.response_mask(tokens, mask, width=2), [[[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]]
    )
    # HH: the responses share [5, 5, 1]; they differ from slot 3 on.
    np.testing.assert_array_equal(
        dpo.response_mask(tokens, mask, width=None), [[[0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]]
    )


def test_sequence_logps_equal_a_loop_over_the_model_logits():
    from gptjax.models import gpt
    from tests.rlhf_fixtures import CFG, params

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, (3, 9)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[0, :2] = 0  # left padding
    response = mask.copy()
    response[:, :5] = 0
    got = dpo.sequence_logps(CFG, params(0), tokens, mask, response)
    logits = np.asarray(gpt.forward(CFG, params(0), tokens, mask=mask), np.float64)
    for b in range(3):
        want = 0.0
        for t in range(1, 9):
            if response[b, t]:
                row = logits[b, t - 1]
                want += row[tokens[b, t]] - np.log(np.exp(row - row.max()).sum()) - row.max()
        np.testing.assert_allclose(got[b], want, rtol=1e-5)


def test_run_dpo_starts_at_log2_and_learns_the_rankings(tmp_path):
    import gin

    from gptjax.config import ModelConfig
    from gptjax.parallel.mesh import MeshConfig
    from gptjax.rlhf import sft
    from gptjax.rlhf.reward import RewardConfig
    from gptjax.training.optimizer import OptimizerConfig

    gin.clear_config()
    model = ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=512, max_len=40)
    sft_cfg = sft.SFTConfig(
        pretrain_steps=30,
        steps=30,
        batch_size=16,
        seq_len=39,
        n_demonstrations=64,
        tokenizer_vocab_size=400,
        log_every=30,
    )
    opt = OptimizerConfig(peak_lr=3e-3, warmup_steps=1, decay="constant")
    mesh = MeshConfig(shape={"data": 1, "fsdp": 1, "tensor": 1})
    sft.run_sft(str(tmp_path / "sft"), model_cfg=model, sft_cfg=sft_cfg, opt_cfg=opt, mesh_cfg=mesh)
    rm_cfg = RewardConfig(k=3, n_prompts=48, heldout_prompts=16, max_new_tokens=8, seed=0)
    dpo_cfg = dpo.DPOConfig(beta=0.5, steps=30, batch_size=8, log_every=10)
    summary = dpo.run_dpo(
        str(tmp_path / "dpo"),
        str(tmp_path / "sft"),
        dpo_cfg=dpo_cfg,
        rm_cfg=rm_cfg,
        opt_cfg=OptimizerConfig(peak_lr=3e-3, warmup_steps=1, decay="constant"),
        mesh_cfg=mesh,
    )
    # At the reference policy every implicit reward is 0: loss log 2, nothing ranked yet.
    np.testing.assert_allclose(summary["heldout/loss_start"], math.log(2), rtol=1e-5)
    assert summary["heldout/accuracy_start"] == 0.0
    with open(tmp_path / "dpo" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if "dpo/loss" in r]
    assert train[-1]["dpo/loss"] < math.log(2) - 0.05 and train[-1]["dpo/accuracy"] > 0.6
    assert np.isfinite(summary["heldout/loss"])
    cfg, params_after, _ = sft.load_policy(str(tmp_path / "dpo"))
    _, params_before, _ = sft.load_policy(str(tmp_path / "sft"))
    assert (cfg.n_layers, cfg.d_model, cfg.vocab_size) == (1, 32, 512)
    assert not np.allclose(params_after["wte"], params_before["wte"])
