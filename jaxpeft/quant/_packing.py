"""Two 4-bit codes per byte, paired along axis 0 (the input axis of a Flax kernel).

Layout, for codes ``c`` of shape ``[n, *rest]`` (values 0..15)::

    packed[i, ...] = (c[2i, ...] << 4) | c[2i + 1, ...]      shape [ceil(n / 2), *rest]

The even row goes in the high nibble, the odd row in the low nibble. Read along the input axis
of one output column this is bitsandbytes' byte order for a torch ``[out, in]`` weight, so
``packed.T.reshape(-1)`` of a 2-D kernel is the bitsandbytes byte stream (for even ``n``).
Pairs never cross an output column and a byte never holds two input rows that are more than one
apart, so slicing ``packed`` along any axis (sharding, for one) slices whole bytes. An odd ``n``
gets one padding nibble (the caller's zero code) in the low half of the last byte row.
"""

from __future__ import annotations

import jax.numpy as jnp


def pack_nibbles(codes: jnp.ndarray, pad_code: int = 0) -> jnp.ndarray:
    """Pack 4-bit codes two per byte along axis 0.

    Args:
      codes: ``[n, *rest]`` integers in 0..15 (any integer dtype).
      pad_code: the code written in the padding nibble when ``n`` is odd.

    Returns:
      ``[ceil(n / 2), *rest]`` uint8.
    """
    codes = jnp.asarray(codes).astype(jnp.uint8)
    n, rest = codes.shape[0], codes.shape[1:]
    if n % 2:
        pad = jnp.full((1, *rest), pad_code, dtype=jnp.uint8)
        codes = jnp.concatenate([codes, pad], axis=0)
    pairs = codes.reshape(codes.shape[0] // 2, 2, *rest)
    return (pairs[:, 0] << 4) | (pairs[:, 1] & 0xF)


def unpack_nibbles(packed: jnp.ndarray, n: int) -> jnp.ndarray:
    """Inverse of :func:`pack_nibbles`.

    Args:
      packed: ``[ceil(n / 2), *rest]`` uint8.
      n: the number of rows before packing (drops the padding nibble of an odd ``n``).

    Returns:
      ``[n, *rest]`` uint8 codes in 0..15.
    """
    rest = packed.shape[1:]
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=1).reshape(2 * packed.shape[0], *rest)
    return codes[:n]
