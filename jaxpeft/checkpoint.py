"""Adapter-only checkpoints: save and restore the trainable leaves with orbax, plus JSON metadata.

A PEFT run trains a small part of the parameters; only that part is saved. ``save_adapter``
takes the trainable tree (``jaxpeft.tree.partition`` style, with ``None`` holes where a leaf is
frozen), an NNX ``State``, or a plain nested dict, drops the holes and writes::

    directory/
      jaxpeft_adapter.json     format version, versions, config, base fingerprint, one entry per leaf
      arrays/                  an orbax PyTree checkpoint: {"leaf_00000": array, "leaf_00001": ...}

The arrays are stored under index names (``leaf_00000``, ...) rather than under the user's keys:
orbax names a stored array by joining its keys with ``.``, so ``{"a.b": x}`` and ``{"a": {"b": y}}``
would land on the same name. ``jaxpeft_adapter.json`` maps each name back to the leaf's keys
(strings and integers kept apart, so an NNX list index ``0`` comes back as ``0``, not ``"0"``).

A save is atomic: everything is written to a hidden sibling directory, read back and checked,
then renamed into place. An existing checkpoint is replaced only with ``overwrite=True`` and
only after the new one is complete; it is renamed aside, the new one renamed in, and the old one
deleted. ``restore_adapter`` checks every leaf's checksums (sha256 where the whole array is on
this host, a layout-independent ``sum64`` computed where the shards live), and optionally that
the base model and the method config are the ones the adapter was trained with.

Sharded arrays are saved as they are: orbax writes each shard from the device holding it, so no
array is gathered onto one device or one host; ``restore_adapter(..., shardings=...)`` reads each
device's shard from the files, on any mesh. On several hosts every process calls ``save_adapter``
(process 0 writes the metadata and renames; each writes its own shards). See ``docs/scale.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import tree as _tree

__all__ = [
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "FORMAT_VERSION",
    "save_adapter",
    "restore_adapter",
    "load_metadata",
    "insert",
    "prune",
]

FORMAT = "jaxpeft.adapter"
FORMAT_VERSION = 1
METADATA_FILE = "jaxpeft_adapter.json"
ARRAYS_DIR = "arrays"
_TMP_TAG = ".jaxpeft-tmp-"
_OLD_TAG = ".jaxpeft-old-"
_MAX_LISTED = 20  # differences listed in an error message before "... and N more"

Key = str | int  # one path component of an adapter leaf
Keys = tuple[Key, ...]


class CheckpointError(ValueError):
    """A directory is not a readable jaxpeft adapter checkpoint (missing, unknown format, ...)."""


class CheckpointCorruptError(CheckpointError):
    """Stored data does not match the checkpoint's own metadata (checksum, shape or dtype)."""


class CheckpointMismatchError(CheckpointError):
    """The base model or the config given to ``restore_adapter`` is not the one saved."""


# --------------------------------------------------------------------------------------------
# Trees: pruning None holes, typed keys, nested dicts
# --------------------------------------------------------------------------------------------


def _is_nnx_variable(x: Any) -> bool:
    return _tree._is_nnx_variable(x)


