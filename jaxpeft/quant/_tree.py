"""Quantize, dequantize and summarise whole parameter trees (Linen dicts, NNX State, any pytree)."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import tree as tree_lib
from jaxpeft.quant._array import (
    QuantizedArray,
    _check_block_size,
    _check_scheme,
    _over_leading,
    _resolve_block_size,
    dequantize_array,
    quantize_array,
)

__all__ = ["is_quantized", "default_targets", "quantize", "dequantize", "QuantSummary", "quant_summary"]

# Paths that hold tables or normalisation parameters, not matmul kernels: quantizing them needs
# an explicit opt-in (QLoRA keeps embeddings and norms in high precision).
_PROTECTED = re.compile(r"embed|norm", re.IGNORECASE)


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray` (or an NNX Variable holding one)."""
    return isinstance(_value(x), QuantizedArray)


def _is_leaf(x: Any) -> bool:
    return tree_lib._is_nnx_variable(x) or isinstance(x, QuantizedArray)


def _value(leaf: Any) -> Any:
    """The array an NNX Variable holds (``get_value`` where Flax has it), or the leaf itself."""
    return tree_lib.variable_value(leaf)


def default_targets(path: str, leaf: Any) -> bool:
    """Every floating-point leaf with at least 2 axes whose last path component is ``kernel``."""
    x = _value(leaf)
    return (
        path.rsplit("/", 1)[-1] == "kernel"
        and hasattr(x, "dtype")
        and hasattr(x, "ndim")
        and x.ndim >= 2
        and jnp.issubdtype(x.dtype, jnp.floating)
    )


def _describe_leaf(x: Any) -> str:
    if isinstance(x, QuantizedArray):
        return repr(x)
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None:
        return f"a {type(x).__name__}"
    return f"shape {tuple(shape)}, dtype {np.dtype(dtype).name}"


def _check_target(path: str, x: Any, allow_embeddings: bool) -> str | None:
    """Why the leaf at ``path`` cannot be quantized, or None."""
    if isinstance(x, QuantizedArray):
        return f"{path!r} ({_describe_leaf(x)}) is already quantized"
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        return f"{path!r} is {_describe_leaf(x)}, expected a floating-point array"
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return f"{path!r} ({_describe_leaf(x)}) is not floating-point; only float arrays can be quantized"
    if x.ndim == 0 or math.prod(x.shape) == 0:
        return f"{path!r} ({_describe_leaf(x)}) is empty or 0-d; expected an array with elements"
    if not allow_embeddings:
        if _PROTECTED.search(path):
            return (
                f"{path!r} ({_describe_leaf(x)}) looks like an embedding table or a norm parameter "
                f"(its path contains 'embed' or 'norm'); pass allow_embeddings=True to quantize it anyway"
            )
        if x.ndim < 2:
            return (
                f"{path!r} ({_describe_leaf(x)}) is 1-D (a bias or a norm scale?); expected a kernel with "
                f">= 2 axes, or pass allow_embeddings=True to quantize it anyway"
            )
    return None


def _ints_per_path(value: Any, hits: set[str], name: str) -> dict[str, int]:
    """``{selected path: int}`` from ``quantize``'s ``stack_axes`` (or ``axis``) argument, checked."""
    def check(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"quantize: {name}{where} must be a non-negative int; got {value!r}")
        return int(value)

    if isinstance(value, Mapping):
        unknown = sorted(set(value) - hits)
        if unknown:
            raise tree_lib.SelectorError(f"quantize: {name} names paths the selector did not pick: {unknown[:5]}")
        return {p: check(v, f"[{p!r}]") for p, v in value.items()}
    k = check(value, "")
    return {p: k for p in hits} if k else {}


