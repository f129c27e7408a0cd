"""Tests for jaxpeft.quant against independent references.

References used here, none of them taken from the code under test:
  * the NF4 and FP4 tables as published by QLoRA / bitsandbytes, typed in below;
  * a NumPy nibble packer written from the documented layout (even row -> high nibble);
  * a brute-force NumPy quantizer (argmin over the published table) for nearest-code checks;
  * invariants (pack/unpack identity, slicing commutes with quantization, bits from nbytes).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxpeft.quant as jq
from jaxpeft.quant import _packing
from jaxpeft.tree import SelectorError

# QLoRA (arXiv:2305.14314) appendix E / bitsandbytes functional.py, float32 as published.
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]
# bitsandbytes get_4bit_type("fp4") before normalisation by its max, 12.
PUBLISHED_FP4_UNNORMALISED = [
    0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0
]
# Symmetric int4 as documented: code c stands for (c - 8) / 7.
REFERENCE_INT4 = [(c - 8) / 7 for c in range(16)]

REFERENCE = {
    "nf4": np.array(PUBLISHED_NF4, np.float32),
    "fp4": np.array(PUBLISHED_FP4_UNNORMALISED, np.float32) / np.float32(12),
    "int4": np.array(REFERENCE_INT4, np.float32),
}


def np_pack(codes: np.ndarray) -> np.ndarray:
    """Reference packer: byte i of a column = code[2i] << 4 | code[2i+1]; odd n padded with pad."""
    n = codes.shape[0]
    out = np.zeros(((n + 1) // 2, *codes.shape[1:]), np.uint8)
    for i in range(n):
        shift = 4 if i % 2 == 0 else 0
        out[i // 2] |= (codes[i].astype(np.uint8) & 0xF) << shift
    return out


def np_unpack(packed: np.ndarray, n: int) -> np.ndarray:
    rows = []
    for i in range(n):
        rows.append((packed[i // 2] >> 4) & 0xF if i % 2 == 0 else packed[i // 2] & 0xF)
    return np.stack(rows).astype(np.uint8)


def np_quantize_dequantize(w: np.ndarray, table: np.ndarray, block: int) -> np.ndarray:
    """Brute force: per block of rows, absmax; nearest table value by argmin; times absmax."""
    w = np.asarray(w, np.float32)
    out = np.empty_like(w)
    for start in range(0, w.shape[0], block):
        b = w[start : start + block]
        absmax = np.max(np.abs(b), axis=0)
        normed = b / np.where(absmax == 0, np.float32(1), absmax)
        idx = np.argmin(np.abs(normed[..., None] - table), axis=-1)
        out[start : start + block] = table[idx] * absmax
    return out


def maybe_jit(fn, use_jit, **static):
    if not use_jit:
        return lambda *a: fn(*a, **static)
    return jax.jit(lambda *a: fn(*a, **static))


# ----------------------------------------------------------------------------- codebooks


def test_nf4_table_is_the_published_one_to_the_last_digit():
    assert jq.NF4_VALUES.dtype == np.float32
    assert jq.NF4_VALUES.tolist() == np.array(PUBLISHED_NF4, np.float32).tolist()


def test_fp4_and_int4_tables_match_their_references():
    np.testing.assert_array_equal(jq.FP4_VALUES, REFERENCE["fp4"])
    np.testing.assert_array_equal(jq.INT4_VALUES, REFERENCE["int4"])


def test_dynamic_map_is_sorted_signed_and_has_zero_and_one():
    m = np.asarray(jq.DYNAMIC_MAP)
    assert m.shape == (256,) and np.all(np.diff(m) > 0)
    assert m[0] > -1.0 and m[-1] == 1.0 and 0.0 in m


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int4"])
def test_each_code_dequantizes_to_table_value_times_block_scale(scheme, use_jit):
    # Hand-built QuantizedArray: rows 0..15 hold codes 0..15 in every column, packed by the
    # reference packer; two blocks of 16 rows with distinct per-column scales.
    codes = np.tile(np.arange(16, dtype=np.uint8)[:, None], (2, 3))  # [32, 3]
    scales = np.array([[0.5, 2.0, 3.25], [1.5, 0.125, 7.0]], np.float32)  # [2, 3]
    q = jq.QuantizedArray(
        packed=jnp.asarray(np_pack(codes)),
        scales=jnp.asarray(scales),
        shape=(32, 3),
        dtype=np.dtype(np.float32),
        scheme=scheme,
        block_size=16,
    )
    got = np.asarray(maybe_jit(jq.dequantize_array, use_jit)(q))
    expected = REFERENCE[scheme][codes] * np.repeat(scales, 16, axis=0)
    np.testing.assert_array_equal(got, expected)  # exact: one float32 product each


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("shape", [(64, 8), (37, 3, 5)])
def test_codebook_values_times_scale_quantize_losslessly(scheme, shape):
    rng = np.random.default_rng(0)
    table = REFERENCE[scheme]
    usable = np.flatnonzero(table != -8 / 7)  # int4's code 0 is outside the symmetric range
    codes = rng.choice(usable, size=shape)
    block = 16
    codes[::block] = int(np.argmax(table))  # each block holds a +1.0, so absmax == scale
    scale = rng.uniform(0.01, 5.0, size=(math.ceil(shape[0] / block), *shape[1:])).astype(np.float32)
    w = table[codes] * np.repeat(scale, block, axis=0)[: shape[0]]
    q = jq.quantize_array(jnp.asarray(w), scheme=scheme, block_size=block)
    np.testing.assert_array_equal(np.asarray(jq.dequantize_array(q)), w)
    np.testing.assert_array_equal(np.asarray(q.scales), scale)
    # The codes themselves are the ones we chose (FP4's -0 and +0 both decode to 0).
    got_codes = np_unpack(np.asarray(q.packed), shape[0])
    np.testing.assert_array_equal(table[got_codes], table[codes])


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int4"])
def test_quantization_picks_the_nearest_code_like_a_brute_force_reference(scheme):
    w = np.random.default_rng(1).standard_normal((200, 24)).astype(np.float32)
    q = jq.quantize_array(jnp.asarray(w), scheme=scheme, block_size=64)
    expected = np_quantize_dequantize(w, REFERENCE[scheme], 64)
    np.testing.assert_array_equal(np.asarray(jq.dequantize_array(q)), expected)


def test_nf4_beats_int4_and_fp4_on_normal_weights():
    # The QLoRA claim: NF4 is information-theoretically better suited to N(0, 1) weights.
    w = jax.random.normal(jax.random.key(0), (1024, 256))
    mse = {
        s: float(jnp.mean((jq.dequantize_array(jq.quantize_array(w, scheme=s, block_size=64)) - w) ** 2))
        for s in ("nf4", "int4", "fp4")
    }
    assert mse["nf4"] < mse["int4"] and mse["nf4"] < mse["fp4"], mse


# ----------------------------------------------------------------------------- packing


# Each new shape compiles once (the round trip is jitted as one program); shapes are kept small
# so that the hypothesis tests stay within a few seconds.
@jax.jit
def _pack(codes):
    return _packing.pack_nibbles(codes)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_then_unpack_is_identity(shape, seed):
    codes = np.random.default_rng(seed).integers(0, 16, size=shape, dtype=np.uint8)
    packed = _pack(jnp.asarray(codes))
    assert packed.dtype == jnp.uint8 and packed.shape == (math.ceil(shape[0] / 2), *shape[1:])
    np.testing.assert_array_equal(np.asarray(packed), np_pack(codes))  # the documented layout
    unpacked = jax.jit(_packing.unpack_nibbles, static_argnums=1)(packed, shape[0])
    np.testing.assert_array_equal(np.asarray(unpacked), codes)


@settings(max_examples=12, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    block=st.sampled_from([2, 4, 6, 64]),
    scheme=st.sampled_from(["nf4", "fp4", "int4"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_any_shape_matches_reference(shape, block, scheme, seed):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    q = jq.quantize_array(jnp.asarray(w), scheme=scheme, block_size=block)
    assert q.packed.shape == (math.ceil(shape[0] / 2), *shape[1:])
    assert q.scales.shape == (math.ceil(shape[0] / block), *shape[1:])
    back = jax.jit(jq.dequantize_array)(q)
    np.testing.assert_array_equal(np.asarray(back), np_quantize_dequantize(w, REFERENCE[scheme], block))


@pytest.mark.parametrize(
    "shape,scheme",
    [((65, 7), s) for s in jq.SCHEMES] + [((1, 5), "nf4"), ((129, 3, 16), "nf4"), ((129, 3, 16), "int8")],
)
def test_odd_and_3d_shapes_round_trip_with_documented_shapes(shape, scheme):
    w = jax.random.normal(jax.random.key(3), shape)
    q = jq.quantize_array(w, scheme=scheme, block_size=64, double_quant=True)
    single = jq.quantize_array(w, scheme=scheme, block_size=64)
    rows = shape[0] if scheme == "int8" else math.ceil(shape[0] / 2)
    assert q.packed.shape == (rows, *shape[1:])
    assert q.scales.shape == (math.ceil(shape[0] / 64), *shape[1:])
    assert q.scale_scales.shape == (math.ceil(shape[0] / 64), math.ceil(math.prod(shape[1:]) / 256))
    assert q.shape == shape and q.dtype == jnp.float32 and q.num_params == math.prod(shape)
    assert jq.dequantize_array(q).shape == shape
    # Without double quant: |error| <= half the widest gap of the codebook times the block absmax.
    table = REFERENCE.get(scheme, np.linspace(-1, 1, 255))  # int8: steps of 1/127
    half_gap = np.max(np.diff(np.unique(table))) / 2
    absmax = np.max(np.abs(np.asarray(w)[:64]), axis=0)  # first block
    err = np.abs(np.asarray(jq.dequantize_array(single) - w))[:64]
    assert np.all(err <= half_gap * absmax * (1 + 1e-6))


def test_double_quant_scales_are_close_to_the_exact_absmax():
    w = np.random.default_rng(2).standard_normal((640, 300)).astype(np.float32)
    absmax = np.abs(w.reshape(10, 64, 300)).max(axis=1)  # [blocks, out]
    q = jq.quantize_array(jnp.asarray(w), double_quant=True)
    assert q.scales.dtype == jnp.uint8 and q.scale_scales.shape == (10, 2) and q.scale_offset.shape == ()
    np.testing.assert_allclose(float(q.scale_offset), absmax.mean(), rtol=1e-5)  # QLoRA: mean offset
    # 8-bit dynamic map on the centred scales: error well below 1% of the scale.
    np.testing.assert_allclose(np.asarray(jq._array._dequantize_scales(q)), absmax, rtol=1e-2)
    mse_dq = float(np.mean((np.asarray(jq.dequantize_array(q)) - w) ** 2))
    mse = float(np.mean((np.asarray(jq.dequantize_array(jq.quantize_array(jnp.asarray(w)))) - w) ** 2))
    assert mse_dq < 1.01 * mse


def test_padding_nibble_encodes_zero():
    w = jnp.ones((3, 2))
    for scheme, zero_code in (("nf4", 7), ("int4", 8), ("fp4", 0)):
        packed = np.asarray(jq.quantize_array(w, scheme=scheme).packed)
        np.testing.assert_array_equal(packed[1] & 0xF, zero_code)


def test_slicing_commutes_with_quantization_so_shards_hold_whole_bytes():
    # A shard of the input axis (at block boundaries) or of the output axis is itself the
    # quantization of the matching shard of the weight: no byte or block is split.
    w = jax.random.normal(jax.random.key(4), (256, 12))
    q = jq.quantize_array(w, block_size=64)
    rows = jq.quantize_array(w[128:192], block_size=64)
    np.testing.assert_array_equal(q.packed[64:96], rows.packed)
    np.testing.assert_array_equal(q.scales[2:3], rows.scales)
    cols = jq.quantize_array(w[:, 4:8], block_size=64)
    np.testing.assert_array_equal(q.packed[:, 4:8], cols.packed)
    np.testing.assert_array_equal(q.scales[:, 4:8], cols.scales)


def test_packed_bytes_are_the_bitsandbytes_stream_of_the_torch_layout():
    # torch stores [out, in] row-major; bnb packs consecutive elements high nibble first.
    w = jax.random.normal(jax.random.key(5), (128, 6))  # Flax [in, out]
    q = jq.quantize_array(w)
    codes_torch_order = np_unpack(np.asarray(q.packed), 128).T.reshape(-1)  # [out * in]
    stream = (codes_torch_order[0::2] << 4) | codes_torch_order[1::2]
    np.testing.assert_array_equal(np.asarray(q.packed).T.reshape(-1), stream)


# ----------------------------------------------------------------------------- sizes


def _children_bits(q) -> int:
    return sum(int(x.nbytes) for x in jax.tree.leaves(q)) * 8


def test_double_quant_bits_per_param_on_4096_square_kernel():
    w = jax.random.normal(jax.random.key(6), (4096, 4096), jnp.bfloat16)
    q = jq.quantize_array(w, scheme="nf4", block_size=64, double_quant=True)
    bits = _children_bits(q) / (4096 * 4096)
    assert q.bits_per_param == pytest.approx(bits)
    assert q.nbytes * 8 == _children_bits(q)
    assert bits <= 4.13
    assert q.dtype == jnp.bfloat16 and jq.dequantize_array(q).dtype == jnp.bfloat16
    single = jq.quantize_array(w, block_size=64)
    assert _children_bits(single) / (4096 * 4096) == 4.5  # 4 + 32 / 64


# ----------------------------------------------------------------------------- pytree


def test_quantized_array_is_a_pytree_with_keyed_children():
    q = jq.quantize_array(jnp.ones((8, 4)), double_quant=True)
    flat, treedef = jax.tree_util.tree_flatten_with_path({"dense": {"kernel": q}})
    from jaxpeft.tree import path_to_str

    assert [path_to_str(p) for p, _ in flat] == [
        "dense/kernel/packed",
        "dense/kernel/scales",
        "dense/kernel/scale_scales",
        "dense/kernel/scale_offset",
    ]
    back = jax.tree_util.tree_unflatten(treedef, [x for _, x in flat])["dense"]["kernel"]
    assert isinstance(back, jq.QuantizedArray) and back.shape == (8, 4) and back.scheme == "nf4"
    mapped = jax.tree.map(lambda x: x, q)
    assert isinstance(mapped, jq.QuantizedArray) and mapped.block_size == 64
    no_dq = jq.quantize_array(jnp.ones((8, 4)))
    assert [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(no_dq)[0]] == ["packed", "scales"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantized_array_as_jit_argument_and_quantize_under_jit(dtype):
    w = jax.random.normal(jax.random.key(7), (96, 10))
    eager = jq.quantize_array(w, double_quant=True)
    traced = jax.jit(lambda w: jq.quantize_array(w, double_quant=True))(w)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced)):
        np.testing.assert_array_equal(a, b)
    out = jax.jit(lambda q: jq.dequantize_array(q, dtype))(eager)
    assert out.dtype == dtype
    # Same values with and without jit, to the rounding of the result dtype: under jit XLA may
    # fuse the double-quant scale reconstruction into a fused multiply-add.
    rtol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
    eager_out = jq.dequantize_array(eager, dtype)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(eager_out, np.float32), rtol=rtol)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_qmatmul_and_einsum_match_dense_numpy(use_jit, dtype, rtol):
    w = jax.random.normal(jax.random.key(8), (64, 4, 8))  # DenseGeneral [d_in, heads, head_dim]
    x = jax.random.normal(jax.random.key(9), (2, 5, 64))
    q = jq.quantize_array(w)
    dense = np.asarray(jq.dequantize_array(q, jnp.float32)).astype(np.float64)
    expected = np.einsum("bti,ihd->bthd", np.asarray(x, np.float64), dense)
    mm = maybe_jit(jq.qmatmul, use_jit, dtype=dtype)(x, q)
    es = maybe_jit(lambda x, q: jq.einsum("bti,ihd->bthd", x, q, dtype=dtype), use_jit)(x, q)
    for got in (mm, es):
        assert got.shape == (2, 5, 4, 8) and got.dtype == dtype
        # bf16: inputs rounded to 8 bits of mantissa, sums of 64 terms of size ~1 -> ~1e-2 relative.
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol, atol=rtol * 8)


def test_qmatmul_names_both_shapes_on_mismatch():
    q = jq.quantize_array(jnp.ones((16, 4)))
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(16, 4\)"):
        jq.qmatmul(jnp.ones((3, 8)), q)


def test_int8_scheme_is_close_and_one_byte_per_code():
    w = jax.random.normal(jax.random.key(10), (256, 32))
    q = jq.quantize_array(w, scheme="int8", block_size=None)  # one absmax per output column
    assert q.packed.dtype == jnp.int8 and q.scales.shape == (1, 32)
    absmax = np.max(np.abs(np.asarray(w)), axis=0)
    assert np.all(np.abs(np.asarray(jq.dequantize_array(q) - w)) <= absmax / 127 / 2 * 1.0001)


def test_orbax_checkpoint_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {"dense": {"kernel": jq.quantize_array(jnp.ones((64, 8)) * 0.5, double_quant=True)}}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", params)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, params))
    q = restored["dense"]["kernel"]
    assert isinstance(q, jq.QuantizedArray) and q.double_quant
    np.testing.assert_array_equal(jq.dequantize_array(q), jq.dequantize_array(params["dense"]["kernel"]))


# ----------------------------------------------------------------------------- tree level


def _params():
    k = jax.random.split(jax.random.key(11), 4)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (50, 16))},
        "layers_0": {
            "attn": {"query": {"kernel": jax.random.normal(k[1], (16, 2, 8)), "bias": jnp.zeros((2, 8))}},
            "mlp": {"kernel": jax.random.normal(k[2], (16, 32)), "bias": jnp.zeros(32)},
            "norm": {"scale": jnp.ones(16)},
        },
        "step": jnp.array(3),
    }


def test_quantize_tree_default_targets_every_float_kernel():
    params = _params()
    qp = jq.quantize(params, double_quant=True)
    assert isinstance(qp["layers_0"]["attn"]["query"]["kernel"], jq.QuantizedArray)
    assert isinstance(qp["layers_0"]["mlp"]["kernel"], jq.QuantizedArray)
    assert qp["embed"]["embedding"] is params["embed"]["embedding"]  # shared, not copied
    assert qp["layers_0"]["norm"]["scale"] is params["layers_0"]["norm"]["scale"]
    assert isinstance(params["layers_0"]["mlp"]["kernel"], jax.Array)  # input untouched
    back = jq.dequantize(qp)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    err = jnp.max(jnp.abs(back["layers_0"]["mlp"]["kernel"] - params["layers_0"]["mlp"]["kernel"]))
    assert err < 0.2 * jnp.max(jnp.abs(params["layers_0"]["mlp"]["kernel"]))
    bf = jq.dequantize(qp, jnp.bfloat16)
    assert bf["layers_0"]["mlp"]["kernel"].dtype == jnp.bfloat16


def test_quant_summary_reports_bits_and_bytes_from_the_arrays():
    params = _params()
    qp = jq.quantize(params, r"mlp/kernel$")
    s = jq.quant_summary(qp)
    q = qp["layers_0"]["mlp"]["kernel"]
    leaves = jax.tree.leaves(params)
    original = sum(int(x.nbytes) for x in leaves)
    now = sum(int(x.nbytes) for x in jax.tree.leaves(qp))
    assert s.original_bytes == original and s.total_bytes == now
    assert s.bytes_saved == original - now
    assert s.quantized_params == 16 * 32
    assert s.bits_per_param == pytest.approx(sum(int(x.nbytes) for x in jax.tree.leaves(q)) * 8 / (16 * 32))
    text = str(s)
    assert "layers_0/mlp/kernel" in text and "nf4" in text and "saved" in text


def test_quantize_nnx_state_keeps_variables():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(32, 8, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    qstate = jq.quantize(state)
    kernel = qstate["kernel"]
    assert isinstance(kernel, nnx.Variable) and isinstance(kernel.get_value(), jq.QuantizedArray)
    assert jq.is_quantized(kernel)
    back = jq.dequantize(qstate)
    assert isinstance(back["kernel"], nnx.Variable) and back["kernel"].get_value().shape == (32, 8)
    assert "kernel" in str(jq.quant_summary(qstate))


def test_selector_matching_nothing_lists_nearest_paths():
    with pytest.raises(SelectorError, match=r"matched no path.*layers_0/mlp/kernel"):
        jq.quantize(_params(), r"mpl/kernel$")


def test_embedding_norm_and_1d_leaves_need_opt_in_and_error_names_path_and_shape():
    params = _params()
    with pytest.raises(SelectorError, match=re.escape("'embed/embedding' (shape (50, 16), dtype float32)")) as e:
        jq.quantize(params, r"embed|kernel")
    assert "allow_embeddings=True" in str(e.value)
    with pytest.raises(SelectorError, match=r"layers_0/norm/scale.*shape \(16,\)"):
        jq.quantize(params, r"norm/scale")
    with pytest.raises(SelectorError, match=r"layers_0/mlp/bias.*1-D"):
        jq.quantize(params, r"mlp/bias")
    qp = jq.quantize(params, r"embed/embedding|norm/scale", allow_embeddings=True)
    assert isinstance(qp["embed"]["embedding"], jq.QuantizedArray)
    assert isinstance(qp["layers_0"]["norm"]["scale"], jq.QuantizedArray)


def test_bad_tree_input_fails_before_any_quantization(monkeypatch):
    calls = []
    monkeypatch.setattr(jq._tree, "quantize_array", lambda *a, **k: calls.append(a))
    with pytest.raises(SelectorError):
        jq.quantize(_params(), r"kernel|embedding")  # the kernels are fine, the embedding is not
    with pytest.raises(TypeError, match=r"'step'.*int32.*not floating-point"):
        jq.quantize(_params(), r"^step$")
    assert calls == []


def test_already_quantized_leaf_is_refused():
    qp = jq.quantize(_params())
    with pytest.raises(SelectorError, match=r"layers_0/mlp/kernel.*already quantized"):
        jq.quantize(qp, jq.QuantizedArray)


@pytest.mark.parametrize("block_size", [0, -64, 2.5, "64", True, 3])
def test_bad_block_size_is_named(block_size):
    with pytest.raises(ValueError, match=r"block_size.*" + re.escape(repr(block_size))):
        jq.quantize_array(jnp.ones((8, 8)), block_size=block_size)
    with pytest.raises(ValueError, match=r"block_size"):
        jq.quantize(_params(), block_size=block_size)


@pytest.mark.parametrize("w", [jnp.ones((4, 4), jnp.int32), np.ones((4, 4), np.uint8), jnp.ones((4, 4), bool)])
def test_non_float_array_is_refused_with_dtype_and_shape(w):
    with pytest.raises(TypeError, match=r"floating-point.*\(4, 4\)"):
        jq.quantize_array(w)


def test_unknown_scheme_and_empty_arrays_are_refused():
    with pytest.raises(ValueError, match=r"scheme must be one of .*'nf5'"):
        jq.quantize_array(jnp.ones((4, 4)), scheme="nf5")
    with pytest.raises(ValueError, match=r"shape \(0, 4\)"):
        jq.quantize_array(jnp.ones((0, 4)))
    with pytest.raises(ValueError, match=r"shape \(\)"):
        jq.quantize_array(jnp.float32(1.0))
    with pytest.raises(TypeError, match="QuantizedArray"):
        jq.dequantize_array(jnp.ones((4, 4)))


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxpeft.quant as jq

mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
w = jax.random.normal(jax.random.key(0), (256, 1024)) * 0.02
x = jax.random.normal(jax.random.key(1), (8, 256))
q = jq.quantize_array(w, double_quant=True)
expected = np.asarray(jq.qmatmul(x, q, jnp.float32))
for spec in (P("data", "model"), P("model", None), P(None, "model")):
    # The kernel's spec applies unchanged to packed and scales; scale_scales follows the input axis.
    sharded = jq.QuantizedArray(
        packed=jax.device_put(q.packed, NamedSharding(mesh, spec)),
        scales=jax.device_put(q.scales, NamedSharding(mesh, spec)),
        scale_scales=jax.device_put(q.scale_scales, NamedSharding(mesh, spec)),
        scale_offset=jax.device_put(q.scale_offset, NamedSharding(mesh, P())),
        shape=q.shape, dtype=q.dtype, scheme=q.scheme, block_size=q.block_size,
    )
    shard_rows = {s.data.shape for s in sharded.packed.addressable_shards}
    got = jax.jit(lambda x, q: jq.qmatmul(x, q, jnp.float32))(x, sharded)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    print(spec, sorted(shard_rows))
print("ok")
"""


@pytest.mark.slow
def test_sharded_quantized_kernel_under_jit_matches_unsharded():
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
