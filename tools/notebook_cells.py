"""What every generated notebook shares: the Colab install cell and the writer."""

import nbformat as nbf

COLAB = """# Colab: install gptjax (skipped when it is already importable, e.g. in a local checkout).
import importlib.util, subprocess, sys
if importlib.util.find_spec("gptjax") is None:
    REPO = "https://github.com/your-org/gptjax"  # where this repository lives
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO}"], check=True)"""


def nb(cells, path):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out = []
    for kind, src in cells:
        out.append(nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src))
    n.cells = out
    nbf.write(n, path)
