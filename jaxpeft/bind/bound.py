"""The bound-model representation, and every whole-model operation written once over it.

A model with PEFT methods, whichever binding made it, is a ``Bound``:

* ``placements``: which methods sit at which site (``jaxpeft.bind.plan.Placement``), in model order;
* ``prompts``: the model-level methods (soft prompts), in chain order;
* ``params``: one nested dict with one path convention, the Linen one: a layer's own leaves and its
  PEFT leaves side by side at its path (``layers_0/attn/query/{kernel,bias,lora_a,lora_b}``), the
  leaves one method shares across its sites under ``peft_shared/<name>@<adapter>``, a soft prompt's
  leaves under its ``group`` (``prompt/embeddings``).

A Linen ``params`` tree already has this shape. The NNX binding converts a graph to a ``Bound``
(``jaxpeft.bind.nnx.read``) and back (``jaxpeft.bind.nnx.write``). Everything here is pure:
new dicts, the input arrays shared, never written.

Keys: the leaves of the methods at a site come from ``fold_in(key, crc32(path))`` split once per
method in placement order, so the same transform and seed give bit-identical adapters in Linen
and NNX whatever order the bindings discover layers in; a shared group's key is
``fold_in(fold_in(key, SHARED_SALT), crc32(name))``; soft prompts split ``fold_in(key, 1)``.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jaxpeft.bind.plan import SHARED, Placement, with_shared
from jaxpeft.bind.select import Adapters, adapter_of, resolve
from jaxpeft.methods.site import Site
from jaxpeft.quant import QuantizedArray, dequantize, dequantize_array
from jaxpeft.transform import Transform
from jaxpeft.tree import get_path, set_path

__all__ = ["Bound", "add", "adapter_names", "delete", "fold", "init", "merge", "unmerge", "set_path"]

BASE_LEAVES = ("kernel", "bias", "embedding")  # the base leaves of every site kind (Site.base_names)
SHARED_SALT = 2  # fold_in salt of the shared-leaves keys (1 is the soft prompts')
PROMPT_SALT = 1


@dataclasses.dataclass(frozen=True)
class Bound:
    """A model with PEFT methods, binding-independent.

    Attributes:
      placements: the methods at each site, in model order.
      prompts: model-level methods (soft prompts), chain order.
      params: one nested dict: base and PEFT leaves at each site's path, ``peft_shared``, prompt groups.
    """

    placements: tuple[Placement, ...]
    prompts: tuple[Transform, ...]
    params: dict

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters bound, in order of first appearance (sites first, then soft prompts)."""
        return adapter_names(self.placements, self.prompts)


def adapter_names(placements: Sequence[Placement], prompts: Sequence[Transform] = ()) -> tuple[str, ...]:
    methods = [m for p in placements for m in p.methods] + list(prompts)
    return tuple(dict.fromkeys(adapter_of(m) for m in methods))


