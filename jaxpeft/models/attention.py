"""Scaled dot-product attention and its masks: pure functions shared by both models.

Masks are boolean, ``True`` where a query may attend to a key, and broadcast
against ``[batch, heads, q_len, k_len]``. Combine masks with ``&``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["causal_mask", "padding_mask", "decoder_mask", "dot_product_attention"]


def causal_mask(q_len: int, k_len: int | None = None) -> jax.Array:
    """Lower-triangular mask, aligned to the end of the keys.

    With ``k_len > q_len`` the extra ``k_len - q_len`` keys come first and every
    query sees them (prefix tuning prepends keys this way): query ``i`` sees
    keys ``0 .. i + k_len - q_len``.

    Args:
      q_len: number of queries.
      k_len: number of keys; defaults to ``q_len``.

    Returns:
      bool ``[1, 1, q_len, k_len]``.
    """
    k_len = q_len if k_len is None else k_len
    mask = jnp.tril(jnp.ones((q_len, k_len), dtype=jnp.bool_), k=k_len - q_len)
    return mask[None, None]


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """Mask out padded keys.

    Args:
      attention_mask: ``[batch, k_len]``, nonzero for a real token, 0 for padding.

    Returns:
      bool ``[batch, 1, 1, k_len]``.
    """
    if attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be [batch, seq], got shape {attention_mask.shape}"
        )
    return (attention_mask != 0)[:, None, None, :]


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """``softmax(q k^T / sqrt(head_dim) + mask) v`` per head (Vaswani et al. 2017, eq. 1).

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k: ``[batch, k_len, heads, head_dim]``.
      v: ``[batch, k_len, heads, head_dim]``.
      mask: bool, broadcastable to ``[batch, heads, q_len, k_len]``; ``True`` = attend.

    Returns:
      ``[batch, q_len, heads, head_dim]`` in the dtype of ``v``.
    """
    def batch_heads_dim(x):
        return (x.shape[0], x.shape[2], x.shape[3])

    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or batch_heads_dim(q) != batch_heads_dim(k):
        raise ValueError(
            "expected q [batch, q_len, heads, head_dim] and k, v [batch, k_len, heads, head_dim], "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    # Scores and softmax in float32: bf16 logits lose the small differences the
    # softmax amplifies, and the exp overflows early.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
    if mask is not None:
        # A finite minimum, not -inf: a row with every key masked (a padded query)
        # then gets uniform weights instead of NaN, and its output is ignored anyway.
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def decoder_mask(q_len: int, k_len: int, attention_mask: jax.Array | None = None) -> jax.Array:
    """The mask of a decoder: causal, and padded keys hidden.

    Keys beyond the length of ``attention_mask`` are taken as prepended (prefix
    tuning's learned keys) and stay visible to every query.

    Args:
      q_len: number of queries.
      k_len: number of keys, ``>= q_len``.
      attention_mask: optional ``[batch, seq]``, 1 = real token, 0 = padding,
        with ``seq <= k_len``.

    Returns:
      bool ``[1 or batch, 1, q_len, k_len]``.
    """
    mask = causal_mask(q_len, k_len)
    if attention_mask is None:
        return mask
    prefix = k_len - attention_mask.shape[-1]
    if prefix < 0:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but there are only {k_len} keys"
        )
    keys_visible = jnp.pad(attention_mask != 0, ((0, 0), (prefix, 0)), constant_values=True)
    return mask & padding_mask(keys_visible)
