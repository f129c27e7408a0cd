"""``qeinsum_blockwise``: any layer's einsum by a quantized kernel, one dequantized row block at a time.

References: the kernel is decoded in float64 NumPy from its codes and scales (``np_dequantize``,
by the layout's definition), ``y`` is ``np.einsum`` on it and ``dx`` of ``sum(g * y)`` is the
transposed einsum written out by hand for each case (not derived by the code under test). The
memory checks read XLA's own buffer assignment (``compiled.memory_analysis()``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft import quant
from test_qlora_memory import _nbytes, _peak
from test_quantized_layouts import np_dequantize

BLOCK = 16

# (id, equation, x shape, kernel shape, blocked kernel axis, dx = g through W^T, in NumPy's einsum)
CASES = [
    ("dense", "...i,io->...o", (3, 5, 64), (64, 24), 0, "...o,io->...i"),
    ("gemma-q-contracted", "btd,ndh->btnh", (2, 3, 64), (4, 64, 8), 1, "btnh,ndh->btd"),
    ("gemma-q-heads-blocked", "btd,ndh->btnh", (2, 3, 8), (64, 8, 4), 0, "btnh,ndh->btd"),
    ("gemma-o", "btnh,nhd->btd", (2, 3, 4, 64), (4, 64, 8), 1, "btd,nhd->btnh"),
    ("per-head-shared", "bnd,ndh->bnh", (2, 64, 8), (64, 8, 4), 0, "bnh,ndh->bnd"),
    ("dense-general-two-in", "...ab,abc->...c", (3, 4, 64), (4, 64, 8), 1, "...c,abc->...ab"),
    ("dense-general-fan-out", "btd,dnh->btnh", (2, 3, 8), (8, 64, 4), 1, "btnh,dnh->btd"),
]


def _setup(shape, axis, x_shape, seed=0):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(0, 0.05, shape), jnp.float32)
    q = quant.quantize_array(w, scheme="nf4", block_size=BLOCK, axis=axis)
    x = rng.normal(size=x_shape).astype(np.float32)
    return q, x, rng


# block_bytes -> the number of row blocks: one per quantization block, two, or the whole kernel (8 MiB default)
CUTS = {"every-block": (lambda kernel_bytes: 1, lambda nb: nb), "two": (lambda kernel_bytes: kernel_bytes // 2, lambda nb: 2),
        "whole": (lambda kernel_bytes: quant.DEFAULT_BLOCK_BYTES, lambda nb: 1)}


@pytest.mark.parametrize("cut", list(CUTS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_and_dx_equal_numpy_on_the_decoded_kernel(case, cut):
    _, equation, x_shape, shape, axis, dx_equation = case
    q, x, rng = _setup(shape, axis, x_shape)
    block_bytes, expected = CUTS[cut][0](4 * int(np.prod(shape))), CUTS[cut][1](shape[axis] // BLOCK)
    assert quant.row_blocks(q, jnp.float32, block_bytes) == expected
    w = np_dequantize(q)
    y = jp.qeinsum_blockwise(equation, jnp.asarray(x), q, block_bytes=block_bytes)
    ref = np.einsum(equation, x.astype(np.float64), w)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())

    g = rng.normal(size=ref.shape).astype(np.float32)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(g * jp.qeinsum_blockwise(equation, x, q, block_bytes=block_bytes))))(
        jnp.asarray(x))
    ref_dx = np.einsum(dx_equation, g.astype(np.float64), w)
    assert dx.shape == x.shape
    np.testing.assert_allclose(np.asarray(dx, np.float64), ref_dx, rtol=2e-5, atol=2e-5 * np.abs(ref_dx).max())


def test_bf16_and_double_quantized_kernels_match_the_dequantize_path():
    """bf16 operands accumulate in fp32 across blocks; double quantization decodes like dequantize_array."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(0, 0.05, (4, 512, 8)), jnp.float32)
    q = quant.quantize_array(w, scheme="nf4", block_size=64, axis=1, double_quant=True)
    x = jnp.asarray(rng.normal(size=(2, 3, 512)), jnp.bfloat16)
    y = jp.qeinsum_blockwise("btd,ndh->btnh", x, q, block_bytes=1)  # 8 blocks
    w_bf16 = np.asarray(quant.dequantize_array(q, jnp.bfloat16), np.float64)
    ref = np.einsum("btd,ndh->btnh", np.asarray(x, np.float64), w_bf16)
    assert y.dtype == jnp.bfloat16
    # rounding the fp32 sum once to bf16: half an ulp of 8 mantissa bits
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=8e-3, atol=8e-3 * np.abs(ref).max())


