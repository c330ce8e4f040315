"""The PPO driver and the whole InstructGPT pipeline: SFT → reward model → PPO(-ptx).

`run_rlhf(workdir)` writes `workdir/{sft,reward,ppo}` (each a stage workdir with its own
metrics.jsonl and summary.json), then `workdir/summary.json` with the numbers that say whether
RLHF worked (RM held-out accuracy; gold reward before/after PPO in units of its start std; KL at
the end vs its target; pretraining LM loss before/after, the PPO-ptx question) and
`workdir/ppo_curves.png`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import gin
import jax
import numpy as np

from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.rlhf import chat, comparisons, ppo, reward, sft, tasks
from gptjax.training import metrics as metrics_lib
from gptjax.training import workdir as workdir_lib
from gptjax.training.optimizer import OptimizerConfig, make_optimizer
from gptjax.training.step import TrainConfig, TrainState

log = logging.getLogger("gptjax")


def ptx_data(tokenizer, task, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) windows of the task's pretraining corpus."""
    docs = task.pretrain_documents(2000, np.random.default_rng(seed + 1))  # SFT's corpus
    held = task.pretrain_documents(200, np.random.default_rng(seed + 1000))
    return (
        sft.corpus_windows(tokenizer, docs, seq_len),
        sft.corpus_windows(tokenizer, held, seq_len),
    )


def lm_loss(cfg, params, windows: np.ndarray, batch_size: int = 32) -> float:
    """Mean next-token loss of `params` on pretraining windows (the ptx regression metric)."""
    mask = np.ones((len(windows), windows.shape[1] - 1), np.int32)
    return sft.masked_eval_loss(cfg, params, {"tokens": windows, "loss_mask": mask}, batch_size)


def iteration_prompts(prompts: list, it: int, ppo_cfg: ppo.PPOConfig) -> list:
    """Iteration `it`'s batch_size rollout prompts: the next batch_size / K prompts in turn,
    each K times in a row (K = 1 for PPO, group_size for RLOO / GRPO's groups)."""
    k = ppo_cfg.samples_per_prompt
    n = ppo_cfg.batch_size // k
    lo = (it - 1) * n % len(prompts)
    return [p for p in (prompts * 2)[lo : lo + n] for _ in range(k)]


def _ppo_iterations(
    fns,
    state,
    models: dict,
    cfg,
    tokenizer,
    task,
    prompts: list,
    ptx_train,
    width: int,
    ppo_cfg: ppo.PPOConfig,
    key,
    writer,
):
    """`ppo_cfg.steps` iterations (rollout, update, KL controller), each logged; returns
    (state, per-iteration stats, the final β)."""
    rng = np.random.default_rng(ppo_cfg.seed)
    controller, kl_coef = ppo_cfg.controller(), ppo_cfg.controller().init()
    history = []
    for it in range(1, ppo_cfg.steps + 1):
        batch_prompts = iteration_prompts(prompts, it, ppo_cfg)
        params = fns.params(state)  # LoRA: merged once for the rollout and the scoring
        batch = ppo.rollout(
            cfg,
            params["policy"],
            tokenizer,
            batch_prompts,
            width,
            ppo_cfg,
            jax.random.fold_in(key, it),
        )
        ptx = None
        if ppo_cfg.ptx_coef > 0:
            shape = (ppo_cfg.epochs, ppo_cfg.minibatches, ppo_cfg.ptx_batch_size)
            ptx = ptx_train[rng.integers(len(ptx_train), size=shape)]
        t0 = time.perf_counter()
        state, stats = ppo.iteration(fns, state, models, kl_coef, batch, ptx, params)
        gold = ppo.gold_rewards(task, tokenizer, batch_prompts, batch["tokens"], width)
        stats |= {
            "ppo/gold_reward": float(gold.mean()),
            "ppo/gold_reward_std": float(gold.std()),
            "time/rollout_s": batch["time"],
            "time/update_s": time.perf_counter() - t0,
        }
        kl_coef = controller.update(kl_coef, stats["objective/kl"], ppo_cfg.batch_size)
        writer.write(it, stats)
        history.append(stats)
        if it % 10 == 0 or it == ppo_cfg.steps:
            log.info(
                "%s %d: gold %.3f score %.3f kl %.2f beta %.4f approxkl %.4f",
                ppo_cfg.algo,
                it,
                stats["ppo/gold_reward"],
                stats["objective/scores"],
                stats["objective/kl"],
                stats["objective/kl_coef"],
                stats["policy/approxkl"],
            )
    return state, history, kl_coef


