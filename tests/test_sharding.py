"""Sharding tests on 8 fake CPU devices (tests/conftest.py sets the XLA flag).

The central check: three AdamW steps on a mesh, for every rules preset, give the same losses
and parameters as the same steps on one device.
"""

import importlib.util  # noqa: F401  (gin 0.5.0 needs it imported before parsing)

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from gptjax.config import ModelConfig
from gptjax.models import gpt as model
from gptjax.parallel import logical
from gptjax.parallel import mesh as S

CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=128, max_len=32)
BATCH, SEQ = 8, 16

# A mesh per preset that exercises every axis the preset uses.
MESHES = {
    "dp": {"data": 8},
    "fsdp": {"data": 2, "fsdp": 4},
    "fsdp_tp": {"fsdp": 4, "tensor": 2},
    "tp": {"data": 2, "tensor": 4},
}


def mesh_for(preset, devices=None):
    return S.make_mesh(S.MeshConfig(shape=MESHES[preset], rules=preset), devices)


def test_eight_devices():
    assert len(jax.devices()) == 8, "tests/conftest.py should force 8 host devices"


# ------------------------------------------------------------------------- the mesh


def test_make_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = S.make_mesh(S.MeshConfig())
    assert mesh.axis_names == logical.MESH_AXES
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    mesh = S.make_mesh(S.MeshConfig(shape={"fsdp": -1, "tensor": 2}))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    mesh = S.make_mesh(S.MeshConfig(shape={"data": -1}), devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1}


