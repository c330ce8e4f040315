"""Checkpoints: round trips, keep-N, corruption fallback without deletion, shardings, SIGTERM.

The multi-process preemption agreement is tested in test_preemption.py.
"""

import json
import logging
import os
import pathlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.training import checkpoint as ck

# A restore that fails part-way leaves orbax read coroutines to be garbage-collected later.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(seed: int):
    """A train-state-like tree: params, adam state, int step, PRNG key data."""
    rng = np.random.default_rng(seed)
    params = {
        "wte": jnp.asarray(rng.normal(size=(50, 8)), jnp.float32),  # random: incompressible
        "h": {
            "ln_1": {"scale": jnp.ones((2, 8)), "bias": jnp.zeros((2, 8))},
            "attn": {"c_attn": {"kernel": jnp.asarray(rng.normal(size=(2, 8, 24)), jnp.float32)}},
        },
    }
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def _abstract(state, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def _save_steps(workdir, steps, max_to_keep=5):
    with ck.CheckpointManager(workdir, checkpoint_every=1, max_to_keep=max_to_keep) as mgr:
        for s in steps:
            assert mgr.save(s, _state(s), {"data_position": 10 * s, "config": f"step {s}"})
        mgr.wait()


def _data_files(step_dir):
    """The array data files of a step (ocdbt `d/` directories), largest first."""
    out = [
        os.path.join(r, f)
        for r, _, fs in os.walk(step_dir / "state")
        if os.path.basename(r) == "d"
        for f in fs
    ]
    assert out, f"no data files under {step_dir}"
    return sorted(out, key=os.path.getsize, reverse=True)


def test_round_trip_state_and_meta(tmp_path):
    state = _state(3)
    meta = {
        "data_position": {"epoch": 1, "index": 12345},
        "config": "a = 1\nb = 'x'",
        "shards": [0, 1],
    }
    with ck.CheckpointManager(tmp_path, checkpoint_every=1) as mgr:
        assert mgr.restore(_abstract(state)) is None  # nothing saved yet
        assert mgr.save(7, state, meta)
        step, restored, meta_back = mgr.restore(_abstract(state))
    assert step == 7 and meta_back == meta
    _assert_tree_equal(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert (tmp_path / "checkpoints" / "7" / "checksums").exists()


def test_save_interval_and_keep_n(tmp_path):
    with ck.CheckpointManager(tmp_path, checkpoint_every=10, max_to_keep=2) as mgr:
        assert [mgr.should_save(s) for s in (5, 10, 20)] == [False, True, True]
        assert not mgr.save(5, _state(5), {})
        for s in (10, 20, 30):
            assert mgr.save(s, _state(s), {})
        assert mgr.save(35, _state(35), {}, force=True)  # e.g. on preemption
        mgr.wait()
        assert mgr.all_steps() == [30, 35] and mgr.latest_step() == 35


def test_should_save_is_the_loops_checkpoint_policy(tmp_path):
    """Every checkpoint_every steps, the run's last step and an agreed preemption step; never
    a step already on disk, never when read-only."""
    with ck.CheckpointManager(tmp_path, checkpoint_every=10) as mgr:
        assert [mgr.should_save(s, last_step=25) for s in (9, 10, 24, 25)] == [
            False,
            True,
            False,
            True,
        ]
        assert mgr.should_save(13, last_step=25, preempted=True)
        assert mgr.save(13, _state(13), {}, force=True)
        assert not mgr.should_save(13, preempted=True) and not mgr.should_save(10)
        assert mgr.should_save(20)
    with ck.CheckpointManager(tmp_path, read_only=True) as mgr:
        assert not mgr.should_save(20, last_step=20, preempted=True)


def test_restore_a_given_step(tmp_path):
    _save_steps(tmp_path, [1, 2])
    with ck.CheckpointManager(tmp_path) as mgr:
        step, state, meta = mgr.restore(_abstract(_state(0)), step=1)
    assert step == 1 and meta["data_position"] == 10
    _assert_tree_equal(state, _state(1))


def _restore_expecting_fallback(tmp_path, caplog, broken, good):
    with (
        caplog.at_level(logging.WARNING, logger="gptjax.training.checkpoint"),
        ck.CheckpointManager(tmp_path) as mgr,
    ):
        step, state, meta = mgr.restore(_abstract(_state(0)))
        remaining = mgr.all_steps()
    assert step == good and meta["data_position"] == 10 * good
    _assert_tree_equal(state, _state(good))
    warning = next(r.getMessage() for r in caplog.records if f"step {broken} " in r.getMessage())
    # Never deleted: moved out of orbax's view, next to the checkpoints.
    assert broken not in remaining
    assert (tmp_path / "checkpoints_corrupt" / str(broken) / "state").is_dir()
    return warning


def _flip_bytes_silently(step_dir, abstract, reference):
    """Flip one byte of a data file where orbax restores wrong values without an error.

    Most positions are inside compressed array data (silently wrong values, the case orbax
    misses); a few hit chunk headers (orbax raises). Return after the first silent one. Files
    are tried largest first; a file that orbax never reads (ocdbt may keep a copy) is put back.
    """
    for path in _data_files(step_dir):
        original = pathlib.Path(path).read_bytes()
        for frac in np.linspace(0.5, 0.9, 9):
            data = bytearray(original)
            data[int(frac * len(data))] ^= 0x5A
            pathlib.Path(path).write_bytes(bytes(data))
            try:
                got = ocp.StandardCheckpointer().restore(step_dir / "state", abstract)
            except Exception:  # noqa: BLE001 - a loud failure: try another position
                continue
            if any(
                not np.array_equal(x, y)
                for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(reference))
            ):
                return
        pathlib.Path(path).write_bytes(original)
    pytest.fail(f"no byte of the data files in {step_dir} flipped into a silent corruption")


def test_flipped_bytes_fall_back_to_previous_step(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2])
    _flip_bytes_silently(tmp_path / "checkpoints" / "2", _abstract(_state(2)), _state(2))
    warning = _restore_expecting_fallback(tmp_path, caplog, broken=2, good=1)
    # Orbax restored these bytes without complaint; only the checksums notice.
    assert "checksum mismatch" in warning


