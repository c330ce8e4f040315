"""Pretrained models in and out of workdirs: `gptjax import`, `gptjax convert --export_to` and
`gptjax eval --text_file`.

Import: a Hugging Face directory (config.json + model.safetensors or pytorch_model.bin, and its
tokenizer files) of GPT-2, GPT-1 (openai-gpt), BERT or Marian becomes a workdir that
`gptjax sample | eval | train` read as if `gptjax train` had written it: `config.json` and
`config.gin` (the model's config from the Hugging Face one; train, optimizer and data configs as
gin resolves them, so `--gin_bindings` set them), the tokenizer, and checkpoint step 0 holding a
full train state (the weights and a fresh optimizer state, as `training.workdir.load_run`
restores it). The weights go through `gptjax.hf`; hf and training are sibling layers, so the
code that needs both, this, lives in research/.

Export writes the Hugging Face directory and, for GPT-2's BPE, the tokenizer files, so
`from_pretrained` on it and on its tokenizer reproduce our logits and ids.

Text-file loss follows Hugging Face's perplexity recipe with stride = window (see
`text_windows`), through the project's one eval path (`evals.in_context.perplexity`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import hf
from gptjax.config import ModelConfig
from gptjax.data.config import DataConfig, workdir_tokenizer
from gptjax.data.gpt2_tokenizer import GPT2Tokenizer
from gptjax.data.tokenizer import Tokenizer, check_vocab, load_tokenizer
from gptjax.evals.in_context import perplexity
from gptjax.models import family
from gptjax.training import checkpoint as ckpt_lib
from gptjax.training import workdir as workdir_lib
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig, Trainer, abstract_state, make_trainer, place_state

# The data iterator's position before its first batch (`TokenBatchIterator.get_state()` of a
# fresh iterator, for corpora and tasks alike), saved so `gptjax train` can resume step 0.
FRESH_DATA_STATE = {"epoch": 0, "window": 0, "order": "grain"}


@dataclasses.dataclass(frozen=True)
class Imported:
    """What `import_hf` wrote: the model, its Hugging Face kind, the tokenizer (None when the
    directory had none that gptjax reads) and a sentence saying why not."""

    cfg: ModelConfig
    model_type: str
    n_params: int
    tokenizer: Tokenizer | None
    tokenizer_note: str


# ------------------------------------------------------------------------- workdir state


def one_device_trainer(configs: dict) -> Trainer:
    """The run's trainer on a one-device mesh: the layout `load_run` restores into."""
    mesh, rules = workdir_lib.one_device_mesh()
    train_cfg = configs["train"]
    return make_trainer(
        configs["model"], configs["optimizer"], train_cfg.steps, mesh, rules, train_cfg.batch_size
    )


def restore_params(workdir: str) -> tuple[ModelConfig, dict, int]:
    """(model config, params, step) of a workdir's newest good checkpoint; unlike `load_run`
    it needs no tokenizer (an import may have none)."""
    src = workdir_lib.init_params_from(workdir)
    return src.cfg, src.params, src.step


def checked_params(params: dict, abstract_params, source: str) -> dict:
    """`params` as the config's model lays them out: the same leaves, the same shapes, each
    floating-point weight cast to the config's `param_dtype`; else one clear error."""
    want = {
        jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(abstract_params)
    }
    got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    if missing := sorted(want.keys() - got.keys()):
        raise ValueError(f"{source}: no weights for {', '.join(missing[:3])}")
    if extra := sorted(got.keys() - want.keys()):
        raise ValueError(f"{source}: weights {', '.join(extra[:3])} have no place in the model")
    for path, spec in want.items():
        x = got[path]
        if tuple(np.shape(x)) != tuple(spec.shape):
            raise ValueError(
                f"{source}: weight {path} has shape {tuple(np.shape(x))}, but the config "
                f"implies {tuple(spec.shape)}; config.json and the weights do not belong together"
            )
        if not jnp.issubdtype(np.asarray(x).dtype, jnp.floating):  # bfloat16 included
            raise ValueError(f"{source}: weight {path} is {np.asarray(x).dtype}, not a float")
    return jax.tree_util.tree_map_with_path(
        lambda p, s: np.asarray(got[jax.tree_util.keystr(p)], s.dtype), abstract_params
    )


