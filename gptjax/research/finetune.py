"""GPT-1 fine-tuning: linear task heads on any family's trunk, L3 = L2 + λ·L1.

Radford et al. 2018, section 3.3: every task becomes one or more token sequences framed by
learned special tokens — `<start>`, `<delim>` between segments, `<extract>` at the end — and a
linear head reads the transformer's final state at `<extract>`:

    classification   <start> text <extract>                                   -> softmax(W h)
    entailment       <start> premise <delim> hypothesis <extract>            -> softmax(W h)
    similarity       <start> a <delim> b <extract>, <start> b <delim> a <extract>
                     (no inherent order: both orderings, states summed)  -> softmax(W (h1 + h2))
    multiple choice  <start> context <delim> answer_k <extract>, k = 1..K     -> softmax_k(w h_k)

The transforms and demo tasks are in `gptjax.research.gpt1_tasks`. The tokenizers reserve the
three special ids; their embedding rows are learned in fine-tuning.
The loss adds the language-model loss on the same sequences, L3 = L2 + λ·L1 with λ = 0.5,
which GPT-1 found improves generalisation and speeds convergence.

The same transforms and heads serve every model family; the config's type picks the trunk:

    ModelConfig (GPT)     causal trunk; head at `<extract>`; L1 = next-token LM loss.
    EncoderConfig (BERT)  bidirectional, padding masked, token types 0 up to and including the
                          first `<delim>`, 1 after; head at position 0 (`<start>` plays [CLS]).
    Seq2SeqConfig (BART)  the sequence to the encoder (padding masked) and, teacher-forced, to
                          the causal decoder; head at the decoder's `<extract>` state.

L1 is 0 for the encoder and the encoder–decoder: both see the next token (bidirectionally, or
through cross-attention), so next-token prediction teaches them nothing.

Batches hold `tokens` (B, C, T), right-padded, `extract` (B, C) positions of `<extract>`,
`segment` (B, C, T) token types, `lm_mask` (B, C, T-1) which next-token targets count for L1,
and `label` (B,). Right padding is invisible to every family: causal trunks never look ahead,
and the encoders mask every position after `<extract>`.

The trunk starts from the pretrained workdir's params (any workdir: a `gptjax train` run, an
imported GPT-2; `workdir.init_params_from`, restored straight onto the fine-tuning mesh), the
task head is new (`init_head`), and the optimizer starts fresh at step 0. An `out_dir` that
already holds fine-tuned params is a finished run: its summary is returned, nothing is redone.

With `FinetuneConfig.lora_rank` > 0 a GPT or BERT trunk trains as low-rank adapters
(`models.lora`) and the head fully, the optimizer state covering those two only; the saved
params are the merged ones, as a full fine-tuning run saves them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from gptjax.config import ModelConfig, Seq2SeqConfig
from gptjax.data.config import DataConfig
from gptjax.data.tokenizer import Specials
from gptjax.models import bert as encoder
from gptjax.models import family, layers, lora
from gptjax.models import gpt as model
from gptjax.models import transformer as seq2seq
from gptjax.parallel import logical
from gptjax.parallel import mesh as sharding
from gptjax.research.gpt1_tasks import (
    TASKS,
    demo_examples,
    encode_examples,
    make_batch,
)
from gptjax.training import workdir as workdir_lib
from gptjax.training.metrics import MetricWriter
from gptjax.training.optimizer import OptimizerConfig, make_optimizer
from gptjax.training.step import (
    dropout_key,
    jit_train_step,
    make_update,
    place_state,
    with_dropout_keys,
)

# ---------------------------------------------------------------------- heads


def init_head(kind: str, d_model: int, n_classes: int, key: jax.Array) -> dict:
    """W (D, n_out), b: n_out = n_classes, or 1 score per answer for multiple choice."""
    n_out = 1 if kind == "multiple_choice" else n_classes
    return {
        "kernel": 0.02 * jax.random.normal(key, (d_model, n_out), jnp.float32),
        "bias": jnp.zeros((n_out,), jnp.float32),
    }


def extract_states(
    x_BCTD: Float[Array, "B C T D"], read_BC: Int[Array, "B C"]
) -> Float[Array, "B C D"]:
    """The final hidden state each head reads (`<extract>`, or position 0 for BERT)."""
    return jnp.take_along_axis(x_BCTD, read_BC[:, :, None, None], axis=2)[:, :, 0]


# --------------------------------------------------------------------- trunks


def seq2seq_decoder_states(
    cfg: Seq2SeqConfig,
    params: dict,
    tokens_BT: Int[Array, "B T"],
    valid_BT,
    key: jax.Array | None = None,
) -> Float[Array, "B T D"]:
    """BART's classification pass: `tokens_BT` through the encoder (pads masked), then the
    same tokens teacher-forced through the causal decoder; the decoder's final states.

    `seq2seq.forward` stopping before the logits, its dropout keys split the same way.
    """
    k_enc, k_dec = (None, None) if key is None else tuple(jax.random.split(key))
    cross = seq2seq.all_cross_kv(
        cfg, params, seq2seq.encode(cfg, params, tokens_BT, valid_BT, k_enc)
    )
    return seq2seq.decode_hidden(cfg, params, tokens_BT, cross, valid_BT, key=k_dec)[0]


def _decoder_states(cfg, trunk, tokens_NT, extract_N, segment_NT=None, key=None):
    return model.hidden_states(cfg, trunk, tokens_NT, key=key), extract_N


def _valid(tokens_NT, extract_N):
    return jnp.arange(tokens_NT.shape[1])[None, :] <= extract_N[:, None]


def _seq2seq_states(cfg, trunk, tokens_NT, extract_N, segment_NT=None, key=None):
    valid_NT = _valid(tokens_NT, extract_N)
    return seq2seq_decoder_states(cfg, trunk, tokens_NT, valid_NT, key), extract_N


def _encoder_states(cfg, trunk, tokens_NT, extract_N, segment_NT=None, key=None):
    """BERT reads its first ([CLS]) position."""
    if segment_NT is None or cfg.type_vocab_size < 2:  # one token type (RoBERTa-like)
        segment_NT = jnp.zeros_like(tokens_NT)
    x_NTD = encoder.hidden_states(
        cfg, trunk, tokens_NT, segment_ids=segment_NT, mask=_valid(tokens_NT, extract_N), key=key
    )
    return x_NTD, jnp.zeros_like(extract_N)


@dataclasses.dataclass(frozen=True)
class Trunk:
    """How a family's trunk feeds a task head: its final states and its own LM head."""

    states: Callable  # (cfg, trunk, tokens_NT, extract_N, segment_NT, key) -> (x_NTD, read_N)
    lm_head: Callable  # (cfg, trunk, x_NTD) -> logits_NTV


