"""Training throughput: tokens/s, MFU and peak memory of gptjax's real train step on one device.

Runs `gptjax.training.step.make_trainer(...).train_step` (AdamW + clipping, donation, the same
jitted function `gptjax train` runs) on random tokens for every combination of the knobs given, and
prints one markdown table row per configuration; each row is also appended as a JSON line to
`--results`. XLA flags apply to the whole process (set before JAX starts), so compare flag sets
in separate invocations.

  python benchmarks/train_throughput.py --models gpt2_small --batch_sizes 16,24,32 \\
      --layers unrolled,scan --attention cudnn,xla --remat none,dots
  python benchmarks/train_throughput.py --tiny          # CPU smoke run, seconds

See benchmarks/README.md for what to try first and the predicted effects.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument(
        "--models",
        type=csv,
        default=["gpt2_small"],
        help="presets: gpt2_small,gpt2_medium,gpt2_large,gpt2_xl (comma list)",
    )
    p.add_argument("--batch_sizes", type=lambda s: [int(x) for x in csv(s)], default=[16])
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (params stay fp32)")
    p.add_argument("--param_dtype", default="float32")
    p.add_argument("--layers", type=csv, default=["unrolled"], help="unrolled,scan")
    p.add_argument("--remat", type=csv, default=["none"], help="none,full,dots,dots_no_batch")
    p.add_argument("--attention", type=csv, default=["cudnn"], help="xla,fused,cudnn")
    p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS before JAX starts")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed windows; the median is kept")
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="peak per device for MFU (default: gptjax.training.metrics table, H100 989)",
    )
    p.add_argument("--results", default="benchmarks/results/train_throughput.jsonl")
    p.add_argument(
        "--profile",
        default=None,
        help="write a jax.profiler trace of 3 timed steps of each config here",
    )
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a 2-layer model at seq 128 on whatever device: a smoke test for CPU",
    )
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.seq_len = ["tiny"], min(args.seq_len, 128)
        args.batch_sizes = [b if b != 16 else 4 for b in args.batch_sizes]  # 16: the default
        args.attention = ["xla" if a == "cudnn" else a for a in args.attention]
        args.dtype = "float32" if args.dtype == "bfloat16" else args.dtype
        args.warmup, args.steps, args.repeats = 1, min(args.steps, 5), min(args.repeats, 2)
    return args


def model_config(name: str, seq_len: int, args, layers: str, remat: str, attention: str):
    from gptjax.config import PRESETS, ModelConfig

    base = (
        ModelConfig(n_layers=2, d_model=128, n_heads=4, vocab_size=4096, max_len=seq_len)
        if name == "tiny"
        else PRESETS[name]
    )
    # Dropout off, as in nanoGPT's bench.py: it costs RNG work and is not what we compare.
    return base.replace(
        max_len=max(base.max_len, seq_len),
        dtype=args.dtype,
        param_dtype=args.param_dtype,
        scan_layers=layers == "scan",
        remat=remat,
        attention_impl=attention,
        embd_dropout=0.0,
        attn_dropout=0.0,
        resid_dropout=0.0,
    )


def peak_memory_gib(device) -> float | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats:  # CPU has none
        return None
    return stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)) / 2**30


def bench_one(cfg, batch_size: int, args) -> dict:
    import jax
    import numpy as np

    from gptjax.parallel import logical
    from gptjax.parallel import mesh as sharding
    from gptjax.training import metrics
    from gptjax.training.optimizer import OptimizerConfig
    from gptjax.training.step import abstract_state, make_trainer

    device = jax.local_devices()[0]
    mesh = sharding.make_mesh(sharding.MeshConfig(shape={"data": 1}), devices=[device])
    rules = logical.logical_axis_rules("dp")
    trainer = make_trainer(cfg, OptimizerConfig(warmup_steps=10), 10_000, mesh, rules, batch_size)
    tokens_per_step = batch_size * args.seq_len
    with logical.use_mesh(mesh, rules):
        # Several random batches rotate, so no step reuses its predecessor's input.
        rng = np.random.default_rng(0)
        batches = [
            jax.device_put(
                {
                    "tokens": rng.integers(
                        0, cfg.vocab_size, (batch_size, args.seq_len + 1), dtype=np.int32
                    )
                },
                trainer.batch_sharding,
            )
            for _ in range(4)
        ]
        t0 = time.perf_counter()
        compiled = trainer.train_step.lower(abstract_state(trainer), batches[0]).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state = trainer.init_train_state(0)
        step = 0

        def run(n):
            nonlocal state, step
            metrics = None
            for _ in range(n):
                state, metrics = compiled(state, batches[step % len(batches)])
                step += 1
            return float(metrics["train/loss"])  # waits for the last step

        loss = run(args.warmup)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            loss = run(args.steps)
            times.append((time.perf_counter() - t0) / args.steps)
        if args.profile:
            jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
            run(3)
            jax.profiler.stop_trace()
    step_s = statistics.median(times)
    tok_s = tokens_per_step / step_s
    peak = args.peak_tflops * 1e12 if args.peak_tflops else metrics.peak_flops(device)
    return {
        "tokens_per_s": tok_s,
        "mfu": metrics.mfu(tok_s, cfg, args.seq_len, 1, peak),
        "step_ms": step_s * 1e3,
        "step_ms_spread": (max(times) - min(times)) * 1e3,
        "peak_mem_gib": peak_memory_gib(device),
        "compiled_temp_gib": None if mem is None else mem.temp_size_in_bytes / 2**30,
        "compile_s": compile_s,
        "loss": loss,
        "model_tflops_per_step": metrics.flops_per_token(cfg, args.seq_len)
        * tokens_per_step
        / 1e12,
        "peak_tflops": None if peak is None else peak / 1e12,
    }


HEADER = (
    "| model | batch | layers | remat | attention | dtype | tokens/s | MFU | step ms "
    "| peak mem GiB | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict) -> str:
    if "error" in r:
        return (
            f"| {r['model']} | {r['batch_size']} | {r['layers']} | {r['remat']} | "
            f"{r['attention']} | {r['dtype']} | {r['error']} | | | | |"
        )
    mem = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    return (
        f"| {r['model']} | {r['batch_size']} | {r['layers']} | {r['remat']} | "
        f"{r['attention']} | {r['dtype']} | {r['tokens_per_s']:,.0f} | {mfu} | "
        f"{r['step_ms']:.1f} | {mem} | {r['compile_s']:.0f} |"
    )


def child(args) -> dict:
    """One configuration in this process (the parent gave single-valued lists)."""
    import jax

    device = jax.local_devices()[0]
    name, batch, layers = args.models[0], args.batch_sizes[0], args.layers[0]
    remat, attention = args.remat[0], args.attention[0]
    cfg = model_config(name, args.seq_len, args, layers, remat, attention)
    record = {
        "device": device.device_kind,
        "platform": device.platform,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "seq_len": args.seq_len,
        "model": name,
        "batch_size": batch,
        "layers": layers,
        "remat": remat,
        "attention": attention,
        "dtype": args.dtype,
        "param_dtype": args.param_dtype,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
    }
    try:
        record |= bench_one(cfg, batch, args)
    except Exception as e:  # OOM, or an attention impl this device lacks: record it, go on
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
        record["error"] = "OOM" if oom else f"{type(e).__name__}: {text}"
    return record


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        if args.xla_flags:  # before JAX initialises its backend
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    # Each configuration runs in a fresh process: the device's peak-memory counter cannot be
    # reset, an OOM can leave the allocator fragmented, and compiled programs pile up.
    print(
        f"# seq {args.seq_len}, dtype {args.dtype}, extra XLA flags '{args.xla_flags}'"
        f" (device and versions are in {args.results})",
        flush=True,
    )
    print(HEADER, flush=True)
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    for name, batch, layers, remat, attention in itertools.product(
        args.models, args.batch_sizes, args.layers, args.remat, args.attention
    ):
        one = [
            f"--models={name}",
            f"--batch_sizes={batch}",
            f"--layers={layers}",
            f"--remat={remat}",
            f"--attention={attention}",
            "--child",
        ]
        try:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *argv, *one],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            record = (
                json.loads(lines[-1][7:])
                if lines
                else {
                    "error": f"exit {proc.returncode}: "
                    f"{(proc.stderr.strip().splitlines() or [''])[-1][:160]}"
                }
            )
        except subprocess.TimeoutExpired:
            record = {"error": f"timeout after {args.timeout}s"}
        record = {
            "model": name,
            "batch_size": batch,
            "layers": layers,
            "remat": remat,
            "attention": attention,
            "dtype": args.dtype,
            **record,
        }
        if args.tiny:
            record["model"] = "tiny"
        print(row(record), flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
