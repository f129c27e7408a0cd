"""NNX binding: a structural copy of the module graph whose targeted layers are wrapped.

``apply_nnx`` returns a new graph (``nnx.merge(*nnx.split(model))``: new Python objects,
the same arrays, nothing copied in memory) in which each targeted ``Linear``,
``LinearGeneral`` or ``Einsum`` is replaced by a ``PeftLayer`` holding the original layer
as ``base_layer`` and the methods' leaves as ``PeftParam`` variables. The input model is
never touched. Everything else is plain NNX: ``nnx.split(peft_model, jp.PeftParam, ...)``
separates what trains.

Soft prompts and prefix masks need code around a module's own ``__call__`` (the model's, an
attention module's), and NNX has no method interception. As ``torch.nn.utils.parametrize``
does, the new graph's copy of that module becomes an instance of a subclass of its own class
(``_PromptModel`` / ``_PrefixMask`` mixed in front; one cached class per original class) whose
``__call__`` does the extra work and then calls the original. The module keeps its attributes,
its parameter paths and its type (``isinstance`` still holds); the input graph is untouched.
The prompt leaves sit on the model as ``PeftParam`` groups (``prompt/embeddings``), the same
paths as in Linen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpeft.bind import bound as bound_ops
from jaxpeft.bind import model as model_level
from jaxpeft.bind.plan import SHARED, Layer, Placement, model_methods, outermost_last, plan
from jaxpeft.bind import quantized
from jaxpeft.bind.quantized import is_quantized
from jaxpeft.bind.select import Adapters, adapter_of, check_mixed, mixed_call, resolve
from jaxpeft.bind.layers import NNX_WRAPPABLE, nnx_site
from jaxpeft.methods.site import Site
from jaxpeft.transform import Transform
from jaxpeft.tree import get_path, set_path

WRAPPABLE = NNX_WRAPPABLE


class PeftParam(nnx.Param):
    """A trainable parameter added by a PEFT method (filter with ``jp.PeftParam``)."""


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _site(path: str, module: nnx.Module) -> tuple[Site | None, str | None]:
    """The site of an NNX layer, or why there is none (``jaxpeft.bind.layers``)."""
    site, why = nnx_site(path, module)
    if site is None:
        return None, why
    kernel = getattr(module, site.kernel_name).get_value()
    try:
        # A layer of an nnx.vmap stack stores [L, *kernel]; each call inside nnx.scan sees one slice.
        site = bound_ops.stacked_site(site, bound_ops.stored_shape(kernel))
    except ValueError as e:
        return None, str(e)
    bound_ops.refuse_quantized_stack(path, site.layer_type, kernel, site.num_stacked)
    return site, None


def _layer_kernel_shape(module: nnx.Module) -> tuple[int, ...]:
    """The kernel shape one call of the layer multiplies by (without an ``nnx.vmap`` stack's axes)."""
    if isinstance(module, nnx.Linear):
        return (int(module.in_features), int(module.out_features))
    if isinstance(module, nnx.Einsum):
        return tuple(int(d) for d in module.kernel_shape)
    as_tuple = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,)  # noqa: E731
    return tuple(int(d) for d in (*as_tuple(module.in_features), *as_tuple(module.out_features)))


def discover(model: nnx.Module) -> tuple[Layer, ...]:
    """Every module in the graph, with its site where it is a wrappable layer.

    A ``PeftLayer`` already in the graph counts as its base layer (so more adapters can be
    added to it), with its PEFT leaves among the names it holds.
    """
    layers = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module) or not path or path[-1] == "base_layer":
            continue
        names = tuple(k for k, v in vars(node).items() if isinstance(v, nnx.Variable))
        if isinstance(node, PeftLayer):
            base_names = tuple(k for k, v in vars(node.base_layer).items() if isinstance(v, nnx.Variable))
            layers.append(Layer(_path_str(path), node.base_layer, True, base_names + names, node.site, None))
            continue
        site, why = _site(_path_str(path), node)
        layers.append(Layer(_path_str(path), node, bool(names), names, site, why))
    return tuple(layers)


