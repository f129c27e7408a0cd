"""Products with a frozen quantized kernel that never hold more than one dequantized block of it.

``x @ dequantize(q)`` written plainly makes the dequantized kernel a residual of autodiff: the
backward pass needs ``W`` for ``dx = dy W^T``, so every layer's float kernel stays alive from its
forward matmul to its backward one, and a QLoRA step peaks at the size of the *float* model.

:func:`qeinsum_blockwise` (any ``einsum(equation, x, kernel)``: Dense, DenseGeneral, Einsum
layers) and :func:`qmatmul_blockwise` (``x @ kernel``) are a ``custom_vjp`` whose only residual
is the quantized array itself: the backward pass dequantizes the kernel again and computes only
``dx``. No gradient is computed for the kernel: it is frozen, its cotangent is zero (QLoRA,
Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, section 3: gradients flow through the
4-bit weights to the adapters only).

A kernel of at most ``block_bytes`` (8 MiB) dequantized is used whole; a larger one is cut along
its blocked axis (``q.axis``) into row blocks, and forward and backward each run a ``lax.scan``
over them: one block is dequantized, used and dropped before the next one is built, each block
reading and writing its own slices of ``x``, ``y``, ``dy`` or ``dx`` in place, or adding into an
accumulator when the blocked axis is contracted.

Two things XLA does would undo this, and both are prevented by tying a dequantize to the
activation it multiplies (``_tied``: the codes OR-ed with a zero computed from ``x`` or ``dy``):
common-subexpression elimination would merge the backward's dequantize with the forward's (one
float kernel kept alive between them; an ``optimization_barrier`` does not survive on XLA:CPU),
and the scheduler would hoist a dequantize that depends only on the weights to the start of the
step (every layer's float kernel at once). Loop bodies read the layer's activations anyway; the
loops' zero carries are computed from them for the same reason (``_zeros_after``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.quant._array import QuantizedArray, _accumulation_dtype, _dequantize

__all__ = ["DEFAULT_BLOCK_BYTES", "qeinsum_blockwise", "qmatmul_blockwise", "row_blocks"]

# Bytes of one dequantized row block (in the compute dtype). 8 MiB keeps each block matmul large
# enough for the CPU's GEMM ([tokens, 512] x [512, 4096] for a 7B attention kernel in fp32) while
# a 7B MLP kernel (180 MB in fp32) is never more than ~5% materialised.
DEFAULT_BLOCK_BYTES = 8 * 2**20


def row_blocks(q: QuantizedArray, dtype: Any, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """How many row blocks :func:`qmatmul_blockwise` / :func:`qeinsum_blockwise` cut ``q`` into (1: one plain product).

    1 when the whole kernel fits ``block_bytes`` in ``dtype``. Otherwise each row block is a whole
    number of quantization blocks (so it owns its scales), at most ``block_bytes`` where the
    quantization blocks allow, and the blocks divide the axis evenly (so every block has one static
    shape). A kernel whose blocked axis does not split into whole quantization blocks
    (``shape[axis] % block_size != 0``) gets 1.
    """
    d_in = q.shape[q.axis]
    other = int(math.prod(q.shape)) // max(d_in, 1)
    nb = q.scales.shape[q.axis - q.ndim]
    if d_in % q.block_size or (q.scheme != "int8" and q.block_size % 2):
        return 1
    row_bytes = other * np.dtype(dtype).itemsize
    if d_in * row_bytes <= block_bytes:
        return 1
    per_block = max(1, int(block_bytes // max(row_bytes * q.block_size, 1)))
    # the largest divisor of nb whose blocks hold at most `per_block` quantization blocks
    best = max(k for k in range(1, min(per_block, nb) + 1) if nb % k == 0)
    return nb // best


def _row_block(q: QuantizedArray, k: jax.Array, rows: int) -> QuantizedArray:
    """Row block ``k`` (``rows`` rows of the blocked axis) of ``q``: dynamic slices of its children, no copy of the rest.

    ``packed`` holds two codes per byte along the blocked axis (one for int8), ``scales`` and
    ``scale_scales`` one row per quantization block; ``scale_offset`` is per array, never sliced.
    """
    a = q.axis
    per_byte = 1 if q.scheme == "int8" else 2
    srows = rows // q.block_size

    return QuantizedArray(
        packed=_cut(q.packed, a, k, rows // per_byte),
        scales=_cut(q.scales, a, k, srows),
        scale_scales=None if q.scale_scales is None else _cut(q.scale_scales, a, k, srows),
        scale_offset=q.scale_offset,
        shape=(*q.shape[:a], rows, *q.shape[a + 1 :]),
        dtype=q.dtype,
        scheme=q.scheme,
        block_size=q.block_size,
        axis=a,
    )


def _parts(equation: str) -> tuple[str, str, str]:
    operands, out = equation.replace(" ", "").split("->")
    lhs, rhs = operands.split(",")
    return lhs, rhs, out


def _axis_of(spec: str, label: str, ndim: int) -> int:
    """The axis of an operand that carries ``label`` in its einsum spec (``"...d"``, ``"btd"``)."""
    if "..." in spec:
        head, tail = spec.split("...")
        return head.index(label) if label in head else ndim - len(tail) + tail.index(label)
    return spec.index(label)


def _cut(x: jax.Array, axis: int, k: jax.Array, rows: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, k * rows, rows, axis=axis)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one product is cut: ``n`` blocks of ``rows`` along the kernel's blocked axis, and where that axis is in x and y."""

    equation: str
    n: int
    rows: int
    x_axis: int | None  # None: the blocked axis is not an axis of x (an output axis of the kernel)
    y_axis: int | None  # None: the blocked axis is summed away (contracted with x)
    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...]
    dtype: np.dtype
    precision: Any

    def dot(self, x, w):
        acc = _accumulation_dtype(self.dtype)
        return jnp.einsum(self.equation, x, w, precision=self.precision, preferred_element_type=acc)

    def x_block(self) -> tuple[int, ...]:
        if self.x_axis is None:
            return self.x_shape
        return (*self.x_shape[: self.x_axis], self.rows, *self.x_shape[self.x_axis + 1 :])


