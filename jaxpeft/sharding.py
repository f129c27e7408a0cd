"""PartitionSpecs for every PEFT parameter, derived from its base kernel's spec.

JAX's own sharding is the engine (``Mesh``, ``NamedSharding``, ``PartitionSpec``, ``jax.jit``);
this module only answers "how should each parameter of a PEFT model be laid out on a mesh?".

* Base parameters keep the spec the user already wrote: Linen ``nn.with_partitioning`` /
  ``nn.with_logical_partitioning`` boxes, NNX ``out_sharding`` Variable metadata, or an explicit
  tree of ``PartitionSpec``. Logical axis names go through ``rules`` (flax's
  ``[(logical, mesh_axis), ...]`` format).
* A PEFT leaf's spec is derived from its base kernel's. A method declares, per leaf, which kernel
  axes each leaf dimension corresponds to (``param_axes``, below); LoRA's ``A: [*in_shape, r]``
  takes the kernel's input-axis entries plus the rank entry, ``B: [r, *out_shape]`` the rank
  entry plus the output-axis entries. The rank axis is replicated unless ``rank_axis`` names a
  mesh axis for it.
* A ``QuantizedArray`` kernel shards like its float original. Its children keep the kernel's
  layout (``[*stack, *kernel]``, the blocked axis ``QuantizedArray.axis``, the layer's input axis,
  counted in bytes or blocks), so ``packed`` and ``scales`` take the kernel's spec entry for entry:
  a stacked ``[L, d_in, d_out]`` kernel's layer axis stays the layer axis, a heads-first Einsum
  ``[heads, d_model, head_dim]`` blocked along ``d_model`` keeps its heads where they were. The tiny
  double-quantization ``scale_scales`` ``[*lead, nblocks, nsb]`` and ``scale_offset`` ``[*lead]``
  take the entries of the axes in front of the blocked one (``lead``: the stack's and the kernel's
  own, e.g. the heads) and are replicated along the rest (``nsb`` mixes every trailing axis in
  blocks of 256, so no kernel entry applies to it; it is ``1 / (block_size * 256)`` of the weight).
* ``shardings(specs, mesh, params)`` turns specs into ``NamedSharding`` and checks, before any
  work, that every axis exists in the mesh and divides the dimension it shards; errors name the
  parameter path, the axis and the sizes.

Per-leaf axes: a tuple with one entry per *group of* leaf dimensions:

* ``"in"``: all of the kernel's input axes, in order (``site.in_shape``);
* ``"out"``: all of its output axes (``site.out_shape``);
* ``"kernel"``: every kernel axis (``"in"`` then ``"out"``);
* an ``int`` ``k``: kernel axis ``k``;
* ``"rank"``: a dimension of the method's own (a LoRA rank): replicated, or ``rank_axis``;
* ``None``: a dimension with no kernel counterpart: replicated.

The kernel's axes are found by role, wherever its layout puts them (an Einsum kernel ``[h, k, d]``
contracted over ``d`` has its input last). A leaf made at a site with shared axes (a stack of layers
from ``nn.scan`` / ``nnx.vmap``, heads, experts) carries them in front (``A: [L, *in, r]``); they take
the kernel's entries for those axes unless the declaration already covers them (``"kernel"``).

A method declares them as an attribute ``param_axes = {"lora_a": ("in", "rank"), ...}``, or per
site with ``param_axes_at(site)`` (``jaxpeft.methods.protocol``). A PEFT leaf without a declaration is
replicated, with a warning naming it; leaves shared by all of a method's sites are replicated.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxpeft import tree as _tree
from jaxpeft.methods.lora import PARAM_AXES as LORA_AXES
from jaxpeft.methods.protocol import check_method
from jaxpeft.quant._array import QuantizedArray

__all__ = [
    "ShardingError",
    "LORA_PARAM_AXES",
    "param_axes",
    "peft_specs",
    "shardings",
    "optimizer_specs",
    "check_specs",
]

P = PartitionSpec
Rules = Sequence[tuple[str, Any]]

LORA_PARAM_AXES: tuple[tuple[Any, ...], tuple[Any, ...]] = LORA_AXES
"""LoRA's ``(A, B)`` (``LoRA.param_axes`` gives them its leaf names): ``A: [*in_shape, r]`` follows
the kernel's input axes, ``B: [r, *out_shape]`` its outputs."""

