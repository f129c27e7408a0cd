"""Adapter checkpoints: bit-exact round trips, fingerprint / config checks, atomicity, corruption."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

from jaxpeft import checkpoint as ckpt
from jaxpeft.checkpoint import api, arrays, atomic, integrity
from jaxpeft.checkpoint.format import metadata_digest
from jaxpeft import tree as jt
from jaxpeft.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointRecoveredWarning,
    insert,
    load_metadata,
    prune,
    restore_adapter,
    save_adapter,
)

LORA = r"lora_(a|b)$"


def linen_like_params(dtype=jnp.float32, seed=0):
    """A Linen-style param tree: two attention blocks with LoRA leaves, an embedding, a head."""
    keys = iter(jax.random.split(jax.random.key(seed), 32))

    def normal(shape, dt=dtype):
        return jax.random.normal(next(keys), shape, jnp.float32).astype(dt)

    layer = lambda: {  # noqa: E731
        "attn": {
            "query": {
                "kernel": normal((8, 8)),
                "bias": normal((8,)),
                "lora_a": normal((8, 2)),
                "lora_b": normal((2, 8)),
            },
            "value": {"kernel": normal((8, 8)), "lora_a": normal((8, 2)), "lora_b": normal((2, 8))},
        },
        "mlp": {"kernel": normal((8, 16))},
    }
    return {
        "embed": {"embedding": normal((11, 8))},
        "layers_0": layer(),
        "layers_1": layer(),
        "head": {"kernel": normal((8, 3)), "bias": jnp.zeros((3,), dtype)},
    }


def raw_bits(x) -> np.ndarray:
    return np.array(x, order="C").reshape(-1).view(np.uint8)


def assert_bit_identical(restored, expected):
    """Same structure, same dtypes, same bytes (NaN payloads and -0.0 included)."""
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for (path, r), (_, e) in zip(jt.leaves_with_paths(restored), jt.leaves_with_paths(expected)):
        assert np.asarray(r).dtype == np.asarray(e).dtype, path
        assert np.shape(r) == np.shape(e), path
        assert np.array_equal(raw_bits(r), raw_bits(e)), path


def pristine_base(params):
    """The base params before LoRA leaves were added: no lora_a / lora_b keys at all."""
    if not isinstance(params, dict):
        return params
    return {k: pristine_base(v) for k, v in params.items() if not k.startswith("lora_")}


def hidden_siblings(directory: pathlib.Path) -> list[str]:
    return sorted(p.name for p in directory.parent.iterdir() if p.name != directory.name)


# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_round_trip_is_bit_identical_with_none_holes(tmp_path, dtype):
    params = linen_like_params(dtype)
    trainable, frozen = jt.partition(params, LORA)
    # Bit patterns a float compare would hide: NaN with a payload, -0.0, inf.
    specials = jnp.asarray([np.nan, -0.0, np.inf, -np.inf], dtype)
    query = trainable["layers_0"]["attn"]["query"]
    query["lora_b"] = query["lora_b"].at[0, :4].set(specials)

    path = save_adapter(tmp_path / "ckpt", trainable, config={"method": "lora", "rank": 2}, base=frozen)
    adapter, meta = restore_adapter(path, base=frozen, config={"method": "lora", "rank": 2})

    assert_bit_identical(adapter, prune(trainable))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(adapter))
    assert [leaf["path"] for leaf in meta["leaves"]] == jt.paths(prune(trainable))
    assert sorted(meta["base_fingerprint"]) == sorted(jt.fingerprint(frozen))


def test_round_trip_of_integer_and_mixed_dtypes(tmp_path):
    adapter = {
        "int8": np.arange(-128, 128, dtype=np.int8).reshape(16, 16),
        "int32": jnp.arange(-5, 5, dtype=jnp.int32),
        "uint8_codes": np.random.default_rng(0).integers(0, 256, (7, 9), dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": jnp.asarray(3.5, jnp.bfloat16),
        "nested": {"f32": jnp.linspace(-1, 1, 5), "f64_numpy_int32": np.int32(7)},
    }
    adapter_back, _ = restore_adapter(save_adapter(tmp_path / "ckpt", adapter))
    assert_bit_identical(adapter_back, prune(adapter))


def test_round_trip_keeps_int_keys_and_zero_size_leaves(tmp_path):
    # Lists become dicts keyed by int index (as NNX pure dicts are); orbax itself would return
    # the string "0", and it refuses to store a zero-size array, so both go through metadata.
    layers = [{"lora_a": jnp.ones((2, 3))}, None, {"lora_a": jnp.full((2, 3), 2.0)}]
    adapter = {"layers": layers, "empty": jnp.zeros((0, 4))}
    back, meta = restore_adapter(save_adapter(tmp_path / "ckpt", adapter))
    assert set(back["layers"]) == {0, 2}
    assert back["empty"].shape == (0, 4)
    assert_bit_identical(back, {"empty": jnp.zeros((0, 4)), "layers": {0: layers[0], 2: layers[2]}})
    assert meta["leaves"][0]["array"] is None  # the empty leaf: shape and dtype only


def test_keys_with_dots_do_not_collide(tmp_path):
    # orbax names stored arrays by joining keys with ".": {"a.b"} and {"a": {"b"}} would share a name.
    adapter = {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}
    back, _ = restore_adapter(save_adapter(tmp_path / "ckpt", adapter))
    assert_bit_identical(back, adapter)


def test_64_bit_leaf_is_not_truncated_without_x64(tmp_path):
    adapter = {"step": np.asarray([2**40 + 1], np.int64)}
    back, _ = restore_adapter(save_adapter(tmp_path / "ckpt", adapter))
    assert back["step"].dtype == np.int64 and int(back["step"][0]) == 2**40 + 1


@pytest.mark.parametrize("use_jit", [False, True])
def test_restored_adapter_computes_like_the_saved_one(tmp_path, use_jit):
    params = linen_like_params()
    trainable, frozen = jt.partition(params, LORA)
    path = save_adapter(tmp_path / "ckpt", trainable)
    adapter, _ = restore_adapter(path)

    def lora_out(p, x):
        q = p["layers_1"]["attn"]["query"]
        return x @ q["kernel"] + (x @ q["lora_a"]) @ q["lora_b"]

    f = jax.jit(lora_out) if use_jit else lora_out
    x = jnp.arange(16.0).reshape(2, 8)
    np.testing.assert_array_equal(f(insert(frozen, adapter), x), f(params, x))  # same bits in, same bits out


def test_saving_a_tracer_raises(tmp_path):
    @jax.jit
    def inside(a):
        save_adapter(tmp_path / "ckpt", {"a": a})
        return a

    with pytest.raises(TypeError, match="tracer"):
        inside(jnp.ones(2))


# ------------------------------------------------------------------------------------------
# Fingerprint and config checks
# ------------------------------------------------------------------------------------------


def test_matching_base_passes_in_every_form(tmp_path):
    params = linen_like_params()
    trainable, frozen = jt.partition(params, LORA)
    pristine = pristine_base(params)
    path = save_adapter(tmp_path / "ckpt", trainable, base=params)
    for base in (params, frozen, pristine):
        restore_adapter(path, base=base)


def test_base_with_other_shapes_raises_naming_paths(tmp_path):
    params = linen_like_params()
    trainable, frozen = jt.partition(params, LORA)
    path = save_adapter(tmp_path / "ckpt", trainable, base=frozen)

    other = jax.tree.map(lambda x: x, params)
    other["layers_1"]["mlp"]["kernel"] = jnp.zeros((8, 32))
    other["head"]["bias"] = jnp.zeros((3,), jnp.bfloat16)
    del other["embed"]
    other["extra"] = {"kernel": jnp.zeros((2, 2))}
    with pytest.raises(CheckpointMismatchError) as info:
        restore_adapter(path, base=other)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "layers_1/mlp/kernel: saved (8, 16) float32, given (8, 32) float32" in msg
    assert "head/bias: saved (3,) float32, given (3,) bfloat16" in msg
    assert "embed/embedding" in msg and "missing" in msg
    assert "extra/kernel" in msg and "not in the saved base" in msg


def test_base_whose_adapter_leaves_have_other_shapes_raises(tmp_path):
    params = linen_like_params()
    trainable, frozen = jt.partition(params, LORA)
    path = save_adapter(tmp_path / "ckpt", trainable, base=frozen)
    rank4 = jax.tree.map(lambda x: x, params)
    rank4["layers_0"]["attn"]["value"]["lora_a"] = jnp.zeros((8, 4))
    with pytest.raises(CheckpointMismatchError, match=r"layers_0/attn/value/lora_a \(adapter leaf\)"):
        restore_adapter(path, base=rank4)


def test_mismatch_list_is_capped(tmp_path):
    base = {f"w{i:02d}": jnp.zeros((2,)) for i in range(30)}
    path = save_adapter(tmp_path / "ckpt", {"lora": jnp.ones(2)}, base=base)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)30 leaves differ.*\.\.\. and 10 more") as info:
        restore_adapter(path, base={k: jnp.zeros((3,)) for k in base})
    assert str(info.value).count("saved (2,) float32") == 20


def test_base_check_needs_a_saved_fingerprint(tmp_path):
    path = save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)})
    with pytest.raises(CheckpointMismatchError, match="saved without base"):
        restore_adapter(path, base={"w": jnp.ones(2)})


def test_config_mismatch_names_the_keys(tmp_path):
    config = {"method": "lora", "rank": 8, "alpha": 16.0, "targets": ("query", "value")}
    config["init"] = {"b": "zeros"}
    path = save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)}, config=config)
    restore_adapter(path, config={**config, "targets": ["query", "value"]})  # tuple == list in JSON
    with pytest.raises(CheckpointMismatchError) as info:
        restore_adapter(path, config={**config, "rank": 4, "init": {"b": "normal"}, "dropout": 0.1})
    msg = str(info.value)
    assert "rank: saved 8, given 4" in msg
    assert "init.b: saved 'zeros', given 'normal'" in msg
    assert "dropout: not saved, given 0.1" in msg
    assert "alpha" not in msg


def test_config_must_be_json_data(tmp_path):
    with pytest.raises(TypeError, match="init.fn"):
        save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)}, config={"init": {"fn": jnp.zeros}})
    with pytest.raises(ValueError, match="alpha"):
        save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)}, config={"alpha": float("nan")})
    assert not (tmp_path / "ckpt").exists()


# ------------------------------------------------------------------------------------------
# Existing directories and atomicity
# ------------------------------------------------------------------------------------------


def test_refuses_existing_directory_without_overwrite(tmp_path):
    path = save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(path, {"a": jnp.zeros(2)})
    np.testing.assert_array_equal(restore_adapter(path)[0]["a"], jnp.ones(2))


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path):
    path = save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)}, config={"rank": 1})
    save_adapter(path, {"b": jnp.full((3,), 7.0)}, config={"rank": 2}, overwrite=True)
    adapter, meta = restore_adapter(path)
    assert list(adapter) == ["b"] and meta["config"] == {"rank": 2}
    assert hidden_siblings(path) == []


def test_overwrite_refuses_a_directory_of_other_files(tmp_path):
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a jaxpeft adapter checkpoint"):
        save_adapter(precious, {"a": jnp.ones(2)}, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_adapter(tmp_path / "file", {"a": jnp.ones(2)}, overwrite=True)


def _fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("stage", ["write_arrays", "verify", "rename_in"])
def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch, stage):
    path = save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)}, config={"version": "old"})
    if stage == "rename_in":  # fail when the new checkpoint is moved in, after the old one moved aside
        real_rename = os.rename

        def rename(src, dst):
            if atomic.TMP_TAG in os.fspath(src):
                _fail()
            return real_rename(src, dst)

        monkeypatch.setattr(os, "rename", rename)
    elif stage == "write_arrays":
        monkeypatch.setattr(arrays, "write_arrays", _fail)
    else:
        monkeypatch.setattr(api, "_verify", _fail)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(path, {"a": jnp.zeros(2)}, config={"version": "new"}, overwrite=True)
    monkeypatch.undo()
    adapter, meta = restore_adapter(path)
    assert meta["config"] == {"version": "old"}
    np.testing.assert_array_equal(adapter["a"], jnp.ones(2))
    assert hidden_siblings(path) == []


def test_failed_first_save_leaves_no_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "_verify", _fail)
    with pytest.raises(OSError):
        save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)})
    assert list(tmp_path.iterdir()) == []


def _interrupt_overwrite(tmp_path):
    """The state a kill between an overwrite's two renames leaves: only the old copy, aside."""
    path = save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)}, config={"version": "old"})
    aside = tmp_path / f".ckpt{atomic.OLD_TAG}0123"
    os.rename(path, aside)
    return path, aside


