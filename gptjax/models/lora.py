"""LoRA (Hu et al. 2021): low-rank adapters as a pure function over the params tree.

A chosen kernel `W` of shape `(L, *in, *out)` (stacked over layers, contraction dims first, as
every kernel here is stored) gets two factors, `a` of shape `(L, prod(in), r)` and `b` of shape
`(L, r, prod(out))`, and the model runs on

    merge(base, adapters) = W + (alpha / r) * (a @ b).reshape(W.shape)

inside the loss, so the forward pass, sharding and sampling code stay those of the base model
and gradients reach the adapters by the chain rule. `b` starts at zero (as in the paper and
PEFT), so a fresh adapter leaves the model exactly as it was; `a` starts Kaiming-uniform. The
optimizer then holds moments for the adapters only (`optimizer_state_bytes` measures it).

Adapter trees mirror the params tree: `{"h": {"attn": {"c_attn": {"a": ..., "b": ...}}}}`.

Trainers hold an *adapted* subtree, the plain dict `{"frozen": base params, "adapters": ...}`
(`attach`), wherever their params tree should train low-rank (the whole policy, a reward
model's trunk), so checkpoints and shardings treat it like any params tree. Their objective
runs on `materialize(cfg, params)` (`wrap_objective`), which merges every adapted subtree
with its base held constant; `freeze_frozen(optimizer)` keeps optimizer state for the
adapters (and any other trainable leaf, e.g. a head) only; `parallel.mesh.lora_shardings`
lays the adapters out by their logical axes. What a trainer saves is `materialize`'s ordinary
params.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Params = dict[str, Any]

# Input (contraction) dims of each adaptable kernel after its leading layer axis; the rest are
# its output dims. c_attn is (L, D, 3, N, H); the attention out-projection is (L, N, H, D).
INPUT_DIMS = {
    "attn.c_attn": 1,
    "attn.c_proj": 2,
    "mlp.c_fc": 1,
    "mlp.c_proj": 1,
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which kernels get adapters, and their rank and scale.

    Attributes:
      rank: r, the adapters' inner dimension.
      alpha: the update is scaled by alpha / r, so the effective step size does not change
        with r (the paper's convention; PEFT's default alpha is 2r here: 16 for r = 8).
      targets: kernels of every layer, as `module.kernel` names from `INPUT_DIMS`
        (the attention q/k/v and output projections, the MLP's two matrices).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(INPUT_DIMS)

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be >= 1, got {self.rank}.")
        unknown = [t for t in self.targets if t not in INPUT_DIMS]
        if unknown or not self.targets:
            raise ValueError(
                f"LoRAConfig.targets {unknown or '()'} are not adaptable kernels; choose from "
                f"{', '.join(INPUT_DIMS)}."
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kernel(params: Params, target: str):
    module, name = target.split(".")
    try:
        return params["h"][module][name]["kernel"]
    except KeyError:
        raise ValueError(
            f"the model has no {target} kernel (params['h'][{module!r}]...)."
        ) from None


def _split(target: str, shape) -> tuple[int, int]:
    """(fan_in, fan_out) of one layer's slice of a stacked kernel."""
    n_in = INPUT_DIMS[target]
    return math.prod(shape[1 : 1 + n_in]), math.prod(shape[1 + n_in :])


def init_adapters(cfg: LoRAConfig, params: Params, key: jax.Array) -> Params:
    """Fresh adapters for every target kernel: `a` Kaiming-uniform, `b` zero (float32)."""
    adapters: Params = {"h": {}}
    for target, k in zip(cfg.targets, jax.random.split(key, len(cfg.targets))):
        w = _kernel(params, target)
        fan_in, fan_out = _split(target, w.shape)
        bound = math.sqrt(3.0 / fan_in)  # Kaiming-uniform with gain 1, as PEFT's a
        a = jax.random.uniform(k, (w.shape[0], fan_in, cfg.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((w.shape[0], cfg.rank, fan_out), jnp.float32)
        module, name = target.split(".")
        adapters["h"].setdefault(module, {})[name] = {"a": a, "b": b}
    return adapters


def delta(cfg: LoRAConfig, target: str, w, adapter: Params):
    """The update `(alpha / r) a @ b` of one stacked kernel, in its shape and dtype."""
    ab = jnp.einsum("lir,lro->lio", adapter["a"], adapter["b"]) * cfg.scale
    return ab.reshape(w.shape).astype(w.dtype)


def merge(cfg: LoRAConfig, params: Params, adapters: Params) -> Params:
    """The params the model runs on: each target kernel plus its adapters' update.

    Pure and cheap to differentiate: call it inside the loss with the base params held
    constant, and the gradient with respect to `adapters` is LoRA's.
    """
    h = {module: dict(sub) for module, sub in params["h"].items()}
    for target in cfg.targets:
        module, name = target.split(".")
        w = _kernel(params, target)
        h[module][name] = {
            **params["h"][module][name],
            "kernel": w + delta(cfg, target, w, adapters["h"][module][name]),
        }
    return {**params, "h": h}


def adapter_axes(cfg: LoRAConfig, param_axes: Params) -> Params:
    """Logical axes of the adapters (for the sharding rules): `a` keeps the kernel's input
    axis and `b` its output axis where that is one named axis; the rank is replicated."""
    axes: Params = {"h": {}}
    for target in cfg.targets:
        module, name = target.split(".")
        kernel_axes = param_axes["h"][module][name]["kernel"]
        n_in = INPUT_DIMS[target]
        ins, outs = kernel_axes[1 : 1 + n_in], kernel_axes[1 + n_in :]
        a_in = ins[0] if len(ins) == 1 else None
        b_out = outs[0] if len(outs) == 1 else None
        axes["h"].setdefault(module, {})[name] = {
            "a": (kernel_axes[0], a_in, None),
            "b": (kernel_axes[0], None, b_out),
        }
    return axes


def optimizer_state_bytes(optimizer, tree: Params) -> int:
    """Bytes of `optimizer`'s state for `tree`, from shapes only (nothing is allocated)."""
    state = jax.eval_shape(optimizer.init, tree)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))


