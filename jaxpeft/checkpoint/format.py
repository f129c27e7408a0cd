"""The on-disk format of an adapter checkpoint: layout, metadata schema, leaf keys, config JSON.

::

    directory/
      jaxpeft_adapter.json     format version, versions, config, base fingerprint, one entry per leaf,
                               a size and sha256 per file of arrays/, and a sha256 of itself
      arrays/                  an orbax PyTree checkpoint: {"leaf_00000": array, "leaf_00001": ...}

The arrays are stored under index names (``leaf_00000``, ...) rather than under the user's keys:
orbax names a stored array by joining its keys with ``.``, so ``{"a.b": x}`` and ``{"a": {"b": y}}``
would land on the same name. ``jaxpeft_adapter.json`` maps each name back to the leaf's keys
(strings and integers kept apart, so an NNX list index ``0`` comes back as ``0``, not ``"0"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import tree as _tree

FORMAT = "jaxpeft.adapter"
FORMAT_VERSION = 1
METADATA_FILE = "jaxpeft_adapter.json"
ARRAYS_DIR = "arrays"
MAX_LISTED = 20  # differences listed in an error message before "... and N more"

Key = str | int  # one path component of an adapter leaf
Keys = tuple[Key, ...]


class CheckpointError(ValueError):
    """A directory is not a readable jaxpeft adapter checkpoint (missing, unknown format, ...)."""


class CheckpointCorruptError(CheckpointError):
    """Stored data does not match the checkpoint's own metadata (checksum, size, shape or dtype)."""


class CheckpointMismatchError(CheckpointError):
    """The base model or the config given to ``restore_adapter`` is not the one saved."""


def metadata_path(directory: pathlib.Path) -> pathlib.Path:
    return directory / METADATA_FILE


def array_name(index: int) -> str:
    return f"leaf_{index:05d}"


def path_of(keys: Keys) -> str:
    return "/".join(str(k) for k in keys)