SHARED = "peft_shared"  # the top-level key of leaves a method shares across sites (bind.plan.SHARED)

_MAX_LISTED = 20


class ShardingError(ValueError):
    """A spec or sharding does not fit the mesh or the parameters (the message names the paths)."""


def _capped(lines: Sequence[str]) -> str:
    shown = [f"  {line}" for line in lines[:_MAX_LISTED]]
    if len(lines) > _MAX_LISTED:
        shown.append(f"  ... and {len(lines) - _MAX_LISTED} more")
    return "\n".join(shown)


# --------------------------------------------------------------------------------------------
# Per-leaf axes of a method
# --------------------------------------------------------------------------------------------


def param_axes(method: Any, site: Any = None) -> Mapping[str, tuple[Any, ...]] | None:
    """How each leaf of ``method`` relates to its kernel's axes, or None if it does not say.

    A method declares them (``jaxpeft.methods.protocol``) with ``param_axes_at(site) -> mapping``
    (when they depend on the site: IA3 scales a layer's input at some sites and its output at
    others) or with a ``param_axes`` mapping (LoRA's: ``LORA_PARAM_AXES`` under its leaf names).
    """
    try:
        check_method(method)
    except TypeError as error:
        raise TypeError(f"param_axes expects a PEFT method (jp.lora(...), ...), got {type(method).__name__}: "
                        f"{method!r}. {error}") from None
    axes = method.param_axes_at(site) if site is not None else None
    return axes if axes is not None else method.param_axes


def _mesh_axes(entry: Any) -> tuple[str, ...]:
    """The mesh axis names of one spec entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    if isinstance(entry, (tuple, list)):
        return tuple(a for e in entry for a in _mesh_axes(e))
    return (entry,)


def _derive(site: Any, kernel: tuple, axes: Sequence[Any], shape: tuple[int, ...], rank_axis: Any, where: str) -> P:
    """The spec of one PEFT leaf from its kernel's (padded) spec entries and its declared axes."""
    # The kernel's axes by role, wherever they sit in its layout: an Einsum kernel "hdn" or a
    # stacked "L,d,o" is not inputs-first. Shared axes (a stack's layers, heads, experts) lead
    # every leaf made at the site (Site.a_shape), so they take the kernel's entries in front.
    ins = [kernel[i] for i in site.in_axes]
    outs = [kernel[i] for i in site.out_axes]
    shared = [kernel[i] for i in site.shared_axes]
    n_in = len(ins)
    entries: list[Any] = []
    rank_dims: list[int] = []
    for token in axes:
        if token == "in":
            entries += ins
        elif token == "out":
            entries += outs
        elif token == "kernel":
            entries += kernel
        elif token == "rank":
            rank_dims.append(len(entries))
            entries.append(None)
        elif token is None:
            entries.append(None)
        elif isinstance(token, int) and not isinstance(token, bool) and -len(kernel) <= token < len(kernel):
            entries.append(kernel[token])
        else:
            raise ValueError(
                f"{where}: axes entry {token!r} is not 'in', 'out', 'kernel', 'rank', None or a kernel axis "
                f"index (the kernel has {len(kernel)} axes)"
            )
    if shared and "kernel" not in axes and len(entries) + len(shared) == len(shape):
        entries = shared + entries
        rank_dims = [i + len(shared) for i in rank_dims]
    if len(entries) != len(shape):
        raise ValueError(
            f"{where}: declared axes {tuple(axes)} give {len(entries)} dimensions for a leaf of shape {shape} "
            f"(kernel {site.kernel_shape}: {len(shared)} shared, {n_in} input and {len(outs)} output axes)"
        )
    if rank_axis is not None and rank_dims:
        # A mesh axis can shard one dimension of an array: the rank stays replicated where the
        # leaf already uses the axis (LoRA A under FSDP, say), and is sharded everywhere else.
        used = {a for i, e in enumerate(entries) if i not in rank_dims for a in _mesh_axes(e)}
        if not used & set(_mesh_axes(rank_axis)):
            for i in rank_dims:
                entries[i] = rank_axis
    return P(*entries)


