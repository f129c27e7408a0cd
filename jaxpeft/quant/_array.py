"""``QuantizedArray``: a 4-bit (or 8-bit) weight as a pytree, and its (de)quantization.

A weight ``w: [d_in, *rest]`` is cut along axis 0 into blocks of ``block_size`` rows; each
block of each output position ``rest`` has one absmax scale. A kernel whose input axis is not
axis 0 (a heads-first Einsum kernel ``[heads, d_model, head_dim]``) is blocked along its input
axis instead (``axis``): the axes in front of it index arrays quantized on their own, so the
children keep the kernel's layout. Codes are nearest-value indices
into a codebook on [-1, 1] (NF4, FP4, int4) or symmetric int8 steps. See
``docs/quantization.md`` for the byte layout and the bits-per-parameter accounting.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.quant import _codebooks, _packing

__all__ = [
    "SCHEMES",
    "SCALE_BLOCK_SIZE",
    "QuantizedArray",
    "quantize_array",
    "quantize_like",
    "dequantize_array",
    "qmatmul",
    "einsum",
]

FOUR_BIT_SCHEMES = ("nf4", "fp4", "int4")
SCHEMES = (*FOUR_BIT_SCHEMES, "int8")

# Double quantization: the first-level absmax values, minus their mean, are quantized to the
# 8-bit dynamic map in blocks of 256 (QLoRA section 3, "Double Quantization").
SCALE_BLOCK_SIZE = 256


def _nbytes(x: Any) -> int:
    if x is None:
        return 0
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class QuantizedArray:
    """A quantized weight: arrays as pytree children, everything else static.

    Children (pytree keys, so paths read ``.../kernel/packed``):
      packed: ``[ceil(d_in / 2), *rest]`` uint8, two codes per byte (4-bit schemes), or
        ``[d_in, *rest]`` int8 (``scheme="int8"``).
      scales: ``[ceil(d_in / block_size), *rest]`` absmax per block: float32, or uint8 codes
        into the dynamic 8-bit map when double quantized.
      scale_scales: ``[ceil(d_in / block_size), ceil(prod(rest) / 256)]`` float32 absmax of each
        256-block of centred scales (double quantization only, else None).
      scale_offset: ``[]`` float32 mean of the first-level scales (double quantization only).

    Static fields:
      shape, dtype: of the original array. scheme: ``"nf4" | "fp4" | "int4" | "int8"``.
      block_size: rows of the blocked axis per absmax scale.
      axis: the blocked axis of ``shape`` (the layer's input axis; default 0). With ``axis = k > 0``
        the first ``k`` axes are batch axes of the quantization, each index an axis-0 quantized
        array of its own: ``packed: [*shape[:k], ceil(shape[k] / 2), *shape[k+1:]]``, ``scales:
        [*shape[:k], nblocks, *shape[k+1:]]``, ``scale_scales: [*shape[:k], nblocks, nsb]``,
        ``scale_offset: [*shape[:k]]`` (after any ``stack_shape`` axes).
    """

    packed: jax.Array
    scales: jax.Array
    scale_scales: jax.Array | None = None
    scale_offset: jax.Array | None = None
    shape: tuple[int, ...]
    dtype: np.dtype
    scheme: str
    block_size: int
    axis: int = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading axes of the children beyond one array's layout: a stack of layers, each quantized on its own.

        ``quantize(..., stack_axes=k)`` quantizes each slice over the first ``k`` axes of a stacked kernel
        (``nn.scan`` / ``nnx.vmap`` layers, ``[L, d_in, *rest]``); ``shape`` stays one layer's, so when
        ``nn.scan`` / ``nnx.scan`` slice the children each layer holds a consistent ``QuantizedArray``.
        ``()`` for an ordinary quantized array.
        """
        return tuple(int(d) for d in self.packed.shape[: max(self.packed.ndim - len(self.shape), 0)])

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The shape of the array this stands for: ``stack_shape + shape``."""
        return self.stack_shape + tuple(self.shape)

    @property
    def num_params(self) -> int:
        """Number of elements of the original array (every layer of a stack)."""
        return int(math.prod(self.logical_shape))

    size = num_params

    @property
    def double_quant(self) -> bool:
        return self.scale_scales is not None

    @property
    def nbytes(self) -> int:
        """Bytes actually held: the sum of the children's ``nbytes``."""
        return sum(_nbytes(x) for x in (self.packed, self.scales, self.scale_scales, self.scale_offset))

    @property
    def bits_per_param(self) -> float:
        """``nbytes * 8 / num_params``, from the real array sizes (padding and scales included)."""
        return self.nbytes * 8 / max(self.num_params, 1)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """Same as ``dequantize_array(self, dtype)``."""
        return dequantize_array(self, dtype)

    def __repr__(self) -> str:
        if not hasattr(self.packed, "shape"):  # a tree of specs or shardings in the array's structure
            return f"QuantizedArray(shape={self.shape}, packed={self.packed!r}, scales={self.scales!r})"
        dq = (f", axis={self.axis}" if self.axis else "") + (", double_quant" if self.double_quant else "")
        if self.stack_shape:
            dq += f", stack_shape={self.stack_shape}"
        return (
            f"QuantizedArray(shape={self.shape}, dtype={np.dtype(self.dtype).name}, scheme={self.scheme!r}, "
            f"block_size={self.block_size}{dq}, {self.bits_per_param:.3f} bits/param)"
        )


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["packed", "scales", "scale_scales", "scale_offset"],
    meta_fields=["shape", "dtype", "scheme", "block_size", "axis"],
)