def test_edited_meta_falls_back_to_previous_step(tmp_path, caplog):
    """The data iterator's position is restored state too: an edit must not resume silently."""
    _save_steps(tmp_path, [1, 2])
    path = tmp_path / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "data_position": meta["data_position"] + 1}))
    warning = _restore_expecting_fallback(tmp_path, caplog, broken=2, good=1)
    assert "meta checksum mismatch" in warning


def test_checkpoint_without_meta_checksum_still_restores(tmp_path, caplog):
    """Steps written before meta was checksummed restore, with a warning."""
    _save_steps(tmp_path, [1])
    path = tmp_path / "checkpoints" / "1" / "checksums" / "metadata"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({"version": 1, "leaves": record["leaves"]}))
    with (
        caplog.at_level(logging.WARNING, logger="gptjax.training.checkpoint"),
        ck.CheckpointManager(tmp_path) as mgr,
    ):
        step, state, meta = mgr.restore(_abstract(_state(0)))
    assert step == 1 and meta["data_position"] == 10
    _assert_tree_equal(state, _state(1))
    assert any("meta is not verified" in r.getMessage() for r in caplog.records)


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


@pytest.mark.parametrize(
    "saved, restored", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)]
)
def test_cross_dtype_restore_is_verified_then_cast(tmp_path, caplog, saved, restored):
    """Orbax casts to the target dtype; the bits are checked in the saved dtype first."""
    # A leaf over 1 kB in either dtype: smaller values are inlined in ocdbt's b-tree nodes,
    # whose CRCs make any flipped byte loud, so only larger ones can be silently corrupted.
    states = {
        s: _cast_floats(
            {
                **_state(s),
                "big": jnp.asarray(np.random.default_rng(s).normal(size=(40, 32)), jnp.float32),
            },
            saved,
        )
        for s in (1, 2)
    }
    with ck.CheckpointManager(tmp_path, checkpoint_every=1) as mgr:
        for s, state in states.items():
            assert mgr.save(s, state, {"data_position": 10 * s})
    target = _abstract(_cast_floats(states[1], restored))
    with ck.CheckpointManager(tmp_path) as mgr:  # uncorrupted: the cast values
        step, got, _ = mgr.restore(target)
    assert step == 2
    _assert_tree_equal(got, _cast_floats(states[2], restored))

    _flip_bytes_silently(tmp_path / "checkpoints" / "2", _abstract(states[2]), states[2])
    with (
        caplog.at_level(logging.WARNING, logger="gptjax.training.checkpoint"),
        ck.CheckpointManager(tmp_path) as mgr,
    ):
        step, got, meta = mgr.restore(target)
    assert step == 1 and meta["data_position"] == 10
    _assert_tree_equal(got, _cast_floats(states[1], restored))
    assert any(
        "step 2 " in r.getMessage() and "checksum mismatch" in r.getMessage()
        for r in caplog.records
    )
    assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()


def test_verify_refuses_a_leaf_in_another_dtype():
    x = {"x": jnp.arange(6, dtype=jnp.float32)}
    with pytest.raises(ck.CorruptCheckpointError, match="saved as float32"):
        ck.verify(_cast_floats(x, jnp.bfloat16), ck.fingerprints(x))


def test_loudly_broken_data_falls_back(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2])
    path = _data_files(tmp_path / "checkpoints" / "2")[0]
    data = bytearray(pathlib.Path(path).read_bytes())
    for i in range(0, len(data), 7):  # headers too: orbax itself raises (or checksums catch it)
        data[i] ^= 0xFF
    pathlib.Path(path).write_bytes(bytes(data))
    _restore_expecting_fallback(tmp_path, caplog, broken=2, good=1)


