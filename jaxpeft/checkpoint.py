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
deleted. ``restore_adapter`` checks every leaf's sha256, and optionally that the base model and
the method config are the ones the adapter was trained with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shutil
import uuid
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
            "path": str, "keys": list, "shape": list, "dtype": str, "sha256": str, "array": (str, type(None)),
        }
        for field, types in need.items():
            if not isinstance(leaf, dict) or not isinstance(leaf.get(field), types):
                raise bad(f"leaf entry {i} has no valid {field!r}: {leaf!r}")
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


def _write_arrays(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    """One orbax PyTree checkpoint at ``path``, synchronously (``Checkpointer``, not async)."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(arrays))


def _stored_arrays(path: pathlib.Path) -> dict[str, Any]:
    """``{name: orbax ArrayMetadata}`` of the arrays stored in the orbax checkpoint at ``path``."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
    return dict(tree)


def _read_arrays(path: pathlib.Path, only: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of the orbax checkpoint at ``path`` (or just the one named ``only``), as numpy.

    Restoring as numpy ignores the devices / sharding the arrays were saved from, so a checkpoint
    written on 8 GPUs restores on a laptop. (A ``shardings`` argument for device placement at
    restore time belongs here.) Every stored array is asked for by name: orbax's
    ``partial_restore`` silently hands back the placeholder for a name that is not stored.
    """
    import orbax.checkpoint as ocp

    stored = _stored_arrays(path)
    with ocp.PyTreeCheckpointer() as checkpointer:
        if only is None:
            restore_args = {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in stored}
            return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        item = {only: jax.ShapeDtypeStruct(stored[only].shape, stored[only].dtype)}
        restore_args = {only: ocp.RestoreArgs(restore_type=np.ndarray)}
        return checkpointer.restore(
            path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )


def _read_checked(directory: pathlib.Path, meta: Mapping[str, Any]) -> list[tuple[Keys, np.ndarray]]:
    """Every leaf of the checkpoint, read and checked against its metadata (shape, dtype, sha256)."""
    leaves = meta["leaves"]
    names = [leaf["array"] for leaf in leaves if leaf["array"] is not None]
    arrays: dict[str, np.ndarray] = {}
    if names:
        arrays_dir = directory / ARRAYS_DIR
        if not arrays_dir.is_dir():
            raise CheckpointCorruptError(
                f"{directory}: {ARRAYS_DIR}/ is missing ({len(names)} stored leaves expected)"
            )
        try:
            arrays = _read_arrays(arrays_dir)
        except Exception as whole:  # noqa: BLE001 - orbax / tensorstore raise many types
            raise CheckpointCorruptError(
                f"cannot read the arrays of {directory}: {_failing_leaves(arrays_dir, leaves)}; "
                f"orbax said: {type(whole).__name__}: {str(whole)[:500]}"
            ) from whole
    out, bad = [], []
    for leaf in leaves:
        dtype, shape = jnp.dtype(leaf["dtype"]), tuple(leaf["shape"])
        if leaf["array"] is None:  # orbax refuses zero-size arrays; only the shape was stored
            a = np.zeros(shape, dtype)
        elif leaf["array"] not in arrays:
            bad.append(f"{leaf['path']}: array {leaf['array']!r} missing from {ARRAYS_DIR}/")
            continue
        else:
            a = _host_array(arrays[leaf["array"]])
        if a.shape != shape or a.dtype != dtype:
            bad.append(f"{leaf['path']}: stored {a.shape} {a.dtype}, metadata says {shape} {dtype}")
        elif _sha256(a) != leaf["sha256"]:
            bad.append(f"{leaf['path']}: sha256 {_sha256(a)[:16]}... is not the saved {leaf['sha256'][:16]}...")
        else:
            out.append((tuple(leaf["keys"]), a))
    if bad:
        raise CheckpointCorruptError(
            f"{directory}: {len(bad)} of {len(leaves)} adapter leaves do not match their saved shape, "
            "dtype or sha256 (the files were changed or damaged after they were written):\n" + _capped(bad)
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


def _verify(directory: pathlib.Path, meta: Mapping[str, Any]) -> None:
    """Read a freshly written checkpoint back and check it, before it is moved into place."""
    file = _metadata_path(directory)
    if _validate_metadata(json.loads(file.read_text(encoding="utf-8")), file) != meta:
        raise CheckpointCorruptError(f"{file} does not read back as it was written")
    _read_checked(directory, meta)


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
    if jax.process_count() > 1:
        raise NotImplementedError(
            f"save_adapter runs on one process; this is process {jax.process_index()} of "
            f"{jax.process_count()}. Multi-host adapter checkpoints are not supported yet."
        )
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
    for i, (keys, leaf) in enumerate(items):
        a = _host_array(leaf)
        name = _array_key(i) if a.size else None
        if name is not None:
            arrays[name] = a
        num_bytes += a.nbytes
        leaves_meta.append(
            {
                "path": _path(keys),
                "keys": list(keys),
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "sha256": _sha256(a),
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

    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = directory.parent / f".{directory.name}{_TMP_TAG}{token}"
    old = directory.parent / f".{directory.name}{_OLD_TAG}{token}"
    try:
        tmp.mkdir()
        if arrays:
            _write_arrays(tmp / ARRAYS_DIR, arrays)
        with open(_metadata_path(tmp), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)  # one-space indent: readable, not huge
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _verify(tmp, meta)
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            warnings.warn(f"saved {directory}, but could not delete the replaced one at {old}", stacklevel=2)
    return directory


def restore_adapter(
    directory: str | os.PathLike,
    *,
    base: Any = None,
    config: Mapping[str, Any] | None = None,
) -> tuple[dict, dict]:
    """Read an adapter checkpoint, check it, and return ``(adapter, metadata)``.

    Args:
      directory: a checkpoint written by ``save_adapter``.
      base: the base model's params (or NNX model / State): refuse to restore unless its
        fingerprint matches the saved one. Leaves at the adapter's own paths are not part of
        the fingerprint, so the pristine base, the frozen part and the full params all match.
      config: refuse to restore unless it equals the saved config (after JSON normalisation,
        tuples == lists).

    Returns:
      ``adapter``: nested dicts keyed by the saved path components (``prune(adapter)`` at save
      time), leaves as jax arrays on the default device with the saved dtypes, bit-identical.
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
    items = _read_checked(directory, meta)

    def to_device(a: np.ndarray) -> Any:
        if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:
            return a
        return jax.device_put(a)

    return _nest([(keys, to_device(a)) for keys, a in items]), meta


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
