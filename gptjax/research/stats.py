"""Statistics and plots for sweep results: Welch's t-test (no scipy needed), a power-law
fit for scaling sweeps, and the loss-curve / final-metric / scaling-law figures."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

# ---------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float, iters: int = 300, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (Numerical Recipes 6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isnan(t) or math.isnan(df) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def welch_t_test(a: Float[np.ndarray, " n"], b: Float[np.ndarray, " m"]) -> tuple[float, float]:
    """(t, two-sided p) of Welch's unequal-variance t-test; NaN when a side has < 2 values.

    Welch, not Student: seeds of two architectures need not have equal variance. With no
    variance on either side (e.g. a quantised metric such as exact match that every seed
    hits exactly) p is 1 for equal means and NaN otherwise: undefined, not "significant".
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    diff = float(a.mean() - b.mean())
    if va + vb == 0.0:
        return (0.0, 1.0) if diff == 0.0 else (math.copysign(math.inf, diff), math.nan)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return t, t_two_sided_p(t, df)


def fit_power_law(n: Float[np.ndarray, " k"], loss: Float[np.ndarray, " k"]) -> dict[str, float]:
    """L(N) = a * N^-b + c by least squares (c on a grid, a and b by log-log regression).

    With fewer than 4 points the offset is not identifiable and c = 0 (a log-log line).
    """
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    if len(n) < 2:
        raise ValueError("a scaling-law fit needs at least two model sizes.")
    offsets = np.linspace(0.0, 0.99 * loss.min(), 200) if len(n) >= 4 else np.zeros(1)
    best = None
    for c in offsets:
        slope, intercept = np.polyfit(np.log(n), np.log(loss - c), 1)
        pred = np.exp(intercept) * n**slope + c
        sse = float(np.sum((pred - loss) ** 2))
        if best is None or sse < best["sse"]:
            best = {"a": float(np.exp(intercept)), "b": float(-slope), "c": float(c), "sse": sse}
    return best


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_curves(runs: dict[str, list[dict]], path: str) -> None:
    """Train loss per step (solid, one line per seed) and eval loss (dashed) per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, rs) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for j, r in enumerate(rs):
            steps, losses = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(steps, losses, color=color, alpha=0.7, lw=1, label=name if j == 0 else None)
            if r["eval_curve"]:
                ax.plot(*zip(*r["eval_curve"]), color=color, ls="--", marker="o", ms=3)
    ax.set(xlabel="step", ylabel="loss (solid: train, dashed: eval)", title="loss per variant")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_final(rows: list[dict], metric: str, path: str) -> None:
    """Seed mean +- std of the final metric per variant, with the seeds as dots."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 4))
    for i, row in enumerate(rows):
        values = [float(x) for x in row["per_seed"].split(";") if x]
        std = np.std(values, ddof=1) if len(values) > 1 else 0.0
        ax.errorbar(i, np.mean(values), yerr=std, fmt="s", color=f"C{i % 10}", capsize=4)
        ax.scatter([i] * len(values), values, color=f"C{i % 10}", alpha=0.5, s=12)
        if not math.isnan(row["p_value"]):
            ax.annotate(
                f"p={row['p_value']:.2g}",
                (i, np.mean(values)),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize=8,
            )
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=20, fontsize=8)
    ax.set(ylabel=f"final {metric}", title=f"final {metric} (mean ± std over seeds)")
    _save(fig, path)


def plot_scaling(sizes: Sequence[float], losses: Sequence[float], fit: dict, path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(sizes, losses, "o", label="runs (seed mean)")
    grid = np.geomspace(min(sizes) / 2, max(sizes) * 4, 100)
    ax.loglog(
        grid,
        fit["a"] * grid ** -fit["b"] + fit["c"],
        "-",
        label=f"L = {fit['a']:.3g}·N^-{fit['b']:.3f} + {fit['c']:.3g}",
    )
    ax.set(xlabel="non-embedding parameters N", ylabel="final loss", title="scaling law")
    ax.legend(fontsize=8)
    _save(fig, path)