def _base_params(layer: nnx.Module) -> dict[str, Any]:
    """A layer's own ``kernel`` (and ``bias``) values, as methods receive them."""
    names = ("kernel", "bias", "embedding")  # the base leaves of every site kind (Site.base_names)
    return {k: getattr(layer, k).get_value() for k in names if isinstance(getattr(layer, k, None), nnx.Variable)}


class PeftShared(nnx.Module):
    """Leaves one method shares across all its sites (held once, referenced by every ``PeftLayer``)."""

    def __init__(self, params: dict[str, jax.Array]):
        for name, value in params.items():
            setattr(self, name, PeftParam(value))

    def values(self) -> dict[str, jax.Array]:
        return {k: v.get_value() for k, v in vars(self).items() if isinstance(v, nnx.Variable)}


class PeftLayer(nnx.Module):
    """A base layer with PEFT methods around it.

    Attributes:
      base_layer: the original layer (its Variables are the base model's).
      site: the layer as the methods see it.
      methods: the methods, in chain order.
      active_adapters: names of the adapters that run (None: all); see ``jp.use_adapters``.
      mixed_adapters: with ``adapter_ids``, a mixed-adapter batch; see ``jp.mixed_adapters``.
      deterministic: True turns dropout off (``model.eval()`` sets it, as for ``nnx.Dropout``).
    """

    def __init__(self, base_layer: nnx.Module, placement: Placement, params: dict[str, jax.Array], key: jax.Array):
        self.base_layer = base_layer
        self.site = placement.site
        self.methods = ()
        self.active_adapters = None
        self.mixed_adapters = None
        self.adapter_ids = nnx.data(None)
        self.deterministic = False
        self.rngs = nnx.data(None)  # data, not static: add() may put an Rngs here later
        self.shared = nnx.data({})
        self.add(placement.methods, params, key)

    def __getattr__(self, name: str) -> Any:
        # Called only where normal lookup fails: the wrapped layer's public attributes (``kernel``,
        # ``features``, ``in_features``, ``einsum_str``, ``use_bias``, ...) read through, so model code
        # reading ``self.proj.kernel`` keeps working. Private and dunder names are not forwarded (flax
        # and copy/pickle probe those and must see this layer's own answer).
        base = self.__dict__.get("base_layer")
        if base is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(base, name)

    def add(self, methods: tuple, params: dict[str, jax.Array], key: jax.Array, shared: dict | None = None) -> None:
        """Put more methods (and their leaves) on this layer; used while building a new graph."""
        self.methods = self.methods + tuple(methods)
        if shared:
            self.shared = nnx.data({**self.shared, **shared})
        for name, value in params.items():
            setattr(self, name, PeftParam(value))
        if self.rngs is None and any(m.dropout > 0.0 for m in self.methods):
            # A stacked layer (an nnx.vmap stack run by nnx.scan) gets one stream per layer of the stack, so
            # the scan hands each layer its own key and count, as nnx.split_rngs would.
            stack = self.site.kernel_shape[: self.site.num_stacked]
            self.rngs = nnx.Rngs(dropout=jax.random.split(key, stack) if stack else key)

    def remove(self, adapter: str) -> None:
        """Take the methods of ``adapter`` (and their leaves) off this layer."""
        gone = [m for m in self.methods if adapter_of(m) == adapter]
        for m in gone:
            for name in m.param_names:
                delattr(self, name)
        self.shared = nnx.data({k: v for k, v in self.shared.items() if k not in {m.shared_key for m in gone}})
        self.methods = tuple(m for m in self.methods if adapter_of(m) != adapter)

    def is_active(self, method: Any) -> bool:
        """Whether ``method`` runs in the current call (adapter selection, mixed batches)."""
        if self.mixed_adapters is not None:
            return adapter_of(method) in self.mixed_adapters
        return self.active_adapters is None or adapter_of(method) in self.active_adapters

    def _base(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        kernel = getattr(self.base_layer, self.site.kernel_name).get_value()
        if not is_quantized(kernel):
            return self.base_layer(x, *args, **kwargs)
        return quantized.nnx_call(self.base_layer, x, *args, **kwargs)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        fn = lambda x: self._base(x, *args, **kwargs)  # noqa: E731
        params_of = lambda m: {name: getattr(self, name).get_value() for name in m.param_names}  # noqa: E731
        site = self.site.unstacked()  # inside nnx.scan over an nnx.vmap stack the layer sees one slice
        if self.mixed_adapters is not None:
            shared_of = lambda m: self.shared[m.shared_key].values() if m.shared_names else None  # noqa: E731
            return mixed_call(self.methods, params_of, site, x, fn, self.mixed_adapters, self.adapter_ids,
                              base=_base_params(self.base_layer), shared_of=shared_of)
        for m in outermost_last(self.methods):
            if not self.is_active(m):
                continue
            use_rng = self.rngs is not None and not self.deterministic and m.dropout > 0.0
            rng = self.rngs.dropout() if use_rng else None
            shared = self.shared[m.shared_key].values() if m.shared_names else None
            base = _base_params(self.base_layer)
            fn = functools.partial(m.apply_site, params_of(m), site, base_fn=fn, rng=rng, base=base, shared=shared)
        return fn(x)


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _set(node: Any, part: Any, value: Any) -> None:
    if isinstance(part, int):
        node[part] = value
    else:
        setattr(node, part, value)


def copy_graph(model: nnx.Module) -> nnx.Module:
    """A new module graph with the same arrays (no array is copied).

    The parameters stay the same ``nnx.Param`` objects (the base is shared, never copied); every
    other Variable (``nnx.BatchStat``, ``nnx.Cache``, RNG counts) is a new object holding the same
    array, so running the new graph (BatchNorm in training mode, a decode step) leaves ``model``'s
    state as it was.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))


# -- code around a module's own __call__: soft prompts, prefix masks ------------------------------


class _PromptModel:
    """Mixed in front of a model's class: the soft prompts (model-level methods) around its ``__call__``.

    The model holds ``peft_model_methods`` (chain order), one ``PeftShared`` group of ``PeftParam``
    leaves per method (``prompt``, ``prompt_encoder@fr``, ...) and the adapter selection
    ``peft_active_adapters`` / ``peft_mixed_adapters`` (set by ``use_adapters`` / ``mixed_adapters``).
    """

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = super().__call__
        methods = [m for m in self.peft_model_methods if _prompt_active(self, m)]
        if not methods:
            return call(*args, **kwargs)
        if self.peft_mixed_adapters is not None:
            names = [adapter_of(m) for m in methods]
            raise TypeError(f"mixed-adapter batches take site methods only (they act per layer); soft prompts {names} are among the chosen")
        groups = [(m, getattr(self, m.group).values()) for m in methods]
        call_fn = _base_class(self).__call__
        return model_level.call_with_prompts(groups, call, call_fn, self, args, kwargs, self.embed_tokens)


def _prompt_active(model: Any, method: Any) -> bool:
    if model.peft_mixed_adapters is not None:
        return adapter_of(method) in model.peft_mixed_adapters
    return model.peft_active_adapters is None or adapter_of(method) in model.peft_active_adapters


class _PrefixMask:
    """Mixed in front of an attention module's class: its ``mask`` grows with its projections' prefix."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rows = {
            name: model_level.sequence_extension(child.methods, child.is_active)
            for name, child in vars(self).items()
            if isinstance(child, PeftLayer) and any(m.extends_sequence for m in child.methods)
        }
        where = _base_class(self).__name__
        extra = model_level.prefix_length(rows, where)
        call_fn = _base_class(self).__call__
        return model_level.call_with_prefix_mask(super().__call__, call_fn, self, args, kwargs, extra, where)