def quantize(
    params: Any,
    targets: tree_lib.Selector = default_targets,
    *,
    scheme: str = "nf4",
    block_size: int | None = 64,
    double_quant: bool = False,
    allow_embeddings: bool = False,
    stack_axes: int | Mapping[str, int] = 0,
    axis: int | Mapping[str, int] = 0,
) -> Any:
    """Replace the selected leaves of ``params`` by :class:`QuantizedArray` leaves.

    The input tree is not modified; unselected leaves are shared, not copied. Everything is
    checked before any leaf is quantized.

    Args:
      params: any pytree of arrays (Linen params, NNX ``State``, nested dicts).
      targets: a ``jaxpeft.tree`` selector; default: every >= 2-D float leaf named ``kernel``.
      scheme: ``"nf4"``, ``"fp4"``, ``"int4"`` or ``"int8"``.
      block_size: rows of each kernel's input axis per absmax scale (``None``: one per column).
      double_quant: quantize the absmax scales too (QLoRA double quantization).
      allow_embeddings: allow quantizing leaves whose path contains ``embed`` / ``norm`` and 1-D
        leaves (refused by default: QLoRA keeps them in high precision).
      stack_axes: leading axes of each selected leaf that index a stack of layers (the kernels of an
        ``nn.scan`` / ``nn.vmap`` / ``nnx.vmap`` stack, ``[L, d_in, *rest]``: ``stack_axes=1``). Each slice is
        quantized on its own, so the scan hands every layer a whole ``QuantizedArray``
        (``QuantizedArray.stack_shape``). An int for every selected leaf, or ``{path: int}`` (paths not
        listed: 0). ``jp.quantize`` on an NNX model finds them itself.
      axis: the axis of each layer's kernel (after its stack axes) cut into blocks: the layer's input
        axis. 0 for ``Dense`` / ``Linear`` kernels ``[d_in, d_out]``; a heads-first Einsum kernel
        ``[heads, d_model, head_dim]`` (``"BTD,NDH->BTNH"``) contracts axis 1. An int for every
        selected leaf, or ``{path: int}`` (paths not listed: 0). ``jp.quantize`` on an NNX model,
        or with ``model=`` a Linen ``PeftLinen``, finds it itself (``QuantizedArray.axis``).

    Returns:
      A tree of the same structure with ``QuantizedArray`` at the selected leaves.

    Raises:
      SelectorError: ``targets`` matched nothing (the message lists the closest paths), or
        matched leaves that must not be quantized (each named with its shape and dtype).
      TypeError / ValueError: a selected leaf is not a float array; bad scheme or block size.
    """
    _check_scheme(scheme, "quantize: ")
    if block_size is not None:
        _check_block_size(block_size, scheme, "quantize: ")
    hits = set(tree_lib.select(params, targets, is_leaf=_is_leaf, what="params"))
    stacks = _ints_per_path(stack_axes, hits, "stack_axes")
    axes = _ints_per_path(axis, hits, "axis")
    problems = []
    for path, leaf in tree_lib.leaves_with_paths(params, is_leaf=_is_leaf):
        if path in hits:
            reason = _check_target(path, _value(leaf), allow_embeddings)
            k = stacks.get(path, 0)
            if not reason and k and np.ndim(_value(leaf)) < k + 2:
                reason = (f"{path!r} ({_describe_leaf(_value(leaf))}) has too few axes for stack_axes={k}: a stacked "
                          f"kernel needs {k} stack axes and then >= 2 kernel axes")
            if not reason and axes.get(path, 0) >= np.ndim(_value(leaf)) - k:
                reason = (f"{path!r} ({_describe_leaf(_value(leaf))}) has no axis {axes[path]} to block after "
                          f"its {k} stack axes")
            if reason:
                problems.append(reason)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        error = TypeError if all("floating-point" in p for p in problems) else tree_lib.SelectorError
        raise error(
            f"quantize: selector {tree_lib.describe(targets)} picked {len(problems)} leaf(s) that cannot be "
            f"quantized:\n  {shown}{more}"
        )

    def one(keypath, leaf):
        path = tree_lib.path_to_str(keypath)
        if path not in hits:
            return leaf
        x = _value(leaf)
        k, a = stacks.get(path, 0), axes.get(path, 0)
        fn = functools.partial(quantize_array, scheme=scheme, double_quant=double_quant, axis=a,
                               block_size=_resolve_block_size(block_size, x.shape[k + a], scheme))
        q = _over_leading(fn, k)(x)  # one QuantizedArray per layer of the stack, children stacked
        return leaf.replace(value=q) if tree_lib._is_nnx_variable(leaf) else q

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_leaf)


