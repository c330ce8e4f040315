"""Regenerate notebooks/0{1,2,3,5}_*.ipynb (cells without outputs): python tools/make_notebooks.py"""

from notebook_cells import COLAB, nb  # tools/ is on sys.path when run as a script

nb(
    [
        (
            "md",
            """# 01 · Quickstart: train a small GPT, watch the loss, sample

A nano GPT trained on the Python standard library source (offline, on any machine), using the
same `gptjax.evals.hooks.train_with_defaults` that `gptjax train` runs (the loop plus its sample previews). Default size: a couple of minutes on a laptop
CPU. On a Colab GPU/TPU runtime raise `STEPS` and the model size.""",
        ),
        ("code", COLAB),
        (
            "code",
            """import os, tempfile
import matplotlib.pyplot as plt
from gptjax.cli import main as cli
from gptjax.evals.hooks import train_with_defaults as train
from gptjax.training.metrics import read_metrics

STEPS = int(os.environ.get("GPTJAX_NOTEBOOK_STEPS", 200))  # the test suite sets a small value
WORKDIR = tempfile.mkdtemp(prefix="gptjax_quickstart_")
cli.parse_gin(["quickstart.gin"], [f"STEPS = {STEPS}", f"WARMUP_STEPS = {max(1, min(10, STEPS // 2))}",
                                   f"TrainConfig.eval_every = {STEPS}",
                                   f"TrainConfig.checkpoint_every = {STEPS}",
                                   "TrainConfig.log_every = 5"])
summary = train(WORKDIR)
print({k: summary[k] for k in ("end_step", "train/loss", "eval/loss")})""",
        ),
        (
            "md",
            "The loss curve, read back from `metrics.jsonl` (also in TensorBoard under `WORKDIR/tensorboard`).",
        ),
        (
            "code",
            """rows = [r for r in read_metrics(WORKDIR) if "train/loss" in r]
plt.plot([r["step"] for r in rows], [r["train/loss"] for r in rows])
plt.xlabel("step"); plt.ylabel("train loss (nats/token)"); plt.title("quickstart")
plt.show()""",
        ),
        (
            "md",
            "Sample from the trained model: the same code path as `gptjax sample --workdir=...`.",
        ),
        (
            "code",
            """import jax, numpy as np
from gptjax.inference import sampling
from gptjax.training.workdir import load_run

cfg, params, tokenizer, configs, step = load_run(WORKDIR)
prompt = tokenizer.encode("def ")
out = sampling.generate(cfg, params, np.array([prompt] * 2), key=jax.random.key(0),
                      max_new_tokens=60, temperature=0.8, top_k=50)
for row in np.asarray(out.tokens):
    print("def " + tokenizer.decode(row[len(prompt):].tolist()))
    print("-" * 40)""",
        ),
    ],
    "notebooks/01_quickstart.ipynb",
)