_MIXINS = (_PromptModel, _PrefixMask)  # outermost first


def _base_class(node: Any) -> type:
    return getattr(type(node), "_jaxpeft_base", type(node))


def _mixins(node: Any) -> frozenset[type]:
    return frozenset(getattr(type(node), "_jaxpeft_mixins", ()))


@functools.lru_cache(maxsize=None)
def _peft_class(base: type, mixins: tuple[type, ...]) -> type:
    """``base`` with ``mixins`` in front: one class per combination, so graphdefs (and jit caches) stay stable."""
    if not mixins:
        return base
    suffix = "+".join(m.__name__.strip("_") for m in mixins)
    namespace = {
        "__slots__": (),
        "__module__": base.__module__,
        "__qualname__": f"{base.__qualname__}[{suffix}]",
        "_jaxpeft_base": base,
        "_jaxpeft_mixins": mixins,
    }
    kwds = {"pytree": base._pytree__is_pytree} if hasattr(base, "_pytree__is_pytree") else {}
    return types.new_class(f"{base.__name__}[{suffix}]", (*mixins, base), kwds, lambda ns: ns.update(namespace))


def _reclass(node: nnx.Module, mixins: frozenset[type]) -> nnx.Module:
    """A new object of ``node``'s original class with ``mixins``, holding ``node``'s attributes (shared)."""
    cls = _peft_class(_base_class(node), tuple(m for m in _MIXINS if m in mixins))
    if type(node) is cls:
        return node
    new = object.__new__(cls)  # as nnx.merge builds nodes; __init__ already ran for the original
    for name, value in vars(node).items():
        object.__setattr__(new, name, value)
    return new


