"""Hugging Face interop for every family: GPT-2 / GPT-1, BERT and Marian weights in and out.

A `state_dict` maps Hugging Face parameter names (`transformer.h.0.attn.c_attn.weight`) to
numpy arrays; an `hf_config` is a dict of the HF config's fields. Each model kind is a
`_Layout`: a table of config fields (our field, HF field[, default]) and tables of
(our params path, HF name, kind) for the whole-model arrays and for one layer of each stack.
One reader and one writer go through the tables, so import and export cannot drift apart.

Orientation: GPT-2's `Conv1D` stores weights (in, out), like our kernels; `nn.Linear` (BERT,
Marian, every lm_head) stores (out, in). Attention kernels keep heads as axes. Kinds:
  array: the tensor itself (several names: aliases of one tied tensor; import reads the first
  present);  ln: LayerNorm `{name}.weight|bias` -> {scale, bias};
  dense: a Linear/Conv1D -> {kernel (in, out), bias};  out: from heads, kernel (N, H, D);
  q | kv | qkv: into heads, kernel (D, N, H) | (D, 2, N, H) | (D, 3, N, H), from one HF
  name holding every part (GPT-2's c_attn) or one name per part (BERT's query, key, value).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from gptjax.config import EncoderConfig, ModelConfig, Seq2SeqConfig
from gptjax.models.layers import sinusoidal

# Hugging Face activation names -> `gptjax.models.bert.ACTIVATIONS` keys, and back.
_HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "swish": "swish",
    "silu": "swish",
}
_OUR_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
    "swish": "swish",
}
_HEAD_PARTS = {"q": (), "kv": (2,), "qkv": (3,)}
# Our fields whose None means a default: a required HF field gets the value it stands for.
_RESOLVED = {"d_ff": "ff_dim", "n_decoder_layers": "decoder_layers"}


def _np(x) -> np.ndarray:
    """Torch tensors (CPU) and jax arrays to float32 numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def _get(sd: dict, key: str) -> np.ndarray:
    if key not in sd:
        raise KeyError(
            f"state_dict has no {key!r}; is this the right architecture? "
            f"Keys look like: {sorted(sd)[:4]}"
        )
    return _np(sd[key])


def _check_tanh_gelu(name: str) -> None:
    """gptjax's decoder MLP is the tanh GELU; refuse any other."""
    if _HF_ACTIVATIONS.get(name) != "gelu_tanh":
        tanh = [k for k, v in _HF_ACTIVATIONS.items() if v == "gelu_tanh"]
        raise ValueError(
            f"activation {name!r} is not the tanh-approximated GELU that gptjax "
            f"models use ({', '.join(tanh)}); the logits would differ."
        )


