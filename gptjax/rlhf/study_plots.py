"""The align study's two plots: gold reward against KL per method, and Gao et al. (2022)'s
over-optimisation curves (proxy and gold reward against √KL) for best-of-n and PPO."""

from __future__ import annotations

import numpy as np

from gptjax.training import metrics as metrics_lib


def ppo_trajectory(workdirs: list[str]) -> dict[str, np.ndarray]:
    """√KL, proxy (RM) and gold reward per iteration of PPO runs' rollouts, mean over runs."""
    runs = [metrics_lib.read_metrics(w) for w in workdirs]
    n = min(len(r) for r in runs)
    pick = lambda key: np.mean([[row[key] for row in r[:n]] for r in runs], axis=0)  # noqa: E731
    return {
        "sqrt_kl": np.sqrt(np.maximum(pick("objective/kl"), 0)),
        "proxy": pick("objective/rm_scores"),
        "gold": pick("ppo/gold_reward"),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: str, legend_size: int):
    """Label, grid and legend `ax`, write `fig` to `path` as a PNG and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_gold_vs_kl(rows: list[dict], path: str) -> str:
    """Each method's final policy: gold reward against KL to SFT, a point per seed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        ax.scatter([r["kl"] for r in mine], [r["gold"] for r in mine], label=method, color=f"C{i}")
    return _finish(
        plt, fig, ax, "KL(policy ‖ SFT), nats", "gold reward (held-out prompts)",
        "Gold reward vs KL, one point per seed", path, 8,
    )  # fmt: skip


def plot_overoptimization(
    bon_curves: list[list[dict]], ppo_traj: dict | None, ppo_rows: list[dict], path: str
) -> str:
    """Gao et al. (2022): proxy (dashed, open) and gold (solid) reward against √KL, for
    best-of-m (mean over seeds), along PPO's iterations (its training rollouts, small points)
    and for its final policies (held-out prompts, large points)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = np.sqrt([p["kl"] for p in bon_curves[0]])
    for key, ls in (("proxy", "--"), ("gold", "-")):
        y = np.mean([[p[key] for p in c] for c in bon_curves], axis=0)
        ax.plot(x, y, ls, marker="o", color="C0", label=f"best-of-n {key}")
    if ppo_traj is not None:
        for key, face in (("proxy", "none"), ("gold", "C1")):
            ax.scatter(
                ppo_traj["sqrt_kl"], ppo_traj[key], s=12, facecolors=face, edgecolors="C1",
                alpha=0.6, label=f"PPO {key}, per iteration",
            )  # fmt: skip
    if ppo_rows:
        sqrt_kl = np.sqrt(np.maximum([r["kl"] for r in ppo_rows], 0))
        for key, face in (("proxy", "none"), ("gold", "C3")):
            ax.scatter(
                sqrt_kl, [r[key] for r in ppo_rows], s=60, facecolors=face, edgecolors="C3",
                label=f"PPO final {key} (held out)",
            )  # fmt: skip
    return _finish(
        plt, fig, ax, "√KL(policy ‖ SFT)", "reward", "Over-optimisation: proxy vs gold reward",
        path, 7,
    )  # fmt: skip
