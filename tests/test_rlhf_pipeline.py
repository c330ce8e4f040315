"""The three stages end to end through the CLI (tiny and few steps), then chat with the policy."""

import io
import json
import os

import gin
import pytest

from gptjax import main as main_lib

TINY = [
    "ModelConfig.n_layers = 1", "ModelConfig.d_model = 32", "ModelConfig.n_heads = 2",
    "ModelConfig.vocab_size = 512", "ModelConfig.max_len = 48",
    "SFTConfig.pretrain_steps = 4", "SFTConfig.steps = 4", "SFTConfig.batch_size = 8",
    "SFTConfig.seq_len = 32", "SFTConfig.n_demonstrations = 32", "SFTConfig.log_every = 2",
    "SFTConfig.tokenizer_vocab_size = 400",
    "RewardConfig.n_prompts = 16", "RewardConfig.heldout_prompts = 8", "RewardConfig.steps = 2",
    "RewardConfig.batch_size = 4", "RewardConfig.norm_samples = 16",
    "RewardConfig.max_new_tokens = 12",
    "PPOConfig.steps = 2", "PPOConfig.batch_size = 8", "PPOConfig.minibatches = 2",
    "PPOConfig.epochs = 1", "PPOConfig.n_prompts = 16", "PPOConfig.eval_prompts = 8",
    "PPOConfig.max_new_tokens = 12", "PPOConfig.kl_target = 3.0",
    "OptimizerConfig.warmup_steps = 1", "OptimizerConfig.decay = 'constant'",
    "MeshConfig.shape = {'data': 1, 'fsdp': 1, 'tensor': 1}",
]


def _clear_gin():
    gin.clear_config()  # also unlocks what main()'s parse locked


@pytest.fixture
def clean_gin():
    _clear_gin()
    yield
    _clear_gin()


def _flags(bindings):
    return [f"--gin_bindings={b}" for b in bindings]


def test_rlhf_pipeline_writes_summary_and_plot_then_chats(tmp_path, monkeypatch, capsys,
                                                          clean_gin):
    work = str(tmp_path / "run")
    assert main_lib.main(["rlhf", f"--workdir={work}", *_flags(TINY)]) == 0
    with open(os.path.join(work, "summary.json")) as f:
        summary = json.load(f)
    for key in ("reward/heldout_accuracy", "ppo/gold_reward_start", "ppo/gold_reward_start_std",
                "ppo/gold_reward_end", "ppo/kl_end", "ppo/kl_target", "ppo/ptx_lm_loss_end"):
        assert isinstance(summary[key], float), key
    assert summary["ppo/kl_target"] == 3.0
    assert os.path.getsize(os.path.join(work, "ppo_curves.png")) > 1000
    with open(os.path.join(work, "ppo", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 2
    for name in ("objective/kl", "objective/scores", "objective/kl_coef", "policy/approxkl",
                 "policy/clipfrac", "val/clipfrac", "ppo/returns/mean", "ppo/gold_reward"):
        assert name in rows[0], name
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference

    _clear_gin()
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me about the sea.\nDescribe my cat.\n"))
    assert main_lib.main(["chat", f"--workdir={work}/ppo", "--max_new_tokens=10"]) == 0
    assert capsys.readouterr().out.count("Assistant: ") == 2


def test_cli_errors_are_one_line(tmp_path, capsys, clean_gin):
    code = main_lib.main(["ppo", f"--workdir={tmp_path}/p", f"--sft_workdir={tmp_path}/none",
                          f"--reward_workdir={tmp_path}/none"])
    err = capsys.readouterr().err
    assert code == 1 and "gptjax ppo: error: no config.json" in err
    _clear_gin()  # main() locks the gin config it parsed
    code = main_lib.main(["reward", f"--workdir={tmp_path}/r", f"--sft_workdir={tmp_path}",
                          "--gin_bindings=RewardConfig.k = 1"])
    assert code == 1 and "at least 2 responses" in capsys.readouterr().err
