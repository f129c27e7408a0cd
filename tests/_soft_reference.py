"""Float64 NumPy references for the soft-prompt tests: attention with extra keys, and the reference LM.

Written from the math (Vaswani et al. eq. 1, pre-norm GPT blocks), independent of the Flax code.
"""

import numpy as np

NEG = -1e30  # a masked score; with a prefix or a causal diagonal no row is fully masked


def f64(tree):
    """Nested dicts of arrays as float64 NumPy."""
    if isinstance(tree, dict):
        return {k: f64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v: q [b, q, h, d], k / v [b, k, h, d], mask bool [b|1, h|1, q, k]."""
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, NEG)
    scores = scores - scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def decoder_mask(q_len, k_len, attention_mask=None):
    """Causal (aligned to the end of the keys: extra keys come first and every query sees them) and padding."""
    i = np.arange(q_len)[:, None]
    j = np.arange(k_len)[None, :]
    mask = (j <= i + (k_len - q_len))[None, None]
    if attention_mask is not None:
        extra = k_len - attention_mask.shape[1]
        keys = np.concatenate([np.ones((attention_mask.shape[0], extra), bool), attention_mask != 0], axis=1)
        mask = mask & keys[:, None, None, :]
    return mask


def rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def gelu(x):  # the tanh approximation, jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def lm(params, config, tokens=None, embeds=None, attention_mask=None, positions=None, prefixes=None):
    """The reference decoder LM (RMSNorm, biases) in float64.

    Args:
      params: the Linen params tree of the base model.
      tokens: int [b, s], or ``embeds`` [b, s, d].
      prefixes: optional {layer index: (key prefix [P, d], value prefix [P, d])}.
    Returns:
      logits [b, s, vocab].
    """
    p = f64(params)
    x = p["embed"]["embedding"][np.asarray(tokens)] if embeds is None else np.asarray(embeds, np.float64)
    b, s, d = x.shape
    pos = np.arange(s)[None] if positions is None else np.asarray(positions)
    x = x + p["pos_embed"]["embedding"][pos]
    heads, hd = config.num_heads, config.head_dim
    dense = lambda node, h: h @ node["kernel"] + node["bias"]  # noqa: E731
    for i in range(config.num_layers):
        layer = p[f"layers_{i}"]
        h = rms_norm(x, layer["norm_attn"]["scale"])
        a = layer["attn"]
        q, k, v = dense(a["query"], h), dense(a["key"], h), dense(a["value"], h)
        if prefixes is not None and i in prefixes:
            pk, pv = (np.broadcast_to(np.asarray(t, np.float64), (b, *np.shape(t))) for t in prefixes[i])
            k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
        q, k, v = (t.reshape(b, -1, heads, hd) for t in (q, k, v))
        mask = decoder_mask(s, k.shape[1], None if attention_mask is None else np.asarray(attention_mask))
        x = x + dense(a["out"], attention(q, k, v, mask).reshape(b, s, d))
        h = rms_norm(x, layer["norm_mlp"]["scale"])
        x = x + dense(layer["mlp"]["down"], gelu(dense(layer["mlp"]["up"], h)))
    return dense(p["head"], rms_norm(x, p["norm_final"]["scale"]))