def test_kernel_cotangent_is_zero_and_nothing_is_computed_for_it():
    q, x, _ = _setup((4, 64, 8), 1, (2, 3, 64))
    gq = jax.grad(lambda q: jnp.sum(jp.qeinsum_blockwise("btd,ndh->btnh", jnp.asarray(x), q)), allow_int=True)(q)
    assert not np.any(np.asarray(gq.scales))


def test_bad_input_is_refused_before_any_work():
    q, x, _ = _setup((4, 64, 8), 1, (2, 3, 64))
    with pytest.raises(TypeError, match="expects a QuantizedArray kernel; got ndarray"):
        jp.qeinsum_blockwise("btd,ndh->btnh", x, np.zeros((4, 64, 8), np.float32))
    with pytest.raises(ValueError, match=r"explicit with two operands.*'btd,ndh'"):
        jp.qeinsum_blockwise("btd,ndh", x, q)
    with pytest.raises(ValueError, match=r"names kernel axes 'dh' but the kernel has shape \(4, 64, 8\)"):
        jp.qeinsum_blockwise("btd,dh->bth", x, q)
    with pytest.raises(ValueError, match=r"x of shape \(2, 3, 32\) does not fit 'btd,ndh->btnh'"):
        jp.qeinsum_blockwise("btd,ndh->btnh", x[..., :32], q)
    stacked = quant.quantize({"kernel": jnp.ones((3, 64, 8))}, block_size=BLOCK, stack_axes=1)["kernel"]
    with pytest.raises(ValueError, match=r"stack of \(3,\) quantized arrays"):
        jp.qeinsum_blockwise("bd,dh->bh", np.ones((2, 64), np.float32), stacked)
    with pytest.raises(ValueError, match="block_bytes must be a positive integer; got 0"):
        jp.qeinsum_blockwise("btd,ndh->btnh", x, q, block_bytes=0)


# ---------------------------------------------------------------------------------------- layers

D, N, H = 64, 4, 16


