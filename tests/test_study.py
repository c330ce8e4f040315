"""`gptjax align-study` end to end on a tiny model: every method trains (RLOO and GRPO through
the PPO trainer), every policy is measured the same way, the table and plots are written.

One run (a module fixture) serves the tests; its sizes follow test_rlhf_pipeline.py's so the
stages share compiles (16-row sampler calls, one prompt width).
"""

import json
import math
import os

import gin
import numpy as np
import pytest

from gptjax.cli import main as main_lib
from gptjax.rlhf import best_of_n
from gptjax.rlhf import study as align_study
from tests.rlhf_fixtures import compilation_cache
from tests.test_rlhf_pipeline import TINY

STUDY = [
    *TINY,
    "DPOConfig.steps = 2",
    "DPOConfig.batch_size = 2",
    "StudyConfig.seeds = (0,)",
    "StudyConfig.eval_prompts = 16",
    "StudyConfig.group_size = 4",
    "StudyConfig.best_of_n = 4",
    "StudyConfig.curve_draws = 8",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("study") / "run")
    gin.clear_config()
    try:
        with compilation_cache(str(tmp_path_factory.mktemp("jax_compilation_cache"))):
            flags = [f"--gin_bindings={b}" for b in STUDY]
            assert main_lib.main(["align-study", f"--workdir={work}", *flags]) == 0
    finally:
        gin.clear_config()
    with open(os.path.join(work, "study.json")) as f:
        return work, json.load(f)


def _rows(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_every_method_has_a_finite_row_and_the_plots_exist(study):
    work, s = study
    methods = [line["method"] for line in s["table"]]
    assert methods == ["sft", "ppo", "ppo_ptx", "rloo", "grpo", "dpo", "best_of_n"]
    for row in s["rows"]:
        for key in ("gold", "proxy", "kl", "lm_loss"):
            assert math.isfinite(row[key]), (row["method"], key)
    for name in ("gold_vs_kl", "overoptimization"):
        assert os.path.getsize(s["plots"][name]) > 1000
    with open(os.path.join(work, "study.md")) as f:
        table = f.read()
    assert table.count("\n") == 2 + len(methods) and "± 0.000" in table


def test_the_sft_reference_has_kl_zero_and_best_of_n_its_closed_form(study):
    _, s = study
    rows = {r["method"]: r for r in s["rows"]}
    assert rows["sft"]["kl"] == 0.0  # the policy is its own reference
    assert rows["best_of_n"]["kl"] == pytest.approx(math.log(4) - 3 / 4)
    curve = s["best_of_n_curves"][0]
    assert [p["n"] for p in curve] == [1, 2, 4, 8]
    assert rows["best_of_n"]["gold"] == curve[2]["gold"]  # the table's n = 4 of the 8 draws
    # Best-of-m's proxy reward can only grow with m (the same draws, a larger max).
    assert np.all(np.diff([p["proxy"] for p in curve]) >= 0)
    assert rows["best_of_n"]["samples"] == 4 * 16 and rows["ppo"]["samples"] == 2 * 16


def test_rloo_and_grpo_train_without_a_critic_and_start_at_the_sampler(study):
    work, _ = study
    for algo in ("rloo", "grpo"):
        run = os.path.join(work, "seed0", algo)
        first = _rows(run)[0]
        assert first["objective/kl"] == pytest.approx(0.0, abs=1e-4)
        assert first["policy/ratio_mean/first_minibatch"] == pytest.approx(1.0, abs=1e-5)
        assert first["policy/approxkl/first_minibatch"] < 1e-9
        assert first["policy/clipfrac/first_minibatch"] == 0.0
        assert first["policy/kl_ref/first_minibatch"] == pytest.approx(0.0, abs=1e-6)
        assert "val/clipfrac" not in first and "group/advantage_abs" in first
        with open(os.path.join(run, "summary.json")) as f:
            summary = json.load(f)
        assert summary["ppo/algo"] == algo and summary["ppo/group_size"] == 4
        assert "ppo/critic_init_from" not in summary


def test_the_aggregate_is_mean_and_sample_std():
    rows = [
        {"method": "a", "gold": 1.0, "proxy": 0.0, "kl": 1.0, "lm_loss": 2.0, "wall_s": 3.0},
        {"method": "a", "gold": 2.0, "proxy": 1.0, "kl": 3.0, "lm_loss": 2.0, "wall_s": 5.0},
    ]
    (line,) = align_study.aggregate(rows)
    assert line["gold"] == 1.5 and line["gold_std"] == pytest.approx(np.std([1, 2], ddof=1))
    assert line["kl"] == 2.0 and line["seeds"] == 2
    assert best_of_n.analytic_kl(1) == 0.0


def test_bad_study_configs_raise_one_line():
    with pytest.raises(ValueError, match="choose from"):
        align_study.StudyConfig(methods=("ppo", "kto"))
    with pytest.raises(ValueError, match="at least one seed"):
        align_study.StudyConfig(seeds=())