def test_make_mesh_hybrid_on_one_process():
    mesh = S.make_mesh(S.MeshConfig(shape={"data": -1, "tensor": 2}, dcn_shape={"data": 1}))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_make_mesh_bad_sizes():
    with pytest.raises(ValueError, match=r"multiplies to 6 devices, but there are 8"):
        S.make_mesh(S.MeshConfig(shape={"data": 3, "fsdp": 2}))
    with pytest.raises(ValueError, match=r"multiply to 3, which does not divide the 8 devices"):
        S.make_mesh(S.MeshConfig(shape={"data": -1, "fsdp": 3}))
    with pytest.raises(ValueError, match="unknown axes"):
        S.MeshConfig(shape={"model": 2})
    with pytest.raises(ValueError, match="at most one -1"):
        S.MeshConfig(shape={"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="Unknown sharding rules preset 'zero'"):
        S.MeshConfig(rules="zero")


def test_mesh_config_is_hashable_and_fills_axes():
    a = S.MeshConfig(shape={"data": 2, "fsdp": 4})
    assert a.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert hash(a) == hash(S.MeshConfig(shape={"fsdp": 4, "data": 2, "tensor": 1}))


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_mesh_config_from_gin(clean_gin):
    gin.parse_config(
        "MeshConfig.shape = {'data': 2, 'fsdp': 4, 'tensor': 1}\nMeshConfig.rules = 'fsdp_tp'"
    )
    mesh_cfg = S.MeshConfig()
    assert mesh_cfg.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh_cfg.rules == "fsdp_tp"
    assert dict(S.make_mesh(mesh_cfg).shape) == mesh_cfg.shape


# ------------------------------------------------------------------------- the rules


def test_a_mesh_axis_is_used_once_first_rule_wins():
    rules = (("batch", "fsdp"), ("embed", "fsdp"))
    assert logical.logical_to_spec(("batch", "embed"), rules) == P("fsdp", None)
    assert logical.logical_to_spec(("embed",), rules) == P("fsdp")
    # Activations under fsdp: the batch takes fsdp, the residual stream stays whole.
    assert logical.logical_to_spec(("batch", "seq", "embed"), "fsdp") == P(
        ("data", "fsdp"), None, None
    )
    assert logical.logical_to_spec(("batch", "seq", "vocab"), "fsdp_tp") == P(
        ("data", "fsdp"), None, "tensor"
    )


def test_unknown_logical_name_raises():
    with pytest.raises(ValueError, match=r"Unknown logical axis names \['embd'\]"):
        logical.logical_to_spec(("batch", "embd"), "dp")


R = None  # replicated dimension, for the tables below
EXPECTED = {  # preset -> parameter -> PartitionSpec
    "dp": {},
    "fsdp": {
        "c_attn": P(R, "fsdp", R, R, R),
        "attn_proj": P(R, R, R, "fsdp"),
        "c_fc": P(R, "fsdp", R),
        "mlp_proj": P(R, R, "fsdp"),
        "wte": P(R, "fsdp"),
        "ln_1": P(R, "fsdp"),
        "ln_f": P("fsdp"),
        "c_fc_bias": P(R, R),
    },
    "fsdp_tp": {
        "c_attn": P(R, "fsdp", R, "tensor", R),
        "attn_proj": P(R, "tensor", R, "fsdp"),
        "c_fc": P(R, "fsdp", "tensor"),
        "mlp_proj": P(R, "tensor", "fsdp"),
        "wte": P("tensor", "fsdp"),
        "ln_1": P(R, "fsdp"),
        "ln_f": P("fsdp"),
        "c_fc_bias": P(R, "tensor"),
    },
    "tp": {
        "c_attn": P(R, R, R, "tensor", R),
        "attn_proj": P(R, "tensor", R, R),
        "c_fc": P(R, R, "tensor"),
        "mlp_proj": P(R, "tensor", R),
        "wte": P("tensor", R),
        "ln_1": P(R, R),
        "ln_f": P(R),
        "c_fc_bias": P(R, "tensor"),
    },
}


@pytest.mark.parametrize("preset", list(logical.PRESETS))
def test_param_specs_follow_the_rules(preset):
    sh = S.param_shardings(CFG, mesh_for(preset), preset)
    h = sh["h"]
    got = {
        "c_attn": h["attn"]["c_attn"]["kernel"],
        "attn_proj": h["attn"]["c_proj"]["kernel"],
        "c_fc": h["mlp"]["c_fc"]["kernel"],
        "mlp_proj": h["mlp"]["c_proj"]["kernel"],
        "wte": sh["wte"],
        "ln_1": h["ln_1"]["scale"],
        "ln_f": sh["ln_f"]["scale"],
        "c_fc_bias": h["mlp"]["c_fc"]["bias"],
    }
    for name, sharding in got.items():
        want = EXPECTED[preset].get(name, P(*(R,) * len(sharding.spec)))
        assert sharding.spec == want, (preset, name)
    if preset == "dp":  # fully replicated, every leaf
        assert all(all(a is None for a in s.spec) for s in jax.tree.leaves(sh))


def test_untied_lm_head_is_split_like_wte_transposed():
    sh = S.param_shardings(CFG.replace(tie_embeddings=False), mesh_for("fsdp_tp"), "fsdp_tp")
    assert sh["lm_head"].spec == P("fsdp", "tensor")


def test_opt_state_follows_params_and_scalars_are_replicated():
    mesh = mesh_for("fsdp_tp")
    psh = S.param_shardings(CFG, mesh, "fsdp_tp")
    abstract = jax.eval_shape(lambda k: model.init_params(CFG, k), jax.random.key(0))
    decay_mask = jax.tree.map(lambda a: a.ndim >= 2, abstract)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.linear_schedule(0.0, 1e-3, 10), mask=decay_mask),
    )
    osh = S.opt_state_shardings(opt, abstract, psh, mesh)
    adam = osh[1][0]  # chain -> adamw chain -> ScaleByAdamState
    assert adam.mu == psh and adam.nu == psh
    assert adam.count.spec == P() and osh[1][-1].count.spec == P()  # schedule count
    # The structure matches the real state, so it can be passed as out_shardings.
    state = jax.eval_shape(opt.init, abstract)
    assert jax.tree.structure(state) == jax.tree.structure(osh)