class EinsumBias(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((N, D, H), "BTD,NDH->BTNH", use_bias=True, name="q")(x)
        return nn.DenseGeneral(D, axis=(-2, -1), name="fold")(jnp.tanh(h))


class NnxEinsumBias(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.Einsum("BTD,NDH->BTNH", (N, D, H), (N, H), rngs=rngs)
        self.fold = nnx.LinearGeneral((N, H), D, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        return self.fold(jnp.tanh(self.q(x)))


X = jax.random.normal(jax.random.key(0), (2, 3, D))


def _moved(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def test_linen_einsum_and_dense_general_biases_broadcast_as_flax_does():
    """The quantized layers' output equals Flax's own layers on the dequantized kernels (biases included)."""
    model = EinsumBias()
    params = _moved(model.init(jax.random.key(1), X)["params"], jax.random.key(2))
    assert params["q"]["bias"].shape == (N, H)
    qparams = jp.quantize(params, block_size=BLOCK, axis={"q/kernel": 1, "fold/kernel": 1})
    peft_model, pparams = jp.apply(jp.lora(2, targets="q|fold"), model, jax.random.key(3), X, params=qparams)
    got = peft_model.apply(pparams, X)  # LoRA B = 0: the base layers alone
    expected = model.apply({"params": quant.dequantize(qparams)}, X)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_nnx_einsum_and_linear_general_biases_broadcast_as_flax_does():
    model = NnxEinsumBias(nnx.Rngs(1))
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var[...] = var[...] + 0.3
    qmodel = jp.quantize(model, block_size=BLOCK)
    peft_model = jp.apply(jp.lora(2, targets="q|fold"), qmodel, jax.random.key(3))
    got = peft_model(X)
    graph, state = nnx.split(qmodel)
    expected = nnx.merge(graph, quant.dequantize(state))(X)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------- memory

LAYERS, WIDE, HEADS, HEAD = 4, 512, 4, 128
KERNEL = HEADS * WIDE * HEAD * 4  # one Einsum kernel in fp32


class EinsumStack(nn.Module):
    """Gemma-style attention projections, many times: big kernels, few tokens."""

    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            h = nn.Einsum((HEADS, WIDE, HEAD), "BTD,NDH->BTNH", use_bias=False, name=f"q_{i}")(x)
            x = jnp.tanh(nn.Einsum((HEADS, HEAD, WIDE), "BTNH,NHD->BTD", use_bias=False, name=f"o_{i}")(h))
        return x


def test_einsum_qlora_step_holds_no_whole_float_kernel_and_matches_the_plain_path():
    x = jax.random.normal(jax.random.key(0), (2, 4, WIDE))
    model = EinsumStack()
    base = model.init(jax.random.key(1), x)["params"]
    peft_model, params = jp.apply(jp.lora(4, targets=r"(q|o)_\d+"), model, jax.random.key(2), x, params=base)
    params = jp.quantize(params, model=peft_model, scheme="nf4", block_size=64, double_quant=True)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    trainable = jax.tree.map(lambda a: a + 0.01, trainable)

    def loss(t, f):
        return jnp.mean(peft_model.apply(jp.combine(t, f), x) ** 2)

    def plain(t, f):
        return loss(t, quant.dequantize(f))

    floats = 2 * LAYERS * KERNEL
    activations = 4 * LAYERS * x.size * 4 * HEADS  # generous: every layer's inputs, heads and outputs
    assert floats >= 8 * activations
    bound = _nbytes(frozen) + 2 * _nbytes(trainable) + KERNEL + activations
    peak = _peak(jax.jit(jax.grad(loss)).lower(trainable, frozen).compile())
    assert peak <= bound, (peak / 2**20, bound / 2**20)
    plain_peak = _peak(jax.jit(jax.grad(plain)).lower(trainable, frozen).compile())
    assert plain_peak > _nbytes(frozen) + floats - KERNEL, plain_peak / 2**20  # the check can fail

    got, expected = jax.jit(jax.grad(loss))(trainable, frozen), jax.jit(jax.grad(plain))(trainable, frozen)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))


def test_each_layer_adds_no_more_than_its_saved_activation():
    """Activations 4x the kernels (the peers' shape): a layer adds its tanh output (2 MiB) to the step, nothing more.

    The loops' zero-initialised carries once added a 2 MiB buffer per layer (XLA merged the zero
    constants and scheduled every copy at the start of the step); the plain path adds the 1 MiB
    dequantized kernel per layer.
    """
    from benchmarks.bench_qlora_memory import chain_temp  # the chain `jaxpeft bench qlora_memory` reports

    activation = 1024 * 512 * 4
    per_layer = (chain_temp(8, False, 512, 1024) - chain_temp(4, False, 512, 1024)) / 4
    assert per_layer <= 1.1 * activation, per_layer / 2**20
    plain_per_layer = (chain_temp(8, True, 512, 1024) - chain_temp(4, True, 512, 1024)) / 4
    assert plain_per_layer > 1.4 * activation, plain_per_layer / 2**20  # it keeps each float kernel