def dequantize(params: Any, dtype: Any = None) -> Any:
    """Replace every :class:`QuantizedArray` leaf by the array it stands for.

    Args:
      params: a tree from :func:`quantize`.
      dtype: result dtype of the dequantized leaves (default: each leaf's original dtype).
    """

    def one(leaf):
        x = _value(leaf)
        if not isinstance(x, QuantizedArray):
            return leaf
        w = dequantize_array(x, dtype)
        return leaf.replace(value=w) if tree_lib._is_nnx_variable(leaf) else w

    return jax.tree.map(one, params, is_leaf=_is_leaf)


@dataclasses.dataclass(frozen=True)
class QuantSummary:
    """Storage of a (partly) quantized tree.

    Attributes:
      rows: per quantized leaf ``(path, shape, scheme, num_params, nbytes, original_nbytes)``.
      other_params, other_bytes: the leaves that are not quantized.
    """

    rows: tuple[tuple[str, tuple[int, ...], str, int, int, int], ...]
    other_params: int
    other_bytes: int

    @property
    def quantized_params(self) -> int:
        return sum(r[3] for r in self.rows)

    @property
    def quantized_bytes(self) -> int:
        return sum(r[4] for r in self.rows)

    @property
    def original_bytes(self) -> int:
        """Bytes of the whole tree before quantization."""
        return sum(r[5] for r in self.rows) + self.other_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole tree as it is."""
        return self.quantized_bytes + self.other_bytes

    @property
    def bytes_saved(self) -> int:
        return self.original_bytes - self.total_bytes

    @property
    def bits_per_param(self) -> float:
        """Bits per parameter of the quantized leaves (scales included)."""
        return self.quantized_bytes * 8 / max(self.quantized_params, 1)

    def __str__(self) -> str:
        header = ("path", "shape", "scheme", "bits/param", "bytes", "was")
        body = [
            (p, "x".join(map(str, s)), sch, f"{b * 8 / max(n, 1):.3f}", tree_lib._fmt_bytes(b), tree_lib._fmt_bytes(o))
            for p, s, sch, n, b, o in self.rows
        ]
        foot = (
            "quantized",
            f"{self.quantized_params:,} params",
            "",
            f"{self.bits_per_param:.3f}",
            tree_lib._fmt_bytes(self.quantized_bytes),
            tree_lib._fmt_bytes(sum(r[5] for r in self.rows)),
        )
        widths = [max(len(r[i]) for r in [header, *body, foot]) for i in range(6)]

        def line(r):
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        rule = "-" * len(line(header))
        tail = (
            f"other leaves: {self.other_params:,} params, {tree_lib._fmt_bytes(self.other_bytes)}\n"
            f"total: {tree_lib._fmt_bytes(self.total_bytes)} (was {tree_lib._fmt_bytes(self.original_bytes)}), "
            f"saved {tree_lib._fmt_bytes(self.bytes_saved)}"
            f" ({100 * self.bytes_saved / max(self.original_bytes, 1):.1f}%)"
        )
        return "\n".join([line(header), rule, *map(line, body), rule, line(foot), tail])


def quant_summary(params: Any) -> QuantSummary:
    """Bits per parameter and bytes saved by the quantized leaves of ``params`` (printable)."""
    rows = []
    other_params = other_bytes = 0
    for path, leaf in tree_lib.leaves_with_paths(params, is_leaf=_is_leaf):
        x = _value(leaf)
        if isinstance(x, QuantizedArray):
            scheme = x.scheme + ("+dq" if x.double_quant else "")
            original = x.num_params * np.dtype(x.dtype).itemsize
            rows.append((path, x.shape, scheme, x.num_params, x.nbytes, original))
        elif x is not None and hasattr(x, "shape") and hasattr(x, "dtype"):
            n = int(math.prod(x.shape))
            other_params += n
            other_bytes += n * np.dtype(x.dtype).itemsize
    return QuantSummary(tuple(rows), other_params, other_bytes)
