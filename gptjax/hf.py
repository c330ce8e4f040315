"""Weights to and from the Hugging Face layout (GPT-2 and BERT; GPT-1 and Marian for import).

A `state_dict` here maps Hugging Face parameter names (`GPT2LMHeadModel`
keys such as `transformer.h.0.attn.c_attn.weight`) to numpy arrays, and an
`hf_config` is a dict of `GPT2Config` fields. Hugging Face's GPT-2 uses
`Conv1D` layers whose weights are stored (in, out), the same orientation as
our kernels, so the map is a reshape: c_attn's (D, 3D) columns are q | k | v,
each split into heads, which becomes our (D, 3, N, H).
"""

from __future__ import annotations

import json
import os


import numpy as np

from gptjax.config import ModelConfig

_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _np(x) -> np.ndarray:
    """Torch tensors (CPU) and jax arrays to float32 numpy."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def _strip_prefix(state_dict: dict, prefix: str = "transformer.") -> dict:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _get(sd: dict, key: str) -> np.ndarray:
    if key not in sd:
        raise KeyError(f"state_dict has no {key!r}; is this the right architecture? "
                       f"Keys look like: {sorted(sd)[:4]}")
    return _np(sd[key])


def _layers_from_hf(sd: dict, cfg: ModelConfig) -> dict:
    """The stacked `h` subtree from per-layer Hugging Face Conv1D weights."""
    n, h, d = cfg.n_heads, cfg.head_dim, cfg.d_model

    def stack(name, shape=None):
        arrays = [_get(sd, f"h.{i}.{name}") for i in range(cfg.n_layers)]
        return np.stack([a.reshape(shape) if shape else a for a in arrays])

    ln = lambda name: {"scale": stack(f"{name}.weight"), "bias": stack(f"{name}.bias")}
    return {
        "ln_1": ln("ln_1"),
        "attn": {
            "c_attn": {"kernel": stack("attn.c_attn.weight", (d, 3, n, h)),
                       "bias": stack("attn.c_attn.bias", (3, n, h))},
            "c_proj": {"kernel": stack("attn.c_proj.weight", (n, h, d)),
                       "bias": stack("attn.c_proj.bias")},
        },
        "ln_2": ln("ln_2"),
        "mlp": {
            "c_fc": {"kernel": stack("mlp.c_fc.weight"), "bias": stack("mlp.c_fc.bias")},
            "c_proj": {"kernel": stack("mlp.c_proj.weight"), "bias": stack("mlp.c_proj.bias")},
        },
    }


def _check_activation(name: str) -> None:
    if name not in _TANH_GELUS:
        raise ValueError(f"activation {name!r} is not the tanh-approximated GELU that gptjax "
                         f"models use ({', '.join(_TANH_GELUS)}); the logits would differ.")


def from_hf_gpt2(state_dict: dict, hf_config: dict) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a Hugging Face `GPT2LMHeadModel`/`GPT2Model` state dict."""
    _check_activation(hf_config.get("activation_function", "gelu_new"))
    d = hf_config["n_embd"]
    tied = hf_config.get("tie_word_embeddings", True)
    cfg = ModelConfig(n_layers=hf_config["n_layer"], d_model=d, n_heads=hf_config["n_head"],
                      d_ff=hf_config.get("n_inner") or 4 * d, vocab_size=hf_config["vocab_size"],
                      max_len=hf_config["n_positions"],
                      layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
                      embd_dropout=hf_config.get("embd_pdrop", 0.0),
                      attn_dropout=hf_config.get("attn_pdrop", 0.0),
                      resid_dropout=hf_config.get("resid_pdrop", 0.0), tie_embeddings=tied)
    sd = _strip_prefix(state_dict)
    params = {"wte": _get(sd, "wte.weight"), "wpe": _get(sd, "wpe.weight"),
              "h": _layers_from_hf(sd, cfg),
              "ln_f": {"scale": _get(sd, "ln_f.weight"), "bias": _get(sd, "ln_f.bias")}}
    if not tied:
        params["lm_head"] = _get(sd, "lm_head.weight").T
    return cfg, params


