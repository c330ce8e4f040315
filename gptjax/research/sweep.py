"""Ablation sweeps: a gin file names a base experiment, axes and seeds; run, tabulate, plot.

A sweep file binds one configurable, `Sweep`:

    Sweep.base = 'quickstart.gin'                    # the experiment every variant starts from
    Sweep.bindings = ['STEPS = 300']                 # applied to every variant (scale here)
    Sweep.grid = {'ModelConfig.ln_placement': ['pre', 'post']}        # cartesian product
    Sweep.zipped = {'ModelConfig.d_model': [64, 128],                 # varied together
                    'ModelConfig.n_heads': [2, 4]}
    Sweep.seeds = [0, 1, 2]                          # TrainConfig.seed of each repeat
    Sweep.baseline = 'ln_placement=pre'              # default: the first variant
    Sweep.finetune = ['real_or_shuffled']            # GPT-1 tasks each run is fine-tuned on
    Sweep.extra_metrics = ['eval/exact_match']       # more columns in results.csv

Variants are grid x zipped; each runs once per seed as `gptjax train` with the base file plus
its bindings, in `W/<variant>/seed_<k>/`: sequentially in-process (gin's global config is
cleared and re-parsed per run) or one subprocess each; `--print_commands` prints the command
lines for a cluster scheduler instead. Finished runs are kept, so a sweep resumes. Outputs:
`W/results.csv` (a row per variant: seed mean, std, Welch p-value vs the baseline), `W/runs.csv`
(a row per run) and `W/*.png`. With `Sweep.finetune`, every trained run is then fine-tuned on
each named task (`gptjax.research.finetune`, in `<run>/finetune_<task>/`) and the accuracy
becomes the metric `finetune/<task>`.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import gin
import numpy as np

from gptjax.evals.hooks import train_with_defaults  # registers CodeEvalConfig before parsing
from gptjax.experiments import EXPERIMENTS_DIR, find_gin_file, parse_gin
from gptjax.research.finetune import TASKS as FINETUNE_TASKS  # registers FinetuneConfig early
from gptjax.research.stats import (
    fit_power_law,
    plot_curves,
    plot_final,
    plot_scaling,
    welch_t_test,
)

_BINDING_KEY = re.compile(r"^[A-Za-z_][\w.]*(/[\w.]+)*$")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Sweep:
    """One ablation: a base experiment, the axes that vary, the seeds, what to compare.

    Attributes:
      base: gin file of the experiment (resolved against the cwd, then experiments/).
      grid: binding -> list of values; every combination is a variant.
      zipped: binding -> list of values, all the same length; the i-th values go together
        (e.g. width and heads of one model size).
      seeds: `TrainConfig.seed` of each repeat of a variant.
      bindings: gin bindings applied to every variant before the axes (e.g. 'STEPS = 300').
      baseline: the variant the others are compared with (default: the first).
      metric: the metrics.jsonl key compared across variants (its final value).
      fit_scaling_law: fit L(N) = a * N^-b + c over non-embedding parameters (size sweeps).
      finetune: GPT-1 fine-tuning tasks (`gpt1_tasks.TASKS`) run on every trained run.
      finetune_bindings: gin bindings for those fine-tunes (e.g. 'FinetuneConfig.steps = 200').
      extra_metrics: more metrics (metrics.jsonl keys or 'finetune/<task>') tabulated per variant.
    """

    base: str = ""
    grid: dict = dataclasses.field(default_factory=dict)
    zipped: dict = dataclasses.field(default_factory=dict)
    seeds: Sequence[int] = (0,)
    bindings: Sequence[str] = ()
    baseline: str | None = None
    metric: str = "eval/loss"
    fit_scaling_law: bool = False
    finetune: Sequence[str] = ()
    finetune_bindings: Sequence[str] = ()
    extra_metrics: Sequence[str] = ()

    def __post_init__(self):
        if not all(isinstance(s, int) for s in self.seeds):
            raise ValueError(f"Sweep.seeds must be a list of integers, got {self.seeds!r}.")
        for name in ("seeds", "bindings", "finetune", "finetune_bindings", "extra_metrics"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        validate(self)

    def __hash__(self):
        return hash((self.base, json.dumps([self.grid, self.zipped], default=repr), self.seeds))


def validate(sweep: Sweep) -> None:
    """Clear errors for a sweep definition that cannot expand."""
    if not sweep.base or not isinstance(sweep.base, str):
        raise ValueError("the sweep file must name its base experiment: Sweep.base = 'X.gin'.")
    if not all(isinstance(b, str) for b in sweep.bindings):
        raise ValueError(f"Sweep.bindings must be gin binding strings, got {sweep.bindings}.")
    for name in ("grid", "zipped"):
        axes = getattr(sweep, name)
        if not isinstance(axes, dict):
            raise ValueError(
                f"Sweep.{name} must be a dict binding -> list of values, got {type(axes).__name__}."
            )
        for key, values in axes.items():
            if not isinstance(key, str) or not _BINDING_KEY.match(key):
                raise ValueError(
                    f"Sweep.{name} key {key!r} is not a gin binding name such as "
                    "'ModelConfig.d_model' or a macro such as 'STEPS'."
                )
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"Sweep.{name}[{key!r}] must be a non-empty list of values.")
    lengths = {k: len(v) for k, v in sweep.zipped.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"Sweep.zipped lists must have equal lengths, got {lengths}.")
    if set(sweep.grid) & set(sweep.zipped):
        raise ValueError(
            f"bindings {sorted(set(sweep.grid) & set(sweep.zipped))} are in both "
            "Sweep.grid and Sweep.zipped; put each in one."
        )
    unknown = [t for t in sweep.finetune if t not in FINETUNE_TASKS]
    if unknown:
        raise ValueError(
            f"Sweep.finetune names unknown tasks {unknown}; choose from "
            f"{', '.join(FINETUNE_TASKS)}."
        )
    if not sweep.seeds or len(set(sweep.seeds)) != len(sweep.seeds):
        raise ValueError(f"Sweep.seeds must be distinct and non-empty, got {list(sweep.seeds)}.")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One point of the sweep: its name (a directory) and its (binding, value) overrides."""

    name: str
    overrides: tuple[tuple[str, Any], ...]

    def bindings(self) -> list[str]:
        return [f"{key} = {format_value(value)}" for key, value in self.overrides]