# --------------------------------------------------------------------------------------------
# Reading base specs from what users write
# --------------------------------------------------------------------------------------------


def _is_box(x: Any) -> bool:
    from flax.core import meta

    return isinstance(x, meta.AxisMetadata)


def _is_logical_box(x: Any) -> bool:
    import flax.linen as nn

    return isinstance(x, nn.LogicallyPartitioned)


def _context_rules() -> Rules:
    from flax.core import spmd

    return tuple(spmd.get_logical_axis_rules() or ())


def _apply_rules(names: Sequence[Any], rules: Rules) -> tuple:
    """Logical names -> mesh axes (flax semantics: the first rule whose mesh axes are still free).

    A name without any rule is kept as it is (it may already be a mesh axis name); one that is
    not a mesh axis is then reported by ``shardings`` / ``check_specs``.
    """
    if not rules:
        return tuple(names)
    used: set[str] = set()
    out = []

    def one(name: Any) -> Any:
        if name is None:
            return None
        candidates = [mesh for logical, mesh in rules if logical == name]
        if not candidates:
            used.update(_mesh_axes(name))
            return name
        for mesh in candidates:
            axes = _mesh_axes(mesh)
            if not used & set(axes):
                used.update(axes)
                return mesh
        return None

    for entry in names:
        if isinstance(entry, (tuple, list)):
            mapped = tuple(a for e in entry for a in _mesh_axes(one(e)))
            out.append(mapped if len(mapped) > 1 else (mapped[0] if mapped else None))
        else:
            out.append(one(entry))
    return tuple(out)


def _as_spec(value: Any, rules: Rules | None, where: str) -> P:
    """One base spec, from any of the forms users write, with logical names resolved."""
    from flax import nnx

    if value is None:
        return P()
    if isinstance(value, QuantizedArray):  # our own output for a quantized kernel: its packed spec
        return _as_spec(value.packed, rules, where)
    if isinstance(value, nnx.Variable):
        inner = value.get_value()
        if isinstance(inner, P) or (isinstance(inner, QuantizedArray) and isinstance(inner.packed, P)):
            return _as_spec(inner, rules, where)  # from nnx.get_partition_spec / peft_specs
        names = value.get_metadata().get("out_sharding")
        if not names:
            return P()
        local = value.get_metadata().get("sharding_rules") or ()
        return P(*_apply_rules(tuple(names), rules or local or _context_rules()))
    if _is_box(value):
        names = getattr(value, "names", None)
        if names is None:
            raise TypeError(f"{where}: {type(value).__name__} box carries no axis names")
        if _is_logical_box(value):
            return P(*_apply_rules(tuple(names), rules or getattr(value, "rules", None) or _context_rules()))
        return P(*names)  # nn.Partitioned: mesh axis names already
    if isinstance(value, P):
        return P(*_apply_rules(tuple(value), rules or ()))
    if isinstance(value, (tuple, list)) and all(
        e is None or isinstance(e, str) or (isinstance(e, (tuple, list)) and all(isinstance(a, str) for a in e))
        for e in value
    ):
        return P(*_apply_rules(tuple(value), rules or ()))
    if hasattr(value, "shape"):  # an unannotated array: replicated, as nn.get_partition_spec says
        return P()
    raise TypeError(
        f"{where}: a base spec is a PartitionSpec, a tuple of mesh / logical axis names, None, a flax "
        f"Partitioned box or an NNX Variable; got {type(value).__name__}: {value!r}"
    )


