"""The RESULTS.md rows (markdown) of the JSON lines that train_throughput.py and
sample_throughput.py append, each row against its target from issue 14.

  python benchmarks/results_table.py --train $OUT/train.jsonl --sample $OUT/sample.jsonl \\
      --command "bash benchmarks/gpu.sh" > rows.md

Targets: GPT-2 124M training >= 650K tokens/s on one H100/H200; GPT-2 XL (1.5B) training fits one
GPU; GPT-2 124M greedy decode >= 4K tokens/s at batch 1 and >= 150K at batch 64. A record with
an `error` (OOM, time-out, skipped for lack of budget) keeps its row, with the error in place of
the numbers. Models without a target (the --tiny smoke model) say n/a.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TRAIN_TARGET_TOKENS_S = {"gpt2_small": 650_000}
FITS_ONE_GPU = ("gpt2_xl",)
DECODE_TARGET_TOKENS_S = {("gpt2_small", 1): 4_000, ("gpt2_small", 64): 150_000}

TRAIN_HEADER = (
    "| model | batch | layers | attention | tokens/s | MFU | step ms | peak mem GiB | compile s "
    "| target |\n|---|---|---|---|---|---|---|---|---|---|"
)
DECODE_HEADER = (
    "| model | layers | batch | tokens/s | ms per call | roofline tokens/s | peak mem GiB "
    "| first call s | target |\n|---|---|---|---|---|---|---|---|---|"
)


def read_jsonl(path: str | None) -> list[dict]:
    """The records of a JSON-lines file; none for a missing path."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _num(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _against(tokens_s: float | None, target: float) -> str:
    """'>= 650K: yes' / ': no', or ': not measured' when there is no number."""
    head = f">= {target / 1000:g}K"
    if tokens_s is None:
        return f"{head}: not measured"
    return f"{head}: {'yes' if tokens_s >= target else 'no'}"


def train_target(r: dict) -> str:
    """The training row's target cell."""
    if r["model"] in TRAIN_TARGET_TOKENS_S:
        return _against(r.get("tokens_per_s"), TRAIN_TARGET_TOKENS_S[r["model"]])
    if r["model"] in FITS_ONE_GPU:
        if "error" in r:
            return "fits one GPU: " + ("no" if r["error"] == "OOM" else "not measured")
        return "fits one GPU: yes"
    return "n/a"


def train_row(r: dict) -> str:
    """One training record as a row under TRAIN_HEADER."""
    head = f"| {r['model']} | {r['batch_size']} | {r['layers']} | {r['attention']} |"
    if "error" in r:
        return f"{head} {r['error']} | | | | | {train_target(r)} |"
    mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.1%}"
    return (
        f"{head} {r['tokens_per_s']:,.0f} | {mfu} | {r['step_ms']:.1f} | "
        f"{_num(r.get('peak_mem_gib'), '.1f')} | {r['compile_s']:.0f} | {train_target(r)} |"
    )


def decode_row(r: dict) -> str:
    """One sampling record as a row under DECODE_HEADER."""
    target = DECODE_TARGET_TOKENS_S.get((r["model"], r["batch_size"]))
    target_cell = "n/a" if target is None else _against(r.get("tokens_per_s"), target)
    head = f"| {r['model']} | {r['layers']} | {r['batch_size']} |"
    if "error" in r:
        return f"{head} {r['error']} | | | | | {target_cell} |"
    return (
        f"{head} {r['tokens_per_s']:,.0f} | {r['call_ms']:.1f} | "
        f"{r['roofline_tokens_per_s']:,.0f} | {_num(r.get('peak_mem_gib'), '.1f')} | "
        f"{r['first_call_s']:.1f} | {target_cell} |"
    )


def _distinct(records: list[dict], key: str) -> str:
    """The values of `key` over the measured records, joined."""
    return " / ".join(sorted({str(r[key]) for r in records if key in r and "error" not in r}))


def _measured(records: list[dict]) -> bool:
    return any("error" not in r for r in records)


def table(train: list[dict], sample: list[dict], command: str) -> str:
    """Both tables, each under a line naming device, versions and settings."""
    both = train + sample
    lines = [
        f"`{command}` on {_distinct(both, 'device')} ({_distinct(both, 'platform')}), "
        f"jax {_distinct(both, 'jax')}, {_distinct(both, 'date')[:10]}."
        if _measured(both)
        else f"`{command}`: nothing measured."
    ]
    if train:
        settings = (
            f"seq {_distinct(train, 'seq_len')}, {_distinct(train, 'dtype')} compute, "
            f"{_distinct(train, 'param_dtype')} params and Adam, remat {_distinct(train, 'remat')}"
        )
        lines += ["", f"Training, {settings if _measured(train) else 'nothing measured'}:", ""]
        lines += [TRAIN_HEADER, *map(train_row, train)]
    if sample:
        settings = (
            f"greedy, prompt {_distinct(sample, 'prompt_len')} + "
            f"{_distinct(sample, 'new_tokens')} new, {_distinct(sample, 'param_dtype')} weights, "
            f"attention {_distinct(sample, 'attention')}"
        )
        lines += ["", f"Decode, {settings if _measured(sample) else 'nothing measured'}:", ""]
        lines += [DECODE_HEADER, *map(decode_row, sample)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", help="train_throughput.py's JSON lines")
    p.add_argument("--sample", help="sample_throughput.py's JSON lines")
    p.add_argument("--command", default="bash benchmarks/gpu.sh", help="named above the rows")
    args = p.parse_args(argv)
    sys.stdout.write(table(read_jsonl(args.train), read_jsonl(args.sample), args.command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