def _replace(root: nnx.Module, parts: tuple, node: nnx.Module) -> nnx.Module:
    """Put ``node`` at ``parts`` of ``root``; returns the (possibly new) root."""
    if not parts:
        return node
    _set(_get(root, parts[:-1]), parts[-1], node)
    return root


def _prompt_models(model: nnx.Module) -> list[nnx.Module]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, _PromptModel)]


def _add_prompts(new: nnx.Module, model: nnx.Module, prompts: tuple, key: jax.Array) -> nnx.Module:
    """``new`` (a copy of ``model``) with the soft prompts ``prompts`` around its ``__call__``."""
    from jaxpeft.methods.prompt import ModelSpec

    probe = model.embed_tokens(jax.numpy.zeros((1, 1), jax.numpy.int32))
    spec = ModelSpec(int(probe.shape[-1]), jax.numpy.dtype(probe.dtype).name)
    root = _reclass(new, _mixins(new) | {_PromptModel})
    if not hasattr(root, "peft_model_methods"):
        root.peft_model_methods = ()
        root.peft_active_adapters = None
        root.peft_mixed_adapters = None
    for k, m in zip(bound_ops.prompt_keys(key, prompts), prompts):
        leaves = m.init_model(k, spec, lambda ids: model.embed_tokens(ids[None])[0])
        setattr(root, m.group, PeftShared(leaves))
    root.peft_model_methods = root.peft_model_methods + tuple(prompts)
    return root