@pytest.mark.parametrize("reader", [restore_adapter, load_metadata])
def test_interrupted_overwrite_is_recovered_by_the_next_read(tmp_path, reader):
    path, aside = _interrupt_overwrite(tmp_path)
    with pytest.warns(CheckpointRecoveredWarning, match=f"recovered .*{path}.* from {aside.name}"):
        reader(path)
    adapter, meta = restore_adapter(path)
    assert meta["config"] == {"version": "old"}
    np.testing.assert_array_equal(adapter["a"], np.ones(2))
    assert hidden_siblings(path) == []


def test_interrupted_overwrite_is_recovered_by_the_next_save(tmp_path):
    path, aside = _interrupt_overwrite(tmp_path)
    with pytest.warns(CheckpointRecoveredWarning), pytest.raises(FileExistsError, match="already exists"):
        save_adapter(path, {"a": jnp.zeros(2)})  # the recovered checkpoint exists: not replaced silently
    assert restore_adapter(path)[1]["config"] == {"version": "old"}
    os.rename(path, aside)
    with pytest.warns(CheckpointRecoveredWarning):
        save_adapter(path, {"a": jnp.zeros(2)}, config={"version": "new"}, overwrite=True)
    assert restore_adapter(path)[1]["config"] == {"version": "new"}
    assert hidden_siblings(path) == []


