"""The public checkpoint functions: ``save_adapter``, ``restore_adapter``, ``load_metadata``, ``load_adapter``."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxpeft import tree as _tree
from jaxpeft.checkpoint import arrays as _arrays
from jaxpeft.checkpoint import atomic, compat, integrity
from jaxpeft.checkpoint.format import (
    ARRAYS_DIR,
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    Keys,
    array_name,
    capped,
    jaxpeft_version,
    leaf_items,
    metadata_digest,
    metadata_path,
    nest,
    normalize_config,
    orbax_version,
    path_of,
    read_metadata,
)


def save_adapter(
    directory: str | os.PathLike,
    adapter: Any,
    *,
    config: Any = None,
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
      config: the transform itself (``peft``; its config is saved so that ``load_adapter`` can
        rebuild it) or its ``peft.config()``, or any JSON data such as ``{"rank": 8}`` (a
        dataclass instance is turned into a dict); checked by ``restore_adapter(config=...)``.
        A selector that cannot be rebuilt (a predicate, a lambda) is refused, with the reason.
      base: the base model's params (full params, the frozen part with holes, or an NNX model /
        State); its fingerprint (paths, shapes, dtypes of the leaves that are not adapter
        leaves, the same for a Linen model and its NNX twin) is saved and checked by
        ``restore_adapter(base=...)``.
      overwrite: replace an existing checkpoint at ``directory``. The old one stays intact until
        the new one is completely written and verified.

    Returns:
      The absolute path of the checkpoint.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False, or it exists and is not a
        jaxpeft checkpoint (a directory of other files is never replaced).
      TypeError / ValueError: a leaf is not an array, a key is not str / int, the config is not
        JSON data or holds a selector that cannot be rebuilt (``jaxpeft.registry.ConfigError``),
        the adapter has no array leaf. All checked before anything is written.
    """
    directory = pathlib.Path(directory).absolute()
    items, holes = leaf_items(adapter)
    if not items:
        raise ValueError(
            f"the adapter has no array leaf to save ({holes} None holes): pass the trainable part "
            "of partition(params, selector), whose selected leaves are arrays"
        )
    by_path: dict[str, Keys] = {}
    for keys, _ in items:
        p = path_of(keys)
        if p in by_path:
            raise ValueError(f"adapter leaves {by_path[p]!r} and {keys!r} share the path {p!r}")
        by_path[p] = keys
    config_json = normalize_config(config)
    fingerprint = None
    if base is not None:
        fingerprint = {p: e for p, e in compat.base_fingerprint(base).items() if p not in by_path}
    primary = jax.process_index() == 0
    if primary:
        atomic.recover(directory)  # an interrupted overwrite's checkpoint counts as existing
    atomic.sync(f"recovered {directory}")
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise FileExistsError(f"{directory} exists and is not a directory")
        if not overwrite:
            raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
        if not metadata_path(directory).is_file() and any(directory.iterdir()):
            raise FileExistsError(
                f"{directory} exists and is not a jaxpeft adapter checkpoint (no {METADATA_FILE}); "
                "refusing to replace a directory of other files"
            )

    leaves_meta, arrays, num_bytes = [], {}, 0
    values = [leaf if isinstance(leaf, jax.Array) else integrity.host_array(leaf) for _, leaf in items]
    checksums = integrity.checksums(values)  # on the devices holding each array: no gather
    for i, ((keys, _), value, checksum) in enumerate(zip(items, values, checksums)):
        shape, dtype = tuple(value.shape), np.dtype(value.dtype)
        size = math.prod(shape)
        name = array_name(i) if size else None
        if name is not None:
            arrays[name] = value  # a jax array goes to orbax as it is, shards and all
        num_bytes += size * dtype.itemsize
        whole = not isinstance(value, jax.Array) or value.is_fully_addressable
        leaves_meta.append(
            {
                "path": path_of(keys),
                "keys": list(keys),
                "shape": list(shape),
                "dtype": str(dtype),
                # The bytes in C order on this host: only where every shard is local. The host
                # copy exists only for the hash (an adapter is small); orbax writes the shards.
                "sha256": integrity.sha256(integrity.host_array(value)) if whole else None,
                "checksum": checksum,
                "array": name,
            }
        )
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "jaxpeft_version": jaxpeft_version(),
        "orbax_version": orbax_version(),
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
    token = atomic.shared_token()
    tmp, old = atomic.tmp_sibling(directory, token), atomic.old_sibling(directory, token)
    try:
        if primary:
            directory.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        atomic.sync(f"created {tmp}")
        if arrays:
            _arrays.write_arrays(tmp / ARRAYS_DIR, arrays)
        atomic.sync(f"arrays written {tmp}")
        if primary:
            # Every file orbax wrote (on every host) is listed with its size and sha256, so a
            # restore checks them before orbax reads any; then the metadata gets its own digest.
            meta["files"] = integrity.file_digests(tmp / ARRAYS_DIR) if arrays else {}
            meta["metadata_sha256"] = metadata_digest(meta)
            with open(metadata_path(tmp), "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)  # one-space indent: readable, not huge
                f.flush()
                os.fsync(f.fileno())
            atomic.fsync_dir(tmp)
        atomic.sync(f"written {tmp}")
        _verify(tmp, meta, spread or None)
        atomic.sync(f"verified {tmp}")
        if primary:
            atomic.publish(tmp, directory, old, overwrite)
        atomic.sync(f"renamed {tmp}")
    finally:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
    if primary and not atomic.discard(old):
        warnings.warn(f"saved {directory}, but could not delete the replaced one at {old}", stacklevel=2)
    return directory


def _verify(directory: pathlib.Path, meta: Mapping[str, Any], shardings: Mapping[str, Any] | None = None) -> None:
    """Read a freshly written checkpoint back and check it exactly as a restore would, before
    it is moved into place. (On other processes than the primary, ``meta`` lacks the file
    digests the primary added; the rest must be equal.)"""
    written = read_metadata(directory)
    ours = {k: v for k, v in written.items() if k not in ("files", "metadata_sha256")}
    if ours != {k: v for k, v in meta.items() if k not in ("files", "metadata_sha256")}:
        raise CheckpointCorruptError(f"{metadata_path(directory)} does not read back as it was written")
    _arrays.read_checked(directory, written, shardings)


def load_metadata(directory: str | os.PathLike) -> dict:
    """The parsed ``jaxpeft_adapter.json`` of an adapter checkpoint.

    If ``directory`` is missing but an overwrite interrupted between its two renames left the
    previous checkpoint beside it, that checkpoint is renamed back first
    (``CheckpointRecoveredWarning``).

    Returns:
      A dict with ``format``, ``format_version``, ``jaxpeft_version``, ``orbax_version``,
      ``config`` (or None), ``base_fingerprint`` (``{path: {"shape", "dtype"}}`` or None),
      ``num_bytes``, ``leaves`` (one ``{"path", "keys", "shape", "dtype", "sha256",
      "checksum", "array"}`` per adapter leaf), ``files`` (``{name: {"size", "sha256"}}`` of the
      files under ``arrays/``) and ``metadata_sha256``.

    Raises:
      CheckpointError: ``directory`` is missing, is not an adapter checkpoint, or has a
        metadata format this version does not read.
      CheckpointCorruptError: the metadata file is not JSON or does not match its own digest.
    """
    directory = pathlib.Path(directory).absolute()
    atomic.recover(directory)  # on every process: the rename is atomic, one of them wins, the rest see it done
    if not directory.is_dir():
        raise CheckpointError(f"no adapter checkpoint at {directory}: not a directory")
    return read_metadata(directory)


def restore_adapter(
    directory: str | os.PathLike,
    *,
    base: Any = None,
    config: Any = None,
    shardings: Any = None,
) -> tuple[dict, dict]:
    """Read an adapter checkpoint, check it, and return ``(adapter, metadata)``.

    Args:
      directory: a checkpoint written by ``save_adapter``.
      base: the base model's params (or NNX model / State): refuse to restore unless its
        fingerprint matches the saved one. Leaves at the adapter's own paths are not part of
        the fingerprint, so the pristine base, the frozen part and the full params all match;
        the fingerprint does not depend on the binding, so a Linen adapter checks against the
        NNX twin and the reverse.
      config: refuse to restore unless it equals the saved config (after JSON normalisation,
        tuples == lists); a transform is compared by its ``config()``.
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
      ``insert(params, adapter)`` (Linen) or ``nnx.update(model, adapter)`` (NNX), or let
      ``load_adapter`` do all of it.

    Raises:
      CheckpointError: not a checkpoint, or an unknown format version.
      CheckpointMismatchError: ``base`` or ``config`` differ from the saved ones (listed).
      CheckpointCorruptError: the metadata does not match its digest, an array file is missing,
        truncated or changed (checked before orbax reads anything), or a leaf fails its
        checksum, shape or dtype check.
    """
    directory = pathlib.Path(directory).absolute()
    meta = load_metadata(directory)
    if base is not None:
        compat.check_base(meta, base, directory)
    if config is not None:
        compat.check_config(meta, config, directory)
    placed = compat.leaf_shardings(shardings, meta, directory)
    items = _arrays.read_checked(directory, meta, placed)

    def to_device(a: Any) -> Any:
        if isinstance(a, jax.Array):
            return a
        if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype:
            return a
        return jax.device_put(a)

    return nest([(keys, to_device(a)) for keys, a in items]), meta


def load_adapter(
    directory: str | os.PathLike,
    model: Any,
    key: jax.Array | None = None,
    *example: Any,
    params: Any = None,
    check_base: bool = True,
    shardings: Any = None,
    **example_kwargs: Any,
) -> Any:
    """Rebuild the transform saved with an adapter, bind it to ``model`` and restore its leaves.

    The one-call counterpart of ``PeftModel.from_pretrained``: ``jaxpeft.registry.from_config``
    on the saved config, ``jp.apply``, ``restore_adapter`` (with the base check) and ``insert``
    / ``nnx.update``. An adapter saved from a Linen model loads into the NNX twin and the reverse.

    Linen::

      peft_model, params = jp.load_adapter(directory, model, key, tokens, params=base_params)

    NNX::

      peft_model = jp.load_adapter(directory, model)

    Args:
      directory: a checkpoint saved with ``config=peft`` (or ``peft.config()``).
      model: the base ``flax.linen.Module`` or ``flax.nnx.Module``; never modified.
      key: PRNG key for ``jp.apply`` (the new leaves it draws are all replaced by the saved
        ones; default ``jax.random.key(0)``).
      *example, **example_kwargs: Linen only: an example input, as for ``jp.apply``.
      params: Linen only: the base ``params`` collection (None: ``model.init``).
      check_base: refuse a base whose fingerprint differs from the saved one (skipped for a
        checkpoint saved without ``base``).
      shardings: as for ``restore_adapter``.

    Returns:
      As ``jp.apply``: Linen ``(peft_model, params)`` with the saved leaves in ``params``; NNX
      the bound model holding them. The transform itself is
      ``jaxpeft.registry.from_config(load_metadata(directory)["config"])``.

    Raises:
      CheckpointError: the checkpoint has no config (saved without ``config=``).
      jaxpeft.registry.ConfigError: the config does not rebuild a transform (names the field).
      CheckpointMismatchError: the base differs, or the bound model's PEFT leaves are not the
        saved ones (paths listed).
    """
    from jaxpeft import registry
    from jaxpeft.bind import apply

    directory = pathlib.Path(directory).absolute()
    meta = load_metadata(directory)
    if meta["config"] is None:
        raise CheckpointError(
            f"{directory} was saved without a config, so its transform cannot be rebuilt: save it with "
            "config=peft, or bind the transform yourself and use restore_adapter"
        )
    peft = registry.from_config(meta["config"])
    key = jax.random.key(0) if key is None else key
    bound = apply(peft, model, key, *example, params=params, **example_kwargs)
    is_linen = isinstance(bound, tuple)
    peft_model, new_params = bound if is_linen else (bound, None)
    if is_linen:
        full = new_params
    else:
        from flax import nnx

        full = nnx.state(peft_model)
    expected = _tree.prune(_tree.partition(full, peft.trainable, allow_empty=True)[0])
    _check_leaves(meta, expected, directory)
    base = new_params if is_linen else peft_model
    adapter, _ = restore_adapter(
        directory, base=base if check_base and meta["base_fingerprint"] is not None else None, shardings=shardings
    )
    if is_linen:
        return peft_model, _tree.insert(new_params, adapter)
    from flax import nnx

    nnx.update(peft_model, adapter)
    return peft_model


def _check_leaves(meta: Mapping[str, Any], expected: Any, directory: pathlib.Path) -> None:
    """The bound model's PEFT leaves must be the saved ones: same paths, shapes and dtypes."""
    saved = {leaf["path"]: leaf for leaf in meta["leaves"]}
    given = _tree.fingerprint(expected)
    problems = [f"{p}: saved, but the bound model has no such leaf" for p in saved if p not in given]
    problems += [f"{p}: the bound model has it, the checkpoint does not" for p in given if p not in saved]
    for p in saved.keys() & given.keys():
        s, g = saved[p], given[p]
        if list(s["shape"]) != list(g["shape"]) or s["dtype"] != g["dtype"]:
            problems.append(f"{p}: saved {tuple(s['shape'])} {s['dtype']}, bound {tuple(g['shape'])} {g['dtype']}")
    if problems:
        raise CheckpointMismatchError(
            f"the transform rebuilt from {directory} does not produce the saved leaves on this model "
            f"({len(saved)} saved, {len(given)} bound):\n" + capped(sorted(problems))
        )


__all__ = ["save_adapter", "restore_adapter", "load_metadata", "load_adapter"]