def apply_nnx(peft: Transform, model: nnx.Module, key: jax.Array) -> nnx.Module:
    """Bind ``peft`` to an NNX ``model``; return a new model (the input is left as it is).

    ``model`` may already hold ``PeftLayer``s (from an earlier ``jp.apply``): the new methods
    join them, which is how named adapters are added.

    Args:
      peft: a transform or chain.
      model: an NNX module.
      key: PRNG key for the PEFT parameters and their dropout stream.
    """
    prompts = model_methods(peft)
    if prompts:
        model_level.check_prompt_protocol(model, _base_class(model).__call__)
        taken = [m.group for m in prompts if hasattr(model, m.group)]
        if taken:
            raise ValueError(
                f"{type(model).__name__} already has attributes {taken}; give the soft prompt another adapter name"
            )
    layers = discover(model)
    placements = plan(peft, layers, WRAPPABLE)
    for p in placements:
        shared = [m for m in p.methods if m.shared_names]
        if shared and p.site.num_stacked:
            # nnx.scan slices everything reachable from the stack along the layer axis, the shared leaves
            # too, so one set shared by every layer cannot live there. Linen's nn.scan keeps them outside.
            raise ValueError(
                f"{type(shared[0]).__name__} shares leaves across its sites, which an NNX layer stack at "
                f"{p.site.path!r} (kernel {p.site.kernel_shape}, {p.site.num_stacked} stacked axes) cannot hold: "
                "nnx.scan would slice them per layer. Use unrolled layers, the Linen binding (nn.scan keeps the "
                "shared leaves outside the stack), or a method without shared leaves"
            )
    # Attention modules above prefixed projections: their masks grow, a decode cache is refused.
    attention = {}
    for p in placements:
        if any(m.extends_sequence for m in p.methods):
            parts = _parts(model, p.site.path)[:-1]
            node = _get(model, parts)
            if model_level.has_decode(node):
                raise model_level.decode_error(_path_str(parts), node)
            if model_level.accepts_mask(_base_class(node).__call__):
                attention[parts] = node
    # Flax's layers cannot multiply by a quantized kernel: wrap every quantized layer, targeted or not.
    placed = {p.site.path for p in placements}
    placements += tuple(
        Placement(layer.site, ())
        for layer in layers
        if layer.site is not None
        and layer.path not in placed
        and is_quantized(getattr(layer.module, layer.site.kernel_name).get_value())
        and not isinstance(_get(model, _parts(model, layer.path)), PeftLayer)
    )
    new = copy_graph(model)
    shared = {
        name: PeftShared(leaves) for name, leaves in bound_ops.init_shared(placements, key, _shared_holder(new)).items()
    }
    if shared:
        # One module holds them; every PeftLayer references it (NNX keeps shared references shared).
        holder = getattr(new, SHARED, None) or nnx.Dict()
        for name, module in shared.items():
            holder[name] = module
        setattr(new, SHARED, holder)
    for placement in placements:
        parts = _parts(model, placement.site.path)
        target = _get(new, parts)
        base_layer = target.base_layer if isinstance(target, PeftLayer) else target
        base = _base_params(base_layer)
        params, new_base = bound_ops.init_site_leaves(placement, key, base)
        changed = {k: v for k, v in new_base.items() if v is not base.get(k)}
        if changed:
            # New Variables on this graph's own copy of the layer: the input model's stay as they were.
            base_layer = _layer_with(base_layer, changed)
            if isinstance(target, PeftLayer):
                target.base_layer = base_layer
            else:
                target = base_layer
        refs = {m.shared_key: shared[m.shared_key] for m in placement.methods if m.shared_key in shared}
        dropout_key = _dropout_key(key, placement.site.path)
        if isinstance(target, PeftLayer):
            target.add(placement.methods, params, dropout_key, refs)
        else:
            layer = PeftLayer(target, Placement(placement.site, ()), {}, dropout_key)
            layer.add(placement.methods, params, dropout_key, refs)
            _set(_get(new, parts[:-1]), parts[-1], layer)
    for parts in sorted(attention, key=len, reverse=True):  # deepest first: a parent's copy keeps the new child
        node = _get(new, parts)
        new = _replace(new, parts, _reclass(node, _mixins(node) | {_PrefixMask}))
    if prompts:
        new = _add_prompts(new, model, prompts, key)
    return new


def _parts(model: nnx.Module, path: str) -> tuple:
    """The graph path (with int indices for list elements) whose string form is ``path``."""
    for graph_path, _ in nnx.iter_graph(model):
        if _path_str(graph_path) == path:
            return tuple(graph_path)
    raise KeyError(path)


