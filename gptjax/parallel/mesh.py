"""One sharding vocabulary: a 3-axis mesh, logical-axis rules presets, and shardings.

Every parameter and activation dimension has a *logical* name (`LOGICAL_AXES`); one rules
table per preset maps logical names to the mesh axes `('data', 'fsdp', 'tensor')`. The same
table serves parameters (`param_shardings`) and activations (`constrain`), as Flax's
`logical_axis_rules` does, so a preset is the whole parallelism strategy in one place:

  dp       parameters replicated; the batch split over data x fsdp.
  fsdp     ZeRO-3: every parameter's `embed` dimension split over 'fsdp' (gathered per layer
           by XLA when used); optimizer moments follow; the batch over data x fsdp.
  fsdp_tp  fsdp plus Megatron tensor parallelism over 'tensor': heads and mlp (column split of
           c_attn / c_fc, row split of the attention and MLP c_proj) and the vocab.
  tp       tensor parallelism only; parameters are not split over 'fsdp'.

The batch always spans data x fsdp, so any preset runs on any mesh (an axis of size 1 is a
no-op). Typical use, with the jitted functions traced inside `use_mesh`:

    mesh = make_mesh(mesh_cfg); rules = logical_axis_rules(mesh_cfg.rules)
    check_divisible(cfg, mesh, rules, global_batch_size)
    with use_mesh(mesh, rules):
        step = jax.jit(train_step, in_shardings=..., out_shardings=...)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import gin
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.config import ModelConfig
from gptjax.models import family, lora
from gptjax.parallel.logical import (
    BATCH_AXES,
    MESH_AXES,
    Rules,
    _as_rules,
    logical_axis_rules,
    logical_to_spec,
)

# Config fields behind each logical axis, for error messages that say what to change.
_CONFIG_FIELD = {
    "vocab": "vocab_size",
    "embed": "d_model",
    "layers": "n_layers",
    "heads": "n_heads",
    "head_dim": "head_dim",
    "mlp": "d_ff",
}


# ----------------------------------------------------------------------------- the mesh


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The device mesh and the rules preset, bound from gin.

    Attributes:
      shape: mesh axis -> size over ICI (within a slice / host group). -1 takes all remaining
        devices; missing axes are 1. `MeshConfig.shape = {'data': 2, 'fsdp': 4}` in gin.
      rules: a preset name in `PRESETS`.
      dcn_shape: mesh axis -> number of slices (multi-slice TPU pods, or GPU hosts joined over
        the data-centre network). The mesh is then `shape * dcn_shape` per axis; put 'data'
        (or 'fsdp') here so only the cheap gradient all-reduce crosses the slow links.

    The dicts make the dataclass unhashable by default; `__hash__` hashes their items, so a
    MeshConfig can still sit in a set or a cache key.
    """

    shape: dict = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    rules: str = "dp"
    dcn_shape: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", _full_shape(self.shape, "shape"))
        if self.dcn_shape is not None:
            object.__setattr__(self, "dcn_shape", _full_shape(self.dcn_shape, "dcn_shape"))
        logical_axis_rules(self.rules)  # fail early on an unknown preset

    def __hash__(self):
        dcn = None if self.dcn_shape is None else tuple(self.dcn_shape.items())
        return hash((tuple(self.shape.items()), self.rules, dcn))


def _full_shape(shape: dict, what: str) -> dict:
    """All three axes in mesh order, sizes checked; missing axes are 1."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(
            f"MeshConfig.{what} has unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}."
        )
    full = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    if any(s == 0 or s < -1 for s in full.values()) or list(full.values()).count(-1) > 1:
        raise ValueError(
            f"MeshConfig.{what}={full}: sizes must be positive, with at most one -1 "
            "(meaning all remaining devices)."
        )
    return full


def _resolve(shape: dict, n_devices: int, what: str) -> tuple[int, ...]:
    """Replace -1 by the remaining devices; the sizes must multiply to `n_devices`."""
    fixed = math.prod(s for s in shape.values() if s != -1)
    if -1 in shape.values():
        if n_devices % fixed:
            raise ValueError(
                f"MeshConfig.{what}={shape}: the fixed sizes multiply to {fixed}, which does not "
                f"divide the {n_devices} devices; choose sizes whose product divides {n_devices}."
            )
        shape = {a: (n_devices // fixed if s == -1 else s) for a, s in shape.items()}
    elif fixed != n_devices:
        raise ValueError(
            f"MeshConfig.{what}={shape} multiplies to {fixed} devices, but there are {n_devices}; "
            f"make the sizes multiply to {n_devices}, or set one axis to -1 to take the rest."
        )
    return tuple(shape[a] for a in MESH_AXES)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axes (jit's automatic sharding propagation).

    Not `jax.make_mesh`: its default Explicit axes reject contractions over sharded dimensions
    that the Auto (GSPMD) partitioner handles. `mesh_utils` orders devices so that 'tensor',
    the chattiest axis, lands on the fastest physical links.
    """
    devices = list(jax.devices() if devices is None else devices)
    if mesh_cfg.dcn_shape is None:
        shape = _resolve(mesh_cfg.shape, len(devices), "shape")
        device_array = mesh_utils.create_device_mesh(shape, devices)
    else:
        n_slices = math.prod(s for s in mesh_cfg.dcn_shape.values() if s != -1)
        dcn = _resolve(mesh_cfg.dcn_shape, n_slices, "dcn_shape")
        if len(devices) % n_slices:
            raise ValueError(
                f"MeshConfig.dcn_shape={mesh_cfg.dcn_shape} asks for {n_slices} "
                f"slices, which does not divide the {len(devices)} devices."
            )
        ici = _resolve(mesh_cfg.shape, len(devices) // n_slices, "shape")
        # TPU devices know their slice; elsewhere (GPU hosts) each process is one granule.
        by_process = not hasattr(devices[0], "slice_index")
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=by_process
        )
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ---------------------------------------------------------------------------- the rules


