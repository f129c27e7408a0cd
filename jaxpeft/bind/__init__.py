"""How transforms reach Flax modules: one entry point, ``apply``, for Linen and NNX.

(``flax`` is imported whole: the submodules ``linen`` and ``nnx`` here shadow its names.)
"""

from __future__ import annotations

from typing import Any

import flax
import jax

from jaxpeft.bind.fold import fold
from jaxpeft.bind.linen import PeftLinen, apply_linen
from jaxpeft.bind.nnx import (
    PeftLayer,
    PeftParam,
    adapters_disabled,
    apply_nnx,
    mixed_adapters,
    peft_layers,
    quantize_nnx,
    use_adapters,
)
from jaxpeft import quant
from jaxpeft.transform import Transform


def apply(peft: Transform, model: Any, key: jax.Array, *args: Any, params: Any = None, **kwargs: Any) -> Any:
    """Bind a PEFT transform to a Flax model. Neither the model nor its params are modified.

    Linen::

      peft_model, params = jp.apply(peft, model, key, tokens, params=base_params)
      logits = peft_model.apply(params, tokens)

    NNX::

      peft_model = jp.apply(peft, model, key)      # a new graph sharing the base Variables
      logits = peft_model(tokens)

    Args:
      peft: a transform (``jp.lora(...)``) or ``jp.chain(...)``.
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      key: PRNG key for the new parameters.
      *args, **kwargs: Linen only: an example input (only its shapes are used).
      params: Linen only: the base ``params`` collection (None: initialise one).
    Returns:
      Linen: ``(PeftLinen, params)``; NNX: the new module.
    """
    if isinstance(model, flax.linen.Module):
        return apply_linen(peft, model, key, *args, params=params, **kwargs)
    if isinstance(model, flax.nnx.Module):
        if args or kwargs or params is not None:
            raise TypeError("an NNX model needs no example input or params: jp.apply(peft, model, key)")
        return apply_nnx(peft, model, key)
    raise TypeError(f"jp.apply expects a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}")


def quantize(params: Any, *args: Any, model: PeftLinen | None = None, **kwargs: Any) -> Any:
    """4/8-bit base weights: ``jaxpeft.quant.quantize`` on a params tree, or on an NNX model.

    A params tree comes back with ``QuantizedArray`` leaves; an NNX model comes back as a new
    graph whose selected kernels hold them (the input is untouched). Either then goes through
    ``jp.apply`` for QLoRA. Arguments are those of ``jaxpeft.quant.quantize`` (``targets``,
    ``scheme``, ``block_size``, ``double_quant``, ``allow_embeddings``, ``stack_axes``, ``axis``).

    An NNX model's layers say how each kernel is laid out: each layer of an ``nnx.vmap`` stack is
    quantized on its own, blocked along its input axis (``D`` of a heads-first Einsum ``NDH``).
    A Linen params tree says nothing of its layers: pass ``model=`` the ``PeftLinen`` that
    ``jp.apply`` made for these params and the same is read from its layers (``nn.scan`` stacks,
    Einsum layouts); without it every kernel is blocked along axis 0, unless ``stack_axes`` /
    ``axis`` say otherwise.
    """
    if isinstance(params, flax.nnx.Module):
        if model is not None:
            raise TypeError("an NNX model knows its own layers: jp.quantize(model, ...) takes no model=")
        return quantize_nnx(params, *args, **kwargs)
    if model is not None:
        from jaxpeft.bind.quantized import layout_of_layers

        if not isinstance(model, PeftLinen):
            raise TypeError(f"jp.quantize(params, model=...) takes the PeftLinen from jp.apply, got {type(model).__name__}")
        targets = kwargs.get("targets", args[0] if args else None)
        kwargs = {**layout_of_layers(model.layers, params, targets), **kwargs}
    return quant.quantize(params, *args, **kwargs)


def dequantize(params: Any, dtype: Any = None) -> Any:
    """Float weights back from ``quantize``: a params tree, or a new NNX graph."""
    if isinstance(params, flax.nnx.Module):
        graphdef, state = flax.nnx.split(params)
        return flax.nnx.merge(graphdef, quant.dequantize(state, dtype))
    return quant.dequantize(params, dtype)


__all__ = [
    "PeftLayer",
    "PeftLinen",
    "PeftParam",
    "adapters_disabled",
    "apply",
    "dequantize",
    "fold",
    "mixed_adapters",
    "peft_layers",
    "quantize",
    "use_adapters",
]