def test_half_deleted_old_copy_is_not_recovered(tmp_path):
    path, aside = _interrupt_overwrite(tmp_path)
    (aside / ckpt.METADATA_FILE).unlink()  # discard() deletes the metadata first
    with pytest.raises(CheckpointError, match="not a directory"):
        restore_adapter(path)
    assert not path.exists()


def test_bad_adapter_raises_before_writing(tmp_path):
    with pytest.raises(TypeError, match="layer/scale"):
        save_adapter(tmp_path / "ckpt", {"layer": {"scale": 2.0}})
    with pytest.raises(ValueError, match="no array leaf"):
        save_adapter(tmp_path / "ckpt", jt.partition({"w": jnp.ones(2)}, False)[0])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# Corruption and bad directories
# ------------------------------------------------------------------------------------------


def _corruptible_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    # Random float32 does not compress, so "big" gets its own, largest, raw data file.
    big = rng.standard_normal((64, 64)).astype(np.float32)
    adapter = {"big": big, "small": {"codes": np.arange(4, dtype=np.int32)}}
    path = save_adapter(tmp_path / "ckpt", adapter)
    files = [f for f in (path / ckpt.ARRAYS_DIR).rglob("*") if f.is_file()]
    return path, max(files, key=lambda f: f.stat().st_size)


