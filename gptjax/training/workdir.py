"""Read a workdir back: its configs, tokenizer and params; and start a new run from one.

`gptjax sample`, `gptjax eval` and the notebooks read a run with `load_run`. Every trainer's
`init_from` (`TrainConfig`, `SFTConfig`, `RewardConfig`, `PPOConfig`, fine-tuning's pretrained
workdir) goes through `init_params_from`: the source's params only (never its optimizer
state, which would not fit the new run's schedule), read from its newest good checkpoint
straight onto the *new* run's mesh and shardings, after checking that the two model configs
describe the same parameters. Nothing here writes to the source workdir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from gptjax.config import ModelConfig, Seq2SeqConfig
from gptjax.data.config import DataConfig, workdir_tokenizer
from gptjax.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from gptjax.models import family
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig, Trainer, TrainState, state_from_params

log = logging.getLogger("gptjax")

# ModelConfig fields that change how parameters are computed with, not what they are: a run
# may set them differently from its init_from source (dropout for fine-tuning, bf16 compute,
# remat, scanned or unrolled layers, the attention kernel; param_dtype is a cast on load;
# label smoothing is part of the loss). Every other field must match.
RUNTIME_FIELDS = (
    "embd_dropout",
    "attn_dropout",
    "resid_dropout",
    "dtype",
    "param_dtype",
    "remat",
    "scan_layers",
    "attention_impl",
    "label_smoothing",
)


def load_configs(workdir: str) -> dict:
    """The dataclass configs a run wrote to `workdir/config.json` (the model's in its
    family's class: ModelConfig, EncoderConfig or Seq2SeqConfig)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"no config.json in {workdir!r}; train first with "
            f"`gptjax train --workdir={workdir} ...`."
        )
    raw = json.loads(path.read_text())
    kinds = {
        "model": family.by_name(raw.get("family", "decoder")).config_class,
        "train": TrainConfig,
        "optimizer": OptimizerConfig,
        "data": DataConfig,
    }
    return {k: kinds[k](**v) for k, v in raw.items() if k in kinds}


# ------------------------------------------------------------------------ model configs


def param_fields(cfg: ModelConfig) -> dict[str, Any]:
    """What fixes the parameters' shapes and meaning: the family and every field but
    `RUNTIME_FIELDS`, with defaults resolved (d_ff None is 4 * d_model; the window only
    counts for banded attention)."""
    fields = {"family": family.family_of(cfg).name}
    fields |= {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in RUNTIME_FIELDS
    }
    fields["d_ff"] = cfg.ff_dim
    if isinstance(cfg, Seq2SeqConfig):
        fields["n_decoder_layers"] = cfg.decoder_layers
    if cfg.attention != "gpt3_sparse":
        del fields["local_window"]
    return fields


def check_compatible(source_cfg: ModelConfig, run_cfg: ModelConfig, source: str) -> None:
    """Raise a one-line ValueError naming every parameter-defining field that differs."""
    a, b = param_fields(source_cfg), param_fields(run_cfg)
    names = list(a) + [k for k in b if k not in a]
    diffs = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in names if a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(
            f"init_from {source!r} holds another model than this run's (source vs run: "
            f"{'; '.join(diffs)}); give the run the source's ModelConfig (only "
            f"{', '.join(RUNTIME_FIELDS)} may differ) or start from a matching workdir."
        )


def source_config(workdir: str, model_cfg: ModelConfig | None = None) -> ModelConfig:
    """The model config a run started from `workdir` trains: the source's own, or
    `model_cfg` once `check_compatible` has accepted it (its run-time fields win)."""
    source_cfg = load_configs(workdir)["model"]
    if model_cfg is None:
        return source_cfg
    check_compatible(source_cfg, model_cfg, workdir)
    return model_cfg


# ---------------------------------------------------------------------------- tokenizers


def source_tokenizer(workdir: str, required: bool = False) -> Tokenizer | None:
    """The tokenizer a workdir holds (any layout `load_tokenizer` reads), or None."""
    try:
        return load_tokenizer(workdir)
    except FileNotFoundError:
        if required:
            raise FileNotFoundError(
                f"no tokenizer in {workdir!r}; a model needs the ids it was trained on: copy "
                "its tokenizer there (Tokenizer.save) first."
            ) from None
        return None


def check_tokenizer(source: str, expected: Tokenizer | None, what: str) -> Tokenizer | None:
    """The source's tokenizer, after checking it is `expected` (`what` names where that
    one comes from in the error); a source without one is accepted with a warning."""
    theirs = source_tokenizer(source)
    if theirs is None:
        log.warning("%s has no tokenizer; its ids cannot be checked.", source)
    elif expected is not None and expected.fingerprint != theirs.fingerprint:
        raise ValueError(
            f"{source!r} was trained with another tokenizer than {what} "
            f"(fingerprints {theirs.fingerprint[:12]} vs {expected.fingerprint[:12]}); "
            "a model only understands its own ids: use the source's tokenizer (drop the "
            "other one) or start from a workdir trained with it."
        )
    return theirs