TRUNKS = {
    family.DECODER: Trunk(_decoder_states, model.unembed),
    family.ENCODER: Trunk(_encoder_states, encoder.mlm_head),
    family.SEQ2SEQ: Trunk(_seq2seq_states, seq2seq.logits),
}


def trunk_states(
    cfg: ModelConfig,
    trunk: dict,
    tokens_NT: Int[Array, "N T"],
    extract_N: Int[Array, " N"],
    segment_NT: Int[Array, "N T"] | None = None,
    key: jax.Array | None = None,
) -> tuple[Float[Array, "N T D"], Int[Array, " N"]]:
    """(final states, the position each head reads) for right-padded sequences; without
    `segment_NT` (or with one token type) the encoder sees token type 0 throughout."""
    return TRUNKS[family.family_of(cfg)].states(cfg, trunk, tokens_NT, extract_N, segment_NT, key)


def lm_logits(cfg: ModelConfig, trunk: dict, x_NTD) -> Float[Array, "N T V"]:
    """The trunk's own LM head: next-token logits (GPT, the seq2seq decoder), or BERT's
    masked-LM logits (each position's prediction of its own token)."""
    return TRUNKS[family.family_of(cfg)].lm_head(cfg, trunk, x_NTD)


def head_logits(kind: str, head: dict, h_BCD: Float[Array, "B C D"]) -> Float[Array, "B K"]:
    """Class logits (K = classes), or one logit per answer for multiple choice (K = C)."""
    h_BCD = h_BCD.astype(jnp.float32)
    if kind == "multiple_choice":
        return (h_BCD @ head["kernel"])[..., 0] + head["bias"][0]
    h_BD = h_BCD.sum(axis=1)  # similarity: the two orderings' states summed (C = 1 otherwise)
    return h_BD @ head["kernel"] + head["bias"]


