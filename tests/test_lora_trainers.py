"""LoRA in the trainers: adapted subtrees merge to the base exactly at init, a train step moves
the adapters exactly as the optimizer over the adapters alone would and the base never, the
optimizer state is the adapters' (and head's) only, and SFT, DPO, the reward model and
fine-tuning run end to end with lora_rank, saving ordinary params whose change from their
base is of rank <= r per adapted kernel (checked with NumPy's SVD)."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from gptjax.config import ModelConfig, Seq2SeqConfig
from gptjax.data.config import DataConfig
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.models import gpt, lora
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.research import finetune
from gptjax.rlhf import dpo, reward, sft
from gptjax.training import step as step_lib
from gptjax.training.optimizer import OptimizerConfig, make_optimizer
from gptjax.training.step import TrainConfig, TrainState

TOK = ByteTokenizer()
CFG = ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=TOK.vocab_size, max_len=64)
LORA = lora.LoRAConfig(rank=4, alpha=8.0)
OPT = OptimizerConfig(peak_lr=1e-2, warmup_steps=0, decay="constant")
DP = sharding.MeshConfig(shape={"data": -1, "fsdp": 1, "tensor": 1}, rules="dp")
FSDP = sharding.MeshConfig(shape={"data": 1, "fsdp": -1, "tensor": 1}, rules="fsdp")

_init = jax.jit(gpt.init_params, static_argnums=0)


def _base():
    return jax.device_get(_init(CFG, jax.random.key(0)))


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)}


# keystr path of each adapted kernel -> its LoRA target name.
TARGET_PATHS = {"['h']['{}']['{}']['kernel']".format(*t.split(".")): t for t in LORA.targets}


def assert_low_rank_update(after, before, rank: int):
    """Every adapted kernel changed by a nonzero update of rank <= `rank` per layer (its
    (fan_in, fan_out) matrix); every other leaf is bit-identical to `before`."""
    a, b = _leaves(after), _leaves(before)
    assert a.keys() == b.keys()
    n_adapted = 0
    for path, x in a.items():
        if path not in TARGET_PATHS:
            np.testing.assert_array_equal(x, b[path], err_msg=path)
            continue
        n_in = lora.INPUT_DIMS[TARGET_PATHS[path]]
        for layer in range(x.shape[0]):
            d = np.asarray(x[layer], np.float64) - np.asarray(b[path][layer], np.float64)
            d = d.reshape(math.prod(d.shape[:n_in]), -1)
            s = np.linalg.svd(d, compute_uv=False)
            assert s[0] > 1e-4, f"{path} did not change"
            assert np.linalg.matrix_rank(d, tol=1e-4 * s[0]) <= rank, (path, s[: rank + 2])
            n_adapted += 1
    assert n_adapted == len(LORA.targets) * CFG.n_layers


# --------------------------------------------------------------------------- the pieces


def test_materialize_at_init_is_the_base_and_leaves_other_nodes_alone():
    base = _base()
    head = reward.init_head(jax.random.key(1), CFG.d_model)
    tree = {"trunk": lora.attach(LORA, base, jax.random.key(2)), "head": head}
    assert lora.is_adapted(tree["trunk"]) and not lora.is_adapted(tree)
    assert not lora.is_adapted({"frozen": base, "adapters": {}, "x": 1})
    merged = lora.materialize(LORA, tree)
    assert jax.tree.structure(merged) == jax.tree.structure({"trunk": base, "head": head})
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves({"trunk": base, "head": head})):
        np.testing.assert_array_equal(x, y)
    assert lora.materialize(None, {"trunk": base}) == {"trunk": base}
    with pytest.raises(ValueError, match="no LoRAConfig"):
        lora.materialize(None, tree)
    with pytest.raises(ValueError, match="SFTConfig.lora_rank"):
        sft.SFTConfig(lora_rank=-1)
    assert sft.SFTConfig().lora is None and dpo.DPOConfig(lora_rank=2).lora.rank == 2
    s2s = Seq2SeqConfig(n_layers=1, d_model=16, n_heads=2, vocab_size=37, max_len=8)
    with pytest.raises(ValueError, match="not an encoder-decoder"):
        finetune.adapt_trunk(s2s, finetune.FinetuneConfig(lora_rank=2), {"gpt": {}, "head": {}})


def _lm_batch(seed: int, b: int = 8, t: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
    return {"tokens": tokens, "loss_mask": (rng.random((b, t)) > 0.3).astype(np.int32)}


def test_frozen_gradients_are_zero_and_a_step_equals_the_optimizer_over_the_adapters():
    """SFT's LoRA trainer on fsdp over 8 devices, 3 steps, against a plain optimizer over the
    adapters alone on one device (loss of merge(base, adapters), the textbook route)."""
    mesh, rules = sharding.make_mesh(FSDP), logical.logical_axis_rules("fsdp")
    base = _base()
    objective = step_lib.family_objective(CFG)
    adapted = lora.attach(LORA, base, jax.random.key(3))

    def loss_of(params, batch):
        sums, weights, _ = objective(params, batch)
        return sums["loss"] / weights["loss"]

    grads = jax.jit(jax.grad(lambda p, b: loss_of(lora.materialize(LORA, p), b)))(
        adapted, _lm_batch(0)
    )
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads["frozen"]))
    assert float(jnp.abs(grads["adapters"]["h"]["mlp"]["c_fc"]["b"]).max()) > 0

    sft_cfg = sft.SFTConfig(steps=3, batch_size=8, lora_rank=LORA.rank, lora_alpha=LORA.alpha)
    full = step_lib.make_trainer(CFG, OPT, 3, mesh, rules, 8)
    trainer, state = sft.make_lora_trainer(full, OPT, sft_cfg, base)
    start = jax.device_get(state.params)
    reference, optimizer = start["adapters"], make_optimizer(OPT, 3)
    opt_state = optimizer.init(reference)
    ref_grad = jax.jit(jax.grad(lambda ad, b: loss_of(lora.merge(LORA, base, ad), b)))
    with logical.use_mesh(mesh, rules):
        for i in range(3):
            batch = _lm_batch(i + 1)
            state, _ = trainer.train_step(state, sharding.make_global_batch(batch, mesh, rules))
            updates, opt_state = optimizer.update(ref_grad(reference, batch), opt_state, reference)
            reference = optax.apply_updates(reference, updates)
    after = jax.device_get(state.params)
    for x, y in zip(jax.tree.leaves(after["frozen"]), jax.tree.leaves(start["frozen"])):
        np.testing.assert_array_equal(x, y)
    for x, y, x0 in zip(
        jax.tree.leaves(after["adapters"]),
        jax.tree.leaves(reference),
        jax.tree.leaves(start["adapters"]),
    ):
        assert np.abs(x - x0).max() > 1e-3  # a and b both moved (b first, then a)
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=2e-5)


def test_freeze_frozen_state_holds_the_adapters_and_head_only():
    base = jax.eval_shape(lambda: gpt.init_params(CFG, jax.random.key(0)))
    adapters = jax.eval_shape(lambda: lora.init_adapters(LORA, base, jax.random.key(0)))
    head = jax.eval_shape(lambda: reward.init_head(jax.random.key(0), CFG.d_model))
    opt = make_optimizer(OPT, 10)
    count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))
    cases = {
        "policy (SFT, DPO)": ({"frozen": base, "adapters": adapters}, adapters, base),
        "reward model": (
            {"trunk": {"frozen": base, "adapters": adapters}, "head": head},
            {"trunk": adapters, "head": head},
            {"trunk": base, "head": head},
        ),
    }
    for name, (adapted, trainable, plain) in cases.items():
        full = lora.optimizer_state_bytes(opt, plain)
        small = lora.optimizer_state_bytes(lora.freeze_frozen(opt), adapted)
        assert small == lora.optimizer_state_bytes(opt, trainable), name
        # Adam: two float32 moments per trainable parameter, plus its step counter.
        assert abs(small - 8 * count(trainable)) <= 16 and abs(full - 8 * count(plain)) <= 16
        print(f"{name}: optimizer state {full} B full, {small} B LoRA r={LORA.rank}")
    shards = sharding.lora_shardings(
        LORA,
        sharding.param_shardings(CFG, *_mesh_rules(FSDP)),
        gpt.param_axes(CFG),
        *_mesh_rules(FSDP),
    )
    assert shards["adapters"]["h"]["mlp"]["c_fc"]["a"].spec == jax.sharding.PartitionSpec(
        None, "fsdp", None
    )
    assert shards["frozen"]["wte"] == sharding.param_shardings(CFG, *_mesh_rules(FSDP))["wte"]


def _mesh_rules(mesh_cfg):
    return sharding.make_mesh(mesh_cfg), logical.logical_axis_rules(mesh_cfg.rules)


# ---------------------------------------------------------------------------- end to end


def _policy_workdir(path: str, params, data: DataConfig) -> str:
    """A policy workdir of `params` (byte tokenizer) whose config names `data`'s corpus."""
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state={},
        rng=jax.random.key_data(jax.random.key(0)),
    )
    sft.save_policy(path, state, CFG, OPT, TOK, TrainConfig(steps=1, batch_size=8, seq_len=16))
    with open(os.path.join(path, "config.json")) as f:
        configs = json.load(f)
    configs["data"] = dataclasses.asdict(data)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(configs, f)
    return path


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """A random base policy workdir and a LoRA SFT run from it (4 steps, r = 4)."""
    root = tmp_path_factory.mktemp("lora")
    data = DataConfig(
        dataset=corpus, tokenizer="byte", data_dir=str(root / "data"), validation_fraction=0.3
    )
    base = _policy_workdir(str(root / "base"), _base(), data)
    sft_cfg = sft.SFTConfig(
        init_from=base,
        steps=4,
        batch_size=8,
        seq_len=60,
        n_demonstrations=16,
        log_every=2,
        lora_rank=LORA.rank,
        lora_alpha=LORA.alpha,
    )
    work = str(root / "sft")
    summary = sft.run_sft(work, sft_cfg=sft_cfg, opt_cfg=OPT, mesh_cfg=DP)
    return {"root": root, "base": base, "sft": work, "sft_summary": summary, "sft_cfg": sft_cfg}


