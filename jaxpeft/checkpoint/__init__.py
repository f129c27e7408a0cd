"""Adapter-only checkpoints: save and restore the trainable leaves with orbax, plus JSON metadata.

A PEFT run trains a small part of the parameters; only that part is saved. ``save_adapter``
takes the trainable tree (``jaxpeft.tree.partition`` style, with ``None`` holes where a leaf is
frozen), an NNX ``State``, or a plain nested dict, drops the holes and writes the layout that
``format`` describes. ``load_adapter`` rebuilds the saved transform (``jaxpeft.registry``),
binds it to a Linen or NNX model and restores the leaves in one call.

One concern per module:

* ``format``: the layout, the metadata schema, leaf keys, the config as JSON;
* ``integrity``: digests of the metadata and of every file, per-leaf sha256 and ``sum64``;
* ``atomic``: writing into a sibling and renaming, recovery of an interrupted overwrite;
* ``arrays``: the arrays through orbax, read only after their files are checked;
* ``compat``: the base fingerprint (binding-independent), config and sharding checks;
* ``api``: the public functions.

Sharded arrays are saved as they are: orbax writes each shard from the device holding it, so no
array is gathered onto one device or one host; ``restore_adapter(..., shardings=...)`` reads each
device's shard from the files, on any mesh. On several hosts every process calls ``save_adapter``
(process 0 writes the metadata and renames; each writes its own shards). See ``docs/scale.md``.
"""

from __future__ import annotations

from jaxpeft.checkpoint.api import load_adapter, load_metadata, restore_adapter, save_adapter
from jaxpeft.checkpoint.atomic import CheckpointRecoveredWarning
from jaxpeft.checkpoint.format import (
    ARRAYS_DIR,
    FORMAT_VERSION,
    METADATA_FILE,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
)
from jaxpeft.tree import insert, prune

__all__ = [
    "ARRAYS_DIR",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "CheckpointRecoveredWarning",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "save_adapter",
    "restore_adapter",
    "load_adapter",
    "load_metadata",
    "insert",
    "prune",
]
