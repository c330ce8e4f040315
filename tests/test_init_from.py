"""init_from: every trainer starts from another workdir's params (an earlier run, an imported
GPT-2) with a fresh optimizer and step 0; any mesh; configs and tokenizers checked; a run
with its own checkpoint resumes instead."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import EncoderConfig, ModelConfig
from gptjax.data.config import DataConfig, run_datasets
from gptjax.data.tokenizer import ByteTokenizer, CharTokenizer
from gptjax.models import family
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.research import finetune
from gptjax.rlhf import pipeline, ppo, reward, sft, tasks
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training import loop
from gptjax.training import workdir as workdir_lib
from gptjax.training.metrics import read_metrics
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig, abstract_state, make_trainer

MODEL = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=300, max_len=64)
DP = sharding.MeshConfig(shape={"data": -1, "fsdp": 1, "tensor": 1}, rules="dp")
FSDP = sharding.MeshConfig(shape={"data": 1, "fsdp": -1, "tensor": 1}, rules="fsdp")
OPT = OptimizerConfig(peak_lr=3e-3, warmup_steps=1)


def _mesh(mesh_cfg):
    return sharding.make_mesh(mesh_cfg), logical.logical_axis_rules(mesh_cfg.rules)


def _train_cfg(cache, **kw):
    base = dict(
        steps=2,
        batch_size=8,
        seq_len=16,
        log_every=1,
        eval_every=100,
        eval_batches=1,
        checkpoint_every=2,
        compilation_cache_dir=cache,
    )
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def env(corpus, tmp_path_factory):
    """Workdir A: 2 steps of `gptjax train` (dp over 8 devices, byte tokenizer)."""
    root = tmp_path_factory.mktemp("init_from")
    data = DataConfig(  # a large validation split: fine-tuning makes its eval task from it
        dataset=corpus, tokenizer="byte", data_dir=str(root / "data"), validation_fraction=0.3
    )
    cache = str(root / "jax_cache")
    a = str(root / "A")
    loop.train(
        a, model_cfg=MODEL, train_cfg=_train_cfg(cache), opt_cfg=OPT, data_cfg=data, mesh_cfg=DP
    )
    return {"root": root, "data": data, "cache": cache, "A": a}


def _saved_state(workdir, cfg, opt_cfg, mesh_cfg):
    """Independent reference: the whole TrainState of the newest checkpoint, restored by the
    checkpoint module (the path a resume takes)."""
    mesh, rules = _mesh(mesh_cfg)
    trainer = make_trainer(cfg, opt_cfg, 2, mesh, rules, 8)
    with ckpt_lib.CheckpointManager(workdir, read_only=True) as manager:
        step, state, _ = manager.restore(abstract_state(trainer))
    return step, jax.device_get(state)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_init_from_starts_with_the_source_params_and_a_fresh_optimizer(env):
    step, saved = _saved_state(env["A"], MODEL, OPT, DP)
    assert step == 2
    mesh, rules = _mesh(FSDP)
    trainer = make_trainer(MODEL.replace(resid_dropout=0.1), OPT, 10, mesh, rules, 8)
    state, source_step = loop.fresh_state(trainer, TrainConfig(init_from=env["A"], seed=3))
    assert source_step == 2 and int(state.step) == 0
    _assert_trees_equal(jax.device_get(state.params), saved.params)
    # Fresh AdamW: zero moments, zero counts (the source's are not), the seed's rng.
    moments = [x for x in jax.tree.leaves(jax.device_get(state.opt_state))]
    assert moments and all(not np.any(np.asarray(x)) for x in moments)
    assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(saved.opt_state))
    np.testing.assert_array_equal(state.rng, trainer.init_train_state(3).rng)
    # On the run's mesh: the embedding split over fsdp, as the trainer lays it out.
    assert state.params["wte"].sharding == trainer.state_shardings.params["wte"]
    assert "fsdp" in state.params["wte"].sharding.spec


def _first_batch(data_cfg):
    """Batch 0 of the run's data (as the loop takes it), rebuilt from the corpus."""
    train_iter, _ = run_datasets(
        data_cfg,
        ByteTokenizer(),
        task_format=family.family_of(MODEL).task_format,
        seq_len=16,
        batch_size=8,
        seed=0,
    )
    return {"tokens": jnp.asarray(train_iter.take(8)[0]["tokens"])}


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


