"""Regenerate notebooks/04_rlhf.ipynb (cells without outputs): python tools/make_rlhf_notebook.py"""

from notebook_cells import COLAB, nb  # tools/ is on sys.path when run as a script

nb(
    [
        (
            "md",
            """# 04 · RLHF: SFT → reward model → PPO, offline

InstructGPT's three stages on a task small enough for a CPU, with the same functions that
`gptjax rlhf --gin_file=experiments/rlhf/quickstart.gin` runs. The "human labeler" is a program:
the human asks about a topic, the assistant answers *"the sea is calm and grim."*, and the
**gold reward** is the mean sentiment of the adjectives (+1 positive, −1 negative, 0 neutral).
PPO never sees the gold reward, only a reward model trained on rankings of it, so we can watch
what RLHF is for: the gold reward rises while the KL from the SFT model stays near a target.

Default size: `experiments/rlhf/quickstart.gin` (a 2-layer GPT; a few minutes on a laptop CPU).
With `GPTJAX_NOTEBOOK_STEPS` set (the test suite sets 12) every stage shrinks to about a minute;
the numbers are then noise, not results.""",
        ),
        ("code", COLAB),
        (
            "code",
            """import os, tempfile
import jax, numpy as np
import matplotlib.pyplot as plt
from gptjax.cli import main as cli
from gptjax.training.metrics import read_metrics
from gptjax.rlhf import chat, pipeline, ppo, reward, sft, tasks  # registers the gin configurables

STEPS = int(os.environ.get("GPTJAX_NOTEBOOK_STEPS", 0))  # 0: the quickstart's own sizes
bindings = ["SFTConfig.log_every = 10", "RewardConfig.log_every = 10"]
if STEPS:
    log_every, warmup = max(1, STEPS // 4), max(1, STEPS // 4)
    bindings += [
        f"SFTConfig.pretrain_steps = {STEPS}", f"SFTConfig.steps = {STEPS}",
        "SFTConfig.batch_size = 16", "SFTConfig.n_demonstrations = 256",
        f"SFTConfig.log_every = {log_every}", f"sft/OptimizerConfig.warmup_steps = {warmup}",
        "RewardConfig.n_prompts = 32", "RewardConfig.heldout_prompts = 16",
        f"RewardConfig.steps = {STEPS}", "RewardConfig.batch_size = 8",
        "RewardConfig.norm_samples = 64", f"RewardConfig.log_every = {log_every}",
        f"reward/OptimizerConfig.warmup_steps = {warmup}",
        f"PPOConfig.steps = {max(2, STEPS // 4)}", "PPOConfig.batch_size = 16",
        "PPOConfig.n_prompts = 64", "PPOConfig.eval_prompts = 16",
        "ppo/OptimizerConfig.warmup_steps = 1",
    ]
cli.parse_gin(["rlhf/quickstart.gin"], bindings)
WORKDIR = tempfile.mkdtemp(prefix="gptjax_rlhf_")
DIRS = {stage: os.path.join(WORKDIR, stage) for stage in ("sft", "reward", "ppo")}
task = tasks.make_task()
print(WORKDIR)""",
        ),
        (
            "md",
            """## Stage 1 · Supervised fine-tuning

InstructGPT fine-tuned GPT-3 on ~13k prompts with demonstrations written by labelers (16 epochs,
cosine decay). Here a short plain-text "pretraining" phase on the task's world comes first (we
have no pretrained model to start from), then SFT on demonstrations whose adjectives are chosen
uniformly, so the SFT policy starts at gold reward ≈ 0 with a wide spread: room for RLHF.

The SFT loss counts **response tokens only** (a `loss_mask` over the targets): the model should
learn to answer, not to predict prompts that PPO never samples.""",
        ),
        (
            "code",
            """s_sft = sft.run_sft(DIRS["sft"])
print({k: round(v, 4) for k, v in s_sft.items() if isinstance(v, float)})

rows = read_metrics(DIRS["sft"])
for name in ("pretrain/loss", "sft/loss"):
    pts = [(r["step"], r[name]) for r in rows if name in r]
    plt.plot(*zip(*pts), marker=".", label=name)
plt.xlabel("step"); plt.ylabel("loss (nats/token)"); plt.legend(); plt.title("stage 1")
plt.show()""",
        ),
        (
            "md",
            """## Stage 2 · Reward model

InstructGPT's labelers ranked K = 4…9 responses per prompt; all C(K, 2) comparisons of a prompt
form one batch element (batch of 64 prompts), so each completion is seen once per step rather
than in many separate pairs, which overfits. The loss is
−1/C(K,2) · Σ log σ(r(x, y_better) − r(x, y_worse)).

Here the SFT policy samples K = 4 replies per prompt and the gold reward ranks them (ties form no
pair). The RM is the SFT trunk with a scalar head read at the last real token (the end-of-turn
token). Afterwards a gain and bias make the SFT policy's own samples score mean 0, std 1, so PPO's
KL coefficient means the same whatever the RM's raw scale.""",
        ),
        (
            "code",
            """s_rm = reward.run_reward(DIRS["reward"], DIRS["sft"])
print({k: round(v, 4) for k, v in s_rm.items() if isinstance(v, float)})

rows = [r for r in read_metrics(DIRS["reward"]) if "reward/loss" in r]
steps = [r["step"] for r in rows]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot(steps, [r["reward/loss"] for r in rows], marker=".")
axes[0].set_title("ranking loss (train batch)")
axes[1].plot(steps, [r["reward/accuracy"] for r in rows], marker=".", label="train batch")
axes[1].axhline(s_rm["reward/heldout_accuracy_start"], color="gray", ls=":", label="held-out, start")
axes[1].axhline(s_rm["reward/heldout_accuracy"], color="C1", ls="--", label="held-out, end")
axes[1].set_title("pairwise accuracy"); axes[1].legend()
for ax in axes:
    ax.set_xlabel("RM step"); ax.grid(alpha=0.3)
plt.tight_layout(); plt.show()""",
        ),
        (
            "md",
            """## Stage 3 · PPO against the reward model

The policy starts as the SFT model and the value function as the RM (InstructGPT). Each
iteration samples replies (temperature 0.7, stopping at the end-of-turn token), scores them with
the frozen RM at the last token, and pays a per-token penalty −β·log(π/π_SFT); InstructGPT used a
fixed β = 0.02, here β adapts (Ziegler et al.) towards a KL target of a few nats per reply. GAE
(γ = 1, λ = 0.95), whitened advantages and the clipped PPO losses then update the policy and
critic for 4 epochs per batch. (PPO-ptx, InstructGPT's γ = 27.8 pretraining term, is
`experiments/rlhf/ptx.gin`.)

Watch the **gold reward** (which PPO never sees) follow the **RM score** up while the **KL**
climbs towards its target and β adjusts.""",
        ),
        (
            "code",
            """s_ppo = pipeline.run_ppo(DIRS["ppo"], DIRS["sft"], DIRS["reward"])
for k in ("ppo/gold_reward_start", "ppo/gold_reward_end", "ppo/gold_reward_gain_in_start_std",
          "ppo/kl_end", "ppo/kl_target", "ppo/stop_rate_end", "ppo/wall_s"):
    print(f"{k:36} {s_ppo[k]:.3f}")

rows = read_metrics(DIRS["ppo"])
it = [r["step"] for r in rows]
panels = (("ppo/gold_reward", "gold reward (the labeler program)"),
          ("objective/scores", "RM score (normalised)"),
          ("objective/kl", "KL(policy ‖ SFT), nats per reply"),
          ("objective/kl_coef", "β (adaptive KL coefficient)"))
fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
for ax, (key, title) in zip(axes, panels):
    ax.plot(it, [r[key] for r in rows], marker=".")
    ax.set_title(title); ax.set_xlabel("PPO iteration"); ax.grid(alpha=0.3)
axes[0].axhline(s_ppo["ppo/gold_reward_start"], color="gray", ls=":", label="SFT (eval)")
axes[0].axhline(s_ppo["ppo/gold_reward_end"], color="C1", ls="--", label="PPO (eval)")
axes[0].legend()
axes[2].axhline(s_ppo["ppo/kl_target"], color="gray", ls="--", label="target"); axes[2].legend()
plt.tight_layout(); plt.show()""",
        ),
        (
            "md",
            """## Replies before and after PPO

The same prompts and the same random key, sampled at PPO's temperature from the SFT policy and
from the PPO policy, with each reply's gold reward.""",
        ),
        (
            "code",
            """ppo_cfg = ppo.PPOConfig()  # the gin-bound sampling settings PPO trained with
prompts = tasks.prompts(task, 8, seed=123)

def replies(workdir):
    cfg, params, tokenizer = sft.load_policy(workdir)
    ids = [chat.prompt_ids(tokenizer, p) for p in prompts]
    width = max(map(len, ids))
    out = chat.generate_replies(cfg, params, tokenizer, ids, width, key=jax.random.key(0),
                                max_new_tokens=ppo_cfg.max_new_tokens,
                                temperature=ppo_cfg.temperature)
    return [chat.decode_reply(tokenizer, row[width:]) for row in out["tokens"]]

before, after = replies(DIRS["sft"]), replies(DIRS["ppo"])
for p, b, a in zip(prompts, before, after):
    print(f"Human: {p[-1][1]}")
    print(f"  SFT {task.gold_reward(p, b):+.2f}  {b}")
    print(f"  PPO {task.gold_reward(p, a):+.2f}  {a}")
gold = lambda rs: np.mean([task.gold_reward(p, r) for p, r in zip(prompts, rs)])
print(f"mean gold reward on these prompts: SFT {gold(before):+.3f}, PPO {gold(after):+.3f}")""",
        ),
        (
            "md",
            """The PPO workdir is a normal policy workdir: talk to it with
`gptjax chat --workdir=<WORKDIR>/ppo`, or run all three stages with
`gptjax rlhf --gin_file=experiments/rlhf/quickstart.gin --workdir=/tmp/rlhf`, which also writes
`summary.json` and `ppo_curves.png`. Things to try: a lower `PPOConfig.kl_target` (less reward,
less drift), `adaptive_kl = False` with InstructGPT's β = 0.02, or PPO-ptx with
`experiments/rlhf/ptx.gin` and compare `ppo/ptx_lm_loss_end`.""",
        ),
    ],
    "notebooks/04_rlhf.ipynb",
)