def capped(lines: Sequence[str]) -> str:
    """``lines`` indented, at most ``MAX_LISTED`` of them, then a count of the rest."""
    shown = [f"  {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        shown.append(f"  ... and {len(lines) - MAX_LISTED} more")
    return "\n".join(shown)


def describe(entry: Mapping[str, Any]) -> str:
    return f"{tuple(entry['shape'])} {entry['dtype']}"


# --------------------------------------------------------------------------------------------
# Leaves: typed keys, None holes dropped
# --------------------------------------------------------------------------------------------


def _plain_key(key: Any, where: str) -> Key:
    """A jax key-path entry as a str or int; anything else cannot round-trip through JSON."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            key = getattr(key, attr)
            break
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"adapter key {key!r} at {where!r} is a bool; adapter keys must be str or int")
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, str):
        return key
    raise TypeError(
        f"adapter key {key!r} ({type(key).__name__}) at {where!r}: adapter keys must be str or int "
        "(dict keys, sequence indices or attribute names)"
    )


def leaf_items(adapter: Any) -> tuple[list[tuple[Keys, Any]], int]:
    """``([(keys, array), ...], number_of_None_holes)`` in flatten order; NNX Variables unwrapped.

    Raises TypeError naming the path for a key that is not str / int, a tracer, or a leaf that
    is not an array.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(
        _tree._pure(adapter), is_leaf=lambda x: x is None or _tree._is_nnx_variable(x)
    )
    items, holes = [], 0
    for keypath, leaf in flat:
        where = _tree.path_to_str(keypath)
        leaf = _tree.variable_value(leaf)
        if leaf is None:
            holes += 1
            continue
        keys = tuple(_plain_key(k, where) for k in keypath)
        if isinstance(leaf, jax.core.Tracer):
            raise TypeError(
                f"adapter leaf {where!r} is a tracer: save_adapter needs concrete arrays; "
                "call it outside jax.jit / jax.grad"
            )
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise TypeError(
                f"adapter leaf {where!r} is a {type(leaf).__name__}; expected a jax or numpy array "
                "(or None for a frozen hole)"
            )
        items.append((keys, leaf))
    return items, holes


def nest(items: Sequence[tuple[Keys, Any]]) -> dict:
    """Nested dicts from ``[(keys, leaf), ...]``."""
    out: dict = {}
    for keys, leaf in items:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


# --------------------------------------------------------------------------------------------
# Config as JSON data
# --------------------------------------------------------------------------------------------


def _jsonable(obj: Any, where: str) -> Any:
    """``obj`` as JSON data (tuples become lists), or TypeError naming the offending key."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                at = where or "<top>"
                raise TypeError(f"config key {k!r} at {at!r} is not a str; JSON keys are strings")
            out[k] = _jsonable(v, f"{where}.{k}" if where else k)
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        if not math.isfinite(obj):
            raise ValueError(f"config value at {where!r} is {obj}; JSON has no inf / nan")
        return float(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(
        f"config value at {where!r} is a {type(obj).__name__} ({obj!r}); a config holds only "
        "str, int, float, bool, None, lists and str-keyed mappings"
    )


def normalize_config(config: Any) -> dict | None:
    """``config`` as JSON data: a mapping, a dataclass instance, or a transform (its ``to_config``).

    A transform's selectors that cannot be rebuilt (predicates, lambdas) are refused here, with
    the reason and the field, by ``jaxpeft.registry``.
    """
    if config is None:
        return None
    from jaxpeft import registry

    if registry.is_transform(config):
        config = registry.to_config(config)
    is_dataclass = dataclasses.is_dataclass(config) and not isinstance(config, type)
    if not (isinstance(config, Mapping) or is_dataclass):
        raise TypeError(f"config must be a mapping (or a dataclass instance), got {type(config).__name__}")
    registry.check_serialisable(config)
    return _jsonable(config, "")


# --------------------------------------------------------------------------------------------
# Metadata: versions, its own digest, schema validation
# --------------------------------------------------------------------------------------------


def jaxpeft_version() -> str:
    try:
        from jaxpeft import __version__

        return __version__
    except ImportError:  # pragma: no cover - only during a partial import of the package
        return "unknown"


def orbax_version() -> str:
    import orbax.checkpoint as ocp

    return getattr(ocp, "__version__", "unknown")


def metadata_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of the metadata's canonical JSON, without its own ``metadata_sha256`` field."""
    body = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def validate_metadata(meta: Any, file: pathlib.Path) -> dict:
    """``meta`` if it is a metadata dict this version reads; ``CheckpointError`` naming the field otherwise."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{file}: {what}")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"not a jaxpeft adapter metadata file (expected \"format\": \"{FORMAT}\")")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad(f"format_version is {version!r}, expected an integer")
    if version != FORMAT_VERSION:
        newer = " (written by a newer jaxpeft: upgrade to read it)" if version > FORMAT_VERSION else ""
        raise bad(
            f"format_version {version} (jaxpeft {meta.get('jaxpeft_version', '?')}) is not one this "
            f"jaxpeft {jaxpeft_version()} reads: expected {FORMAT_VERSION}{newer}"
        )
    # Checked before the schema: a damaged file is reported as damaged, not as a schema error.
    if "metadata_sha256" in meta and meta["metadata_sha256"] != metadata_digest(meta):
        raise CheckpointCorruptError(
            f"{file}: its content does not match its metadata_sha256 (the file was changed or damaged "
            "after it was written)"
        )
    optional_dict = (dict, type(None))
    fields = (("leaves", list), ("config", optional_dict), ("base_fingerprint", optional_dict))
    for field, types in (*fields, ("files", optional_dict)):
        if field == "files" and field not in meta:  # written before file digests existed
            continue
        if not isinstance(meta.get(field), types):
            raise bad(f"field {field!r} is {type(meta.get(field)).__name__}, expected {types}")
    if not meta["leaves"]:
        raise bad("lists no leaves")
    for name, entry in (meta.get("files") or {}).items():
        size, digest = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if not isinstance(size, int) or not isinstance(digest, str) or ".." in pathlib.PurePosixPath(name).parts:
            raise bad(f"files entry {name!r} is {entry!r}, expected {{'size': int, 'sha256': str}}")
    for i, leaf in enumerate(meta["leaves"]):
        need = {
            "path": str,
            "keys": list,
            "shape": list,
            "dtype": str,
            "sha256": (str, type(None)),  # None: the array was spread over several hosts
            "checksum": (str, type(None)),  # absent in checkpoints of jaxpeft 0.1.0 before sharding
            "array": (str, type(None)),
        }
        for field, types in need.items():
            if not isinstance(leaf, dict) or not isinstance(leaf.get(field), types):
                if field == "checksum" and isinstance(leaf, dict) and field not in leaf:
                    continue
                raise bad(f"leaf entry {i} has no valid {field!r}: {leaf!r}")
        if leaf["sha256"] is None and leaf.get("checksum") is None:
            raise bad(f"leaf entry {i} ({leaf['path']!r}) has neither a sha256 nor a checksum")
        plain = all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in leaf["keys"])
        if not plain or not leaf["keys"]:
            raise bad(f"leaf entry {i} ({leaf['path']!r}) has invalid keys {leaf['keys']!r}")
        try:
            jnp.dtype(leaf["dtype"])
        except TypeError as e:
            raise bad(f"leaf {leaf['path']!r} has unknown dtype {leaf['dtype']!r}") from e
    return meta


def read_metadata(directory: pathlib.Path) -> dict:
    """The validated metadata of the checkpoint at ``directory`` (which must exist)."""
    file = metadata_path(directory)
    if not file.is_file():
        raise CheckpointError(f"{directory} is not a jaxpeft adapter checkpoint: it has no {METADATA_FILE}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{file}: not valid JSON ({e})") from e
    return validate_metadata(meta, file)
