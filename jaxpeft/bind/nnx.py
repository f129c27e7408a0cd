"""NNX binding: a structural copy of the module graph whose targeted layers are wrapped.

``apply_nnx`` returns a new graph (``nnx.merge(*nnx.split(model))``: new Python objects,
the same arrays, nothing copied in memory) in which each targeted ``Linear``,
``LinearGeneral`` or ``Einsum`` is replaced by a ``PeftLayer`` holding the original layer
as ``base_layer`` and the methods' leaves as ``PeftParam`` variables. The input model is
never touched. Everything else is plain NNX: ``nnx.split(peft_model, jp.PeftParam, ...)``
separates what trains.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx

from jaxpeft.bind.plan import SHARED, Layer, Placement, plan, shared_key, with_shared
from jaxpeft.bind.quantized import dequantized_kernel, is_quantized
from jaxpeft.bind.select import Adapters, adapter_of, check_mixed, mixed_call, resolve
from jaxpeft.methods.site import Site, dense_general_equation
from jaxpeft.transform import Transform

WRAPPABLE = "Linear, LinearGeneral or Einsum"


class PeftParam(nnx.Param):
    """A trainable parameter added by a PEFT method (filter with ``jp.PeftParam``)."""


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _site(path: str, module: nnx.Module) -> tuple[Site | None, str | None]:
    """The site of an NNX layer, or why there is none."""
    if not isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)):
        return None, f"not a {WRAPPABLE}"
    kernel = module.kernel.get_value()
    shape, dtype = tuple(kernel.shape), jax.numpy.dtype(kernel.dtype).name
    if isinstance(module, nnx.Linear):
        equation = "...i,io->...o"
    elif isinstance(module, nnx.Einsum):
        equation = module.einsum_str
    else:
        if module.batch_axis:
            return None, f"LinearGeneral with batch_axis={dict(module.batch_axis)} is not supported"
        n = len(module.axis)
        if tuple(module.axis) != tuple(range(-n, 0)):
            return None, f"LinearGeneral contracts axis={module.axis}; only trailing negative axes are supported"
        equation = dense_general_equation(n, len(shape) - n)
    try:
        return Site(path, type(module).__name__, equation, shape, dtype), None
    except ValueError as e:
        return None, str(e)


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
    return {k: getattr(layer, k).get_value() for k in ("kernel", "bias") if isinstance(getattr(layer, k, None), nnx.Variable)}


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
        self.rngs = None
        self.shared = nnx.data({})
        self.add(placement.methods, params, key)

    def add(self, methods: tuple, params: dict[str, jax.Array], key: jax.Array, shared: dict | None = None) -> None:
        """Put more methods (and their leaves) on this layer; used while building a new graph."""
        self.methods = self.methods + tuple(methods)
        if shared:
            self.shared = nnx.data({**self.shared, **shared})
        for name, value in params.items():
            setattr(self, name, PeftParam(value))
        if self.rngs is None and any(getattr(m, "dropout", 0.0) > 0.0 for m in self.methods):
            self.rngs = nnx.Rngs(dropout=key)

    def remove(self, adapter: str) -> None:
        """Take the methods of ``adapter`` (and their leaves) off this layer."""
        for m in self.methods:
            if adapter_of(m) == adapter:
                for name in m.param_names:
                    delattr(self, name)
        self.methods = tuple(m for m in self.methods if adapter_of(m) != adapter)

    def _base(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        kernel = self.base_layer.kernel.get_value()
        if not is_quantized(kernel):
            return self.base_layer(x, *args, **kwargs)
        # A view of the base layer (same Variables) whose kernel is a new, dequantized Variable:
        # Flax's own math on the float kernel; the shared Variables are never written.
        layer = nnx.merge(*nnx.split(self.base_layer))
        layer.kernel = nnx.Param(dequantized_kernel(kernel, getattr(layer, "dtype", None)))
        return layer(x, *args, **kwargs)

    def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        fn = lambda x: self._base(x, *args, **kwargs)  # noqa: E731
        params_of = lambda m: {name: getattr(self, name).get_value() for name in m.param_names}  # noqa: E731
        if self.mixed_adapters is not None:
            return mixed_call(self.methods, params_of, self.site, x, fn, self.mixed_adapters, self.adapter_ids)
        for m in self.methods:
            if self.active_adapters is not None and adapter_of(m) not in self.active_adapters:
                continue
            use_rng = self.rngs is not None and not self.deterministic and getattr(m, "dropout", 0.0) > 0.0
            rng = self.rngs.dropout() if use_rng else None
            shared = self.shared[shared_key(m)].values() if getattr(m, "shared_names", ()) else None
            base = _base_params(self.base_layer)
            fn = functools.partial(m.apply_site, params_of(m), self.site, base_fn=fn, rng=rng, base=base, shared=shared)
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
    """A new module graph with the same arrays (no array is copied)."""
    return nnx.merge(*nnx.split(model))


def apply_nnx(peft: Transform, model: nnx.Module, key: jax.Array) -> nnx.Module:
    """Bind ``peft`` to an NNX ``model``; return a new model (the input is left as it is).

    ``model`` may already hold ``PeftLayer``s (from an earlier ``jp.apply``): the new methods
    join them, which is how named adapters are added.

    Args:
      peft: a transform or chain.
      model: an NNX module.
      key: PRNG key for the PEFT parameters and their dropout stream.
    """
    layers = discover(model)
    placements = plan(peft, layers, WRAPPABLE)
    # Flax's layers cannot multiply by a quantized kernel: wrap every quantized layer, targeted or not.
    placed = {p.site.path for p in placements}
    placements += tuple(
        Placement(layer.site, ())
        for layer in layers
        if layer.site is not None
        and layer.path not in placed
        and is_quantized(layer.module.kernel.get_value())
        and not isinstance(_get(model, _parts(model, layer.path)), PeftLayer)
    )
    new = copy_graph(model)
    site_key, shared_rng = jax.random.split(key)
    shared_methods = with_shared(placements)
    shared = {
        name: PeftShared(method.init_shared(k, sites))
        for k, (name, (method, sites)) in zip(jax.random.split(shared_rng, max(len(shared_methods), 1)), shared_methods.items())
    }
    if shared:
        # One module holds them; every PeftLayer references it (NNX keeps shared references shared).
        holder = getattr(new, SHARED, None) or nnx.Dict()
        for name, module in shared.items():
            holder[name] = module
        setattr(new, SHARED, holder)
    for k, placement in zip(jax.random.split(site_key, max(len(placements), 1)), placements):
        parts = _parts(model, placement.site.path)
        init_key, dropout_key = jax.random.split(k)
        target = _get(new, parts)
        base_layer = target.base_layer if isinstance(target, PeftLayer) else target
        base = _base_params(base_layer)
        params = {}
        for mk, m in zip(jax.random.split(init_key, max(len(placement.methods), 1)), placement.methods):
            leaves = m.init_site(mk, placement.site, base)
            for name in [n for n in leaves if n in ("kernel", "bias")]:
                if not getattr(m, "updates_base", False):
                    raise ValueError(f"{type(m).__name__}.init_site returned the base leaf {name!r} at "
                                     f"{placement.site.path!r} without declaring updates_base = True")
                # A new Variable on this graph's own copy of the layer: the input model's stays as it was.
                base_layer = nnx.merge(*nnx.split(base_layer))
                setattr(base_layer, name, getattr(base_layer, name).replace(value=leaves.pop(name)))
                base = {**base, name: getattr(base_layer, name).get_value()}
                if isinstance(target, PeftLayer):
                    target.base_layer = base_layer
                else:
                    target = base_layer
            params.update(leaves)
        refs = {shared_key(m): shared[shared_key(m)] for m in placement.methods if shared_key(m) in shared}
        if isinstance(target, PeftLayer):
            target.add(placement.methods, params, dropout_key, refs)
        else:
            layer = PeftLayer(target, Placement(placement.site, ()), {}, dropout_key)
            layer.add(placement.methods, params, dropout_key, refs)
            _set(_get(new, parts[:-1]), parts[-1], layer)
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
    ``jp.apply`` (which wraps every quantized layer); Flax's layers alone cannot use it.
    """
    from jaxpeft.quant import quantize

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, quantize(state, **kwargs))


