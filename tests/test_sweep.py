"""Sweeps: expansion (grid x zip x seeds), Welch p-values, the scaling fit, a real 4-step
sweep's results table and plots, the CLI's --print_commands and its errors."""

import csv
import math
import shlex

import gin
import numpy as np
import pytest

from gptjax.cli import main as main_lib
from gptjax.research import stats
from gptjax.research import sweep as sw
from gptjax.training.metrics import read_metrics
from tests.conftest import copy_stdlib


def test_expand_grid_times_zip_in_file_order():
    sweep = sw.Sweep(
        base="quickstart.gin",
        grid={"ModelConfig.ln_placement": ["pre", "post"]},
        zipped={"ModelConfig.d_model": [32, 64, 96], "ModelConfig.n_heads": [2, 4, 6]},
        seeds=[3, 4],
    )
    variants = sw.expand(sweep)
    assert len(variants) == 2 * 3
    assert variants[0].name == "ln_placement=pre,d_model=32,n_heads=2"
    assert variants[-1].name == "ln_placement=post,d_model=96,n_heads=6"
    assert variants[4].bindings() == [
        "ModelConfig.ln_placement = 'post'",
        "ModelConfig.d_model = 64",
        "ModelConfig.n_heads = 4",
    ]
    bindings = sw.run_bindings(sweep, variants[1], 4, ["STEPS = 9", "Sweep.seeds = [0]"])
    assert bindings[0] == "STEPS = 9" and "Sweep.seeds = [0]" not in bindings
    assert bindings[-1] == "TrainConfig.seed = 4"  # the seed comes last, so it always wins
    commands = sw.print_commands(sweep, "/w")
    assert len(commands) == 6 * 2
    assert commands[0].endswith("--workdir=/w/ln_placement=pre,d_model=32,n_heads=2/seed_3")
    assert sw.expand(sw.Sweep(base="x.gin"))[0].name == "base"  # seeds only


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "must name its base"),
        (dict(base="x.gin", zipped={"A.b": [1, 2], "A.c": [1]}), "equal lengths"),
        (dict(base="x.gin", grid={"A.b": []}), "non-empty list"),
        (dict(base="x.gin", grid={"not a binding": [1]}), "not a gin binding"),
        (dict(base="x.gin", grid={"A.b": [1]}, zipped={"A.b": [2]}), "both"),
        (dict(base="x.gin", seeds=[0, 0]), "distinct"),
        (dict(base="x.gin", seeds=["a"]), "integers"),
    ],
)
def test_bad_sweep_definitions_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sw.Sweep(**kwargs)


def test_unknown_baseline_names_the_variants():
    with pytest.raises(ValueError, match="is not a variant.*ln_placement=pre"):
        sw.expand(sw.Sweep(base="x.gin", grid={"M.ln_placement": ["pre"]}, baseline="post"))


def test_t_distribution_p_values_match_known_values():
    assert stats.t_two_sided_p(1.0, 1.0) == pytest.approx(0.5, abs=1e-12)  # Cauchy: P(|T|>1)
    assert stats.t_two_sided_p(2.0, 10.0) == pytest.approx(0.073388, abs=1e-6)
    assert stats.t_two_sided_p(2.2281388519649385, 10.0) == pytest.approx(0.05, abs=1e-9)
    assert stats.t_two_sided_p(1.959963984540054, 1e7) == pytest.approx(0.05, abs=1e-6)
    assert stats.t_two_sided_p(0.0, 3.0) == pytest.approx(1.0)
    assert stats.t_two_sided_p(12.706204736174698, 1.0) == pytest.approx(0.05, abs=1e-9)


def test_welch_t_test_matches_hand_computation_and_scipy():
    a, b = np.array([3.1, 3.3, 3.2, 3.6]), np.array([3.5, 3.9, 3.7])
    t, p = stats.welch_t_test(a, b)
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
    assert t == pytest.approx((a.mean() - b.mean()) / math.sqrt(va + vb))
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    assert p == pytest.approx(stats.t_two_sided_p(t, df))
    scipy_stats = pytest.importorskip("scipy.stats")
    ref = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-9)
    assert math.isnan(stats.welch_t_test([1.0], [2.0, 3.0])[1])
    assert stats.welch_t_test([1.0, 1.0], [1.0, 1.0])[1] == 1.0
    assert math.isnan(stats.welch_t_test([1.0, 1.0], [2.0, 2.0])[1])  # no variance: undefined


def test_power_law_fit_recovers_its_parameters():
    n = np.array([1e4, 3e4, 1e5, 3e5, 1e6, 3e6])
    fit = stats.fit_power_law(n, 20.0 * n**-0.3 + 1.5)
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((20.0, 0.3, 1.5), rel=0.05)
    line = stats.fit_power_law(n[:2], 5.0 * n[:2] ** -0.1)  # two sizes: a log-log line
    assert (line["b"], line["c"]) == pytest.approx((0.1, 0.0), abs=1e-9)


@pytest.fixture(scope="module")
def base_gin(tmp_path_factory):
    """A 4-step byte-level experiment on 30 stdlib modules, all local devices."""
    root = tmp_path_factory.mktemp("sweep")
    copy_stdlib(root, 30)
    path = root / "base.gin"
    path.write_text(f"""
ModelConfig.n_layers = 2
ModelConfig.d_model = 16
ModelConfig.n_heads = 2
ModelConfig.vocab_size = 300
ModelConfig.max_len = 32
TrainConfig.steps = 4
TrainConfig.batch_size = 8
TrainConfig.seq_len = 16
TrainConfig.log_every = 1
TrainConfig.eval_every = 4
TrainConfig.eval_batches = 1
TrainConfig.checkpoint_every = 4
TrainConfig.sample_tokens = 2
TrainConfig.compilation_cache_dir = '{root / "jax_cache"}'
OptimizerConfig.peak_lr = 3e-3
OptimizerConfig.warmup_steps = 1
DataConfig.dataset = '{root / "*.txt"}'
DataConfig.tokenizer = 'byte'
DataConfig.data_dir = '{root / "data"}'
MeshConfig.shape = {{'data': -1}}
""")
    return str(path)


