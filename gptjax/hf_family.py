"""BERT and Marian weights from/to the Hugging Face layout (GPT-2's relatives).

Same conventions as `gptjax.hf`: numpy state dicts keyed by Hugging Face
names and a dict of the HF config's fields. Unlike GPT-2's Conv1D, these models
use `nn.Linear`, whose weights are stored (out, in): every kernel is a
transpose, and attention kernels are split into heads, `(D, N, H)`.
Layers are described by small tables (our path, HF key, kind), read in both
directions, so import and export cannot drift apart.
"""

from __future__ import annotations

import jax
import numpy as np

from gptjax.hf import _get, _np

# ------------------------------------------------- BERT and Marian (shared pieces)

# Hugging Face activation names -> `gptjax.models.bert.ACTIVATIONS` keys.
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "relu": "relu", "swish": "swish", "silu": "swish"}
_OUR_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
                    "swish": "swish"}


def _activation_from_hf(name: str) -> str:
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"activation {name!r} has no gptjax equivalent "
                         f"(supported: {', '.join(_HF_ACTIVATIONS)}).")
    return _HF_ACTIVATIONS[name]


# A layer map is a tuple of (our path, HF key(s) relative to the layer, kind). HF
# Linear weights are (out, in), ours (in, out); attention kernels keep heads as axes.
#   ln: LayerNorm; dense: Linear; out: Linear from heads (N, H, D);
#   heads: Linear(s) into heads, one key -> (D, N, H), several -> (D, C, N, H).
def _piece_from_hf(get, key, kind: str, n: int, h: int) -> dict:
    if kind == "ln":
        return {"scale": get(f"{key}.weight"), "bias": get(f"{key}.bias")}
    if kind == "dense":
        return {"kernel": get(f"{key}.weight").T, "bias": get(f"{key}.bias")}
    if kind == "out":
        w = get(f"{key}.weight")
        return {"kernel": w.T.reshape(n, h, w.shape[0]), "bias": get(f"{key}.bias")}
    ws = [get(f"{k}.weight").T.reshape(-1, n, h) for k in key]
    bs = [get(f"{k}.bias").reshape(n, h) for k in key]
    if len(key) == 1:
        return {"kernel": ws[0], "bias": bs[0]}
    return {"kernel": np.stack(ws, axis=1), "bias": np.stack(bs, axis=0)}


def _piece_to_hf(p: dict, key, kind: str) -> dict:
    if kind == "ln":
        return {f"{key}.weight": _np(p["scale"]), f"{key}.bias": _np(p["bias"])}
    kernel, bias = _np(p["kernel"]), _np(p["bias"])
    if kind == "dense":
        return {f"{key}.weight": kernel.T, f"{key}.bias": bias}
    if kind == "out":
        return {f"{key}.weight": kernel.reshape(-1, kernel.shape[-1]).T, f"{key}.bias": bias}
    if len(key) == 1:
        kernel, bias = kernel[:, None], bias[None]
    out = {}
    for c, k in enumerate(key):
        out[f"{k}.weight"] = kernel[:, c].reshape(kernel.shape[0], -1).T
        out[f"{k}.bias"] = bias[c].reshape(-1)
    return out


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _at(tree: dict, path: str):
    for name in path.split("/"):
        tree = tree[name]
    return tree


def _layers_in(sd: dict, prefix: str, layer_map, n_layers: int, n: int, h: int) -> dict:
    """Our stacked layer tree from HF keys `{prefix}{i}.{key}`."""
    layers = []
    for i in range(n_layers):
        get = lambda k, i=i: _get(sd, f"{prefix}{i}.{k}")
        tree: dict = {}
        for path, key, kind in layer_map:
            _set(tree, path, _piece_from_hf(get, key, kind, n, h))
        layers.append(tree)
    return jax.tree.map(lambda *a: np.stack(a), *layers)


def _layers_out(stacked: dict, prefix: str, layer_map, n_layers: int) -> dict:
    sd = {}
    for i in range(n_layers):
        for path, key, kind in layer_map:
            piece = jax.tree.map(lambda a: _np(a)[i], _at(stacked, path))
            sd.update({f"{prefix}{i}.{k}": v for k, v in _piece_to_hf(piece, key, kind).items()})
    return sd


