"""Merge PEFT updates into base kernels for serving, and take them back out.

``merge`` returns base-shaped parameters (Linen) or a plain module graph (NNX) in which each
wrapped kernel holds its update (``W + s A B`` for LoRA) and the PEFT leaves are gone.
``unmerge`` is its inverse: ``unmerge(m, merge(m, p), adapter) == p`` to float tolerance.
Inputs are never modified. Both are written once, over the bound-model representation
(``jaxpeft.bind.bound``); the bindings only convert to and from it.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxpeft.bind import bound as bound_ops
from jaxpeft.bind import nnx as nnx_binding
from jaxpeft.bind.linen import PeftLinen
from jaxpeft.bind.plan import Placement
from jaxpeft.bind.select import Adapters


def merge(peft_model: Any, params: Any = None, *, adapters: Adapters = True) -> Any:
    """Fold PEFT updates into their base kernels.

    Args:
      peft_model: a ``PeftLinen`` (then ``params`` is required) or an NNX model from ``jp.apply``.
      params: Linen only: the params tree with base and PEFT leaves.
      adapters: which named adapters to fold in (True: all); the others are dropped.
    Returns:
      Linen: a params tree of the base model's structure. NNX: a new module graph with plain
      layers (the input model keeps working unchanged). Quantized kernels come back as float
      kernels of their original dtype (a QLoRA model merges into a float model). An active soft
      prompt is an error in both bindings: it is not a kernel update.
    """
    if isinstance(peft_model, PeftLinen):
        if params is None:
            raise TypeError("merge(PeftLinen, params): params are required for a Linen model")
        return bound_ops.merge(peft_model.bound(params), adapters)
    if isinstance(peft_model, nnx.Module):
        if params is not None:
            raise TypeError("merge(nnx_model): an NNX model holds its own parameters; pass no params")
        bound = nnx_binding.read(peft_model)
        merged = bound_ops.merge(bound, adapters)
        plain = tuple(Placement(p.site, ()) for p in bound.placements)
        return nnx_binding.write(peft_model, bound_ops.Bound(plain, (), merged))
    raise TypeError(f"merge expects a PeftLinen or an NNX module from jp.apply, got {type(peft_model).__name__}")


def _nnx_leaves(peft_model: nnx.Module, adapter: Any) -> dict:
    """The PEFT leaves to take out: those ``peft_model`` holds, or ``adapter``'s (a model or an ``nnx.State``)."""
    if adapter is None:
        return nnx_binding.read(peft_model).params
    if isinstance(adapter, nnx.Module):
        return nnx_binding.read(adapter).params
    if isinstance(adapter, nnx.State):
        view = nnx_binding.copy_graph(peft_model)
        nnx.update(view, adapter)
        return nnx_binding.read(view).params
    raise TypeError(f"unmerge(nnx_model, merged, adapter): adapter must be None, an NNX model from jp.apply or an "
                    f"nnx.State of its PEFT leaves (nnx.state(model, jp.PeftParam)); got {type(adapter).__name__}")


def unmerge(peft_model: Any, merged: Any, adapter: Any = None, *, adapters: Adapters = True) -> Any:
    """Take PEFT updates back out of merged kernels: the inverse of ``merge``.

    Args:
      peft_model: the ``PeftLinen`` or the NNX model from ``jp.apply``.
      merged: Linen: merged params; NNX: the merged module from ``merge``.
      adapter: the PEFT leaves whose update to take out. Linen: a tree holding them (e.g. the
        trainable partition), required. NNX: None (the leaves ``peft_model`` holds), another model
        from ``jp.apply`` of the same structure, or an ``nnx.State`` of its ``PeftParam`` leaves.
      adapters: which adapters ``merged`` holds (as given to ``merge``); the others are restored as
        they are, their updates not subtracted.
    Returns:
      Linen: params with base kernels and PEFT leaves. NNX: a PEFT model whose base kernels
      are ``merged``'s kernels with the update removed.
    """
    if isinstance(peft_model, PeftLinen):
        if adapter is None:
            raise TypeError("unmerge(PeftLinen, merged, adapter): the adapter leaves are required")
        return bound_ops.unmerge(peft_model.bound(adapter), merged, adapters)
    if isinstance(peft_model, nnx.Module):
        bound = nnx_binding.read(peft_model)
        leaves = _nnx_leaves(peft_model, adapter)
        merged_tree: dict = {}
        for p in bound.placements:
            layer = nnx_binding._get(merged, nnx_binding._parts(merged, p.site.path))
            if isinstance(layer, nnx_binding.PeftLayer):
                layer = layer.base_layer
            merged_tree = bound_ops.set_path(merged_tree, p.site.path.split("/"), nnx_binding._base_params(layer))
        params = bound_ops.unmerge(bound_ops.Bound(bound.placements, bound.prompts, leaves), merged_tree, adapters)
        return nnx_binding.write(peft_model, bound_ops.Bound(bound.placements, bound.prompts, params))
    raise TypeError(f"unmerge expects a PeftLinen or an NNX module from jp.apply, got {type(peft_model).__name__}")
