"""Layers whose kernel is a 4/8-bit ``QuantizedArray`` (QLoRA).

Flax's layers cannot multiply by a ``QuantizedArray``. A plain ``Dense`` / ``DenseGeneral`` /
``Einsum`` (Linen) or ``Linear`` / ``LinearGeneral`` / ``Einsum`` (NNX), with Flax's default
``dot_general`` / ``einsum`` and ``promote_dtype``, runs :func:`jaxpeft.quant.qeinsum_blockwise` on
its site's equation: forward and backward each dequantize one row block of the kernel at a time,
so a train step never holds a whole layer's float kernel, let alone every layer's (see
``docs/qlora.md``). A layer with its own ``dot_general`` / ``einsum_op``, a
``preferred_element_type`` or extra call arguments runs its *own* code on the dequantized
kernel: correct, but the dequantized kernel is an autodiff residual of the step. The kernel is
frozen: ``jax.grad`` over the trainable partition never differentiates it.

Which axis a kernel is blocked along is the layer's, read from its site (``kernel_layout``): the
last input axis of one layer's kernel (axis 0 of a Dense ``[d_in, d_out]``, ``D`` of a heads-first
``NDH`` Einsum kernel), each layer of an ``nn.scan`` / ``nnx.vmap`` stack quantized on its own.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxpeft.bind.layers import linen_site, nnx_site
from jaxpeft.methods.site import parse_equation
from jaxpeft.quant import QuantizedArray, dequantize_array, qeinsum_blockwise, qmatmul_blockwise

__all__ = ["is_quantized", "dequantized_kernel", "kernel_layout", "linen_call", "nnx_call"]


def is_quantized(kernel: Any) -> bool:
    return isinstance(kernel, QuantizedArray)


def kernel_layout(site: Any) -> tuple[int, int]:
    """``(stack_axes, axis)`` to quantize a site's stored kernel with (``jaxpeft.quant.quantize``).

    ``stack_axes``: the stack's leading axes (``Site.num_stacked``), each layer quantized on its own.
    ``axis``: the axis of one layer's kernel cut into blocks: its last input axis, the innermost
    contraction (bitsandbytes blocks a flattened ``[out, in]`` weight along ``in`` the same way).
    """
    stacked = site.num_stacked
    inputs = [a - stacked for a in site.in_axes]
    return stacked, inputs[-1]


def layout_of_layers(layers: Any, params: Any, targets: Any = None) -> dict[str, dict[str, int]]:
    """``quantize``'s ``stack_axes`` and ``axis`` for every selected kernel of a bound model's layers.

    Args:
      layers: ``jaxpeft.bind.plan.Layer`` records with their (stacked) sites: ``PeftLinen.layers``.
      params: the params tree to quantize (its paths are the layers').
      targets: the quantize selector (None: ``jaxpeft.quant``'s default, every >= 2-D ``kernel``).
    """
    from jaxpeft import tree
    from jaxpeft.quant._tree import _is_leaf, default_targets

    hits = set(tree.select(params, default_targets if targets is None else targets, is_leaf=_is_leaf, what="params"))
    stacks, axes = {}, {}
    for layer in layers:
        site = layer.site
        path = f"{layer.path}/kernel"
        if site is None or site.kind != "linear" or path not in hits:
            continue
        stacked, axis = kernel_layout(site)
        if stacked:
            stacks[path] = stacked
        if axis:
            axes[path] = axis
    return {"stack_axes": stacks, "axis": axes}


def dequantized_kernel(kernel: QuantizedArray, layer_dtype: Any) -> jax.Array:
    """The kernel in the layer's compute ``dtype`` when it has one (Flax would cast to it), else its own."""
    return dequantize_array(kernel, layer_dtype if layer_dtype is not None else kernel.dtype)


DENSE = "...i,io->...o"  # the site equation of nn.Dense / nnx.Linear


def _bias_shape(equation: str, y_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Flax's bias broadcast for ``y = einsum(equation, x, kernel)``: y's size on every axis the kernel has, else 1."""
    _, rhs, out = parse_equation(equation)
    if "..." in out:
        head, tail = out.split("...")
        out = head + "." * (len(y_shape) - len(head) - len(tail)) + tail
    return tuple(d if c in rhs else 1 for c, d in zip(out, y_shape))


def _linear(x: jax.Array, kernel: QuantizedArray, bias: Any, dtype: Any, equation: str, precision: Any) -> jax.Array:
    """Flax's ``Dense`` / ``DenseGeneral`` / ``Einsum`` math (``promote_dtype``, the product, ``+ bias``) on a quantized kernel.

    Args:
      x: the input. kernel: one layer's quantized kernel. bias: the layer's bias or None.
      dtype: the layer's ``dtype`` (None: the promoted dtype of x, kernel and bias, as Flax does).
      equation: the layer's site equation ``x,kernel->y``. precision: the layer's.
    """
    if dtype is None:
        dtype = jnp.result_type(x.dtype, kernel.dtype, *(() if bias is None else (bias.dtype,)))
    if equation == DENSE and kernel.axis == 0 and precision is None:
        y = qmatmul_blockwise(x, kernel, dtype)  # one 2-D GEMM per block, whatever x's rank
    else:
        y = qeinsum_blockwise(equation, x, kernel, dtype, precision=precision)
    if bias is not None:
        y = y + jnp.reshape(jnp.asarray(bias, dtype), _bias_shape(equation, y.shape))
    return y


def _default_promote(module: Any, flax_default: Any) -> bool:
    return getattr(module, "promote_dtype", flax_default) is flax_default


def _linen_equation(module: nn.Module, call_args: tuple, call_kwargs: dict) -> str | None:
    """The equation a plain Linen layer computes, or None when it must run its own code."""
    if len(call_args) != 1 or call_kwargs or not _default_promote(module, nn.dtypes.promote_dtype):
        return None
    kind = type(module)
    if kind is nn.Dense and module.dot_general is None and module.dot_general_cls is None:
        return DENSE
    if kind is nn.DenseGeneral and module.dot_general is None and module.dot_general_cls is None:
        site, _ = linen_site(module, call_args[0])  # None for batch_dims
        return None if site is None else site.equation
    if kind is nn.Einsum and module.preferred_element_type is None and module.einsum_str is not None:
        return module.einsum_str.replace(" ", "")
    return None


def linen_call(module: nn.Module, call_args: tuple, call_kwargs: dict) -> Any:
    """Run a Linen layer whose ``kernel`` param is quantized."""
    own = dict(module.variables["params"])
    kernel = own["kernel"]
    equation = _linen_equation(module, call_args, call_kwargs)
    if equation is not None:
        return _linear(call_args[0], kernel, own.get("bias"), module.dtype, equation, module.precision)
    own["kernel"] = dequantized_kernel(kernel, getattr(module, "dtype", None))
    # The same layer, unbound, applied to explicit params: Flax's own math on the float kernel.
    return module.clone(parent=None).apply({"params": own}, *call_args, **call_kwargs)


def _nnx_equation(layer: nnx.Module, args: tuple, kwargs: dict) -> str | None:
    """The equation a plain NNX layer computes, or None when it must run its own code."""
    if args or kwargs or not _default_promote(layer, nnx.nn.dtypes.promote_dtype):
        return None
    if getattr(layer, "preferred_element_type", None) is not None:
        return None
    kind = type(layer)
    if kind is nnx.Linear and layer.dot_general is jax.lax.dot_general:
        return DENSE
    if kind is nnx.LinearGeneral and layer.dot_general is None and layer.dot_general_cls is None:
        site, _ = nnx_site("", layer)  # None for batch_axis or non-trailing axes
        return None if site is None else site.equation
    if kind is nnx.Einsum and layer.einsum_op is jnp.einsum and layer.einsum_str is not None:
        return layer.einsum_str.replace(" ", "")
    return None


def nnx_call(layer: nnx.Module, x: jax.Array, *args: Any, **kwargs: Any) -> Any:
    """Run an NNX layer whose ``kernel`` Variable holds a quantized array; the layer is never written."""
    kernel = layer.kernel.get_value()
    equation = _nnx_equation(layer, args, kwargs)
    if equation is not None:
        bias = layer.bias.get_value() if getattr(layer, "bias", None) is not None else None
        return _linear(x, kernel, bias, layer.dtype, equation, layer.precision)
    # A view of the base layer (same Variables) whose kernel is a new, dequantized Variable:
    # Flax's own math on the float kernel; the shared Variables are never written.
    view = nnx.merge(*nnx.split(layer))
    view.kernel = nnx.Param(dequantized_kernel(kernel, getattr(view, "dtype", None)))
    return view(x, *args, **kwargs)