def _forge_metadata(path):
    """Make the metadata agree with the (damaged) files again, so the checks behind the file
    digests are reached: the per-leaf sha256 / sum64 and orbax's own read."""
    file = path / ckpt.METADATA_FILE
    meta = json.loads(file.read_text())
    meta["files"] = integrity.file_digests(path / ckpt.ARRAYS_DIR)
    meta["metadata_sha256"] = metadata_digest(meta)
    file.write_text(json.dumps(meta))


def _flip_middle_byte(file):
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    file.write_bytes(bytes(raw))


def test_flipped_byte_in_data_file_is_refused_before_orbax_reads(tmp_path, monkeypatch):
    path, data_file = _corruptible_checkpoint(tmp_path)
    _flip_middle_byte(data_file)
    name = data_file.relative_to(path).as_posix()
    monkeypatch.setattr(arrays, "_read_arrays", _fail)  # orbax must not even be asked
    expected = rf"1 of \d+ array files .*nothing was read:\n  {name}: sha256 differs"
    with pytest.raises(CheckpointCorruptError, match=expected):
        restore_adapter(path)


def test_flipped_byte_behind_forged_file_digests_fails_the_leaf_checksum(tmp_path):
    path, data_file = _corruptible_checkpoint(tmp_path)
    _flip_middle_byte(data_file)
    _forge_metadata(path)
    with pytest.raises(CheckpointCorruptError, match=r"big: sha256") as info:
        restore_adapter(path)
    assert "small" not in str(info.value)