def _is_spec_leaf(x: Any) -> bool:
    from flax import nnx

    return (
        x is None
        or isinstance(x, (P, QuantizedArray, nnx.Variable))
        or _is_box(x)
        or (isinstance(x, tuple) and not hasattr(x, "_fields") and all(e is None or isinstance(e, (str, tuple)) for e in x))
    )


def _spec_table(base_specs: Any, rules: Rules | None) -> dict[str, P]:
    """``{path: PartitionSpec}`` of an explicit base-spec tree (or a boxed / annotated params tree)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(base_specs, is_leaf=_is_spec_leaf)
    table = {}
    for keypath, value in flat:
        where = _tree.path_to_str(keypath)
        table[where] = _as_spec(value, rules, where)
    return table


def _padded(spec: P, ndim: int, where: str, shape: tuple[int, ...]) -> tuple:
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ShardingError(f"{where}: spec {spec} has {len(entries)} entries for an array of shape {shape}")
    return entries + (None,) * (ndim - len(entries))


def _quantized_specs(q: QuantizedArray, kernel: tuple) -> QuantizedArray:
    """Specs for a quantized kernel's children from the kernel's entries (``[*stack, *shape]``).

    ``packed`` / ``scales`` have the kernel's layout (the blocked axis in bytes / blocks): its entries.
    The double-quantization children lead with the axes before the blocked one (stack axes, then
    ``shape[:axis]``): those entries, the rest replicated.
    """
    lead = P(*kernel[: len(q.stack_shape) + q.axis])
    return dataclasses.replace(
        q,
        packed=P(*kernel),
        scales=P(*kernel),
        scale_scales=None if q.scale_scales is None else lead,
        scale_offset=None if q.scale_offset is None else lead,
    )


# --------------------------------------------------------------------------------------------
# peft_specs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _PeftLeaf:
    site: Any
    method: Any
    name: str
    kernel_path: str


def peft_specs(
    peft_model: Any,
    params: Any = None,
    base_specs: Any = None,
    *,
    rules: Rules | None = None,
    rank_axis: str | tuple[str, ...] | None = None,
) -> Any:
    """A ``PartitionSpec`` for every parameter of a PEFT model: base leaves and PEFT leaves.

    Linen::

      peft_model, params = jp.apply(peft, model, key, x, params=base)
      specs = jp.peft_specs(peft_model, params, base_specs)      # tree shaped like params

    NNX (the model from ``jp.apply``)::

      specs = jp.peft_specs(peft_model)        # an nnx.State shaped like nnx.state(peft_model)

    Args:
      peft_model: a ``PeftLinen`` (Linen) or the NNX module returned by ``jp.apply``.
      params: Linen: the full params (base and PEFT leaves; ``QuantizedArray`` kernels allowed).
        NNX: leave it None (the model holds its state).
      base_specs: the base parameters' specs. None: read them from ``params`` (Linen
        ``nn.with_partitioning`` / ``nn.with_logical_partitioning`` boxes) or from the NNX
        Variables' ``out_sharding`` metadata; unannotated leaves are replicated. Otherwise a tree
        whose leaves are ``PartitionSpec``, tuples of axis names, ``None`` (replicated), flax
        boxes (``model.init(...)["params"]`` as is) or NNX Variables (``nnx.get_partition_spec``);
        its paths must be exactly the base parameters' (PEFT leaves may be absent; NNX paths
        may omit the ``base_layer`` step that ``jp.apply`` inserts).
      rules: logical axis rules ``[(logical_name, mesh_axis_or_None), ...]`` applied to
        logical names (default: a box's / Variable's own rules, else flax's
        ``logical_axis_rules`` context). A name without a rule is kept as a mesh axis name.
      rank_axis: a mesh axis (or tuple of axes) to shard the rank dimension of PEFT leaves over
        (LoRA ``A``'s last axis, ``B``'s first); None keeps it replicated. Where the leaf already
        uses that mesh axis for another dimension, its rank stays replicated.

    Returns:
      Linen: a tree with the structure of ``params`` (boxes unboxed), ``PartitionSpec`` leaves;
      a ``QuantizedArray`` kernel gets a ``QuantizedArray`` of specs (``packed`` and ``scales``
      take the kernel's spec, ``scale_scales`` / ``scale_offset`` are replicated). NNX: an
      ``nnx.State`` like ``nnx.get_partition_spec(nnx.state(peft_model))``, split it with NNX
      filters (``specs.split(jp.PeftParam, ...)``). Use ``jp.partition(specs, selector)`` for the
      trainable / frozen parts of a Linen tree.

    Raises:
      ShardingError: an explicit ``base_specs`` lacks a base parameter or names one that does not
        exist (closest paths listed), or a spec has more entries than its array has axes.
      TypeError: an unknown model type, or a base spec of an unknown form.
    """
    from flax import nnx

    from jaxpeft.bind.linen import PeftLinen

    if isinstance(peft_model, nnx.Module):
        if params is not None:
            raise TypeError("an NNX model holds its own state: jp.peft_specs(peft_model, base_specs=...)")
        return _nnx_specs(peft_model, base_specs, rules, rank_axis)
    if isinstance(peft_model, PeftLinen):
        if params is None:
            raise TypeError("a Linen PeftLinen needs its params: jp.peft_specs(peft_model, params, base_specs)")
        return _linen_specs(peft_model, params, base_specs, rules, rank_axis)
    raise TypeError(
        f"jp.peft_specs expects what jp.apply returns (a PeftLinen or an NNX module), got {type(peft_model).__name__}"
    )


def _warn_unknown(unknown: list[str]) -> None:
    if unknown:
        warnings.warn(
            f"jp.peft_specs: {len(unknown)} PEFT leaves have no declared axes (a method's `param_axes`) "
            f"and are replicated on every device: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}",
            stacklevel=4,
        )


def _check_table(table: dict[str, P], known: set[str], what: str) -> None:
    extra = sorted(p for p in table if p not in known)
    if extra:
        lines = [f"{p}: no such parameter; closest: {_tree.nearest_paths(p, sorted(known), 3)}" for p in extra]
        raise ShardingError(f"base_specs names {len(extra)} paths that are not {what}:\n" + _capped(lines))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A bound model's leaves as one flat table with one path convention, whichever binding holds them.

    Attributes:
      values: ``{path: array}`` (unboxed: an array, a ``jax.ShapeDtypeStruct``, a ``QuantizedArray``).
      sources: ``{path: what a base spec is read from}`` (a flax box, an NNX Variable, the array).
      peft: ``{path: _PeftLeaf}`` of every PEFT leaf placed at a site.
      shared: ``path -> bool``: a leaf a method shares across its sites (no one kernel to follow).
      stray: ``path -> bool``: a PEFT leaf outside any placement (replicated, with a warning).
      needs_spec: ``path -> bool``: a base parameter an explicit ``base_specs`` must cover.
      aliases: other spellings of paths a ``base_specs`` may use -> the path here.
      what: what the paths are, for messages.
    """

    values: dict[str, Any]
    sources: dict[str, Any]
    peft: dict[str, _PeftLeaf]
    shared: Callable[[str], bool]
    stray: Callable[[str], bool]
    needs_spec: Callable[[str], bool]
    aliases: Mapping[str, str]
    what: str


def _layout_specs(layout: _Layout, base_specs: Any, rules: Rules | None, rank_axis: Any) -> dict[str, Any]:
    """``{path: spec}`` for every leaf of ``layout``: the one derivation both bindings use.

    Base leaves keep their spec (``base_specs``, else read from the leaf's box / Variable); a
    ``QuantizedArray`` base leaf gets a ``QuantizedArray`` of specs; a PEFT leaf's spec follows
    its kernel's (``_derive``); shared and stray PEFT leaves are replicated.
    """
    values = layout.values

    def own(p: str) -> bool:  # a base leaf: its spec is the user's
        return p not in layout.peft and not layout.shared(p) and not layout.stray(p)

    if base_specs is None:
        # Leaves the transform's selector claims but no placement made stay out: warned below.
        table = {p: _as_spec(layout.sources[p], rules, p) for p in values if own(p)}
    else:
        given = _spec_table(base_specs, rules)
        known = set(values) | set(layout.aliases)
        _check_table({p: s for p, s in given.items() if p not in layout.peft}, known, layout.what)
        table = {(p if p in values else layout.aliases[p]): s for p, s in given.items()}
        missing = [f"{p}: shape {_shape(x)}" for p, x in values.items()
                   if own(p) and p not in table and layout.needs_spec(p)]
        if missing:
            raise ShardingError(
                f"base_specs has no spec for {len(missing)} base parameters (give one per leaf; None or P() "
                "replicates):\n" + _capped(missing)
            )

    def kernel_entries(kernel_path: str) -> tuple:
        shape = _shape(values[kernel_path])
        return _padded(table.get(kernel_path, P()), len(shape), kernel_path, shape)

    unknown: list[str] = []
    out: dict[str, Any] = {}
    for p, x in values.items():
        if p in layout.peft:
            info = layout.peft[p]
            axes = param_axes(info.method, info.site)
            if axes is None or info.name not in axes:
                unknown.append(p)
                out[p] = P()
                continue
            shape = _shape(x)
            where = f"{p} ({type(info.method).__name__} leaf {info.name!r}, shape {shape})"
            out[p] = _derive(info.site, kernel_entries(info.kernel_path), axes[info.name], shape, rank_axis, where)
        elif layout.shared(p):
            out[p] = P()
        elif layout.stray(p):
            unknown.append(p)
            out[p] = P()
        elif not hasattr(x, "shape"):  # an NNX Variable holding no array (a count, a flag)
            out[p] = P()
        else:
            spec = table.get(p, P())
            entries = _padded(spec, len(_shape(x)), p, _shape(x))
            out[p] = _quantized_specs(x, entries) if isinstance(x, QuantizedArray) else spec
    _warn_unknown(unknown)
    return out


def _site_leaves(prefix: str, site: Any, methods: Sequence[Any], kernel_path: str) -> dict[str, _PeftLeaf]:
    """The PEFT leaves of the methods at one site, keyed by path."""
    return {f"{prefix}/{name}": _PeftLeaf(site, method, name, kernel_path)
            for method in methods for name in method.param_names}


def _linen_specs(peft_model: Any, params: Any, base_specs: Any, rules: Rules | None, rank_axis: Any) -> Any:
    """Linen: ``params`` is the flat table already; specs come back in its structure (boxes unboxed)."""
    peft: dict[str, _PeftLeaf] = {}
    for placement in peft_model.placements:
        site = placement.site
        peft.update(_site_leaves(site.path, site, placement.methods, f"{site.path}/{site.kernel_name}"))

    def is_leaf(x):
        return isinstance(x, QuantizedArray) or _is_box(x)

    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)
    paths = [_tree.path_to_str(k) for k, _ in flat]
    sources = dict(zip(paths, (x for _, x in flat)))
    values = {p: _unbox(x) for p, x in sources.items()}
    layout = _Layout(
        values=values,
        sources=sources,
        peft=peft,
        shared=_is_shared,
        stray=lambda p: p not in peft and not _is_shared(p) and _tree.matches(peft_model.trainable, p, values[p]),
        needs_spec=lambda p: True,
        aliases={},
        what="parameters of params",
    )
    specs = _layout_specs(layout, base_specs, rules, rank_axis)
    return jax.tree_util.tree_unflatten(treedef, [specs[p] for p in paths])