def forward(
    cfg: ModelConfig,
    params: dict,
    batch: dict,
    kind: str,
    *,
    clf_dropout: float = 0.0,
    key: jax.Array | None = None,
) -> tuple[Float[Array, "B K"], Float[Array, "B C T V"]]:
    """Task logits and the trunk's LM logits (`lm_logits`) from one trunk pass, for any of
    the three families; params = {'gpt': trunk params (any family), 'head': ...}."""
    b, c, t = batch["tokens"].shape
    keys = (None, None) if key is None else tuple(jax.random.split(key))
    segment = batch.get("segment")
    x_NTD, read_N = trunk_states(
        cfg,
        params["gpt"],
        batch["tokens"].reshape(b * c, t),
        batch["extract"].reshape(b * c),
        None if segment is None else segment.reshape(b * c, t),
        keys[0],
    )
    h_BCD = extract_states(x_NTD.reshape(b, c, t, -1), read_N.reshape(b, c))
    h_BCD = layers.dropout(h_BCD, clf_dropout, keys[1])
    lm_logits_NTV = lm_logits(cfg, params["gpt"], x_NTD)
    return head_logits(kind, params["head"], h_BCD), lm_logits_NTV.reshape(b, c, t, -1)


def finetune_terms(
    cfg: ModelConfig,
    params: dict,
    batch: dict,
    kind: str,
    lm_coef: float = 0.5,
    clf_dropout: float = 0.0,
    key: jax.Array | None = None,
):
    """(sums, weights, stats) of L3 = L2 + λ·L1, in `step.make_update`'s form.

    L2, the task cross-entropy, is summed over examples; λ·L1, the LM loss on the task's
    sequences, over their `lm_mask` tokens. L1 is GPT's next-token loss for the decoder-only
    family and 0 (reported as `lm_loss` = 0) for the encoder and the encoder–decoder, whose
    trunks see the next token.
    """
    logits_BK, lm_logits_BCTV = forward(cfg, params, batch, kind, clf_dropout=clf_dropout, key=key)
    l2_sum = optax.softmax_cross_entropy_with_integer_labels(logits_BK, batch["label"]).sum()
    n_examples = jnp.asarray(batch["label"].shape[0], jnp.float32)
    l1_sum, n_tokens = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    if family.family_of(cfg).causal_lm:  # unused LM logits of other families are pruned by jit
        lm_BCT = optax.softmax_cross_entropy_with_integer_labels(
            lm_logits_BCTV[:, :, :-1], batch["tokens"][:, :, 1:]
        )
        mask = batch["lm_mask"].astype(jnp.float32)
        l1_sum, n_tokens = (lm_BCT * mask).sum(), mask.sum()
    l2, l1 = l2_sum / n_examples, l1_sum / jnp.maximum(n_tokens, 1.0)
    acc = (jnp.argmax(logits_BK, -1) == batch["label"]).mean()
    stats = {"clf_loss": l2, "lm_loss": l1, "accuracy": acc}
    return {"clf": l2_sum, "lm": lm_coef * l1_sum}, {"clf": n_examples, "lm": n_tokens}, stats


