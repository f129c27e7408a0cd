"""The on-disk cache of converted checkpoints: where it lives, keys, and self-checking entries.

A GGUF load spends most of its time parsing the file (``gguf.GGUFReader`` walks all 262k vocabulary
pieces) and dequantizing; its result is kept under the cache directory, keyed by the GGUF file's
sha256 and ``CONVERTER_VERSION`` (bumped whenever a conversion changes its output, so an old entry is
never read by new code). Every entry carries the sha256 of its own payload and is checked on every
read: a damaged entry is reported (``CacheCorruptWarning``) and rebuilt, never used. Entries are
written to a temporary name and renamed into place, so a crash never leaves half an entry.

The directory is ``$JAXPEFT_CACHE`` if set, else ``$XDG_CACHE_HOME/jaxpeft``, else ``~/.cache/jaxpeft``
(read at each call, so a test or a user can redirect it at run time).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

__all__ = ["CONVERTER_VERSION", "CacheCorruptWarning", "cache_dir", "file_sha256", "read_checked_json",
           "read_checked_safetensors", "write_checked_json", "write_checked_safetensors"]

# Bump when the GGUF -> params or GGUF -> tokenizer conversion changes what it produces.
CONVERTER_VERSION = 1
_DTYPES = {"F32": np.float32}
_NAMES = {np.dtype(np.float32): "F32"}


class CacheCorruptWarning(UserWarning):
    """A cache entry failed its hash check (or could not be parsed); it is rebuilt from the source."""


def cache_dir() -> Path:
    """``$JAXPEFT_CACHE``, else ``$XDG_CACHE_HOME/jaxpeft``, else ``~/.cache/jaxpeft``."""
    if os.environ.get("JAXPEFT_CACHE"):
        return Path(os.environ["JAXPEFT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "jaxpeft"
    return Path.home() / ".cache" / "jaxpeft"


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered for the process while its size and mtime do not change."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _replace_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _corrupt(path: Path, why: str) -> None:
    warnings.warn(f"cache entry {path} is corrupt ({why}); rebuilding it", CacheCorruptWarning, stacklevel=3)


def write_checked_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write ``tensors`` as a safetensors file whose ``__metadata__`` holds the payload's sha256.

    The file is a plain safetensors file (``safetensors.numpy.load_file`` reads it); the tensors are
    stored in name order, and ``payload_sha256`` covers every byte after the header.
    """
    names = sorted(tensors)
    arrays = [np.ascontiguousarray(tensors[n]) for n in names]
    digest, header, offset = hashlib.sha256(), {}, 0
    for name, array in zip(names, arrays):
        if array.dtype not in _NAMES:
            raise TypeError(f"cache entry {path}: tensor {name!r} has dtype {array.dtype}; only float32 is cached")
        digest.update(memoryview(array).cast("B"))
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = {**metadata, "payload_sha256": digest.hexdigest()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for array in arrays:
            f.write(memoryview(array).cast("B"))

    _replace_atomic(path, write)


def read_checked_safetensors(path: Path, expect: dict[str, str]) -> tuple[dict[str, np.ndarray], dict] | None:
    """``(tensors, metadata)`` of an entry written by ``write_checked_safetensors``; None when absent.

    A file that does not parse, whose payload hash does not match, or whose metadata differs from
    ``expect`` (source hash, converter version) warns ``CacheCorruptWarning`` and returns None.
    """
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            metadata = header.pop("__metadata__")
            end = max((t["data_offsets"][1] for t in header.values()), default=0)
            payload = bytearray(end)
            if f.readinto(payload) != end or f.read(1):
                _corrupt(path, f"payload is not {end} bytes")
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        _corrupt(path, f"unreadable header: {error}")
        return None
    got = hashlib.sha256(payload).hexdigest()
    if got != metadata.get("payload_sha256"):
        _corrupt(path, f"payload sha256 {got}, header says {metadata.get('payload_sha256')}")
        return None
    for key, value in expect.items():
        if metadata.get(key) != value:
            _corrupt(path, f"{key} is {metadata.get(key)!r}, expected {value!r}")
            return None
    tensors = {}
    for name, info in header.items():
        start, stop = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        tensors[name] = np.frombuffer(payload, dtype, (stop - start) // dtype.itemsize, start).reshape(info["shape"])
    return tensors, metadata


def write_checked_json(path: Path, body: str, metadata: dict[str, str]) -> None:
    """Write ``body`` (a string) with ``metadata`` and ``body``'s sha256 as one JSON file."""
    record = {**metadata, "body_sha256": hashlib.sha256(body.encode()).hexdigest(), "body": body}
    _replace_atomic(path, lambda f: f.write(json.dumps(record).encode()))


def read_checked_json(path: Path, expect: dict[str, str]) -> str | None:
    """The body of an entry written by ``write_checked_json``; None when absent or corrupt (warns)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_bytes())
        body = record["body"]
        got = hashlib.sha256(body.encode()).hexdigest()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        _corrupt(path, f"unreadable: {error}")
        return None
    if got != record.get("body_sha256"):
        _corrupt(path, f"body sha256 {got}, recorded {record.get('body_sha256')}")
        return None
    for key, value in expect.items():
        if record.get(key) != value:
            _corrupt(path, f"{key} is {record.get(key)!r}, expected {value!r}")
            return None
    return body
