"""Layers whose kernel is a 4/8-bit ``QuantizedArray`` (QLoRA).

Flax's layers cannot multiply by a ``QuantizedArray``, so the bindings run the layer's *own*
code on the dequantized kernel: the dequantize happens inside the traced forward, where XLA
fuses it with its consumer, and the result is bit-identical to the same layer holding the
dequantized weights. The kernel is frozen: ``jax.grad`` over the trainable partition never
differentiates it.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxpeft.quant import QuantizedArray, dequantize_array


def is_quantized(kernel: Any) -> bool:
    return isinstance(kernel, QuantizedArray)


def dequantized_kernel(kernel: QuantizedArray, layer_dtype: Any) -> jax.Array:
    """The kernel in the layer's compute ``dtype`` when it has one (Flax would cast to it), else its own."""
    return dequantize_array(kernel, layer_dtype if layer_dtype is not None else kernel.dtype)