def test_lora_sft_saves_a_policy_that_is_the_base_plus_a_rank_r_update(runs):
    cfg, params, tokenizer = sft.load_policy(runs["sft"])
    assert cfg == CFG and tokenizer.fingerprint == TOK.fingerprint
    assert_low_rank_update(params, _base(), LORA.rank)
    summary = runs["sft_summary"]
    assert summary["sft/lora_rank"] == LORA.rank and np.isfinite(summary["sft/heldout_loss"])
    with open(os.path.join(runs["sft"], "config.json")) as f:
        assert json.load(f)["rlhf"]["lora_rank"] == LORA.rank
    # A finished stage is returned, not trained again.
    again = sft.run_sft(runs["sft"], sft_cfg=runs["sft_cfg"], opt_cfg=OPT, mesh_cfg=DP)
    assert again == summary


def _comparisons(runs) -> reward.RewardConfig:
    """20 HH-style chosen/rejected pairs (every one a pair, whatever the tiny policy says)."""
    path = runs["root"] / "hh.jsonl"
    with open(path, "w") as f:
        for i in range(20):
            human = f"\n\nHuman: is {i} odd?\n\nAssistant:"
            answer = ("Yes." if i % 2 else "No.", "Maybe later.")
            f.write(
                json.dumps({"chosen": human + " " + answer[0], "rejected": human + " " + answer[1]})
                + "\n"
            )
    return reward.RewardConfig(
        hh_path=str(path), hh_seq_len=40, max_new_tokens=6, norm_samples=16, seed=0
    )


