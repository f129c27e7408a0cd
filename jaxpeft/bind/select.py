"""Which adapters run in a call: all, none, some by name, or one per example (mixed batches).

Shared by the Linen and NNX bindings. A method's adapter name is its ``adapter`` attribute
(``"default"`` when it has none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxpeft.methods.lora import LoRA, lora_delta_mixed
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
) -> jax.Array:
    """The layer's output when example ``i`` uses adapter ``names[adapter_ids[i]]``."""
    chosen = [m for m in methods if adapter_of(m) in names]
    not_lora = [type(m).__name__ for m in chosen if not isinstance(m, LoRA)]
    if not_lora:
        raise TypeError(f"mixed-adapter batches support LoRA adapters only; {site.path!r} has {not_lora}")
    y = base_fn(x)
    by_name = {m.adapter: m for m in chosen}
    if not by_name:
        return y
    factors = [tuple(params_of(by_name[n])[k] for k in by_name[n].param_names) if n in by_name else None for n in names]
    scales = [by_name[n].scale_at(site.path) if n in by_name else 0.0 for n in names]
    return y + lora_delta_mixed(factors, scales, adapter_ids, site, x).astype(y.dtype)


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
