"""What a training run shows at its eval steps besides the loss: hooks for the loop.

A hook is `(step, params) -> (metrics, text)` (`gptjax.training.loop.Hook`): its metrics join
the eval row, its text is printed and written as the step's sample. The loop imports no evals
or inference code; it calls `hooks(model_cfg, data_cfg, train_cfg, tokenizer)` once the run's
tokenizer is known, and `default_hooks` is the one `gptjax train` and sweeps pass: on a number
task, exact match of greedy decoding and its preview (`gptjax.evals.exact_match`); on a corpus,
the family's sample preview (`gptjax.inference.preview`); when bound on, pass@k of sampled code
(`gptjax.evals.code`).
"""

from __future__ import annotations

from gptjax.config import ModelConfig
from gptjax.data import numbers
from gptjax.data.config import DataConfig
from gptjax.data.tokenizer import Tokenizer
from gptjax.evals import code, exact_match
from gptjax.inference import preview as preview_lib
from gptjax.models import family
from gptjax.training import loop
from gptjax.training.step import TrainConfig


def preview_hook(
    model_cfg: ModelConfig, tokenizer: Tokenizer, prompt: str, n_tokens: int
) -> loop.Hook:
    """The family's preview of `prompt` (sampled with the step as seed); no metrics."""

    def hook(step: int, params) -> tuple[dict, str]:
        return {}, preview_lib.preview(model_cfg, params, tokenizer, prompt, n_tokens, step)

    return hook


def exact_match_hook(
    model_cfg: ModelConfig,
    tokenizer: Tokenizer,
    data_cfg: DataConfig,
    seq_len: int,
    n_examples: int,
) -> loop.Hook:
    """`eval/exact_match` of greedy decoding on `n_examples` validation pairs of the number
    task (spread over its range), and a preview of some of them."""
    pairs = numbers.pairs(data_cfg.dataset, "validation", data_cfg.task_max_number)
    pairs = pairs[:: max(1, len(pairs) // n_examples)][:n_examples]
    kw = dict(task=data_cfg.dataset, seq_len=seq_len, max_number=data_cfg.task_max_number)

    def hook(step: int, params) -> tuple[dict, str]:
        em, text = exact_match.score(model_cfg, params, tokenizer, pairs, **kw)
        return {"eval/exact_match": em}, text

    return hook


def pass_at_k_hook(
    model_cfg: ModelConfig, tokenizer: Tokenizer, code_cfg: code.CodeEvalConfig
) -> loop.Hook:
    """`eval/pass@k` of sampled completions of the first `code_cfg.num_problems` problems
    (HumanEval by default), tested in the sandbox; the text is the pass@k summary."""
    if family.family_of(model_cfg) != family.DECODER:
        raise ValueError("CodeEvalConfig.num_problems > 0 needs a decoder (a GPT) to sample code.")
    # read once, before training: a missing package or file fails before the first step
    problems = list(code.load_problems(code_cfg.problems).values())[: code_cfg.num_problems]

    def hook(step: int, params) -> tuple[dict, str]:
        _, summary = code.evaluate_model(
            model_cfg, params, tokenizer, code_cfg, problems, seed=step, progress=False
        )
        metrics = {f"eval/{name}": v for name, v in code.pass_metrics(summary).items()}
        return metrics, code.format_summary(summary)

    return hook


def default_hooks(
    model_cfg: ModelConfig, data_cfg: DataConfig, train_cfg: TrainConfig, tokenizer: Tokenizer
) -> list[loop.Hook]:
    """Exact match on a number task (over eval_batches * batch_size examples), else the
    sample preview of `TrainConfig.sample_prompt`; plus pass@k when `CodeEvalConfig`'s
    num_problems is bound above 0 (off by default: it samples and runs programs)."""
    code_cfg = code.CodeEvalConfig()
    extra = [pass_at_k_hook(model_cfg, tokenizer, code_cfg)] if code_cfg.num_problems > 0 else []
    if data_cfg.dataset in numbers.TASKS:
        return [
            exact_match_hook(
                model_cfg,
                tokenizer,
                data_cfg,
                train_cfg.seq_len,
                train_cfg.eval_batches * train_cfg.batch_size,
            ),
            *extra,
        ]
    preview = preview_hook(model_cfg, tokenizer, train_cfg.sample_prompt, train_cfg.sample_tokens)
    return [preview, *extra]


def train_with_defaults(workdir: str, **kw) -> dict:
    """`gptjax.training.loop.train` with `default_hooks`, as `gptjax train` runs it."""
    return loop.train(workdir, hooks=default_hooks, **kw)
