"""Which adapters run in a call: all, none, some by name, or one per example (mixed batches).

Shared by the Linen and NNX bindings. A method's adapter name is its ``adapter`` attribute
(``"default"`` when it has none).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.methods.common import broadcast_along
from jaxpeft.methods.lora import LoRA, gathers_mixed, lora_delta_mixed
from jaxpeft.methods.site import Site
from jaxpeft.transform import Transform

Adapters = bool | str | Sequence[str]


def adapter_of(method: Transform) -> str:
    return method.adapter


def resolve(adapters: Adapters, known: Sequence[str]) -> frozenset[str]:
    """The active adapter names; an unknown name is an error listing the known ones."""
    if adapters is True:
        return frozenset(known)
    if adapters is False:
        return frozenset()
    names = (adapters,) if isinstance(adapters, str) else tuple(adapters)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"no adapter named {unknown}; this model has {sorted(set(known))}")
    return frozenset(names)


def mixed_call(
    methods: Sequence[Transform],
    params_of: Callable[[Transform], Mapping[str, jax.Array]],
    site: Site,
    x: jax.Array,
    base_fn: Callable[[jax.Array], jax.Array],
    names: Sequence[str],
    adapter_ids: jax.Array,
    *,
    base: Mapping[str, Any] | None = None,
    shared_of: Callable[[Transform], Mapping[str, jax.Array] | None] = lambda m: None,
) -> jax.Array:
    """The layer's output when example ``i`` uses adapter ``names[adapter_ids[i]]``.

    The base layer runs once on the whole batch. LoRA adapters with trailing input and output axes take a
    gathered low-rank update (``lora_delta_mixed``); every other site method runs per example under
    ``jax.vmap`` on that example's adapter leaves (gathered by ``adapter_ids`` when every adapter at this site
    has the same method and leaf shapes, otherwise each adapter's chain runs on the batch and the rows are
    selected). Where a method calls the base layer on another input than the layer's own (IA3 on a
    feed-forward input), that call is the site's einsum of the stored kernel plus its bias.

    Args:
      methods: this site's methods; ``params_of`` / ``shared_of`` read their leaves.
      x: the layer input ``[batch, ...]``; ``adapter_ids``: int ``[batch]`` indexing ``names``.
      base: the base layer's own leaves (``kernel``, ``bias``).
    """
    chosen = [m for m in methods if adapter_of(m) in names]
    y = base_fn(x)
    if not chosen:
        return y
    if adapter_ids.shape != (x.shape[0],):
        raise ValueError(f"adapter_ids must be [batch] = [{x.shape[0]}] at {site.path!r}; got shape {adapter_ids.shape}")
    if all(type(m) is LoRA for m in chosen) and gathers_mixed(site):
        by_name = {m.adapter: m for m in chosen}
        factors = [tuple(params_of(by_name[n])[k] for k in by_name[n].param_names) if n in by_name else None
                   for n in names]
        scales = [by_name[n].scale_at(site.path) if n in by_name else 0.0 for n in names]
        return y + lora_delta_mixed(factors, scales, adapter_ids, site, x).astype(y.dtype)
    return _mixed_any(chosen, params_of, shared_of, site, x, y, names, adapter_ids, base or {})


def _pure_base(site: Site, base: Mapping[str, Any], z: jax.Array) -> jax.Array:
    """The base layer from its stored leaves: the site's einsum (or conv) of the kernel, plus the bias."""
    from jaxpeft.bind.quantized import dequantized_kernel, is_quantized

    kernel = base[site.kernel_name]
    if is_quantized(kernel):
        kernel = dequantized_kernel(kernel, None)
    y = site.apply_kernel(z, kernel.astype(jnp.result_type(z.dtype, kernel.dtype)))
    bias = base.get("bias")
    if bias is not None:
        y = y + broadcast_along(bias, site.bias_labels(bias.ndim), site.output_layout, y.ndim).astype(y.dtype)
    return y