def test_batch_sharding():
    assert S.batch_sharding(mesh_for("fsdp"), "fsdp").spec == P(("data", "fsdp"), None)
    assert S.batch_sharding(mesh_for("tp"), "tp", ndim=1).spec == P(("data", "fsdp"))


# ----------------------------------------------------------------------- divisibility


def test_check_divisible_accepts_fitting_meshes():
    for preset in logical.PRESETS:
        S.check_divisible(CFG, mesh_for(preset), preset, global_batch_size=BATCH)


def test_check_divisible_heads_vs_tensor():
    cfg = CFG.replace(d_model=96, n_heads=12, vocab_size=128)
    mesh = S.make_mesh(S.MeshConfig(shape={"tensor": 8}))
    with pytest.raises(ValueError) as e:
        S.check_divisible(cfg, mesh, "tp", global_batch_size=8)
    msg = str(e.value)
    assert "n_heads=12" in msg and "h/attn/c_attn/kernel" in msg and "'heads'" in msg
    assert "tensor=8" in msg and "use tensor in {1,2,3,4,6,12}" in msg
    assert "another rules preset" in msg


def test_check_divisible_vocab_vs_tensor():
    mesh = S.make_mesh(S.MeshConfig(shape={"data": 2, "tensor": 4}))
    with pytest.raises(
        ValueError,
        match=r"vocab_size=50 \(logical axis 'vocab' of wte\) is not "
        r"divisible by mesh tensor=4",
    ):
        S.check_divisible(CFG.replace(vocab_size=50), mesh, "fsdp_tp")
    S.check_divisible(CFG.replace(vocab_size=50), mesh, "fsdp")  # vocab is whole under fsdp


def test_check_divisible_batch_vs_data_fsdp():
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=12 is not divisible by mesh "
        r"data\*fsdp=8: use a multiple of 8",
    ):
        S.check_divisible(CFG, mesh_for("fsdp"), "fsdp", global_batch_size=12)


# ------------------------------------------------------------------- constrain


def _double(x):
    return logical.constrain(x * 2, ("batch", "embed"))


def test_constrain_is_a_noop_outside_use_mesh():
    x = jnp.ones((8, 64))
    assert logical.active_rules() is None
    out = jax.jit(_double)(x)
    assert isinstance(out.sharding, SingleDeviceSharding)
    np.testing.assert_array_equal(out, 2 * x)


def test_constrain_applies_inside_use_mesh():
    mesh = mesh_for("fsdp")
    x = jnp.ones((8, 64))
    with logical.use_mesh(mesh, "fsdp"):
        out = jax.jit(_double)(x)
        assert logical.active_rules() == (mesh, logical.PRESETS["fsdp"])
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
    np.testing.assert_array_equal(out, 2 * x)
    assert logical.active_rules() is None
    with logical.use_mesh(mesh, "fsdp"), pytest.raises(ValueError, match="2 names"):
        logical.constrain(jnp.ones((2, 3, 4)), ("batch", "embed"))


# --------------------------------------------------------------- input batches


def test_make_global_batch_one_process():
    mesh = mesh_for("fsdp_tp")
    rng = np.random.default_rng(0)
    local = {
        "tokens": rng.integers(0, 128, (BATCH, SEQ + 1), dtype=np.int32),
        "weights": np.ones((BATCH,), np.float32),
    }
    out = S.make_global_batch(local, mesh, "fsdp_tp")
    np.testing.assert_array_equal(np.asarray(out["tokens"]), local["tokens"])
    assert out["tokens"].sharding == NamedSharding(mesh, P(("data", "fsdp"), None))
    assert out["weights"].sharding.spec == P(("data", "fsdp"))
    assert len(out["tokens"].addressable_shards) == 8


# ---------------------------------------------------------- sharded == unsharded


