"""A QLoRA step never holds more than one layer's dequantized kernel, forward and backward.

The proof is XLA's own buffer assignment (``compiled.memory_analysis()``), not process RSS: the
step's peak live bytes are its arguments + outputs + the temporaries XLA's heap simulation
allocated. The reference is the plain path (dequantize each kernel, then multiply), which keeps
every layer's float kernel alive from its forward matmul to its backward one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft import quant

LAYERS, WIDTH, BATCH = 4, 1024, 8
QUANT = dict(scheme="nf4", block_size=64, double_quant=True)
KERNEL_FP32 = WIDTH * WIDTH * 4  # one layer's dequantized kernel
# activations: every layer's input, pre-activation and output, fp32, kept for the backward pass
ACTIVATIONS = 3 * LAYERS * BATCH * WIDTH * 4


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = jnp.tanh(nn.Dense(WIDTH, name=f"dense_{i}")(x))
        return x


class NNXStack(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(LAYERS)])

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


X = jax.random.normal(jax.random.key(0), (BATCH, WIDTH))


def _peak(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized))


def _linen_steps():
    """(qlora grad fn, plain grad fn, trainable, frozen 4-bit, frozen float dequantized)."""
    model = Stack()
    base = model.init(jax.random.key(1), X)["params"]
    qbase = quant.quantize(base, **QUANT)
    peft_model, params = jp.apply(jp.lora(4, targets=r"dense_\d+"), model, jax.random.key(2), X, params=qbase)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    trainable = jax.tree.map(lambda a: a + 0.01, trainable)  # B != 0, so the adapters matter

    def loss(t, f, x):
        return jnp.mean(peft_model.apply(jp.combine(t, f), x) ** 2)

    def plain_loss(t, f, x):  # the plain path: dequantize every kernel inside the step
        return loss(t, quant.dequantize(f), x)

    return jax.grad(loss), jax.grad(plain_loss), trainable, frozen


def _nnx_steps():
    qmodel = jp.quantize(NNXStack(nnx.Rngs(1)), **QUANT)
    peft_model = jp.apply(jp.lora(4, targets=r"layers/\d+"), qmodel, jax.random.key(2))
    graph, trainable, frozen = nnx.split(peft_model, jp.PeftParam, ...)
    trainable = jax.tree.map(lambda a: a + 0.01, trainable)

    def loss(t, f, x):
        return jnp.mean(nnx.merge(graph, t, f)(x) ** 2)

    def plain_loss(t, f, x):
        return loss(t, quant.dequantize(f), x)

    return jax.grad(loss), jax.grad(plain_loss), trainable, frozen


STEPS = {"linen": _linen_steps, "nnx": _nnx_steps}


@pytest.mark.parametrize("binding", ["linen", "nnx"])
def test_qlora_step_peak_is_below_base_plus_one_layer(binding):
    grad, plain_grad, trainable, frozen = STEPS[binding]()
    dequantized_total = LAYERS * KERNEL_FP32
    assert dequantized_total >= 8 * ACTIVATIONS  # the regime the guarantee is about
    bound = _nbytes(frozen) + 2 * _nbytes(trainable) + X.nbytes + KERNEL_FP32 + ACTIVATIONS
    peak = _peak(jax.jit(grad).lower(trainable, frozen, X).compile())
    assert peak <= bound, f"QLoRA step peak {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    # The same check fails for the plain path: it holds every layer's float kernel at once.
    plain_peak = _peak(jax.jit(plain_grad).lower(trainable, frozen, X).compile())
    assert plain_peak > _nbytes(frozen) + dequantized_total - KERNEL_FP32, plain_peak / 2**20


@pytest.mark.parametrize("binding", ["linen", "nnx"])
@pytest.mark.parametrize("use_jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"])
def test_qlora_gradients_equal_the_plain_dequantize_path(binding, use_jit):
    grad, plain_grad, trainable, frozen = STEPS[binding]()
    wrap = jax.jit if use_jit else (lambda f: f)
    got = wrap(grad)(trainable, frozen, X)
    expected = jax.jit(plain_grad)(trainable, frozen, X)
    # fp32, one row block per kernel here: the two paths differ only by XLA's fusion choices;
    # 1e-5 relative to the largest gradient entry is ~100 ulps of float32.
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))


def _chain(matmul):
    def loss(lora, kernels, x):
        h = x
        for (a, b), k in zip(lora, kernels):
            h = jnp.tanh(matmul(h, k) + (h @ a) @ b)
        return jnp.mean(h**2)

    return loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_blockwise_matmul_cuts_kernels_into_row_blocks_and_matches_numpy(dtype):
    """Several row blocks per kernel: forward, dx and the step peak against dense NumPy."""
    block_bytes = 2**18 * np.dtype(dtype).itemsize  # 256 Ki elements: 4 row blocks of a 1024x1024 kernel
    rng = np.random.default_rng(0)
    w = [rng.normal(0, 0.03, (WIDTH, WIDTH)).astype(np.float32) for _ in range(LAYERS)]
    qs = [quant.quantize_array(jnp.asarray(k), **QUANT) for k in w]
    assert quant.row_blocks(qs[0], dtype, block_bytes) == 4
    dense = [np.asarray(quant.dequantize_array(q), np.float64) for q in qs]
    x = rng.normal(size=(BATCH, WIDTH)).astype(np.float32)
    y = quant.qmatmul_blockwise(jnp.asarray(x, dtype), qs[0], block_bytes=block_bytes)
    assert y.dtype == dtype and y.shape == (BATCH, WIDTH)
    # bf16 operands: inputs and kernel rounded to 8 bits of mantissa, so ~1% of |y|
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    ref = np.asarray(jnp.asarray(x, dtype), np.float64) @ np.asarray(quant.dequantize_array(qs[0], dtype), np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=tol, atol=tol * np.abs(ref).max())

    # dx of sum(g * x W) is g W^T: check it against NumPy on the same dequantized kernel
    g = rng.normal(size=(BATCH, WIDTH)).astype(np.float32)
    def gy(x):
        return jnp.sum(jnp.asarray(g, dtype) * quant.qmatmul_blockwise(x, qs[0], block_bytes=block_bytes))

    dx = jax.grad(gy)(jnp.asarray(x, dtype))
    ref_dx = np.asarray(jnp.asarray(g, dtype), np.float64) @ dense[0].T
    np.testing.assert_allclose(np.asarray(dx, np.float64), ref_dx, rtol=tol, atol=tol * np.abs(ref_dx).max())

    if dtype == jnp.float32:
        lora = [(jnp.asarray(rng.normal(0, 0.03, (WIDTH, 4)), jnp.float32), jnp.full((4, WIDTH), 0.01)) for _ in w]
        block = _chain(lambda h, q: quant.qmatmul_blockwise(h, q, block_bytes=block_bytes))
        plain = _chain(lambda h, q: h @ quant.dequantize_array(q))
        got = jax.jit(jax.grad(block))(lora, qs, jnp.asarray(x))
        expected = jax.jit(jax.grad(plain))(lora, qs, jnp.asarray(x))
        # four partial sums instead of one dot: reassociation, ~1e-6 relative in fp32
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()))
        peak = _peak(jax.jit(jax.grad(block)).lower(lora, qs, jnp.asarray(x)).compile())
        bound = _nbytes(qs) + 2 * _nbytes(lora) + x.nbytes + KERNEL_FP32 // 4 + ACTIVATIONS
        assert peak <= bound, (peak / 2**20, bound / 2**20)


def test_blockwise_matmul_refuses_bad_input():
    q = quant.quantize_array(jnp.ones((64, 8)), scheme="nf4", block_size=16)
    with pytest.raises(ValueError, match=r"x has 32 features .* expects 64 \(shape \(64, 8\)\)"):
        quant.qmatmul_blockwise(jnp.ones((2, 32)), q)
    with pytest.raises(TypeError, match="QuantizedArray"):
        quant.qmatmul_blockwise(jnp.ones((2, 64)), jnp.ones((64, 8)))
    with pytest.raises(ValueError, match="block_bytes must be a positive integer; got 0"):
        quant.qmatmul_blockwise(jnp.ones((2, 64)), q, block_bytes=0)


def test_rows_that_do_not_split_into_blocks_fall_back_to_one_block():
    q = quant.quantize_array(jnp.ones((100, 8)), scheme="nf4", block_size=16)  # 100 % 16 != 0
    assert quant.row_blocks(q, jnp.float32, 64) == 1
    x = jnp.arange(300, dtype=jnp.float32).reshape(3, 100) / 300
    np.testing.assert_allclose(quant.qmatmul_blockwise(x, q, block_bytes=64), x @ quant.dequantize_array(q), rtol=1e-6)
