"""Integrity: what lets a restore tell a damaged checkpoint from a good one.

Three layers, each checked before the next one is trusted:

1. ``metadata_sha256`` (see ``format``): the metadata file is what it was when written;
2. ``files``: the size and sha256 of every file orbax wrote under ``arrays/``, checked before
   orbax opens any of them, so a truncated, changed or missing file is refused by jaxpeft with
   the file's name, never by an orbax / tensorstore traceback;
3. per leaf, after the read: shape, dtype, the sha256 of its bytes (wherever the whole array
   is on this host) and ``sum64``, a checksum computed where the shards live (any mesh).
"""

from __future__ import annotations

import hashlib
import pathlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.checkpoint.format import CheckpointCorruptError, capped

_CHUNK = 1 << 20  # bytes hashed at a time


def file_digests(root: pathlib.Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"size": bytes, "sha256": hex}}`` of every file under ``root``."""
    out = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        out[file.relative_to(root).as_posix()] = {"size": file.stat().st_size, "sha256": _file_sha256(file)}
    return out


def _file_sha256(file: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(directory: pathlib.Path, root: pathlib.Path, saved: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise ``CheckpointCorruptError`` listing every file under ``root`` that is missing, has
    another size (truncated or grown, by how many bytes) or another sha256 than ``saved``.

    Files that were not saved (added later) are ignored: orbax never reads them.
    """
    problems = []
    for name, entry in saved.items():
        file = root / name
        if not file.is_file():
            problems.append(f"{root.name}/{name}: missing")
            continue
        size = file.stat().st_size
        if size != entry["size"]:
            change = "truncated" if size < entry["size"] else "grown"
            problems.append(
                f"{root.name}/{name}: {size} bytes, saved {entry['size']} ({change} by {abs(size - entry['size'])})"
            )
        elif _file_sha256(file) != entry["sha256"]:
            problems.append(f"{root.name}/{name}: sha256 differs from the saved one (same size: bytes changed)")
    if problems:
        raise CheckpointCorruptError(
            f"{directory}: {len(problems)} of {len(saved)} array files do not match the checkpoint's metadata "
            "(changed, truncated or deleted after they were written); nothing was read:\n" + capped(problems)
        )


def host_array(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.byteorder == ">":  # hash little-endian bytes, whatever the machine
        a = a.astype(a.dtype.newbyteorder("<"))
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return a if a.flags.c_contiguous else np.array(a, order="C")


def sha256(a: np.ndarray) -> str:
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
    a = host_array(a).reshape(-1)
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


def checksums(values: Sequence[Any]) -> list[str]:
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


def check_leaf(leaf: Mapping[str, Any], value: Any, checksum: str | None) -> str | None:
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
        digest = sha256(host_array(value))
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
