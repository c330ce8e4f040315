"""Orbax checkpoints for a training workdir: async save, keep-N, verified resume, preemption.

A step directory `workdir/checkpoints/<step>/` holds three orbax items:
  state      any pytree of arrays (params, opt_state, rng key data, step), StandardSave
  meta       a JSON dict (data iterator position, config text, ...), JsonSave
  checksums  a fingerprint of every state leaf and a sha256 of meta, JsonSave
Orbax detects truncated files and missing metadata, but flipped bytes in a data file restore
silently wrong values (DESIGN.md, Stack facts), and nothing checks the meta JSON. So `restore`
verifies everything it returns, and on any failure falls back to the newest step that restores
and verifies. Broken steps are never deleted: they are moved to `workdir/checkpoints_corrupt/`
(see `_quarantine` for why). A preemption signal becomes one stop step that every process
agrees on (`PreemptionHandler.should_stop`); whether the training loop saves a step (every
checkpoint_every, the last, the agreed stop) is `CheckpointManager.should_save`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

PyTree = Any
log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "checkpoints_corrupt"
_ITEMS = ("state", "meta", "checksums")
CHECKSUMS_VERSION = 2  # 1: leaves only; 2: also "meta", the sha256 of meta's canonical JSON
PREEMPTION_CHECK_EVERY = 10  # steps between the processes' preemption all-gathers


class CheckpointError(RuntimeError):
    """No checkpoint step could be restored (each step's reason is in the message)."""


class CorruptCheckpointError(RuntimeError):
    """A step restored, but its arrays or meta do not match the checksums written at save time."""


# ----------------------------------------------------------------------------------------------
# Fingerprints: sharding-invariant checksums computed on device.


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of x as uint32 words (64-bit types give a trailing axis of 2 words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jnp.dtype(x.dtype).itemsize * 8
    u = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}"))
    return jax.lax.bitcast_convert_type(u, jnp.uint32) if bits == 64 else u.astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
    """Two uint32 position-weighted sums of the bits of x.

    Sums modulo 2**32 do not depend on the reduction order, so the result is the same for any
    sharding, on any mesh and any number of hosts, with no host copy: a restore onto another
    mesh verifies against the fingerprint written at save time. Weights are odd, hence invertible
    mod 2**32, so a change in any single element always changes the first sum; the second sum
    (scrambled weights and words) makes multi-element collisions ~2**-64 unlikely.
    """
    u = _as_uint32(x)
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(u.ndim)):  # flat row-major index, built without a reshape
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * jnp.uint32(stride)
        stride = (stride * u.shape[axis]) % 2**32
    mixed = (u ^ (u >> 16)) * jnp.uint32(0x85EBCA6B)
    mixed = mixed ^ (mixed >> 13)
    sum1 = jnp.sum(u * (2 * idx + 1), dtype=jnp.uint32)
    sum2 = jnp.sum(mixed * ((idx * jnp.uint32(0x9E3779B1)) | 1), dtype=jnp.uint32)
    return jnp.stack([sum1, sum2])


_fingerprint_leaves = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves])


def fingerprints(state: PyTree) -> dict[str, dict]:
    """{leaf path: {'dtype', 'shape', 'fp'}} for every leaf of `state`, JSON-able."""
    paths_leaves = jax.tree_util.tree_leaves_with_path(state)
    fps = _fingerprint_leaves([jnp.asarray(x) for _, x in paths_leaves])
    # Outputs are replicated, so np.asarray works on every host even in multi-process runs.
    return {
        jax.tree_util.keystr(p): {
            "dtype": str(jnp.asarray(x).dtype),
            "shape": list(np.shape(x)),
            "fp": "".join(f"{int(v):08x}" for v in np.asarray(fp)),
        }
        for (p, x), fp in zip(paths_leaves, fps)
    }


