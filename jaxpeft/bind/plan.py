"""Matching transforms to layers: shared by the Linen and NNX bindings.

A binding lists the model's layers as ``Layer`` records; ``plan`` matches every transform's
targets against them and checks everything (selectors that match nothing, layer types a
method cannot wrap, ranks, two methods claiming one leaf) before any parameter is made.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jaxpeft.methods.site import Site
from jaxpeft.transform import Transform, check_claims, methods_of
from jaxpeft.tree import SelectorError, describe, matches, nearest_paths


@dataclasses.dataclass(frozen=True)
class Layer:
    """One module of the base model as a binding sees it.

    Attributes:
      path: module path, ``"layers_0/attn/query"``.
      module: the module object (for type and predicate selectors).
      owns_params: whether the module holds parameters itself (not only through children).
      param_names: names of the parameters it holds itself.
      site: the linear site, when the binding can wrap this layer type.
      unsupported: why it cannot be wrapped, when it cannot.
      output_shape: the shape of its output in the example call, when the binding saw one.
    """

    path: str
    module: Any
    owns_params: bool
    param_names: tuple[str, ...] = ()
    site: Site | None = None
    unsupported: str | None = None
    output_shape: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Placement:
    """The methods bound at one site, in chain order."""

    site: Site
    methods: tuple[Transform, ...]


def plan(
    peft: Transform, layers: Sequence[Layer], wrappable: str, existing: Mapping[str, Sequence[str]] | None = None
) -> tuple[Placement, ...]:
    """Where each method goes; raises before any work when something does not fit.

    Args:
      peft: a transform or chain.
      layers: every module of the model, from the binding.
      wrappable: the layer types the binding wraps, for messages.
      existing: leaf names PEFT methods already hold at a path (adding an adapter to a bound model).
    """
    methods = [m for m in methods_of(peft) if not is_model_method(m)]
    if existing is not None and len(methods) < len(methods_of(peft)):
        raise ValueError(
            "soft prompts (prompt tuning, P-tuning) cannot be added to a bound Linen model; bind them with the "
            "other transforms in one jp.apply(jp.chain(...)) (NNX models take them through jp.add_adapter)"
        )
    existing = existing or {}
    by_path: dict[str, list[Transform]] = {}
    for method in methods:
        hits = [layer for layer in layers if matches(method.targets, layer.path, layer.module)]
        for layer in hits:
            if layer.site is None and layer.owns_params:
                raise TypeError(
                    f"{type(method).__name__} targets {describe(method.targets)} matched {layer.path!r} "
                    f"({type(layer.module).__name__}), which it cannot wrap ({layer.unsupported or 'unsupported'}); "
                    f"it wraps {wrappable}"
                )
        hits = [layer for layer in hits if layer.site is not None]
        if not hits:
            candidates = [layer.path for layer in layers if layer.site is not None] or [l.path for l in layers]
            raise SelectorError(
                f"{type(method).__name__} targets {describe(method.targets)} matched no {wrappable} layer. "
                f"Closest layer paths: {nearest_paths(method.targets, candidates)}"
            )
        check_site_patterns(method, [layer.path for layer in hits])
        for layer in hits:
            method.check_site(layer.site)
            if method.extends_sequence:
                check_sequence_layout(method, layer)
            by_path.setdefault(layer.path, []).append(method)

    placements = []
    for layer in layers:
        if layer.path in by_path:
            chosen = outermost_last(by_path.pop(layer.path))
            check_claims(layer.site, chosen, existing=(*layer.param_names, *existing.get(layer.path, ())))
            placements.append(Placement(layer.site, chosen))
    return tuple(placements)


def check_site_patterns(method: Transform, site_paths: Sequence[str]) -> None:
    """A per-site option whose regex reaches none of the method's sites is a mistake: refuse it.

    The method names them (``site_patterns()``): ``rank_pattern`` / ``alpha_pattern`` keys (LoRA),
    IA3's ``feedforward`` when it is not the default.
    """
    for field, regex in method.site_patterns():
        if not any(re.search(regex, path) for path in site_paths):
            raise SelectorError(
                f"{type(method).__name__} {field} key {regex!r} matches none of its {len(site_paths)} target sites "
                f"(targets {describe(method.targets)}): {list(site_paths)[:6]}"
            )


def check_sequence_layout(method: Transform, layer: Layer) -> None:
    """A sequence-extending method (prefix tuning) needs the layer's output as ``[batch, seq, *out_shape]``."""
    site, shape = layer.site, layer.output_shape
    if shape is not None and (len(shape) != 2 + len(site.out_shape) or tuple(shape[2:]) != tuple(site.out_shape)):
        raise ValueError(
            f"{type(method).__name__} at {site.path!r} ({site.layer_type}): the projection output must be "
            f"[batch, seq, *{tuple(site.out_shape)}] (one batch axis, the sequence on axis 1); in the example "
            f"call it has shape {tuple(shape)}"
        )


def is_model_method(method: Transform) -> bool:
    """A model-level method (soft prompts) runs around the model's forward pass, not at a layer."""
    return method.scope == "model"


def model_methods(peft: Transform) -> tuple[Transform, ...]:
    """The model-level methods of ``peft``, in chain order."""
    return tuple(m for m in methods_of(peft) if is_model_method(m))


def outermost_last(methods: Sequence[Transform]) -> tuple[Transform, ...]:
    """Methods in chain order, sequence-extending ones (prefix tuning) last: the prefix is the final key."""
    return tuple(sorted(methods, key=lambda m: m.extends_sequence))


SHARED = "peft_shared"  # top-level key of the leaves a method shares across its sites


def with_shared(placements: Sequence[Placement]) -> dict[str, tuple[Transform, list[Site]]]:
    """The methods that share leaves across sites, each with the sites it sits at."""
    out: dict[str, tuple[Transform, list[Site]]] = {}
    for p in placements:
        for m in p.methods:
            if m.shared_names:
                out.setdefault(m.shared_key, (m, []))[1].append(p.site)
    return out