def finetune_loss(
    cfg: ModelConfig,
    params: dict,
    batch: dict,
    kind: str,
    lm_coef: float = 0.5,
    clf_dropout: float = 0.0,
    key: jax.Array | None = None,
) -> tuple[Float[Array, ""], dict]:
    """L3 = L2 + λ·L1: task cross-entropy plus λ times the LM loss on the task's sequences
    (`finetune_terms` divided by its weights)."""
    _, _, stats = finetune_terms(cfg, params, batch, kind, lm_coef, clf_dropout, key)
    loss = stats["clf_loss"] + lm_coef * stats["lm_loss"]
    return loss, {"loss": loss, **stats}


# ---------------------------------------------------------------- the run


@gin.configurable
@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run. GPT-1 used lr 6.25e-5, batch 32, 3 epochs, linear decay after a
    0.2% warmup, λ = 0.5, classifier dropout 0.1 (experiments/finetune/gpt1.gin); the CPU
    demo defaults suit a nano model pretrained for a few hundred steps.

    seq_len: tokens per sequence, specials included (the model's max_len at most).
    grad_accum_steps: microbatches per step (exact: `step.make_update`).
    lora_rank: 0 trains every param; r > 0 trains rank-r adapters of the trunk's attention and
    MLP kernels (scaled by lora_alpha / r; GPT and BERT trunks) and the whole head.
    """

    task: str = "real_or_shuffled"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.01
    lm_coef: float = 0.5
    clf_dropout: float = 0.1
    n_train: int = 4000
    n_eval: int = 400
    log_every: int = 25
    seed: int = 0
    grad_accum_steps: int = 1
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"FinetuneConfig.task={self.task!r} is not one of {', '.join(TASKS)}.")
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "n_train",
            "n_eval",
            "log_every",
            "grad_accum_steps",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"FinetuneConfig.{name} must be positive.")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"FinetuneConfig.batch_size={self.batch_size} is not divisible by "
                f"grad_accum_steps={self.grad_accum_steps}."
            )
        lora.from_rank(self.lora_rank, self.lora_alpha, "FinetuneConfig")  # a negative rank raises

    @property
    def lora(self) -> lora.LoRAConfig | None:
        """The trunk's LoRA, None for full fine-tuning (lora_rank 0)."""
        return lora.from_rank(self.lora_rank, self.lora_alpha, "FinetuneConfig")


HEAD_AXES = {"kernel": ("embed", None), "bias": (None,)}  # logical axes of a task head


def param_shardings(cfg: ModelConfig, mesh, rules, lcfg: lora.LoRAConfig | None = None) -> dict:
    """The trunk sharded like pretraining (its family's logical axes; with `lcfg`, an adapted
    trunk: `mesh.lora_shardings`), the head by HEAD_AXES."""
    trunk = sharding.param_shardings(cfg, mesh, rules)
    if lcfg is not None:
        trunk = sharding.lora_shardings(lcfg, trunk, family.param_axes(cfg), mesh, rules)
    return {"gpt": trunk, "head": sharding.tree_shardings(HEAD_AXES, mesh, rules)}


def make_train_step(
    cfg: ModelConfig, kind: str, ft: FinetuneConfig, optimizer, params, mesh, rules
):
    """(step, state shardings): fine-tuning's `step.jit_train_step` over `step.make_update`
    of L3, each row with its own dropout key. Rows are split over the mesh's batch axes. With
    `ft.lora`, `params` hold an adapted trunk (`adapt_trunk`) and `optimizer` is
    `lora.freeze_frozen`'s."""
    sharding.check_divisible(cfg, mesh, rules, ft.batch_size // ft.grad_accum_steps)

    def objective(params, mb):
        return finetune_terms(cfg, params, mb, kind, ft.lm_coef, ft.clf_dropout, dropout_key(mb))

    update = with_dropout_keys(
        make_update(lora.wrap_objective(ft.lora, objective), optimizer, ft.grad_accum_steps),
        rows=lambda batch: batch["label"].shape[0],
    )
    return jit_train_step(
        update,
        optimizer,
        params,
        param_shardings(cfg, mesh, rules, ft.lora),
        (sharding.batch_sharding(mesh, rules, ndim=1),),
        mesh,
    )


def make_logits(cfg: ModelConfig, kind: str):
    """The jitted task logits `logits_fn(params, batch)` (no dropout)."""
    return jax.jit(lambda params, batch: forward(cfg, params, batch, kind)[0])


def accuracy(logits_fn, params, batches: Sequence[dict]) -> tuple[float, float]:
    """Accuracy and its binomial standard error over `batches`."""
    hits = np.concatenate(
        [np.asarray(jnp.argmax(logits_fn(params, b), -1)) == b["label"] for b in batches]
    )
    p = float(hits.mean())
    return p, float(np.sqrt(p * (1 - p) / len(hits)))


def _task_data(ft: FinetuneConfig, tokenizer, data_cfg) -> tuple[Specials, dict]:
    """The special ids and {'train', 'validation'} encoded demo examples of `ft.task`, made
    from the pretraining corpus's splits."""
    from gptjax.data.pipeline import corpus_texts

    sp, examples = Specials.of(tokenizer), {}
    for split, n in (("train", ft.n_train), ("validation", ft.n_eval)):
        texts = list(
            corpus_texts(
                data_cfg.dataset,
                data_cfg.resolved_data_dir,
                split,
                path=data_cfg.path,
                **data_cfg.corpus_split,
            )
        )
        examples[split] = encode_examples(tokenizer, demo_examples(ft.task, texts, n, ft.seed))
    return sp, examples


def _train(
    step_fn, state, examples: list, kind: str, sp: Specials, ft: FinetuneConfig, mesh, rules, writer
):
    """`ft.steps` steps on random batches of `examples`, logged under `finetune/`."""
    rng = np.random.default_rng(ft.seed)
    for s in range(1, ft.steps + 1):
        rows = rng.choice(len(examples), ft.batch_size, replace=False)
        batch = make_batch(kind, [examples[r] for r in rows], sp, ft.seq_len)
        state, metrics = step_fn(state, sharding.make_global_batch(batch, mesh, rules))
        if s % ft.log_every == 0 or s == ft.steps:
            writer.write(s, {f"finetune/{k}": float(v) for k, v in metrics.items()})
    return state


def _save(out_dir: str, params, summary: dict) -> None:
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(os.path.join(out_dir, "params")), params, force=True)
    ckpt.wait_until_finished()
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)