@pytest.mark.parametrize("cut", [1, "half"])
def test_truncated_data_file_says_by_how_much(tmp_path, cut):
    path, data_file = _corruptible_checkpoint(tmp_path)
    size = data_file.stat().st_size
    keep = size - 1 if cut == 1 else size // 2
    data_file.write_bytes(data_file.read_bytes()[:keep])
    name = data_file.relative_to(path).as_posix()
    expected = rf"{name}: {keep} bytes, saved {size} \(truncated by {size - keep}\)"
    with pytest.raises(CheckpointCorruptError, match=expected):
        restore_adapter(path)


def test_truncated_data_file_behind_forged_digests_names_the_leaf(tmp_path):
    path, data_file = _corruptible_checkpoint(tmp_path)
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    _forge_metadata(path)
    with pytest.raises(CheckpointCorruptError, match=r"unreadable leaves: big"):
        restore_adapter(path)


def test_deleted_or_grown_array_file_is_refused(tmp_path):
    path, data_file = _corruptible_checkpoint(tmp_path)
    name = data_file.relative_to(path).as_posix()
    with open(data_file, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CheckpointCorruptError, match=rf"{name}: \d+ bytes, saved \d+ \(grown by 1\)"):
        restore_adapter(path)
    data_file.unlink()
    with pytest.raises(CheckpointCorruptError, match=rf"{name}: missing"):
        restore_adapter(path)


@pytest.mark.parametrize("damage", ["flip one byte", "drop the last byte", "delete"])
def test_damage_to_any_array_file_is_refused_before_orbax_reads(tmp_path, monkeypatch, damage):
    # Every file orbax wrote, its metadata and manifests included: before the file digests, a
    # damaged manifest surfaced as an orbax traceback and a one-byte truncation restored.
    path, _ = _corruptible_checkpoint(tmp_path)
    files = sorted(f for f in (path / ckpt.ARRAYS_DIR).rglob("*") if f.is_file())
    monkeypatch.setattr(arrays, "_read_arrays", _fail)  # orbax must not be asked
    for file in files:
        raw = file.read_bytes()
        if damage == "delete":
            file.unlink()
        elif damage == "flip one byte":
            file.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
        else:
            file.write_bytes(raw[:-1])
        what = {"delete": "missing", "flip one byte": "sha256 differs", "drop the last byte": "truncated by 1"}[damage]
        with pytest.raises(CheckpointCorruptError, match=re.escape(f"{file.relative_to(path).as_posix()}: ") + ".*" + what):
            restore_adapter(path)
        file.write_bytes(raw)
    monkeypatch.undo()
    assert restore_adapter(path)[0]["big"].shape == (64, 64)  # everything put back: restores again


def test_missing_arrays_directory_is_refused(tmp_path):
    path, _ = _corruptible_checkpoint(tmp_path)
    shutil.rmtree(path / ckpt.ARRAYS_DIR)
    with pytest.raises(CheckpointCorruptError, match=r"arrays/ is missing \(2 stored leaves expected\)"):
        restore_adapter(path)


def test_edited_metadata_is_refused_by_its_digest(tmp_path):
    path = save_adapter(tmp_path / "ckpt", linen_like_params(), config={"rank": 2})
    file = path / ckpt.METADATA_FILE
    meta = json.loads(file.read_text())
    file.write_text(json.dumps({**meta, "config": {"rank": 3}}))  # valid JSON, valid schema, another config
    with pytest.raises(CheckpointCorruptError, match="does not match its metadata_sha256"):
        load_metadata(path)