def adopt_tokenizer(
    source: str, workdir: str, data_cfg: DataConfig | None = None, save: bool = True
) -> Tokenizer | None:
    """Make the source's tokenizer the run's: checked against any the run already names
    (a tokenizer in `workdir`, `DataConfig.tokenizer_path`, or the byte tokenizer) and
    written into `workdir` (on `save`), where the run then loads it. A kind the run would
    build ('bpe', 'char') is not checked: the source's replaces it."""
    named = [(source_tokenizer(workdir), f"the one in {workdir!r}")]
    if data_cfg is not None and data_cfg.tokenizer_path:
        path = data_cfg.tokenizer_path
        named.append((load_tokenizer(path), f"DataConfig.tokenizer_path={path!r}"))
    elif data_cfg is not None and data_cfg.tokenizer == "byte":
        named.append((ByteTokenizer(), "DataConfig.tokenizer='byte'"))
    theirs = None
    for tokenizer, what in named:
        if tokenizer is not None:
            theirs = check_tokenizer(source, tokenizer, what)
    theirs = theirs or source_tokenizer(source)
    if theirs is not None and save and named[0][0] is None:
        theirs.save(workdir)
    return theirs


# ------------------------------------------------------------------------------- params


class IncompatibleSourceError(ValueError):
    """The source's checkpoint cannot hold this run's params (the same at every step)."""


def _params_prefix(tree: Any, want: set[str], source: str) -> tuple[str, ...]:
    """Where the model params sit in a checkpoint's saved tree: under 'params' (a TrainState,
    or `{'params': ...}`), under 'params'/'trunk' (a reward model), or at the root."""
    for prefix in (("params",), ("params", "trunk"), ()):
        node = tree
        for k in prefix:
            node = node[k] if hasattr(node, "keys") and k in node else None
        if hasattr(node, "keys") and want <= set(node.keys()):
            return prefix
    raise IncompatibleSourceError(
        f"the checkpoint of {source!r} holds no model params with {sorted(want)} (saved top "
        f"level: {sorted(tree.keys()) if hasattr(tree, 'keys') else type(tree).__name__})."
    )


def _nest(prefix: tuple[str, ...], tree: Any) -> Any:
    for k in reversed(prefix):
        tree = {k: tree}
    return tree


def _pick(prefix: tuple[str, ...], tree: Any) -> Any:
    for k in prefix:
        tree = tree[k]
    return tree


def _sub_checksums(leaves: dict, prefix: tuple[str, ...]) -> dict:
    """The checksum records of the leaves under `prefix`, keyed as `fingerprints` keys the
    subtree alone (a TrainState's '.params' and a dict's \"['params']\" both work)."""
    rest = "".join(f"[{k!r}]" for k in prefix[1:])
    heads = (f".{prefix[0]}{rest}", f"[{prefix[0]!r}]{rest}") if prefix else ("",)
    for head in heads:
        sub = {k[len(head) :]: v for k, v in leaves.items() if k.startswith(head + "[")}
        if sub:
            return sub
    return {}


def _saved_leaves(node: Any, path: tuple = ()) -> dict[tuple, Any]:
    """{key path: orbax ArrayMetadata} of a saved (sub)tree's metadata."""
    if hasattr(node, "keys"):
        return {k: v for key in node for k, v in _saved_leaves(node[key], (*path, key)).items()}
    if isinstance(node, (list, tuple)):
        return {k: v for i, x in enumerate(node) for k, v in _saved_leaves(x, (*path, i)).items()}
    return {path: node}


def _key_path(path) -> tuple:
    return tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)


