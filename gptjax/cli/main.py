"""The `gptjax` command line: train | sample | tokenizer | prepare | convert | import, and plugins.

The plugins add eval | finetune | sweep (cli/research.py) and sft | reward | ppo | dpo | rlhf |
align-study | chat (cli/rlhf.py).

Every run is configured by gin files (`--gin_file`, repeatable) and
bindings (`--gin_bindings`, repeatable); see experiments/. Errors a user can
fix print one line that says what to do, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import tokenize

# The gin loader lives in experiments.py (sweeps use it too); re-exported for callers of main.
from gptjax.experiments import parse_gin


def init_distributed(args) -> None:
    """Join a multi-process run: explicit flags, or JAX's cluster auto-detection."""
    import jax

    if args.coordinator_address:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif args.multihost:  # TPU pods, SLURM, ...: JAX reads the cluster environment
        jax.distributed.initialize()


def cmd_train(args) -> None:
    """Train (or resume) in --workdir with the default eval hooks (sample preview, exact match)."""
    from gptjax.evals.hooks import train_with_defaults

    kw = {}
    if args.init_from:  # overrides TrainConfig.init_from from gin
        import dataclasses

        from gptjax.training.step import TrainConfig

        kw["train_cfg"] = dataclasses.replace(TrainConfig(), init_from=args.init_from)
    summary = train_with_defaults(
        args.workdir, stop_after=args.stop_after, dry_run=args.dry_run, **kw
    )
    if not args.dry_run:
        print(
            f"done: step {summary['end_step']}, train loss {summary.get('train/loss', 'n/a')}, "
            f"eval loss {summary.get('eval/loss', 'n/a')}; workdir {args.workdir}"
        )
    if args.sample_after and not args.dry_run:
        args.prompt, args.num_samples = args.prompt or "", 1
        cmd_sample(args)


def cmd_sample(args) -> None:
    """Text from a trained workdir: the decoder continues the prompt, the encoder–decoder
    decodes it as a source; an encoder-only model does not generate."""
    from gptjax.training.workdir import load_run

    cfg, params, tokenizer, _, step = load_run(args.workdir)
    _sample_family(args, cfg, params, tokenizer, step)


def _sample_family(args, cfg, params, tokenizer, step) -> None:
    """The family's sampler; an encoder-only config is refused with a clear error."""
    from gptjax.models import family

    fam = family.family_of(cfg)
    if not fam.generates:
        raise ValueError(
            f"an {fam.name}-only model (BERT) does not generate text; fine-tune it "
            "with `gptjax finetune` or score it with `gptjax eval`."
        )
    samplers = {family.DECODER: _sample_decoder, family.SEQ2SEQ: _sample_seq2seq}
    samplers[fam](args, cfg, params, tokenizer, step)


def _sample_decoder(args, cfg, params, tokenizer, step) -> None:
    import jax
    import numpy as np

    from gptjax.inference import sampling as sample

    ids = tokenizer.encode(args.prompt) if args.prompt else [tokenizer.eos_id]
    ids = ids[-max(1, cfg.max_len - args.max_new_tokens) :]
    new = min(args.max_new_tokens, cfg.max_len - len(ids))
    prompt = np.array([ids] * args.num_samples)
    stops = () if args.no_stop else (tokenizer.eos_id,)
    if args.num_beams > 1:
        out = sample.beam_search(
            cfg,
            params,
            prompt,
            num_beams=args.num_beams,
            max_new_tokens=new,
            stop_tokens=stops,
            length_penalty=args.length_penalty,
            length_penalty_kind=args.length_penalty_kind,
        )
    else:
        out = sample.generate(
            cfg,
            params,
            prompt,
            key=jax.random.key(args.seed),
            max_new_tokens=new,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            stop_tokens=stops,
            greedy=args.greedy,
        )
    texts = [
        args.prompt + tokenizer.decode(np.asarray(out.tokens[i, len(ids) :]).tolist())
        for i in range(args.num_samples)
    ]
    for i, text in enumerate(texts):
        print(f"--- sample {i} (step {step}) ---\n{text}")
    if getattr(args, "parse_rate", False):
        from gptjax.evals.python_syntax import parse_rate

        r = parse_rate(texts)
        print(
            f"python: {r['parsed']} of {r['samples']} samples give a function that "
            f"ast.parse accepts ({r['rate']:.0%}; {r['complete']} ended their function)"
        )


