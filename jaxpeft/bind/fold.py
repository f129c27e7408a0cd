"""Fold training-time reparameterisations into the parameters they compute.

Some methods train a function of their parameters rather than the parameters themselves:
prefix tuning's reparameterisation MLP (``prefix = MLP(embedding)``), P-tuning's prompt encoder
(``virtual tokens = encoder(embeddings)``). After training, the function is run once and its
output kept: the MLP or encoder is gone, the outputs are unchanged, fewer leaves remain.

A foldable method has ``folded() -> transform`` (the plain method it becomes) and either
``fold_site(params, site, shared) -> leaves`` (a layer method) or ``fold_model(params) -> leaves``
(a model-level method). Other methods pass through unchanged. Inputs are never modified.
Written once over the bound-model representation (``jaxpeft.bind.bound.fold``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

from jaxpeft.bind import bound as bound_ops
from jaxpeft.bind import nnx as nnx_binding
from jaxpeft.bind.linen import PeftLinen
from jaxpeft.transform import Chain, Transform


def _map(peft: Transform, f: Callable[[Transform], Transform]) -> Transform:
    if isinstance(peft, Chain):
        return Chain(tuple(_map(t, f) for t in peft.transforms))
    return f(peft)


def fold(peft_model: Any, params: Any = None) -> Any:
    """Replace reparameterisations (prefix MLP, P-tuning encoder) by the values they compute.

    The outputs do not change; the trainable leaves shrink to the plain prefix / prompt
    embeddings (``peft_model.trainable`` follows). Inputs are never modified.

    Args:
      peft_model: a ``PeftLinen`` (then ``params`` is required) or an NNX model from ``jp.apply``.
      params: Linen only: the params tree with base and PEFT leaves.
    Returns:
      Linen: ``(peft_model, params)`` for the folded transform; NNX: a new model.
    """
    if isinstance(peft_model, PeftLinen):
        if params is None:
            raise TypeError("fold(PeftLinen, params): params are required for a Linen model")
        folded = bound_ops.fold(peft_model.bound(params))
        model = dataclasses.replace(peft_model, peft=_map(peft_model.peft, lambda method: method.folded()), placements=folded.placements)
        return model, folded.params
    if isinstance(peft_model, nnx.Module):
        if params is not None:
            raise TypeError("fold(nnx_model): an NNX model holds its own parameters; pass no params")
        return nnx_binding.write(peft_model, bound_ops.fold(nnx_binding.read(peft_model)))
    raise TypeError(f"fold expects a PeftLinen or an NNX module from jp.apply, got {type(peft_model).__name__}")