def peft_layers(model: nnx.Module) -> Iterator[tuple[tuple, PeftLayer]]:
    """``(graph path, layer)`` for every ``PeftLayer`` in ``model``."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, PeftLayer):
            yield tuple(path), node


@contextlib.contextmanager
def _setting(model: nnx.Module, **values: Any) -> Iterator[nnx.Module]:
    layers = [layer for _, layer in peft_layers(model)]
    before = [{k: getattr(layer, k) for k in values} for layer in layers]
    for layer in layers:
        for k, v in values.items():
            setattr(layer, k, v)
    try:
        yield model
    finally:
        for layer, old in zip(layers, before):
            for k, v in old.items():
                setattr(layer, k, v)


def adapter_names(model: nnx.Module) -> tuple[str, ...]:
    """The adapters bound to an NNX model, in order of first appearance."""
    return tuple(dict.fromkeys(adapter_of(m) for _, layer in peft_layers(model) for m in layer.methods))


def use_adapters(model: nnx.Module, adapters: Adapters) -> contextlib.AbstractContextManager:
    """Within the block, only ``adapters`` run (True: all, False: none, a name or a list of names)."""
    active = resolve(adapters, adapter_names(model))
    return _setting(model, active_adapters=active)


def adapters_disabled(model: nnx.Module) -> contextlib.AbstractContextManager:
    """Within the block, every ``PeftLayer`` of ``model`` runs its base layer alone."""
    return use_adapters(model, False)


def mixed_adapters(model: nnx.Module, adapters: Adapters, adapter_ids: jax.Array) -> contextlib.AbstractContextManager:
    """Within the block, example ``i`` of a batch runs adapter ``adapters[adapter_ids[i]]`` (LoRA).

    Usable inside ``nnx.jit`` (enter it in the jitted function, with ``adapter_ids`` an argument).
    """
    names = check_mixed(adapters, adapter_ids, adapter_names(model))
    return _setting(model, mixed_adapters=names, adapter_ids=adapter_ids)


def delete_adapter_nnx(model: nnx.Module, adapter: str) -> nnx.Module:
    """A new graph without ``adapter``; layers left with nothing to do are unwrapped."""
    resolve([adapter], adapter_names(model))
    new = copy_graph(model)
    for path, layer in list(peft_layers(new)):
        layer.remove(adapter)
        if not layer.methods and not is_quantized(layer.base_layer.kernel.get_value()):
            _set(_get(new, path[:-1]), path[-1], layer.base_layer)
    return new
