"""Fold training-time reparameterisations into the parameters they compute.

Some methods train a function of their parameters rather than the parameters themselves:
prefix tuning's reparameterisation MLP (``prefix = MLP(embedding)``), P-tuning's prompt encoder
(``virtual tokens = encoder(embeddings)``). After training, the function is run once and its
output kept: the MLP or encoder is gone, the outputs are unchanged, fewer leaves remain.

A foldable method has ``folded() -> transform`` (the plain method it becomes) and either
``fold_site(params, site, shared) -> leaves`` (a layer method) or ``fold_model(params) -> leaves``
(a model-level method). Other methods pass through unchanged. Inputs are never modified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from jaxpeft.bind.linen import PeftLinen
from jaxpeft.bind.nnx import PeftParam, PeftShared, _get, _prompt_models, copy_graph, peft_layers
from jaxpeft.bind.plan import SHARED, Placement, shared_key
from jaxpeft.transform import Chain, Transform
from jaxpeft.tree import get_path, set_path


def _map(peft: Transform, f: Callable[[Transform], Transform]) -> Transform:
    if isinstance(peft, Chain):
        return Chain(tuple(_map(t, f) for t in peft.transforms))
    return f(peft)


def _folded(method: Transform) -> Transform:
    return method.folded() if hasattr(method, "folded") else method


def _check_groups(methods: tuple[Transform, ...]) -> None:
    groups = [_folded(m).group for m in methods]
    clash = sorted({g for g in groups if groups.count(g) > 1})
    if clash:
        raise ValueError(f"folding would put two soft prompts under {clash}; give the adapters different names")


def _fold_linen(peft_model: PeftLinen, params: Mapping) -> tuple[PeftLinen, dict]:
    new = dict(params)
    placements, folded_shared = [], set()
    for p in peft_model.placements:
        node = dict(get_path(params, p.site.path))
        methods = []
        for m in p.methods:
            if hasattr(m, "fold_site"):
                shared = params[SHARED][shared_key(m)] if getattr(m, "shared_names", ()) else None
                leaves = m.fold_site({n: node[n] for n in m.param_names}, p.site, shared)
                node = {k: v for k, v in node.items() if k not in m.param_names}
                node.update(leaves)
                if shared is not None:
                    folded_shared.add(shared_key(m))
            methods.append(_folded(m))
        new = set_path(new, p.site.path.split("/"), node)
        placements.append(Placement(p.site, tuple(methods)))
    if folded_shared:
        rest = {k: v for k, v in new[SHARED].items() if k not in folded_shared}
        new = {k: v for k, v in new.items() if k != SHARED}
        if rest:
            new[SHARED] = rest
    _check_groups(peft_model.model_methods)
    for m in peft_model.model_methods:
        if hasattr(m, "fold_model"):
            leaves = m.fold_model(params[m.group])
            del new[m.group]
            new[m.folded().group] = dict(leaves)
    model = dataclasses.replace(peft_model, peft=_map(peft_model.peft, _folded), placements=tuple(placements))
    return model, new


def _fold_nnx(model: nnx.Module) -> nnx.Module:
    new = copy_graph(model)
    folded_shared = set()
    for _, layer in list(peft_layers(new)):
        methods = []
        for m in layer.methods:
            if hasattr(m, "fold_site"):
                key = shared_key(m)
                shared = layer.shared[key].values() if getattr(m, "shared_names", ()) else None
                leaves = m.fold_site({n: getattr(layer, n).get_value() for n in m.param_names}, layer.site, shared)
                for n in m.param_names:
                    delattr(layer, n)
                for n, value in leaves.items():
                    setattr(layer, n, PeftParam(value))  # a new Variable: the input model keeps its leaves
                if shared is not None:
                    layer.shared = nnx.data({k: v for k, v in layer.shared.items() if k != key})
                    folded_shared.add(key)
            methods.append(_folded(m))
        layer.methods = tuple(methods)
    holder = getattr(new, SHARED, None)
    if holder is not None and folded_shared:
        for key in folded_shared:
            del holder[key]
        if not len(holder):
            delattr(new, SHARED)
    for root in _prompt_models(new):
        _check_groups(root.peft_model_methods)
        methods = []
        for m in root.peft_model_methods:
            if hasattr(m, "fold_model"):
                leaves = m.fold_model(_get(root, (m.group,)).values())
                delattr(root, m.group)
                setattr(root, m.folded().group, PeftShared(leaves))
            methods.append(_folded(m))
        root.peft_model_methods = tuple(methods)
    return new


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
        return _fold_linen(peft_model, params)
    if isinstance(peft_model, nnx.Module):
        if params is not None:
            raise TypeError("fold(nnx_model): an NNX model holds its own parameters; pass no params")
        return _fold_nnx(peft_model)
    raise TypeError(f"fold expects a PeftLinen or an NNX module from jp.apply, got {type(peft_model).__name__}")