def _restore_step(step_dir: epath.Path, abstract: Any, source: str) -> Any:
    """Only the params of one step: read in their saved dtypes, verified against the step's
    checksums, cast to `abstract`'s dtypes, laid out on its shardings (any mesh)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:  # the handler's metadata: the Checkpointer's also looks for (and warns about) a file
        saved = handler.metadata(step_dir / "state")
    finally:
        handler.close()
    with ocp.PyTreeCheckpointer() as ckptr:
        prefix = _params_prefix(saved, set(abstract), source)
        stored = _saved_leaves(_pick(prefix, saved))
        target = jax.tree_util.tree_map_with_path(
            lambda p, x: _saved_like(stored, p, x, source), abstract
        )
        item = _nest(prefix, target)
        args = ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        params = _pick(prefix, ckptr.restore(step_dir / "state", args=args))
    _verify(params, step_dir, prefix)
    return jax.tree.map(
        lambda x, want: (
            x if x.dtype == want.dtype else jax.device_put(x.astype(want.dtype), x.sharding)
        ),
        params,
        abstract,
    )


def _saved_like(stored: dict, path, x: jax.ShapeDtypeStruct, source: str):
    """The run's leaf `x` in the dtype it was saved in; an error if it was not saved, or
    in another shape."""
    meta = stored.get(_key_path(path))
    name = jax.tree_util.keystr(path)
    if meta is None:
        raise IncompatibleSourceError(f"{source!r}'s params have no {name}.")
    if tuple(meta.shape) != tuple(x.shape):
        raise IncompatibleSourceError(
            f"{source!r}'s {name} has shape {tuple(meta.shape)}, this run's {tuple(x.shape)}."
        )
    return jax.ShapeDtypeStruct(x.shape, meta.dtype, sharding=x.sharding)


def _verify(params: Any, step_dir: epath.Path, prefix: tuple[str, ...]) -> None:
    if not (step_dir / "checksums").exists():
        log.warning("Checkpoint %s has no checksums; its values are not verified.", step_dir)
        return
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        leaves = ckptr.restore(step_dir / "checksums")["leaves"]
    ckpt_lib.verify(params, _sub_checksums(leaves, prefix))


def restore_params(workdir: str, abstract: Any) -> tuple[int, Any]:
    """(step, params) from the newest step of `workdir` whose params restore and verify.

    `abstract` is the params tree as ShapeDtypeStructs with the target shardings. Only the
    params are read (orbax's partial restore: the optimizer moments, twice the params'
    size under Adam, stay on disk), and they land on `abstract`'s mesh whatever mesh wrote
    them. A damaged step is logged and an older one tried, as `CheckpointManager.restore`
    does, but nothing is moved: the source is read-only here.
    """
    with ckpt_lib.CheckpointManager(workdir, read_only=True) as manager:
        steps = manager.all_steps()[::-1]
        directory = manager.directory
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {workdir!r}/checkpoints yet.")
    failures = []
    for step in steps:
        try:
            return step, _restore_step(directory / str(step), abstract, workdir)
        except IncompatibleSourceError:
            raise
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            log.warning("Checkpoint step %d of %s is unusable (%s).", step, workdir, e)
            failures.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    raise ckpt_lib.CheckpointError(
        f"no checkpoint of {workdir!r} could be restored. Tried: {'; '.join(failures)}"
    )


@dataclasses.dataclass(frozen=True)
class Source:
    """What a run starts from: the model config it trains (the source's, or the run's after
    the check), the params on the run's shardings, and where they came from."""

    workdir: str
    cfg: ModelConfig
    params: Any
    step: int
    configs: dict


def one_device_mesh():
    """(mesh, rules) of the first device: enough to sample from or score a small model."""
    mesh_cfg = sharding.MeshConfig(shape={"data": 1, "fsdp": 1, "tensor": 1})
    mesh = sharding.make_mesh(mesh_cfg, devices=jax.devices()[:1])
    return mesh, logical.logical_axis_rules(mesh_cfg.rules)


def init_params_from(
    workdir: str,
    model_cfg: ModelConfig | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: tuple | None = None,
    shardings: Any = None,
) -> Source:
    """The params of `workdir` (any workdir with a config.json and checkpoints: a
    `gptjax train` run, a stage of the RLHF pipeline, an imported GPT-2), for a new run.

    `model_cfg` is the run's config; it must match the source's except `RUNTIME_FIELDS`
    (`check_compatible`, a one-line error naming each differing field); None takes the
    source's. The params land on `shardings` (default: the model's on `mesh` and `rules`;
    default mesh: one device), in the run's param_dtype. The run's optimizer state, step
    and data position start fresh; the caller builds them (`step.state_from_params`).
    """
    configs = load_configs(workdir)
    cfg = source_config(workdir, model_cfg)
    if shardings is None:
        if mesh is None:
            mesh, rules = one_device_mesh()
        shardings = sharding.param_shardings(cfg, mesh, rules)
    shapes = jax.eval_shape(lambda: family.init_params(cfg, jax.random.key(0)))
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    step, params = restore_params(workdir, abstract)
    return Source(workdir=workdir, cfg=cfg, params=params, step=step, configs=configs)


def init_state_from(workdir: str, trainer: Trainer, seed: int) -> tuple[TrainState, int]:
    """(step-0 state, source step): `workdir`'s params for the trainer's model (checked) on
    its shardings, with a fresh optimizer state and the seed's rng (`state_from_params`)."""
    src = init_params_from(
        workdir, trainer.cfg, trainer.mesh, trainer.rules, trainer.state_shardings.params
    )
    log.info("initialised from step %d of %s (fresh optimizer state, step 0)", src.step, workdir)
    return state_from_params(trainer, src.params, seed), src.step


def load_run(workdir: str, mesh_cfg: sharding.MeshConfig | None = None):
    """(model_cfg, params, tokenizer, configs, step) from a workdir's newest good checkpoint,
    on the mesh of `mesh_cfg` (default: one device)."""
    if mesh_cfg is None:
        mesh, rules = one_device_mesh()
    else:
        mesh, rules = sharding.make_mesh(mesh_cfg), logical.logical_axis_rules(mesh_cfg.rules)
    src = init_params_from(workdir, mesh=mesh, rules=rules)
    return src.cfg, src.params, workdir_tokenizer(workdir), src.configs, src.step
