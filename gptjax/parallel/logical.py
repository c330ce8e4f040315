"""The logical-axis vocabulary: names → mesh axes, and activation constraints.

Every parameter and activation dimension has a logical name (`LOGICAL_AXES`);
a rules preset maps names to the mesh axes ('data', 'fsdp', 'tensor'). This
file is the part of sharding that the model itself needs (`constrain`), so it
imports nothing of gptjax; `sharding.py` builds meshes and shardings on it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from flax.linen import spmd
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes that split the batch in every preset

# The logical names the project uses. Parameters: vocab, embed, layers, heads, head_dim, mlp.
# Activations add batch, seq (queries) and kv_seq (keys/values, the KV cache).
LOGICAL_AXES = ("batch", "seq", "kv_seq", "vocab", "embed", "layers", "heads", "head_dim", "mlp")

Rules = tuple[tuple[str, Any], ...]

# Rules are in order of precedence (Flax semantics): a logical name takes its mesh axes only if
# none of them is already used by an earlier rule on the same array. 'batch' comes first, so an
# activation (batch, seq, embed) gives 'fsdp' to the batch and leaves 'embed' replicated, while a
# parameter (which has no batch dimension) gives 'fsdp' to 'embed'.
_BATCH = (("batch", BATCH_AXES),)
_TP = (("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
_FSDP = (("embed", "fsdp"),)
PRESETS: dict[str, Rules] = {
    "dp": _BATCH,
    "fsdp": _BATCH + _FSDP,
    "fsdp_tp": _BATCH + _TP + _FSDP,
    "tp": _BATCH + _TP,
}


def logical_axis_rules(preset: str) -> Rules:
    """The rules table `((logical_name, mesh_axes_or_None), ...)` of a preset."""
    if preset not in PRESETS:
        raise ValueError(
            f"Unknown sharding rules preset {preset!r}; choose one of {', '.join(PRESETS)}."
        )
    return PRESETS[preset]


def _as_rules(rules: Rules | str) -> Rules:
    return logical_axis_rules(rules) if isinstance(rules, str) else tuple(rules)


def logical_to_spec(names: Sequence[str | None], rules: Rules | str) -> P:
    """The PartitionSpec for an array whose dimensions have these logical names.

    Unknown names raise (a typo would otherwise silently replicate the array). A mesh axis is
    used at most once per array: the earliest rule wins, as in Flax.
    """
    unknown = [n for n in names if n is not None and n not in LOGICAL_AXES]
    if unknown:
        raise ValueError(
            f"Unknown logical axis names {unknown} in {tuple(names)}; the "
            f"vocabulary is {LOGICAL_AXES} (add new names to LOGICAL_AXES)."
        )
    return spmd.logical_to_mesh_axes(tuple(names), _as_rules(rules))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "gptjax_sharding_active", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | str) -> Iterator[None]:
    """Activate `mesh` and `rules` for `constrain` (and set JAX's current mesh).

    `constrain` reads them when a function is *traced*, so trace (first call) the jitted
    functions inside this context. Entering `jax.set_mesh` makes the mesh part of jit's cache
    key, so a function traced outside is retraced inside; changing only the rules under the
    same mesh is not seen by a cached trace — make a new jitted function then.
    """
    token = _ACTIVE.set((mesh, _as_rules(rules)))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) set by the innermost `use_mesh`, or None."""
    return _ACTIVE.get()


def constrain(x: jax.Array, logical_names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside `use_mesh`.

    The model calls e.g. `x_BTD = constrain(x_BTD, ('batch', 'seq', 'embed'))` at layer
    boundaries so the partitioner keeps the batch split (and the residual stream unsplit under
    tensor parallelism) instead of guessing. Works inside jit, scan and remat.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    if len(logical_names) != x.ndim:
        raise ValueError(
            f"constrain: {len(logical_names)} names {tuple(logical_names)} for an "
            f"array of shape {x.shape}."
        )
    mesh, rules = active
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(logical_names, rules))
    )