def test_two_variant_sweep_writes_results_table_and_plots(base_gin, tmp_path):
    # The axis is the learning rate, not the architecture, so that the variants share every
    # compiled program but the train step (persistent compilation cache): a faster test.
    sweep = sw.Sweep(base=base_gin, grid={"OptimizerConfig.peak_lr": [3e-3, 1e-3]}, seeds=[0, 1])
    names = ["peak_lr=0.003", "peak_lr=0.001"]
    rows = sw.run_sweep(sweep, str(tmp_path), log=lambda *_: None)
    assert [r["variant"] for r in rows] == names
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == names
    runs = {}
    for name in names:
        for seed in (0, 1):
            metrics = read_metrics(str(tmp_path / name / f"seed_{seed}"))
            runs[name, seed] = (
                [m["eval/loss"] for m in metrics if "eval/loss" in m][-1],
                [m["train/loss"] for m in metrics if "train/loss" in m][-1],
            )
    for row, name, lr in zip(table, names, ("0.003", "0.001")):
        evals = [runs[name, s][0] for s in (0, 1)]
        assert float(row["eval_loss_mean"]) == pytest.approx(np.mean(evals), rel=1e-5)
        assert float(row["eval_loss_std"]) == pytest.approx(np.std(evals, ddof=1), rel=1e-4)
        assert float(row["train_loss_mean"]) == pytest.approx(
            np.mean([runs[name, s][1] for s in (0, 1)]), rel=1e-5
        )
        assert row["seeds"] == "2" and row["steps"] == "4" and float(row["tokens_per_s"]) > 0
        assert row["bindings"] == f"OptimizerConfig.peak_lr = {lr}"
    assert runs[names[0], 0] != runs[names[0], 1]  # the seed binding reached the run
    assert table[0]["p_value"] == ""  # the baseline
    expected = stats.welch_t_test(
        [runs[names[1], s][0] for s in (0, 1)], [runs[names[0], s][0] for s in (0, 1)]
    )[1]
    assert float(table[1]["p_value"]) == pytest.approx(expected, rel=1e-4)
    for name in ("runs.csv", "loss_curves.png", "final_metric.png"):
        assert (tmp_path / name).stat().st_size > 0
    mtime = (tmp_path / names[0] / "seed_0" / "summary.json").stat().st_mtime
    sw.run_sweep(sweep, str(tmp_path), log=lambda *_: None)  # finished runs are kept
    assert (tmp_path / names[0] / "seed_0" / "summary.json").stat().st_mtime == mtime


def _main(argv):
    gin.clear_config()  # main() parses and locks gin's global config once per process
    return main_lib.main(argv)


def test_cli_print_commands_and_errors(tmp_path, capsys):
    sweep_file = tmp_path / "s.gin"
    sweep_file.write_text(
        "Sweep.base = 'quickstart.gin'\n"
        "Sweep.grid = {'ModelConfig.tie_embeddings': [True, False]}\n"
        "Sweep.seeds = [0, 1, 2]\n"
    )
    code = _main(
        [
            "sweep",
            f"--gin_file={sweep_file}",
            f"--workdir={tmp_path / 'w'}",
            "--print_commands",
            "--gin_bindings=STEPS = 7",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 6
    argv = shlex.split(lines[5])
    assert argv[:3] == ["gptjax", "train", "--gin_file=quickstart.gin"]
    assert "--gin_bindings=STEPS = 7" in argv and "--gin_bindings=TrainConfig.seed = 2" in argv
    assert argv[-1] == f"--workdir={tmp_path / 'w'}/tie_embeddings=False/seed_2"
    assert not (tmp_path / "w").exists()  # printing runs nothing

    sweep_file.write_text(
        "Sweep.base = 'quickstart.gin'\nSweep.zipped = {'A.b': [1, 2], 'A.c': [1]}\n"
    )
    assert _main(["sweep", f"--gin_file={sweep_file}", "--workdir=/tmp/unused"]) == 1
    assert "equal lengths" in capsys.readouterr().err
    sweep_file.write_text("Sweep.base = 'no_such_experiment.gin'\n")
    assert _main(["sweep", f"--gin_file={sweep_file}", "--workdir=/tmp/unused"]) == 1
    assert "not found" in capsys.readouterr().err
    sweep_file.write_text("ModelConfig.d_model = 64\n")  # not a sweep file
    assert _main(["sweep", f"--gin_file={sweep_file}", "--workdir=/tmp/unused"]) == 1
    assert "must name its base experiment" in capsys.readouterr().err


def test_an_in_process_sweep_after_parsing_gin_can_still_train():
    """Regression: the hooks' module registers `CodeEvalConfig`; when it was first imported in
    `run_one`, after the notebook had parsed (and so locked) gin, the import raised
    'Attempted to add a new configurable after the config was locked'."""
    import subprocess
    import sys

    program = (
        "from gptjax.research import sweep\n"
        "from gptjax.experiments import parse_gin\n"
        "parse_gin(['sweeps/ln_placement.gin'], [])\n"
        "from gptjax.evals import hooks\n"  # what run_one uses
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
