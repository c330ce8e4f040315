"""gptjax against PyTorch + Hugging Face on the CPU: training and decoding tokens/s, side by side.

Both sides run in this one process, in alternating timed windows (gptjax, torch, gptjax, ...),
so a noisy shared machine slows both alike; the ratio is the median over the windows of
gptjax's rate divided by the torch window next to it.

Training: gptjax's real jitted step (`make_trainer(...).train_step`: AdamW, clipping at 1.0,
donation) against `GPT2LMHeadModel` + `torch.optim.AdamW` + `clip_grad_norm_` in eager mode, at
the same shapes, fp32, dropout off, random tokens. Decoding: `sampling.generate` (greedy, one jit)
against `GPT2LMHeadModel.generate` (greedy, KV cache), a 64-token prompt and 256 new tokens.

  python benchmarks/cpu_vs_torch.py                    # the two issue-14 shapes, training
  python benchmarks/cpu_vs_torch.py --mode decode      # batch 1 / 16 / 64
  python benchmarks/cpu_vs_torch.py --mode seq         # nano_small at T = 128 ... 1024
  python benchmarks/cpu_vs_torch.py --mode size        # nano_small ... gpt2_small, batch 4
  python benchmarks/cpu_vs_torch.py --tiny             # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    seq_len: int
    batch_size: int


TRAIN_SHAPES = {
    "quickstart": Shape("quickstart", 4, 128, 4, 4096, 128, 16),
    "shakespeare_char": Shape("shakespeare_char", 6, 384, 6, 65, 256, 8),
}
DECODE_SHAPE = Shape("quickstart", 4, 128, 4, 4096, 512, 1)  # seq_len = max_len of the cache


def seq_shapes(lengths=(128, 256, 512, 1024)) -> list[Shape]:
    """nano_small (4 x 128) at growing context, the same tokens per step (2048)."""
    return [Shape(f"nano_small T={t}", 4, 128, 4, 4096, t, max(1, 2048 // t)) for t in lengths]


def size_shapes() -> list[Shape]:
    """From the CPU quickstart model to GPT-2 124M at batch 4 x 256."""
    return [
        Shape("nano_small", 4, 128, 4, 4096, 256, 4),
        Shape("nano_medium 6x256", 6, 256, 8, 8192, 256, 4),
        Shape("8x512", 8, 512, 8, 16384, 256, 4),
        Shape("gpt2_small", 12, 768, 12, 50257, 256, 4),
    ]


def jax_config(shape: Shape, overrides: dict):
    from gptjax.config import ModelConfig

    cfg = ModelConfig(
        n_layers=shape.n_layers,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        vocab_size=shape.vocab_size,
        max_len=shape.seq_len,
        embd_dropout=0.0,
        attn_dropout=0.0,
        resid_dropout=0.0,
    )
    return cfg.replace(**overrides)


def torch_model(shape: Shape):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=shape.n_layers,
        n_embd=shape.d_model,
        n_head=shape.n_heads,
        vocab_size=shape.vocab_size,
        n_positions=shape.seq_len,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config)


# ------------------------------------------------------------------ training


def jax_train_runner(shape: Shape, overrides: dict):
    """A function `run(n)` doing n gptjax train steps and waiting for the last."""
    import jax
    import numpy as np

    from gptjax.parallel import logical
    from gptjax.parallel import mesh as sharding
    from gptjax.training.optimizer import OptimizerConfig
    from gptjax.training.step import make_trainer

    cfg = jax_config(shape, overrides)
    mesh = sharding.make_mesh(sharding.MeshConfig(shape={"data": 1}), jax.local_devices()[:1])
    rules = logical.logical_axis_rules("dp")
    trainer = make_trainer(
        cfg, OptimizerConfig(warmup_steps=10), 10_000, mesh, rules, shape.batch_size
    )
    rng = np.random.default_rng(0)
    size = (shape.batch_size, shape.seq_len + 1)
    batches = [
        jax.device_put(
            {"tokens": rng.integers(0, shape.vocab_size, size, dtype=np.int32)},
            trainer.batch_sharding,
        )
        for _ in range(4)
    ]
    box = {"state": trainer.init_train_state(0), "i": 0}

    def run(n: int) -> float:
        with logical.use_mesh(mesh, rules):
            for _ in range(n):
                box["state"], metrics = trainer.train_step(box["state"], batches[box["i"] % 4])
                box["i"] += 1
        return float(metrics["train/loss"])

    return run


def torch_train_runner(shape: Shape):
    import torch

    model = torch_model(shape).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    size = (shape.batch_size, shape.seq_len)
    batches = [torch.randint(0, shape.vocab_size, size, generator=gen) for _ in range(4)]
    box = {"i": 0}

    def run(n: int) -> float:
        for _ in range(n):
            tokens = batches[box["i"] % 4]
            loss = model(tokens, labels=tokens).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            box["i"] += 1
        return loss.item()

    return run


# ------------------------------------------------------------------ decoding


def jax_decode_runner(shape: Shape, batch: int, prompt_len: int, new_tokens: int, overrides):
    import jax
    import numpy as np

    from gptjax.inference import sampling
    from gptjax.models import gpt

    cfg = jax_config(shape, overrides)
    params = jax.jit(gpt.init_params, static_argnums=0)(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)

    def run(n: int) -> None:
        for _ in range(n):
            prompt = rng.integers(1, shape.vocab_size, (batch, prompt_len), dtype=np.int32)
            out = sampling.generate(
                cfg,
                params,
                prompt,
                key=jax.random.key(0),
                max_new_tokens=new_tokens,
                greedy=True,
                stop_tokens=(),
            )
            out.tokens.block_until_ready()

    return run


def torch_decode_runner(shape: Shape, batch: int, prompt_len: int, new_tokens: int):
    import torch

    model = torch_model(shape).eval()
    gen = torch.Generator().manual_seed(0)

    def run(n: int) -> None:
        for _ in range(n):
            prompt = torch.randint(1, shape.vocab_size, (batch, prompt_len), generator=gen)
            with torch.no_grad():
                model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                )

    return run


# ------------------------------------------------------------------ timing


def make_runner(case: dict):
    """The runner one worker process times: `case` names the side, the work and the shape."""
    shape = Shape(**case["shape"])
    overrides = parse_overrides(case["jax"])
    if case["kind"] == "train":
        if case["side"] == "gptjax":
            return jax_train_runner(shape, overrides)
        return torch_train_runner(shape)
    args = (shape, case["batch"], case["prompt_len"], case["new_tokens"])
    if case["side"] == "gptjax":
        return jax_decode_runner(*args, overrides)
    return torch_decode_runner(*args)


def worker(case_json: str) -> int:
    """Serve timing requests on stdin: a line `n` runs n calls and answers their seconds."""
    run = make_runner(json.loads(case_json))
    run(2)  # compile, allocator warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        run(int(line))
        print(f"{time.perf_counter() - t0:.6f}", flush=True)
    return 0


def alternate(case: dict, units: int, steps: int, repeats: int) -> dict:
    """Time `repeats` windows of `steps` calls on each side, in turn: gptjax, torch, ...

    Each side lives in its own process (its own thread pools, which spin for a while after
    work) and waits on a pipe while the other runs; a short pause between windows lets the
    finished side's threads go idle. Returns {side: [units/s per window]}, aligned by round.
    """
    procs = {}
    for side in ("gptjax", "torch"):
        procs[side] = subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                json.dumps(case | {"side": side}),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if procs[side].stdout.readline().strip() != "ready":  # one at a time: no overlap
            raise RuntimeError(f"the {side} worker failed to start (see its error above)")
    rates = {side: [] for side in procs}
    try:
        for _ in range(repeats):
            for side, proc in procs.items():
                time.sleep(0.5)
                proc.stdin.write(f"{steps}\n")
                proc.stdin.flush()
                rates[side].append(units * steps / float(proc.stdout.readline()))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    return rates


def summary(label: str, rates: dict) -> dict:
    jx, pt = rates["gptjax"], rates["torch"]
    return {
        "shape": label,
        "gptjax_tok_s": statistics.median(jx),
        "torch_tok_s": statistics.median(pt),
        "ratio": statistics.median([a / b for a, b in zip(jx, pt)]),
        "ratio_min": min(a / b for a, b in zip(jx, pt)),
        "windows": len(jx),
    }


def row(r: dict) -> str:
    return (
        f"| {r['shape']} | {r['torch_tok_s']:,.0f} | {r['gptjax_tok_s']:,.0f} | "
        f"**{r['ratio']:.2f}** | {r['ratio_min']:.2f} |"
    )


HEADER = (
    "| shape | {torch} tok/s | gptjax tok/s | ratio (median) | ratio (worst window) |\n"
    "|---|---|---|---|---|"
)


def parse_overrides(text: str) -> dict:
    """`scan_layers=False,remat=dots` -> ModelConfig fields (Python literals)."""
    import ast

    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("train", "decode", "seq", "size"), default="train")
    p.add_argument("--shapes", default="quickstart,shakespeare_char", help="train mode")
    p.add_argument("--batch_sizes", default="1,16,64", help="decode mode")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=0, help="calls per window (0: by mode)")
    p.add_argument("--repeats", type=int, default=5, help="windows per side")
    p.add_argument("--jax", default="", help="ModelConfig overrides, e.g. scan_layers=False")
    p.add_argument("--results", default="benchmarks/results/cpu_vs_torch.jsonl")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 2 windows: a smoke run")
    return p.parse_args(argv)


def cases(args) -> list[tuple[str, dict, int, int]]:
    """(label, case, tokens per call, calls per window) for every comparison of the mode."""
    base = {"jax": args.jax}
    out = []
    if args.mode == "decode":
        shape = DECODE_SHAPE
        new, prompt = args.new_tokens, args.prompt_len
        if args.tiny:
            shape, new, prompt = dataclasses.replace(shape, n_layers=1, seq_len=64), 16, 8
        for b in (int(x) for x in args.batch_sizes.split(",")):
            case = base | {"kind": "decode", "shape": dataclasses.asdict(shape), "batch": b}
            case |= {"prompt_len": prompt, "new_tokens": new}
            out.append((f"decode batch {b}", case, b * new, args.steps or 1))
        return out
    shapes = {
        "train": lambda: [TRAIN_SHAPES[s] for s in args.shapes.split(",")],
        "seq": seq_shapes,
        "size": size_shapes,
    }[args.mode]()
    if args.tiny:
        shapes = [dataclasses.replace(s, n_layers=1, seq_len=32, batch_size=2) for s in shapes[:2]]
    for s in shapes:
        case = base | {"kind": "train", "shape": dataclasses.asdict(s)}
        out.append((s.name, case, s.batch_size * s.seq_len, args.steps or 5))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker(argv[1])
    args = parse_args(argv)
    if args.tiny:
        args.repeats = min(args.repeats, 2)
    import jax
    import torch

    print(
        f"# mode {args.mode}; jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} cores; "
        f"gptjax overrides '{args.jax}'",
        flush=True,
    )
    print(HEADER.format(torch="HF decode" if args.mode == "decode" else "PyTorch"), flush=True)
    os.makedirs(os.path.dirname(args.results) or ".", exist_ok=True)
    for label, case, units, steps in cases(args):
        r = summary(label, alternate(case, units, steps, args.repeats))
        print(row(r), flush=True)
        r |= {
            "mode": args.mode,
            "jax": jax.__version__,
            "torch": torch.__version__,
            "overrides": args.jax,
            "cores": os.cpu_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        with open(args.results, "a") as f:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