def _loss(params, tokens_BT1):
    logits_BTV = model.forward(CFG, params, tokens_BT1[:, :-1])
    logits_BTV = logical.constrain(logits_BTV, ("batch", "seq", "vocab"))  # no-op unsharded
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT1[:, 1:]).mean()


OPT = optax.adamw(1e-3, weight_decay=0.1)


def _init(key):
    return model.init_params(CFG, key)


def _step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(_loss)(params, batch)
    # The key bias shifts every score of a query equally, so softmax makes its gradient
    # exactly zero; Adam would turn the rounding noise there into full +-lr steps.
    grads["h"]["attn"]["c_attn"]["bias"] = grads["h"]["attn"]["c_attn"]["bias"].at[:, 1].set(0)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _shardings(mesh, preset):
    psh = S.param_shardings(CFG, mesh, preset)
    abstract = jax.eval_shape(_init, jax.random.key(0))
    return psh, S.opt_state_shardings(OPT, abstract, psh, mesh)


def _train(params, tokens, mesh=None, preset=None, steps=3):
    """`steps` AdamW steps from `params`, jitted with shardings when a mesh is given."""
    if mesh is None:
        opt_init, step_fn, batch = jax.jit(OPT.init), jax.jit(_step), jnp.asarray(tokens)
    else:
        psh, osh = _shardings(mesh, preset)
        params = jax.device_put(params, psh)
        opt_init = jax.jit(OPT.init, in_shardings=(psh,), out_shardings=osh)
        step_fn = jax.jit(
            _step,
            in_shardings=(psh, osh, S.batch_sharding(mesh, preset)),
            out_shardings=(psh, osh, NamedSharding(mesh, P())),
            donate_argnums=(0, 1),
        )
        batch = S.make_global_batch({"tokens": tokens}, mesh, preset)["tokens"]
    opt_state, losses = opt_init(params), []
    for _ in range(steps):
        params, opt_state, loss = step_fn(params, opt_state, batch)
        losses.append(float(loss))
    return np.array(losses), params


@pytest.fixture(scope="module")
def reference():
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (BATCH, SEQ + 1), np.int32)
    params0 = jax.device_get(jax.jit(_init)(jax.random.key(0)))
    losses, params = _train(params0, tokens)
    assert losses[-1] < losses[0], "the reference run should learn"
    return tokens, params0, losses, jax.device_get(params)


def test_sharded_init_equals_unsharded(reference):
    """eval_shape -> shardings -> jit(init, out_shardings): each device builds only its shard."""
    mesh = mesh_for("fsdp_tp")
    psh, _ = _shardings(mesh, "fsdp_tp")
    params = jax.jit(_init, out_shardings=psh)(jax.random.key(0))
    assert params["h"]["attn"]["c_attn"]["kernel"].sharding == psh["h"]["attn"]["c_attn"]["kernel"]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), reference[1])


@pytest.mark.parametrize("preset", list(logical.PRESETS))
def test_sharded_steps_equal_unsharded(preset, reference):
    tokens, params0, ref_losses, ref_params = reference
    mesh = mesh_for(preset)
    S.check_divisible(CFG, mesh, preset, global_batch_size=BATCH)
    with logical.use_mesh(mesh, preset):
        losses, params = _train(params0, tokens, mesh, preset)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # The parameters really are laid out as the rules say.
    psh = S.param_shardings(CFG, mesh, preset)
    assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding == s, params, psh))
    # Adam divides by each gradient's own scale, so an element whose gradient is near rounding
    # noise can move a little differently under another reduction order: 3% of one step (lr).
    # (On some CPUs one of 16,384 MLP elements moves 1.2% of a step: XLA's CPU code differs.)
    jax.tree.map_with_path(
        lambda path, got, want: np.testing.assert_allclose(
            np.asarray(got), want, rtol=1e-5, atol=3e-5, err_msg=jax.tree_util.keystr(path)
        ),
        params,
        ref_params,
    )