def gin_text(configs: dict) -> str:
    """Gin bindings that rebuild `configs` (`gptjax train --gin_file=W/config.gin`)."""
    model = configs["model"]
    lines = [
        "import gptjax.models.family",
        "",
        f"model_config.family = {family.family_of(model).name!r}",
    ]
    for cfg in (model, configs["train"], configs["optimizer"], configs["data"]):
        name = type(cfg).__name__
        lines += [""] + [f"{name}.{k} = {v!r}" for k, v in dataclasses.asdict(cfg).items()]
    return "\n".join(lines) + "\n"


def write_run_files(workdir: str, configs: dict, header: str) -> None:
    """`config.json` (what `load_configs` reads) and `config.gin` (what `gptjax train` parses)."""
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(
            {
                "family": family.family_of(configs["model"]).name,
                **{k: dataclasses.asdict(v) for k, v in configs.items()},
            },
            f,
            indent=2,
        )
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(header + gin_text(configs))


# ---------------------------------------------------------------------------------- import


def read_hf_config(directory: str) -> dict:
    """The directory's config.json, refused before any weight is read when gptjax cannot
    import its model_type."""
    hf_config = hf.read_config(directory)
    model_type = hf_config.get("model_type", "gpt2")  # as hf.load_hf reads it
    supported = hf.MODEL_TYPES
    if model_type not in supported:
        raise ValueError(
            f"{directory!r} holds a {model_type!r} model; gptjax imports "
            f"{', '.join(supported)} (Hugging Face model_type)."
        )
    return hf_config