def _sample_seq2seq(args, cfg, params, tokenizer, step) -> None:
    """The prompt is the source, decoded greedily (or with --num_beams)."""
    import jax.numpy as jnp
    import numpy as np

    from gptjax.inference import decoding as seq2seq_decode

    src = jnp.asarray([(tokenizer.encode(args.prompt) or [tokenizer.eos_id])[: cfg.max_len]])
    kw = dict(
        start_id=tokenizer.start_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        max_len=min(args.max_new_tokens, cfg.max_len),
    )
    if args.num_beams > 1:
        out = seq2seq_decode.beam_search(
            cfg,
            params,
            src,
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            length_penalty_kind=args.length_penalty_kind,
            **kw,
        ).tokens
    else:
        out = seq2seq_decode.greedy(cfg, params, src, **kw)
    print(
        f"--- {args.prompt!r} => (step {step}, {'beam' if args.num_beams > 1 else 'greedy'}) "
        f"---\n{tokenizer.decode(np.asarray(out[0]).tolist())}"
    )


def cmd_tokenizer(args) -> None:
    from gptjax.data.config import DataConfig, build_tokenizer

    data_cfg = DataConfig(
        dataset=args.dataset,
        path=args.path,
        tokenizer=args.kind,
        tokenizer_vocab_size=args.vocab_size,
        data_dir=args.data_dir,
    )
    tokenizer = build_tokenizer(data_cfg)
    path = tokenizer.save(args.out)
    print(f"{args.kind} tokenizer with {tokenizer.vocab_size} ids written to {path}")


def cmd_prepare(args) -> None:
    from gptjax.data import builders
    from gptjax.data.config import default_data_dir
    from gptjax.data.pipeline import resolve_config

    builder = builders.prepare(
        resolve_config(args.dataset), args.data_dir or default_data_dir(), path=args.path
    )
    for split, info in builder.info.splits.items():
        print(f"{args.dataset} {split}: {info.num_examples} documents")


def cmd_convert(args) -> None:
    """Export a workdir's newest checkpoint to a Hugging Face directory, tokenizer included."""
    from gptjax.research import pretrained

    if not args.export_to:
        raise SystemExit(
            "gptjax convert: pass --export_to=DIR; to bring a Hugging Face directory in, "
            "run `gptjax import --from=DIR --workdir=W`."
        )
    for line in pretrained.export_hf(args.workdir, args.export_to):
        print(line)


def cmd_import(args) -> None:
    """A Hugging Face GPT-2, GPT-1, BERT or Marian directory as a new gptjax workdir."""
    from gptjax.research import pretrained

    out = pretrained.import_hf(args.from_dir, args.workdir)
    print(
        f"imported {out.model_type} ({out.n_params:,} params, {type(out.cfg).__name__}) from "
        f"{args.from_dir} into {args.workdir} as checkpoint step 0"
    )
    if out.tokenizer is not None:
        print(f"tokenizer: {type(out.tokenizer).__name__} with {out.tokenizer.vocab_size} ids")
        print(f"next: gptjax sample --workdir={args.workdir} --prompt '...'")
    else:
        print(
            f"no tokenizer imported ({out.tokenizer_note}); gptjax sample and gptjax eval "
            f"need the model's own tokenizer saved in {args.workdir} (Tokenizer.save; gptjax "
            "train would build a new one from DataConfig instead), and "
            "gptjax reads only GPT-2's byte-level BPE of the Hugging Face formats"
        )


def common_flags(sp: argparse.ArgumentParser, workdir: bool = True) -> None:
    """The flags every subcommand takes: --workdir, gin files and bindings, multi-process."""
    if workdir:
        sp.add_argument("--workdir", required=True, help="run directory")
    sp.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    sp.add_argument(
        "--gin_bindings",
        action="append",
        default=[],
        help='a gin binding such as "TrainConfig.steps = 100" (repeatable)',
    )
    sp.add_argument("--coordinator_address", help="host:port of process 0 (multi-process)")
    sp.add_argument("--num_processes", type=int)
    sp.add_argument("--process_id", type=int)
    sp.add_argument(
        "--multihost",
        action="store_true",
        help="jax.distributed.initialize() with cluster auto-detection (TPU pod)",
    )