def _zeros_after(shape: tuple[int, ...], dtype: Any, operand: jax.Array) -> jax.Array:
    """A zero buffer computed from ``operand``, so that it cannot exist before ``operand`` does.

    A loop's zero-initialised carry depends on nothing, so XLA merges the zero buffers of every
    layer into one and schedules each loop's copy of it early: the backward loops' copies before
    the forward pass ends, one activation-sized buffer per layer held through the step (measured
    on XLA:CPU, which also drops optimization barriers). ``|a| * 0`` for one finite element ``a``
    of the operand is a zero XLA does not fold (it would be NaN for an infinite ``a``: then 0).
    """
    if operand.size == 0:  # nothing is computed from an empty operand
        return jnp.zeros(shape, dtype)
    a = operand.reshape(-1)[0].astype(dtype)
    zero = jnp.where(jnp.isfinite(a), jnp.abs(a) * 0, jnp.zeros((), dtype))
    return jnp.broadcast_to(zero, shape)


def _tied(q: QuantizedArray, operand: jax.Array) -> QuantizedArray:
    """``q`` whose codes are OR-ed with a zero computed from ``operand``: the same values, another expression.

    XLA can neither start its dequantize before ``operand`` exists (it would hoist a dequantize that
    depends only on the weights to the start of the step, and hold every layer's float kernel) nor
    merge the forward's dequantize with the backward's (each is tied to its own operand).
    """
    zero = _zeros_after((), jnp.float32, operand).astype(q.packed.dtype)
    return dataclasses.replace(q, packed=q.packed | zero)


def _loop(plan: _Plan, shape: tuple[int, ...], dtype: Any, after: jax.Array, block, axis: int | None) -> jax.Array:
    """``plan.n`` blocks of ``block(k, after)`` summed (``axis`` None) or written at their rows of ``axis``, in a ``lax.scan``."""
    init = _zeros_after(shape, dtype, after)

    def body(out, k):
        part = block(k, after)
        if axis is None:
            return out + part, None
        return jax.lax.dynamic_update_slice_in_dim(out, part.astype(out.dtype), k * plan.rows, axis=axis), None

    out, _ = jax.lax.scan(body, init, jnp.arange(plan.n))
    return out