def test_lora_dpo_from_the_lora_sft_workdir(runs):
    dpo_cfg = dpo.DPOConfig(
        beta=0.5, steps=4, batch_size=8, log_every=2, lora_rank=LORA.rank, lora_alpha=LORA.alpha
    )
    work = str(runs["root"] / "dpo")
    summary = dpo.run_dpo(
        work, runs["sft"], dpo_cfg=dpo_cfg, rm_cfg=_comparisons(runs), opt_cfg=OPT, mesh_cfg=DP
    )
    # Held-out stats at the start are the SFT policy's own (the reference): loss log 2.
    np.testing.assert_allclose(summary["heldout/loss_start"], math.log(2), rtol=1e-5)
    assert np.isfinite(summary["heldout/loss"]) and summary["dpo/lora_rank"] == LORA.rank
    _, before, _ = sft.load_policy(runs["sft"])
    _, after, _ = sft.load_policy(work)
    assert_low_rank_update(after, before, LORA.rank)


def test_lora_reward_model_trains_adapters_and_head_and_loads(runs):
    rm_cfg = dataclasses.replace(_comparisons(runs), steps=4, batch_size=8, lora_rank=LORA.rank)
    work = str(runs["root"] / "rm")
    summary = reward.run_reward(work, runs["sft"], rm_cfg=rm_cfg, opt_cfg=OPT, mesh_cfg=DP)
    assert summary["reward/lora_rank"] == LORA.rank and reward.is_reward_workdir(work)
    cfg, params, norm = reward.load_reward(work)
    assert cfg == CFG and np.isfinite(float(norm["gain"]))
    _, policy, _ = sft.load_policy(runs["sft"])
    trunk = {k: v for k, v in policy.items() if k != "lm_head"}
    # lora_alpha 16 / 4 here (RewardConfig's default alpha).
    assert_low_rank_update(params["trunk"], trunk, LORA.rank)
    head0 = reward.init_head(jax.random.fold_in(jax.random.key(0), 2), CFG.d_model)
    assert np.abs(np.asarray(params["head"]["kernel"]) - np.asarray(head0["kernel"])).max() > 1e-3


def test_lora_finetune_runs_and_saves_merged_params(runs):
    ft = finetune.FinetuneConfig(
        steps=3,
        batch_size=8,
        seq_len=32,
        n_train=32,
        n_eval=16,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        seed=2,
        lora_rank=4,
    )
    out = str(runs["root"] / "finetuned")
    summary = finetune.finetune(runs["base"], out, ft, mesh_cfg=FSDP)
    assert summary["lora_rank"] == 4 and 0.0 <= summary["accuracy"] <= 1.0
    saved = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(out, "params")))
    assert_low_rank_update(saved["gpt"], _base(), 4)
    n_classes = finetune.TASKS[ft.task][1]
    kernel0 = 0.02 * np.asarray(jax.random.normal(jax.random.key(2), (CFG.d_model, n_classes)))
    assert np.abs(np.asarray(saved["head"]["kernel"]) - kernel0).max() > 1e-3
