"""Every notebook executes top to bottom on CPU (at small sizes set by environment variables)."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJAX_NOTEBOOK_STEPS", "12")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_with_its_outputs(path):
    """They read on GitHub and Colab without running (tools/execute_notebooks.py saves them)."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    ran = [c for c in code if c.get("execution_count")]
    assert len(ran) == len(code), f"{len(code) - len(ran)} code cells were not executed"
    assert any(c.outputs for c in code), "no outputs saved"
    if any("plt." in c.source for c in code):
        images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
        assert images, "the notebook plots, but no plot is saved"