def _chain(methods, leaves, site, x, y, base):
    """``methods`` applied in order on one input; the base call on ``x`` itself is ``y`` (computed once).

    ``leaves``: per method, ``(its leaves in param_names order, its shared leaves or None)``.
    """
    pure = functools.partial(_pure_base, site, base)
    fn = lambda z: y if z is x else pure(z)  # noqa: E731
    for m, (values, shared) in zip(methods, leaves):
        params = dict(zip(m.param_names, values))
        fn = functools.partial(m.apply_site, params, site, base_fn=fn, rng=None, base=base, shared=shared)
    return fn(x)


def _mixed_any(chosen, params_of, shared_of, site, x, y, names, adapter_ids, base):
    groups = [[m for m in chosen if adapter_of(m) == n] for n in names]  # per adapter, in chain order
    leaves = [[(tuple(params_of(m)[p] for p in m.param_names), shared_of(m)) for m in g] for g in groups]
    present = [k for k, g in enumerate(groups) if g]
    first = present[0]

    def signature(k):  # the same methods and configs but for the adapter name, the same leaf shapes
        return ([dataclasses.replace(m, adapter="default") for m in groups[k]],
                [jax.tree.map(lambda v: (v.shape, v.dtype), values) for values, _ in leaves[k]])

    gatherable = (len(present) == len(names) and not any(m.shared_names for m in chosen)
                  and all(signature(k) == signature(first) for k in present))
    # Each example keeps a batch axis of 1, so a site equation with an explicit batch label still applies.
    xs, ys = x[:, None], y[:, None]
    if gatherable:
        # One chain per example on that example's adapter's leaves, gathered by adapter_ids.
        values = [tuple(v for v, _ in leaves[k]) for k in range(len(names))]
        stacked = jax.tree.map(lambda *v: jnp.stack(v)[adapter_ids], *values)
        template = groups[first]
        out = jax.vmap(lambda vs, xi, yi: _chain(template, [(v, None) for v in vs], site, xi, yi, base))(
            stacked, xs, ys)
        return out[:, 0].astype(y.dtype)
    # Adapters of different methods or shapes: each adapter's chain on every example, then select the rows.
    out = y
    for k in present:
        yk = jax.vmap(lambda xi, yi, k=k: _chain(groups[k], leaves[k], site, xi, yi, base))(xs, ys)[:, 0]
        rows = (adapter_ids == k).reshape((-1,) + (1,) * (y.ndim - 1))
        out = jnp.where(rows, yk.astype(y.dtype), out)
    return out


def check_mixed(names: Any, adapter_ids: Any, known: Sequence[str]) -> tuple[str, ...]:
    """Validate a mixed-batch request before tracing the model."""
    if isinstance(names, (str, bool)) or not names:
        raise ValueError("a mixed-adapter batch needs `adapters` as a list of names: adapter_ids index into it")
    resolve(names, known)
    if getattr(adapter_ids, "ndim", None) != 1:
        raise ValueError(f"adapter_ids must be a 1-D int array [batch]; got {getattr(adapter_ids, 'shape', adapter_ids)}")
    if not jax.numpy.issubdtype(adapter_ids.dtype, jax.numpy.integer):
        raise TypeError(f"adapter_ids must be integers indexing `adapters`, got dtype {adapter_ids.dtype}")
    if not isinstance(adapter_ids, jax.core.Tracer):
        # A gather would clamp an out-of-range id to the last adapter; refuse it while it can be seen.
        # (Under jit the ids are traced and cannot be checked here.)
        ids = np.asarray(adapter_ids)
        bad = sorted({int(i) for i in ids if not 0 <= i < len(names)})
        if bad:
            raise ValueError(
                f"adapter_ids {bad} are out of range: they index adapters {list(names)}, so must be in "
                f"[0, {len(names)})"
            )
    return tuple(names)