def _shape(x: Any) -> tuple[int, ...]:
    """The shape of an array, a ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` output) or a scalar.

    A quantized stack of layers (``QuantizedArray.stack_shape``) has its stack axes in front, as its children do.
    """
    if isinstance(x, QuantizedArray):
        return x.logical_shape
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(x))


def _is_shared(path: str) -> bool:
    return path == SHARED or path.startswith(SHARED + "/")


def _unbox(x: Any) -> Any:
    return x.unbox(apply_constraint=False) if _is_box(x) and hasattr(x, "unbox") else x


def _without_base_layer(path: str) -> str:
    return "/".join(part for part in path.split("/") if part != "base_layer")


def _nnx_specs(model: Any, base_specs: Any, rules: Rules | None, rank_axis: Any) -> Any:
    """NNX: ``nnx.state(model)`` flattened to the table (``base_layer`` paths); specs as an ``nnx.State``."""
    from flax import nnx

    from jaxpeft.bind.nnx import PeftParam, PeftShared, peft_layers

    # Leaves a method shares across sites live in PeftShared modules, which NNX lists under the
    # first path that reaches them (".../shared/compacter@default/phm_rule"): replicated.
    shared_prefixes = tuple(
        "/".join(str(p) for p in graph_path) + "/"
        for graph_path, node in nnx.iter_graph(model)
        if isinstance(node, PeftShared)
    )
    peft: dict[str, _PeftLeaf] = {}
    for graph_path, layer in peft_layers(model):
        prefix = "/".join(str(p) for p in graph_path)
        site = layer.site
        peft.update(_site_leaves(prefix, site, layer.methods, f"{prefix}/base_layer/{site.kernel_name}"))

    state = nnx.state(model)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    flat, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)
    variables = {_tree.path_to_str(k): v for k, v in flat}

    def shared(p: str) -> bool:
        return _is_shared(p) or p.startswith(shared_prefixes)

    layout = _Layout(
        values={p: v.get_value() for p, v in variables.items()},
        sources=variables,
        peft=peft,
        shared=shared,
        stray=lambda p: p not in peft and not shared(p) and isinstance(variables[p], PeftParam),
        needs_spec=lambda p: isinstance(variables[p], nnx.Param),
        aliases={_without_base_layer(p): p for p in variables},
        what="variables of the model",
    )
    specs = _layout_specs(layout, base_specs, rules, rank_axis)
    return jax.tree_util.tree_map_with_path(
        lambda keypath, var: var.replace(specs[_tree.path_to_str(keypath)]), state, is_leaf=is_var
    )