def test_truncated_file_falls_back(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2, 3])
    path = _data_files(tmp_path / "checkpoints" / "3")[0]
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    _restore_expecting_fallback(tmp_path, caplog, broken=3, good=2)


def test_partial_checkpoint_falls_back(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2])
    os.remove(tmp_path / "checkpoints" / "2" / "state" / "_METADATA")
    _restore_expecting_fallback(tmp_path, caplog, broken=2, good=1)


def test_keep_n_never_collects_last_good_step(tmp_path, caplog):
    """max_to_keep=2 with the newest step broken: resuming and saving on keeps a good step."""
    _save_steps(tmp_path, [1, 2, 3], max_to_keep=2)
    path = _data_files(tmp_path / "checkpoints" / "3")[0]
    with open(path, "r+b") as f:
        f.truncate(10)
    with ck.CheckpointManager(tmp_path, checkpoint_every=1, max_to_keep=2) as mgr:
        step, _, _ = mgr.restore(_abstract(_state(0)))
        assert step == 2 and mgr.all_steps() == [2]  # broken 3 no longer counts towards keep-N
        assert mgr.save(3, _state(33), {"data_position": 330})  # same step number: no collision
        mgr.wait()
        assert mgr.all_steps() == [2, 3]
        step, state, _ = mgr.restore(_abstract(_state(0)))
        assert step == 3
        _assert_tree_equal(state, _state(33))
    assert (tmp_path / "checkpoints_corrupt" / "3").is_dir()


def test_read_only_never_writes_or_moves(tmp_path):
    with ck.CheckpointManager(tmp_path / "none", read_only=True) as mgr:
        assert mgr.restore(_abstract(_state(0))) is None and not mgr.should_save(1000)
    assert not (tmp_path / "none").exists()
    _save_steps(tmp_path, [1, 2])
    os.remove(tmp_path / "checkpoints" / "2" / "state" / "_METADATA")
    with ck.CheckpointManager(tmp_path, read_only=True) as mgr:  # e.g. `gptjax sample`
        assert mgr.restore(_abstract(_state(0)))[0] == 1
        assert mgr.all_steps() == [1, 2]


def test_meta_must_be_json(tmp_path):
    with (
        ck.CheckpointManager(tmp_path, checkpoint_every=1) as mgr,
        pytest.raises(TypeError, match="JSON serializable"),
    ):
        mgr.save(1, _state(1), {"array": np.zeros(2)})


def test_all_steps_broken_raise_clear_error(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for s in (1, 2):
        os.remove(tmp_path / "checkpoints" / str(s) / "state" / "_METADATA")
    with ck.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ck.CheckpointError, match=r"(?s)step 2: .*step 1: .*move .* away"):
            mgr.restore(_abstract(_state(0)))
        assert mgr.all_steps() == [1, 2]  # nothing moved when there is nothing to fall back to
    assert not (tmp_path / "checkpoints_corrupt").exists()


def test_restore_with_named_sharding(tmp_path):
    _save_steps(tmp_path, [4])
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    state = _state(4)
    shardings = jax.tree.map(lambda x: NamedSharding(mesh, P("data") if x.ndim else P()), state)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    with ck.CheckpointManager(tmp_path) as mgr:
        step, restored, _ = mgr.restore(abstract)
    assert step == 4
    _assert_tree_equal(restored, state)
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert x.sharding == s


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8, jnp.uint32, jnp.bool_])
def test_fingerprint_sees_any_single_change(dtype):
    x = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(3, 5, 7)), dtype)
    expected = ck.fingerprints({"x": x})
    ck.verify({"x": x}, expected)
    ck.verify({"x": np.asarray(x)}, expected)  # host or device: same fingerprint
    for idx in [(0, 0, 0), (1, 2, 3), (2, 4, 6)]:
        changed = x.at[idx].set(jnp.logical_not(x[idx]) if dtype == jnp.bool_ else x[idx] + 1)
        with pytest.raises(ck.CorruptCheckpointError, match="checksum mismatch"):
            ck.verify({"x": changed}, expected)
    swapped = x.at[0, 0, 0].set(x[0, 0, 1]).at[0, 0, 1].set(x[0, 0, 0])
    if x[0, 0, 0] != x[0, 0, 1]:
        with pytest.raises(ck.CorruptCheckpointError):  # position-weighted: order matters
            ck.verify({"x": swapped}, expected)


def test_sigterm_sets_flag_and_restores_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with ck.install_preemption_handler() as handler:
        assert not handler.requested and not handler.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert handler.requested and handler.signum == signal.SIGTERM
        # One process has nothing to agree with: stop at once, not at a multiple of check_every.
        assert handler.should_stop(2) and handler.stop_step == 2
    assert signal.getsignal(signal.SIGTERM) == previous
    with pytest.raises(ValueError, match="check_every must be at least 1"):
        ck.install_preemption_handler(check_every=0)
