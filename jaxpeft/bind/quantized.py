"""Layers whose kernel is a 4/8-bit ``QuantizedArray`` (QLoRA).

Flax's layers cannot multiply by a ``QuantizedArray``. A plain ``nn.Dense`` / ``nnx.Linear``
(Flax's default ``dot_general`` and ``promote_dtype``) runs :func:`jaxpeft.quant.qmatmul_blockwise`:
its forward and backward each dequantize one row block of the kernel at a time, so a train step
never holds a whole layer's float kernel, let alone every layer's (see ``docs/qlora.md``). Every
other layer (``DenseGeneral``, ``Einsum``, a custom ``dot_general``) runs its *own* code on the
dequantized kernel: correct, but the dequantized kernel is an autodiff residual of the step.
The kernel is frozen: ``jax.grad`` over the trainable partition never differentiates it.

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

from jaxpeft.quant import QuantizedArray, dequantize_array, qmatmul_blockwise

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


def _dense(x: jax.Array, kernel: QuantizedArray, bias: Any, dtype: Any) -> jax.Array:
    """Flax's ``Dense`` math (``promote_dtype``, then ``x @ kernel + bias``) on a quantized kernel.

    Args:
      x: ``[..., d_in]``. kernel: ``[d_in, d_out]``. bias: ``[d_out]`` or None.
      dtype: the layer's ``dtype`` (None: the promoted dtype of x, kernel and bias, as Flax does).
    """
    if dtype is None:
        dtype = jnp.result_type(x.dtype, kernel.dtype, *(() if bias is None else (bias.dtype,)))
    y = qmatmul_blockwise(x, kernel, dtype)
    if bias is not None:
        y = y + jnp.reshape(jnp.asarray(bias, dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def _plain_linen_dense(module: nn.Module) -> bool:
    return (
        type(module) is nn.Dense
        and module.get_variable("params", "kernel").axis == 0  # qmatmul_blockwise cuts rows of the input axis
        and module.dot_general is None
        and module.dot_general_cls is None
        and module.promote_dtype is nn.dtypes.promote_dtype
    )


def linen_call(module: nn.Module, call_args: tuple, call_kwargs: dict) -> Any:
    """Run a Linen layer whose ``kernel`` param is quantized."""
    own = dict(module.variables["params"])
    kernel = own["kernel"]
    if _plain_linen_dense(module) and len(call_args) == 1 and not call_kwargs:
        return _dense(call_args[0], kernel, own.get("bias"), module.dtype)
    own["kernel"] = dequantized_kernel(kernel, getattr(module, "dtype", None))
    # The same layer, unbound, applied to explicit params: Flax's own math on the float kernel.
    return module.clone(parent=None).apply({"params": own}, *call_args, **call_kwargs)


def _plain_nnx_linear(layer: nnx.Module) -> bool:
    return (
        type(layer) is nnx.Linear
        and layer.kernel.get_value().axis == 0  # qmatmul_blockwise cuts rows of the input axis
        and layer.dot_general is jax.lax.dot_general
        and layer.preferred_element_type is None
        and layer.promote_dtype is nnx.nn.dtypes.promote_dtype
    )


def nnx_call(layer: nnx.Module, x: jax.Array, *args: Any, **kwargs: Any) -> Any:
    """Run an NNX layer whose ``kernel`` Variable holds a quantized array; the layer is never written."""
    kernel = layer.kernel.get_value()
    if _plain_nnx_linear(layer) and not args and not kwargs:
        bias = layer.bias.get_value() if layer.bias is not None else None
        return _dense(x, kernel, bias, layer.dtype)
    # A view of the base layer (same Variables) whose kernel is a new, dequantized Variable:
    # Flax's own math on the float kernel; the shared Variables are never written.
    view = nnx.merge(*nnx.split(layer))
    view.kernel = nnx.Param(dequantized_kernel(kernel, getattr(view, "dtype", None)))
    return view(x, *args, **kwargs)