# --------------------------------------------------------------------------------------------
# Validation and NamedSharding
# --------------------------------------------------------------------------------------------


def _flat_specs(specs: Any) -> dict[str, P]:
    flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    out = {}
    for keypath, spec in flat:
        where = _tree.path_to_str(keypath)
        if not isinstance(spec, P):
            raise TypeError(f"{where}: expected a PartitionSpec leaf, got {type(spec).__name__}: {spec!r}")
        out[where] = spec
    return out


def _flat_shapes(params: Any) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {_tree.path_to_str(k): _shape(x) for k, x in flat}


def spec_problems(where: str, spec: P, mesh_shape: Mapping[str, int], shape: tuple[int, ...] | None) -> list[str]:
    """Why ``spec`` cannot lay out an array of ``shape`` on a mesh of ``mesh_shape`` (empty: it can)."""
    problems = []
    entries = tuple(spec)
    seen: dict[str, int] = {}
    for dim, entry in enumerate(entries):
        for axis in _mesh_axes(entry):
            if not isinstance(axis, str) or axis not in mesh_shape:
                problems.append(
                    f"{where}: spec {spec} names mesh axis {axis!r}, which the mesh "
                    f"{dict(mesh_shape)} lacks (a logical name without a rule?)"
                )
            elif axis in seen:
                problems.append(
                    f"{where}: spec {spec} uses mesh axis {axis!r} for dimensions {seen[axis]} and {dim}; "
                    "a mesh axis can shard one dimension"
                )
            else:
                seen[axis] = dim
    if shape is None:
        return problems
    if len(entries) > len(shape):
        problems.append(f"{where}: spec {spec} has {len(entries)} entries for an array of shape {shape}")
        return problems
    for dim, entry in enumerate(entries):
        axes = [a for a in _mesh_axes(entry) if a in mesh_shape]
        size = math.prod(mesh_shape[a] for a in axes)
        if axes and shape[dim] % size:
            sizes = " x ".join(f"{a!r}={mesh_shape[a]}" for a in axes)
            problems.append(
                f"{where}: dimension {dim} of size {shape[dim]} is not divisible by mesh axis {sizes} "
                f"(spec {spec}, shape {shape})"
            )
    return problems