def quantize_nnx(model: nnx.Module, **kwargs: Any) -> nnx.Module:
    """A new graph whose selected kernels are ``QuantizedArray`` Variables; ``model`` is untouched.

    Keyword arguments are those of ``jaxpeft.quant.quantize``. The result runs through
    ``jp.apply`` (which wraps every quantized layer); Flax's layers alone cannot use it. Only the
    ``kernel`` of a layer the binding wraps (``Linear``, ``LinearGeneral``, ``Einsum``) can be
    dequantized in the forward: any other selected leaf is refused, naming the layer, before any
    array is quantized (the selection is checked on shapes alone, under ``jax.eval_shape``).
    """
    from jaxpeft.quant import QuantizedArray, quantize

    graphdef, state = nnx.split(model)
    given = dict(kwargs)
    given.pop("stack_axes", None)
    given.pop("axis", None)
    abstract = nnx.merge(graphdef, jax.eval_shape(lambda s: quantize(s, **given), state))
    wraps = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
    stacks, axes = {}, {}
    for path, node in nnx.iter_graph(abstract):
        if not isinstance(node, nnx.Module):
            continue
        for name, var in vars(node).items():
            if isinstance(var, nnx.Variable) and isinstance(var.get_value(), QuantizedArray):
                where = "/".join(map(str, (*path, name)))
                if not (isinstance(node, wraps) and name == "kernel"):
                    raise TypeError(
                        f"jp.quantize would quantize {where!r} ({type(node).__name__}.{name}), which no NNX forward "
                        f"can dequantize: only the kernel of a {WRAPPABLE} layer runs quantized. Narrow `targets`"
                    )
                site, why = nnx_site(_path_str(path), node)
                if site is not None:  # an nnx.vmap stack's kernel [L, *kernel]: each layer quantized on its own
                    stacked, axis = quantized.kernel_layout(bound_ops.stacked_site(site, var.get_value().shape))
                    if stacked:
                        stacks[where] = stacked
                    if axis:  # blocked along the layer's input axis (a heads-first Einsum's D)
                        axes[where] = axis
    if "stack_axes" not in kwargs:
        kwargs = {**kwargs, "stack_axes": stacks}
    if "axis" not in kwargs:
        kwargs = {**kwargs, "axis": axes}
    return nnx.merge(graphdef, quantize(state, **kwargs))


def peft_layers(model: nnx.Module) -> Iterator[tuple[tuple, PeftLayer]]:
    """``(graph path, layer)`` for every ``PeftLayer`` in ``model``."""
    _require_nnx(model, "peft_layers")
    for path, node in nnx.iter_graph(model):
        if isinstance(node, PeftLayer):
            yield tuple(path), node


