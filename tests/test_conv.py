"""Methods on Conv layers (Linen ``nn.Conv`` and ``nnx.Conv``, 1-D / 2-D / 3-D).

The reference is the merged kernel run by Flax's own ``nn.Conv`` (and, for explicit padding, by
``lax.conv_general_dilated`` directly): a method's forward must equal the base layer applied with
the kernel the method's math says it adds (LoRA: ``W + s A B`` with ``A: [*window, in, r]``,
``B: [r, out]``, built here with NumPy). fp32 throughout; tolerance 1e-4 (sums of <= 3^3 * 3 terms
of O(1) values).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp

TOL = dict(rtol=1e-4, atol=1e-4)
IN, OUT = 4, 6

CASES = {
    "1d-same": dict(kernel_size=(3,), strides=1, padding="SAME"),
    "1d-causal-dilated": dict(kernel_size=(3,), padding="CAUSAL", kernel_dilation=2),
    "2d-stride-valid": dict(kernel_size=(3, 3), strides=2, padding="VALID"),
    "2d-explicit-dilated": dict(kernel_size=(2, 3), strides=(1, 2), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1)),
    "2d-circular": dict(kernel_size=(3, 3), padding="CIRCULAR"),
    "3d-same-stride": dict(kernel_size=(2, 2, 2), strides=2, padding="SAME"),
}


def _x(kw, batch=2, seed=1):
    spatial = {1: (9,), 2: (7, 8), 3: (4, 5, 6)}[len(kw["kernel_size"])]
    return jax.random.normal(jax.random.key(seed), (batch, *spatial, IN))


class LinenConv(nn.Module):
    kw: tuple

    @nn.compact
    def __call__(self, x):
        return nn.Conv(OUT, name="conv", **dict(self.kw))(x)


class NnxConv(nnx.Module):
    def __init__(self, kw, rngs):
        self.conv = nnx.Conv(IN, OUT, rngs=rngs, **kw)

    def __call__(self, x):
        return self.conv(x)


def _freeze(kw):
    return tuple(sorted(kw.items()))


def reference(kw, x, kernel, bias):
    """Flax's own Conv with the given (merged) kernel and bias."""
    return nn.Conv(OUT, **kw).apply({"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}, x)


def _randomize(leaves, seed):
    """Every leaf replaced by a random array of its shape (B = 0 at init would hide the update)."""
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return {k: 0.3 * jax.random.normal(key, v.shape) + (1.0 if k.startswith(("ia3", "dora")) else 0.0)
            for key, (k, v) in zip(keys, sorted(leaves.items()))}


class Bound:
    """One bound model, Linen or NNX, behind the same four calls."""

    def __init__(self, binding, kw, peft, x):
        self.binding, self.kw = binding, kw
        if binding == "linen":
            self.model = LinenConv(_freeze(kw))
            base = self.model.init(jax.random.key(0), x)["params"]
            self.peft_model, self.params = jp.apply(peft, self.model, jax.random.key(2), x, params=base)
        else:
            self.peft_model = jp.apply(peft, NnxConv(kw, nnx.Rngs(0)), jax.random.key(2))

    def leaves(self):
        if self.binding == "linen":
            return {k: v for k, v in self.params["conv"].items() if k not in ("kernel", "bias")}
        layer = self.peft_model.conv
        return {name: getattr(layer, name).get_value() for m in layer.methods for name in m.param_names}

    def set_leaves(self, leaves):
        if self.binding == "linen":
            self.params = {**self.params, "conv": {**self.params["conv"], **leaves}}
        else:
            for name, value in leaves.items():
                getattr(self.peft_model.conv, name).set_value(value)

    def base(self):
        if self.binding == "linen":
            return self.params["conv"]["kernel"], self.params["conv"]["bias"]
        layer = self.peft_model.conv.base_layer
        return layer.kernel.get_value(), layer.bias.get_value()

    def __call__(self, x, jit=False):
        if self.binding == "linen":
            fn = lambda p, x: self.peft_model.apply(p, x)  # noqa: E731
            return (jax.jit(fn) if jit else fn)(self.params, x)
        return (nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x)))(self.peft_model, x)

    def merged_forward(self, x):
        if self.binding == "linen":
            return self.model.apply({"params": jp.merge(self.peft_model, self.params)}, x)
        return jp.merge(self.peft_model)(x)

    def round_trip(self):
        """``unmerge(merge(p))`` compared with ``p``."""
        if self.binding == "linen":
            merged = jp.merge(self.peft_model, self.params)
            back = jp.unmerge(self.peft_model, merged, self.params)
            return back["conv"]["kernel"], self.params["conv"]["kernel"]
        back = jp.unmerge(self.peft_model, jp.merge(self.peft_model))
        return back.conv.base_layer.kernel.get_value(), self.peft_model.conv.base_layer.kernel.get_value()


BINDINGS = ["linen", "nnx"]


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_lora_conv_matches_the_merged_kernel(binding, case):
    kw = CASES[case]
    x = _x(kw)
    method = jp.lora(2, 4.0, targets="conv")
    bound = Bound(binding, kw, method, x)
    kernel, bias = bound.base()
    leaves = bound.leaves()
    # HF PEFT's layout: A is a conv with the base window in -> r, B a 1x1 conv r -> out
    assert leaves["lora_a"].shape == (*kw["kernel_size"], IN, 2) and leaves["lora_b"].shape == (2, OUT)
    np.testing.assert_allclose(bound(x), reference(kw, x, kernel, bias), **TOL)  # B = 0: the base
    bound.set_leaves(_randomize(leaves, 3))
    a, b = (np.asarray(v, np.float64) for v in (bound.leaves()["lora_a"], bound.leaves()["lora_b"]))
    merged_kernel = np.asarray(kernel, np.float64) + method.scale * np.einsum("...ir,ro->...io", a, b)
    expected = reference(kw, x, merged_kernel, bias)
    np.testing.assert_allclose(bound(x, jit=case.startswith("2d")), expected, **TOL)
    np.testing.assert_allclose(bound.merged_forward(x), expected, **TOL)
    back, original = bound.round_trip()
    np.testing.assert_allclose(back, original, **TOL)