def _optimizer(ft: FinetuneConfig):
    """GPT-1's fine-tuning schedule: warmup, then linear decay to 0; clipping at 1 (over the
    adapters and head only with `ft.lora`: `lora.freeze_frozen`)."""
    opt_cfg = OptimizerConfig(
        peak_lr=ft.lr,
        warmup_steps=ft.warmup_steps,
        decay="linear",
        min_lr_ratio=0.0,
        weight_decay=ft.weight_decay,
        clip_norm=1.0,
    )
    optimizer = make_optimizer(opt_cfg, ft.steps)
    return optimizer if ft.lora is None else lora.freeze_frozen(optimizer)


def adapt_trunk(cfg: ModelConfig, ft: FinetuneConfig, params: dict) -> dict:
    """`{'gpt': trunk, 'head': ...}` with LoRA adapters on the trunk (`lora.attach`, key from
    `ft.seed`), or as it is without `ft.lora`."""
    if ft.lora is None:
        return params
    if family.family_of(cfg) is family.SEQ2SEQ:
        raise ValueError(
            f"FinetuneConfig.lora_rank={ft.lora_rank}: LoRA fine-tuning adapts GPT and BERT "
            "trunks, not an encoder-decoder; set lora_rank=0."
        )
    key = jax.random.fold_in(jax.random.key(ft.seed), 1)
    return {**params, "gpt": lora.attach(ft.lora, params["gpt"], key)}