def _is_names(x) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def tree_shardings(axes_tree: Any, mesh: Mesh, rules: Rules | str) -> Any:
    """A NamedSharding for every leaf of a tree whose leaves are tuples of logical names."""
    rules = _as_rules(rules)
    return jax.tree.map(
        lambda names: NamedSharding(mesh, logical_to_spec(names, rules)),
        axes_tree,
        is_leaf=_is_names,
    )


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules | str) -> Any:
    """Shardings of the model family's `init_params(cfg, key)`, leaf for leaf."""
    return tree_shardings(family.param_axes(cfg), mesh, rules)


def lora_shardings(
    cfg: lora.LoRAConfig, base_shardings: Any, base_axes: Any, mesh: Mesh, rules: Rules | str
) -> Any:
    """Shardings of a LoRA-adapted subtree (`lora.attach`): the base's as given, the
    adapters' from their logical axes (`lora.adapter_axes` of the base's `base_axes`)."""
    adapters = tree_shardings(lora.adapter_axes(cfg, base_axes), mesh, rules)
    return {"frozen": base_shardings, "adapters": adapters}


def opt_state_shardings(
    optimizer: optax.GradientTransformation, abstract_params: Any, param_shardings: Any, mesh: Mesh
) -> Any:
    """Shardings of `optimizer.init(params)`: per-parameter leaves (Adam's mu and nu) take
    their parameter's sharding, so ZeRO shards the moments too; everything else (step counts,
    schedule state) is a replicated scalar."""
    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def batch_sharding(mesh: Mesh, rules: Rules | str, ndim: int = 2) -> NamedSharding:
    """Sharding of a (B, T, ...) input batch: B over data x fsdp, the rest replicated."""
    names = ("batch", "seq")[:ndim] + (None,) * max(0, ndim - 2)
    return NamedSharding(mesh, logical_to_spec(names, rules))


# ------------------------------------------------------------------------ divisibility


def _mesh_size(mesh: Mesh, axes) -> int:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def _axes_label(mesh: Mesh, axes) -> str:
    axes = (axes,) if isinstance(axes, str) else axes
    return "*".join(axes) + "=" + str(_mesh_size(mesh, axes))


def _divisors(n: int) -> str:
    return "{" + ",".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


def _param_problems(cfg: ModelConfig, mesh: Mesh, rules: Rules) -> list[str]:
    """One message per (logical axis, size, mesh axes) that does not divide, naming the
    parameters it affects."""
    shapes = jax.eval_shape(lambda key: family.init_params(cfg, key), jax.random.key(0))
    named = jax.tree.leaves_with_path(family.param_axes(cfg), is_leaf=_is_names)
    bad: dict[tuple, list[str]] = {}
    for (path, names), leaf in zip(named, jax.tree.leaves(shapes)):
        for name, axes, size in zip(names, logical_to_spec(names, rules), leaf.shape):
            if size % _mesh_size(mesh, axes):
                where = "/".join(str(getattr(k, "key", k)) for k in path)
                bad.setdefault((name, size, axes), []).append(where)
    problems = []
    for (name, size, axes), params in bad.items():
        field = _CONFIG_FIELD.get(name, name)
        what = axes if isinstance(axes, str) else "*".join(axes)
        problems.append(
            f"{field}={size} (logical axis '{name}' of {', '.join(params)}) is not divisible by "
            f"mesh {_axes_label(mesh, axes)}: use {what} in {_divisors(size)}, change {field}, "
            "or pick another rules preset."
        )
    return problems


def check_divisible(
    cfg: ModelConfig, mesh: Mesh, rules: Rules | str, global_batch_size: int | None = None
) -> None:
    """Raise a ValueError, before anything compiles, for every parameter dimension or batch
    size that its mesh axes do not divide (XLA would fail later with a far less useful error).
    """
    rules = _as_rules(rules)
    problems = _param_problems(cfg, mesh, rules)
    if global_batch_size is not None:
        axes = logical_to_spec(("batch",), rules)[0]
        size = _mesh_size(mesh, axes)
        if global_batch_size % size:
            problems.append(
                f"global_batch_size={global_batch_size} is not divisible by mesh "
                f"{_axes_label(mesh, axes)}: use a multiple of {size}, or a mesh whose "
                f"{'*'.join(BATCH_AXES)} is in {_divisors(global_batch_size)}."
            )
    if problems:
        raise ValueError("The mesh does not fit the model:\n  " + "\n  ".join(problems))


# -------------------------------------------------------------- activation constraints

# ----------------------------------------------------------------------- input batches


def make_global_batch(
    local_batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules | str
) -> dict[str, jax.Array]:
    """Global arrays from this process's rows of the batch (multi-host input).

    Each process passes its own `B / process_count` rows; the global batch is their
    concatenation in process order, laid out by `batch_sharding`. On one process it is a
    plain device_put with the batch sharding.
    """
    return {
        k: jax.make_array_from_process_local_data(
            batch_sharding(mesh, rules, np.ndim(v)), np.asarray(v)
        )
        for k, v in local_batch.items()
    }