def test_wrong_checksum_in_metadata_names_the_leaf(tmp_path):
    path = save_adapter(tmp_path / "ckpt", linen_like_params())
    file = path / ckpt.METADATA_FILE
    meta = json.loads(file.read_text())
    meta["leaves"][3]["sha256"] = "0" * 64
    file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointCorruptError, match="metadata_sha256"):
        restore_adapter(path)
    meta["metadata_sha256"] = metadata_digest(meta)  # a consistent, wrong metadata file
    file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointCorruptError, match=meta["leaves"][3]["path"] + ": sha256"):
        restore_adapter(path)


def test_checkpoint_without_file_digests_still_restores_and_checks_leaves(tmp_path):
    # Checkpoints written before the file digests existed have neither "files" nor "metadata_sha256".
    path, data_file = _corruptible_checkpoint(tmp_path)
    file = path / ckpt.METADATA_FILE
    meta = json.loads(file.read_text())
    del meta["files"], meta["metadata_sha256"]
    file.write_text(json.dumps(meta))
    adapter, _ = restore_adapter(path)
    assert adapter["big"].shape == (64, 64)
    _flip_middle_byte(data_file)
    with pytest.raises(CheckpointCorruptError, match=r"big: sha256"):
        restore_adapter(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        restore_adapter(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'empty'}.*no {ckpt.METADATA_FILE}"):
        load_metadata(tmp_path / "empty")


def test_unknown_format_version(tmp_path):
    path = save_adapter(tmp_path / "ckpt", {"a": jnp.ones(2)})
    file = path / ckpt.METADATA_FILE
    meta = json.loads(file.read_text())
    file.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99.*expected 1.*newer jaxpeft"):
        restore_adapter(path)
    file.write_text("{not json")
    with pytest.raises(CheckpointCorruptError, match="not valid JSON"):
        load_metadata(path)


def test_load_metadata_describes_the_leaves(tmp_path):
    adapter = {"w": {"lora_a": jnp.ones((4, 2), jnp.bfloat16)}}
    path = save_adapter(tmp_path / "ckpt", adapter, config={"rank": 2})
    meta = load_metadata(path)
    assert meta["format_version"] == ckpt.FORMAT_VERSION and meta["config"] == {"rank": 2}
    (leaf,) = meta["leaves"]
    assert leaf["path"] == "w/lora_a" and leaf["keys"] == ["w", "lora_a"]
    assert leaf["shape"] == [4, 2] and leaf["dtype"] == "bfloat16" and len(leaf["sha256"]) == 64
    assert meta["num_bytes"] == 16


# ------------------------------------------------------------------------------------------
# insert
# ------------------------------------------------------------------------------------------


def test_insert_restores_the_full_tree_from_holes_or_pristine_base(tmp_path):
    params = linen_like_params()
    trainable, frozen = jt.partition(params, LORA)
    adapter, _ = restore_adapter(save_adapter(tmp_path / "ckpt", trainable))
    frozen_before = jax.tree.map(lambda x: x, frozen)

    assert_bit_identical(insert(frozen, adapter), params)
    assert jax.tree.structure(frozen) == jax.tree.structure(frozen_before)  # not mutated
    assert frozen["layers_0"]["attn"]["query"]["lora_a"] is None

    assert_bit_identical(insert(pristine_base(params), adapter), params)
    assert_bit_identical(insert(frozen, trainable), params)  # None in the adapter keeps params


def test_insert_keeps_container_types_and_checks_shapes():
    layers = [{"bias": jnp.zeros(3)}, {"bias": jnp.zeros(3)}]
    params = FrozenDict({"layers": layers, "head": {"kernel": jnp.ones((2, 2))}})
    out = insert(params, {"layers": {1: {"bias": jnp.ones(3)}}})
    assert isinstance(out, FrozenDict) and isinstance(out["layers"], list)
    np.testing.assert_array_equal(out["layers"][1]["bias"], jnp.ones(3))
    assert out["layers"][0]["bias"] is params["layers"][0]["bias"]
    with pytest.raises(ValueError, match=r"head/kernel.*\(3, 3\).*\(2, 2\)"):
        insert(params, {"head": {"kernel": jnp.ones((3, 3))}})
    with pytest.raises(ValueError, match="head.*would replace a .* subtree"):
        insert(params, {"head": jnp.ones(2)})
    with pytest.raises(ValueError, match="out of range"):
        insert(params, {"layers": {5: {"bias": jnp.ones(3)}}})


# ------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------


class LoRAParam(nnx.Param):
    pass


class LoRALinear(nnx.Module):
    def __init__(self, d_in, d_out, rank, rngs):
        self.base = nnx.Linear(d_in, d_out, rngs=rngs)
        self.lora_a = LoRAParam(jax.random.normal(rngs.params(), (d_in, rank)))
        self.lora_b = LoRAParam(jax.random.normal(rngs.params(), (rank, d_out)))

    def __call__(self, x):
        return self.base(x) + (x @ self.lora_a[...]) @ self.lora_b[...]


class TinyNNX(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([LoRALinear(4, 4, 2, rngs) for _ in range(2)])
        self.head = LoRALinear(4, 3, 2, rngs)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_nnx_state_round_trip_with_update(tmp_path):
    trained = TinyNNX(nnx.Rngs(0))
    fresh = TinyNNX(nnx.Rngs(0))
    for block in [*trained.blocks, trained.head]:  # "training" moved the LoRA params only
        block.lora_b[...] = block.lora_b[...] * 3.0 + 1.0
    x = jnp.ones((2, 4))
    assert not np.allclose(fresh(x), trained(x))

    adapter_state = nnx.state(trained, LoRAParam)
    base_state = nnx.state(trained, nnx.Not(LoRAParam))
    path = save_adapter(tmp_path / "ckpt", adapter_state, config={"rank": 2}, base=base_state)
    adapter, _ = restore_adapter(path, base=fresh)  # a whole NNX model works as a base too
    assert set(adapter["blocks"]) == {0, 1}  # int keys, as nnx.update needs
    nnx.update(fresh, adapter)

    np.testing.assert_array_equal(fresh(x), trained(x))
    assert_bit_identical(nnx.to_pure_dict(nnx.state(fresh, LoRAParam)), nnx.to_pure_dict(adapter_state))


def test_nnx_base_of_other_shape_is_refused(tmp_path):
    model = TinyNNX(nnx.Rngs(0))
    path = save_adapter(tmp_path / "ckpt", nnx.state(model, LoRAParam), base=model)

    class Wider(TinyNNX):
        def __init__(self, rngs):
            super().__init__(rngs)
            self.head = LoRALinear(4, 5, 2, rngs)

    expected = r"head/base/kernel: saved \(4, 3\) float32, given \(4, 5\)"
    with pytest.raises(CheckpointMismatchError, match=expected):
        restore_adapter(path, base=Wider(nnx.Rngs(0)))


def test_plain_dict_of_nnx_variables_is_saved_by_value(tmp_path):
    # Newer NNX hands out plain dicts of Variables instead of State; those are unwrapped too.
    model = TinyNNX(nnx.Rngs(1))
    variables = {"head": {"lora_a": model.head.lora_a, "lora_b": model.head.lora_b}}
    adapter, _ = restore_adapter(save_adapter(tmp_path / "ckpt", variables))
    expected = {"head": {"lora_a": model.head.lora_a[...], "lora_b": model.head.lora_b[...]}}
    assert_bit_identical(adapter, expected)


def test_directory_created_during_save_is_not_replaced(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    real_verify = api._verify

    def verify_then_race(directory, meta, *args):
        real_verify(directory, meta, *args)
        target.mkdir()
        (target / "theirs.txt").write_text("someone else's")

    monkeypatch.setattr(api, "_verify", verify_then_race)
    with pytest.raises(FileExistsError, match="appeared while saving"):
        save_adapter(target, {"a": jnp.ones(2)})
    assert (target / "theirs.txt").read_text() == "someone else's"
    assert hidden_siblings(target) == []
