"""What the RLHF tests share: one tiny model, its params, and a persistent compilation cache.

Nearly all of these tests' time is XLA compiling a handful of functions of a 1-layer model, so
they use one config (one shape per parameter: one compile of the initialiser, shared helpers) and
the pipeline test runs with JAX's persistent compilation cache in a temp dir, where the
functions the pipeline re-jits per call (held-out losses, RM accuracy) compile once.
"""

from __future__ import annotations

import contextlib
import functools

import jax

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import ByteTokenizer
from gptjax.models import gpt as model

TOK = ByteTokenizer()
CFG = ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=TOK.vocab_size, max_len=48)


@functools.lru_cache
def params(seed: int = 0):
    """GPT params of CFG, initialised in one jitted call (eager init compiles each shape)."""
    return _init(CFG, jax.random.key(seed))


_init = jax.jit(model.init_params, static_argnums=0)


@contextlib.contextmanager
def compilation_cache(path: str):
    """Use (and afterwards stop using) a persistent compilation cache in `path`.

    Every compile is cached (no minimum time or size), so identical programs jitted through
    different Python functions compile once.
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    for n, v in zip(names, (path, 0.0, 0)):
        jax.config.update(n, v)
    cc.reset_cache()  # the cache is set up once per process, at the first compile
    try:
        yield path
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()
