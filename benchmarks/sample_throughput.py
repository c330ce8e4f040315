"""Generation throughput with the KV cache (`gptjax.inference.sampling.generate`), greedy, 1 device.

Prefill of a `--prompt_len` prompt plus `--new_tokens` decode steps, all inside the one jitted
`generate` (a `lax.while_loop` over a preallocated cache); no stop tokens, so every row runs
the full length. tokens/s counts generated tokens only (batch x new_tokens / wall time), as in
REFERENCE.md's table. One markdown row per (model, batch); JSON lines appended to `--results`.

  python benchmarks/sample_throughput.py --models gpt2_small --batch_sizes 1,64
  python benchmarks/sample_throughput.py --tiny          # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--models", type=csv, default=["gpt2_small"])
    p.add_argument("--batch_sizes", type=lambda s: [int(x) for x in csv(s)], default=[1, 64])
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument(
        "--param_dtype",
        default="bfloat16",
        help="weights as stored; bf16 halves the bytes each decode step reads",
    )
    p.add_argument("--attention", default="xla", help="xla|fused|cudnn")
    p.add_argument("--layers", default="scan", help="scan|unrolled")
    p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before JAX starts")
    p.add_argument("--repeats", type=int, default=5, help="timed calls; the median is kept")
    p.add_argument("--results", default="benchmarks/results/sample_throughput.jsonl")
    p.add_argument(
        "--hbm_tb_s",
        type=float,
        default=3.0,
        help="memory bandwidth for the roofline column (H100 SXM ~3.0 measured)",
    )
    p.add_argument("--tiny", action="store_true", help="2-layer model, short lengths: CPU smoke")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.prompt_len, args.new_tokens = ["tiny"], 16, 32
        args.batch_sizes = [min(b, 8) for b in args.batch_sizes]
        args.repeats = min(args.repeats, 3)
    return args


def model_config(name: str, args):
    from gptjax.config import PRESETS, ModelConfig

    base = (
        ModelConfig(n_layers=2, d_model=128, n_heads=4, vocab_size=4096, max_len=128)
        if name == "tiny"
        else PRESETS[name]
    )
    return base.replace(
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        attention_impl=args.attention,
        scan_layers=args.layers == "scan",
        embd_dropout=0.0,
        attn_dropout=0.0,
        resid_dropout=0.0,
    )


def roofline_tokens_s(cfg, batch: int, args) -> float:
    """Decode-step floor: every step reads all weights once plus the whole KV cache."""
    import numpy as np

    from gptjax.models.family import param_count

    weight_bytes = param_count(cfg) * np.dtype(cfg.param_dtype).itemsize
    length = args.prompt_len + args.new_tokens
    mean_cache_bytes = (
        2
        * cfg.n_layers
        * batch
        * cfg.d_model
        * np.dtype(cfg.dtype).itemsize
        * (args.prompt_len + length)
        / 2
    )
    return batch * args.hbm_tb_s * 1e12 / (weight_bytes + mean_cache_bytes)


def bench_one(cfg, batch: int, args) -> dict:
    import jax
    import numpy as np

    from gptjax.inference import sampling as sample
    from gptjax.models import gpt as model

    device = jax.local_devices()[0]
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)

    def prompt():  # a fresh random prompt per call
        return rng.integers(0, cfg.vocab_size, (batch, args.prompt_len), dtype=np.int32)

    def call():
        out = sample.generate(
            cfg,
            params,
            prompt(),
            key=jax.random.key(0),
            max_new_tokens=args.new_tokens,
            greedy=True,
            stop_tokens=(),
        )
        return out.tokens.block_until_ready()

    t0 = time.perf_counter()
    tokens = call()  # compile + first run
    first_s = time.perf_counter() - t0
    assert tokens.shape == (batch, args.prompt_len + args.new_tokens)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    call_s = statistics.median(times)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return {
        "tokens_per_s": batch * args.new_tokens / call_s,
        "call_ms": call_s * 1e3,
        "call_ms_spread": (max(times) - min(times)) * 1e3,
        "first_call_s": first_s,
        "peak_mem_gib": (stats or {}).get("peak_bytes_in_use", 0) / 2**30 if stats else None,
        "roofline_tokens_per_s": roofline_tokens_s(cfg, batch, args),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    import jax

    device = jax.local_devices()[0]
    env = {
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "dtype": args.dtype,
        "param_dtype": args.param_dtype,
        "attention": args.attention,
        "layers": args.layers,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    print(
        f"# {env['device']} ({env['platform']}), jax {env['jax']}, prompt {args.prompt_len} "
        f"+ {args.new_tokens} new, greedy, {args.dtype} compute / {args.param_dtype} weights, "
        f"{args.layers} layers, attention {args.attention}",
        flush=True,
    )
    print(
        "| model | batch | tokens/s | ms per call | roofline tokens/s | first call s |\n"
        "|---|---|---|---|---|---|",
        flush=True,
    )
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    for name in args.models:
        cfg = model_config(name, args)
        for batch in args.batch_sizes:
            record = {**env, "model": name, "batch_size": batch}
            try:
                record |= bench_one(cfg, batch, args)
                print(
                    f"| {name} | {batch} | {record['tokens_per_s']:,.0f} | "
                    f"{record['call_ms']:.1f} | {record['roofline_tokens_per_s']:,.0f} | "
                    f"{record['first_call_s']:.1f} |",
                    flush=True,
                )
            except Exception as e:  # OOM or a missing kernel: record and go on
                record["error"] = f"{type(e).__name__}: {str(e).strip()[:160]}"
                print(f"| {name} | {batch} | {record['error']} | | | |", flush=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(record) + "\n")
            jax.clear_caches()
    return 0


if __name__ == "__main__":
    sys.exit(main())