def _layer_values(layer: PeftLayer, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` as one layer holds them: a stacked layer's ``adapter_ids`` get the stack's axes.

    ``nnx.scan`` over an ``nnx.vmap`` stack slices every array the layer holds along the stack axes,
    the ids too: ``[batch]`` ids would be cut into per-layer pieces (or refused when ``batch != L``).
    Broadcast to ``[*stack, batch]``, each layer of the stack sees the whole batch's ids.
    """
    ids = values.get("adapter_ids")
    if ids is None or not layer.site.num_stacked:
        return values
    stack = tuple(layer.site.kernel_shape[: layer.site.num_stacked])
    return {**values, "adapter_ids": jnp.broadcast_to(ids, (*stack, *ids.shape))}


@contextlib.contextmanager
def _setting(model: nnx.Module, **values: Any) -> Iterator[nnx.Module]:
    # PeftLayers take every value; a soft-prompt model its adapter selection (peft_-prefixed).
    targets = [(layer, _layer_values(layer, values)) for _, layer in peft_layers(model)]
    root_values = {f"peft_{k}": v for k, v in values.items() if k in ("active_adapters", "mixed_adapters")}
    targets += [(root, root_values) for root in _prompt_models(model)]
    before = [{k: getattr(node, k) for k in vals} for node, vals in targets]
    for node, vals in targets:
        for k, v in vals.items():
            setattr(node, k, v)
    try:
        yield model
    finally:
        for (node, _), old in zip(targets, before):
            for k, v in old.items():
                setattr(node, k, v)


def adapter_names(model: nnx.Module) -> tuple[str, ...]:
    """The adapters bound to an NNX model, in order of first appearance."""
    methods = [m for _, layer in peft_layers(model) for m in layer.methods]
    methods += [m for root in _prompt_models(model) for m in root.peft_model_methods]
    return tuple(dict.fromkeys(adapter_of(m) for m in methods))


def _require_nnx(model: Any, what: str) -> None:
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"jp.{what} works on NNX models; got {type(model).__name__}. A Linen PeftLinen takes it per call: "
            "peft_model.apply(params, x, adapters=[...], adapter_ids=...)"
        )


@contextlib.contextmanager
def _linen_setting(model: Any, adapters: Adapters) -> Iterator[Any]:
    resolve(adapters, model.adapter_names)
    yield dataclasses.replace(model, active_adapters=adapters)


def use_adapters(model: Any, adapters: Adapters) -> contextlib.AbstractContextManager:
    """Within the block, only ``adapters`` run (True: all, False: none, a name or a list of names).

    Yields the model to call. NNX: ``model`` itself (its layers' selection is set for the block and
    restored after). Linen: a copy of the ``PeftLinen`` whose ``apply`` runs ``adapters`` by default
    (a Linen model is immutable; ``peft_model.apply(params, x, adapters=...)`` says the same per call)::

      with jp.adapters_disabled(peft_model) as base_model:
          y = base_model.apply(params, x)        # Linen
          y = base_model(x)                      # NNX (base_model is peft_model)
    """
    from jaxpeft.bind.linen import PeftLinen

    if isinstance(model, PeftLinen):
        return _linen_setting(model, adapters)
    if not isinstance(model, nnx.Module):
        raise TypeError(f"use_adapters expects a PeftLinen or an NNX model from jp.apply, got {type(model).__name__}")
    active = resolve(adapters, adapter_names(model))
    return _setting(model, active_adapters=active)


def adapters_disabled(model: Any) -> contextlib.AbstractContextManager:
    """Within the block the base model alone runs (``use_adapters(model, False)``; Linen or NNX)."""
    return use_adapters(model, False)


def mixed_adapters(model: nnx.Module, adapters: Adapters, adapter_ids: jax.Array) -> contextlib.AbstractContextManager:
    """Within the block, example ``i`` of a batch runs adapter ``adapters[adapter_ids[i]]`` (LoRA).

    Usable inside ``nnx.jit`` (enter it in the jitted function, with ``adapter_ids`` an argument).
    """
    _require_nnx(model, "mixed_adapters")
    names = check_mixed(adapters, adapter_ids, adapter_names(model))
    return _setting(model, mixed_adapters=names, adapter_ids=adapter_ids)


def delete_adapter_nnx(model: nnx.Module, adapter: str) -> nnx.Module:
    """A new graph without ``adapter``; layers left with nothing to do are unwrapped."""
    return write(model, bound_ops.delete(read(model), adapter))


# -- the bound-model representation (jaxpeft.bind.bound) in and out of a graph -----------------------


def _shared_holder(model: nnx.Module) -> dict[str, PeftShared]:
    holder = getattr(model, SHARED, None)
    return {} if holder is None else {name: holder[name] for name in holder.keys()}


def _layer_with(layer: nnx.Module, values: dict[str, Any]) -> nnx.Module:
    """A copy of ``layer`` sharing its Variables except new ones holding ``values``."""
    new = nnx.merge(*nnx.split(layer))
    for name, value in values.items():
        setattr(new, name, getattr(new, name).replace(value=value))
    return new


def _dropout_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(bound_ops.path_key(key, path), 0x7FFFFFFF)


def _same(values: dict, new: dict) -> bool:
    return set(values) == set(new) and all(values[k] is new[k] for k in values)


def read(model: nnx.Module) -> bound_ops.Bound:
    """The bound-model representation of a graph from ``jp.apply``: no array is copied."""
    placements, params = [], {}
    for parts, layer in peft_layers(model):
        path = _path_str(parts)
        node = {**_base_params(layer.base_layer)}
        node.update({n: getattr(layer, n).get_value() for m in layer.methods for n in m.param_names})
        params = set_path(params, path.split("/"), node)
        placements.append(Placement(layer.site, layer.methods))
    shared = {name: group.values() for name, group in _shared_holder(model).items()}
    if shared:
        params[SHARED] = shared
    prompts: tuple = ()
    for root in _prompt_models(model):
        prompts = root.peft_model_methods
        for m in prompts:
            params[m.group] = getattr(root, m.group).values()
    return bound_ops.Bound(tuple(placements), tuple(prompts), params)


def write(model: nnx.Module, bound: bound_ops.Bound) -> nnx.Module:
    """A new graph: ``model`` with the methods and leaves of ``bound`` (``model`` is untouched).

    Only the sites ``model`` already wraps are written (new sites come from ``apply_nnx``). A site
    left without methods (and without a quantized kernel) becomes its plain base layer again.
    Variables whose value is unchanged stay shared with ``model``; changed values get new Variables.
    """
    new = copy_graph(model)
    by_path = {p.site.path: p for p in bound.placements}
    shared = bound.params.get(SHARED, {})
    holder = getattr(new, SHARED, None)
    if holder is not None:
        for name in list(holder.keys()):
            if name not in shared:
                del holder[name]
            elif not _same(holder[name].values(), shared[name]):
                holder[name] = PeftShared(shared[name])
        if not len(holder):
            delattr(new, SHARED)
            holder = None
    for parts, layer in list(peft_layers(new)):
        path = _path_str(parts)
        try:
            node = get_path(bound.params, path)
        except KeyError:
            node = {}
        placement = by_path.get(path)
        methods = placement.methods if placement is not None else ()
        base = _base_params(layer.base_layer)
        changed = {k: node[k] for k in bound_ops.BASE_LEAVES if k in node and node[k] is not base.get(k)}
        base_layer = _layer_with(layer.base_layer, changed) if changed else layer.base_layer
        if not methods and not is_quantized(getattr(base_layer, layer.site.kernel_name).get_value()):
            _set(_get(new, parts[:-1]), parts[-1], base_layer)
            continue
        keep = [n for m in methods for n in m.param_names]
        for m in layer.methods:
            for n in m.param_names:
                if n not in keep:
                    delattr(layer, n)
        for n in keep:
            if n not in node:
                raise KeyError(f"no leaf {n!r} at {path!r} for {[type(m).__name__ for m in methods]}")
            var = getattr(layer, n, None)
            if not (isinstance(var, nnx.Variable) and var.get_value() is node[n]):
                setattr(layer, n, PeftParam(node[n]))  # a new Variable: the input model keeps its leaves
        layer.base_layer = base_layer
        layer.methods = tuple(methods)
        groups = {} if holder is None else {name: holder[name] for name in holder.keys()}
        layer.shared = nnx.data({m.shared_key: groups[m.shared_key] for m in methods if m.shared_key in groups})
    for root_path, root in [(tuple(p), n) for p, n in nnx.iter_graph(new) if isinstance(n, _PromptModel)]:
        keep_groups = {m.group for m in bound.prompts}
        for m in root.peft_model_methods:
            if m.group not in keep_groups:
                delattr(root, m.group)
        for m in bound.prompts:
            group = getattr(root, m.group, None)
            if not (isinstance(group, PeftShared) and _same(group.values(), bound.params[m.group])):
                setattr(root, m.group, PeftShared(bound.params[m.group]))
        root.peft_model_methods = tuple(bound.prompts)
        if not root.peft_model_methods:  # no prompt left: the model's own class again
            for name in ("peft_model_methods", "peft_active_adapters", "peft_mixed_adapters"):
                delattr(root, name)
            new = _replace(new, root_path, _reclass(root, _mixins(root) - {_PromptModel}))
    return new