# ------------------------------------------------------------------- adapted subtrees

ADAPTED_KEYS = frozenset({"frozen", "adapters"})


def from_rank(rank: int, alpha: float, owner: str) -> LoRAConfig | None:
    """A trainer config's LoRA: None for rank 0 (full fine-tuning), else LoRAConfig(rank,
    alpha); `owner` (e.g. 'SFTConfig') names the config in the error for a negative rank."""
    if rank < 0:
        raise ValueError(f"{owner}.lora_rank must be >= 0 (0: full fine-tuning), got {rank}.")
    return LoRAConfig(rank=rank, alpha=alpha) if rank else None


def attach(cfg: LoRAConfig, params: Params, key: jax.Array) -> Params:
    """The adapted subtree of `params`: `{"frozen": params, "adapters": fresh adapters}`."""
    return {"frozen": params, "adapters": init_adapters(cfg, params, key)}


def is_adapted(tree) -> bool:
    """Whether `tree` is an adapted subtree (a dict with exactly the keys frozen, adapters)."""
    return isinstance(tree, dict) and set(tree) == ADAPTED_KEYS


def materialize(cfg: LoRAConfig | None, tree):
    """`tree` with every adapted subtree replaced by its merged params (the base under
    stop_gradient, so only the adapters get gradients); every other node as it is.

    With `cfg` None (full fine-tuning) a tree without adapted subtrees is returned as is.
    """
    if is_adapted(tree):
        if cfg is None:
            raise ValueError("the params hold LoRA adapters but no LoRAConfig was given.")
        return merge(cfg, jax.lax.stop_gradient(tree["frozen"]), tree["adapters"])
    if isinstance(tree, dict):
        return {k: materialize(cfg, v) for k, v in tree.items()}
    return tree


_materialize = jax.jit(materialize, static_argnums=0)


def merged_params(cfg: LoRAConfig | None, tree):
    """`materialize`, jitted once per config (the params a trainer evaluates, samples and
    saves); `tree` itself, uncopied, for None."""
    return tree if cfg is None else _materialize(cfg, tree)


def wrap_objective(cfg: LoRAConfig | None, objective: Callable) -> Callable:
    """`objective(params, *args, **kw)` run on `materialize(cfg, params)`, returning what it
    returns (e.g. `step.make_update`'s (sums, weights, stats)); `objective` itself for None."""
    if cfg is None:
        return objective

    @functools.wraps(objective)
    def adapted(params, *args, **kw):
        return objective(materialize(cfg, params), *args, **kw)

    return adapted


def _view(tree, fill, frozen: bool = False):
    """`tree` with each leaf under an adapted subtree's "frozen" replaced by `fill(leaf)`."""
    if is_adapted(tree) and not frozen:
        return {
            "frozen": _view(tree["frozen"], fill, True),
            "adapters": _view(tree["adapters"], fill),
        }
    if isinstance(tree, dict):
        return {k: _view(v, fill, frozen) for k, v in tree.items()}
    return fill(tree) if frozen else tree


def _empty(x):
    return jnp.zeros((0,) * jnp.ndim(x), x.dtype)


def freeze_frozen(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` over every leaf but the base params of adapted subtrees, whose updates are
    zero: its state (Adam's moments) holds only the adapters and other trainable leaves.

    `optimizer` sees each base leaf as an empty array of its rank (shape (0, ..., 0)), so its
    state keeps the params' tree at zero bytes for the base, and whatever shards the params
    shards the state (`mesh.opt_state_shardings`); its clipping sees the trainable gradients.
    """

    def init(params):
        return optimizer.init(_view(params, _empty))

    def update(updates, state, params=None):
        inner = None if params is None else _view(params, _empty)
        new, state = optimizer.update(_view(updates, _empty), state, inner)
        return _graft(new, _view(updates, jnp.zeros_like)), state

    return optax.GradientTransformation(init, update)


def _graft(new, full):
    """`new` with the base subtrees of `full` put back in place of its empty ones."""
    if is_adapted(full):
        return {"frozen": full["frozen"], "adapters": _graft(new["adapters"], full["adapters"])}
    if isinstance(full, dict):
        return {k: _graft(new[k], v) for k, v in full.items()}
    return new