# --------------------------------------------------------------------------- BERT

_BERT_LAYER = (
    ("attn/c_attn", ("attention.self.query", "attention.self.key", "attention.self.value"),
     "heads"),
    ("attn/c_proj", "attention.output.dense", "out"),
    ("ln_1", "attention.output.LayerNorm", "ln"),
    ("mlp/c_fc", "intermediate.dense", "dense"),
    ("mlp/c_proj", "output.dense", "dense"),
    ("ln_2", "output.LayerNorm", "ln"),
)
_BERT_HEAD = (("mlm/dense", "cls.predictions.transform.dense", "dense"),
              ("mlm/ln", "cls.predictions.transform.LayerNorm", "ln"),
              ("ln_embd", "bert.embeddings.LayerNorm", "ln"))


def from_hf_bert(state_dict: dict, hf_config: dict):
    """(EncoderConfig, params) from a Hugging Face `BertForMaskedLM` state dict."""
    from gptjax.config import EncoderConfig

    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only absolute (learned) BERT position embeddings are supported.")
    tied = hf_config.get("tie_word_embeddings", True)
    cfg = EncoderConfig(
        n_layers=hf_config["num_hidden_layers"], d_model=hf_config["hidden_size"],
        n_heads=hf_config["num_attention_heads"], d_ff=hf_config["intermediate_size"],
        vocab_size=hf_config["vocab_size"], max_len=hf_config["max_position_embeddings"],
        type_vocab_size=hf_config.get("type_vocab_size", 2),
        activation=_activation_from_hf(hf_config.get("hidden_act", "gelu")),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        embd_dropout=hf_config.get("hidden_dropout_prob", 0.0),
        resid_dropout=hf_config.get("hidden_dropout_prob", 0.0),
        attn_dropout=hf_config.get("attention_probs_dropout_prob", 0.0), tie_embeddings=tied)
    get = lambda k: _get(state_dict, k)
    params = {"wte": get("bert.embeddings.word_embeddings.weight"),
              "wpe": get("bert.embeddings.position_embeddings.weight"),
              "wtt": get("bert.embeddings.token_type_embeddings.weight"),
              "h": _layers_in(state_dict, "bert.encoder.layer.", _BERT_LAYER, cfg.n_layers,
                              cfg.n_heads, cfg.head_dim)}
    for path, key, kind in _BERT_HEAD:
        _set(params, path, _piece_from_hf(get, key, kind, cfg.n_heads, cfg.head_dim))
    # The forward adds `decoder.bias`; HF ties it to `cls.predictions.bias` only
    # when the embeddings are tied, so read the one that is used.
    bias_key = "cls.predictions.decoder.bias"
    params["mlm"]["bias"] = get(bias_key if bias_key in state_dict else "cls.predictions.bias")
    if not tied:
        params["lm_head"] = get("cls.predictions.decoder.weight").T
    return cfg, params


def to_hf_bert(cfg, params: dict) -> tuple[dict, dict]:
    """(state_dict, hf_config) for `BertForMaskedLM`; exact inverse of `from_hf_bert`."""
    if (cfg.ln_placement, cfg.pos_embedding) != ("post", "learned"):
        raise ValueError("only BERT-shaped encoders (post-LN, learned positions) export to "
                         f"BertForMaskedLM; got {cfg.ln_placement!r}, {cfg.pos_embedding!r}.")
    sd = {"bert.embeddings.word_embeddings.weight": _np(params["wte"]),
          "bert.embeddings.position_embeddings.weight": _np(params["wpe"]),
          "bert.embeddings.token_type_embeddings.weight": _np(params["wtt"]),
          "cls.predictions.bias": _np(params["mlm"]["bias"]),
          "cls.predictions.decoder.bias": _np(params["mlm"]["bias"]),
          "cls.predictions.decoder.weight": (_np(params["wte"]) if cfg.tie_embeddings
                                             else _np(params["lm_head"]).T)}
    sd.update(_layers_out(params["h"], "bert.encoder.layer.", _BERT_LAYER, cfg.n_layers))
    for path, key, kind in _BERT_HEAD:
        sd.update(_piece_to_hf(_at(params, path), key, kind))
    hf_config = {"model_type": "bert", "architectures": ["BertForMaskedLM"],
                 "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
                 "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                 "intermediate_size": cfg.ff_dim, "hidden_act": _OUR_ACTIVATIONS[cfg.activation],
                 "hidden_dropout_prob": cfg.resid_dropout,
                 "attention_probs_dropout_prob": cfg.attn_dropout,
                 "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
                 "layer_norm_eps": cfg.layer_norm_eps, "tie_word_embeddings": cfg.tie_embeddings}
    return sd, hf_config