def hf_tokenizer(directory: str) -> tuple[Tokenizer | None, str]:
    """(the directory's tokenizer, or None; why not): gptjax reads GPT-2's byte-level BPE in
    Hugging Face's and OpenAI's layouts (and its own saved tokenizers), not WordPiece
    (BERT), GPT-1's lower-cased BPE or Marian's sentencepiece pair."""
    try:
        return load_tokenizer(directory), ""
    except (FileNotFoundError, ValueError) as e:
        return None, (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_new_workdir(workdir: str) -> None:
    if os.path.isfile(workdir):
        raise FileExistsError(f"--workdir={workdir!r} is a file; give a new directory.")
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise FileExistsError(
            f"--workdir={workdir!r} is not empty; import into a new directory "
            "(nothing there was changed)."
        )


def _save_checkpoint(workdir: str, trainer: Trainer, params: dict, train_cfg: TrainConfig):
    """Checkpoint step 0: the weights, a fresh optimizer state and the run's rng, as
    `make_trainer`'s init would give for this seed, with the data iterator at its start."""
    rng = jax.random.split(jax.random.key(train_cfg.seed))[1]  # step._init's run key
    state = place_state(trainer.optimizer, params, rng, trainer.state_shardings)
    meta = {"data": {**FRESH_DATA_STATE, "seed": train_cfg.seed}, "skipped_updates": 0}
    with ckpt_lib.CheckpointManager(
        workdir,
        checkpoint_every=train_cfg.checkpoint_every,
        max_to_keep=train_cfg.keep_checkpoints,
    ) as manager:
        manager.save(0, state, meta, force=True)
        manager.wait()


def import_hf(directory: str, workdir: str) -> Imported:
    """Make `workdir` (new or empty) a gptjax workdir of the Hugging Face model in `directory`.

    Everything is read and checked before anything is written: the model_type, the weights
    against the config's shapes, and the tokenizer against the embedding (`check_vocab`).
    """
    _check_new_workdir(workdir)
    model_type = read_hf_config(directory).get("model_type", "gpt2")
    cfg, params = hf.load_hf(directory)
    tokenizer, reason = hf_tokenizer(directory)
    if tokenizer is not None:
        check_vocab(tokenizer, cfg.vocab_size)
    train_cfg = TrainConfig()  # gin's values: the flags' --gin_bindings set them
    if train_cfg.seq_len > cfg.max_len:
        train_cfg = dataclasses.replace(train_cfg, seq_len=cfg.max_len)
    configs = {
        "model": cfg,
        "train": train_cfg,
        "optimizer": OptimizerConfig(),
        "data": DataConfig(),
    }
    trainer = one_device_trainer(configs)
    params = checked_params(params, abstract_state(trainer).params, directory)

    os.makedirs(workdir, exist_ok=True)
    header = (
        f"# Imported by `gptjax import` from {os.path.abspath(directory)} ({model_type}).\n"
        f"# Continue training: gptjax train --gin_file={workdir}/config.gin --workdir={workdir}\n"
    )
    write_run_files(workdir, configs, header)
    if tokenizer is not None:
        tokenizer.save(workdir)
    _save_checkpoint(workdir, trainer, params, train_cfg)
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    return Imported(cfg, model_type, n_params, tokenizer, reason)


# ---------------------------------------------------------------------------------- export


def export_hf(workdir: str, directory: str) -> list[str]:
    """Write the workdir's newest checkpoint as a Hugging Face directory of its family
    (`hf.save_hf`), with GPT-2 BPE tokenizer files when it has that tokenizer; returns one
    line per thing written or left out."""
    cfg, params, step = restore_params(workdir)
    hf.save_hf(directory, cfg, jax.tree.map(np.asarray, jax.device_get(params)))
    lines = [f"wrote {directory}/config.json and model.safetensors (step {step})"]
    try:
        tokenizer = workdir_tokenizer(workdir)
    except FileNotFoundError:
        tokenizer = None
    if isinstance(tokenizer, GPT2Tokenizer):
        tokenizer.export_hf(directory)
        lines.append(
            f"wrote {directory}/vocab.json, merges.txt, tokenizer_config.json and "
            "special_tokens_map.json (GPT2TokenizerFast.from_pretrained reads them)"
        )
    elif tokenizer is None:
        lines.append(
            f"tokenizer not exported: {workdir} has none; from_pretrained gets the weights only"
        )
    else:
        lines.append(
            f"tokenizer not exported: gptjax's {type(tokenizer).__name__} has no Hugging Face "
            f"equivalent with its ids; tokenize with gptjax's load_tokenizer({workdir!r})"
        )
    return lines


# ------------------------------------------------------------------------- text-file loss


def text_windows(ids: Sequence[int], window: int, batch_size: int) -> Iterator[dict]:
    """Batches `{"tokens": (B, T)}` of the non-overlapping windows ids[0:W], ids[W:2W], ...

    Each window is scored on all its next-token predictions (its first token is context only,
    so a window of T tokens counts T - 1): Hugging Face's perplexity recipe with stride =
    max_length. The last, partial window is included (its own batch); one of a single token
    has no prediction and adds nothing. Full windows go `batch_size` to a batch.
    """
    if window < 2:
        raise ValueError(f"--window must be at least 2 tokens, got {window}.")
    n_full = len(ids) // window
    full_NW = np.asarray(ids[: n_full * window], np.int32).reshape(n_full, window)
    for start in range(0, n_full, batch_size):
        yield {"tokens": full_NW[start : start + batch_size]}
    if len(ids) - n_full * window >= 2:
        yield {"tokens": np.asarray(ids[n_full * window :], np.int32)[None]}


def text_file_loss(
    cfg: ModelConfig,
    params,
    tokenizer: Tokenizer,
    path: str,
    window: int | None = None,
    batch_size: int = 16,
) -> dict:
    """Mean next-token loss, perplexity and scored tokens of a decoder over a UTF-8 text file,
    tokenized once as a whole, in `text_windows` of `window` (default the model's max_len)
    tokens; also `windows`, how many there were."""
    if not family.family_of(cfg).causal_lm:
        raise ValueError(
            f"--text_file scores next-token predictions; this {family.family_of(cfg).name} "
            "model has none (evaluate it with `gptjax eval` on its own objective)."
        )
    window = cfg.max_len if window is None else window
    if window > cfg.max_len:
        raise ValueError(f"--window={window} exceeds the model's max_len={cfg.max_len}.")
    with open(path, encoding="utf-8", newline="") as f:
        ids = tokenizer.encode(f.read())
    if len(ids) < 2:
        raise ValueError(f"{path} has {len(ids)} tokens; it needs at least 2 to score one.")
    out = perplexity(cfg, params, text_windows(ids, window, batch_size), max_batches=None)
    windows = len(ids) // window + (len(ids) % window >= 2)
    return {**out, "windows": windows, "window": window}
