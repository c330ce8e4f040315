"""Test setup (before JAX starts): 8 fake CPU devices for the mesh tests, and XLA's backend at
-O0, since the suite's tiny programs spend far more time compiling than running (about a third
less wall time for tests/test_sample.py; numerics agree to ~1e-7). Shared fixtures below.
"""

import glob
import os
import pathlib
import sysconfig

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def copy_stdlib(root, n_files: int) -> str:
    """A small real corpus: the first `n_files` standard-library modules copied into `root` as
    text files; returns their glob."""
    for f in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:n_files]:
        text = pathlib.Path(f).read_text(encoding="utf-8")
        (pathlib.Path(root) / (os.path.basename(f) + ".txt")).write_text(text)
    return str(pathlib.Path(root) / "*.txt")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small real corpus: 30 standard-library modules copied as text files."""
    return copy_stdlib(tmp_path_factory.mktemp("corpus"), 30)
