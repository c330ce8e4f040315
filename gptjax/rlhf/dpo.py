"""Direct preference optimisation: DPO (Rafailov et al. 2023), cDPO's label smoothing and IPO
(Azar et al. 2023) over K-way rankings, on the reward model's pair machinery
(`losses.ranked_pairs`): the same data, the same pairs, a different score per response.

Training (`run_dpo`) starts from an SFT policy, on the reward model's comparison data (K
samples per task prompt ranked by the gold reward, or HH chosen/rejected pairs). The
reference log-probs are computed once, before the first step, and stored with the data, so
no reference model is held during training; the update is the shared `step.make_update`.
With `DPOConfig.lora_rank` > 0 the policy trains as low-rank adapters (`models.lora`), the
optimizer state covering them only, and the merged policy is saved.
"""

from __future__ import annotations

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gptjax.config import ModelConfig
from gptjax.models import family, lora
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.rlhf import comparisons, reward, scoring, sft, tasks
from gptjax.rlhf.losses import (
    Mask,
    Scalar,
    Stats,
    _check_shapes,
    _safe_div,
    per_prompt_mean,
    ranked_pairs,
)
from gptjax.rlhf.reward import RewardConfig
from gptjax.training import metrics as metrics_lib
from gptjax.training.optimizer import OptimizerConfig, make_optimizer
from gptjax.training.step import TrainConfig, jit_train_step, make_update, place_state

DPO_LOSSES = ("sigmoid", "ipo")


def dpo_terms(
    logps_BK: Float[Array, "B K"],
    ref_logps_BK: Float[Array, "B K"],
    ranks_BK: Int[Array, "B K"] | Float[Array, "B K"],
    valid_BK: Mask,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[Scalar, Scalar, Stats]:
    """Direct preference optimisation over K ranked responses per prompt, before its one
    division (sum over prompts of each prompt's mean pair loss, prompts with a pair, stats).

    The implicit reward of a response is r = beta (log pi(y|x) - log pi_ref(y|x)) (its summed
    response log-probs under the policy and the frozen reference). For each better/worse
    pair, with h = (log-ratio of the better) - (log-ratio of the worse) and m = beta h:
      'sigmoid': -(1 - eps) log sigmoid(m) - eps log sigmoid(-m) (Rafailov et al. 2023; eps is
        cDPO's label smoothing, the chance a label is flipped);
      'ipo': (h - 1 / (2 beta))^2 (Azar et al. 2023, with tau = beta).
    Pairs are formed as for the reward model (`reward_ranking_terms`): all C(K, 2) of a
    prompt in one batch element, equal ranks and padding forming none; K = 2 is HH's
    chosen/rejected. Stats (means over pairs): accuracy (r_better > r_worse), margin, each
    side's implicit reward and log-prob.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"DPO loss_type {loss_type!r} is not one of {DPO_LOSSES}.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}.")
    _check_shapes("dpo_loss", logps_BK, ref_logps_BK, ranks_BK, valid_BK)
    rewards_BK = beta * (logps_BK - ref_logps_BK)
    pair_BKK, margin_BKK = ranked_pairs(rewards_BK, ranks_BK, valid_BK)
    pair_f_BKK = pair_BKK.astype(margin_BKK.dtype)
    if loss_type == "sigmoid":
        eps = label_smoothing
        nll_BKK = -(1 - eps) * jax.nn.log_sigmoid(margin_BKK) - eps * jax.nn.log_sigmoid(
            -margin_BKK
        )
    else:
        nll_BKK = (margin_BKK / beta - 1 / (2 * beta)) ** 2
    total, n_prompts, n_pairs = per_prompt_mean(nll_BKK, pair_f_BKK)
    valid_BK = jnp.asarray(valid_BK) != 0

    def side_mean(x_BK, better: bool):
        x_BK = jnp.where(valid_BK, x_BK, 0)
        x_BKK = x_BK[:, :, None] if better else x_BK[:, None, :]
        return _safe_div(jnp.sum(x_BKK * pair_f_BKK), n_pairs)

    stats = {
        "dpo/loss": _safe_div(total, n_prompts),
        "dpo/accuracy": _safe_div(jnp.sum((margin_BKK > 0) * pair_f_BKK), n_pairs),
        "dpo/margin": _safe_div(jnp.sum(margin_BKK), n_pairs),
        "dpo/chosen_reward": side_mean(rewards_BK, True),
        "dpo/rejected_reward": side_mean(rewards_BK, False),
        "dpo/chosen_logp": side_mean(logps_BK, True),
        "dpo/rejected_logp": side_mean(logps_BK, False),
    }
    return total, n_prompts, stats


def dpo_loss(logps_BK, ref_logps_BK, ranks_BK, valid_BK, **kw) -> tuple[Scalar, Stats]:
    """`dpo_terms` divided once: the mean over prompts of each prompt's mean pair loss."""
    total, n_prompts, stats = dpo_terms(logps_BK, ref_logps_BK, ranks_BK, valid_BK, **kw)
    return _safe_div(total, n_prompts), stats


# ----------------------------------------------------------------------------- training


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO's hyper-parameters (the data are `RewardConfig`'s, the optimizer `dpo/OptimizerConfig`).

    beta: the KL strength (Rafailov et al.: 0.1-0.5); label_smoothing: cDPO's eps; loss_type:
    'sigmoid' (DPO) or 'ipo'. steps, batch_size: updates and prompts (each with its K
    responses) per update. lora_rank: 0 trains every param; r > 0 trains rank-r adapters of
    the policy's attention and MLP kernels, scaled by lora_alpha / r.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    steps: int = 200
    batch_size: int = 16
    log_every: int = 50
    seed: int = 3
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def __post_init__(self):
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"DPOConfig.loss_type {self.loss_type!r} is not one of {DPO_LOSSES}.")
        if self.beta <= 0 or self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("DPOConfig.beta, steps and batch_size must be positive.")
        lora.from_rank(self.lora_rank, self.lora_alpha, "DPOConfig")  # a negative rank raises

    @property
    def lora(self) -> lora.LoRAConfig | None:
        """The policy's LoRA, None for full fine-tuning (lora_rank 0)."""
        return lora.from_rank(self.lora_rank, self.lora_alpha, "DPOConfig")

    @property
    def loss_options(self) -> dict:
        return dict(beta=self.beta, label_smoothing=self.label_smoothing, loss_type=self.loss_type)


