"""`gptjax align-study`: PPO, PPO-ptx, DPO, RLOO, GRPO and best-of-n side by side, from one SFT
policy and one reward model on the offline sentiment task.

Layout of the study's workdir: `sft/` and `reward/` (trained once), `seed<s>/<method>/` for each
trained method and seed (each a stage workdir; a rerun skips what finished), then `study.json`
(every row), `study.md` (the table) and two plots, `gold_vs_kl.png` and `overoptimization.png`.

Every policy is measured the same way, on held-out prompts, one reply each at the rollout
temperature τ: the gold reward (the task's programmatic labeler), the proxy reward (the RM's
normalised score), KL(policy ‖ SFT) (Monte-Carlo: the summed log-ratio of the sampled reply,
under softmax(logits / τ) for both, an unbiased estimate of the sequence KL) and the pretraining
LM loss on held-out task text. Best-of-n is the SFT policy's n samples with the RM's best kept;
its KL is the closed form log n − (n − 1)/n. The online methods see `steps · batch_size` sampled
replies each; best-of-n's n is matched to that (the largest power of two with
n · eval_prompts ≤ steps · batch_size) unless set; DPO learns offline from comparisons like the
reward model's.

The over-optimisation plot is Gao et al. (2022)'s: proxy and gold reward against √KL, for
best-of-m (m = 1, 2, 4, … from the same draws) and along the PPO runs (per iteration, on the
training rollouts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time

import gin
import jax
import numpy as np

from gptjax.rlhf import (
    best_of_n,
    chat,
    comparisons,
    dpo,
    pipeline,
    ppo,
    reward,
    scoring,
    sft,
    study_plots,
    tasks,
)

log = logging.getLogger("gptjax")

METHODS = ("ppo", "ppo_ptx", "rloo", "grpo", "dpo", "best_of_n")
TRAINED = ("ppo", "ppo_ptx", "rloo", "grpo", "dpo")
COLUMNS = (
    ("gold", "gold reward"),
    ("proxy", "proxy (RM) reward"),
    ("kl", "KL to SFT (nats)"),
    ("lm_loss", "pretraining LM loss"),
    ("wall_s", "wall time (s)"),
)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """The study's methods and seeds (every other setting is the stages' gin configs).

    methods: any of METHODS; seeds: one run of each trained method per seed (the SFT policy
    and the reward model are shared); best_of_n: n for the table (None: matched to the online
    methods' samples); group_size: K for RLOO / GRPO; ptx_coef: γ of the PPO-ptx run;
    eval_prompts: held-out prompts every policy is measured on.
    """

    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1)
    best_of_n: int | None = None
    group_size: int = 4
    ptx_coef: float = 1.0
    eval_prompts: int = 256
    curve_draws: int = 64

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"StudyConfig.methods {unknown or '()'}: choose from {', '.join(METHODS)}."
            )
        if not self.seeds:
            raise ValueError("StudyConfig.seeds is empty: give at least one seed.")
        if self.best_of_n is not None and self.best_of_n < 1:
            raise ValueError(f"StudyConfig.best_of_n must be >= 1, got {self.best_of_n}.")

    def matched_n(self, ppo_cfg: ppo.PPOConfig) -> int:
        if self.best_of_n is not None:
            return self.best_of_n
        per_prompt = ppo_cfg.steps * ppo_cfg.batch_size / self.eval_prompts
        return 2 ** max(0, int(math.floor(math.log2(max(per_prompt, 1)))))


# ----------------------------------------------------------------------------- measuring


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _logps(cfg, params, tokens, mask, width, temperature):
    return scoring.policy_outputs(cfg, params, tokens, mask, width, temperature)[0]


def sequence_kl(cfg, params, ref_params, tokens, mask, width: int, temperature: float, chunk=64):
    """Σ_t log π(y_t) − log π_ref(y_t) over each sampled reply (B,): the Monte-Carlo KL."""
    out = []
    for lo in range(0, len(tokens), chunk):
        t, m = tokens[lo : lo + chunk], mask[lo : lo + chunk]
        diff = _logps(cfg, params, t, m, width, temperature)
        diff = diff - _logps(cfg, ref_params, t, m, width, temperature)
        out.append(np.where(np.asarray(m)[:, width:] != 0, np.asarray(diff), 0).sum(axis=1))
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class Judge:
    """What every policy is measured against: the SFT reference, the RM, the task, the
    held-out prompts and pretraining windows."""

    cfg: object
    ref_params: dict
    tokenizer: object
    rm: tuple
    task: object
    prompts: list
    width: int
    lm_windows: np.ndarray
    temperature: float
    max_new_tokens: int

    def gold(self, tokens: np.ndarray, prompts: list | None = None) -> np.ndarray:
        return ppo.gold_rewards(
            self.task, self.tokenizer, prompts or self.prompts, tokens, self.width
        )

    def proxy(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return best_of_n.score_rows(*self.rm, tokens, mask, chunk=64)

    def measure(self, params, key) -> dict:
        """Gold, proxy, KL to SFT and LM loss of one reply per held-out prompt."""
        out = chat.generate_replies(
            self.cfg,
            params,
            self.tokenizer,
            [chat.prompt_ids(self.tokenizer, p) for p in self.prompts],
            self.width,
            key=key,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            chunk=64,
        )
        kl = sequence_kl(
            self.cfg,
            params,
            self.ref_params,
            out["tokens"],
            out["mask"],
            self.width,
            self.temperature,
        )
        return {
            "gold": float(self.gold(out["tokens"]).mean()),
            "proxy": float(self.proxy(out["tokens"], out["mask"]).mean()),
            "kl": float(kl.mean()),
            "lm_loss": pipeline.lm_loss(self.cfg, params, self.lm_windows),
            "stop_rate": float(out["done"].mean()),
        }


def best_of_n_curve(judge: Judge, n: int, key, draws: int | None = None) -> dict:
    """Best-of-m for m = 1, 2, 4, …, `draws` (default n) from one set of SFT samples per
    held-out prompt: rows of m, analytic KL, proxy and gold; plus the table row at m = n (its
    wall time the sampling and scoring time pro rata, n / draws of the whole)."""
    draws = max(n, draws or n)
    t0 = time.perf_counter()
    out = best_of_n.best_of_n(
        judge.cfg,
        judge.ref_params,
        judge.tokenizer,
        *judge.rm,
        judge.prompts,
        judge.width,
        n=draws,
        key=key,
        max_new_tokens=judge.max_new_tokens,
        temperature=judge.temperature,
        chunk=64,
    )
    wall = (time.perf_counter() - t0) * n / draws
    b = len(judge.prompts)
    flat = out["all_tokens"].reshape(b * draws, -1)
    gold_BN = judge.gold(flat, [p for p in judge.prompts for _ in range(draws)]).reshape(b, draws)
    rows_B = np.arange(b)

    def best_of(m: int) -> dict:
        pick_B = out["all_scores"][:, :m].argmax(axis=1)
        return {
            "n": m,
            "kl": best_of_n.analytic_kl(m),
            "proxy": float(out["all_scores"][rows_B, pick_B].mean()),
            "gold": float(gold_BN[rows_B, pick_B].mean()),
        }

    ms = sorted({2**i for i in range(int(math.log2(draws)) + 1)} | {n, draws})
    row = {k: v for k, v in best_of(n).items() if k != "n"} | {"wall_s": wall, "n": n}
    return {"row": row, "curve": [best_of(m) for m in ms]}


# ----------------------------------------------------------------------------- training


def method_config(base: ppo.PPOConfig, method: str, study: StudyConfig, seed: int):
    """The online methods' PPOConfig: one base (gin's), the algorithm, ptx and seed varied."""
    return dataclasses.replace(
        base,
        algo="ppo" if method.startswith("ppo") else method,
        group_size=study.group_size,
        ptx_coef=study.ptx_coef if method == "ppo_ptx" else 0.0,
        seed=base.seed + 1000 * seed,
    )


def train_method(workdir: str, method: str, seed: int, dirs: dict, study: StudyConfig, mesh_cfg):
    """Train one method for one seed into `workdir` (a finished one is kept); its wall time."""
    wall_path = os.path.join(workdir, "wall_s.json")
    if sft.finished_stage(workdir) is not None and os.path.exists(wall_path):
        with open(wall_path) as f:
            return json.load(f)["wall_s"]
    t0 = time.perf_counter()
    if method == "dpo":
        base = dpo.DPOConfig()
        dpo_cfg = dataclasses.replace(base, seed=base.seed + 1000 * seed)
        dpo.run_dpo(workdir, dirs["sft"], dpo_cfg=dpo_cfg, mesh_cfg=mesh_cfg)
    else:
        ppo_cfg = method_config(ppo.PPOConfig(), method, study, seed)
        pipeline.run_ppo(workdir, dirs["sft"], dirs["reward"], ppo_cfg=ppo_cfg, mesh_cfg=mesh_cfg)
    wall = time.perf_counter() - t0
    with open(wall_path, "w") as f:
        json.dump({"wall_s": wall}, f)
    return wall


def make_judge(dirs: dict, study: StudyConfig, task, mesh_cfg) -> Judge:
    cfg, ref_params, tokenizer = sft.load_policy(dirs["sft"])
    mesh, rules = sft.stage_mesh(mesh_cfg)
    rm = reward.load_reward(dirs["reward"], mesh, rules)
    prompts = tasks.prompts(task, study.eval_prompts, 424242)
    width = max(len(chat.prompt_ids(tokenizer, p)) for p in prompts)
    ppo_cfg = ppo.PPOConfig()
    comparisons.check_prompt_fits(cfg, width, ppo_cfg.max_new_tokens, "PPOConfig.max_new_tokens")
    _, held = pipeline.ptx_data(tokenizer, task, min(cfg.max_len - 1, 48), 0)
    return Judge(
        cfg,
        ref_params,
        tokenizer,
        rm,
        task,
        prompts,
        width,
        held,
        ppo_cfg.temperature,
        ppo_cfg.max_new_tokens,
    )


# ----------------------------------------------------------------------------- the table


def aggregate(rows: list[dict]) -> list[dict]:
    """One line per method: each column's mean and std over seeds (std 0 with one seed)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        line = {"method": method, "seeds": len(mine), "samples": mine[0].get("samples")}
        for key, _ in COLUMNS:
            vals = np.array([r[key] for r in mine if r.get(key) is not None], np.float64)
            if len(vals):
                line[key] = float(vals.mean())
                line[f"{key}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        out.append(line)
    return out


def markdown_table(lines: list[dict]) -> str:
    head = "| method | seeds | sampled replies | " + " | ".join(t for _, t in COLUMNS) + " |"
    rule = "|---" * (3 + len(COLUMNS)) + "|"
    body = []
    for line in lines:
        cells = [
            f"{line[k]:.3f} ± {line[k + '_std']:.3f}" if k in line else "—" for k, _ in COLUMNS
        ]
        samples = line["samples"] if line["samples"] is not None else "—"
        body.append(
            f"| {line['method']} | {line['seeds']} | {samples} | " + " | ".join(cells) + " |"
        )
    return "\n".join([head, rule, *body]) + "\n"


# ----------------------------------------------------------------------------- the study


def _samples(method: str, study: StudyConfig, n: int) -> int:
    ppo_cfg, rm_cfg = ppo.PPOConfig(), reward.RewardConfig()
    if method == "dpo":
        return rm_cfg.n_prompts * rm_cfg.k  # offline: the comparisons' samples
    if method == "best_of_n":
        return n * study.eval_prompts
    return 0 if method == "sft" else ppo_cfg.steps * ppo_cfg.batch_size


def run_study(workdir: str, study: StudyConfig | None = None, mesh_cfg=None) -> dict:
    """The whole study (gin configures every stage); returns and writes its summary."""
    study, task = study or StudyConfig(), tasks.make_task()
    dirs = {s: os.path.join(workdir, s) for s in ("sft", "reward")}
    sft.run_sft(dirs["sft"], mesh_cfg=mesh_cfg)
    reward.run_reward(dirs["reward"], dirs["sft"], mesh_cfg=mesh_cfg)
    judge = make_judge(dirs, study, task, mesh_cfg)
    n = study.matched_n(ppo.PPOConfig())
    key = jax.random.key(2024)
    rows = [{"method": "sft", "seed": None, **judge.measure(judge.ref_params, key), "wall_s": None}]
    curves = []
    for seed in study.seeds:
        for method in (m for m in study.methods if m in TRAINED):
            run_dir = os.path.join(workdir, f"seed{seed}", method)
            wall = train_method(run_dir, method, seed, dirs, study, mesh_cfg)
            params = sft.load_policy(run_dir)[1]
            got = judge.measure(params, jax.random.fold_in(key, seed + 1))
            rows.append({"method": method, "seed": seed, **got, "wall_s": wall})
            log.info("study seed %d %s: %s", seed, method, rows[-1])
        if "best_of_n" in study.methods:
            bon_key = jax.random.fold_in(key, 10_000 + seed)
            bon = best_of_n_curve(judge, n, bon_key, study.curve_draws)
            lm = rows[0]["lm_loss"]  # the SFT policy's own
            rows.append({"method": "best_of_n", "seed": seed, **bon["row"], "lm_loss": lm})
            curves.append(bon["curve"])
    for row in rows:
        row["samples"] = _samples(row["method"], study, n)
    return write_outputs(workdir, rows, curves, study)


def write_outputs(workdir: str, rows: list[dict], curves: list, study: StudyConfig) -> dict:
    """study.json, study.md and the two plots."""
    lines = aggregate(rows)
    table = markdown_table(lines)
    ppo_dirs = [os.path.join(workdir, f"seed{s}", "ppo") for s in study.seeds]
    traj = study_plots.ppo_trajectory(ppo_dirs) if "ppo" in study.methods else None
    plots = {
        "gold_vs_kl": study_plots.plot_gold_vs_kl(rows, os.path.join(workdir, "gold_vs_kl.png"))
    }
    if curves:
        ppo_rows = [r for r in rows if r["method"] == "ppo"]
        plots["overoptimization"] = study_plots.plot_overoptimization(
            curves, traj, ppo_rows, os.path.join(workdir, "overoptimization.png")
        )
    summary = {"table": lines, "rows": rows, "best_of_n_curves": curves, "plots": plots}
    with open(os.path.join(workdir, "study.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, "study.md"), "w") as f:
        f.write(table)
    summary["markdown"] = table
    return summary
