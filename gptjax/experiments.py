"""Where experiments live and how gin files are parsed: one loader for the CLI and sweeps.

gin-config 0.5.0 resolves `include` against the working directory and the search paths, not
the including file, so experiments/ is registered as a search path; `importlib.util` must be
imported before parsing, or a missing file raises AttributeError instead of IOError.
"""

from __future__ import annotations

import importlib.util  # noqa: F401  (see the docstring)
import os
import tokenize

import gin

# Each import registers its module's gin configurables before a file is parsed.
from gptjax import config  # noqa: F401
from gptjax.data import config as data_config  # noqa: F401
from gptjax.parallel import mesh  # noqa: F401
from gptjax.training import optimizer, step  # noqa: F401

_CHECKOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
_PACKAGED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_experiments")  # a wheel's
EXPERIMENTS_DIR = (
    _CHECKOUT if os.path.exists(os.path.join(_CHECKOUT, "quickstart.gin")) else _PACKAGED
)


def parse_gin(files: list[str], bindings: list[str]) -> None:
    """Parse experiment files; `include`s resolve against experiments/ and the cwd."""
    for path in (EXPERIMENTS_DIR, os.getcwd()):
        if path not in gin.config._LOCATION_PREFIXES:
            gin.add_config_file_search_path(path)
    files = [find_gin_file(f) for f in files]
    gin.clear_config()  # a fresh parse per invocation (tests and sweeps call main repeatedly)
    try:
        gin.parse_config_files_and_bindings(files, bindings)
    except tokenize.TokenError as e:  # an unclosed bracket: gin does not say where
        raise SyntaxError(
            f"{e.args[0]} in {', '.join(files) or 'the --gin_bindings'}: "
            "check for an unclosed bracket or quote"
        ) from e


def find_gin_file(path: str) -> str:
    """A gin file as given, or relative to experiments/ (with or without the `experiments/`
    prefix): a checkout's, or the copy an installed wheel carries."""
    inside = path.removeprefix("experiments/")  # as written from a checkout's root
    for candidate in (
        path,
        os.path.join(EXPERIMENTS_DIR, path),
        os.path.join(EXPERIMENTS_DIR, inside),
    ):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(
        f"gin file {path!r} not found (looked in the cwd and "
        f"{EXPERIMENTS_DIR}); see experiments/ for examples."
    )