def format_value(value: Any) -> str:
    """A Python value as gin text; strings starting with '@' or '%' are references, kept raw."""
    if isinstance(value, str) and value[:1] in ("@", "%"):
        return value
    return repr(value)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """'ModelConfig.d_model' -> 'd_model', unless two keys would then collide."""
    short = {k: k.split(".")[-1].split("/")[-1] for k in keys}
    if len(set(short.values())) < len(short):
        return {k: k for k in keys}
    return short


def expand(sweep: Sweep) -> list[Variant]:
    """grid x zipped, in file order; names are 'key=value,key=value' over the axes."""
    grid_keys, zip_keys = list(sweep.grid), list(sweep.zipped)
    zip_rows = list(zip(*sweep.zipped.values())) if zip_keys else [()]
    names = _short_names(grid_keys + zip_keys)
    variants = []
    for grid_values in itertools.product(*sweep.grid.values()):
        for zip_values in zip_rows:
            overrides = tuple(zip(grid_keys + zip_keys, grid_values + tuple(zip_values)))
            name = ",".join(f"{names[k]}={_name_value(v)}" for k, v in overrides) or "base"
            variants.append(Variant(name, overrides))
    if len({v.name for v in variants}) != len(variants):
        raise ValueError("two variants got the same name; make the axis values distinct.")
    if sweep.baseline is not None and sweep.baseline not in {v.name for v in variants}:
        raise ValueError(
            f"Sweep.baseline={sweep.baseline!r} is not a variant; the variants are "
            f"{[v.name for v in variants]}."
        )
    return variants


def _name_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return re.sub(r"[^\w.+-]", "_", text.lstrip("@%"))


def run_dir(workdir: str, variant: Variant, seed: int) -> str:
    return os.path.join(workdir, variant.name, f"seed_{seed}")


def run_bindings(sweep: Sweep, variant: Variant, seed: int, extra: Sequence[str] = ()) -> list[str]:
    """Common bindings, then command-line extras, then the variant's axes, then the seed."""
    extra = [b for b in extra if not b.strip().startswith("Sweep.")]
    return [*sweep.bindings, *extra, *variant.bindings(), f"TrainConfig.seed = {seed}"]


def resolve_base(base: str) -> str:
    """The base gin file as a path: as given if it exists, else under experiments/."""
    try:
        return find_gin_file(base)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"Sweep.base {base!r} not found in the cwd or {EXPERIMENTS_DIR}."
        ) from None


def train_command(base: str, bindings: Sequence[str], workdir: str) -> list[str]:
    """The `gptjax train` argv of one run (what --print_commands prints)."""
    return [
        "gptjax",
        "train",
        f"--gin_file={base}",
        *(f"--gin_bindings={b}" for b in bindings),
        f"--workdir={workdir}",
    ]


def parse_experiment(base: str, bindings: Sequence[str]) -> None:
    """Reset gin's global config and parse one run's experiment (gin state is process-wide)."""
    parse_gin([resolve_base(base)], list(bindings))