def initial_params(pretrained_workdir: str, ft: FinetuneConfig, mesh, rules):
    """(source, params): the trunk from `pretrained_workdir`'s params (`init_params_from`,
    on the fine-tuning mesh; its own model config) and a fresh head for `ft.task`, whose
    key is `ft.seed`'s."""
    cfg = workdir_lib.source_config(pretrained_workdir)
    kind, n_classes = TASKS[ft.task]
    if ft.seq_len > cfg.max_len:
        raise ValueError(
            f"FinetuneConfig.seq_len={ft.seq_len} exceeds the model's max_len {cfg.max_len}."
        )
    trunk_shardings = param_shardings(cfg, mesh, rules)["gpt"]
    src = workdir_lib.init_params_from(pretrained_workdir, cfg, mesh, rules, trunk_shardings)
    head = init_head(kind, cfg.d_model, n_classes, jax.random.key(ft.seed))
    return src, {"gpt": src.params, "head": head}


def _finished(out_dir: str) -> dict | None:
    """The summary of a fine-tuning run already saved in `out_dir` (never overwritten)."""
    path = os.path.join(out_dir, "summary.json")
    if not (os.path.isdir(os.path.join(out_dir, "params")) and os.path.exists(path)):
        return None
    with open(path) as f:
        return json.load(f)


def finetune(
    pretrained_workdir: str,
    out_dir: str,
    ft: FinetuneConfig | None = None,
    mesh_cfg: sharding.MeshConfig | None = None,
) -> dict:
    """Fine-tune a pretrained run on a demo task over the mesh of `mesh_cfg` (default: gin's
    MeshConfig); metrics.jsonl, summary.json and the fine-tuned params (orbax) go to
    `out_dir` (if it holds them already, their summary is returned and nothing runs)."""
    ft, mesh_cfg = ft or FinetuneConfig(), mesh_cfg or sharding.MeshConfig()
    if (done := _finished(out_dir)) is not None:
        return done
    mesh = sharding.make_mesh(mesh_cfg)
    rules = logical.logical_axis_rules(mesh_cfg.rules)
    src, params = initial_params(pretrained_workdir, ft, mesh, rules)
    cfg, (kind, n_classes) = src.cfg, TASKS[ft.task]
    tokenizer = workdir_lib.source_tokenizer(pretrained_workdir, required=True)
    sp, examples = _task_data(ft, tokenizer, src.configs.get("data", DataConfig()))
    eval_batches = [
        make_batch(kind, examples["validation"][i : i + ft.batch_size], sp, ft.seq_len)
        for i in range(0, ft.n_eval, ft.batch_size)
    ]
    key, optimizer, params = jax.random.key(ft.seed), _optimizer(ft), adapt_trunk(cfg, ft, params)
    step_fn, shards = make_train_step(cfg, kind, ft, optimizer, params, mesh, rules)
    state, logits_fn = place_state(optimizer, params, key, shards), make_logits(cfg, kind)
    before = accuracy(logits_fn, lora.merged_params(ft.lora, state.params), eval_batches)
    writer = MetricWriter(out_dir)
    try:
        with logical.use_mesh(mesh, rules):
            state = _train(step_fn, state, examples["train"], kind, sp, ft, mesh, rules, writer)
        params = lora.merged_params(ft.lora, state.params)  # ordinary params
        after = accuracy(logits_fn, params, eval_batches)
        writer.write(ft.steps, {"eval/accuracy": after[0]})
    finally:
        writer.close()
    summary = {
        "task": ft.task,
        "kind": kind,
        "family": family.family_of(cfg).name,
        "pretrained": pretrained_workdir,
        "pretrained_step": src.step,
        "steps": ft.steps,
        "accuracy_before": before[0],
        "accuracy": after[0],
        "accuracy_stderr": after[1],
        "chance": 1 / n_classes,
        "lora_rank": ft.lora_rank,
        "config": dataclasses.asdict(ft),
    }
    _save(out_dir, params, summary)
    return summary