def _is_nnx_state(x: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a core dependency
        return False
    return isinstance(x, nnx.State)


def _is_nnx_module(x: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, nnx.Module)


def _to_pure_dict(state: Any) -> dict:
    from flax import nnx

    return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def _variable_value(x: Any) -> Any:
    return x.get_value() if hasattr(x, "get_value") else x.value


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


def _path(keys: Keys) -> str:
    return "/".join(str(k) for k in keys)


def _leaf_items(adapter: Any) -> tuple[list[tuple[Keys, Any]], int]:
    """``([(keys, array), ...], number_of_None_holes)`` in flatten order; NNX Variables unwrapped."""
    if _is_nnx_state(adapter):
        adapter = _to_pure_dict(adapter)
    flat, _ = jax.tree_util.tree_flatten_with_path(
        adapter, is_leaf=lambda x: x is None or _is_nnx_variable(x)
    )
    items, holes = [], 0
    for keypath, leaf in flat:
        where = _tree.path_to_str(keypath)
        if _is_nnx_variable(leaf):
            leaf = _variable_value(leaf)
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


def _nest(items: Sequence[tuple[Keys, Any]]) -> dict:
    """Nested dicts from ``[(keys, leaf), ...]``."""
    out: dict = {}
    for keys, leaf in items:
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


def prune(adapter: Any) -> dict:
    """The array leaves of ``adapter`` as nested dicts keyed by their path components.

    ``None`` holes (from ``jaxpeft.tree.partition``) and containers left empty are dropped;
    lists and tuples become dicts keyed by index; an NNX ``State`` becomes its pure dict.
    This is the structure ``restore_adapter`` returns.
    """
    items, _ = _leaf_items(adapter)
    return _nest(items)


# --------------------------------------------------------------------------------------------
# Config and fingerprints
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


def _normalize_config(config: Any) -> dict | None:
    if config is None:
        return None
    is_dataclass = dataclasses.is_dataclass(config) and not isinstance(config, type)
    if not (isinstance(config, Mapping) or is_dataclass):
        raise TypeError(f"config must be a mapping (or a dataclass instance), got {type(config).__name__}")
    return _jsonable(config, "")


def _base_tree(base: Any) -> Any:
    if _is_nnx_module(base):
        from flax import nnx

        return nnx.state(base)
    return base


def _fingerprint(tree: Any) -> dict[str, dict[str, Any]]:
    return _tree.fingerprint(_base_tree(tree))


def _diff_config(saved: Any, given: Any, where: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(given, dict):
        out = []
        for k in list(saved) + [k for k in given if k not in saved]:
            at = f"{where}.{k}" if where else k
            if k not in given:
                out.append(f"{at}: saved {saved[k]!r}, not given")
            elif k not in saved:
                out.append(f"{at}: not saved, given {given[k]!r}")
            else:
                out += _diff_config(saved[k], given[k], at)
        return out
    if saved != given:
        return [f"{where or '<config>'}: saved {saved!r}, given {given!r}"]
    return []


def _capped(lines: Sequence[str]) -> str:
    shown = [f"  {line}" for line in lines[:_MAX_LISTED]]
    if len(lines) > _MAX_LISTED:
        shown.append(f"  ... and {len(lines) - _MAX_LISTED} more")
    return "\n".join(shown)


def _describe(entry: Mapping[str, Any]) -> str:
    return f"{tuple(entry['shape'])} {entry['dtype']}"


def _check_base(meta: Mapping[str, Any], base: Any, directory: pathlib.Path) -> None:
    saved = meta["base_fingerprint"]
    if saved is None:
        raise CheckpointMismatchError(
            f"cannot check base: the adapter at {directory} was saved without base=...; "
            "restore without base, or save again with base=the base params"
        )
    adapter_paths = {leaf["path"] for leaf in meta["leaves"]}
    given_all = _fingerprint(base)
    given = {p: e for p, e in given_all.items() if p not in adapter_paths}
    differ = [
        f"{p}: saved {_describe(saved[p])}, given {_describe(given[p])}"
        for p in saved
        if p in given and (saved[p]["shape"] != given[p]["shape"] or saved[p]["dtype"] != given[p]["dtype"])
    ]
    # The base may already hold the adapter's own leaves (the full params after apply): they must fit.
    for leaf in meta["leaves"]:
        p = leaf["path"]
        found = given_all.get(p)
        if found is not None and (found["shape"] != leaf["shape"] or found["dtype"] != leaf["dtype"]):
            differ.append(f"{p} (adapter leaf): saved {_describe(leaf)}, given {_describe(given_all[p])}")
    missing = [
        f"{p}: saved {_describe(e)}, missing from the given base" for p, e in saved.items() if p not in given
    ]
    extra = [f"{p}: given {_describe(given[p])}, not in the saved base" for p in given if p not in saved]
    problems = differ + missing + extra
    if problems:
        raise CheckpointMismatchError(
            f"the base does not match the one the adapter at {directory} was saved with: "
            f"{len(differ)} leaves differ, {len(missing)} missing, {len(extra)} extra "
            f"(saved base has {len(saved)} leaves, given base {len(given)}, adapter leaves excluded):\n"
            + _capped(problems)
        )


def _check_config(meta: Mapping[str, Any], config: Any, directory: pathlib.Path) -> None:
    given = _normalize_config(config)
    saved = meta["config"]
    if saved is None:
        raise CheckpointMismatchError(
            f"cannot check config: the adapter at {directory} was saved without config=...; "
            f"given keys {sorted(given)}"
        )
    lines = _diff_config(saved, given)
    if lines:
        raise CheckpointMismatchError(
            f"the config differs from the one saved with the adapter at {directory} "
            f"({len(lines)} keys):\n" + _capped(lines)
        )


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def _jaxpeft_version() -> str:
    try:
        from jaxpeft import __version__

        return __version__
    except ImportError:  # pragma: no cover - only during a partial import of the package
        return "unknown"


def _orbax_version() -> str:
    import orbax.checkpoint as ocp

    return getattr(ocp, "__version__", "unknown")


def _host_array(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.byteorder == ">":  # hash little-endian bytes, whatever the machine
        a = a.astype(a.dtype.newbyteorder("<"))
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# A layout-independent checksum, computable on sharded arrays without gathering them
# --------------------------------------------------------------------------------------------
#
# sha256 needs the bytes in order on one host. For an array spread over several hosts (or to
# check a restore onto another mesh without gathering), each leaf also gets "sum64": two
# position-weighted sums of its little-endian 32-bit words, modulo 2**32,
#
#   s1 = sum_i (fmix(i) | 1) * w_i        s2 = sum_i (fmix(i + GOLDEN) | 1) * fmix(w_i + i)
#
# with i the word's flat C-order index and fmix MurmurHash3's 32-bit finalizer. Integer
# addition modulo 2**32 is associative and commutative, so XLA may reduce the shards in any
# order on any mesh and get the same value; the weights are odd, so any change to one word
# changes s1. It detects damaged files; it is not a cryptographic hash (sha256 remains that,
# wherever an array is fully addressable).

_CHECKSUM_KIND = "sum64"
_FMIX_1, _FMIX_2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9


def _fmix32(h: Any) -> Any:
    """MurmurHash3 fmix32 on uint32 arrays (numpy or jax; both wrap modulo 2**32)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(_FMIX_1)
    h = h ^ (h >> 13)
    h = h * np.uint32(_FMIX_2)
    return h ^ (h >> 16)


def _sums_to_str(s1: int, s2: int) -> str:
    return f"{_CHECKSUM_KIND}:{int(s1):08x}{int(s2):08x}"


def _host_checksum(a: np.ndarray) -> str:
    """``sum64`` of a host array (C-order little-endian bytes, as ``_host_array`` gives)."""
    a = _host_array(a).reshape(-1)
    if a.dtype == np.bool_:
        words = a.view(np.uint8).astype(np.uint32)
    elif a.dtype.itemsize == 1:
        words = a.view(np.uint8).astype(np.uint32)
    elif a.dtype.itemsize == 2:
        words = a.view("<u2").astype(np.uint32)
    else:
        words = a.view("<u4")
    index = (np.arange(words.size, dtype=np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    with np.errstate(over="ignore"):
        w1 = _fmix32(index) | np.uint32(1)
        w2 = _fmix32(index + np.uint32(_GOLDEN)) | np.uint32(1)
        s1 = np.sum(w1 * words, dtype=np.uint32)
        s2 = np.sum(w2 * _fmix32(words + index), dtype=np.uint32)
    return _sums_to_str(s1, s2)


def _device_words(x: jax.Array) -> jax.Array:
    """The little-endian 32-bit words of ``x``: shape ``x.shape`` or ``(*x.shape, words_per_item)``."""
    dtype = np.dtype(x.dtype)
    bitcast = jax.lax.bitcast_convert_type
    if dtype == np.bool_:
        return x.astype(jnp.uint32)
    if dtype.kind == "c":  # complex: the real part's words, then the imaginary part's, as in memory
        parts = [_device_words(part).reshape(*x.shape, -1) for part in (jnp.real(x), jnp.imag(x))]
        return jnp.concatenate(parts, axis=-1)
    if dtype.itemsize == 1:
        return bitcast(x, jnp.uint8).astype(jnp.uint32)
    if dtype.itemsize == 2:
        return bitcast(x, jnp.uint16).astype(jnp.uint32)
    return bitcast(x, jnp.uint32)  # 8-byte items gain a trailing axis of 2 words, low word first


def _device_sums(x: jax.Array) -> jax.Array:
    """``[s1, s2]`` uint32 of one array, computed where its shards live (no reshape, no gather)."""
    words = _device_words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):  # the flat C-order index, modulo 2**32
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    w1 = _fmix32(index) | jnp.uint32(1)
    w2 = _fmix32(index + jnp.uint32(_GOLDEN)) | jnp.uint32(1)
    s1 = jnp.sum(w1 * words, dtype=jnp.uint32)
    s2 = jnp.sum(w2 * _fmix32(words + index), dtype=jnp.uint32)
    return jnp.stack([s1, s2])


@jax.jit
def _device_sums_all(arrays: list[jax.Array]) -> list[jax.Array]:
    return [_device_sums(x) for x in arrays]


def _fetch(x: jax.Array) -> np.ndarray:
    # The sums are replicated; on several hosts, each holds a full copy of them.
    return np.asarray(x.addressable_data(0)) if not x.is_fully_addressable else np.asarray(x)


def _checksums(values: Sequence[Any]) -> list[str]:
    """``sum64`` of each array: host arrays on the host, jax arrays on their own devices.

    One jitted call per set of devices (a call cannot mix devices), however many leaves.
    """
    out: list[str | None] = [None] * len(values)
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, jax.Array) and v.size:
            groups.setdefault(frozenset(v.sharding.device_set), []).append(i)
        else:
            out[i] = _host_checksum(np.asarray(v))
    for indices in groups.values():
        sums = _device_sums_all([values[i] for i in indices])
        for i, s in zip(indices, sums):
            s1, s2 = _fetch(s)
            out[i] = _sums_to_str(s1, s2)
    return out  # type: ignore[return-value]


def _array_key(index: int) -> str:
    return f"leaf_{index:05d}"


def _metadata_path(directory: pathlib.Path) -> pathlib.Path:
    return directory / METADATA_FILE


def _validate_metadata(meta: Any, file: pathlib.Path) -> dict:
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
            f"jaxpeft {_jaxpeft_version()} reads: expected {FORMAT_VERSION}{newer}"
        )
    optional_dict = (dict, type(None))
    for field, types in (("leaves", list), ("config", optional_dict), ("base_fingerprint", optional_dict)):
        if not isinstance(meta.get(field), types):
            raise bad(f"field {field!r} is {type(meta.get(field)).__name__}, expected {types}")
    if not meta["leaves"]:
        raise bad("lists no leaves")
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


def load_metadata(directory: str | os.PathLike) -> dict:
    """The parsed ``jaxpeft_adapter.json`` of an adapter checkpoint.

    Returns:
      A dict with ``format``, ``format_version``, ``jaxpeft_version``, ``orbax_version``,
      ``config`` (or None), ``base_fingerprint`` (``{path: {"shape", "dtype"}}`` or None),
      ``num_bytes`` and ``leaves``: one ``{"path", "keys", "shape", "dtype", "sha256", "array"}``
      per adapter leaf.

    Raises:
      CheckpointError: ``directory`` is missing, is not an adapter checkpoint, or has a
        metadata format this version does not read.
    """
    directory = pathlib.Path(directory).absolute()
    file = _metadata_path(directory)
    if not directory.is_dir():
        hint = ""
        if directory.parent.is_dir():
            old = sorted(directory.parent.glob(f".{directory.name}{_OLD_TAG}*"))
            if old:
                hint = (
                    f"; an interrupted overwrite left the previous checkpoint at {old[-1]}: "
                    f"rename it to {directory.name} to recover it"
                )
        raise CheckpointError(f"no adapter checkpoint at {directory}: not a directory{hint}")
    if not file.is_file():
        raise CheckpointError(f"{directory} is not a jaxpeft adapter checkpoint: it has no {METADATA_FILE}")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{file}: not valid JSON ({e})") from e
    return _validate_metadata(meta, file)


# --------------------------------------------------------------------------------------------
# Array I/O through orbax
# --------------------------------------------------------------------------------------------


def _write_arrays(path: pathlib.Path, arrays: dict[str, Any]) -> None:
    """One orbax PyTree checkpoint at ``path``, synchronously (``Checkpointer``, not async).

    Values are numpy arrays (written by the primary host) or jax arrays, which orbax writes
    shard by shard from the devices holding them (each shard once, by the host that holds its
    first replica): a sharded array is never gathered onto one device or one host.
    """
    import orbax.checkpoint as ocp

    with _checkpointer() as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(arrays))


def _checkpointer() -> Any:
    """orbax's PyTree checkpointer, with replica-parallel writes off.

    Replica-parallel writing splits a replicated array into one slice per replica, a device
    slice op (and a compile) per array: it pays off for GB-sized arrays, not for MB adapters
    (on 8 CPU devices it cost 1.6 s for a 40-leaf LoRA adapter).
    """
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        (int, handlers.ScalarHandler()),
        (float, handlers.ScalarHandler()),
        (np.number, handlers.ScalarHandler()),
        (np.ndarray, handlers.NumpyHandler()),
        (jax.Array, handlers.ArrayHandler(use_replica_parallel=False)),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def _stored_arrays(path: pathlib.Path) -> dict[str, Any]:
    """``{name: orbax ArrayMetadata}`` of the arrays stored in the orbax checkpoint at ``path``."""
    import orbax.checkpoint as ocp

    with _checkpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
    return dict(tree)


def _read_arrays(
    path: pathlib.Path, only: str | None = None, shardings: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The arrays of the orbax checkpoint at ``path`` (or just the one named ``only``).

    An array named in ``shardings`` is read as a ``jax.Array`` with that sharding: each device
    reads its own shard from the files, whatever mesh wrote them. Every other array is read as
    numpy, which ignores the devices it was saved from. Every stored array is asked for by name:
    orbax's ``partial_restore`` silently hands back the placeholder for a name that is not stored.
    """
    import orbax.checkpoint as ocp

    shardings = shardings or {}
    stored = _stored_arrays(path)

    def args(name: str) -> Any:
        if name in shardings:
            return ocp.ArrayRestoreArgs(
                sharding=shardings[name], global_shape=tuple(stored[name].shape), dtype=stored[name].dtype
            )
        return ocp.RestoreArgs(restore_type=np.ndarray)

    with _checkpointer() as checkpointer:
        if only is None:
            restore_args = {n: args(n) for n in stored}
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        item = {only: jax.ShapeDtypeStruct(stored[only].shape, stored[only].dtype)}
        return checkpointer.restore(
            path, args=ocp.args.PyTreeRestore(item=item, restore_args={only: args(only)}, partial_restore=True)
        )


def _check_leaf(leaf: Mapping[str, Any], value: Any, checksum: str | None) -> str | None:
    """Why ``value`` is not the array ``leaf`` describes (None: it is).

    sha256 is checked wherever the whole array is on this host (numpy, or a fully addressable
    jax array, whose host copy is made only for hashing); the ``sum64`` checksum, computed where
    the shards live, is checked whenever the metadata has one.
    """
    dtype, shape = jnp.dtype(leaf["dtype"]), tuple(leaf["shape"])
    if tuple(value.shape) != shape or np.dtype(value.dtype) != dtype:
        return f"{leaf['path']}: stored {tuple(value.shape)} {np.dtype(value.dtype)}, metadata says {shape} {dtype}"
    whole = not isinstance(value, jax.Array) or value.is_fully_addressable
    if leaf["sha256"] is not None and whole:
        digest = _sha256(_host_array(value))
        if digest != leaf["sha256"]:
            return f"{leaf['path']}: sha256 {digest[:16]}... is not the saved {leaf['sha256'][:16]}..."
    if leaf.get("checksum") is not None and checksum != leaf["checksum"]:
        return f"{leaf['path']}: checksum {checksum} is not the saved {leaf['checksum']}"
    if leaf.get("checksum") is None and not whole:
        warnings.warn(
            f"{leaf['path']}: not verified (a checkpoint without a sum64 checksum, restored onto "
            "devices of several hosts)",
            stacklevel=4,
        )
    return None


def _read_checked(
    directory: pathlib.Path, meta: Mapping[str, Any], shardings: Mapping[str, Any] | None = None
) -> list[tuple[Keys, Any]]:
    """Every leaf of the checkpoint, read and checked against its metadata (shape, dtype, sha256,
    checksum). ``shardings`` (by leaf path) places leaves on devices as they are read."""
    leaves = meta["leaves"]
    shardings = shardings or {}
    names = [leaf["array"] for leaf in leaves if leaf["array"] is not None]
    by_name = {leaf["array"]: shardings[leaf["path"]] for leaf in leaves if leaf["path"] in shardings}
    arrays: dict[str, Any] = {}
    if names:
        arrays_dir = directory / ARRAYS_DIR
        if not arrays_dir.is_dir():
            raise CheckpointCorruptError(
                f"{directory}: {ARRAYS_DIR}/ is missing ({len(names)} stored leaves expected)"
            )
        try:
            arrays = _read_arrays(arrays_dir, shardings=by_name)
        except Exception as whole:  # noqa: BLE001 - orbax / tensorstore raise many types
            raise CheckpointCorruptError(
                f"cannot read the arrays of {directory}: {_failing_leaves(arrays_dir, leaves)}; "
                f"orbax said: {type(whole).__name__}: {str(whole)[:500]}"
            ) from whole
    values, bad = [], []
    for leaf in leaves:
        dtype, shape = jnp.dtype(leaf["dtype"]), tuple(leaf["shape"])
        if leaf["array"] is None:  # orbax refuses zero-size arrays; only the shape was stored
            a = np.zeros(shape, dtype)
            if leaf["path"] in shardings:
                a = jax.device_put(a, shardings[leaf["path"]])
        elif leaf["array"] not in arrays:
            bad.append(f"{leaf['path']}: array {leaf['array']!r} missing from {ARRAYS_DIR}/")
            continue
        else:
            a = arrays[leaf["array"]]
            a = a if isinstance(a, jax.Array) else _host_array(a)
        values.append((leaf, a))
    sums = _checksums([a for leaf, a in values if leaf.get("checksum") is not None])
    out = []
    for leaf, a in values:
        problem = _check_leaf(leaf, a, sums.pop(0) if leaf.get("checksum") is not None else None)
        if problem:
            bad.append(problem)
        else:
            out.append((tuple(leaf["keys"]), a))
    if bad:
        raise CheckpointCorruptError(
            f"{directory}: {len(bad)} of {len(leaves)} adapter leaves do not match their saved shape, "
            "dtype or checksum (the files were changed or damaged after they were written):\n" + _capped(bad)
        )
    return out


def _failing_leaves(arrays_dir: pathlib.Path, leaves: Sequence[Mapping[str, Any]]) -> str:
    """Which leaves cannot be read on their own, for the message of a failed whole-tree read."""
    try:
        stored = _stored_arrays(arrays_dir)
    except Exception as e:  # noqa: BLE001 - the orbax metadata itself is unreadable
        return f"the orbax metadata of {arrays_dir} is unreadable ({type(e).__name__})"
    failing = []
    for leaf in leaves:
        if leaf["array"] is None:
            continue
        if leaf["array"] not in stored:
            failing.append(f"{leaf['path']} (not stored)")
            continue
        try:
            _read_arrays(arrays_dir, only=leaf["array"])
        except Exception:  # noqa: BLE001
            failing.append(leaf["path"])
    if not failing:
        return "every leaf reads on its own"
    more = f" ... and {len(failing) - _MAX_LISTED} more" if len(failing) > _MAX_LISTED else ""
    return "unreadable leaves: " + ", ".join(failing[:_MAX_LISTED]) + more


def _verify(directory: pathlib.Path, meta: Mapping[str, Any], shardings: Mapping[str, Any] | None = None) -> None:
    """Read a freshly written checkpoint back and check it, before it is moved into place."""
    file = _metadata_path(directory)
    if _validate_metadata(json.loads(file.read_text(encoding="utf-8")), file) != meta:
        raise CheckpointCorruptError(f"{file} does not read back as it was written")
    _read_checked(directory, meta, shardings)


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def save_adapter(
    directory: str | os.PathLike,
    adapter: Any,
    *,
    config: Mapping[str, Any] | None = None,
    base: Any = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Save the array leaves of ``adapter`` (and nothing else) as an adapter checkpoint.

    Args:
      directory: where the checkpoint goes; its parent is created if needed.
      adapter: the trainable tree: ``partition``'s first part (``None`` holes are dropped), an
        NNX ``State`` (its pure dict is saved), or nested dicts / lists of jax or numpy arrays.
        Sharded jax arrays are written shard by shard from their devices, never gathered. With
        several processes (``jax.distributed``), every process calls ``save_adapter`` with the
        same arguments on a filesystem all of them see.
      config: the transform's config, JSON data such as ``{"method": "lora", "rank": 8}`` (a
        dataclass instance is turned into a dict); checked by ``restore_adapter(config=...)``.
      base: the base model's params (full params, the frozen part with holes, or an NNX model /
        State); its fingerprint (paths, shapes, dtypes of the leaves that are not adapter
        leaves) is saved and checked by ``restore_adapter(base=...)``.
      overwrite: replace an existing checkpoint at ``directory``. The old one stays intact until
        the new one is completely written and verified.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False, or it exists and is not a
        jaxpeft checkpoint (a directory of other files is never replaced).
      TypeError / ValueError: a leaf is not an array, a key is not str / int, the config is not
        JSON data, the adapter has no array leaf. All checked before anything is written.
    """
    directory = pathlib.Path(directory).absolute()
    items, holes = _leaf_items(adapter)
    if not items:
        raise ValueError(
            f"the adapter has no array leaf to save ({holes} None holes): pass the trainable part "
            "of partition(params, selector), whose selected leaves are arrays"
        )
    by_path: dict[str, Keys] = {}
    for keys, _ in items:
        p = _path(keys)
        if p in by_path:
            raise ValueError(f"adapter leaves {by_path[p]!r} and {keys!r} share the path {p!r}")
        by_path[p] = keys
    config_json = _normalize_config(config)
    fingerprint = None
    if base is not None:
        fingerprint = {p: e for p, e in _fingerprint(base).items() if p not in by_path}
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
        if not _metadata_path(directory).is_file() and any(directory.iterdir()):
            raise FileExistsError(
                f"{directory} exists and is not a jaxpeft adapter checkpoint (no {METADATA_FILE}); "
                "refusing to replace a directory of other files"
            )

    leaves_meta, arrays, num_bytes = [], {}, 0
    values = [leaf if isinstance(leaf, jax.Array) else _host_array(leaf) for _, leaf in items]
    checksums = _checksums(values)  # on the devices holding each array: no gather
    for i, ((keys, _), value, checksum) in enumerate(zip(items, values, checksums)):
        shape, dtype = tuple(value.shape), np.dtype(value.dtype)
        size = math.prod(shape)
        name = _array_key(i) if size else None
        if name is not None:
            arrays[name] = value  # a jax array goes to orbax as it is, shards and all
        num_bytes += size * dtype.itemsize
        whole = not isinstance(value, jax.Array) or value.is_fully_addressable
        leaves_meta.append(
            {
                "path": _path(keys),
                "keys": list(keys),
                "shape": list(shape),
                "dtype": str(dtype),
                # The bytes in C order on this host: only where every shard is local. The host
                # copy exists only for the hash (an adapter is small); orbax writes the shards.
                "sha256": _sha256(_host_array(value)) if whole else None,
                "checksum": checksum,
                "array": name,
            }
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jaxpeft_version": _jaxpeft_version(),
        "orbax_version": _orbax_version(),
        "config": config_json,
        "base_fingerprint": fingerprint,
        "num_bytes": num_bytes,
        "leaves": leaves_meta,
    }
    # Several hosts: verify by reading each spread-out array back onto its own devices.
    spread = {
        leaf["path"]: value.sharding
        for leaf, value in zip(leaves_meta, values)
        if isinstance(value, jax.Array) and not value.is_fully_addressable and leaf["array"] is not None
    }

    # Every process runs this function; one (the primary) creates, writes JSON and renames,
    # all of them write their own shards through orbax, with a barrier between the steps.
    primary = jax.process_index() == 0
    token = _shared_token()
    tmp = directory.parent / f".{directory.name}{_TMP_TAG}{token}"
    old = directory.parent / f".{directory.name}{_OLD_TAG}{token}"
    try:
        if primary:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        _sync(f"created {tmp}")
        if arrays:
            _write_arrays(tmp / ARRAYS_DIR, arrays)
        if primary:
            with open(_metadata_path(tmp), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)  # one-space indent: readable, not huge
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
        _sync(f"written {tmp}")
        if spread:
            _verify(tmp, meta, spread)
        else:
            _verify(tmp, meta)
        _sync(f"verified {tmp}")
        if primary:
            if directory.exists() and not overwrite:  # created by someone else while we were writing
                raise FileExistsError(f"{directory} appeared while saving; pass overwrite=True to replace it")
            if directory.exists():
                os.rename(directory, old)
                try:
                    os.rename(tmp, directory)
                except BaseException:
                    os.rename(old, directory)
                    raise
            else:
                os.rename(tmp, directory)
            _fsync_dir(directory.parent)
        _sync(f"renamed {tmp}")
    finally:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
    if primary and old.exists():
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            warnings.warn(f"saved {directory}, but could not delete the replaced one at {old}", stacklevel=2)
    return directory


def _shared_token() -> str:
    """A random name for the temporary directory, the same on every process."""
    raw = np.frombuffer(os.urandom(8), np.uint32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return "".join(f"{int(x):08x}" for x in raw)[:12]


def _sync(name: str) -> None:
    """A barrier across processes (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxpeft.save_adapter: {name}")


def restore_adapter(
    directory: str | os.PathLike,
    *,
    base: Any = None,
    config: Mapping[str, Any] | None = None,
    shardings: Any = None,
) -> tuple[dict, dict]:
    """Read an adapter checkpoint, check it, and return ``(adapter, metadata)``.

    Args:
      directory: a checkpoint written by ``save_adapter``.
      base: the base model's params (or NNX model / State): refuse to restore unless its
        fingerprint matches the saved one. Leaves at the adapter's own paths are not part of
        the fingerprint, so the pristine base, the frozen part and the full params all match.
      config: refuse to restore unless it equals the saved config (after JSON normalisation,
        tuples == lists).
      shardings: where to put the leaves: one ``jax.sharding.Sharding`` for every leaf, or a
        tree of them whose paths are exactly the adapter's (``jp.shardings(trainable_specs,
        mesh)``, ``None`` holes allowed; an NNX State of Variables holding shardings works too).
        Each device reads only its own shard from the files, whatever mesh saved them (8 devices
        to 2, to 1, ...). Checked before any array is read: a missing or extra path, or a
        sharding that does not divide a saved shape, raises ``CheckpointMismatchError`` naming
        the path, the mesh axis and the sizes.

    Returns:
      ``adapter``: nested dicts keyed by the saved path components (``prune(adapter)`` at save
      time), leaves as jax arrays with the saved dtypes, bit-identical: laid out by
      ``shardings``, or on the default device.
      A 64-bit leaf while ``jax_enable_x64`` is off stays a numpy array rather than being
      truncated. ``metadata``: as ``load_metadata``. Put the adapter into full params with
      ``insert(params, adapter)`` (Linen) or ``nnx.update(model, adapter)`` (NNX).

    Raises:
      CheckpointError: not a checkpoint, or an unknown format version.
      CheckpointMismatchError: ``base`` or ``config`` differ from the saved ones (listed).
      CheckpointCorruptError: a leaf fails its checksum, shape or dtype check, or cannot be read.
    """
    directory = pathlib.Path(directory).absolute()
    meta = load_metadata(directory)
    if base is not None:
        _check_base(meta, base, directory)
    if config is not None:
        _check_config(meta, config, directory)
    placed = _leaf_shardings(shardings, meta, directory)
    items = _read_checked(directory, meta, placed)

    def to_device(a: Any) -> Any:
        if isinstance(a, jax.Array):
            return a
        if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:
            return a
        return jax.device_put(a)

    return _nest([(keys, to_device(a)) for keys, a in items]), meta


def _leaf_shardings(shardings: Any, meta: Mapping[str, Any], directory: pathlib.Path) -> dict[str, Any]:
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
            s = _variable_value(s) if _is_nnx_variable(s) else s
            if s is not None:
                given[p] = s
    problems = [f"{p}: saved {_describe(saved[p])}, no sharding given" for p in saved if p not in given]
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
            f"the shardings do not fit the adapter at {directory} ({len(saved)} leaves):\n" + _capped(problems)
        )
    return given


def insert(params: Any, adapter: Any) -> Any:
    """``params`` with the leaves of ``adapter`` added or replaced: a deep merge of nested dicts.

    ``params`` may be the base params (adapter leaves are added), the full params (they are
    replaced) or the frozen part from ``partition`` (its ``None`` holes are filled). Every other
    leaf of ``params`` is kept as it is; neither input is mutated. Lists / tuples in ``params``
    take dict entries keyed by index. ``None`` in ``adapter`` keeps the ``params`` value, so
    ``insert(frozen, trainable)`` works like ``combine`` too.

    Raises:
      ValueError: an adapter leaf would replace a subtree (or the reverse), an index is out of
        range, or a replaced leaf has another shape; the message names the path.
    """
    if _is_nnx_state(params):
        params = _to_pure_dict(params)
    if _is_nnx_state(adapter):
        adapter = _to_pure_dict(adapter)
    return _insert(params, adapter, ())


def _is_container(x: Any) -> bool:
    return isinstance(x, (Mapping, list, tuple))


def _insert(p: Any, a: Any, keys: tuple) -> Any:
    where = _path(keys) or "<root>"
    if a is None:
        return p
    if not _is_container(a):  # an adapter leaf
        if _is_container(p):
            raise ValueError(f"adapter leaf at {where!r} would replace a {type(p).__name__} subtree of params")
        if p is not None and hasattr(p, "shape") and hasattr(a, "shape") and tuple(p.shape) != tuple(a.shape):
            raise ValueError(f"adapter leaf at {where!r} has shape {tuple(a.shape)}, params {tuple(p.shape)}")
        return a
    entries = a.items() if isinstance(a, Mapping) else enumerate(a)
    if p is None:
        p = {}
    if isinstance(p, Mapping):
        merged = dict(p)
        for k, v in entries:
            merged[k] = _insert(merged.get(k), v, (*keys, k))
        return _frozen_dict(merged) if _is_frozen_dict(p) else merged
    if isinstance(p, (list, tuple)):
        merged_list = list(p)
        for k, v in entries:
            i = _index(k, len(merged_list), where)
            merged_list[i] = _insert(merged_list[i], v, (*keys, k))
        if isinstance(p, tuple):
            return type(p)(*merged_list) if hasattr(p, "_fields") else type(p)(merged_list)
        return merged_list
    raise ValueError(f"adapter has a subtree at {where!r} but params has a {type(p).__name__} leaf there")


def _is_frozen_dict(p: Any) -> bool:
    try:
        from flax.core import FrozenDict
    except ImportError:  # pragma: no cover
        return False
    return isinstance(p, FrozenDict)


def _frozen_dict(d: dict) -> Any:
    from flax.core import FrozenDict

    return FrozenDict(d)


def _index(k: Any, n: int, where: str) -> int:
    try:
        i = int(k)
    except (TypeError, ValueError):
        raise ValueError(f"params at {where!r} is a sequence; adapter key {k!r} is not an index") from None
    if not 0 <= i < n:
        raise ValueError(f"adapter index {i} at {where!r} is out of range for a sequence of {n}")
    return i
