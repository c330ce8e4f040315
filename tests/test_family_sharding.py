"""The encoder and the encoder–decoder on 8 fake CPU devices (tests/conftest.py).

For each rules preset, every parameter gets a spec of its own rank from the
family's `param_axes` (the axes tree is the params tree, leaf for leaf); and
the forward and its gradients, jitted under `use_mesh` with the parameters and
batch laid out by the rules, equal the same functions on one device.
"""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from gptjax.config import EncoderConfig, Seq2SeqConfig
from gptjax.models import bert as encoder
from gptjax.models import transformer as seq2seq
from gptjax.parallel import logical
from gptjax.parallel import mesh as S

# Odd factors (7, 11, 13) that still divide every mesh below: d_model by fsdp=8,
# heads, d_ff and vocab by tensor=4.
ENC = EncoderConfig(
    n_layers=2, d_model=56, n_heads=4, d_ff=44, vocab_size=52, max_len=16, type_vocab_size=3
)
S2S = Seq2SeqConfig(
    n_layers=2,
    n_decoder_layers=1,
    d_model=56,
    n_heads=4,
    d_ff=44,
    vocab_size=52,
    max_len=16,
    activation="gelu",
)
FAMILIES = {"encoder": (encoder, ENC), "seq2seq": (seq2seq, S2S)}
MESHES = {
    "dp": {"data": 8},
    "fsdp": {"fsdp": 8},
    "tp": {"data": 2, "tensor": 4},
    "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2},
}
# Each sharded compile costs ~10 s of CPU here; fsdp_tp on 2x2x2 uses every mesh axis and
# every rule at once. All four presets pass (grads within 3e-6 of their largest entry).
NUMERIC_PRESETS = ("fsdp_tp",)
B, T, S_LEN = 8, 11, 9


def _is_names(x):
    return isinstance(x, tuple)


def _variants(cfg):
    """The config and the layout switches that add or drop parameters."""
    return [
        cfg,
        cfg.replace(ln_placement="pre", tie_embeddings=False),
        cfg.replace(pos_embedding="sinusoidal" if cfg.pos_embedding == "learned" else "learned"),
    ]


@pytest.mark.parametrize("preset", list(MESHES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_parameter_gets_a_spec_of_its_rank(family, preset):
    module, base = FAMILIES[family]
    mesh = S.make_mesh(S.MeshConfig(shape=MESHES[preset], rules=preset))
    for cfg in _variants(base):
        shapes = jax.eval_shape(lambda k, cfg=cfg: module.init_params(cfg, k), jax.random.key(0))
        axes = module.param_axes(cfg)
        assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=_is_names), cfg
        shardings = S.tree_shardings(axes, mesh, preset)
        for (path, leaf), sh in zip(jax.tree.leaves_with_path(shapes), jax.tree.leaves(shardings)):
            where = jax.tree_util.keystr(path)
            assert len(sh.spec) == leaf.ndim, (where, sh.spec, leaf.shape)
            assert sh.shard_shape(leaf.shape), where  # raises if a dimension does not divide


def _batch(family):
    rng = np.random.default_rng(0)
    v = FAMILIES[family][1].vocab_size
    lengths = rng.integers(4, T + 1, (B, 1))
    batch = {"weights": rng.normal(size=(B, T, v)).astype(np.float32)}
    if family == "encoder":
        batch.update(
            tokens=rng.integers(1, v, (B, T)).astype(np.int32),
            segments=(np.arange(T)[None] >= lengths // 2).astype(np.int32),
            mask=(np.arange(T)[None] < lengths).astype(np.int32),
        )
    else:
        batch.update(
            src=rng.integers(2, v, (B, S_LEN)).astype(np.int32),
            src_mask=(np.arange(S_LEN)[None] < lengths - 2).astype(np.int32),
            tgt=rng.integers(2, v, (B, T)).astype(np.int32),
        )
    return batch


def _logits(family, params, batch):
    if family == "encoder":
        return encoder.forward(
            ENC, params, batch["tokens"], segment_ids=batch["segments"], mask=batch["mask"]
        )
    return seq2seq.forward(S2S, params, batch["src"], batch["tgt"], src_mask=batch["src_mask"])


def _loss_and_grads(family):
    """jit(value_and_grad) of sum(logits * weights): every logit gets its own cotangent."""

    def loss(params, batch):
        logits_BTV = _logits(family, params, batch)
        return (logits_BTV * batch["weights"]).sum(), logits_BTV

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _random_params(family):
    """Random values in the shapes of `init_params` (no init compile): non-trivial
    LayerNorms and biases, so no gradient is trivially shaped."""
    module, cfg = FAMILIES[family]
    shapes = jax.eval_shape(lambda k: module.init_params(cfg, k), jax.random.key(0))
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        where = jax.tree_util.keystr(path)
        x = rng.normal(size=leaf.shape).astype(np.float32)
        return 1 + 0.3 * x if "scale" in where else (0.3 if "bias" in where else 0.2) * x

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module", params=list(FAMILIES))
def reference(request):
    """(family, params, batch, logits, grads) on one device, without a mesh."""
    family = request.param
    params, batch = _random_params(family), _batch(family)
    (_, logits), grads = _loss_and_grads(family)(params, batch)
    return family, params, batch, np.asarray(logits), jax.device_get(grads)


@pytest.mark.parametrize("preset", NUMERIC_PRESETS)
def test_sharded_forward_and_gradients_equal_one_device(reference, preset):
    family, params, batch, ref_logits, ref_grads = reference
    module, cfg = FAMILIES[family]
    mesh = S.make_mesh(S.MeshConfig(shape=MESHES[preset], rules=preset))
    S.check_divisible(cfg, mesh, preset, global_batch_size=B)
    shardings = S.tree_shardings(module.param_axes(cfg), mesh, preset)
    sharded = jax.device_put(params, shardings)
    with logical.use_mesh(mesh, preset):
        (_, logits), grads = _loss_and_grads(family)(
            sharded, S.make_global_batch(batch, mesh, preset)
        )
    want = NamedSharding(mesh, logical.logical_to_spec(("batch", "seq", "vocab"), preset))
    assert logits.sharding.is_equivalent_to(want, 3), (logits.sharding, want)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    jax.tree.map_with_path(
        lambda path, got, ref: np.testing.assert_allclose(
            np.asarray(got),
            ref,
            rtol=1e-5,
            atol=1e-5 * np.abs(ref).max(),
            err_msg=jax.tree_util.keystr(path),
        ),
        grads,
        ref_grads,
    )
