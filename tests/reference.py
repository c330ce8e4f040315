"""An independent float64 numpy GPT, written for clarity, to check gptjax against.

It reads the same parameter tree but shares no code with gptjax.models.gpt: loops
over layers and heads, explicit masks, rotary positions via complex numbers.
"""

import math

import numpy as np


def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _sinusoidal(t, d):
    half = d // 2
    out = np.zeros((t, d))
    for pos in range(t):
        for i in range(half):
            angle = pos / 10000 ** (i / half)
            out[pos, i], out[pos, half + i] = math.sin(angle), math.cos(angle)
    return out


def _rope(x_TH, base=10000.0):
    t, h = x_TH.shape
    z = x_TH[:, : h // 2] + 1j * x_TH[:, h // 2 :]
    theta = np.array([[pos / base ** (2 * i / h) for i in range(h // 2)] for pos in range(t)])
    z = z * np.exp(1j * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def reference_logits(cfg, params, tokens_T):
    """Logits (T, V) for one unpadded sequence, float64."""
    p = {k: v for k, v in _to64(params).items()}
    t = len(tokens_T)
    x = p["wte"][tokens_T]
    if cfg.pos_embedding == "learned":
        x = x + p["wpe"][:t]
    elif cfg.pos_embedding == "sinusoidal":
        x = x + _sinusoidal(t, cfg.d_model)
    for layer in range(cfg.n_layers):
        lp = _layer(p["h"], layer)
        local = cfg.attention == "gpt3_sparse" and layer % 2 == 1
        if cfg.ln_placement == "pre":
            x = x + _attention(cfg, lp["attn"], _ln(x, lp["ln_1"], cfg.layer_norm_eps), local)
            x = x + _mlp(lp["mlp"], _ln(x, lp["ln_2"], cfg.layer_norm_eps))
        else:
            x = _ln(x + _attention(cfg, lp["attn"], x, local), lp["ln_1"], cfg.layer_norm_eps)
            x = _ln(x + _mlp(lp["mlp"], x), lp["ln_2"], cfg.layer_norm_eps)
    if cfg.ln_placement == "pre":
        x = _ln(x, p["ln_f"], cfg.layer_norm_eps)
    w_out = p["wte"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ w_out


def _attention(cfg, p, x, local):
    t = x.shape[0]
    out = np.zeros_like(x)
    for head in range(cfg.n_heads):
        q, k, v = (
            x @ p["c_attn"]["kernel"][:, c, head] + p["c_attn"]["bias"][c, head] for c in range(3)
        )
        if cfg.pos_embedding == "rope":
            q, k = _rope(q), _rope(k)
        scores = q @ k.T / math.sqrt(cfg.head_dim)
        for i in range(t):
            for j in range(t):
                if j > i or (local and i - j >= cfg.local_window):
                    scores[i, j] = -np.inf
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out += (probs @ v) @ p["c_proj"]["kernel"][head]
    return out + p["c_proj"]["bias"]


def _mlp(p, x):
    h = _gelu(x @ p["c_fc"]["kernel"] + p["c_fc"]["bias"])
    return h @ p["c_proj"]["kernel"] + p["c_proj"]["bias"]


def _layer(h, i):
    if isinstance(h, dict):
        return {k: _layer(v, i) for k, v in h.items()}
    return h[i]


def _to64(tree):
    if isinstance(tree, dict):
        return {k: _to64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def decoder_param_count(cfg) -> int:
    """A GPT's parameters in closed form, an independent check of `family.param_count`."""
    d, f, v, layers = cfg.d_model, cfg.ff_dim, cfg.vocab_size, cfg.n_layers
    attn = d * 3 * d + 3 * d + d * d + d  # c_attn, c_proj (kernels + biases)
    mlp = d * f + f + f * d + d  # c_fc, c_proj
    norms = 2 * 2 * d  # ln_1, ln_2
    total = layers * (attn + mlp + norms) + v * d
    if cfg.pos_embedding == "learned":
        total += cfg.max_len * d
    if cfg.ln_placement == "pre":
        total += 2 * d  # ln_f
    if not cfg.tie_embeddings:
        total += d * v
    return total
