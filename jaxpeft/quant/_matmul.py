"""A matmul by a frozen quantized kernel that never holds the whole dequantized kernel.

``x @ dequantize(q)`` written plainly makes the dequantized kernel a residual of autodiff: the
backward pass needs ``W`` for ``dx = dy W^T``, so every layer's float kernel stays alive from its
forward matmul to its backward one, and a QLoRA step peaks at the size of the *float* model.

:func:`qmatmul_blockwise` is a ``custom_vjp`` whose only residual is the quantized array itself.
Forward and backward each run a ``lax.scan`` over row blocks of the kernel: one block is
dequantized, multiplied and dropped before the next one is built. The two loops have different
bodies, so XLA cannot merge them (common-subexpression elimination merged a plain "dequantize
again in the backward" back into one kernel kept alive), and a loop body cannot be hoisted to
the start of the step. No gradient is computed for the kernel: it is frozen, its cotangent is
zero (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, section 3: gradients flow
through the 4-bit weights to the adapters only).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.quant._array import QuantizedArray, _accumulation_dtype, _dequantize

__all__ = ["DEFAULT_BLOCK_BYTES", "qmatmul_blockwise", "row_blocks"]

# Bytes of one dequantized row block (in the compute dtype). 8 MiB keeps each block matmul large
# enough for the CPU's GEMM ([tokens, 512] x [512, 4096] for a 7B attention kernel in fp32) while
# a 7B MLP kernel (180 MB in fp32) is never more than ~5% materialised.
DEFAULT_BLOCK_BYTES = 8 * 2**20


def row_blocks(q: QuantizedArray, dtype: Any, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """How many row blocks :func:`qmatmul_blockwise` cuts ``q`` into (1: one plain matmul).

    At least 2 whenever ``q`` has 2 or more quantization blocks along ``d_in``.

    A row block is a whole number of quantization blocks (so it owns its scales) and the blocks
    divide the kernel evenly (so the packed bytes are reshaped, never copied or padded). A kernel
    whose rows do not split into whole quantization blocks (``d_in % block_size != 0``) gets 1.
    """
    d_in, d_out = q.shape[0], int(math.prod(q.shape[1:]))
    nb = q.scales.shape[0]
    if d_in % q.block_size or (q.scheme != "int8" and q.block_size % 2):
        return 1
    row_bytes = d_out * np.dtype(dtype).itemsize
    per_block = max(1, int(block_bytes // max(row_bytes * q.block_size, 1)))
    # the largest divisor of nb whose blocks hold at most `per_block` quantization blocks, and
    # never the whole kernel when it has 2 or more quantization blocks: a one-block "loop" is
    # simplified away by XLA, whose CSE then merges the backward dequantize with the forward one.
    limit = min(per_block, nb // 2) if nb > 1 else 1
    best = max(k for k in range(1, limit + 1) if nb % k == 0)
    return nb // best


def _chunks(q: QuantizedArray, n: int) -> tuple[QuantizedArray, Any]:
    """``q`` cut into ``n`` row blocks along a new leading axis (reshapes only, no copy).

    Returns a QuantizedArray whose children have a leading ``[n]`` axis and whose static shape is
    one block's (``lax.scan`` slices the children), and the per-block static shape.
    """
    d_in, rest = q.shape[0], q.shape[1:]
    rows = d_in // n
    packed = q.packed.reshape(n, q.packed.shape[0] // n, *q.packed.shape[1:])
    scales = q.scales.reshape(n, q.scales.shape[0] // n, *q.scales.shape[1:])
    scale_scales = None
    if q.scale_scales is not None:
        scale_scales = q.scale_scales.reshape(n, q.scale_scales.shape[0] // n, *q.scale_scales.shape[1:])
    stacked = QuantizedArray(
        packed=packed,
        scales=scales,
        scale_scales=scale_scales,
        scale_offset=q.scale_offset,  # one scalar for the whole kernel: a scan constant, not sliced
        shape=(rows, *rest),
        dtype=q.dtype,
        scheme=q.scheme,
        block_size=q.block_size,
    )
    return stacked, rows


def _block(stacked: QuantizedArray, packed, scales, scale_scales) -> QuantizedArray:
    return QuantizedArray(
        packed=packed,
        scales=scales,
        scale_scales=scale_scales,
        scale_offset=stacked.scale_offset,
        shape=stacked.shape,
        dtype=stacked.dtype,
        scheme=stacked.scheme,
        block_size=stacked.block_size,
    )


def _xs(stacked: QuantizedArray) -> tuple:
    return (stacked.packed, stacked.scales, stacked.scale_scales)


def _forward(x2: jax.Array, q: QuantizedArray, dtype: np.dtype, n: int) -> jax.Array:
    """``x2: [m, d_in]`` -> ``[m, d_out]`` in ``dtype``, one dequantized row block at a time."""
    d_out = int(math.prod(q.shape[1:]))
    acc_dtype = _accumulation_dtype(dtype)
    if n == 1:  # a kernel of one quantization block (or rows that do not split into blocks)
        w = _dequantize(q, dtype=dtype).reshape(q.shape[0], d_out)
        return jnp.dot(x2, w, preferred_element_type=acc_dtype).astype(dtype)
    stacked, rows = _chunks(q, n)
    x_blocks = x2.reshape(x2.shape[0], n, rows).transpose(1, 0, 2)  # [n, m, rows]

    def body(acc, inputs):
        xb, packed, scales, scale_scales = inputs
        w = _dequantize(_block(stacked, packed, scales, scale_scales), dtype=dtype).reshape(rows, d_out)
        return acc + jnp.dot(xb, w, preferred_element_type=acc_dtype), None

    acc0 = jnp.zeros((x2.shape[0], d_out), acc_dtype)
    acc, _ = jax.lax.scan(body, acc0, (x_blocks, *_xs(stacked)))
    return acc.astype(dtype)


def _backward_dx(dy2: jax.Array, q: QuantizedArray, dtype: np.dtype, n: int) -> jax.Array:
    """``dy2: [m, d_out]`` -> ``dx: [m, d_in] = dy W^T``, dequantizing ``W`` again block by block."""
    d_in, d_out = q.shape[0], int(math.prod(q.shape[1:]))
    acc_dtype = _accumulation_dtype(dtype)
    if n == 1:  # XLA may merge this with the forward dequantize (optimization barriers do not stop it on CPU)
        w = _dequantize(q, dtype=dtype).reshape(d_in, d_out)
        return jnp.dot(dy2, w.T, preferred_element_type=acc_dtype).astype(dtype)
    stacked, rows = _chunks(q, n)

    def body(carry, inputs):
        packed, scales, scale_scales = inputs
        w = _dequantize(_block(stacked, packed, scales, scale_scales), dtype=dtype).reshape(rows, d_out)
        return carry, jnp.dot(carry, w.T, preferred_element_type=acc_dtype).astype(dtype)

    _, dx_blocks = jax.lax.scan(body, dy2, _xs(stacked))  # [n, m, rows]
    return dx_blocks.transpose(1, 0, 2).reshape(dy2.shape[0], d_in)


def _zero_cotangent(x: Any) -> Any:
    if x is None:
        return None
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros(x.shape, x.dtype)
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmatmul(x2: jax.Array, q: QuantizedArray, dtype: np.dtype, n: int) -> jax.Array:
    return _forward(x2, q, dtype, n)


def _qmatmul_fwd(x2, q, dtype, n):
    return _forward(x2, q, dtype, n), q  # the residual is the 4-bit kernel, never the float one


def _qmatmul_bwd(dtype, n, q, dy2):
    dx = _backward_dx(dy2.astype(dtype), q, dtype, n)
    return dx, jax.tree.map(_zero_cotangent, q)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def qmatmul_blockwise(
    x: jax.Array,
    q: QuantizedArray,
    dtype: Any = None,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> jax.Array:
    """``x @ dequantize(q)`` holding at most one dequantized row block of ``q``, forward and backward.

    Differentiable in ``x`` only (``q`` is frozen: its cotangent is zero, nothing is computed for
    it). Sums the row blocks in the accumulation dtype (float32 for bf16/fp16), so the result
    equals the plain dequantize-then-matmul to float rounding (reassociation of the sum).

    Args:
      x: ``[..., d_in]`` activations.
      q: ``[d_in, *rest]`` quantized kernel.
      dtype: compute dtype of both operands (default ``x.dtype``).
      block_bytes: largest dequantized row block, in bytes of ``dtype`` (default 8 MiB).

    Returns:
      ``[..., *rest]`` in ``dtype``.
    """
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"qmatmul_blockwise expects a QuantizedArray kernel; got {type(q).__name__}")
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    if x.shape[-1] != q.shape[0]:
        raise ValueError(
            f"qmatmul_blockwise: x has {x.shape[-1]} features (shape {tuple(x.shape)}) "
            f"but the kernel expects {q.shape[0]} (shape {q.shape})"
        )
    if not (isinstance(block_bytes, (int, np.integer)) and block_bytes > 0):
        raise ValueError(f"qmatmul_blockwise: block_bytes must be a positive integer; got {block_bytes!r}")
    n = row_blocks(q, dtype, int(block_bytes))
    lead = x.shape[:-1]
    x2 = x.astype(dtype).reshape(-1, q.shape[0])
    y = _qmatmul(x2, q, dtype, n)
    return y.reshape(*lead, *q.shape[1:])