def _activation_from_hf(name: str) -> str:
    if name not in _HF_ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} has no gptjax equivalent "
            f"(supported: {', '.join(_HF_ACTIVATIONS)})."
        )
    return _HF_ACTIVATIONS[name]


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _at(tree: dict, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree


# ------------------------------------------------------------ one piece, both ways


def _piece_in(get, key, kind: str, conv: bool, n: int, h: int):
    """One of our params from the HF tensors `get(name)` (which may carry a leading layers axis)."""
    if kind == "array":
        return get(key)
    if kind == "ln":
        return {"scale": get(f"{key}.weight"), "bias": get(f"{key}.bias")}
    names = (key,) if isinstance(key, str) else key
    ws = [get(f"{k}.weight") if conv else np.swapaxes(get(f"{k}.weight"), -1, -2) for k in names]
    w, b = np.concatenate(ws, -1), np.concatenate([get(f"{k}.bias") for k in names], -1)
    *lead, d_in, d_out = w.shape
    if kind == "dense":
        return {"kernel": w, "bias": b}
    if kind == "out":
        return {"kernel": w.reshape(*lead, n, h, d_out), "bias": b}
    parts = _HEAD_PARTS[kind]
    return {"kernel": w.reshape(*lead, d_in, *parts, n, h), "bias": b.reshape(*lead, *parts, n, h)}


def _piece_out(p, key, kind: str, conv: bool) -> dict:
    """{HF name: array} from one of our params; the inverse of `_piece_in`."""
    names = (key,) if isinstance(key, str) else key
    if kind == "array":
        return {k: _np(p) for k in names}
    if kind == "ln":
        return {f"{key}.weight": _np(p["scale"]), f"{key}.bias": _np(p["bias"])}
    w = _np(p["kernel"])
    if kind == "out":  # (..., N, H, D) -> (..., N*H, D)
        w = w.reshape(*w.shape[:-3], -1, w.shape[-1])
    elif kind in _HEAD_PARTS:  # (..., D, [C,] N, H) -> (..., D, C*N*H)
        w = w.reshape(*w.shape[: w.ndim - len(_HEAD_PARTS[kind]) - 2], -1)
    b = _np(p["bias"]).reshape(*w.shape[:-2], -1)
    out = {}
    for k, w_k, b_k in zip(names, np.split(w, len(names), -1), np.split(b, len(names), -1)):
        out[f"{k}.weight"], out[f"{k}.bias"] = (w_k if conv else np.swapaxes(w_k, -1, -2)), b_k
    return out


# ------------------------------------------------------------ one model, both ways


class _Layout(NamedTuple):
    """Where one Hugging Face model keeps our config fields and params."""

    config: type  # our config class
    fields: tuple  # (our field, HF field[, default]); without a default it is required
    groups: tuple  # (our path prefix, HF name prefix, table of (path, name, kind), depth):
    #                depth None: whole-model arrays; else the cfg property counting a
    #                stack's layers, stored stacked in ours and as `{stem}{i}.{name}` in HF's
    conv: bool = False  # kernels stored (in, out): GPT-2's Conv1D
    prefix: str = ""  # on every name but `lm_head`; optional on import (GPT2Model has none)
    lm_head: str = "lm_head.weight"  # the output projection (wte when tied)


def _config_in(layout: _Layout, hf_config: dict, **extra):
    """Our config from the HF config's fields; two HF fields for one of ours must agree."""
    kwargs = {}
    for ours, theirs, *default in layout.fields:
        value = hf_config.get(theirs, default[0]) if default else hf_config[theirs]
        if kwargs.setdefault(ours, value) != value:
            raise ValueError(
                f"{theirs}={value} differs from {kwargs[ours]}; gptjax uses one "
                f"{ours} for both stacks."
            )
    return layout.config(**kwargs, **extra)


def _config_out(layout: _Layout, cfg, **constants) -> dict:
    """The HF config's fields from ours; the inverse of `_config_in`."""
    fields = {}
    for ours, theirs, *default in layout.fields:
        value = getattr(cfg, ours)
        fields[theirs] = getattr(cfg, _RESOLVED[ours]) if value is None and not default else value
    return constants | fields


def _strip(state_dict: dict, prefix: str) -> dict:
    return {
        (k[len(prefix) :] if prefix and k.startswith(prefix) else k): v
        for k, v in state_dict.items()
    }


def _getter(sd: dict, stem: str, n_layers: int | None):
    """name -> HF tensor `{stem}{name}`, or for a stack `{stem}{i}.{name}` stacked over i."""
    if n_layers is None:
        return lambda k: _get(sd, stem + k)
    return lambda k: np.stack([_get(sd, f"{stem}{i}.{k}") for i in range(n_layers)])


def _params_in(layout: _Layout, state_dict: dict, cfg) -> dict:
    """Our params tree from an HF state dict."""
    sd, params = _strip(state_dict, layout.prefix), {}
    for path, stem, table, depth in layout.groups:
        get = _getter(sd, stem, depth and getattr(cfg, depth))
        for sub, key, kind in table:
            if kind == "array" and not isinstance(key, str):  # aliases: the first one present
                key = next((k for k in key if stem + k in sd), key[0])
            _set(
                params,
                path + sub,
                _piece_in(get, key, kind, layout.conv, cfg.n_heads, cfg.head_dim),
            )
    if not cfg.tie_embeddings:
        params["lm_head"] = _get(sd, layout.lm_head).T
    return params


def _params_out(layout: _Layout, cfg, params: dict) -> dict:
    """An HF state dict from our params; the inverse of `_params_in`."""
    sd = {}
    for path, stem, table, depth in layout.groups:
        for sub, key, kind in table:
            for name, value in _piece_out(_at(params, path + sub), key, kind, layout.conv).items():
                sd.update(
                    {layout.prefix + stem + name: value}
                    if depth is None
                    else {f"{layout.prefix}{stem}{i}.{name}": v for i, v in enumerate(value)}
                )
    sd[layout.lm_head] = _np(params["wte"]) if cfg.tie_embeddings else _np(params["lm_head"]).T
    return sd


# --------------------------------------------------------------------- the tables

_GPT_LAYER = (
    ("ln_1", "ln_1", "ln"),
    ("attn/c_attn", "attn.c_attn", "qkv"),
    ("attn/c_proj", "attn.c_proj", "out"),
    ("ln_2", "ln_2", "ln"),
    ("mlp/c_fc", "mlp.c_fc", "dense"),
    ("mlp/c_proj", "mlp.c_proj", "dense"),
)
_GPT1_FIELDS = (
    ("n_layers", "n_layer"),
    ("d_model", "n_embd"),
    ("n_heads", "n_head"),
    ("vocab_size", "vocab_size"),
    ("max_len", "n_positions"),
    ("layer_norm_eps", "layer_norm_epsilon", 1e-5),
)
_GPT2 = _Layout(
    ModelConfig,
    _GPT1_FIELDS
    + (
        ("d_ff", "n_inner", None),
        ("embd_dropout", "embd_pdrop", 0.0),
        ("attn_dropout", "attn_pdrop", 0.0),
        ("resid_dropout", "resid_pdrop", 0.0),
        ("tie_embeddings", "tie_word_embeddings", True),
    ),
    groups=(
        (
            "",
            "",
            (
                ("wte", "wte.weight", "array"),
                ("wpe", "wpe.weight", "array"),
                ("ln_f", "ln_f", "ln"),
            ),
            None,
        ),
        ("h/", "h.", _GPT_LAYER, "n_layers"),
    ),
    conv=True,
    prefix="transformer.",
)
_GPT1 = _GPT2._replace(
    fields=_GPT1_FIELDS,
    groups=(
        (
            "",
            "",
            (("wte", "tokens_embed.weight", "array"), ("wpe", "positions_embed.weight", "array")),
            None,
        ),
        ("h/", "h.", _GPT_LAYER, "n_layers"),
    ),
)

_BERT_LAYER = (
    ("attn/c_attn", ("attention.self.query", "attention.self.key", "attention.self.value"), "qkv"),
    ("attn/c_proj", "attention.output.dense", "out"),
    ("ln_1", "attention.output.LayerNorm", "ln"),
    ("mlp/c_fc", "intermediate.dense", "dense"),
    ("mlp/c_proj", "output.dense", "dense"),
    ("ln_2", "output.LayerNorm", "ln"),
)
_BERT = _Layout(
    EncoderConfig,
    (
        ("n_layers", "num_hidden_layers"),
        ("d_model", "hidden_size"),
        ("n_heads", "num_attention_heads"),
        ("d_ff", "intermediate_size"),
        ("vocab_size", "vocab_size"),
        ("max_len", "max_position_embeddings"),
        ("type_vocab_size", "type_vocab_size", 2),
        ("layer_norm_eps", "layer_norm_eps", 1e-12),
        ("embd_dropout", "hidden_dropout_prob", 0.0),
        ("resid_dropout", "hidden_dropout_prob", 0.0),
        ("attn_dropout", "attention_probs_dropout_prob", 0.0),
        ("tie_embeddings", "tie_word_embeddings", True),
    ),
    groups=(
        (
            "",
            "",
            (
                ("wte", "bert.embeddings.word_embeddings.weight", "array"),
                ("wpe", "bert.embeddings.position_embeddings.weight", "array"),
                ("wtt", "bert.embeddings.token_type_embeddings.weight", "array"),
                ("ln_embd", "bert.embeddings.LayerNorm", "ln"),
                ("mlm/dense", "cls.predictions.transform.dense", "dense"),
                ("mlm/ln", "cls.predictions.transform.LayerNorm", "ln"),
                # The forward adds `decoder.bias`; HF ties `cls.predictions.bias` to it.
                ("mlm/bias", ("cls.predictions.decoder.bias", "cls.predictions.bias"), "array"),
            ),
            None,
        ),
        ("h/", "bert.encoder.layer.", _BERT_LAYER, "n_layers"),
    ),
    lm_head="cls.predictions.decoder.weight",
)

_MARIAN_ENCODER_LAYER = (
    ("attn/c_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv"),
    ("attn/c_proj", "self_attn.out_proj", "out"),
    ("ln_1", "self_attn_layer_norm", "ln"),
    ("mlp/c_fc", "fc1", "dense"),
    ("mlp/c_proj", "fc2", "dense"),
    ("ln_2", "final_layer_norm", "ln"),
)
_MARIAN_DECODER_LAYER = _MARIAN_ENCODER_LAYER + (
    ("cross_attn/q", "encoder_attn.q_proj", "q"),
    ("cross_attn/kv", ("encoder_attn.k_proj", "encoder_attn.v_proj"), "kv"),
    ("cross_attn/c_proj", "encoder_attn.out_proj", "out"),
    ("ln_cross", "encoder_attn_layer_norm", "ln"),
)
_MARIAN = _Layout(
    Seq2SeqConfig,
    (
        ("n_layers", "encoder_layers"),
        ("n_decoder_layers", "decoder_layers"),
        ("d_model", "d_model"),
        ("n_heads", "encoder_attention_heads"),
        ("n_heads", "decoder_attention_heads"),
        ("d_ff", "encoder_ffn_dim"),
        ("d_ff", "decoder_ffn_dim"),
        ("vocab_size", "vocab_size"),
        ("max_len", "max_position_embeddings"),
        ("scale_embedding", "scale_embedding", False),
        ("embd_dropout", "dropout", 0.0),
        ("resid_dropout", "dropout", 0.0),
        ("attn_dropout", "attention_dropout", 0.0),
        ("tie_embeddings", "tie_word_embeddings", True),
    ),
    # transformers 5 unties encoder/decoder `embed_tokens` from `shared` when
    # tie_word_embeddings=False; the stacks read their own, so ours is the encoder's.
    groups=(
        (
            "",
            "",
            (
                (
                    "wte",
                    ("encoder.embed_tokens.weight", "shared.weight", "decoder.embed_tokens.weight"),
                    "array",
                ),
            ),
            None,
        ),
        ("encoder/h/", "encoder.layers.", _MARIAN_ENCODER_LAYER, "n_layers"),
        ("decoder/h/", "decoder.layers.", _MARIAN_DECODER_LAYER, "decoder_layers"),
    ),
    prefix="model.",
)


# --------------------------------------------------------------- GPT-2 and GPT-1


def from_hf_gpt2(state_dict: dict, hf_config: dict) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a Hugging Face `GPT2LMHeadModel`/`GPT2Model` state dict."""
    _check_tanh_gelu(hf_config.get("activation_function", "gelu_new"))
    cfg = _config_in(_GPT2, hf_config)
    return cfg, _params_in(_GPT2, state_dict, cfg)


def from_hf_openai_gpt(state_dict: dict, hf_config: dict) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a Hugging Face `OpenAIGPTLMHeadModel` (GPT-1: post-LN, no ln_f)."""
    afn = hf_config.get("afn", "gelu")
    _check_tanh_gelu("gelu_new" if afn == "gelu" else afn)  # OpenAI GPT's "gelu" is tanh GELU
    cfg = _config_in(_GPT1, hf_config, ln_placement="post")
    return cfg, _params_in(_GPT1, state_dict, cfg)


def to_hf_gpt2(cfg: ModelConfig, params: dict) -> tuple[dict, dict]:
    """(state_dict, hf_config) for `GPT2LMHeadModel`; exact inverse of `from_hf_gpt2`."""
    if (cfg.ln_placement, cfg.pos_embedding, cfg.attention) != ("pre", "learned", "dense"):
        raise ValueError(
            "only GPT-2-shaped models (pre-LN, learned positions, dense attention) "
            f"export to GPT2LMHeadModel; got ln_placement={cfg.ln_placement!r}, "
            f"pos_embedding={cfg.pos_embedding!r}, attention={cfg.attention!r}."
        )
    return _params_out(_GPT2, cfg, params), _config_out(
        _GPT2,
        cfg,
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        activation_function="gelu_new",
    )


# -------------------------------------------------------------------------- BERT


def from_hf_bert(state_dict: dict, hf_config: dict) -> tuple[EncoderConfig, dict]:
    """(EncoderConfig, params) from a Hugging Face `BertForMaskedLM` state dict."""
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute (learned) BERT position embeddings are supported.")
    cfg = _config_in(
        _BERT, hf_config, activation=_activation_from_hf(hf_config.get("hidden_act", "gelu"))
    )
    return cfg, _params_in(_BERT, state_dict, cfg)


def to_hf_bert(cfg: EncoderConfig, params: dict) -> tuple[dict, dict]:
    """(state_dict, hf_config) for `BertForMaskedLM`; exact inverse of `from_hf_bert`."""
    if (cfg.ln_placement, cfg.pos_embedding) != ("post", "learned"):
        raise ValueError(
            "only BERT-shaped encoders (post-LN, learned positions) export to "
            f"BertForMaskedLM; got {cfg.ln_placement!r}, {cfg.pos_embedding!r}."
        )
    return _params_out(_BERT, cfg, params), _config_out(
        _BERT,
        cfg,
        model_type="bert",
        architectures=["BertForMaskedLM"],
        hidden_act=_OUR_ACTIVATIONS[cfg.activation],
    )


# ------------------------------------------------------------------------- Marian


def _positions(cfg: Seq2SeqConfig) -> np.ndarray:
    """The (max_len, D) sin|cos table our seq2seq computes and Marian stores."""
    return np.asarray(sinusoidal(np.arange(cfg.max_len)[None], cfg.d_model), np.float32)[0]


def from_hf_marian(state_dict: dict, hf_config: dict) -> tuple[Seq2SeqConfig, dict]:
    """(Seq2SeqConfig, params) from a Hugging Face `MarianMTModel` state dict.

    Marian is post-LN with sinusoidal positions (sines | cosines halves), shared
    source/target embeddings (optionally scaled by sqrt(d_model)) tied to the
    output, and a `final_logits_bias`. Its `activation_dropout` has no
    counterpart here (irrelevant for inference and parity).
    """
    if not hf_config.get("share_encoder_decoder_embeddings", True):
        raise ValueError(
            "gptjax's seq2seq shares one source/target embedding; this Marian "
            "model has separate ones (share_encoder_decoder_embeddings=False)."
        )
    if hf_config["d_model"] % 2:
        raise ValueError("odd d_model: Marian's sinusoidal layout differs from ours there.")
    cfg = _config_in(
        _MARIAN,
        hf_config,
        layer_norm_eps=1e-5,
        activation=_activation_from_hf(hf_config.get("activation_function", "swish")),
    )
    sd = _strip(state_dict, _MARIAN.prefix)
    for key in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
        # Our positions are computed, not stored: refuse a table they would not reproduce.
        if key in sd and not np.allclose(diff := _get(sd, key) - _positions(cfg), 0, atol=1e-5):
            raise ValueError(
                f"{key} is not the sin|cos sinusoidal table gptjax computes "
                f"(max difference {np.abs(diff).max():.3g})."
            )
    params = _params_in(_MARIAN, sd, cfg)
    if "decoder.embed_tokens.weight" in sd and not np.array_equal(
        params["wte"], _get(sd, "decoder.embed_tokens.weight")
    ):
        raise ValueError(
            "the encoder and decoder embed_tokens differ; gptjax's seq2seq shares "
            "one source/target embedding table."
        )
    params["final_logits_bias"] = _get(sd, "final_logits_bias").reshape(-1)
    return cfg, params


def to_hf_marian(
    cfg: Seq2SeqConfig, params: dict, *, pad_id: int = 0, eos_id: int = 1
) -> tuple[dict, dict]:
    """(state_dict, hf_config) for `MarianMTModel`; exact inverse of `from_hf_marian`.

    Every alias of the shared embedding (`shared`, both stacks' `embed_tokens`,
    and `lm_head` when tied) gets the table, and the fixed sinusoidal position
    tables are written out. `pad_id` is also Marian's decoder start token.
    Applied to a gradient tree, it gives each HF key its gradient: a tied HF
    tensor's gradient is the sum over its uses, which is ours for `wte`.
    """
    if (cfg.ln_placement, cfg.pos_embedding, cfg.layer_norm_eps) != (
        "post",
        "sinusoidal",
        1e-5,
    ) or cfg.d_model % 2:
        raise ValueError(
            "only Marian-shaped models (post-LN, sinusoidal positions, even d_model, "
            f"layer_norm_eps=1e-5) export to MarianMTModel; got {cfg.ln_placement!r}, "
            f"{cfg.pos_embedding!r}, {cfg.d_model=}, {cfg.layer_norm_eps=}."
        )
    sd = _params_out(_MARIAN, cfg, params)
    sd["final_logits_bias"] = _np(params["final_logits_bias"])[None]
    for stack in ("encoder", "decoder"):
        sd[f"model.{stack}.embed_positions.weight"] = _positions(cfg)
    return sd, _config_out(
        _MARIAN,
        cfg,
        model_type="marian",
        architectures=["MarianMTModel"],
        activation_function=_OUR_ACTIVATIONS[cfg.activation],
        activation_dropout=0.0,
        share_encoder_decoder_embeddings=True,
        pad_token_id=pad_id,
        decoder_start_token_id=pad_id,
        eos_token_id=eos_id,
    )


# ------------------------------------------------------------------------ files

_IMPORTS = {
    "gpt2": from_hf_gpt2,
    "openai-gpt": from_hf_openai_gpt,
    "bert": from_hf_bert,
    "marian": from_hf_marian,
}  # keyed by the HF config's model_type
MODEL_TYPES = tuple(_IMPORTS)  # the Hugging Face model_types load_hf reads
_EXPORTS = {
    ModelConfig: (to_hf_gpt2, _GPT2),
    EncoderConfig: (to_hf_bert, _BERT),
    Seq2SeqConfig: (to_hf_marian, _MARIAN),
}  # keyed by our config class


def read_config(directory: str) -> dict:
    """A Hugging Face model directory's config.json, as a dict."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"no config.json in {directory!r}; expected a Hugging Face model directory "
            "(config.json + model.safetensors or pytorch_model.bin)."
        )
    with open(config_path) as f:
        return json.load(f)


def load_hf_state_dict(directory: str) -> tuple[dict, dict]:
    """(state_dict, config dict) from a Hugging Face model directory
    (`config.json` plus `model.safetensors` or `pytorch_model.bin`)."""
    hf_config = read_config(directory)
    st_path, bin_path = (
        os.path.join(directory, f) for f in ("model.safetensors", "pytorch_model.bin")
    )
    if os.path.exists(st_path):
        from safetensors.numpy import load_file

        return load_file(st_path), hf_config
    if os.path.exists(bin_path):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                "reading pytorch_model.bin needs torch (pip install torch); "
                "or convert the checkpoint to model.safetensors."
            ) from e
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {k: _np(v) for k, v in state.items()}, hf_config
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory!r}.")


def save_hf_state_dict(directory: str, state_dict: dict, hf_config: dict) -> None:
    """Write `config.json` and `model.safetensors` (what `from_pretrained` reads)."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in state_dict.items()},
        os.path.join(directory, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)


def load_hf(directory: str) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a saved Hugging Face GPT-2, GPT-1, BERT or Marian directory."""
    state_dict, hf_config = load_hf_state_dict(directory)
    model_type = hf_config.get("model_type", "gpt2")
    if model_type not in _IMPORTS:
        raise ValueError(
            f"model_type {model_type!r} has no gptjax import (supported: {', '.join(_IMPORTS)})."
        )
    return _IMPORTS[model_type](state_dict, hf_config)


def save_hf(directory: str, cfg: ModelConfig, params: dict) -> None:
    """Write the Hugging Face directory for `cfg`'s family (GPT-2, BERT or Marian) that
    `from_pretrained` reads; a tied output weight is stored once (HF re-ties it on load)."""
    if type(cfg) not in _EXPORTS:
        raise TypeError(f"no Hugging Face export for {type(cfg).__name__}.")
    to_hf, layout = _EXPORTS[type(cfg)]
    state_dict, hf_config = to_hf(cfg, params)
    if cfg.tie_embeddings:
        state_dict.pop(layout.lm_head)
    save_hf_state_dict(directory, state_dict, hf_config)


# The names README and the CLI use for GPT-2 (and GPT-1) directories.
load_hf_gpt2 = load_hf
save_hf_gpt2 = save_hf