def path_key(key: jax.Array, path: str) -> jax.Array:
    """The key of the methods at ``path``: independent of the order layers are discovered in."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def site_keys(key: jax.Array, placement: Placement) -> list[jax.Array]:
    """One key per method at a site, in placement order."""
    return list(jax.random.split(path_key(key, placement.site.path), max(len(placement.methods), 1)))


def shared_group_key(key: jax.Array, name: str) -> jax.Array:
    return path_key(jax.random.fold_in(key, SHARED_SALT), name)


def prompt_keys(key: jax.Array, prompts: Sequence[Transform]) -> list[jax.Array]:
    return list(jax.random.split(jax.random.fold_in(key, PROMPT_SALT), max(len(prompts), 1)))


def stored_shape(kernel: Any) -> tuple[int, ...]:
    """The shape a layer's kernel is stored with; a quantized stack's includes its stack axes."""
    return tuple(kernel.logical_shape if isinstance(kernel, QuantizedArray) else kernel.shape)


def stacked_site(site: Site, stored_shape: Sequence[int]) -> Site:
    """The site of a whole stack of layers (``nn.scan`` / ``nn.vmap`` / ``nnx.vmap``), or ``site`` itself.

    Inside a scanned or vmapped body a layer sees one slice of its kernel (``site.kernel_shape``);
    the stored kernel has the stack's axes in front. The stacked site (``Site.stacked``) makes every
    PEFT leaf carry them too (``A: [L, *in, r]``, ``B: [L, r, *out]``, one init per slice), so the
    framework's own slicing hands each layer of the stack its adapter. The forward runs at
    ``site.unstacked()``.

    Args:
      site: the layer as one call sees it.
      stored_shape: the shape of the kernel as stored in the model's parameters.
    """
    layer, stored = tuple(site.kernel_shape), tuple(int(d) for d in stored_shape)
    extra = len(stored) - len(layer)
    if extra < 0 or stored[extra:] != layer:
        raise ValueError(f"{site.path!r} ({site.layer_type}): the stored kernel has shape {stored} but the layer "
                         f"multiplies by a kernel of shape {layer}; only leading stacked axes may differ")
    return site.stacked(stored[:extra]) if extra else site


def refuse_quantized_stack(path: str, layer_type: str, kernel: Any, num_stacked: int) -> None:
    """Refuse a quantized kernel of a stacked layer that was not quantized layer by layer, naming the path.

    A stacked kernel must be quantized with ``jp.quantize(..., stack_axes=k)`` (NNX finds ``k`` itself): each
    layer's slice its own ``QuantizedArray``, so ``nn.scan`` / ``nnx.scan`` hand every layer a whole one. One
    quantized over the whole stack packs and scales along the layer axis, and its static shape does not
    follow the scan's slicing: the forward would multiply by the wrong axes.
    """
    if num_stacked and isinstance(kernel, QuantizedArray) and len(kernel.stack_shape) != num_stacked:
        raise ValueError(
            f"{path!r} ({layer_type}) is a stacked layer ({num_stacked} stack axes) whose kernel was quantized as "
            f"one array of shape {tuple(kernel.logical_shape)}: it packs along the stack's layer axis, which "
            f"nn.scan / nnx.scan slice. Quantize each layer on its own: jp.quantize(params, ..., "
            f"stack_axes={num_stacked})"
        )


def base_of(node: Mapping) -> dict:
    """A layer's own leaves (``kernel``, ``bias``) out of its node."""
    return {k: node[k] for k in BASE_LEAVES if k in node}


def _float(kernel: Any) -> Any:
    # A merged kernel is a float kernel: W + s A B cannot stay on the 4-bit grid.
    return dequantize_array(kernel) if isinstance(kernel, QuantizedArray) else kernel


def init_site_leaves(placement: Placement, key: jax.Array, base: Mapping) -> tuple[dict, dict]:
    """The new leaves of every method at one site, and the site's base leaves after them.

    A method that declares ``updates_base`` (PiSSA-style inits) may return new ``kernel`` / ``bias``;
    any other method returning one is an error.

    Returns:
      ``(peft_leaves, base)``: ``{name: array}`` of the PEFT leaves, and the (possibly new) base leaves.
    """
    site, base, leaves = placement.site, dict(base), {}
    for k, method in zip(site_keys(key, placement), placement.methods):
        for name, value in method.init_site(k, site, base).items():
            if name in BASE_LEAVES:
                if not method.updates_base:
                    raise ValueError(f"{type(method).__name__}.init_site returned the base leaf {name!r} at "
                                     f"{site.path!r} without declaring updates_base = True")
                base[name] = value
            else:
                leaves[name] = value
    return leaves, base


def init_shared(placements: Sequence[Placement], key: jax.Array, taken: Mapping = ()) -> dict[str, dict]:
    """``{group name: leaves}`` of the methods that share leaves across their sites (Compacter)."""
    out = {}
    for name, (method, sites) in with_shared(placements).items():
        if name in taken:
            raise ValueError(f"params already hold shared leaves at {SHARED}/{name}")
        out[name] = dict(method.init_shared(shared_group_key(key, name), sites))
    return out