# ----------------------------------------------------------------------------- validation


def _check_block_size(block_size: Any, scheme: str, where: str = "") -> None:
    ok = isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool) and block_size > 0
    if not ok:
        raise ValueError(f"{where}block_size must be a positive integer (e.g. 64) or None; got {block_size!r}")
    if scheme in FOUR_BIT_SCHEMES and block_size % 2:
        raise ValueError(
            f"{where}block_size must be even for 4-bit scheme {scheme!r} so that no byte holds codes "
            f"of two blocks; got {block_size}"
        )


def _check_scheme(scheme: Any, where: str = "") -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"{where}scheme must be one of {SCHEMES}; got {scheme!r}")


def _check_array(w: Any, where: str = "") -> None:
    dtype = getattr(w, "dtype", None)
    shape = getattr(w, "shape", None)
    if dtype is None or shape is None:
        raise TypeError(f"{where}expected a floating-point array; got {type(w).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{where}expected a floating-point array (float32, bfloat16, float16, ...); "
            f"got dtype {np.dtype(dtype).name} with shape {tuple(shape)}"
        )
    if len(shape) == 0 or math.prod(shape) == 0:
        raise ValueError(f"{where}expected an array with at least one axis and one element; got shape {tuple(shape)}")


def _resolve_block_size(block_size: int | None, d_in: int, scheme: str) -> int:
    if block_size is None:  # one block per output position (per-channel absmax)
        return d_in + (d_in % 2 if scheme in FOUR_BIT_SCHEMES else 0)
    return int(block_size)


# ----------------------------------------------------------------------------- quantize