def from_hf_openai_gpt(state_dict: dict, hf_config: dict) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a Hugging Face `OpenAIGPTLMHeadModel` (GPT-1: post-LN, no ln_f)."""
    afn = hf_config.get("afn", "gelu")
    _check_activation("gelu_new" if afn == "gelu" else afn)  # OpenAI GPT's "gelu" is tanh GELU
    d = hf_config["n_embd"]
    cfg = ModelConfig(n_layers=hf_config["n_layer"], d_model=d, n_heads=hf_config["n_head"],
                      vocab_size=hf_config["vocab_size"], max_len=hf_config["n_positions"],
                      ln_placement="post",
                      layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5))
    sd = _strip_prefix(state_dict)
    params = {"wte": _get(sd, "tokens_embed.weight"), "wpe": _get(sd, "positions_embed.weight"),
              "h": _layers_from_hf(sd, cfg)}
    return cfg, params


def to_hf_gpt2(cfg: ModelConfig, params: dict) -> tuple[dict, dict]:
    """(state_dict, hf_config) for `GPT2LMHeadModel`; exact inverse of `from_hf_gpt2`."""
    if (cfg.ln_placement, cfg.pos_embedding, cfg.attention) != ("pre", "learned", "dense"):
        raise ValueError("only GPT-2-shaped models (pre-LN, learned positions, dense attention) "
                         f"export to GPT2LMHeadModel; got ln_placement={cfg.ln_placement!r}, "
                         f"pos_embedding={cfg.pos_embedding!r}, attention={cfg.attention!r}.")
    d, h = cfg.d_model, params["h"]
    sd = {"transformer.wte.weight": _np(params["wte"]), "transformer.wpe.weight": _np(params["wpe"]),
          "transformer.ln_f.weight": _np(params["ln_f"]["scale"]),
          "transformer.ln_f.bias": _np(params["ln_f"]["bias"])}
    per_layer = {
        "ln_1.weight": h["ln_1"]["scale"], "ln_1.bias": h["ln_1"]["bias"],
        "attn.c_attn.weight": _np(h["attn"]["c_attn"]["kernel"]).reshape(cfg.n_layers, d, 3 * d),
        "attn.c_attn.bias": _np(h["attn"]["c_attn"]["bias"]).reshape(cfg.n_layers, 3 * d),
        "attn.c_proj.weight": _np(h["attn"]["c_proj"]["kernel"]).reshape(cfg.n_layers, d, d),
        "attn.c_proj.bias": h["attn"]["c_proj"]["bias"],
        "ln_2.weight": h["ln_2"]["scale"], "ln_2.bias": h["ln_2"]["bias"],
        "mlp.c_fc.weight": h["mlp"]["c_fc"]["kernel"], "mlp.c_fc.bias": h["mlp"]["c_fc"]["bias"],
        "mlp.c_proj.weight": h["mlp"]["c_proj"]["kernel"],
        "mlp.c_proj.bias": h["mlp"]["c_proj"]["bias"],
    }
    for name, stacked in per_layer.items():
        stacked = _np(stacked)
        for i in range(cfg.n_layers):
            sd[f"transformer.h.{i}.{name}"] = stacked[i]
    sd["lm_head.weight"] = (_np(params["wte"]) if cfg.tie_embeddings
                            else _np(params["lm_head"]).T)
    hf_config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                 "vocab_size": cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": d,
                 "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ff_dim,
                 "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
                 "resid_pdrop": cfg.resid_dropout, "embd_pdrop": cfg.embd_dropout,
                 "attn_pdrop": cfg.attn_dropout, "tie_word_embeddings": cfg.tie_embeddings}
    return sd, hf_config


# ---------------------------------------------------- BERT and Marian (convert_family)
# The maps live in `gptjax.hf_family`, which builds on this file's helpers;
# these forwarders keep one import point without an import cycle.


def from_hf_bert(state_dict: dict, hf_config: dict):
    """(EncoderConfig, params) from a Hugging Face `BertForMaskedLM` state dict."""
    from gptjax import hf_family as convert_family
    return convert_family.from_hf_bert(state_dict, hf_config)


def to_hf_bert(cfg, params: dict) -> tuple[dict, dict]:
    """(state_dict, hf_config) for `BertForMaskedLM`; exact inverse of `from_hf_bert`."""
    from gptjax import hf_family as convert_family
    return convert_family.to_hf_bert(cfg, params)


def from_hf_marian(state_dict: dict, hf_config: dict):
    """(Seq2SeqConfig, params) from a Hugging Face `MarianMTModel` state dict."""
    from gptjax import hf_family as convert_family
    return convert_family.from_hf_marian(state_dict, hf_config)


def to_hf_marian(cfg, params: dict, *, pad_id: int = 0, eos_id: int = 1) -> tuple[dict, dict]:
    """(state_dict, hf_config) for `MarianMTModel`; exact inverse of `from_hf_marian`."""
    from gptjax import hf_family as convert_family
    return convert_family.to_hf_marian(cfg, params, pad_id=pad_id, eos_id=eos_id)


# ------------------------------------------------------------------------ files


def load_hf_state_dict(directory: str) -> tuple[dict, dict]:
    """(state_dict, config dict) from a Hugging Face model directory
    (`config.json` plus `model.safetensors` or `pytorch_model.bin`)."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json in {directory!r}; expected a Hugging Face "
                                "model directory (config.json + model.safetensors).")
    with open(config_path) as f:
        hf_config = json.load(f)
    st_path = os.path.join(directory, "model.safetensors")
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(st_path):
        from safetensors.numpy import load_file
        return load_file(st_path), hf_config
    if os.path.exists(bin_path):
        try:
            import torch
        except ImportError as e:
            raise ImportError("reading pytorch_model.bin needs torch (pip install torch); "
                              "or convert the checkpoint to model.safetensors.") from e
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {k: _np(v) for k, v in state.items()}, hf_config
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory!r}.")


def load_hf_gpt2(directory: str) -> tuple[ModelConfig, dict]:
    """(cfg, params) from a saved Hugging Face GPT-2 (or GPT-1) directory."""
    state_dict, hf_config = load_hf_state_dict(directory)
    if hf_config.get("model_type") == "openai-gpt":
        return from_hf_openai_gpt(state_dict, hf_config)
    return from_hf_gpt2(state_dict, hf_config)


def save_hf_gpt2(directory: str, cfg: ModelConfig, params: dict) -> None:
    """Write `config.json` and `model.safetensors` that `GPT2LMHeadModel.from_pretrained` reads."""
    from safetensors.numpy import save_file
    state_dict, hf_config = to_hf_gpt2(cfg, params)
    if cfg.tie_embeddings:  # safetensors stores a tied weight once; HF re-ties on load
        state_dict.pop("lm_head.weight")
    os.makedirs(directory, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