def init(placements: Sequence[Placement], key: jax.Array, params: Mapping) -> dict:
    """``params`` with every placed method's leaves added (a new tree; base arrays shared).

    Args:
      placements: where the methods go (``jaxpeft.bind.plan.plan``).
      key: the PEFT key (see the module docstring for how it is spread over sites).
      params: nested dict with at least each placed site's base leaves at its path.
    """
    new = dict(params)
    for p in placements:
        node = get_path(new, p.site.path)
        leaves, base = init_site_leaves(p, key, base_of(node))
        new = set_path(new, p.site.path.split("/"), {**node, **base, **leaves})
    shared = init_shared(placements, key, new.get(SHARED, {}))
    if shared:
        new[SHARED] = {**new.get(SHARED, {}), **shared}
    return new


def merge(bound: Bound, adapters: Adapters = True) -> dict:
    """Base-shaped params: every active method's update folded into its kernel, every PEFT leaf gone.

    Quantized kernels come back as float kernels. Soft prompts cannot be merged (they are not kernel
    updates): an active one is an error naming it.
    """
    active = resolve(adapters, bound.adapter_names)
    prompts = [type(m).__name__ for m in bound.prompts if adapter_of(m) in active]
    if prompts:
        raise ValueError(f"cannot merge {prompts} into base-shaped params: soft prompts are not kernel updates; "
                         "merge the other adapters with merge(..., adapters=[...]) and keep the prompt model")
    params = bound.params
    for p in bound.placements:
        node = get_path(params, p.site.path)
        name = p.site.kernel_name  # "embedding" for an Embed
        base = {**base_of(node), name: _float(node[name])}
        names = set()
        for m in p.methods:
            if adapter_of(m) in active:
                base = m.merge_site({n: node[n] for n in m.param_names}, base, site=p.site)
            names.update(m.param_names)
        merged = {k: v for k, v in node.items() if k not in names}
        merged.update(base)
        params = set_path(params, p.site.path.split("/"), merged)
    groups = {m.group for m in bound.prompts}
    return dequantize({k: v for k, v in params.items() if k != SHARED and k not in groups})


def unmerge(bound: Bound, merged: Mapping, adapters: Adapters = True) -> dict:
    """Take the active methods' updates back out of ``merged``: the inverse of ``merge``.

    Args:
      bound: the methods, with their leaves in ``bound.params`` (the update to take out).
      merged: base-shaped params from ``merge``.
      adapters: which adapters' updates ``merged`` holds (as given to ``merge``).
    Returns:
      params with base kernels and every PEFT leaf of ``bound``.
    """
    active = resolve(adapters, bound.adapter_names)
    params = dict(merged)
    if SHARED in bound.params:
        params[SHARED] = bound.params[SHARED]
    for m in bound.prompts:
        if m.group in bound.params:
            params[m.group] = bound.params[m.group]
    for p in bound.placements:
        try:
            node = dict(get_path(merged, p.site.path))
        except KeyError as e:
            raise KeyError(f"unmerge: the merged params lack the layer {p.site.path!r}") from e
        leaves = get_path(bound.params, p.site.path)
        base = base_of(node)
        for m in reversed(p.methods):
            missing = [n for n in m.param_names if n not in leaves]
            if missing:
                raise KeyError(f"unmerge: the adapter leaves lack {missing} at {p.site.path!r}")
            site_params = {n: leaves[n] for n in m.param_names}
            if adapter_of(m) in active:
                base = m.unmerge_site(site_params, base, site=p.site)
            node.update(site_params)
        node.update(base)
        params = set_path(params, p.site.path.split("/"), node)
    return params


def _fold_per_layer(method: Transform, site: Site) -> Callable:
    """``(params, shared) -> leaves``: ``method.fold_site`` (written for one layer, like ``apply_site``) mapped
    over a stacked site's layer axes, so each layer of an ``nn.scan`` / ``nnx.vmap`` stack folds its own
    slice; the shared leaves (one set for every layer) are passed whole."""
    layer = site.unstacked()
    fn = lambda params, shared: method.fold_site(params, layer, shared)  # noqa: E731
    for _ in range(site.num_stacked):
        fn = jax.vmap(fn, in_axes=(0, None))
    return fn