def sampling_flags(sp: argparse.ArgumentParser) -> None:
    """The sampler's flags (`gptjax sample`, `gptjax train --sample_after`, plugins)."""
    sp.add_argument("--prompt", default="")
    sp.add_argument("--max_new_tokens", type=int, default=200)
    sp.add_argument("--temperature", type=float, default=0.8)
    sp.add_argument("--top_k", type=int, default=None)
    sp.add_argument("--top_p", type=float, default=None)
    sp.add_argument("--repetition_penalty", type=float, default=1.0)
    sp.add_argument("--greedy", action="store_true")
    sp.add_argument("--num_beams", type=int, default=1)
    sp.add_argument(
        "--length_penalty",
        type=float,
        default=1.0,
        help="beam ranking: sum(logprobs) / penalty(length) ** this",
    )
    sp.add_argument(
        "--length_penalty_kind",
        default="hf",
        choices=("hf", "gnmt"),
        help="hf: length ** alpha; gnmt: ((5 + length) / 6) ** alpha",
    )
    sp.add_argument("--num_samples", type=int, default=1)
    sp.add_argument("--no_stop", action="store_true", help="do not stop at end-of-text")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument(
        "--parse_rate",
        action="store_true",
        help="report how many samples' first function ast.parse accepts (Python corpora)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `gptjax` parser: this module's subcommands, then each plugin's (`PLUGINS`)."""
    p = argparse.ArgumentParser(prog="gptjax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    common, sampling = common_flags, sampling_flags
    t = sub.add_parser("train", help="train or resume a model in --workdir")
    common(t)
    t.add_argument(
        "--stop_after",
        type=int,
        default=None,
        help="stop this invocation after N steps (checkpointed; rerun resumes)",
    )
    t.add_argument(
        "--dry_run",
        action="store_true",
        help="compile for the configured mesh, report memory/FLOPs, do not train",
    )
    t.add_argument(
        "--init_from",
        default=None,
        help="start from this workdir's params (an earlier run, an imported GPT-2): fresh "
        "optimizer, step 0, its tokenizer; ignored once --workdir has a checkpoint",
    )
    t.add_argument("--sample_after", action="store_true", help="print a sample when done")
    sampling(t)
    s = sub.add_parser("sample", help="generate text from a trained workdir")
    common(s)
    sampling(s)
    k = sub.add_parser("tokenizer", help="train a tokenizer on a corpus")
    common(k, workdir=False)
    k.add_argument("--dataset", default="stdlib")
    k.add_argument("--path", default=None)
    k.add_argument("--kind", default="bpe", choices=("bpe", "byte", "char"))
    k.add_argument("--vocab_size", type=int, default=4096)
    k.add_argument("--data_dir", default=None)
    k.add_argument("--out", required=True, help="directory to write the tokenizer into")
    r = sub.add_parser("prepare", help="build a dataset's array_record shards")
    common(r, workdir=False)
    r.add_argument("--dataset", default="stdlib")
    r.add_argument("--path", default=None)
    r.add_argument("--data_dir", default=None)
    c = sub.add_parser(
        "convert", help="export a workdir to a Hugging Face directory (weights and tokenizer)"
    )
    common(c)
    c.add_argument("--export_to", default=None, help="the Hugging Face directory to write")
    i = sub.add_parser(
        "import",
        help="a Hugging Face GPT-2 / GPT-1 / BERT / Marian directory as a new workdir "
        "(--gin_bindings set its train, optimizer and data configs)",
    )
    common(i)
    i.add_argument(
        "--from",
        dest="from_dir",
        required=True,
        help="the Hugging Face directory: config.json, model.safetensors or "
        "pytorch_model.bin, and its tokenizer files",
    )
    for module in PLUGINS:
        if importlib.util.find_spec(module) is not None:
            COMMANDS.update(importlib.import_module(module).register(sub, common, sampling))
    return p


# Modules that add subcommands: each has `register(subparsers, common, sampling) -> {name: fn}`
# where `common(parser, workdir=True)` adds the shared flags and `sampling(parser)` the
# sampler's, and each fn takes the parsed args.
PLUGINS = ("gptjax.cli.research", "gptjax.cli.rlhf")

COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "tokenizer": cmd_tokenizer,
    "prepare": cmd_prepare,
    "convert": cmd_convert,
    "import": cmd_import,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("gptjax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices, etc.
    # gin logs every search-path miss of an `include` at warning level; they are expected.
    logging.getLogger().addFilter(
        lambda r: not str(r.msg).startswith(("Path not found", "system_path_file_exists"))
    )
    from gptjax.training.checkpoint import CheckpointError
    from gptjax.training.loop import TrainingDivergedError

    try:
        parse_gin(args.gin_file, args.gin_bindings)
        init_distributed(args)
        COMMANDS[args.command](args)
    except (
        ValueError,
        FileNotFoundError,
        KeyError,
        SyntaxError,
        tokenize.TokenError,
        OSError,
        CheckpointError,
        TrainingDivergedError,
    ) as e:
        # gin appends where the configurable was called; the message itself says what to do.
        msg = [m for m in str(e).strip().splitlines() if "In call to configurable" not in m]
        print(
            f"gptjax {args.command}: error: {msg[0] if msg else type(e).__name__}"
            + ("".join(f"\n  {m}" for m in msg[1:4])),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