def verify(state: PyTree, expected: dict[str, dict]) -> None:
    """Raise CorruptCheckpointError when a leaf's fingerprint differs from `expected`.

    Leaves must be in the dtype and shape they were saved in: bits can only be compared there,
    so a leaf in another dtype is an error, never skipped (`CheckpointManager.restore` restores
    in the saved dtype, verifies, then casts).
    """
    got = fingerprints(state)
    missing = sorted(set(got) - set(expected))
    if missing:
        raise CorruptCheckpointError(f"no checksum recorded for leaves {missing[:5]}")

    def kind(rec):
        return f"{rec['dtype']}{list(rec['shape'])}"

    retyped = [
        f"{path} saved as {kind(expected[path])}, given {kind(rec)}"
        for path, rec in got.items()
        if kind(rec) != kind(expected[path])
    ]
    if retyped:
        raise CorruptCheckpointError(
            f"cannot verify leaves not in their saved dtype and shape: {'; '.join(retyped[:3])}"
        )
    bad = [path for path, rec in got.items() if rec["fp"] != expected[path]["fp"]]
    if bad:
        raise CorruptCheckpointError(
            f"checksum mismatch in {len(bad)} of {len(got)} arrays, e.g. {bad[:5]}"
        )


def meta_digest(meta: dict) -> str:
    """sha256 of meta's canonical JSON: sorted keys, and normalised as a JSON round trip would
    (tuples become lists, int keys strings), so the digest of the dict JsonRestore reads back
    equals the digest of the dict that was saved."""
    canonical = json.dumps(json.loads(json.dumps(meta)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _in_saved_dtypes(abstract_state: PyTree, leaves: dict[str, dict]) -> PyTree:
    """`abstract_state` with every leaf's dtype set to the one it was saved in.

    Orbax casts to the target dtype while reading, after which the saved bits are gone; reading
    in the saved dtype lets `verify` check every leaf (`_cast_like` casts afterwards).
    """

    def saved(path, x):
        rec = leaves.get(jax.tree_util.keystr(path))
        if rec is None or rec["dtype"] == str(x.dtype):
            return x  # nothing recorded: verify reports it
        return jax.ShapeDtypeStruct(
            x.shape, jnp.dtype(rec["dtype"]), sharding=getattr(x, "sharding", None)
        )

    return jax.tree_util.tree_map_with_path(saved, abstract_state)


def _cast_like(state: PyTree, abstract_state: PyTree) -> PyTree:
    """Cast each verified leaf to the dtype `abstract_state` asks for, keeping its sharding."""

    def cast(x, want):
        if x.dtype == want.dtype:
            return x
        return jax.device_put(x.astype(want.dtype), x.sharding)

    return jax.tree.map(cast, state, abstract_state)


# ----------------------------------------------------------------------------------------------
# The manager


def _is_primary() -> bool:
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _describe(e: BaseException) -> str:
    """One readable line for an exception (tensorstore's messages run to pages)."""

    def first_line(x):
        line = (str(x).strip().splitlines() or [""])[0]
        return line.split(" See full TensorStore details")[0][:300]

    lines = [f"{type(x).__name__}: {first_line(x)}" for x in (e, e.__cause__) if x is not None]
    return "; caused by ".join(lines)


class CheckpointManager:
    """Checkpoints of one training run in `workdir/checkpoints`, over orbax's CheckpointManager.

    save(step, state, meta) writes asynchronously every `checkpoint_every` steps (or any step with
    force=True) and keeps the newest `max_to_keep`; restore(abstract_state) resumes from the
    newest step that restores and verifies. `read_only=True` (sampling, evaluation) never writes
    or moves anything. Call `close()` (or use `with`) so the last async save finishes.
    """

    def __init__(
        self,
        workdir: str | epath.PathLike,
        checkpoint_every: int = 1000,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        self.read_only = read_only
        self.checkpoint_every = checkpoint_every
        writing = (
            {} if read_only else dict(save_interval_steps=checkpoint_every, max_to_keep=max_to_keep)
        )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
            **writing,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

    def should_save(
        self, step: int, *, last_step: int | None = None, preempted: bool = False
    ) -> bool:
        """Whether the training loop saves `step`: the one checkpoint policy.

        Yes at multiples of checkpoint_every, at the run's `last_step`, and on `preempted`
        (the loop passes `PreemptionHandler.should_stop(step)`, which every process agrees
        on, so all of them save together); never for a step already on disk or when read-only.
        (orbax's `reached_preemption` would never fire: see PreemptionHandler; orbax's
        `should_save` also says yes to the first step of every run.)
        """
        if self.read_only:
            return False
        if not (preempted or step == last_step or step % self.checkpoint_every == 0):
            return False
        latest = self._manager.latest_step()
        return latest is None or step > latest

    def save(self, step: int, state: PyTree, meta: dict | None = None, force: bool = False) -> bool:
        """Start an async save of `state` and `meta` at `step`; returns whether it saves.

        Returns once the arrays are copied off the device, so `state` may be donated after.
        Fingerprints (a small jitted reduction) and meta's sha256 are computed first and saved
        in the same step. Every process must call it at the same steps (orbax saves together).
        """
        if not (force or self.should_save(step)):
            return False
        meta = dict(meta or {})
        checksums = {
            "version": CHECKSUMS_VERSION,
            "leaves": fingerprints(state),
            "meta": meta_digest(meta),
        }  # also a clear error now for non-JSON meta
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            checksums=ocp.args.JsonSave(checksums),
        )
        return self._manager.save(step, args=args, force=True)

    def latest_step(self) -> int | None:
        """The newest step on disk; unverified, so it may be broken until `restore` has run."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(
        self, abstract_state: PyTree, step: int | None = None
    ) -> tuple[int, PyTree, dict] | None:
        """(step, state, meta) from the newest good step (or exactly `step`); None if none saved.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings (e.g. from
        `jax.eval_shape` plus the state shardings): arrays land sharded on the current mesh, which
        may differ from the mesh that saved them, in the dtypes asked for (leaves saved in another
        dtype are verified in that one, then cast). A step that fails to restore or verify is
        logged with its reason and the next older one is tried; once a good one restores, the
        newer broken steps are quarantined. If none restores, raise CheckpointError.
        """
        self.wait()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            return None
        failures = []
        for s in steps:
            try:
                state, meta = self._restore_step(s, abstract_state)
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                reason = _describe(e)
                log.warning(
                    "Checkpoint step %d in %s is unusable (%s); trying an older step.",
                    s,
                    self.directory,
                    reason,
                )
                failures.append((s, reason))
                continue
            if failures:
                self._quarantine([f for f, _ in failures])
                log.warning(
                    "Restored step %d after skipping broken newer steps %s.",
                    s,
                    [f for f, _ in failures],
                )
            return s, state, meta
        tried = "\n".join(f"  step {s}: {reason}" for s, reason in failures)
        raise CheckpointError(
            f"No checkpoint in {self.directory} could be restored. Tried:\n{tried}\n"
            f"If the shapes or config changed, restore with a matching config; if the files are "
            f"damaged, move {self.directory} away (nothing was deleted) to start fresh, or move "
            f"single bad step directories out of it to resume from the others."
        )

    def _restore_step(self, step: int, abstract_state: PyTree) -> tuple[PyTree, dict]:
        """Restore and verify one step: every leaf in its saved dtype, then meta, then cast."""
        checksums = self._read_checksums(step)
        if checksums is None:
            log.warning("Checkpoint step %d has no checksums; its values are not verified.", step)
            target = abstract_state
        else:
            target = _in_saved_dtypes(abstract_state, checksums["leaves"])
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        state, meta = out["state"], dict(out["meta"] or {})
        if checksums is not None:
            verify(state, checksums["leaves"])
            self._verify_meta(step, meta, checksums.get("meta"))
        return _cast_like(state, abstract_state), meta

    def _read_checksums(self, step: int) -> dict | None:
        """The step's checksums record, or None for steps saved before checksums existed."""
        if not (self.directory / str(step) / "checksums").exists():
            return None
        out = self._manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))
        return out["checksums"]

    @staticmethod
    def _verify_meta(step: int, meta: dict, expected: str | None) -> None:
        """The data iterator's position is restored state too: an edit must not pass silently."""
        if expected is None:
            log.warning(
                "Checkpoint step %d has no meta checksum (saved by an older gptjax); its "
                "meta is not verified.",
                step,
            )
        elif meta_digest(meta) != expected:
            raise CorruptCheckpointError(
                "meta checksum mismatch: the saved JSON (data iterator position, ...) was changed"
            )

    def _quarantine(self, steps: list[int]) -> None:
        """Move broken step directories to `workdir/checkpoints_corrupt/<step>[.n]`.

        Moving, not deleting, keeps the files for inspection. It also takes the broken steps out
        of orbax's view, which matters twice: the resumed run will save those step numbers again
        (orbax refuses to overwrite an existing step), and keep-N garbage collection counts only
        the steps it sees, so broken newer steps can never crowd out the last good one.
        """
        if self.read_only:
            log.warning("Read-only: leaving broken steps %s in place.", steps)
            return
        if _is_primary():
            target_dir = self.workdir / QUARANTINE_DIR
            target_dir.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target, n = target_dir / str(step), 0
                while target.exists():
                    n += 1
                    target = target_dir / f"{step}.{n}"
                (self.directory / str(step)).rename(target)
                log.warning("Moved broken checkpoint step %d to %s.", step, target)
        _barrier("gptjax_checkpoint_quarantine")
        self._manager.reload()

    def wait(self) -> None:
        """Block until the pending async save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Preemption


class PreemptionHandler:
    """Turns a signal (SIGTERM by default) into one stop step that every process agrees on.

    The signal handler only sets `.requested` and `.signum`, per process. The loop calls
    `should_stop(step)` once per step on every process and, when it is True, saves that step
    (`CheckpointManager.should_save(step, preempted=True)`) and exits. On a pod one host is
    often signalled first, but orbax's multi-process save needs every process to take part at
    the same step, so the answer must be the same everywhere:
      one process     the local flag, at every step;
      several         every `check_every` steps, all processes all-gather their flags
                      (`multihost_utils.process_allgather`) and all stop if any is set. The stop
                      step is the first multiple of check_every at or after the signal, so pick
                      check_every * step time (plus a save) well inside the grace period.
    The gather is not run at every step because it goes through the devices: it waits for the
    step in flight, a host sync that stalls the loop's one-step-late metrics pipeline.

    Not jax's preemption sync manager (`multihost_utils.reached_preemption_sync_point`, which
    orbax's `reached_preemption` wraps): its SIGTERM notifier is a C++ handler that
    `jax.distributed.initialize` installs, and any Python `signal.signal` handler replaces it.
    Checked with jax 0.10.2 on two CPU processes: with this handler installed the sync point is
    never reached. Leaving SIGTERM to jax instead would lose `.requested` (the one-process case)
    and every signal but SIGTERM, and its notifier polls once a second. The all-gather is a
    public API, needs no extra thread, and the stop step is known in advance (testable).
    """

    def __init__(self, signals=(signal.SIGTERM,), check_every: int = PREEMPTION_CHECK_EVERY):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_preemption_handler must be called from the main thread")
        if check_every < 1:
            raise ValueError(f"check_every must be at least 1, got {check_every}")
        self.check_every = check_every
        self.requested = False
        self.signum: int | None = None
        self.stop_step: int | None = None  # the agreed step, once should_stop said True
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        del frame
        self.requested, self.signum = True, signum
        log.warning("Received %s: will save a checkpoint and stop.", signal.Signals(signum).name)

    def should_stop(self, step: int) -> bool:
        """Whether to save `step` and stop; the same answer on every process at every step.

        Call it once per step on every process, with the same steps (a collective in
        multi-process runs: a process that skips a check leaves the others waiting).
        """
        if self.stop_step is not None:
            return True
        if jax.process_count() == 1:
            stop = self.requested
        elif step % self.check_every:
            return False
        else:
            flags = multihost_utils.process_allgather(np.int32(self.requested))
            stop = bool(np.any(flags))
        if stop:
            self.stop_step = step
            log.warning("Preemption: all %d processes stop at step %d.", jax.process_count(), step)
        return stop

    def close(self) -> None:
        """Put back the handlers that were installed before.

        A handler installed outside Python (jax's C++ notifier) reads back as SIG_DFL, the
        default action, which is what it becomes.
        """
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def install_preemption_handler(
    signals=(signal.SIGTERM,), check_every: int = PREEMPTION_CHECK_EVERY
) -> PreemptionHandler:
    """Install a flag-setting handler for `signals`; ask `.should_stop(step)` once per step on
    every process, `.close()` at the end."""
    return PreemptionHandler(signals, check_every)
