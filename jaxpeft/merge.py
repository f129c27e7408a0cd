"""Merge PEFT updates into base kernels for serving, and take them back out.

``merge`` returns base-shaped parameters (Linen) or a plain module graph (NNX) in which each
wrapped kernel holds its update (``W + s A B`` for LoRA) and the PEFT leaves are gone.
``unmerge`` is its inverse: ``unmerge(m, merge(m, p), adapter) == p`` to float tolerance.
Inputs are never modified.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from jaxpeft.bind.linen import PeftLinen
from jaxpeft.bind.nnx import PeftLayer, _get, _set, adapter_names, copy_graph, peft_layers
from jaxpeft.bind.plan import SHARED
from jaxpeft.bind.select import Adapters, adapter_of, resolve
from jaxpeft.tree import get_path, set_path
from jaxpeft.quant import QuantizedArray, dequantize, dequantize_array


def _float(kernel: Any) -> Any:
    # A merged kernel is a float kernel: W + s A B cannot stay on the 4-bit grid.
    return dequantize_array(kernel) if isinstance(kernel, QuantizedArray) else kernel


def _layer_base(node: Mapping) -> dict:
    return {k: node[k] for k in ("kernel", "bias", "embedding") if k in node}  # every site kind's base leaves


def _merge_linen(peft_model: PeftLinen, params: Mapping, active: frozenset[str]) -> dict:
    for placement in peft_model.placements:
        node = get_path(params, placement.site.path)
        name = placement.site.kernel_name  # "embedding" for an Embed
        base = {**_layer_base(node), name: _float(node[name])}
        names = set()
        for m in placement.methods:
            if adapter_of(m) in active:
                base = m.merge_site({n: node[n] for n in m.param_names}, base, site=placement.site)
            names.update(m.param_names)
        merged = {k: v for k, v in node.items() if k not in names}
        merged.update(base)
        params = set_path(params, placement.site.path.split("/"), merged)
    return dequantize({k: v for k, v in params.items() if k != SHARED})


def _unmerge_linen(peft_model: PeftLinen, merged: Mapping, adapter: Mapping) -> dict:
    params = dict(merged)
    if SHARED in adapter:
        params[SHARED] = adapter[SHARED]
    for placement in peft_model.placements:
        node = dict(get_path(merged, placement.site.path))
        leaves = get_path(adapter, placement.site.path)
        base = _layer_base(node)
        for m in reversed(placement.methods):
            site_params = {n: leaves[n] for n in m.param_names}
            base = m.unmerge_site(site_params, base, site=placement.site)
            node.update(site_params)
        node.update(base)
        params = set_path(params, placement.site.path.split("/"), node)
    return params


def _layer_with(layer: nnx.Module, base: Mapping[str, Any]) -> nnx.Module:
    """A copy of ``layer`` sharing its Variables except new ``kernel`` / ``bias`` ones."""
    new = nnx.merge(*nnx.split(layer))
    for name, value in base.items():
        setattr(new, name, getattr(new, name).replace(value=value))
    return new


def _nnx_base(layer: PeftLayer) -> dict:
    base = {k: getattr(layer.base_layer, k).get_value() for k in layer.site.base_names
            if isinstance(getattr(layer.base_layer, k, None), nnx.Variable)}
    return {**base, layer.site.kernel_name: _float(base[layer.site.kernel_name])}


def merge(peft_model: Any, params: Any = None, *, adapters: Adapters = True) -> Any:
    """Fold PEFT updates into their base kernels.

    Args:
      peft_model: a ``PeftLinen`` (then ``params`` is required) or an NNX model from ``jp.apply``.
      params: Linen only: the params tree with base and PEFT leaves.
      adapters: which named adapters to fold in (True: all); the others are dropped.
    Returns:
      Linen: a params tree of the base model's structure. NNX: a new module graph with plain
      layers (the input model keeps working unchanged). Quantized kernels come back as float
      kernels of their original dtype (a QLoRA model merges into a float model).
    """
    if isinstance(peft_model, PeftLinen):
        if params is None:
            raise TypeError("merge(PeftLinen, params): params are required for a Linen model")
        active = resolve(adapters, peft_model.adapter_names)
        prompts = [type(m).__name__ for m in peft_model.model_methods if adapter_of(m) in active]
        if prompts:
            # The plain Linen model cannot carry virtual tokens: merging would silently drop them.
            raise ValueError(f"cannot merge {prompts} into base-shaped params: soft prompts are not kernel updates; "
                             "merge the other adapters with merge(..., adapters=[...]) and keep the prompt model")
        return _merge_linen(peft_model, params, active)
    if isinstance(peft_model, nnx.Module):
        if params is not None:
            raise TypeError("merge(nnx_model): an NNX model holds its own parameters; pass no params")
        active = resolve(adapters, adapter_names(peft_model))
        new = copy_graph(peft_model)
        for path, layer in list(peft_layers(new)):
            base = _nnx_base(layer)
            for m in layer.methods:
                if adapter_of(m) in active:
                    base = m.merge_site({n: getattr(layer, n).get_value() for n in m.param_names}, base, site=layer.site)
            _set(_get(new, path[:-1]), path[-1], _layer_with(layer.base_layer, base))
        if hasattr(new, SHARED):
            delattr(new, SHARED)
        return new
    raise TypeError(f"merge expects a PeftLinen or an NNX module from jp.apply, got {type(peft_model).__name__}")


def unmerge(peft_model: Any, merged: Any, adapter: Any = None) -> Any:
    """Take PEFT updates back out of merged kernels: the inverse of ``merge``.

    Args:
      peft_model: Linen: the ``PeftLinen``; NNX: a model from ``jp.apply`` whose PEFT leaves
        are the update to take out.
      merged: Linen: merged params; NNX: the merged module from ``merge``.
      adapter: Linen only: a tree holding the PEFT leaves (e.g. the trainable partition).
    Returns:
      Linen: params with base kernels and PEFT leaves. NNX: a PEFT model whose base kernels
      are ``merged``'s kernels with the update removed.
    """
    if isinstance(peft_model, PeftLinen):
        if adapter is None:
            raise TypeError("unmerge(PeftLinen, merged, adapter): the adapter leaves are required")
        return _unmerge_linen(peft_model, merged, adapter)
    if isinstance(peft_model, nnx.Module):
        new = copy_graph(peft_model)
        for path, layer in list(peft_layers(new)):
            merged_layer = _get(merged, path)
            base = {k: getattr(merged_layer, k).get_value() for k in layer.site.base_names
                    if isinstance(getattr(merged_layer, k, None), nnx.Variable)}
            for m in reversed(layer.methods):
                base = m.unmerge_site({n: getattr(layer, n).get_value() for n in m.param_names}, base, site=layer.site)
            layer.base_layer = _layer_with(layer.base_layer, base)
        return new
    raise TypeError(f"unmerge expects a PeftLinen or an NNX module from jp.apply, got {type(peft_model).__name__}")
