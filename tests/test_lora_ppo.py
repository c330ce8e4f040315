"""LoRA on the online RL policy (PPO / RLOO / GRPO share the trainer): at step 0 the merged
policy is the base exactly, an iteration moves only the adapters (the base is bit-identical),
the policy's change is low-rank per layer, and the optimizer state holds adapters only."""

import jax
import numpy as np
import pytest

from gptjax.models import lora
from gptjax.parallel.mesh import MeshConfig
from gptjax.rlhf import chat, ppo, reward, sft
from gptjax.training.optimizer import OptimizerConfig, make_optimizer
from tests.rlhf_fixtures import CFG, TOK, params

WIDTH, RANK = 5, 2
CONFIG = ppo.PPOConfig(
    algo="grpo",
    group_size=2,
    batch_size=4,
    minibatches=1,
    epochs=2,
    max_new_tokens=6,
    temperature=1.0,
    lora_rank=RANK,
)
OPT = OptimizerConfig(peak_lr=3e-2, warmup_steps=0, decay="constant")


@pytest.fixture(scope="module")
def run():
    mesh, rules = sft.stage_mesh(MeshConfig(shape={"data": 1}))
    fns = ppo.make_ppo(CFG, CFG, CONFIG, OPT, WIDTH, mesh, rules)
    base = jax.device_get(params(0))
    state = ppo.init_state(fns, base, None, 0)
    start = jax.device_get(fns.params(state)["policy"])
    models = {
        "ref": base,
        "rm": reward.from_policy(CFG, params(1), jax.random.key(2)),
        "norm": reward.identity_norm(),
    }
    batch = chat.generate_replies(
        CFG, start, TOK, [[72, 105], [72, 105], [9, 8], [9, 8]], WIDTH,
        key=jax.random.key(3), max_new_tokens=6, temperature=1.0,
    )  # fmt: skip
    batch["done"] = np.array([True, False, True, True])  # distinct scores within each group
    after, stats = ppo.iteration(fns, state, models, 0.1, batch, None)
    return fns, base, start, jax.device_get(after.params), jax.device_get(fns.params(after)), stats


def test_the_merged_policy_starts_as_the_base_exactly(run):
    _, base, start, _, _, _ = run
    jax.tree.map(np.testing.assert_array_equal, start, base)


def test_an_iteration_moves_only_the_adapters_by_a_low_rank_update(run):
    _, base, _, raw, merged, stats = run
    assert stats["policy/ratio_mean/first_minibatch"] == pytest.approx(1.0, abs=1e-5)
    jax.tree.map(np.testing.assert_array_equal, raw["policy"]["frozen"], base)
    b = raw["policy"]["adapters"]["h"]["mlp"]["c_fc"]["b"]
    assert np.abs(b).max() > 0  # b started at zero
    diff = np.asarray(merged["policy"]["h"]["mlp"]["c_fc"]["kernel"], np.float64)
    diff = diff - np.asarray(base["h"]["mlp"]["c_fc"]["kernel"], np.float64)
    for layer in diff:
        assert 0 < np.linalg.matrix_rank(layer.reshape(layer.shape[0], -1), tol=1e-6) <= RANK
    # Parameters outside the adapted kernels (embeddings, norms) never change.
    np.testing.assert_array_equal(merged["policy"]["wte"], base["wte"])


def test_the_optimizer_state_covers_the_adapters_only(run):
    fns, base, _, raw, _, _ = run
    full = lora.optimizer_state_bytes(make_optimizer(OPT, 10), {"policy": base})
    got = lora.optimizer_state_bytes(fns.optimizer, {"policy": raw["policy"]})
    want = lora.optimizer_state_bytes(make_optimizer(OPT, 10), raw["policy"]["adapters"])
    assert got <= want + 64 and got < full / 4


def test_cli_lora_rank_reaches_the_stage_config_and_bad_ranks_are_one_line(tmp_path, capsys):
    import gin

    from gptjax.cli import main as main_lib

    gin.clear_config()
    try:
        code = main_lib.main(["sft", f"--workdir={tmp_path}/s", "--lora_rank=-1"])
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    assert code == 1 and "SFTConfig.lora_rank must be >= 0" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="PPOConfig.lora_rank"):
        ppo.PPOConfig(lora_rank=-2)