def response_mask(tokens_NKT: np.ndarray, mask_NKT: np.ndarray, width: int | None) -> np.ndarray:
    """Which tokens are the responses DPO scores: slots from `width` on (task prompts are
    left-padded into `width` slots), or, for HH conversations, those after the longest prefix
    the K responses of a prompt share (their common history)."""
    out = mask_NKT.copy()
    if width is not None:
        out[:, :, :width] = 0
        return out
    differs_NT = np.any(tokens_NKT != tokens_NKT[:, :1], axis=1)
    first_N = np.where(differs_NT.any(1), differs_NT.argmax(1), tokens_NKT.shape[2])
    shared_N1T = np.arange(tokens_NKT.shape[2])[None, :] < first_N[:, None]
    return np.where(shared_N1T[:, None, :], 0, out)


def sequence_logps(cfg: ModelConfig, params, tokens_BT, mask_BT, response_BT) -> jax.Array:
    """log pi(response | prompt): the summed log-probs of the response tokens."""
    logp_BT1, _ = scoring.policy_outputs(cfg, params, tokens_BT, mask_BT, 1, 1.0)
    return jnp.sum(logp_BT1 * response_BT[:, 1:], axis=1)


def _logps_BK(cfg, params, batch):
    b, k, t = batch["tokens"].shape
    flat = lambda name: batch[name].reshape(b * k, t)
    logps = sequence_logps(cfg, params, flat("tokens"), flat("mask"), flat("response"))
    return logps.reshape(b, k)


@functools.partial(jax.jit, static_argnums=0)
def _batch_logps(cfg, params, batch):
    return _logps_BK(cfg, params, batch)


def reference_logps(cfg: ModelConfig, params, arrays: dict, batch_size: int = 32) -> np.ndarray:
    """Every response's log-prob under the frozen reference, once, in fixed-size chunks."""
    out = []
    names = ("tokens", "mask", "response")
    for i in range(0, len(arrays["tokens"]), batch_size):
        part = {k: arrays[k][i : i + batch_size] for k in names}
        n = len(part["tokens"])
        part = {
            k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, 0)]) for k, v in part.items()
        }
        out.append(np.asarray(_batch_logps(cfg, params, part))[:n])
    return np.concatenate(out)


def dpo_objective(cfg: ModelConfig, dpo_cfg: DPOConfig):
    """DPO's loss as `step.make_update` wants it (one term, weighted by prompts)."""

    def objective(params, mb: dict):
        logps_BK = _logps_BK(cfg, params, mb)
        total, n_prompts, stats = dpo_terms(
            logps_BK, mb["ref_logps"], mb["ranks"], mb["valid"], **dpo_cfg.loss_options
        )
        return {"loss": total}, {"loss": n_prompts}, stats

    return objective


def _step_metrics(m: dict, step) -> dict:
    stats = {k: v for k, v in m.items() if k.startswith("dpo/")}
    return stats | {"dpo/grad_norm": m["grad_norm"], "dpo/update_skipped": m["update_skipped"]}


def heldout_stats(cfg, params, arrays: dict, dpo_cfg: DPOConfig, batch_size: int = 32) -> dict:
    """DPO's stats on held-out comparisons (all their pairs at once)."""
    logps = reference_logps(cfg, params, arrays, batch_size)  # the same function, new params
    _, stats = dpo_loss(
        logps, arrays["ref_logps"], arrays["ranks"], arrays["valid"], **dpo_cfg.loss_options
    )
    return {f"heldout/{k.split('/', 1)[1]}": float(v) for k, v in stats.items()}


