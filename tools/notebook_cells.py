"""What every generated notebook shares: the Colab install cell and the writer."""

import nbformat as nbf

COLAB = """# Colab: install gptjax (skipped when it is already importable, e.g. in a local checkout).
# GPTJAX_SOURCE is anything pip installs: the wheel `python -m build` writes to dist/ (uploaded
# to Colab or on Drive), a URL of it, a checkout directory, or git+https://<host>/<you>/gptjax.
import importlib.util, os, subprocess, sys
GPTJAX_SOURCE = os.environ.get("GPTJAX_SOURCE", "/content/gptjax-0.1.0-py3-none-any.whl")
if importlib.util.find_spec("gptjax") is None:
    if "://" not in GPTJAX_SOURCE and not os.path.exists(GPTJAX_SOURCE):
        raise FileNotFoundError(f"GPTJAX_SOURCE={GPTJAX_SOURCE!r} does not exist: build the wheel "
                                "(python -m build) and upload it, or set GPTJAX_SOURCE to its URL")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", GPTJAX_SOURCE], check=True)"""


def nb(cells, path):
    n = nbf.v4.new_notebook()
    n.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    out = []
    for kind, src in cells:
        out.append(nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src))
    n.cells = out
    nbf.write(n, path)
