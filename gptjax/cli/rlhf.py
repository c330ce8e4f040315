"""`gptjax sft | reward | ppo | rlhf | chat`: the InstructGPT stages from the command line.

main.py finds this module through its PLUGINS list, parses the gin files before calling a
command, and turns ValueError / FileNotFoundError into one-line errors.
"""

from __future__ import annotations

import json
import os
import sys


def cmd_sft(args) -> None:
    from gptjax.rlhf.sft import run_sft

    s = run_sft(args.workdir)
    print(
        f"sft done: loss {s['sft/loss']:.4f}, held-out loss {s['sft/heldout_loss']:.4f}; "
        f"workdir {args.workdir}"
    )


def cmd_reward(args) -> None:
    from gptjax.rlhf.reward import run_reward

    s = run_reward(args.workdir, args.sft_workdir)
    print(
        f"reward model done: held-out accuracy {s['reward/heldout_accuracy']:.3f}; "
        f"workdir {args.workdir}"
    )


def cmd_ppo(args) -> None:
    from gptjax.rlhf.pipeline import run_ppo

    s = run_ppo(args.workdir, args.sft_workdir, args.reward_workdir)
    print(json.dumps(s, indent=2))


def cmd_rlhf(args) -> None:
    from gptjax.rlhf.pipeline import run_rlhf

    s = run_rlhf(args.workdir)
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


def register(subparsers, common, sampling) -> dict:
    """Add the RLHF subcommands; returns {name: fn(args)} for main.py."""
    # Register the gin configurables (SFTConfig, RewardConfig, PPOConfig, make_task) before
    # main.py parses the gin files.
    from gptjax.rlhf import pipeline, ppo, reward, sft, tasks  # noqa: F401

    p = subparsers.add_parser("sft", help="stage 1: supervised fine-tuning (prompt-masked loss)")
    common(p)
    p = subparsers.add_parser("reward", help="stage 2: reward model on ranked comparisons")
    common(p)
    p.add_argument("--sft_workdir", required=True, help="the SFT workdir to start from")
    p = subparsers.add_parser("ppo", help="stage 3: PPO(-ptx) against the reward model")
    common(p)
    p.add_argument("--sft_workdir", required=True, help="policy init and KL reference")
    p.add_argument("--reward_workdir", required=True, help="reward model (and critic init)")
    p = subparsers.add_parser(
        "rlhf",
        help="SFT -> reward model -> PPO, into WORKDIR/{sft,reward,"
        "ppo} with WORKDIR/summary.json and a plot",
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
        "rlhf": cmd_rlhf,
        "chat": cmd_chat,
    }