def fold(bound: Bound) -> Bound:
    """Reparameterisations (prefix MLP, P-tuning encoder) replaced by the values they compute."""
    params = dict(bound.params)
    placements, folded_shared = [], set()
    for p in bound.placements:
        node = dict(get_path(params, p.site.path))
        methods = []
        for m in p.methods:
            if m.foldable:  # the protocol declares fold_site on every method; only foldable ones define it
                shared = bound.params[SHARED][m.shared_key] if m.shared_names else None
                leaves = _fold_per_layer(m, p.site)({n: node[n] for n in m.param_names}, shared)
                node = {k: v for k, v in node.items() if k not in m.param_names}
                node.update(leaves)
                if shared is not None:
                    folded_shared.add(m.shared_key)
            methods.append(m.folded())
        params = set_path(params, p.site.path.split("/"), node)
        placements.append(Placement(p.site, tuple(methods)))
    if folded_shared:
        rest = {k: v for k, v in params[SHARED].items() if k not in folded_shared}
        params = {k: v for k, v in params.items() if k != SHARED}
        if rest:
            params[SHARED] = rest
    groups = [m.folded().group for m in bound.prompts]
    clash = sorted({g for g in groups if groups.count(g) > 1})
    if clash:
        raise ValueError(f"folding would put two soft prompts under {clash}; give the adapters different names")
    for m in bound.prompts:
        if m.foldable:
            leaves = m.fold_model(bound.params[m.group])
            del params[m.group]
            params[m.folded().group] = dict(leaves)
    return Bound(tuple(placements), tuple(m.folded() for m in bound.prompts), params)


def delete(bound: Bound, adapter: str) -> Bound:
    """``bound`` without the methods of ``adapter`` and their leaves (shared ones included)."""
    resolve([adapter], bound.adapter_names)
    params, placements = dict(bound.params), []
    for p in bound.placements:
        node = get_path(params, p.site.path)
        gone = {n for m in p.methods if adapter_of(m) == adapter for n in m.param_names}
        params = set_path(params, p.site.path.split("/"), {k: v for k, v in node.items() if k not in gone})
        placements.append(Placement(p.site, tuple(m for m in p.methods if adapter_of(m) != adapter)))
    gone_shared = {m.shared_key for p in bound.placements for m in p.methods if adapter_of(m) == adapter}
    if SHARED in params:
        rest = {k: v for k, v in params[SHARED].items() if k not in gone_shared}
        params = {k: v for k, v in params.items() if k != SHARED}
        if rest:
            params[SHARED] = rest
    prompts = []
    for m in bound.prompts:
        if adapter_of(m) == adapter:
            params.pop(m.group, None)
        else:
            prompts.append(m)
    return Bound(tuple(placements), tuple(prompts), params)


def add(bound: Bound, added: Sequence[Placement], key: jax.Array) -> Bound:
    """``bound`` with the methods of ``added`` joining their sites (new sites appended) and their leaves."""
    methods = {p.site.path: p.methods for p in bound.placements}
    sites: dict[str, Site] = {p.site.path: p.site for p in (*bound.placements, *added)}
    for p in added:
        methods[p.site.path] = methods.get(p.site.path, ()) + p.methods
    placements = tuple(Placement(sites[path], ms) for path, ms in methods.items())
    return Bound(placements, bound.prompts, init(added, key, bound.params))


def map_sites(bound: Bound, fn: Callable[[Placement, dict], dict]) -> Bound:
    """``bound`` with each placed site's node replaced by ``fn(placement, node)``."""
    params = bound.params
    for p in bound.placements:
        params = set_path(params, p.site.path.split("/"), fn(p, dict(get_path(params, p.site.path))))
    return dataclasses.replace(bound, params=params)
