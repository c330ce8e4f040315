"""The three stages end to end through the CLI (tiny and few steps), then chat with the policy.

One run (a module fixture) serves every test that only reads its outputs. Its sizes are chosen so
the stages share compiles: every sampler call has 16 rows (RM rankings of 4 prompts x K = 4, RM
normalisation, PPO rollouts and evaluation) and one prompt width (RM prompts of seed 0 include
the longest question, as PPO's do); both chat turns have one width (max_len 40 and 10 new
tokens leave a 30-token history budget, below the sampler's 32-token rounding); SFT sequences
are as long as PPO's pretraining windows, so the held-out losses are one program.
"""

import io
import json
import math
import os

import gin
import pytest

from gptjax.cli import main as main_lib
from tests.rlhf_fixtures import compilation_cache

TINY = [
    "ModelConfig.n_layers = 1",
    "ModelConfig.d_model = 32",
    "ModelConfig.n_heads = 2",
    "ModelConfig.vocab_size = 512",
    "ModelConfig.max_len = 40",
    "SFTConfig.pretrain_steps = 2",
    "SFTConfig.steps = 2",
    "SFTConfig.batch_size = 8",
    "SFTConfig.seq_len = 39",
    "SFTConfig.n_demonstrations = 16",
    "SFTConfig.log_every = 1",
    "SFTConfig.tokenizer_vocab_size = 400",
    "RewardConfig.k = 4",
    "RewardConfig.n_prompts = 2",
    "RewardConfig.heldout_prompts = 2",
    "RewardConfig.steps = 2",
    "RewardConfig.batch_size = 2",
    "RewardConfig.norm_samples = 16",
    "RewardConfig.max_new_tokens = 12",
    "RewardConfig.seed = 0",
    "PPOConfig.steps = 2",
    "PPOConfig.batch_size = 16",
    "PPOConfig.minibatches = 2",
    "PPOConfig.epochs = 1",
    "PPOConfig.n_prompts = 16",
    "PPOConfig.eval_prompts = 16",
    "PPOConfig.max_new_tokens = 12",
    "PPOConfig.kl_target = 3.0",
    "OptimizerConfig.warmup_steps = 1",
    "OptimizerConfig.decay = 'constant'",
    "MeshConfig.shape = {'data': 1, 'fsdp': 1, 'tensor': 1}",
]
SUMMARY_KEYS = (
    "reward/heldout_accuracy",
    "ppo/gold_reward_start",
    "ppo/gold_reward_start_std",
    "ppo/gold_reward_end",
    "ppo/kl_end",
    "ppo/kl_target",
    "ppo/ptx_lm_loss_start",
    "ppo/ptx_lm_loss_end",
    "sft/loss",
    "sft/heldout_loss",
    "pretrain/loss",
)


def _clear_gin():
    gin.clear_config()  # also unlocks what main()'s parse locked


@pytest.fixture
def clean_gin():
    _clear_gin()
    yield
    _clear_gin()


def _flags(bindings):
    return [f"--gin_bindings={b}" for b in bindings]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`gptjax rlhf` once; returns its workdir."""
    work = str(tmp_path_factory.mktemp("rlhf") / "run")
    _clear_gin()
    try:
        with compilation_cache(str(tmp_path_factory.mktemp("jax_compilation_cache"))):
            assert main_lib.main(["rlhf", f"--workdir={work}", *_flags(TINY)]) == 0
    finally:
        _clear_gin()
    return work


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_rlhf_writes_a_finite_summary_and_a_plot(run):
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    for key in SUMMARY_KEYS:
        assert isinstance(summary[key], float), key
    numbers = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
    assert all(math.isfinite(v) for v in numbers.values()), numbers
    assert summary["ppo/kl_target"] == 3.0 and summary["ppo/steps"] == 2
    assert 0.0 <= summary["reward/heldout_accuracy"] <= 1.0
    assert summary["stages"] == {s: os.path.join(run, s) for s in ("sft", "reward", "ppo")}
    for stage in ("sft", "reward", "ppo"):
        assert os.path.exists(os.path.join(run, stage, "summary.json")), stage
    assert summary["plot"] == os.path.join(run, "ppo_curves.png")
    assert os.path.getsize(summary["plot"]) > 1000


def test_ppo_starts_at_the_reference_policy(run):
    rows = _rows(os.path.join(run, "ppo"))
    assert [r["step"] for r in rows] == [1, 2]
    for name in (
        "objective/kl",
        "objective/scores",
        "objective/kl_coef",
        "policy/approxkl",
        "policy/clipfrac",
        "val/clipfrac",
        "ppo/returns/mean",
        "ppo/gold_reward",
    ):
        assert name in rows[0], name
        assert all(math.isfinite(r[name]) for r in rows), name
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
    # The first minibatch of the first update sees the policy that sampled (no-ptx path).
    assert rows[0]["policy/ratio_mean/first_minibatch"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["policy/approxkl/first_minibatch"] < 1e-9
    assert rows[0]["policy/clipfrac/first_minibatch"] == 0.0
    assert rows[0]["val/clipfrac/first_minibatch"] == 0.0
    assert rows[0]["objective/kl_coef"] == pytest.approx(0.02)  # PPOConfig's default β
    # The adaptive controller moved β for iteration 2 (KL 0 < target: β shrinks).
    assert rows[1]["objective/kl_coef"] < rows[0]["objective/kl_coef"]


def test_chat_with_the_ppo_policy(run, monkeypatch, capsys, clean_gin):
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me about the sea.\nDescribe my cat.\n"))
    assert main_lib.main(["chat", f"--workdir={run}/ppo", "--max_new_tokens=10"]) == 0
    assert capsys.readouterr().out.count("Assistant: ") == 2


def test_cli_errors_are_one_line(tmp_path, capsys, clean_gin):
    code = main_lib.main(
        [
            "ppo",
            f"--workdir={tmp_path}/p",
            f"--sft_workdir={tmp_path}/none",
            f"--reward_workdir={tmp_path}/none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "gptjax ppo: error: no config.json" in err
    _clear_gin()  # main() locks the gin config it parsed
    code = main_lib.main(
        [
            "reward",
            f"--workdir={tmp_path}/r",
            f"--sft_workdir={tmp_path}",
            "--gin_bindings=RewardConfig.k = 1",
        ]
    )
    assert code == 1 and "at least 2 responses" in capsys.readouterr().err