def is_finished(run_workdir: str) -> bool:
    path = os.path.join(run_workdir, "summary.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        summary = json.load(f)
    return summary.get("end_step", -1) >= summary.get("steps", math.inf)


def run_one(base: str, bindings: Sequence[str], run_workdir: str, subprocess_mode: bool) -> None:
    """Train one run in this process (gin re-parsed) or as a `python -m gptjax train` child."""
    if subprocess_mode:
        argv = [sys.executable, "-m", "gptjax", *train_command(base, bindings, run_workdir)[1:]]
        done = subprocess.run(argv)
        if done.returncode:
            raise ValueError(
                f"run in {run_workdir} failed (exit {done.returncode}): {shlex.join(argv)}"
            )
        return
    try:
        parse_experiment(base, bindings)
        # A preemption signal was meant for the whole sweep.
        if train_with_defaults(run_workdir).get("preempted"):
            raise SystemExit(f"preempted during {run_workdir}; rerun the sweep to resume.")
    finally:
        gin.clear_config()  # the next run starts from a clean config


def run_sweep(
    sweep: Sweep,
    workdir: str,
    extra_bindings: Sequence[str] = (),
    subprocess_mode: bool = False,
    log=print,
) -> list[dict]:
    """Run every unfinished (variant, seed), then write results.csv, runs.csv and the plots."""
    variants = expand(sweep)
    resolve_base(sweep.base)  # fail before the first run, not after
    os.makedirs(workdir, exist_ok=True)
    total = len(variants) * len(sweep.seeds)
    for i, (variant, seed) in enumerate(itertools.product(variants, sweep.seeds)):
        out = run_dir(workdir, variant, seed)
        if is_finished(out):
            log(f"[{i + 1}/{total}] {variant.name} seed {seed}: finished earlier, kept")
        else:
            log(f"[{i + 1}/{total}] {variant.name} seed {seed} -> {out}")
            run_one(
                sweep.base, run_bindings(sweep, variant, seed, extra_bindings), out, subprocess_mode
            )
        for task in sweep.finetune:
            finetune_one(out, task, sweep.finetune_bindings, seed, log)
    return write_report(sweep, workdir)


def finetune_dir(run_workdir: str, task: str) -> str:
    return os.path.join(run_workdir, f"finetune_{task}")


def finetune_one(
    run_workdir: str, task: str, bindings: Sequence[str], seed: int, log=print
) -> None:
    """Fine-tune a finished run on a GPT-1 task (kept if done before)."""
    from gptjax.research.finetune import FinetuneConfig, finetune

    out = finetune_dir(run_workdir, task)
    if os.path.exists(os.path.join(out, "summary.json")):
        return
    try:
        parse_gin(
            [], [*bindings, f"FinetuneConfig.task = {task!r}", f"FinetuneConfig.seed = {seed}"]
        )
        summary = finetune(run_workdir, out, FinetuneConfig())
    finally:
        gin.clear_config()
    log(f"    fine-tuned on {task}: accuracy {summary['accuracy']:.3f}")


def print_commands(sweep: Sweep, workdir: str, extra_bindings: Sequence[str] = ()) -> list[str]:
    """One shell command line per (variant, seed), for a cluster scheduler; with
    `Sweep.finetune`, each run's fine-tunes follow it on the same line (`&&`)."""
    lines = []
    for v, s in itertools.product(expand(sweep), sweep.seeds):
        out = run_dir(workdir, v, s)
        commands = [train_command(sweep.base, run_bindings(sweep, v, s, extra_bindings), out)]
        commands += [
            [
                "gptjax",
                "finetune",
                f"--workdir={out}",
                f"--out={finetune_dir(out, task)}",
                f"--task={task}",
                *(
                    f"--gin_bindings={b}"
                    for b in (*sweep.finetune_bindings, f"FinetuneConfig.seed = {s}")
                ),
            ]
            for task in sweep.finetune
        ]
        lines.append(" && ".join(shlex.join(c) for c in commands))
    return lines


# ---------------------------------------------------------------- results


def collect_run(run_workdir: str, metric: str, extra_metrics: Sequence[str] = ()) -> dict | None:
    """Final losses, throughput, size and curves of one run, from its metrics.jsonl."""
    from gptjax.models import family
    from gptjax.training.metrics import read_metrics

    rows = read_metrics(run_workdir)
    if not rows:
        return None
    last = lambda key: next((r[key] for r in reversed(rows) if key in r), math.nan)  # noqa: E731
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    finetuned = {}
    for path in glob.glob(os.path.join(run_workdir, "finetune_*", "summary.json")):
        with open(path) as f:
            ft = json.load(f)
        finetuned[f"finetune/{ft['task']}"] = ft["accuracy"]
    value = lambda key: finetuned.get(key, last(key))  # noqa: E731
    out = {
        "train_loss": last("train/loss"),
        "eval_loss": last("eval/loss"),
        "metric": value(metric),
        "step": rows[-1]["step"],
        **finetuned,
        **{key: value(key) for key in extra_metrics},
        # the first window's rate includes warm-up effects: the median of the rest
        "tokens_per_s": float(np.median(rates[1:] or rates)) if rates else math.nan,
        "curve": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
        "eval_curve": [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r],
    }
    config_path = os.path.join(run_workdir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            raw = json.load(f)
        cfg = family.by_name(raw.get("family", "decoder")).config_class(**raw["model"])
        embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
        embedding += cfg.max_len * cfg.d_model if cfg.pos_embedding == "learned" else 0
        n = family.param_count(cfg)
        out |= {
            "family": family.family_of(cfg).name,
            "n_params": n,
            "non_embedding_params": n - embedding,
        }
    return out


def _stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    if not len(arr):
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def summarize(sweep: Sweep, runs: dict[str, list[dict]]) -> list[dict]:
    """One row per variant: bindings, size, seed mean/std, throughput, p-value vs baseline."""
    variants = [v for v in expand(sweep) if runs.get(v.name)]
    if not variants:
        raise ValueError("the sweep has no finished runs yet; run it first.")
    baseline = sweep.baseline or variants[0].name
    base_values = [r["metric"] for r in runs.get(baseline, [])]
    rows = []
    for v in variants:
        rs = runs[v.name]
        metric_values = [r["metric"] for r in rs]
        row = {"variant": v.name, "bindings": "; ".join(v.bindings())}
        row |= {k.split(".")[-1]: value for k, value in v.overrides}
        row |= {
            "family": rs[0].get("family", ""),
            "n_params": rs[0].get("n_params", ""),
            "non_embedding_params": rs[0].get("non_embedding_params", ""),
            "seeds": len(rs),
            "steps": max(r["step"] for r in rs),
        }
        for name in ("train_loss", "eval_loss"):
            row[f"{name}_mean"], row[f"{name}_std"] = _stats([r[name] for r in rs])
        row["tokens_per_s"] = float(np.nanmean([r["tokens_per_s"] for r in rs]))
        for key in (*sweep.extra_metrics, *(f"finetune/{t}" for t in sweep.finetune)):
            row[f"{key}_mean"], row[f"{key}_std"] = _stats([r.get(key, math.nan) for r in rs])
        row["metric"] = sweep.metric
        mean, _ = _stats(metric_values)
        row["delta_vs_baseline"] = mean - _stats(base_values)[0] if base_values else math.nan
        t, p = (
            (math.nan, math.nan) if v.name == baseline else welch_t_test(metric_values, base_values)
        )
        row |= {
            "t_vs_baseline": t,
            "p_value": p,
            "per_seed": ";".join(f"{x:.4f}" for x in metric_values),
        }
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_csv(path: str, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: _fmt(row.get(k, "")) for k in columns} for row in rows)


def markdown_table(
    rows: list[dict],
    columns: Sequence[str] = (
        "variant",
        "seeds",
        "train_loss_mean",
        "eval_loss_mean",
        "eval_loss_std",
        "delta_vs_baseline",
        "p_value",
        "tokens_per_s",
    ),
) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(sweep: Sweep, workdir: str) -> list[dict]:
    """results.csv, runs.csv, loss_curves.png, final_metric.png (+ scaling_law.*) in workdir."""
    runs: dict[str, list[dict]] = {}
    flat = []
    for v in expand(sweep):
        for seed in sweep.seeds:
            r = collect_run(run_dir(workdir, v, seed), sweep.metric, sweep.extra_metrics)
            if r is not None:
                runs.setdefault(v.name, []).append(r)
                flat.append(
                    {
                        "variant": v.name,
                        "seed": seed,
                        **{k: x for k, x in r.items() if "curve" not in k},
                    }
                )
    rows = summarize(sweep, runs)
    write_csv(os.path.join(workdir, "results.csv"), rows)
    write_csv(os.path.join(workdir, "runs.csv"), flat)
    plot_curves(runs, os.path.join(workdir, "loss_curves.png"))
    plot_final(rows, sweep.metric, os.path.join(workdir, "final_metric.png"))
    if sweep.fit_scaling_law:
        sizes = [r["non_embedding_params"] for r in rows]
        means = [
            r["eval_loss_mean"]
            if sweep.metric == "eval/loss"
            else float(np.mean([x["metric"] for x in runs[r["variant"]]]))
            for r in rows
        ]
        fit = fit_power_law(np.array(sizes, float), np.array(means, float))
        with open(os.path.join(workdir, "scaling_law.json"), "w") as f:
            json.dump({"fit": fit, "non_embedding_params": sizes, "loss": means}, f, indent=2)
        plot_scaling(sizes, means, fit, os.path.join(workdir, "scaling_law.png"))
    return rows