def test_continued_pretraining_starts_where_the_source_ended_then_resumes_itself(env):
    """B = `train` with init_from=A on another mesh: its first loss is A's final params' loss
    on batch 0, A's tokenizer is B's. Rerun longer, B resumes its own checkpoint and never
    reads init_from (here a workdir that does not exist)."""
    b, cache, data = str(env["root"] / "B"), env["cache"], env["data"]
    summary = loop.train(
        b,
        model_cfg=MODEL,
        train_cfg=_train_cfg(cache, init_from=env["A"]),
        opt_cfg=OPT,
        data_cfg=data,
        mesh_cfg=FSDP,
    )
    assert summary["start_step"] == 0 and summary["end_step"] == 2
    assert summary["init_from"] == env["A"] and summary["init_from_step"] == 2
    batch = _first_batch(data)
    loss = jax.jit(lambda p: family.loss(MODEL, p, batch))
    _, saved = _saved_state(env["A"], MODEL, OPT, DP)
    fresh = make_trainer(MODEL, OPT, 2, *_mesh(DP), 8).init_train_state(0)
    # The reference batch is the loop's: A's first loss is its random init's on it...
    np.testing.assert_allclose(_losses(env["A"])[1], float(loss(fresh.params)), rtol=1e-5)
    # ...and B's first loss is A's final params' on it.
    np.testing.assert_allclose(_losses(b)[1], float(loss(saved.params)), rtol=1e-5)
    assert abs(_losses(b)[1] - _losses(env["A"])[1]) > 1e-3
    fingerprint = workdir_lib.source_tokenizer(env["A"]).fingerprint
    assert workdir_lib.source_tokenizer(b).fingerprint == fingerprint
    with open(os.path.join(b, "config.json")) as f:
        assert json.load(f)["train"]["init_from"] == env["A"]

    missing = str(env["root"] / "no_such_workdir")
    again = loop.train(
        b,
        model_cfg=MODEL,
        train_cfg=_train_cfg(cache, steps=4, checkpoint_every=4, init_from=missing),
        opt_cfg=OPT,
        data_cfg=data,
        mesh_cfg=FSDP,
    )
    assert again["start_step"] == 2 and again["end_step"] == 4
    assert "init_from" not in again and not os.path.exists(missing)
    assert sorted(_losses(b)) == [1, 2, 3, 4]


def _one_device_workdir(path, cfg, seed, steps=(3,)):
    """A policy workdir written from one device (`sft.save_policy`, as SFT and PPO write
    theirs), its checkpoints at `steps` with different params; returns their params."""
    mesh, rules = sft.stage_mesh(sharding.MeshConfig(shape={"data": 1, "fsdp": 1, "tensor": 1}))
    assert mesh.devices.size == 1
    trainer = make_trainer(cfg, OPT, 2, mesh, rules, 8)
    saved = {}
    for i, step in enumerate(steps):
        state = trainer.init_train_state(seed + i).replace(step=jnp.asarray(step, jnp.int32))
        saved[step] = jax.device_get(state.params)
        if i == 0:
            train_cfg = TrainConfig(steps=step, batch_size=8, seq_len=16)
            sft.save_policy(path, state, cfg, OPT, ByteTokenizer(), train_cfg)
        else:
            with ckpt_lib.CheckpointManager(path, max_to_keep=None) as manager:
                manager.save(step, state, {}, force=True)
    return saved


def test_params_restore_from_one_device_onto_fsdp_over_8_in_the_run_dtype(tmp_path):
    work = str(tmp_path / "one")
    saved = _one_device_workdir(work, MODEL, seed=5)[3]
    mesh, rules = _mesh(FSDP)
    run_cfg = MODEL.replace(resid_dropout=0.1, dtype="bfloat16", remat="full", scan_layers=True)
    src = workdir_lib.init_params_from(work, run_cfg, mesh, rules)
    assert src.step == 3 and src.cfg == run_cfg
    _assert_trees_equal(jax.device_get(src.params), saved)
    assert jax.tree.leaves(src.params)[0].sharding.mesh.devices.size == 8
    specs = jax.tree.map(lambda x: x.sharding, src.params)
    assert specs == sharding.param_shardings(MODEL, mesh, rules)
    assert any("fsdp" in x.sharding.spec for x in jax.tree.leaves(src.params))
    # param_dtype may differ: the saved float32 values, cast.
    half = workdir_lib.init_params_from(work, run_cfg.replace(param_dtype="bfloat16"), mesh, rules)
    for x, y in zip(jax.tree.leaves(half.params), jax.tree.leaves(saved)):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y).astype(jnp.bfloat16))


def test_a_step_failing_its_checksums_falls_back_to_the_older_one(tmp_path):
    work = str(tmp_path / "two")
    saved = _one_device_workdir(work, MODEL, seed=1, steps=(3, 6))
    path = os.path.join(work, "checkpoints", "6", "checksums", "metadata")
    with open(path) as f:
        checksums = json.load(f)
    checksums["leaves"][".params['wte']"]["fp"] = "0" * 16
    with open(path, "w") as f:
        json.dump(checksums, f)
    src = workdir_lib.init_params_from(work, MODEL)
    assert src.step == 3
    _assert_trees_equal(jax.device_get(src.params), saved[3])


