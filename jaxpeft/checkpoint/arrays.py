"""The adapter's arrays through orbax: write them, read them back, and check what was read.

orbax stores the arrays under ``arrays/`` (a PyTree checkpoint, OCDBT / zarr), shard by shard
from the devices holding them. jaxpeft never hands orbax a file it has not checked first: where
the metadata lists the files (every checkpoint this version writes), ``integrity.check_files``
runs before the read.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.checkpoint import integrity
from jaxpeft.checkpoint.format import ARRAYS_DIR, MAX_LISTED, CheckpointCorruptError, Keys, capped


def write_arrays(path: pathlib.Path, arrays: dict[str, Any]) -> None:
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


def read_checked(
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
        if meta.get("files") is not None:
            integrity.check_files(directory, arrays_dir, meta["files"])
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
            a = a if isinstance(a, jax.Array) else integrity.host_array(a)
        values.append((leaf, a))
    sums = integrity.checksums([a for leaf, a in values if leaf.get("checksum") is not None])
    out = []
    for leaf, a in values:
        problem = integrity.check_leaf(leaf, a, sums.pop(0) if leaf.get("checksum") is not None else None)
        if problem:
            bad.append(problem)
        else:
            out.append((tuple(leaf["keys"]), a))
    if bad:
        raise CheckpointCorruptError(
            f"{directory}: {len(bad)} of {len(leaves)} adapter leaves do not match their saved shape, "
            "dtype or checksum (the files were changed or damaged after they were written):\n" + capped(bad)
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
    more = f" ... and {len(failing) - MAX_LISTED} more" if len(failing) > MAX_LISTED else ""
    return "unreadable leaves: " + ", ".join(failing[:MAX_LISTED]) + more