nb(
    [
        (
            "md",
            """# 02 · Attention and the KV cache

What causal attention looks like, why the cache gives the same answer as the full forward, and
what the sampling knobs do to a distribution. Everything here runs on a tiny random model.""",
        ),
        ("code", COLAB),
        (
            "code",
            """import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from gptjax.models import attention
from gptjax.models import gpt
from gptjax.models import layers
from gptjax.inference import sampling
from gptjax.config import ModelConfig

cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=97, max_len=64)
params = gpt.init_params(cfg, jax.random.key(0))
tokens = jax.random.randint(jax.random.key(1), (1, 24), 0, cfg.vocab_size)""",
        ),
        (
            "md",
            "## Masks as pictures\nDense causal attention (GPT-2) and the locally banded layers GPT-3 alternates with it, plus a left-padded row.",
        ),
        (
            "code",
            """dense = attention.causal_mask(24)[0, 0]
banded = attention.causal_mask(24, window=6)[0, 0]
valid = jnp.arange(24)[None] >= 5        # 5 pad tokens on the left
padded = attention.make_mask(jnp.arange(24), valid)[0, 0]
fig, axes = plt.subplots(1, 3, figsize=(10, 3.5))
for ax, m, title in zip(axes, (dense, banded, padded), ("causal", "banded (window 6)", "left-padded")):
    ax.imshow(np.asarray(m), cmap="Blues"); ax.set_title(title); ax.set_xlabel("key"); ax.set_ylabel("query")
plt.tight_layout(); plt.show()""",
        ),
        (
            "md",
            "## Attention probabilities of one head\nComputed with the readable einsum path of `gptjax.models.attention`.",
        ),
        (
            "code",
            """p = jax.tree.map(lambda a: a[0], params["h"])           # layer 0
x = layers.layer_norm(p["ln_1"], gpt.embed(cfg, params, tokens, jnp.arange(24)[None]), 1e-5)
qkv = jnp.einsum("btd,dcnh->btcnh", x, p["attn"]["c_attn"]["kernel"]) + p["attn"]["c_attn"]["bias"]
q, k = qkv[:, :, 0], qkv[:, :, 1]
logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(cfg.head_dim)
probs = jax.nn.softmax(jnp.where(dense, logits, -1e30), axis=-1)
plt.imshow(np.asarray(probs[0, 0]), cmap="viridis"); plt.colorbar(); plt.title("layer 0, head 0")
plt.show()""",
        ),
        (
            "md",
            "## The KV cache gives the full forward's logits\nPrefill 8 tokens, then decode one token at a time; compare every step with one full forward pass.",
        ),
        (
            "code",
            """full = gpt.forward(cfg, params, tokens)
cache = layers.init_cache(cfg, 1, 24)
valid = jnp.zeros((1, 24), bool).at[:, :8].set(True)
logits, cache = gpt.forward_cached(cfg, params, tokens[:, :8], cache, positions_BT=jnp.arange(8)[None],
                                     kv_valid_BS=valid, cache_index=0)
errors = [float(jnp.abs(logits - full[:, :8]).max())]
for i in range(8, 24):
    valid = valid.at[:, i].set(True)
    logits, cache = gpt.forward_cached(cfg, params, tokens[:, i:i + 1], cache,
                                         positions_BT=jnp.array([[i]]), kv_valid_BS=valid, cache_index=i)
    errors.append(float(jnp.abs(logits[:, 0] - full[:, i]).max()))
print("max |cached - full| over all steps:", max(errors))
assert max(errors) < 1e-4""",
        ),
        (
            "md",
            "## Sampling knobs\nTemperature flattens or sharpens; top-k and top-p cut the tail.",
        ),
        (
            "code",
            """logits = jnp.array([[3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]])
variants = {
    "T=1": jax.nn.softmax(logits),
    "T=0.5": jax.nn.softmax(logits / 0.5),
    "T=2": jax.nn.softmax(logits / 2.0),
    "top-k 3": jax.nn.softmax(sampling.top_k_filter(logits, 3)),
    "top-p 0.8": jax.nn.softmax(sampling.top_p_filter(logits, 0.8)),
}
fig, axes = plt.subplots(1, len(variants), figsize=(13, 2.5), sharey=True)
for ax, (name, pr) in zip(axes, variants.items()):
    ax.bar(range(8), np.asarray(pr[0])); ax.set_title(name)
plt.tight_layout(); plt.show()""",
        ),
    ],
    "notebooks/02_attention_and_kv_cache.ipynb",
)