def _forward(plan: _Plan, x: jax.Array, q: QuantizedArray) -> jax.Array:
    """``einsum(equation, x, dequantize(q))`` in the plan's dtype, one dequantized row block at a time."""
    dtype, acc = plan.dtype, _accumulation_dtype(plan.dtype)
    if plan.n == 1:  # the whole kernel fits one block: dequantized after x exists, dropped after the product
        return plan.dot(x, _dequantize(_tied(q, x), dtype=dtype)).astype(dtype)

    def block(k, x):  # contracted: this block's rows of x; else all of x, and this block's slice of y
        w = _dequantize(_row_block(q, k, plan.rows), dtype=dtype)
        return plan.dot(x if plan.x_axis is None else _cut(x, plan.x_axis, k, plan.rows), w)

    y = _loop(plan, plan.y_shape, acc if plan.y_axis is None else dtype, x, block, plan.y_axis)
    return y.astype(dtype)


def _backward_dx(plan: _Plan, dy: jax.Array, q: QuantizedArray) -> jax.Array:
    """The cotangent of ``x`` through the linear map ``x -> einsum(equation, x, W)``, dequantizing ``W`` again block by block."""
    dtype, acc = plan.dtype, _accumulation_dtype(plan.dtype)

    def transpose(w, dyk, shape):
        (dxk,) = jax.linear_transpose(lambda xk: plan.dot(xk, w), jax.ShapeDtypeStruct(shape, dtype))(dyk.astype(acc))
        return dxk

    if plan.n == 1:  # dequantized again, after dy exists: not the forward's expression, so never merged with it
        return transpose(_dequantize(_tied(q, dy), dtype=dtype), dy, plan.x_shape).astype(dtype)

    def block(k, dy):  # an input axis: this block's rows of dx; else all of dx, from this block's slice of dy
        w = _dequantize(_row_block(q, k, plan.rows), dtype=dtype)
        return transpose(w, dy if plan.y_axis is None else _cut(dy, plan.y_axis, k, plan.rows), plan.x_block())

    dx = _loop(plan, plan.x_shape, acc if plan.x_axis is None else dtype, dy, block, plan.x_axis)
    return dx.astype(dtype)


def _zero_cotangent(x: Any) -> Any:
    if x is None:
        return None
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros(x.shape, x.dtype)
    return np.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qeinsum(plan: _Plan, x: jax.Array, q: QuantizedArray) -> jax.Array:
    return _forward(plan, x, q)


def _qeinsum_fwd(plan, x, q):
    return _forward(plan, x, q), q  # the residual is the 4-bit kernel, never the float one, never x


def _qeinsum_bwd(plan, q, dy):
    return _backward_dx(plan, dy, q), jax.tree.map(_zero_cotangent, q)


_qeinsum.defvjp(_qeinsum_fwd, _qeinsum_bwd)


def _check(where: str, q: Any, block_bytes: Any) -> None:
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"{where} expects a QuantizedArray kernel; got {type(q).__name__}")
    if q.stack_shape:
        raise ValueError(
            f"{where}: the kernel is a stack of {q.stack_shape} quantized arrays (shape {q.logical_shape}); "
            "pass one layer's (inside nn.scan / nnx.scan each layer sees its own slice)"
        )
    if not (isinstance(block_bytes, (int, np.integer)) and not isinstance(block_bytes, bool) and block_bytes > 0):
        raise ValueError(f"{where}: block_bytes must be a positive integer; got {block_bytes!r}")