def _end_summary(start: dict, end: dict, history: list, kl_coef) -> dict:
    """Gold reward at the end (and its gain in units of the start std); KL, β and RM score
    over the last tenth of the iterations."""
    tail = history[-max(1, len(history) // 10) :]
    return {
        "ppo/gold_reward_end": end["gold_reward"],
        "ppo/gold_reward_end_std": end["gold_reward_std"],
        "ppo/stop_rate_end": end["stop_rate"],
        "ppo/gold_reward_gain_in_start_std": (end["gold_reward"] - start["gold_reward"])
        / max(start["gold_reward_std"], 1e-9),
        "ppo/kl_end": float(np.mean([h["objective/kl"] for h in tail])),
        "ppo/kl_coef_end": float(kl_coef),
        "ppo/score_end": float(np.mean([h["objective/scores"] for h in tail])),
    }


def _save_ppo_policy(
    workdir: str, state, policy, cfg, opt_cfg, tokenizer, ppo_cfg: ppo.PPOConfig, seq_len, task
) -> None:
    """The (merged) policy as a policy workdir (`sft.save_policy`), with a fresh optimizer
    state."""
    policy = jax.device_get(policy)
    final = TrainState(
        step=state.step,
        params=policy,
        opt_state=make_optimizer(opt_cfg, ppo_cfg.steps).init(policy),
        rng=jax.device_get(state.rng),
    )
    sft.save_policy(
        workdir,
        final,
        cfg,
        opt_cfg,
        tokenizer,
        TrainConfig(steps=ppo_cfg.steps, batch_size=ppo_cfg.batch_size, seq_len=seq_len),
        {"stage": ppo_cfg.algo, "task": task.name},
    )


def _starting_critic(
    source: str, reward_workdir: str, rm: tuple, tokenizer, mesh, rules, key
) -> dict:
    """The value model's params: a reward workdir's RM with its normalisation folded into the
    head (InstructGPT: the RM itself, unless `source` names another), or any other
    workdir's trunk with a fresh head (`reward.from_policy`); the RM's config either way."""
    rm_cfg, rm_params, norm = rm
    if source == reward_workdir:
        return ppo.critic_from_reward(rm_params, norm)
    if reward.is_reward_workdir(source):
        workdir_lib.source_config(source, rm_cfg)  # the same model as the RM, or an error
        _, critic_params, critic_norm = reward.load_reward(source, mesh, rules)
        return ppo.critic_from_reward(critic_params, critic_norm)
    workdir_lib.check_tokenizer(source, tokenizer, "the policy's")
    trunk = workdir_lib.init_params_from(source, rm_cfg, mesh, rules).params
    return reward.from_policy(rm_cfg, trunk, key)


def start_ppo(
    fns, cfg, tokenizer, sft_workdir: str, reward_workdir: str, rm: tuple, ppo_cfg, mesh, rules
):
    """(frozen models, PPO state) on the PPO mesh: the reference policy (SFT's, never
    donated), the reward model `rm` = (config, params, norm); the policy from
    `ppo_cfg.init_from` (default SFT's) and the critic from `ppo_cfg.critic_init_from`
    (default the RM), each with fresh optimizer state at step 0."""
    policy_shardings = fns.state_shardings.params["policy"]
    ref = workdir_lib.init_params_from(sft_workdir, cfg, mesh, rules, policy_shardings).params
    policy = ref  # init_state copies it through the host: the state never aliases the ref
    if ppo_cfg.init_from:
        workdir_lib.check_tokenizer(ppo_cfg.init_from, tokenizer, "the SFT policy's")
        src = workdir_lib.init_params_from(ppo_cfg.init_from, cfg, mesh, rules, policy_shardings)
        policy = src.params
    critic = None  # RLOO / GRPO have none
    if ppo_cfg.has_critic:
        critic = _starting_critic(
            ppo_cfg.critic_init_from or reward_workdir,
            reward_workdir,
            rm,
            tokenizer,
            mesh,
            rules,
            jax.random.fold_in(jax.random.key(ppo_cfg.seed), 3),
        )
    models = {"ref": ref, "rm": rm[1], "norm": rm[2]}
    return models, ppo.init_state(fns, policy, critic, ppo_cfg.seed)


def _start_summary(start: dict, ptx_lm_loss: float, ppo_cfg: ppo.PPOConfig) -> dict:
    """The run's settings and the policy's scores before PPO."""
    return {
        "ppo/algo": ppo_cfg.algo,
        "ppo/group_size": ppo_cfg.samples_per_prompt,
        "ppo/kl_target": ppo_cfg.kl_target if ppo_cfg.adaptive_kl else None,
        "ppo/ptx_coef": ppo_cfg.ptx_coef,
        "ppo/gold_reward_start": start["gold_reward"],
        "ppo/gold_reward_start_std": start["gold_reward_std"],
        "ppo/stop_rate_start": start["stop_rate"],
        "ppo/ptx_lm_loss_start": ptx_lm_loss,
    }


def run_ppo(
    workdir: str,
    sft_workdir: str,
    reward_workdir: str,
    *,
    ppo_cfg: ppo.PPOConfig | None = None,
    opt_cfg: OptimizerConfig | None = None,
    task=None,
    mesh_cfg: sharding.MeshConfig | None = None,
) -> dict:
    """Stage 3 end to end; writes metrics.jsonl, summary.json and the final policy."""
    ppo_cfg, task = ppo_cfg or ppo.PPOConfig(), task or tasks.make_task()
    if opt_cfg is None:
        with gin.config_scope("ppo"):
            opt_cfg = OptimizerConfig()
    if (done := sft.finished_stage(workdir)) is not None:
        return done
    cfg = workdir_lib.source_config(sft_workdir)
    tokenizer = workdir_lib.source_tokenizer(sft_workdir, required=True)
    workdir_lib.check_tokenizer(reward_workdir, tokenizer, "the SFT policy's")
    mesh, rules = sft.stage_mesh(mesh_cfg)
    rm = reward.load_reward(reward_workdir, mesh, rules)
    train_prompts = tasks.prompts(task, ppo_cfg.n_prompts, ppo_cfg.seed)
    eval_prompts = tasks.prompts(task, ppo_cfg.eval_prompts, ppo_cfg.seed + 99)
    width = max(len(chat.prompt_ids(tokenizer, p)) for p in train_prompts + eval_prompts)
    comparisons.check_prompt_fits(cfg, width, ppo_cfg.max_new_tokens, "PPOConfig.max_new_tokens")
    seq_len = min(cfg.max_len - 1, 48)
    ptx_train, ptx_held = ptx_data(tokenizer, task, seq_len, 0)
    key = jax.random.key(ppo_cfg.seed)
    writer, t_start = metrics_lib.MetricWriter(workdir), time.perf_counter()

    def evaluate(params, n: int) -> dict:
        return ppo.evaluate(
            cfg, params, tokenizer, task, eval_prompts, width, ppo_cfg, jax.random.fold_in(key, n)
        )

    try:
        with logical.use_mesh(mesh, rules):
            fns = ppo.make_ppo(cfg, rm[0], ppo_cfg, opt_cfg, width, mesh, rules)
            models, state = start_ppo(
                fns, cfg, tokenizer, sft_workdir, reward_workdir, rm, ppo_cfg, mesh, rules
            )
            start = evaluate(fns.params(state)["policy"], 1_000_001)
            summary = _start_summary(start, lm_loss(cfg, models["ref"], ptx_held), ppo_cfg)
            state, history, kl_coef = _ppo_iterations(
                fns,
                state,
                models,
                cfg,
                tokenizer,
                task,
                train_prompts,
                ptx_train,
                width,
                ppo_cfg,
                key,
                writer,
            )
            policy = fns.params(state)["policy"]
            end = evaluate(policy, 1_000_002)
            summary["ppo/ptx_lm_loss_end"] = lm_loss(cfg, policy, ptx_held)
    finally:
        writer.close()
    summary |= _end_summary(start, end, history, kl_coef)
    summary |= {"ppo/steps": ppo_cfg.steps, "ppo/wall_s": time.perf_counter() - t_start}
    summary |= {
        "ppo/init_from": ppo_cfg.init_from or sft_workdir,
        "ppo/lora_rank": ppo_cfg.lora_rank,
    }
    if ppo_cfg.has_critic:
        summary["ppo/critic_init_from"] = ppo_cfg.critic_init_from or reward_workdir
    sft.write_summary(workdir, summary)
    _save_ppo_policy(workdir, state, policy, cfg, opt_cfg, tokenizer, ppo_cfg, seq_len, task)
    return summary


def plot_ppo(ppo_workdir: str, path: str, kl_target: float | None = None) -> str:
    """Gold reward, RM score and KL over PPO iterations, one panel each, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = metrics_lib.read_metrics(ppo_workdir)
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        ("ppo/gold_reward", "gold reward (labeler program)"),
        ("objective/scores", "RM score (normalised)"),
        ("objective/kl", "KL(policy‖SFT), nats"),
    )
    for ax, (key, title) in zip(axes, panels):
        ax.plot(steps, [r[key] for r in rows])
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    if kl_target is not None:
        axes[2].axhline(kl_target, color="gray", ls="--", label="target")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def run_rlhf(
    workdir: str, mesh_cfg: sharding.MeshConfig | None = None, init_from: str | None = None
) -> dict:
    """All three stages with gin's configs (SFT from `init_from` when given, else
    `SFTConfig.init_from`); returns (and writes) the pipeline summary. A rerun skips the
    stages that finished (`sft.finished_stage`)."""
    t0 = time.perf_counter()
    dirs = {s: os.path.join(workdir, s) for s in ("sft", "reward", "ppo")}
    summary = {"stages": dirs}
    sft_cfg = sft.SFTConfig()
    if init_from:
        sft_cfg = dataclasses.replace(sft_cfg, init_from=init_from)
    summary |= sft.run_sft(dirs["sft"], sft_cfg=sft_cfg, mesh_cfg=mesh_cfg)
    summary["sft/wall_s"] = time.perf_counter() - t0
    summary |= reward.run_reward(dirs["reward"], dirs["sft"], mesh_cfg=mesh_cfg)
    summary["reward/wall_s"] = time.perf_counter() - t0 - summary["sft/wall_s"]
    summary |= run_ppo(dirs["ppo"], dirs["sft"], dirs["reward"], mesh_cfg=mesh_cfg)
    summary["plot"] = plot_ppo(
        dirs["ppo"], os.path.join(workdir, "ppo_curves.png"), summary["ppo/kl_target"]
    )
    summary["wall_s"] = time.perf_counter() - t0
    _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