def make_train_step(cfg: ModelConfig, dpo_cfg: DPOConfig, opt_cfg, policy_params, mesh, rules, key):
    """(jitted step, step-0 state): DPO's `step.jit_train_step` over `step.make_update`, on the
    policy's params or (with `dpo_cfg.lora`) on adapters of them (`lora.attach`)."""
    lcfg = dpo_cfg.lora
    optimizer = make_optimizer(opt_cfg, dpo_cfg.steps)
    params, shardings = policy_params, sharding.param_shardings(cfg, mesh, rules)
    if lcfg is not None:
        optimizer = lora.freeze_frozen(optimizer)
        params = lora.attach(lcfg, policy_params, jax.random.fold_in(key, 2))
        shardings = sharding.lora_shardings(lcfg, shardings, family.param_axes(cfg), mesh, rules)
    objective = lora.wrap_objective(lcfg, dpo_objective(cfg, dpo_cfg))
    update = make_update(objective, optimizer, opt_cfg.grad_accum_steps)
    step_fn, state_shard = jit_train_step(
        lambda p, o, batch, key: update(p, o, batch),
        optimizer,
        params,
        shardings,
        (sharding.batch_sharding(mesh, rules, ndim=1),),
        mesh,
        _step_metrics,
    )
    return step_fn, place_state(optimizer, params, jax.random.fold_in(key, 1), state_shard)


def _prepare(cfg, policy_params, tokenizer, task, rm_cfg: RewardConfig, key):
    """(train, held-out) arrays with response masks and the reference's log-probs."""
    train, held, width = comparisons.comparison_data(
        cfg, policy_params, tokenizer, task, rm_cfg, key
    )
    for arrays in (train, held):
        arrays["response"] = response_mask(
            arrays["tokens"], arrays["mask"], None if rm_cfg.hh_path else width
        )
        arrays["ref_logps"] = reference_logps(cfg, policy_params, arrays)
    return train, held


def run_dpo(
    workdir: str,
    sft_workdir: str,
    *,
    dpo_cfg: DPOConfig | None = None,
    rm_cfg: RewardConfig | None = None,
    opt_cfg: OptimizerConfig | None = None,
    task=None,
    mesh_cfg: sharding.MeshConfig | None = None,
) -> dict:
    """DPO end to end from an SFT workdir: comparisons, reference log-probs, training,
    held-out stats; the policy is saved as a workdir `gptjax sample|chat` read (a workdir
    that already holds a finished run returns its summary: `sft.finished_stage`)."""
    if (done := sft.finished_stage(workdir)) is not None:
        return done
    dpo_cfg, rm_cfg, task = (
        dpo_cfg or DPOConfig(),
        rm_cfg or RewardConfig(),
        task or tasks.make_task(),
    )
    if opt_cfg is None:
        with gin.config_scope("dpo"):
            opt_cfg = OptimizerConfig()
    cfg, policy_params, tokenizer = sft.load_policy(sft_workdir)
    mesh, rules = sft.stage_mesh(mesh_cfg)
    key = jax.random.key(dpo_cfg.seed)
    train, held = _prepare(cfg, policy_params, tokenizer, task, rm_cfg, key)
    names = ("tokens", "mask", "response", "ranks", "valid", "ref_logps")
    it = sft.batches({k: train[k] for k in names}, dpo_cfg.batch_size, dpo_cfg.seed)
    summary = heldout_stats(cfg, policy_params, held, dpo_cfg)  # at the reference: log 2
    summary = {f"{k}_start": v for k, v in summary.items()}
    writer = metrics_lib.MetricWriter(workdir)
    try:
        with logical.use_mesh(mesh, rules):
            step_fn, state = make_train_step(cfg, dpo_cfg, opt_cfg, policy_params, mesh, rules, key)
            state = reward.train_steps(
                step_fn, state, it, dpo_cfg.steps, dpo_cfg.log_every, mesh, rules, writer, "dpo"
            )
            if dpo_cfg.lora is not None:
                state = sft.merged_state(dpo_cfg.lora, state, dpo_cfg.steps)
            summary |= heldout_stats(cfg, state.params, held, dpo_cfg)
            writer.write(dpo_cfg.steps, summary)
    finally:
        writer.close()
    train_cfg = TrainConfig(steps=dpo_cfg.steps, batch_size=dpo_cfg.batch_size)
    meta = {"stage": "dpo", "task": task.name, **dataclasses.asdict(dpo_cfg)}
    summary["dpo/lora_rank"] = dpo_cfg.lora_rank
    sft.write_summary(workdir, summary)  # before the checkpoint: see sft.finished_stage
    sft.save_policy(workdir, state, cfg, opt_cfg, tokenizer, train_cfg, meta)
    return summary