def test_a_model_config_mismatch_names_each_field_and_both_values(env, tmp_path):
    with pytest.raises(ValueError) as e:
        workdir_lib.init_params_from(env["A"], MODEL.replace(n_layers=3, vocab_size=512))
    msg = str(e.value)
    assert "\n" not in msg
    assert "n_layers 2 vs 3" in msg and "vocab_size 300 vs 512" in msg
    assert "d_model" not in msg
    encoder = EncoderConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=300, max_len=64)
    with pytest.raises(ValueError, match="family 'decoder' vs 'encoder'"):
        workdir_lib.init_params_from(env["A"], encoder)
    # Through `train`, before any data is prepared or anything is written.
    c = str(tmp_path / "C")
    with pytest.raises(ValueError, match="pos_embedding 'learned' vs 'rope'"):
        loop.train(
            c,
            model_cfg=MODEL.replace(pos_embedding="rope"),
            train_cfg=_train_cfg(env["cache"], init_from=env["A"]),
            opt_cfg=OPT,
            data_cfg=env["data"],
            mesh_cfg=DP,
        )
    assert not os.path.exists(os.path.join(c, "tokenizer.json"))


def test_the_source_tokenizer_is_adopted_and_another_one_refused(env, tmp_path):
    run = str(tmp_path / "run")
    tokenizer = workdir_lib.adopt_tokenizer(env["A"], run, DataConfig(tokenizer="bpe"))
    assert isinstance(tokenizer, ByteTokenizer)
    assert workdir_lib.source_tokenizer(run).fingerprint == tokenizer.fingerprint
    other = str(tmp_path / "char")
    path = CharTokenizer.from_texts(["def f(x):\n    return x\n"]).save(other)
    with pytest.raises(ValueError, match="another tokenizer than DataConfig.tokenizer_path"):
        workdir_lib.adopt_tokenizer(env["A"], str(tmp_path / "r2"), DataConfig(tokenizer_path=path))
    with pytest.raises(ValueError, match=f"another tokenizer than the one in '{other}'"):
        workdir_lib.adopt_tokenizer(env["A"], other)
    assert not os.path.exists(tmp_path / "r2")


def _moments_are_zero(state):
    leaves = jax.tree.leaves(jax.device_get(state.opt_state))
    return bool(leaves) and all(not np.any(np.asarray(x)) for x in leaves)


def _rm_head_reference(key):
    """lm-human-preferences' scalar head: N(0, 1/sqrt(d + 1)) kernel, zero bias (d = 32)."""
    return np.asarray(jax.random.normal(key, (32,))) / np.sqrt(33.0)


def test_the_reward_model_takes_the_trunk_from_init_from_and_a_fresh_head(env):
    mesh, rules = _mesh(FSDP)
    key = jax.random.key(4)
    cfg, _, state = reward.start_reward(env["A"], ByteTokenizer(), OPT, 2, mesh, rules, key)
    assert cfg == MODEL and int(state.step) == 0 and _moments_are_zero(state)
    _, saved = _saved_state(env["A"], MODEL, OPT, DP)
    _assert_trees_equal(jax.device_get(state.params["trunk"]), saved.params)  # tied: no lm_head
    head = jax.device_get(state.params["head"])
    np.testing.assert_allclose(head["kernel"], _rm_head_reference(jax.random.fold_in(key, 2)))
    assert float(head["bias"]) == 0.0
    other = CharTokenizer.from_texts(["abc"])
    with pytest.raises(ValueError, match="another tokenizer than the SFT policy's"):
        reward.start_reward(env["A"], other, OPT, 2, mesh, rules, key)


