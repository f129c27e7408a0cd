"""Atomic I/O: a checkpoint directory appears whole or not at all, and a good one is never lost.

A save writes everything into a hidden sibling, ``.<name>.jaxpeft-tmp-<token>``, checks it, and
renames it into place. Replacing an existing checkpoint takes two renames: the old one aside to
``.<name>.jaxpeft-old-<token>``, the new one in; only then is the old one deleted (its metadata
file first, so a half-deleted copy is never mistaken for a checkpoint). A process killed
between the two renames leaves the good checkpoint only under its ``-old-`` name; ``recover``
(called by every restore and save) renames it back and warns.

On several hosts, process 0 creates, renames and deletes; ``sync`` is the barrier between steps.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import time
import warnings

import jax
import numpy as np

from jaxpeft.checkpoint.format import CheckpointError, metadata_path, read_metadata

TMP_TAG = ".jaxpeft-tmp-"
OLD_TAG = ".jaxpeft-old-"
# Test hook: a save started with JAXPEFT_CHECKPOINT_TEST_PAUSE=<stage> prints a line and sleeps at
# that stage, so that a test can SIGKILL it exactly there. The one stage: "between_renames".
PAUSE_ENV = "JAXPEFT_CHECKPOINT_TEST_PAUSE"
PAUSED_LINE = "jaxpeft-checkpoint-paused"


class CheckpointRecoveredWarning(UserWarning):
    """A checkpoint left aside by an interrupted overwrite was renamed back into place."""


def tmp_sibling(directory: pathlib.Path, token: str) -> pathlib.Path:
    return directory.parent / f".{directory.name}{TMP_TAG}{token}"


def old_sibling(directory: pathlib.Path, token: str) -> pathlib.Path:
    return directory.parent / f".{directory.name}{OLD_TAG}{token}"


def shared_token() -> str:
    """A random name for the temporary directory, the same on every process."""
    raw = np.frombuffer(os.urandom(8), np.uint32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return "".join(f"{int(x):08x}" for x in raw)[:12]


def sync(name: str) -> None:
    """A barrier across processes (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxpeft.save_adapter: {name}")


def fsync_dir(path: pathlib.Path) -> None:
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


def pause_point(stage: str) -> None:
    """The test hook: pause here when ``PAUSE_ENV`` names ``stage`` (see the module docstring)."""
    if os.environ.get(PAUSE_ENV) == stage:
        print(f"{PAUSED_LINE}:{stage}", file=sys.stdout, flush=True)
        time.sleep(600)


def publish(tmp: pathlib.Path, directory: pathlib.Path, old: pathlib.Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``directory``; an existing one goes aside to ``old`` first."""
    if directory.exists() and not overwrite:  # created by someone else while we were writing
        raise FileExistsError(f"{directory} appeared while saving; pass overwrite=True to replace it")
    if directory.exists():
        os.rename(directory, old)
        pause_point("between_renames")
        try:
            os.rename(tmp, directory)
        except BaseException:
            os.rename(old, directory)
            raise
    else:
        os.rename(tmp, directory)
    fsync_dir(directory.parent)


def discard(old: pathlib.Path) -> bool:
    """Delete a replaced checkpoint, its metadata first; whether it is gone."""
    if not old.exists():
        return True
    try:
        metadata_path(old).unlink(missing_ok=True)
    except OSError:
        pass
    shutil.rmtree(old, ignore_errors=True)
    return not old.exists()


def interrupted_copies(directory: pathlib.Path) -> list[pathlib.Path]:
    """The ``-old-`` siblings of ``directory`` that still hold metadata, newest first."""
    if not directory.parent.is_dir():
        return []
    found = [p for p in directory.parent.glob(f".{directory.name}{OLD_TAG}*") if metadata_path(p).is_file()]
    return sorted(found, key=lambda p: metadata_path(p).stat().st_mtime, reverse=True)


def recover(directory: pathlib.Path) -> pathlib.Path | None:
    """Rename the checkpoint an interrupted overwrite left aside back to ``directory``.

    Only when ``directory`` does not exist; the newest ``-old-`` copy whose metadata reads is
    used. Warns ``CheckpointRecoveredWarning`` naming both paths. Returns the copy's former
    path, or None when there was nothing to recover.
    """
    if directory.exists() or directory.is_symlink():
        return None
    for old in interrupted_copies(directory):
        try:
            read_metadata(old)
        except CheckpointError:
            continue
        try:
            os.rename(old, directory)
        except OSError:
            if directory.exists():  # another process recovered it first
                return None
            continue
        fsync_dir(directory.parent)
        warnings.warn(
            f"recovered the adapter checkpoint at {directory} from {old.name}: an overwrite was interrupted "
            "between its two renames (the new checkpoint was never moved in; save again to replace it)",
            CheckpointRecoveredWarning,
            stacklevel=3,
        )
        return old
    return None
