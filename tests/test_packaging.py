"""`python -m build` makes a wheel that a fresh venv installs and runs, experiments included.

What Colab (and a pod) does: install gptjax from a wheel (the notebooks' install cell, given
the wheel in GPTJAX_SOURCE), then `gptjax train
--gin_file=experiments/quickstart.gin` with no checkout. The venv has no system site-packages, so
its gptjax is the wheel's (this checkout's editable install cannot leak in); its dependencies
come from the package registry (pip's cache after CI's own install). About a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest


def _run(argv, **kw) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, **kw)
    assert out.returncode == 0, (
        f"{' '.join(map(str, argv))}:\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
    )
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the tracked files (the checkout stays clean)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path_factory.mktemp("src")
    files = _run(["git", "ls-files", "-z"], cwd=root).split("\0")
    for name in filter(None, files):
        if os.path.isfile(os.path.join(root, name)):
            os.makedirs(src / os.path.dirname(name), exist_ok=True)
            with open(os.path.join(root, name), "rb") as f, open(src / name, "wb") as g:
                g.write(f.read())
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, src])
    (path,) = dist.glob("gptjax-*.whl")
    return path


def _notebook_install_cell() -> str:
    """The install cell every notebook opens with (they must all carry the same one)."""
    import glob

    import nbformat

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cells = set()
    for path in sorted(glob.glob(os.path.join(root, "notebooks", "*.ipynb"))):
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert "GPTJAX_SOURCE" in code[0].source, f"{path}: no GPTJAX_SOURCE install cell"
        cells.add(code[0].source)
    assert len(cells) == 1, "the notebooks' install cells differ"
    return cells.pop()


def test_the_wheel_carries_the_package_and_the_experiments(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "gptjax/cli/main.py",
        "gptjax/evals/sandbox_child.py",
        "gptjax/_experiments/quickstart.gin",
        "gptjax/_experiments/models/nano_small.gin",
        "gptjax/_experiments/eval/python_syntax.jsonl",
    ):
        assert name in names, name
    assert not any(n.startswith(("tests/", "notebooks/", "experiments/")) for n in names)


def test_a_fresh_venv_installs_the_wheel_and_trains(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    python, gptjax = venv / "bin" / "python", venv / "bin" / "gptjax"
    # installed the way the notebooks do: their first code cell, given the wheel's path
    install_env = {**os.environ, "GPTJAX_SOURCE": str(wheel)}
    _run([python, "-c", _notebook_install_cell()], cwd=tmp_path, env=install_env)
    where = _run([python, "-c", "import gptjax; print(gptjax.__file__)"], cwd=tmp_path)
    assert where.startswith(str(venv)), where
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    bindings = [
        "STEPS = 2",
        "BATCH_SIZE = 2",
        "SEQ_LEN = 32",
        "TrainConfig.eval_every = 2",
        "TrainConfig.checkpoint_every = 2",
        f"DataConfig.dataset = '{corpus}/*.txt'",
        f"DataConfig.data_dir = '{tmp_path / 'data'}'",
        "DataConfig.tokenizer = 'byte'",
        "DataConfig.validation_split = 'tail'",
        "ModelConfig.vocab_size = 384",
    ]
    argv = [gptjax, "train", "--gin_file=experiments/quickstart.gin", f"--workdir={tmp_path / 'W'}"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    out = _run([*argv, *(f"--gin_bindings={b}" for b in bindings)], cwd=tmp_path, env=env)
    assert "done: step 2" in out
    out = _run(
        [gptjax, "sample", f"--workdir={tmp_path / 'W'}", "--prompt=def", "--max_new_tokens=8"],
        cwd=tmp_path,
        env=env,
    )
    assert "--- sample 0 (step 2) ---" in out
