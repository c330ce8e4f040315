"""GPT-3's optimizer: AdamW with warmup + cosine decay, clipping, a decay mask, the batch ramp.

Everything here works on any params pytree (nested dicts of arrays with GPT-2 leaf names); it
knows nothing of the model. The numbers default to GPT-3 (Brown et al. 2020, appendix B):
Adam beta1 0.9, beta2 0.95, eps 1e-8, global-norm clip 1.0, weight decay 0.1, linear warmup then
cosine decay to 10% of the peak, and a linear batch-size ramp from 32k tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import gin
import jax
import optax

PyTree = Any
log = logging.getLogger(__name__)

# Leaf names that are "matrices" and get weight decay. Stacked layers have a leading `layers` axis,
# so a per-layer LayerNorm scale is 2-D `(L, D)` and ndim cannot tell it from a matrix: the
# name decides. `kernel` covers every dense layer (attention, MLP, task/reward heads); the rest
# are embedding tables (token, position, untied output, and Flax's `nn.Embed` name), and LoRA's
# factors `a`, `b` (`models.lora`; decayed, as PEFT under Hugging Face's Trainer does).
DECAY_NAMES = frozenset({"kernel", "embedding", "wte", "wpe", "wtt", "lm_head", "a", "b"})
# Names that never get decay: biases and LayerNorm gains/offsets. Any other name is also left
# undecayed, but logged, so a new parameter type does not silently escape the rule unnoticed.
NO_DECAY_NAMES = frozenset({"bias", "scale", "final_logits_bias"})


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer hyper-parameters; GPT-3 Small's values are the defaults.

    peak_lr: the maximum learning rate, reached at the end of warmup.
    warmup_steps: linear warmup from 0. GPT-3 warms up over 375M tokens, i.e. 715 steps at its
        0.5M-token (2**19) batch; scale it with your batch size.
    decay: shape after warmup: 'cosine' (GPT-3), 'linear', or 'constant' (stay at the peak).
    min_lr_ratio: the decay ends at min_lr_ratio * peak_lr (GPT-3: 10%).
    decay_steps: step at which the decay reaches its end value (then it holds); None means the
        last training step. GPT-3 decayed over 260B of its 300B tokens.
    b1, b2, eps: Adam moments; b2=0.95 (not 0.999) is GPT-3's choice for large-batch stability.
    weight_decay: decoupled (AdamW) decay on matrices only, see `weight_decay_mask`.
    clip_norm: global gradient-norm clip; None or 0 turns clipping off.
    grad_accum_steps: microbatches per step (`step.make_update` accumulates them exactly).
    batch_ramp_tokens: ramp the batch over this many tokens (GPT-3: 4-12B); 0 = no ramp.
    batch_ramp_start: the batch size, in tokens, at the start of the ramp (GPT-3: 32k).
    """

    peak_lr: float = 6e-4
    warmup_steps: int = 715
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    grad_accum_steps: int = 1
    batch_ramp_tokens: int = 0
    batch_ramp_start: int = 32768

    def __post_init__(self):
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {self.decay!r}")
        if self.warmup_steps < 0 or self.grad_accum_steps < 1:
            raise ValueError(
                f"need warmup_steps >= 0 and grad_accum_steps >= 1, got "
                f"{self.warmup_steps} and {self.grad_accum_steps}"
            )


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over `warmup_steps`, then decay to `min_lr_ratio * peak`.

    The decay ends at `cfg.decay_steps` (default `total_steps`) and holds its end value after.
    Step 0 has lr 0: optax counts updates from 0, so the first update is a no-op, as in GPT-3.
    A run too short for its warmup (a 5-step smoke test of a config made for thousands) warms
    up over the steps it has and skips the decay, with one warning line.
    """
    end_step = total_steps if cfg.decay_steps is None else cfg.decay_steps
    peak, end_value = cfg.peak_lr, cfg.peak_lr * cfg.min_lr_ratio
    if cfg.decay != "constant" and end_step <= cfg.warmup_steps:
        log.warning(
            "OptimizerConfig.warmup_steps=%d does not end before the decay ends (step %d): "
            "warming up over the first %d steps instead, with no decay.",
            cfg.warmup_steps,
            end_step,
            max(end_step, 1),
        )
        return optax.linear_schedule(0.0, peak, max(end_step, 1))
    decay_len = end_step - cfg.warmup_steps
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_len, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end_value, decay_len)
    else:
        after = optax.constant_schedule(peak)
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], boundaries=[cfg.warmup_steps])


# ----------------------------------------------------------------------------------------------
# Weight decay mask


def _leaf_name(path: tuple) -> str:
    """The innermost string key of a pytree path (dict key or attribute name)."""
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
        if isinstance(entry, jax.tree_util.GetAttrKey):
            return entry.name
    return ""


def weight_decay_mask(params: PyTree, decay_names=DECAY_NAMES) -> PyTree:
    """True for the leaves that get weight decay, by leaf name (see DECAY_NAMES).

    Rule: decay a leaf iff its own key is in `decay_names` (`kernel`, embeddings `wte`/`wpe`/
    `lm_head`/`embedding`). Biases and LayerNorm `scale`/`bias` are never decayed: decay would
    pull gains towards 0 and shift activations, which GPT-2/3 (and nanoGPT) avoid. The rule is by
    name, not ndim, because the stacked layer axis makes LayerNorm parameters 2-D. Works on
    arrays and on `jax.ShapeDtypeStruct`s, so optax can call it inside jit.
    """

    def decide(path, _):
        return _leaf_name(path) in decay_names

    mask = jax.tree_util.tree_map_with_path(decide, params)
    unknown = sorted(
        {
            jax.tree_util.keystr(p)
            for p, _ in jax.tree_util.tree_leaves_with_path(params)
            if _leaf_name(p) not in decay_names | NO_DECAY_NAMES
        }
    )
    if unknown:
        log.warning("weight_decay_mask: no decay for leaves with unknown names: %s", unknown)
    return mask


# ----------------------------------------------------------------------------------------------
# The optimizer


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(schedule, b1, b2, eps, masked decoupled decay).

    optax's AdamW multiplies the decay by the scheduled lr (p -= lr * (adam + wd * p)), as
    PyTorch's AdamW does; GPT-3's 0.1 is meant in that convention. Log the learning rate with
    `make_schedule(cfg, total_steps)(step)` and pass that `schedule` in to build (and warn
    about) it once; `step.make_update` reports the pre-clip gradient norm.
    """
    if schedule is None:
        schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask,
    )
    if not cfg.clip_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


# ----------------------------------------------------------------------------------------------
# GPT-3 batch-size ramp


def batch_size_at(
    tokens_seen: int, cfg: OptimizerConfig, full_batch_tokens: int, seq_len: int
) -> int:
    """Sequences per step after `tokens_seen` training tokens, under GPT-3's batch ramp.

    The batch grows linearly from `cfg.batch_ramp_start` tokens to `full_batch_tokens` over the
    first `cfg.batch_ramp_tokens` tokens, rounded to whole sequences, at least 1, at most full.
    The train loop keeps shapes static (one compilation): it always feeds the full batch and
    zeroes the loss mask of rows >= batch_size_at(...), counting only active rows' tokens into
    `tokens_seen`. Small early batches are cheap noisy steps while the loss falls fast.
    """
    full = max(1, full_batch_tokens // seq_len)
    if cfg.batch_ramp_tokens <= 0:
        return full
    frac = min(max(tokens_seen, 0) / cfg.batch_ramp_tokens, 1.0)
    start = min(cfg.batch_ramp_start, full_batch_tokens)
    tokens = start + frac * (full_batch_tokens - start)
    return int(min(full, max(1, round(tokens / seq_len))))