# ------------------------------------------------------------------------- Marian

_MARIAN_ENCODER_LAYER = (
    ("attn/c_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "heads"),
    ("attn/c_proj", "self_attn.out_proj", "out"),
    ("ln_1", "self_attn_layer_norm", "ln"),
    ("mlp/c_fc", "fc1", "dense"),
    ("mlp/c_proj", "fc2", "dense"),
    ("ln_2", "final_layer_norm", "ln"),
)
_MARIAN_DECODER_LAYER = _MARIAN_ENCODER_LAYER + (
    ("cross_attn/q", ("encoder_attn.q_proj",), "heads"),
    ("cross_attn/kv", ("encoder_attn.k_proj", "encoder_attn.v_proj"), "heads"),
    ("cross_attn/c_proj", "encoder_attn.out_proj", "out"),
    ("ln_cross", "encoder_attn_layer_norm", "ln"),
)


def _same(hf_config: dict, a: str, b: str):
    if hf_config[a] != hf_config[b]:
        raise ValueError(f"{a}={hf_config[a]} differs from {b}={hf_config[b]}; gptjax's "
                         "seq2seq uses one value for both stacks.")
    return hf_config[a]


def _check_sinusoidal(table: np.ndarray, key: str) -> None:
    """Our positions are computed, not stored: refuse a table they would not reproduce."""
    from gptjax.models.layers import sinusoidal

    ours = np.asarray(sinusoidal(np.arange(table.shape[0])[None], table.shape[1]))[0]
    if not np.allclose(ours, table, atol=1e-5):
        raise ValueError(f"{key} is not the sin|cos sinusoidal table gptjax computes "
                         f"(max difference {np.abs(ours - table).max():.3g}).")


def from_hf_marian(state_dict: dict, hf_config: dict):
    """(Seq2SeqConfig, params) from a Hugging Face `MarianMTModel` state dict.

    Marian is post-LN with sinusoidal positions (sines | cosines halves), shared
    source/target embeddings (optionally scaled by sqrt(d_model)) tied to the
    output, and a `final_logits_bias`. Its `activation_dropout` has no
    counterpart here (irrelevant for inference and parity).
    """
    from gptjax.config import Seq2SeqConfig

    if not hf_config.get("share_encoder_decoder_embeddings", True):
        raise ValueError("gptjax's seq2seq shares one source/target embedding; this Marian "
                         "model has separate ones (share_encoder_decoder_embeddings=False).")
    if hf_config["d_model"] % 2:
        raise ValueError("odd d_model: Marian's sinusoidal layout differs from ours there.")
    cfg = Seq2SeqConfig(
        n_layers=hf_config["encoder_layers"], n_decoder_layers=hf_config["decoder_layers"],
        d_model=hf_config["d_model"],
        n_heads=_same(hf_config, "encoder_attention_heads", "decoder_attention_heads"),
        d_ff=_same(hf_config, "encoder_ffn_dim", "decoder_ffn_dim"),
        vocab_size=hf_config["vocab_size"], max_len=hf_config["max_position_embeddings"],
        activation=_activation_from_hf(hf_config.get("activation_function", "swish")),
        scale_embedding=hf_config.get("scale_embedding", False), layer_norm_eps=1e-5,
        embd_dropout=hf_config.get("dropout", 0.0), resid_dropout=hf_config.get("dropout", 0.0),
        attn_dropout=hf_config.get("attention_dropout", 0.0),
        tie_embeddings=hf_config.get("tie_word_embeddings", True))
    sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in state_dict.items()}
    n, h = cfg.n_heads, cfg.head_dim
    for stack in ("encoder", "decoder"):
        key = f"{stack}.embed_positions.weight"
        if key in sd:
            _check_sinusoidal(_get(sd, key), key)
    # transformers 5 unties encoder/decoder `embed_tokens` from `shared` when
    # tie_word_embeddings=False; the stacks read their own, so compare those.
    wte = _get(sd, "encoder.embed_tokens.weight" if "encoder.embed_tokens.weight" in sd
               else "shared.weight")
    if "decoder.embed_tokens.weight" in sd and not np.array_equal(
            wte, _get(sd, "decoder.embed_tokens.weight")):
        raise ValueError("the encoder and decoder embed_tokens differ; gptjax's seq2seq shares "
                         "one source/target embedding table.")
    params = {
        "wte": wte,
        "final_logits_bias": _get(sd, "final_logits_bias").reshape(-1),
        "encoder": {"h": _layers_in(sd, "encoder.layers.", _MARIAN_ENCODER_LAYER,
                                    cfg.n_layers, n, h)},
        "decoder": {"h": _layers_in(sd, "decoder.layers.", _MARIAN_DECODER_LAYER,
                                    cfg.decoder_layers, n, h)},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = _get(sd, "lm_head.weight").T
    return cfg, params


def to_hf_marian(cfg, params: dict, *, pad_id: int = 0, eos_id: int = 1) -> tuple[dict, dict]:
    """(state_dict, hf_config) for `MarianMTModel`; exact inverse of `from_hf_marian`.

    Every alias of the shared embedding (`shared`, both stacks' `embed_tokens`,
    and `lm_head` when tied) gets the table, and the fixed sinusoidal position
    tables are written out. `pad_id` is also Marian's decoder start token.
    Applied to a gradient tree, it gives each HF key its gradient: a tied HF
    tensor's gradient is the sum over its uses, which is ours for `wte`.
    """
    from gptjax.models.layers import sinusoidal

    if ((cfg.ln_placement, cfg.pos_embedding, cfg.layer_norm_eps) != ("post", "sinusoidal", 1e-5)
            or cfg.d_model % 2):
        raise ValueError("only Marian-shaped models (post-LN, sinusoidal positions, even d_model, "
                         "layer_norm_eps=1e-5) export to MarianMTModel; got "
                         f"{cfg.ln_placement!r}, {cfg.pos_embedding!r}, d_model={cfg.d_model}, "
                         f"layer_norm_eps={cfg.layer_norm_eps}.")
    wte = _np(params["wte"])
    positions = np.asarray(sinusoidal(np.arange(cfg.max_len)[None], cfg.d_model), np.float32)[0]
    sd = {"final_logits_bias": _np(params["final_logits_bias"])[None],
          "lm_head.weight": wte if cfg.tie_embeddings else _np(params["lm_head"]).T,
          "model.shared.weight": wte}
    for stack, layer_map, n_layers in (("encoder", _MARIAN_ENCODER_LAYER, cfg.n_layers),
                                       ("decoder", _MARIAN_DECODER_LAYER, cfg.decoder_layers)):
        sd[f"model.{stack}.embed_tokens.weight"] = wte
        sd[f"model.{stack}.embed_positions.weight"] = positions
        sd.update(_layers_out(params[stack]["h"], f"model.{stack}.layers.", layer_map, n_layers))
    hf_config = {"model_type": "marian", "architectures": ["MarianMTModel"],
                 "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
                 "encoder_layers": cfg.n_layers, "decoder_layers": cfg.decoder_layers,
                 "encoder_attention_heads": cfg.n_heads, "decoder_attention_heads": cfg.n_heads,
                 "encoder_ffn_dim": cfg.ff_dim, "decoder_ffn_dim": cfg.ff_dim,
                 "max_position_embeddings": cfg.max_len,
                 "activation_function": _OUR_ACTIVATIONS[cfg.activation],
                 "scale_embedding": cfg.scale_embedding, "dropout": cfg.resid_dropout,
                 "attention_dropout": cfg.attn_dropout, "activation_dropout": 0.0,
                 "tie_word_embeddings": cfg.tie_embeddings,
                 "share_encoder_decoder_embeddings": True, "pad_token_id": pad_id,
                 "decoder_start_token_id": pad_id, "eos_token_id": eos_id}
    return sd, hf_config
