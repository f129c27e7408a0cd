"""QLoRA on layers whose kernel is not ``[d_in, d_out]``: DenseGeneral with several feature or
contracted axes, and flax's Gemma Einsum layouts (``BTD,NDH->BTNH``, ``BTNH,NHD->BTD``), in Linen and
NNX; their kernels are blocked along the layer's input axis (``QuantizedArray.axis``), and their
PartitionSpecs follow the kernel's layout.

References: the 4-bit codes and absmax scales are decoded in NumPy here (nibbles high-first,
``codebook[code] * absmax`` per block along the blocked axis), and the forward is a NumPy einsum on
those weights plus the LoRA update in factored form. Gradients are checked against the plain
dequantize-then-matmul path (the same model on the float, dequantized kernels).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

import jaxpeft as jp
from jaxpeft import quant
from jaxpeft.sharding import check_specs, peft_specs

D, N, H, F = 64, 4, 16, 32  # d_model, heads, head_dim, features
BLOCK = 16
X = jax.random.normal(jax.random.key(0), (2, 3, D))
TARGETS = r"(q|o|fan|fold)$"
# fp32 einsums in another association order than NumPy's float64: rounding of |y| ~ 10.
CLOSE = dict(rtol=2e-5, atol=2e-5)


def np_dequantize(q: quant.QuantizedArray) -> np.ndarray:
    """Decode a (non-double-quantized, 4-bit) QuantizedArray in NumPy, by the layout's definition."""
    packed, scales = np.asarray(q.packed), np.asarray(q.scales, np.float64)
    axis = q.axis + len(q.stack_shape)
    packed, scales = np.moveaxis(packed, axis, 0), np.moveaxis(scales, axis, 0)
    codes = np.stack([packed >> 4, packed & 0xF], axis=1).reshape(2 * packed.shape[0], *packed.shape[1:])
    n = q.logical_shape[axis]
    values = np.asarray(quant.NF4_VALUES, np.float64)[codes[:n]]
    w = values * np.repeat(scales, q.block_size, axis=0)[:n]
    return np.moveaxis(w, 0, axis)


class Heads(nn.Module):
    """Gemma's attention projections (Einsum) and a DenseGeneral pair over the same features."""

    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((N, D, H), "BTD,NDH->BTNH", use_bias=False, name="q")(x)
        y = nn.Einsum((N, H, D), "BTNH,NHD->BTD", use_bias=False, name="o")(h)
        g = nn.DenseGeneral((N, H), name="fan")(x)               # kernel [D, N, H]
        return y + nn.DenseGeneral(D, axis=(-2, -1), name="fold")(g)  # kernel [N, H, D]