def check_specs(specs: Any, mesh: Any, params: Any = None) -> None:
    """Raise ``ShardingError`` unless every spec fits ``mesh`` (and ``params``' shapes, if given).

    Checks: every mesh axis a spec names exists, none is used twice in one spec, and (with
    ``params``) the trees have the same paths, no spec is longer than its array's rank and every
    sharded dimension is divisible by the product of its mesh axes' sizes. All problems are
    listed at once, each with the parameter path, the axis and the sizes.
    """
    flat = _flat_specs(specs)
    mesh_shape = dict(mesh.shape)
    problems: list[str] = []
    if params is not None:
        shapes = _flat_shapes(params)
        missing = [p for p in shapes if p not in flat]
        extra = [p for p in flat if p not in shapes]
        problems += [f"{p}: a parameter without a spec" for p in missing]
        problems += [f"{p}: a spec without a parameter" for p in extra]
    else:
        shapes = {}
    for where, spec in flat.items():
        problems += spec_problems(where, spec, mesh_shape, shapes.get(where) if params is not None else None)
    if problems:
        raise ShardingError(
            f"{len(problems)} problems laying the parameters out on mesh {mesh_shape}:\n" + _capped(problems)
        )


def shardings(specs: Any, mesh: Any, params: Any = None) -> Any:
    """``NamedSharding(mesh, spec)`` for every spec, after ``check_specs(specs, mesh, params)``.

    Args:
      specs: a spec tree (``peft_specs``' output, a part of it, or any tree of ``PartitionSpec``).
      mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``).
      params: the arrays the specs are for: with it, shapes are checked too (before any transfer).

    Returns:
      The tree of ``specs`` with ``NamedSharding`` leaves (NNX Variables and ``QuantizedArray``
      nodes kept), ready for ``jax.device_put`` and ``jax.jit(in_shardings=..., out_shardings=...)``.
    """
    check_specs(specs, mesh, params)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def optimizer_specs(optimizer: Any, trainable: Any, trainable_specs: Any) -> Any:
    """Specs for ``optimizer.init(trainable)``: parameter-shaped state (Adam's ``mu``, ``nu``) takes
    the parameters' specs, everything else (step counts, hyperparameters) is replicated.

    Built with ``optax.tree_map_params`` on ``jax.eval_shape`` of the init: no array is created.

    Args:
      optimizer: an optax ``GradientTransformation``.
      trainable: the trainable tree (arrays or ``jax.ShapeDtypeStruct``; ``None`` holes allowed).
      trainable_specs: its specs, same structure (``jp.partition(specs, selector)[0]``).
    """
    import optax

    state = jax.eval_shape(optimizer.init, trainable)
    return optax.tree_map_params(
        optimizer,
        lambda _, spec: spec,
        state,
        trainable_specs,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