def test_finetune_takes_the_trunk_from_the_pretrained_workdir_and_a_fresh_head(env):
    """The pieces, then a 2-step run end to end (its task data from A's corpus); a rerun
    into the same out_dir returns the saved summary and trains nothing."""
    ft = finetune.FinetuneConfig(
        steps=2, batch_size=8, seq_len=32, n_train=32, n_eval=16, log_every=1, seed=2
    )
    mesh, rules = _mesh(FSDP)
    src, params = finetune.initial_params(env["A"], ft, mesh, rules)
    _, saved = _saved_state(env["A"], MODEL, OPT, DP)
    _assert_trees_equal(jax.device_get(params["gpt"]), saved.params)
    assert params["gpt"]["wte"].sharding == sharding.param_shardings(MODEL, mesh, rules)["wte"]
    n_classes = finetune.TASKS[ft.task][1]
    kernel = 0.02 * np.asarray(jax.random.normal(jax.random.key(2), (32, n_classes)))
    np.testing.assert_allclose(params["head"]["kernel"], kernel, rtol=1e-6)
    np.testing.assert_array_equal(params["head"]["bias"], np.zeros(n_classes))
    assert src.step == 2 and src.cfg == MODEL

    out = str(env["root"] / "finetuned")
    summary = finetune.finetune(env["A"], out, ft, mesh_cfg=FSDP)
    assert summary["pretrained_step"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    rows = len(read_metrics(out))
    assert finetune.finetune(env["A"], out, ft, mesh_cfg=FSDP) == summary
    assert len(read_metrics(out)) == rows


def test_sft_from_init_from_trains_from_the_source_params(env):
    work = str(env["root"] / "sft")
    sft_cfg = sft.SFTConfig(
        init_from=env["A"], steps=2, batch_size=8, seq_len=60, n_demonstrations=16, log_every=1
    )
    summary = sft.run_sft(work, sft_cfg=sft_cfg, opt_cfg=OPT, task=tasks.make_task(), mesh_cfg=DP)
    assert summary["sft/pretrain_steps"] == 0 and np.isfinite(summary["sft/loss"])
    cfg, params, tokenizer = sft.load_policy(work)
    assert cfg == MODEL and tokenizer.fingerprint == ByteTokenizer().fingerprint
    _, saved = _saved_state(env["A"], MODEL, OPT, DP)
    moved = [
        np.max(np.abs(np.asarray(x) - y))
        for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(saved.params))
    ]
    # Every update moves a weight by at most ~lr (Adam), so 2 steps stay within 2 lr of A's
    # params: SFT started there (a random init is ~0.02 away), and it changed them.
    assert 0.0 < max(moved) <= 2 * OPT.peak_lr * 1.05, moved
    # A second run in the finished workdir returns its summary and trains nothing.
    rows = len(read_metrics(work))
    assert sft.run_sft(work, sft_cfg=sft_cfg, opt_cfg=OPT, task=tasks.make_task()) == summary
    assert len(read_metrics(work)) == rows


def test_ppo_policy_and_critic_start_from_their_init_from_workdirs(env, tmp_path):
    """Policy from init_from (the reference stays SFT's), critic from a reward workdir (its
    normalisation folded in) or from any workdir's trunk with a fresh head."""
    policy_dir = str(tmp_path / "policy")
    policy = _one_device_workdir(policy_dir, MODEL, seed=9)[3]
    _, saved = _saved_state(env["A"], MODEL, OPT, DP)
    rm_params = jax.device_get(reward.from_policy(MODEL, policy, jax.random.key(1)))
    rm_dir, norm = str(tmp_path / "rm"), {"gain": np.float32(2.0), "bias": np.float32(0.5)}
    reward.save_reward(rm_dir, MODEL, rm_params, norm, {"stage": "reward"}, ByteTokenizer())
    mesh, rules = _mesh(FSDP)
    rm = reward.load_reward(rm_dir, mesh, rules)
    ppo_cfg = ppo.PPOConfig(init_from=policy_dir, critic_init_from=env["A"], seed=5)
    fns = ppo.make_ppo(MODEL, MODEL, ppo_cfg, OPT, 8, mesh, rules)
    args = (fns, MODEL, ByteTokenizer(), env["A"], rm_dir, rm, ppo_cfg, mesh, rules)
    models, state = pipeline.start_ppo(*args)
    _assert_trees_equal(jax.device_get(models["ref"]), saved.params)
    _assert_trees_equal(jax.device_get(state.params["policy"]), policy)
    _assert_trees_equal(jax.device_get(state.params["critic"]["trunk"]), saved.params)
    head = jax.device_get(state.params["critic"]["head"])
    key = jax.random.fold_in(jax.random.key(5), 3)
    np.testing.assert_allclose(head["kernel"], _rm_head_reference(key))
    assert int(state.step) == 0 and _moments_are_zero(state)

    models, state = pipeline.start_ppo(
        *args[:6], ppo.PPOConfig(critic_init_from=rm_dir), mesh, rules
    )
    _assert_trees_equal(jax.device_get(state.params["policy"]), saved.params)
    critic = jax.device_get(state.params["critic"])
    _assert_trees_equal(critic["trunk"], rm_params["trunk"])
    np.testing.assert_allclose(critic["head"]["kernel"], 2.0 * rm_params["head"]["kernel"])
    np.testing.assert_allclose(critic["head"]["bias"], 2.0 * rm_params["head"]["bias"] + 0.5)
    with pytest.raises(ValueError, match="d_model 64 vs 32"):
        wide = MODEL.replace(d_model=64)
        reward.save_reward(str(tmp_path / "wide"), wide, {}, {}, {"stage": "reward"})
        pipeline.start_ppo(
            *args[:6], ppo.PPOConfig(critic_init_from=str(tmp_path / "wide")), mesh, rules
        )