nb(
    [
        (
            "md",
            """# 03 · An ablation sweep: pre-LN (GPT-2) vs post-LN (GPT-1)

A sweep is a gin file naming a base experiment, the axes that vary and the seeds
(`experiments/sweeps/*.gin`). `gptjax sweep` runs every variant, then writes `results.csv`
(seed mean, std and a Welch p-value against the baseline) and plots. Here: a small version of
`experiments/sweeps/ln_placement.gin`, run in-process.""",
        ),
        ("code", COLAB),
        (
            "code",
            """import os, tempfile
import gin
from gptjax.cli import main as cli
from gptjax.research import sweep as sweep_lib
STEPS = int(os.environ.get("GPTJAX_NOTEBOOK_STEPS", 120))  # the test suite sets a small value
SEEDS = [0] if STEPS < 50 else [0, 1]
cli.parse_gin(["sweeps/ln_placement.gin"], [f"Sweep.seeds = {SEEDS}"])
sweep = sweep_lib.Sweep()
extra = [f"STEPS = {STEPS}", f"WARMUP_STEPS = {max(1, STEPS // 10)}", "TrainConfig.log_every = 5",
         f"TrainConfig.eval_every = {STEPS}", f"TrainConfig.checkpoint_every = {STEPS}"]
WORKDIR = tempfile.mkdtemp(prefix="gptjax_sweep_")
for line in sweep_lib.print_commands(sweep, WORKDIR, extra):
    print(line)""",
        ),
        (
            "md",
            "Run it (each variant and seed is a full `gptjax train` in `WORKDIR/<variant>/seed_<k>/`):",
        ),
        (
            "code",
            """rows = sweep_lib.run_sweep(sweep, WORKDIR, extra)
print(sweep_lib.markdown_table(rows))""",
        ),
        (
            "code",
            """from IPython.display import Image, display
display(Image(os.path.join(WORKDIR, "loss_curves.png")))
display(Image(os.path.join(WORKDIR, "final_metric.png")))""",
        ),
        (
            "md",
            """With 3 seeds and 250 steps (`gptjax sweep --gin_file=experiments/sweeps/ln_placement.gin`), post-LN
got stuck near loss 6 in two of three seeds at this learning rate while pre-LN trained smoothly:
eval loss 4.70 ± 0.02 vs 5.95 ± 0.47 (Welch p = 0.04). Other ready sweeps: positions
(learned / sinusoidal / rotary), sparse_attention, tied_embeddings, scaling (with a power-law fit).""",
        ),
    ],
    "notebooks/03_ablation_sweep.ipynb",
)

nb(
    [
        (
            "md",
            """# 05 · Sharding: a mesh on 8 fake devices

The same code runs on one CPU, eight fake CPU devices (here), a GPU, or a TPU pod: only the
mesh changes. Every parameter has logical axis names; a rules preset maps them to the mesh axes
`('data', 'fsdp', 'tensor')`. On a real TPU runtime, skip the `XLA_FLAGS` line.""",
        ),
        ("code", COLAB),
        (
            "code",
            """import os
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax starts
import jax, numpy as np
print(jax.devices())""",
        ),
        (
            "code",
            """from gptjax.models import gpt
from gptjax.parallel import mesh as sharding
from gptjax.parallel import logical
from gptjax.config import ModelConfig

cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, d_ff=256, vocab_size=128, max_len=32)
mesh = sharding.make_mesh(sharding.MeshConfig(shape={"data": 1, "fsdp": 4, "tensor": 2}, rules="fsdp_tp"))
rules = logical.logical_axis_rules("fsdp_tp")
print(mesh)
for name, rule in rules: print(f"{name:>8} -> {rule}")""",
        ),
        ("md", "Each parameter's logical names and the PartitionSpec the rules give it:"),
        (
            "code",
            """axes = gpt.param_axes(cfg)
specs = sharding.param_shardings(cfg, mesh, rules)
for (path, names), spec in zip(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)),
                               jax.tree.leaves(specs)):
    print(f"{jax.tree_util.keystr(path):45} {str(names):45} {spec.spec}")""",
        ),
        ("md", "Place the parameters and look at how one matrix is laid out over the 8 devices:"),
        (
            "code",
            """params = jax.device_put(gpt.init_params(cfg, jax.random.key(0)), specs)
jax.debug.visualize_array_sharding(params["h"]["mlp"]["c_fc"]["kernel"][0])""",
        ),
        (
            "md",
            "A mesh that does not divide the model fails before anything compiles, saying what to change:",
        ),
        (
            "code",
            """try:
    bad = sharding.make_mesh(sharding.MeshConfig(shape={"data": 1, "fsdp": 1, "tensor": 8}, rules="tp"))
    sharding.check_divisible(cfg, bad, logical.logical_axis_rules("tp"), 8)
except ValueError as e:
    print(e)""",
        ),
        ("md", "Sharded equals unsharded: the same forward pass on the mesh and on one device."),
        (
            "code",
            """tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
with logical.use_mesh(mesh, rules):
    sharded = jax.jit(lambda p, t: gpt.forward(cfg, p, t))(params, tokens)
single = gpt.forward(cfg, jax.device_get(params), tokens)
print("max difference:", float(abs(sharded - single).max()))
assert np.allclose(sharded, single, atol=1e-5)""",
        ),
    ],
    "notebooks/05_sharding.ipynb",
)