def qeinsum_blockwise(
    equation: str,
    x: jax.Array,
    q: QuantizedArray,
    dtype: Any = None,
    *,
    precision: Any = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> jax.Array:
    """``einsum(equation, x, dequantize(q))`` holding at most one dequantized row block of ``q``, forward and backward.

    The kernel is cut along its blocked axis (``q.axis``, the axis ``quantize`` cut into absmax
    blocks), whatever that axis is in the equation: contracted with ``x`` (the usual input axis),
    an output axis, or an axis shared by ``x``, the kernel and ``y`` (per-head weights).
    Differentiable in ``x`` only (``q`` is frozen: its cotangent is zero, nothing is computed for
    it). Contracted blocks are summed in the accumulation dtype (float32 for bf16 / fp16), so the
    result equals the plain dequantize-then-einsum to float rounding (reassociation of the sum).

    Args:
      equation: ``"x,kernel->y"`` with explicit output (``"...d,dhk->...hk"``, ``"BTD,NDH->BTNH"``).
      x: the activations.
      q: one layer's quantized kernel (its labels are the equation's second operand).
      dtype: compute dtype of both operands (default ``x.dtype``).
      precision: passed to ``jnp.einsum``.
      block_bytes: largest dequantized row block, in bytes of ``dtype`` (default 8 MiB).

    Returns:
      ``y`` in ``dtype``.
    """
    where = "qeinsum_blockwise"
    _check(where, q, block_bytes)
    if not isinstance(equation, str) or "->" not in equation or equation.count(",") != 1:
        raise ValueError(f"{where}: equation must be explicit with two operands, 'x,kernel->y'; got {equation!r}")
    lhs, rhs, out = _parts(equation)
    if len(rhs) != q.ndim or "." in rhs:
        raise ValueError(f"{where}: equation {equation!r} names kernel axes {rhs!r} but the kernel has shape {q.shape}")
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    x = jnp.asarray(x).astype(dtype)
    try:
        y_shape = tuple(jax.eval_shape(functools.partial(jnp.einsum, equation), x, jax.ShapeDtypeStruct(q.shape, dtype)).shape)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: x of shape {tuple(x.shape)} does not fit {equation!r} with the kernel {q.shape}: {e}") from None
    label = rhs[q.axis]
    x_axis = _axis_of(lhs, label, x.ndim) if label in lhs else None
    y_axis = _axis_of(out, label, len(y_shape)) if label in out else None
    n = row_blocks(q, dtype, int(block_bytes))
    plan = _Plan(equation, n, q.shape[q.axis] // n, x_axis, y_axis, tuple(x.shape), y_shape, dtype, precision)
    return _qeinsum(plan, x, q)


def qmatmul_blockwise(
    x: jax.Array,
    q: QuantizedArray,
    dtype: Any = None,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> jax.Array:
    """``x @ dequantize(q)`` holding at most one dequantized row block of ``q``, forward and backward.

    :func:`qeinsum_blockwise` for the Dense contraction: ``x``'s last axis with the kernel's axis 0.

    Args:
      x: ``[..., d_in]`` activations.
      q: ``[d_in, *rest]`` quantized kernel, blocked along ``d_in`` (``q.axis == 0``).
      dtype: compute dtype of both operands (default ``x.dtype``).
      block_bytes: largest dequantized row block, in bytes of ``dtype`` (default 8 MiB).

    Returns:
      ``[..., *rest]`` in ``dtype``.
    """
    where = "qmatmul_blockwise"
    _check(where, q, block_bytes)
    if x.shape[-1] != q.shape[0]:
        raise ValueError(
            f"{where}: x has {x.shape[-1]} features (shape {tuple(x.shape)}) "
            f"but the kernel expects {q.shape[0]} (shape {q.shape})"
        )
    if q.axis != 0:
        raise ValueError(
            f"{where}: the kernel is blocked along axis {q.axis} (shape {q.shape}), not the contracted axis 0; "
            "use qeinsum_blockwise with the layer's equation"
        )
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    lead = x.shape[:-1]
    x2 = x.astype(dtype).reshape(-1, q.shape[0])  # [m, d_in]: one 2-D GEMM per block, whatever x's rank
    labels = "abcdefghjklnopqrstuvwxyz"[: q.ndim - 1]
    y = qeinsum_blockwise(f"mi,i{labels}->m{labels}", x2, q, dtype, block_bytes=block_bytes)
    return y.reshape(*lead, *q.shape[1:])