class NnxHeads(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.Einsum("BTD,NDH->BTNH", (N, D, H), rngs=rngs)
        self.o = nnx.Einsum("BTNH,NHD->BTD", (N, H, D), rngs=rngs)
        self.fan = nnx.LinearGeneral(D, (N, H), rngs=rngs)
        self.fold = nnx.LinearGeneral((N, H), D, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        return self.o(self.q(x)) + self.fold(self.fan(x))


# The input axis of each kernel, from its equation: D of NDH, H (the innermost contraction) of NHD.
EXPECTED_AXIS = {"q": 1, "o": 1, "fan": 0, "fold": 1}


def numpy_forward(x, kernels, biases, lora):
    """The model in float64 NumPy: each layer's einsum on the decoded kernel, plus s (x A) B."""
    x = np.asarray(x, np.float64)

    def layer(name, eq, inp, contract_a, expand_b):
        w = kernels[name]
        a, b = (np.asarray(lora[name][k], np.float64) for k in ("lora_a", "lora_b"))
        out = np.einsum(eq, inp, w) + np.einsum(expand_b, np.einsum(contract_a, inp, a), b)
        return out + (biases[name] if name in biases else 0.0)

    h = layer("q", "btd,ndh->btnh", x, "btd,dr->btr", "btr,rnh->btnh")
    y = layer("o", "btnh,nhd->btd", h, "btnh,nhr->btr", "btr,rd->btd")
    g = layer("fan", "btd,dnh->btnh", x, "btd,dr->btr", "btr,rnh->btnh")
    return y + layer("fold", "btnh,nhd->btd", g, "btnh,nhr->btr", "btr,rd->btd")


def moved(tree, key):
    """Every leaf moved off its init (LoRA B is zero at init: the update would vanish)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [a + 0.3 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def linen():
    model = Heads()
    base = model.init(jax.random.key(1), X)["params"]
    peft_model, params = jp.apply(jp.lora(rank=2, targets=TARGETS), model, jax.random.key(2), X, params=base)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    params = jp.combine(moved(trainable, jax.random.key(3)), frozen)
    qparams = jp.quantize(params, model=peft_model, block_size=BLOCK)  # blocked along each layer's input axis
    return peft_model, qparams


def test_linen_kernels_are_blocked_along_each_layers_input_axis(linen):
    _, qparams = linen
    for name, axis in EXPECTED_AXIS.items():
        q = qparams[name]["kernel"]
        assert isinstance(q, quant.QuantizedArray) and q.axis == axis, (name, q)
        # the blocked axis holds bytes (codes, 2 per byte) and blocks (scales); the others are the kernel's
        expected = list(q.shape)
        expected[axis] = q.shape[axis] // 2
        assert list(q.packed.shape) == expected
        expected[axis] = q.shape[axis] // BLOCK
        assert list(q.scales.shape) == expected
    # the scales are the absmaxes of the float kernel's blocks along that axis, per head and column
    w = np.asarray(jax.random.normal(jax.random.key(7), (N, D, H)))
    q = quant.quantize_array(w, block_size=BLOCK, axis=1)
    np.testing.assert_array_equal(np.asarray(q.scales), np.abs(w.reshape(N, D // BLOCK, BLOCK, H)).max(axis=2))
    np.testing.assert_array_equal(np.asarray(quant.dequantize_array(q)), np_dequantize(q).astype(np.float32))


def test_linen_forward_equals_numpy_on_the_decoded_kernels(linen):
    peft_model, qparams = linen
    kernels = {name: np_dequantize(qparams[name]["kernel"]) for name in EXPECTED_AXIS}
    biases = {name: np.asarray(qparams[name]["bias"], np.float64) for name in ("fan", "fold")}
    expected = numpy_forward(X, kernels, biases, qparams)
    np.testing.assert_allclose(peft_model.apply(qparams, X), expected, **CLOSE)
    np.testing.assert_allclose(jax.jit(peft_model.apply)(qparams, X), expected, **CLOSE)


def test_linen_lora_gradients_equal_the_dequantize_then_matmul_path(linen):
    peft_model, qparams = linen
    trainable, frozen = jp.partition(qparams, peft_model.trainable)
    float_frozen = quant.dequantize(frozen)  # the same weights as float kernels: Flax's own matmuls

    def loss(t, f):
        return jnp.mean(peft_model.apply(jp.combine(t, f), X) ** 2)

    got = jax.jit(jax.grad(loss))(trainable, frozen)
    expected = jax.jit(jax.grad(loss))(trainable, float_frozen)
    for (path, g), e in zip(jp.leaves_with_paths(got), jax.tree.leaves(expected)):
        assert np.abs(np.asarray(e)).max() > 0, path
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=path)


@pytest.fixture(scope="module")
def nnx_model():
    qmodel = jp.quantize(NnxHeads(nnx.Rngs(1)), block_size=BLOCK)  # the layers say where each input axis is
    model = jp.apply(jp.lora(rank=2, targets=TARGETS), qmodel, jax.random.key(2))
    graphdef, trainable, rest = nnx.split(model, jp.PeftParam, ...)
    return nnx.merge(graphdef, moved(trainable, jax.random.key(3)), rest)


def test_nnx_forward_equals_numpy_on_the_decoded_kernels(nnx_model):
    model = nnx_model
    layers = {name: getattr(model, name) for name in EXPECTED_AXIS}
    kernels = {}
    for name, layer in layers.items():
        q = layer.base_layer.kernel.get_value()
        assert isinstance(q, quant.QuantizedArray) and q.axis == EXPECTED_AXIS[name], (name, q)
        kernels[name] = np_dequantize(q)
    biases = {name: np.asarray(layers[name].base_layer.bias.get_value(), np.float64) for name in ("fan", "fold")}
    biases.update({name: np.asarray(layers[name].base_layer.bias.get_value(), np.float64)
                   for name in ("q", "o") if layers[name].base_layer.bias is not None})
    lora = {name: {k: getattr(layer, k).get_value() for k in ("lora_a", "lora_b")} for name, layer in layers.items()}
    expected = numpy_forward(X, kernels, biases, lora)
    np.testing.assert_allclose(model(X), expected, **CLOSE)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, X), expected, **CLOSE)


def test_nnx_lora_gradients_equal_the_dequantize_then_matmul_path(nnx_model):
    def loss(model):
        return jnp.mean(model(X) ** 2)

    grad = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, jp.PeftParam)))
    got = nnx.to_pure_dict(grad(nnx_model))
    expected = nnx.to_pure_dict(grad(jp.dequantize(nnx_model)))  # float kernels, the same LoRA leaves
    for (path, g), e in zip(jp.leaves_with_paths(got), jax.tree.leaves(expected)):
        assert np.abs(np.asarray(e)).max() > 0, path
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6, err_msg=path)


# -- PartitionSpecs of quantized kernels in any layout ----------------------------------------------------


MESH = AbstractMesh((4, 2), ("data", "model"))


def test_heads_first_quantized_kernel_specs_follow_its_layout(linen):
    """NDH kernel spec ('model', 'data', None): heads on 'model', d_model (the blocked input axis) on 'data'."""
    peft_model, _ = linen
    model = Heads()
    base = model.init(jax.random.key(1), X)["params"]
    _, params = jp.apply(jp.lora(rank=2, targets=TARGETS), model, jax.random.key(2), X, params=base)
    qparams = jp.quantize(params, model=peft_model, block_size=BLOCK, double_quant=True)
    base_specs = {name: {"kernel": P()} | ({"bias": P()} if "bias" in base[name] else {}) for name in base}
    base_specs["q"]["kernel"] = P("model", "data", None)
    specs = peft_specs(peft_model, qparams, base_specs)["q"]
    kernel = specs["kernel"]
    # packed [N, D/2, H], scales [N, D/16, H]: the kernel's own axes, D counted in bytes / blocks
    assert kernel.packed == P("model", "data", None) and kernel.scales == P("model", "data", None)
    # double quantization: scale_scales [N, D/16, 1] and scale_offset [N] lead with the heads
    assert kernel.scale_scales == P("model") and kernel.scale_offset == P("model")
    # LoRA: A [D, r] takes the input (D) entry, B [r, N, H] the output (N, H) entries
    assert specs["lora_a"] == P("data", None) and specs["lora_b"] == P(None, "model", None)
    check_specs(specs, MESH, qparams["q"])


def test_stacked_quantized_kernel_specs_keep_the_layer_axis():
    """A scanned LM's [L, in, out] kernels, each layer quantized on its own: the layer axis stays in front."""
    from jaxpeft.models import LinenLM, LMConfig

    config = LMConfig.tiny(num_layers=2).replace(scan_layers=True)
    model, tokens = LinenLM(config), jnp.array([[1, 2, 3, 4]])
    peft_model, params = jp.apply(jp.lora(rank=2, targets="query$"), model, jax.random.key(0), tokens)
    qparams = jp.quantize(params, model=peft_model, block_size=8, double_quant=True)
    q = qparams["layers"]["attn"]["query"]["kernel"]
    assert q.stack_shape == (2,) and q.axis == 0
    stacked = "layers/attn/query/kernel"

    # PEFT leaves in base_specs are ignored: their specs are derived
    base_specs = jax.tree_util.tree_map_with_path(
        lambda k, x: P("model", "data", None) if jp.tree.path_to_str(k) == stacked else P(), params)
    specs = peft_specs(peft_model, qparams, base_specs)["layers"]["attn"]["query"]
    d = config.d_model
    assert q.packed.shape == (2, d // 2, d) and q.scales.shape == (2, d // 8, d)
    assert specs["kernel"].packed == P("model", "data", None) and specs["kernel"].scales == P("model", "data", None)
    assert specs["kernel"].scale_scales == P("model") and specs["kernel"].scale_offset == P("model")
    # LoRA: A [L, in, r], B [L, r, out], the layer axis on 'model' like the kernel's
    assert specs["lora_a"] == P("model", "data", None) and specs["lora_b"] == P("model", None, None)
    check_specs(specs, MESH, qparams["layers"]["attn"]["query"])


def test_bad_blocked_axis_and_model_are_refused_before_any_work():
    params = {"layer": {"kernel": jnp.ones((8, 4))}}
    with pytest.raises(jp.tree.SelectorError, match=r"'layer/kernel' .*no axis 2"):
        quant.quantize(params, axis=2)
    with pytest.raises(ValueError, match=r"axis must be a non-negative int; got -1"):
        quant.quantize(params, axis=-1)
    with pytest.raises(jp.tree.SelectorError, match=r"axis names paths the selector did not pick: \['nope/kernel'\]"):
        quant.quantize(params, axis={"nope/kernel": 1})
    with pytest.raises(TypeError, match=r"takes the PeftLinen from jp.apply, got dict"):
        jp.quantize(params, model={})
    with pytest.raises(ValueError, match=r"axis must be an axis of the array \(shape \(8, 4\)\); got 2"):
        quant.quantize_array(params["layer"]["kernel"], axis=2)


def test_qpissa_requantizes_the_residual_in_the_kernels_layout():
    """PiSSA on a quantized heads-first kernel: the residual W - s A B goes back blocked along the same axis."""
    qmodel = jp.quantize(NnxHeads(nnx.Rngs(1)), block_size=BLOCK, scheme="int8")
    before = {name: getattr(qmodel, name).kernel.get_value() for name in EXPECTED_AXIS}
    model = jp.apply(jp.lora(rank=2, targets=TARGETS, init="pissa"), qmodel, jax.random.key(2))
    for name, q in before.items():
        new = getattr(model, name).base_layer.kernel.get_value()
        assert (new.axis, new.scheme, new.block_size, new.shape) == (q.axis, q.scheme, q.block_size, q.shape), name
        assert not np.array_equal(np.asarray(new.packed), np.asarray(q.packed)), name  # a residual, not W
    # Q(W - s A B) + s A B vs Q(W): the residual's int8 rounding only (|y| ~ 10)
    np.testing.assert_allclose(model(X), jp.dequantize(qmodel)(X), rtol=2e-2, atol=5e-2)
