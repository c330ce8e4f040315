"""Execute notebooks at their full sizes and save them with their outputs (plots included).

The committed notebooks carry outputs so they read on GitHub and Colab without running; the
test suite still executes every one (at small sizes, outputs discarded). After changing a
notebook or its generator (tools/make_notebooks.py, tools/make_rlhf_notebook.py):
    python tools/execute_notebooks.py notebooks/*.ipynb
Full sizes unless GPTJAX_NOTEBOOK_STEPS is set; offline, notebook 06 needs it (at full size
it downloads GPT-2 from the Hugging Face hub; with it, a random small GPT-2 stands in).
"""

import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient


def execute(path: str) -> float:
    """Run `path` top to bottom in a fresh kernel (cwd: a temp dir); write it back; seconds."""
    nb = nbformat.read(path, as_version=4)
    start = time.time()
    with tempfile.TemporaryDirectory() as cwd:
        NotebookClient(
            nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": cwd}}
        ).execute()
    strip_stderr(nb)
    nbformat.write(nb, path)
    return time.time() - start


def strip_stderr(nb) -> None:
    """Drop stderr streams (progress bars, warnings): what a reader wants is stdout and plots."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]


if __name__ == "__main__":
    for notebook in sys.argv[1:]:
        print(f"{notebook}: {execute(notebook):.0f} s", flush=True)