def test_lora_conv_against_lax_conv_general_dilated():
    kw = CASES["2d-explicit-dilated"]
    x = _x(kw)
    bound = Bound("linen", kw, jp.lora(2, 2.0, targets="conv"), x)
    bound.set_leaves(_randomize(bound.leaves(), 4))
    merged = jp.merge(bound.peft_model, bound.params)["conv"]
    y = jax.lax.conv_general_dilated(
        x, merged["kernel"], window_strides=(1, 2), padding=((1, 0), (2, 1)), rhs_dilation=(2, 1),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ) + merged["bias"]
    np.testing.assert_allclose(bound(x), y, **TOL)


def _numpy_kernel(method, kernel, bias, leaves):
    """The kernel and bias each method's math adds, in NumPy."""
    w, b = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
    f = {k: np.asarray(v, np.float64) for k, v in leaves.items()}
    if isinstance(method, jp.IA3):
        scale = f["ia3_scale"]
        return (w * scale, b) if scale.ndim == w.ndim else (w * scale, b * scale)
    if isinstance(method, jp.DoRA):
        direction = w + method.scale * np.einsum("...ir,ro->...io", f["lora_a"], f["lora_b"])
        norm = np.sqrt(np.sum(direction**2, axis=tuple(range(w.ndim - 1))))  # over the window and input channels
        return direction * f["dora_magnitude"] / norm, b
    w1, w2 = f["lokr_w1"], f["lokr_w2"]
    return w + method.scale * np.kron(w1, w2).reshape(w.shape), b


@pytest.mark.parametrize("binding", BINDINGS)
@pytest.mark.parametrize("method", [jp.ia3(targets="conv", feedforward=None), jp.ia3(targets="conv", feedforward="conv"),
                                    jp.dora(2, 4.0, targets="conv"), jp.lokr(targets="conv")],
                         ids=["ia3-out", "ia3-in", "dora", "lokr"])
def test_ia3_dora_lokr_on_conv(binding, method):
    kw = CASES["2d-stride-valid"]
    x = _x(kw)
    bound = Bound(binding, kw, method, x)
    kernel, bias = bound.base()
    np.testing.assert_allclose(bound(x), reference(kw, x, kernel, bias), **TOL)  # identity at init
    if isinstance(method, jp.DoRA):
        # keep the magnitude ||W||_c and move the direction
        leaves = bound.leaves()
        bound.set_leaves({**_randomize(leaves, 5), "dora_magnitude": leaves["dora_magnitude"] * 1.5})
    else:
        bound.set_leaves(_randomize(bound.leaves(), 5))
    if isinstance(method, jp.IA3) and method.feedforward is not None:
        assert bound.leaves()["ia3_scale"].shape == (1, 1, IN, 1)  # the input channels only
    new_kernel, new_bias = _numpy_kernel(method, kernel, bias, bound.leaves())
    expected = reference(kw, x, new_kernel, new_bias)
    np.testing.assert_allclose(bound(x), expected, **TOL)
    np.testing.assert_allclose(bound.merged_forward(x), expected, **TOL)
    if method.unmerges:
        back, original = bound.round_trip()
        np.testing.assert_allclose(back, original, **TOL)


@pytest.mark.parametrize("binding", BINDINGS)
def test_grouped_conv_is_refused_by_name_for_low_rank_methods(binding):
    kw = dict(kernel_size=(3, 3), feature_group_count=2)
    x = _x(kw)
    for method in (jp.lora(2, targets="conv"), jp.dora(2, targets="conv"), jp.lokr(targets="conv")):
        with pytest.raises(ValueError, match=r"'conv' \(Conv\): grouped convolutions \(feature_group_count=2\)"):
            Bound(binding, kw, method, x)
    # IA3 on the output channels needs no kernel factorisation: it works on a grouped conv
    bound = Bound(binding, kw, jp.ia3(targets="conv", feedforward=None), x)
    bound.set_leaves(_randomize(bound.leaves(), 6))
    kernel, bias = bound.base()
    scale = np.asarray(bound.leaves()["ia3_scale"])
    expected = reference({**kw}, x, np.asarray(kernel) * scale, np.asarray(bias) * scale)
    np.testing.assert_allclose(bound(x), expected, **TOL)


def test_methods_without_conv_support_are_refused_by_name():
    kw = CASES["1d-same"]
    x = _x(kw)
    with pytest.raises(TypeError, match=r"PrefixTuning cannot attach to 'conv': it is a Conv \(conv site\)"):
        Bound("linen", kw, jp.prefix_tuning(2, targets="conv"), x)


def test_conv_with_a_mask_is_refused():
    class Masked(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(OUT, (3,), mask=jnp.ones((3, IN, OUT)), name="conv")(x)

    x = _x(CASES["1d-same"])
    with pytest.raises(TypeError, match="kernel mask is not supported"):
        jp.apply(jp.lora(2, targets="conv"), Masked(), jax.random.key(0), x)
