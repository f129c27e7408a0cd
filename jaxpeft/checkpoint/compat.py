"""Whether a checkpoint fits what it is restored into: the base model, the config, the shardings.

The base fingerprint is binding-independent: the paths, shapes and dtypes of the base model's
parameters, the same for a Linen ``params`` tree and its NNX twin (``nnx.state(model,
nnx.Param)``, with a bound layer's ``base_layer/`` level dropped), so an adapter saved from one
binding restores into the other through the same check.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft import tree as _tree
from jaxpeft.checkpoint.format import CheckpointMismatchError, capped, describe, normalize_config


def _is_nnx_module(x: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a core dependency
        return False
    return isinstance(x, nnx.Module)


def base_fingerprint(base: Any) -> dict[str, dict[str, Any]]:
    """``{path: {"shape", "dtype"}}`` of the base's parameters, whatever the binding.

    ``base``: Linen params (full, frozen part with holes, or pristine), an NNX model (bound by
    ``jp.apply`` or not) or an NNX ``State``. An NNX model counts by its ``nnx.Param`` state (the
    Linen ``params`` collection's twin); a layer wrapped by ``jp.apply`` keeps the wrapped
    layer's Variables under ``base_layer/``, a level that is dropped, so the bound model has the
    paths of the plain one.
    """
    if not _is_nnx_module(base):
        return _tree.fingerprint(base)
    from flax import nnx

    from jaxpeft.bind import PeftLayer

    wrapped = {tuple(str(k) for k in path) for path, node in nnx.iter_graph(base) if isinstance(node, PeftLayer)}
    out = {}
    for path, leaf in _tree.leaves_with_paths(nnx.state(base, nnx.Param)):
        parts = path.split("/")
        for i in range(len(parts) - 1, 0, -1):
            if parts[i] == "base_layer" and tuple(parts[:i]) in wrapped:
                del parts[i]
        shape, dtype = _tree._shape_dtype(leaf)
        out["/".join(parts)] = {"shape": list(shape), "dtype": dtype}
    return out


def diff_config(saved: Any, given: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(given, dict):
        out = []
        for k in list(saved) + [k for k in given if k not in saved]:
            at = f"{where}.{k}" if where else k
            if k not in given:
                out.append(f"{at}: saved {saved[k]!r}, not given")
            elif k not in saved:
                out.append(f"{at}: not saved, given {given[k]!r}")
            else:
                out += diff_config(saved[k], given[k], at)
        return out
    if saved != given:
        return [f"{where or '<config>'}: saved {saved!r}, given {given!r}"]
    return []


def check_base(meta: Mapping[str, Any], base: Any, directory: pathlib.Path) -> None:
    saved = meta["base_fingerprint"]
    if saved is None:
        raise CheckpointMismatchError(
            f"cannot check base: the adapter at {directory} was saved without base=...; "
            "restore without base, or save again with base=the base params"
        )
    adapter_paths = {leaf["path"] for leaf in meta["leaves"]}
    given_all = base_fingerprint(base)
    given = {p: e for p, e in given_all.items() if p not in adapter_paths}
    differ = [
        f"{p}: saved {describe(saved[p])}, given {describe(given[p])}"
        for p in saved
        if p in given and (saved[p]["shape"] != given[p]["shape"] or saved[p]["dtype"] != given[p]["dtype"])
    ]
    # The base may already hold the adapter's own leaves (the full params after apply): they must fit.
    for leaf in meta["leaves"]:
        p = leaf["path"]
        found = given_all.get(p)
        if found is not None and (found["shape"] != leaf["shape"] or found["dtype"] != leaf["dtype"]):
            differ.append(f"{p} (adapter leaf): saved {describe(leaf)}, given {describe(given_all[p])}")
    missing = [
        f"{p}: saved {describe(e)}, missing from the given base" for p, e in saved.items() if p not in given
    ]
    extra = [f"{p}: given {describe(given[p])}, not in the saved base" for p in given if p not in saved]
    problems = differ + missing + extra
    if problems:
        raise CheckpointMismatchError(
            f"the base does not match the one the adapter at {directory} was saved with: "
            f"{len(differ)} leaves differ, {len(missing)} missing, {len(extra)} extra "
            f"(saved base has {len(saved)} leaves, given base {len(given)}, adapter leaves excluded):\n"
            + capped(problems)
        )


def check_config(meta: Mapping[str, Any], config: Any, directory: pathlib.Path) -> None:
    given = normalize_config(config)
    saved = meta["config"]
    if saved is None:
        raise CheckpointMismatchError(
            f"cannot check config: the adapter at {directory} was saved without config=...; "
            f"given keys {sorted(given)}"
        )
    lines = diff_config(saved, given)
    if lines:
        raise CheckpointMismatchError(
            f"the config differs from the one saved with the adapter at {directory} "
            f"({len(lines)} keys):\n" + capped(lines)
        )


def leaf_shardings(shardings: Any, meta: Mapping[str, Any], directory: pathlib.Path) -> dict[str, Any]:
    """``{leaf path: Sharding}`` from ``restore_adapter``'s ``shardings``, checked against the saved leaves."""
    from jax.sharding import NamedSharding, Sharding

    from jaxpeft.sharding import spec_problems

    if shardings is None:
        return {}
    saved = {leaf["path"]: leaf for leaf in meta["leaves"]}
    if isinstance(shardings, Sharding):
        given = {p: shardings for p in saved}
    else:
        given = {}
        for p, s in _tree.leaves_with_paths(shardings, is_leaf=lambda x: isinstance(x, Sharding)):
            s = _tree.variable_value(s)
            if s is not None:
                given[p] = s
    problems = [f"{p}: saved {describe(saved[p])}, no sharding given" for p in saved if p not in given]
    problems += [f"{p}: a sharding for a leaf the adapter does not have" for p in given if p not in saved]
    for p, s in given.items():
        if p not in saved:
            continue
        shape = tuple(saved[p]["shape"])
        dtype = jnp.dtype(saved[p]["dtype"])
        if jax.dtypes.canonicalize_dtype(dtype) != dtype:
            problems.append(
                f"{p}: a {dtype} leaf cannot go to devices while jax_enable_x64 is off (it would be "
                "truncated); restore it without a sharding (it stays a numpy array) or enable x64"
            )
        if not isinstance(s, Sharding):
            problems.append(f"{p}: expected a jax.sharding.Sharding, got {type(s).__name__}")
        elif isinstance(s, NamedSharding):
            problems += spec_problems(p, s.spec, dict(s.mesh.shape), shape)
        else:
            try:
                s.shard_shape(shape)
            except Exception as e:  # noqa: BLE001 - jax raises several types for this
                problems.append(f"{p}: {s} cannot hold the saved shape {shape}: {e}")
    if problems:
        raise CheckpointMismatchError(
            f"the shardings do not fit the adapter at {directory} ({len(saved)} leaves):\n" + capped(problems)
        )
    return given
