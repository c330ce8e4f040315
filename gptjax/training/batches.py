"""A run's batches: the data side of the training loop.

The train iterator and eval factory of a run (built once per run, process 0
first), each corpus batch turned into the model family's objective on the host
(`Family.from_windows`, with a key per step so BERT's masks resume exactly),
GPT-3's batch ramp as masked padding rows, and global arrays on the mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptjax.config import ModelConfig
from gptjax.data.config import DataConfig, run_datasets, workdir_tokenizer
from gptjax.data.tokenizer import Tokenizer, check_vocab
from gptjax.models import family
from gptjax.parallel import mesh as sharding
from gptjax.training.optimizer import OptimizerConfig, batch_size_at
from gptjax.training.step import TrainConfig

EVAL_KEY_OFFSET = 2**31  # eval batch i is prepared with the key of step EVAL_KEY_OFFSET + i


class BatchRamp:
    """GPT-3's batch-size ramp with static shapes: each step feeds the full batch, of which
    only the first `rows(step)` rows are real data; the rest are padding, masked out."""

    def __init__(self, opt_cfg: OptimizerConfig, train_cfg: TrainConfig):
        self.opt_cfg, self.train_cfg = opt_cfg, train_cfg
        self.enabled = opt_cfg.batch_ramp_tokens > 0
        self._rows: list[int] = []  # rows used at each step, from step 0 (cheap to replay)
        self._rows_seen = 0  # sum(self._rows), kept so each new step costs O(1)

    def rows(self, step: int) -> int:
        """Real rows of the global batch at `step` (0-based): all of them without a ramp."""
        if not self.enabled:
            return self.train_cfg.batch_size
        full_tokens = self.train_cfg.batch_size * self.train_cfg.seq_len
        while len(self._rows) <= step:
            seen = self._rows_seen * self.train_cfg.seq_len
            self._rows.append(
                batch_size_at(seen, self.opt_cfg, full_tokens, self.train_cfg.seq_len)
            )
            self._rows_seen += self._rows[-1]
        return self._rows[step]

    def tokens(self, start: int, end: int) -> int:
        """Real tokens trained on over steps [start, end)."""
        return sum(self.rows(s) for s in range(start, end)) * self.train_cfg.seq_len


def mask_padding(local: dict, real_rows: int) -> dict:
    """Zero the loss mask of a local batch's padding rows (rows >= real_rows), multiplying any
    mask the batch already has (a task dataset's answer mask), never replacing it."""
    if real_rows == family.batch_rows(local):  # every row real (any family's batch)
        return local
    b, t_plus_1 = local["tokens"].shape
    rows_B1 = (np.arange(b) < real_rows)[:, None].astype(np.float32)
    mask_BT = np.asarray(local.get("loss_mask", np.ones((b, t_plus_1 - 1), np.float32)))
    return {**local, "loss_mask": mask_BT.astype(np.float32) * rows_B1}


def objective_key(seed: int, step: int) -> jax.Array:
    """The key of the host-side objective of step `step`'s batch (BERT's masks), per process.

    Eval batch i uses step EVAL_KEY_OFFSET + i, so every eval sees the same masks.
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), jax.process_index()), step)


@dataclasses.dataclass
class RunData:
    """A run's batches, global and in the family's objective: train batches under the batch
    ramp (only `ramp.rows(step)` rows are data, the rest masked padding) and eval batches."""

    model_cfg: ModelConfig
    tokenizer: Tokenizer
    train_iter: Any
    eval_factory: Callable[[], Iterator[dict]]
    ramp: BatchRamp
    seed: int
    mesh: Any
    rules: Any

    def prepare(self, step: int, local: dict) -> dict:
        """The family's objective from a corpus batch (BERT masking is keyed by the step)."""
        return family.from_windows(
            self.model_cfg, local, self.tokenizer, objective_key(self.seed, step)
        )

    def train_batch(self, step: int) -> dict:
        """The global batch of `step` (0-based), taken from the train iterator."""
        local, real = self.train_iter.take(self.ramp.rows(step))
        return sharding.make_global_batch(
            mask_padding(self.prepare(step, local), real), self.mesh, self.rules
        )

    def eval_batches(self) -> Iterator[dict]:
        """One in-order pass over the validation split, global batches (the same masks at
        every eval)."""
        for i, local in enumerate(self.eval_factory()):
            yield sharding.make_global_batch(
                self.prepare(EVAL_KEY_OFFSET + i, local), self.mesh, self.rules
            )


def prepare_data(
    workdir: str,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    primary: bool,
):
    """(tokenizer, train iterator, eval factory) of the run.

    Process 0 builds the dataset, tokenizer and token cache first; the others wait at the
    barrier and then read what it wrote (a shared data_dir and workdir), so they never race.
    """
    multi = jax.process_count() > 1
    if multi and not primary:
        multihost_utils.sync_global_devices("gptjax_prepare_data")
    tokenizer = workdir_tokenizer(workdir, data_cfg, save=primary)
    check_vocab(tokenizer, model_cfg.vocab_size)
    train_iter, eval_factory = run_datasets(
        data_cfg,
        tokenizer,
        task_format=family.family_of(model_cfg).task_format,
        seq_len=train_cfg.seq_len,
        batch_size=train_cfg.batch_size,
        seed=train_cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        model_vocab_size=model_cfg.vocab_size,
    )
    if multi and primary:
        multihost_utils.sync_global_devices("gptjax_prepare_data")
    return tokenizer, train_iter, eval_factory
