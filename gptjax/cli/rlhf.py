"""`gptjax sft | reward | ppo | dpo | rlhf | align-study | chat`: the InstructGPT stages and
the methods compared with PPO, from the command line.

main.py finds this module through its PLUGINS list, parses the gin files before calling a
command, and turns ValueError / FileNotFoundError into one-line errors. `--init_from` (and
`ppo --critic_init_from`) override the stage config's field of that name from gin.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys


def _with(cfg, args, *names):
    """`cfg` with the fields among `names` that the command line set."""
    changes = {n: getattr(args, n) for n in names if getattr(args, n, None)}
    return dataclasses.replace(cfg, **changes) if changes else cfg


def cmd_sft(args) -> None:
    from gptjax.rlhf.sft import SFTConfig, run_sft

    s = run_sft(args.workdir, sft_cfg=_with(SFTConfig(), args, "init_from", "lora_rank"))
    print(
        f"sft done: loss {s['sft/loss']:.4f}, held-out loss {s['sft/heldout_loss']:.4f}; "
        f"workdir {args.workdir}"
    )


def cmd_reward(args) -> None:
    from gptjax.rlhf.reward import RewardConfig, run_reward

    rm_cfg = _with(RewardConfig(), args, "init_from", "lora_rank")
    s = run_reward(args.workdir, args.sft_workdir, rm_cfg=rm_cfg)
    print(
        f"reward model done: held-out accuracy {s['reward/heldout_accuracy']:.3f}; "
        f"workdir {args.workdir}"
    )


def cmd_ppo(args) -> None:
    from gptjax.rlhf.pipeline import run_ppo
    from gptjax.rlhf.ppo import PPOConfig

    names = ("init_from", "critic_init_from", "algo", "group_size", "lora_rank")
    ppo_cfg = _with(PPOConfig(), args, *names)
    s = run_ppo(args.workdir, args.sft_workdir, args.reward_workdir, ppo_cfg=ppo_cfg)
    print(json.dumps(s, indent=2))


def cmd_dpo(args) -> None:
    from gptjax.rlhf.dpo import DPOConfig, run_dpo

    s = run_dpo(args.workdir, args.sft_workdir, dpo_cfg=_with(DPOConfig(), args, "lora_rank"))
    print(
        f"dpo done: held-out loss {s['heldout/loss']:.4f} (from {s['heldout/loss_start']:.4f}), "
        f"implicit-reward accuracy {s['heldout/accuracy']:.3f}; workdir {args.workdir}"
    )


def cmd_align_study(args) -> None:
    from gptjax.rlhf.study import run_study

    s = run_study(args.workdir)
    print(s["markdown"], end="")
    plots = ", ".join(s["plots"].values())
    print(f"table: {os.path.join(args.workdir, 'study.md')}; plots: {plots}")


def cmd_rlhf(args) -> None:
    from gptjax.rlhf.pipeline import run_rlhf

    s = run_rlhf(args.workdir, init_from=args.init_from)
    keys = (
        "reward/heldout_accuracy",
        "ppo/gold_reward_start",
        "ppo/gold_reward_start_std",
        "ppo/gold_reward_end",
        "ppo/kl_end",
        "ppo/kl_target",
        "ppo/ptx_lm_loss_start",
        "ppo/ptx_lm_loss_end",
        "wall_s",
    )
    print(json.dumps({k: s.get(k) for k in keys}, indent=2))
    print(f"summary: {os.path.join(args.workdir, 'summary.json')}; plot: {s['plot']}")


def cmd_chat(args) -> None:
    from gptjax.rlhf import chat
    from gptjax.rlhf.sft import load_policy

    if args.num_beams > 1:
        raise ValueError("gptjax chat samples replies; --num_beams is not supported here")
    cfg, params, tokenizer = load_policy(args.workdir)
    interactive = sys.stdin.isatty() and not args.prompt
    if interactive:
        print("Talk to the policy; an empty line is skipped, /quit ends.", flush=True)
    lines = [args.prompt] if args.prompt else _read_lines(interactive)
    chat.chat_loop(
        cfg,
        params,
        tokenizer,
        lines,
        sys.stdout,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        repetition_penalty=args.repetition_penalty,
    )


def _read_lines(interactive: bool):
    while True:
        if interactive:
            print("Human: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def _init_from(parser, what: str) -> None:
    parser.add_argument(
        "--init_from",
        default=None,
        help=f"a workdir to start from: {what}; params only, fresh optimizer, step 0; "
        "ignored when --workdir already holds the finished stage",
    )


def _lora(parser) -> None:
    parser.add_argument(
        "--lora_rank",
        type=int,
        default=None,
        help="train rank-r LoRA adapters of the attention and MLP kernels instead of every "
        "param (the stage config's lora_rank; 0 = full training); the merged model is saved",
    )


def register(subparsers, common, sampling) -> dict:
    """Add the RLHF subcommands; returns {name: fn(args)} for main.py."""
    # Register the gin configurables (SFTConfig, RewardConfig, PPOConfig, make_task) before
    # main.py parses the gin files.
    from gptjax.rlhf import dpo, pipeline, ppo, reward, sft, study, tasks  # noqa: F401

    p = subparsers.add_parser("sft", help="stage 1: supervised fine-tuning (prompt-masked loss)")
    common(p)
    _lora(p)
    _init_from(p, "the policy's params and tokenizer (default: pretrain from scratch)")
    p = subparsers.add_parser("reward", help="stage 2: reward model on ranked comparisons")
    common(p)
    _lora(p)
    p.add_argument("--sft_workdir", required=True, help="the policy whose samples are ranked")
    _init_from(p, "the RM trunk's params, a fresh head (default: --sft_workdir)")
    p = subparsers.add_parser("ppo", help="stage 3: PPO(-ptx) against the reward model")
    common(p)
    _lora(p)
    p.add_argument("--sft_workdir", required=True, help="KL reference (and default policy init)")
    p.add_argument("--reward_workdir", required=True, help="reward model (and critic init)")
    _init_from(p, "the policy's starting params (default: --sft_workdir)")
    p.add_argument(
        "--algo",
        choices=("ppo", "rloo", "grpo"),
        default=None,
        help="ppo (GAE + critic, the default) or the critic-free rloo / grpo (PPOConfig.algo)",
    )
    p.add_argument(
        "--group_size",
        type=int,
        default=None,
        help="K replies per prompt for rloo / grpo (PPOConfig.group_size, default 4)",
    )
    p.add_argument(
        "--critic_init_from",
        default=None,
        help="workdir of the value model's start: a reward model, or any model's trunk with "
        "a fresh head (default: --reward_workdir)",
    )
    p = subparsers.add_parser(
        "dpo", help="DPO (or IPO, DPOConfig.loss_type) on the reward model's comparison data"
    )
    common(p)
    _lora(p)
    p.add_argument("--sft_workdir", required=True, help="the starting policy and reference")
    p = subparsers.add_parser(
        "rlhf",
        help="SFT -> reward model -> PPO, into WORKDIR/{sft,reward,"
        "ppo} with WORKDIR/summary.json and a plot",
    )
    common(p)
    _init_from(p, "SFT's starting params and tokenizer (default: pretrain from scratch)")
    p = subparsers.add_parser(
        "align-study",
        help="PPO, PPO-ptx, DPO, RLOO, GRPO and best-of-n from one SFT policy and reward model: "
        "WORKDIR/study.md, study.json, gold_vs_kl.png, overoptimization.png",
    )
    common(p)
    p = subparsers.add_parser("chat", help="talk to a trained policy (stdin lines, pipes too)")
    common(p)
    sampling(p)
    p.set_defaults(max_new_tokens=64, temperature=0.7)
    return {
        "sft": cmd_sft,
        "reward": cmd_reward,
        "ppo": cmd_ppo,
        "dpo": cmd_dpo,
        "rlhf": cmd_rlhf,
        "align-study": cmd_align_study,
        "chat": cmd_chat,
    }