def _blockwise_absmax(w: jax.Array, block_size: int) -> tuple[jax.Array, jax.Array]:
    """``w: [d_in, *rest]`` -> ``(blocks [nb, block, *rest] float32, absmax [nb, *rest] float32)``."""
    d_in, rest = w.shape[0], w.shape[1:]
    nb = -(-d_in // block_size)
    w = w.astype(jnp.float32)
    if nb * block_size != d_in:  # zero rows do not change an absmax
        w = jnp.pad(w, [(0, nb * block_size - d_in)] + [(0, 0)] * len(rest))
    blocks = w.reshape(nb, block_size, *rest)
    return blocks, jnp.max(jnp.abs(blocks), axis=1)


def _encode(x: jax.Array, table: np.ndarray) -> jax.Array:
    """Nearest codebook code of each normalised value (uint8)."""
    midpoints, codes = _codebooks.nearest_code_tables(table)
    # A chain of comparisons against the 15 midpoints fuses into one elementwise pass.
    rank = sum((x > jnp.float32(m)).astype(jnp.uint8) for m in midpoints)
    if np.array_equal(codes, np.arange(len(codes))):
        return rank
    return jnp.asarray(codes)[rank]


def _double_quantize(scales: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``scales: [nb, *rest]`` float32 -> ``(codes uint8 [nb, *rest], absmax [nb, nsb], mean [])``."""
    nb, rest = scales.shape[0], scales.shape[1:]
    r = int(math.prod(rest))
    nsb = -(-r // SCALE_BLOCK_SIZE)
    offset = jnp.mean(scales)
    centred = (scales - offset).reshape(nb, r)
    centred = jnp.pad(centred, [(0, 0), (0, nsb * SCALE_BLOCK_SIZE - r)])
    blocks = centred.reshape(nb, nsb, SCALE_BLOCK_SIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
    midpoints = (_codebooks.DYNAMIC_MAP[:-1].astype(np.float64) + _codebooks.DYNAMIC_MAP[1:]) / 2
    codes = jnp.searchsorted(jnp.asarray(midpoints, jnp.float32), normed, side="left").astype(jnp.uint8)
    codes = codes.reshape(nb, nsb * SCALE_BLOCK_SIZE)[:, :r].reshape(nb, *rest)
    return codes, absmax, offset


@functools.partial(jax.jit, static_argnames=("scheme", "block_size", "double_quant"))
def _quantize(w, *, scheme: str, block_size: int, double_quant: bool):
    d_in = w.shape[0]
    blocks, absmax = _blockwise_absmax(w, block_size)
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[:, None]
    rows = normed.reshape(-1, *w.shape[1:])
    if scheme == "int8":
        codes = jnp.clip(jnp.round(rows * _codebooks.INT8_MAX), -_codebooks.INT8_MAX, _codebooks.INT8_MAX)
        packed = codes.astype(jnp.int8)[:d_in]
    else:
        table = _codebooks.CODEBOOKS[scheme]
        codes = _encode(rows[: d_in + d_in % 2], table)
        if d_in % 2:  # the padding nibble encodes 0.0 whatever the block's values
            codes = codes.at[d_in].set(_codebooks.zero_code(table))
        packed = _packing.pack_nibbles(codes)
    if not double_quant:
        return packed, absmax, None, None
    return packed, *_double_quantize(absmax)


def _check_axis(axis: Any, shape: tuple[int, ...], where: str = "") -> int:
    ok = isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and -len(shape) <= axis < len(shape)
    if not ok:
        raise ValueError(f"{where}axis must be an axis of the array (shape {tuple(shape)}); got {axis!r}")
    return int(axis) % len(shape)


def _over_leading(fn, k: int):
    """``fn`` mapped over ``k`` leading axes of every argument (the quantization's batch axes)."""
    for _ in range(k):
        fn = jax.vmap(fn)
    return fn


def quantize_array(
    w: Any,
    *,
    scheme: str = "nf4",
    block_size: int | None = 64,
    double_quant: bool = False,
    axis: int = 0,
) -> QuantizedArray:
    """Quantize an array blockwise along ``axis`` (default 0).

    Blockwise absmax quantization (Dettmers et al. 2022, https://arxiv.org/abs/2110.02861) with the
    NF4 data type and optional double quantization of the scales (QLoRA, Dettmers et al. 2023,
    https://arxiv.org/abs/2305.14314).

    Args:
      w: ``[d_in, *rest]`` floating-point array, Flax kernel layout (input axis first).
      scheme: ``"nf4"`` (default), ``"fp4"``, ``"int4"`` (symmetric, -7..7) or ``"int8"`` (-127..127).
      block_size: rows of axis 0 per absmax scale (positive, even for 4-bit schemes); ``None``
        for one scale per output position (a block spanning all of ``d_in``).
      double_quant: quantize the absmax scales to 8 bits in blocks of 256, after subtracting
        their mean (about 0.127 instead of 0.5 bits per parameter for scales at block 64).
      axis: the axis cut into blocks: the layer's input axis (1 for a heads-first Einsum kernel
        ``[heads, d_model, head_dim]``). The axes before it are batch axes: each of their indices
        is quantized on its own, as an axis-0 array.

    Returns:
      A :class:`QuantizedArray`; works eagerly and inside ``jax.jit``.

    Raises:
      TypeError: ``w`` is not a floating-point array.
      ValueError: bad ``scheme`` or ``block_size``, or an empty / 0-d array.
    """
    _check_scheme(scheme)
    _check_array(w)
    if block_size is not None:
        _check_block_size(block_size, scheme)
    axis = _check_axis(axis, tuple(w.shape))
    block_size = _resolve_block_size(block_size, w.shape[axis], scheme)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool; got {double_quant!r}")
    one = functools.partial(_quantize, scheme=scheme, block_size=block_size, double_quant=double_quant)
    packed, scales, scale_scales, scale_offset = _over_leading(one, axis)(jnp.asarray(w))
    return QuantizedArray(
        packed=packed,
        scales=scales,
        scale_scales=scale_scales,
        scale_offset=scale_offset,
        shape=tuple(int(s) for s in w.shape),
        dtype=np.dtype(w.dtype),
        scheme=scheme,
        block_size=block_size,
        axis=axis,
    )


def quantize_like(w: Any, like: QuantizedArray) -> QuantizedArray:
    """``w`` quantized in ``like``'s layout: its scheme, block size, double quantization, blocked
    ``axis`` and stack axes (each slice on its own), e.g. a new kernel replacing a quantized one.

    Args:
      w: ``like.logical_shape`` floating-point array.
      like: the quantized array whose layout ``w`` takes.
    """
    if tuple(w.shape) != tuple(like.logical_shape):
        raise ValueError(f"quantize_like: w has shape {tuple(w.shape)}, the layout is for {like.logical_shape}")
    fn = functools.partial(quantize_array, scheme=like.scheme, block_size=like.block_size,
                           double_quant=like.double_quant, axis=like.axis)
    return _over_leading(fn, len(like.stack_shape))(w)


# ----------------------------------------------------------------------------- dequantize


def _dequantize_scales(q: QuantizedArray) -> jax.Array:
    """First-level absmax scales ``[nb, *rest]`` as float32."""
    if q.scale_scales is None:
        return q.scales.astype(jnp.float32)
    nb, rest = q.scales.shape[0], q.scales.shape[1:]
    r = int(math.prod(rest))
    nsb = q.scale_scales.shape[-1]
    centred = jnp.asarray(_codebooks.DYNAMIC_MAP)[q.scales].reshape(nb, r)
    centred = jnp.pad(centred, [(0, 0), (0, nsb * SCALE_BLOCK_SIZE - r)]).reshape(nb, nsb, SCALE_BLOCK_SIZE)
    centred = centred * q.scale_scales[..., None].astype(jnp.float32)
    return (centred.reshape(nb, nsb * SCALE_BLOCK_SIZE)[:, :r] + q.scale_offset).reshape(nb, *rest)


def dequantize_array(q: QuantizedArray, dtype: Any = None) -> jax.Array:
    """The array a :class:`QuantizedArray` stands for: ``codebook[code] * absmax`` per block.

    Meant to run inside the jitted forward pass, where XLA fuses unpacking, lookup and scaling
    into one elementwise loop that writes the kernel once, in ``dtype``.

    Args:
      q: the quantized array, original shape ``[d_in, *rest]``.
      dtype: result dtype (e.g. ``jnp.bfloat16`` for the compute dtype); default the original.

    Returns:
      ``[*q.stack_shape, d_in, *rest]`` array of ``dtype``. Arithmetic is float32, rounded once to ``dtype``.
    """
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"dequantize_array expects a QuantizedArray; got {type(q).__name__}")
    dtype = np.dtype(q.dtype if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dequantize_array: dtype must be floating-point (e.g. bfloat16, float32); got {dtype.name}")
    # A stack of layers: each slice is its own quantized array.
    return _over_leading(functools.partial(_dequantize, dtype=dtype), len(q.stack_shape))(q)


# Jitted so that an eager call compiles one fused program per (shape, scheme, dtype) rather than
# dispatching each step; inside an outer jit it is inlined and fused with its consumer.
@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
    if q.axis == 0:
        return _dequantize_rows(q, dtype)
    inner = q.shape[q.axis :]

    def one(packed, scales, scale_scales, scale_offset):  # one index of the leading axes: an axis-0 array
        part = QuantizedArray(packed=packed, scales=scales, scale_scales=scale_scales, scale_offset=scale_offset,
                              shape=inner, dtype=q.dtype, scheme=q.scheme, block_size=q.block_size)
        return _dequantize_rows(part, dtype)

    return _over_leading(one, q.axis)(q.packed, q.scales, q.scale_scales, q.scale_offset)


def _dequantize_rows(q: QuantizedArray, dtype: np.dtype) -> jax.Array:
    """An axis-0 quantized array ``[d_in, *rest]`` back to ``dtype``."""
    d_in, rest = q.shape[0], q.shape[1:]
    scales = _dequantize_scales(q)  # [nb, *rest]
    nb, block = scales.shape[0], q.block_size
    if q.scheme == "int8":
        values = q.packed.astype(jnp.float32)
        scales = scales * jnp.float32(1.0 / _codebooks.INT8_MAX)
    else:
        # Shift/mask and a 16-entry lookup: measured on CPU, this beats a 256-entry byte->pair
        # table and a select tree (benchmarks/bench_quant.py); XLA vectorises it into one loop.
        codes = _packing.unpack_nibbles(q.packed, q.packed.shape[0] * 2)
        values = jnp.asarray(_codebooks.CODEBOOKS[q.scheme])[codes]
    rows = values.shape[0]
    if rows < nb * block:  # the last block is partial: pad so rows split evenly into blocks
        values = jnp.pad(values, [(0, nb * block - rows)] + [(0, 0)] * len(rest))
    # Rows [b * block, (b + 1) * block) use scale row b.
    w = values[: nb * block].reshape(nb, block, *rest) * scales[:, None]
    return w.reshape(nb * block, *rest)[:d_in].astype(dtype)


def _accumulation_dtype(dtype: np.dtype) -> np.dtype:
    # Low-precision floats multiply and accumulate in float32 (as on GPU/TPU matrix units), then
    # round once; on XLA:CPU this is also the fast bf16 path (bf16 -> bf16 dots are upcast).
    return np.dtype(jnp.float32) if dtype.itemsize < 4 and jnp.issubdtype(dtype, jnp.floating) else dtype


def qmatmul(x: jax.Array, w: QuantizedArray | jax.Array, dtype: Any = None) -> jax.Array:
    """``x @ w`` contracting the last axis of ``x`` with axis 0 of ``w``, dequantizing ``w`` first.

    Args:
      x: ``[..., d_in]`` activations.
      w: ``[d_in, *rest]`` :class:`QuantizedArray` (or a plain array).
      dtype: compute dtype for both operands (default: ``x.dtype``).

    Returns:
      ``[..., *rest]`` in ``dtype``.
    """
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    kernel = dequantize_array(w, dtype) if isinstance(w, QuantizedArray) else jnp.asarray(w, dtype)
    if x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"qmatmul: x has {x.shape[-1]} features (shape {x.shape}) "
            f"but w expects {kernel.shape[0]} (shape {kernel.shape})"
        )
    out = jnp.tensordot(
        x.astype(dtype), kernel, axes=((x.ndim - 1,), (0,)), preferred_element_type=_accumulation_dtype(dtype)
    )
    return out.astype(dtype)


def einsum(subscripts: str, *operands: Any, dtype: Any = None, **kwargs: Any) -> jax.Array:
    """``jnp.einsum`` that dequantizes every :class:`QuantizedArray` operand to ``dtype`` first.

    ``dtype`` defaults to the first non-quantized operand's dtype (else the first original dtype).
    """
    if dtype is None:
        plain = [o for o in operands if not isinstance(o, QuantizedArray)]
        dtype = plain[0].dtype if plain else operands[0].dtype
    arrays = [dequantize_array(o, dtype) if isinstance(o, QuantizedArray) else jnp.asarray(o, dtype) for o in operands]
    kwargs.setdefault("preferred_element_type", _accumulation_dtype(np.dtype(dtype)))
    return jnp.einsum(subscripts, *arrays, **kwargs).astype(dtype)
