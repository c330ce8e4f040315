"""benchmarks/gpu.sh (the one device call) and benchmarks/results_table.py (its RESULTS.md rows),
on CPU with the scripts' --tiny model: every planned step leaves a row, a measured row's tokens/s
agree with the timing it came from, and each row is judged against issue 14's targets."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "results_table", ROOT / "benchmarks/results_table.py"
)
results_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results_table)

# gpu.sh's steps in its order, as --tiny runs them: training (layers, batch / 8), decode
# (layers, batch capped at 8).
TINY_TRAIN_PLAN = [("unrolled", 2), ("unrolled", 3), ("unrolled", 4)]
TINY_TRAIN_PLAN += [("scan", 1), ("scan", 2), ("scan", 3), ("scan", 4)]  # xl-b8 first
TINY_DECODE_PLAN = [("scan", 1), ("scan", 8), ("unrolled", 1), ("unrolled", 8)]


def gpu_sh(out, *flags) -> str:
    """Runs benchmarks/gpu.sh --tiny into `out`; returns rows.md."""
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--tiny", "--out", str(out), *flags],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return (out / "rows.md").read_text()


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the rows under `header` in markdown `text`."""
    lines = text.splitlines()
    start = lines.index(header.splitlines()[0]) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def train_record(model, batch, layers, **measured) -> dict:
    return dict(model=model, batch_size=batch, layers=layers, attention="cudnn", **measured)


def decode_record(layers, batch, **measured) -> dict:
    return dict(model="gpt2_small", layers=layers, batch_size=batch, **measured)


def test_rows_against_targets():
    timing = dict(peak_mem_gib=0.5, first_call_s=12.34)
    train = [
        train_record(
            "gpt2_small", 16, "unrolled", tokens_per_s=700_000.4, mfu=0.6049, step_ms=23.41,
            peak_mem_gib=10.46, compile_s=41.2,
        ),
        train_record(
            "gpt2_small", 32, "scan", tokens_per_s=649_999.0, mfu=None, step_ms=50.41,
            peak_mem_gib=None, compile_s=9.6,
        ),
        train_record("gpt2_xl", 8, "scan", error="OOM"),
        train_record(
            "gpt2_xl", 4, "scan", tokens_per_s=40_000.0, mfu=0.4166, step_ms=102.4,
            peak_mem_gib=61.25, compile_s=80.0,
        ),
    ]  # fmt: skip
    assert [results_table.train_row(r) for r in train] == [
        "| gpt2_small | 16 | unrolled | cudnn | 700,000 | 60.5% | 23.4 | 10.5 | 41 "
        "| >= 650K: yes |",
        "| gpt2_small | 32 | scan | cudnn | 649,999 | n/a | 50.4 | n/a | 10 | >= 650K: no |",
        "| gpt2_xl | 8 | scan | cudnn | OOM | | | | | fits one GPU: no |",
        "| gpt2_xl | 4 | scan | cudnn | 40,000 | 41.7% | 102.4 | 61.2 | 80 | fits one GPU: yes |",
    ]
    sample = [
        decode_record(
            "scan", 1, tokens_per_s=4_000.0, call_ms=64.0, roofline_tokens_per_s=12_345.6, **timing
        ),
        decode_record(
            "scan", 64, tokens_per_s=149_000.0, call_ms=110.0, roofline_tokens_per_s=3e5, **timing
        ),
        decode_record("unrolled", 64, error="skipped (budget)"),
    ]
    assert [results_table.decode_row(r) for r in sample] == [
        "| gpt2_small | scan | 1 | 4,000 | 64.0 | 12,346 | 0.5 | 12.3 | >= 4K: yes |",
        "| gpt2_small | scan | 64 | 149,000 | 110.0 | 300,000 | 0.5 | 12.3 | >= 150K: no |",
        "| gpt2_small | unrolled | 64 | skipped (budget) | | | | | >= 150K: not measured |",
    ]


def test_results_md_has_the_tables():
    text = (ROOT / "benchmarks/RESULTS.md").read_text()
    assert results_table.TRAIN_HEADER in text
    assert results_table.DECODE_HEADER in text


def test_no_budget_leaves_a_skipped_row_per_step(tmp_path):
    rows = gpu_sh(tmp_path, "--budget", "0")
    train = table_rows(rows, results_table.TRAIN_HEADER)
    decode = table_rows(rows, results_table.DECODE_HEADER)
    assert [(r[2], int(r[1])) for r in train] == TINY_TRAIN_PLAN
    assert [(r[1], int(r[2])) for r in decode] == TINY_DECODE_PLAN
    assert {r[4] for r in train} == {r[3] for r in decode} == {"skipped (budget)"}


def test_tiny_steps_measure(tmp_path):
    rows = gpu_sh(tmp_path, "--only", "xl-b8-scan|decode-b1-scan")
    (train_rec,) = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    (decode_rec,) = [json.loads(x) for x in (tmp_path / "sample.jsonl").read_text().splitlines()]
    # tokens/s from the timing it came from: batch x seq / step, batch x new tokens / call.
    assert train_rec["tokens_per_s"] == pytest.approx(1 * 128 / (train_rec["step_ms"] / 1e3))
    assert decode_rec["tokens_per_s"] == pytest.approx(1 * 32 / (decode_rec["call_ms"] / 1e3))
    (train,) = table_rows(rows, results_table.TRAIN_HEADER)
    (decode,) = table_rows(rows, results_table.DECODE_HEADER)
    assert train[:4] == ["tiny", "1", "scan", "xla"] and decode[:3] == ["tiny", "scan", "1"]
    for cell, rec in [(train[4], train_rec), (decode[3], decode_rec)]:
        tokens_s = float(cell.replace(",", ""))
        assert math.isfinite(tokens_s) and tokens_s > 0
        assert tokens_s == round(rec["tokens_per_s"])


def test_cpu_vs_torch_tiny_runs_both_sides_and_records_a_ratio(tmp_path):
    """The side-by-side CPU benchmark end to end (worker processes, alternating windows) on
    a 1-layer model: one row whose ratio is gptjax's rate over torch's."""
    results = tmp_path / "cpu.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks/cpu_vs_torch.py"), "--tiny"]
    cmd += ["--shapes", "quickstart", "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["shape"] == "quickstart" and record["windows"] == 2
    for key in ("gptjax_tok_s", "torch_tok_s"):
        assert math.isfinite(record[key]) and record[key] > 0
    assert 0 < record["ratio_min"] <= record["ratio"]
    assert "| quickstart |" in proc.stdout
