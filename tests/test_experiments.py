"""Gin experiment files and the CLI: every file parses, model files equal the presets,
and the CLI's errors are one clear line."""

import glob
import os

import gin
import pytest

from gptjax import experiments
from gptjax.cli import main as cli
from gptjax.config import PRESETS, ModelConfig, get_preset
from gptjax.data.config import DataConfig
from gptjax.evals.code import CodeEvalConfig  # registers it, as the CLI's plugins do
from gptjax.models import family
from gptjax.parallel.mesh import MeshConfig
from gptjax.training.optimizer import OptimizerConfig
from gptjax.training.step import TrainConfig

EXPERIMENTS = experiments.EXPERIMENTS_DIR


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if type(c) is ModelConfig))
def test_model_gin_file_equals_preset(name):
    cli.parse_gin([f"models/{name}.gin"], [])
    # Numerics and performance knobs are run choices, not part of the model files.
    runtime = dict(
        dtype="float32", param_dtype="float32", remat="none", scan_layers=None, attention_impl="xla"
    )
    assert ModelConfig() == get_preset(name, **runtime)


def _experiment_files():
    files = glob.glob(os.path.join(EXPERIMENTS, "*.gin"))
    files += glob.glob(os.path.join(EXPERIMENTS, "runs", "*.gin"))
    return sorted(
        os.path.relpath(f, EXPERIMENTS) for f in files if not f.endswith(("pretrain.gin",))
    )


@pytest.mark.parametrize("path", _experiment_files())
def test_experiment_file_builds_every_config(path):
    macros = (
        ["STEPS = 10", "BATCH_SIZE = 8", "SEQ_LEN = 16", "PEAK_LR = 1e-3", "WARMUP_STEPS = 1"]
        if path.startswith("runs/")
        else []
    )
    cli.parse_gin([path], macros)
    family.model_config(), TrainConfig(), OptimizerConfig(), DataConfig(), MeshConfig()
    CodeEvalConfig()


def test_quickstart_is_a_cpu_sized_run():
    cli.parse_gin(["quickstart.gin"], [])
    cfg, train_cfg = ModelConfig(), TrainConfig()
    assert cfg.vocab_size == DataConfig().tokenizer_vocab_size
    assert train_cfg.seq_len <= cfg.max_len
    assert train_cfg.steps * train_cfg.batch_size * train_cfg.seq_len <= 3_000_000


def test_bindings_override_files():
    cli.parse_gin(
        ["quickstart.gin"],
        ["TrainConfig.steps = 7", "ModelConfig.dtype = 'bfloat16'", "MeshConfig.rules = 'fsdp'"],
    )
    assert TrainConfig().steps == 7 and ModelConfig().dtype == "bfloat16"
    assert MeshConfig().rules == "fsdp"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--workdir=/tmp/x", "--gin_file=missing.gin"],
            "gin file 'missing.gin' not found",
        ),
        (
            ["train", "--workdir=/tmp/x", "--gin_bindings=Nope.steps = 1"],
            "No configurable matching",
        ),
        (["train", "--workdir=/tmp/x", "--gin_bindings=TrainConfig.steps = = 1"], "parse"),
        (
            ["train", "--workdir=/tmp/x", "--gin_bindings=ModelConfig.ln_placement = 'mid'"],
            "not one of",
        ),
        (["sample", "--workdir=/nonexistent/run"], "no config.json"),
    ],
)
def test_cli_errors_are_one_clear_line(argv, message, capsys):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"gptjax {argv[0]}: error:") and message in err
    assert "Traceback" not in err


def test_malformed_gin_file(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("TrainConfig.steps = = 3\n")
    assert cli.main(["train", f"--workdir={tmp_path}", f"--gin_file={bad}"]) == 1
    assert "error:" in capsys.readouterr().err


def test_bad_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--workdir=/tmp/x", "--no_such_flag"])
    assert e.value.code == 2
