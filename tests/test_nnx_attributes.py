"""A wrapped NNX layer stays the layer: model code that reads the wrapped layer's attributes keeps
working, while calling the layer runs the LoRA path. References are NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.bind.nnx import PeftLayer

D, H, V = 8, 2, 11


class AttrModel(nnx.Module):
    """Model code that reads its layers' attributes, as Gemma/tied-embedding code does."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.proj = nnx.Linear(D, D, rngs=rngs)
        self.heads = nnx.Einsum("btd,dnh->btnh", (D, H, D // H), (H, D // H), rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        assert self.proj.in_features == D and self.proj.out_features == D and self.proj.use_bias
        h = self.proj(x)  # the call: LoRA path
        n, hd = self.heads.kernel.shape[1:]  # a read: shape of the wrapped kernel
        assert self.heads.einsum_str == "btd,dnh->btnh"
        h = self.heads(h).reshape(*h.shape[:-1], n * hd)
        return self.embed.attend(h)  # tied output: the embedding table read through the wrapper


def _numpy_forward(model_state, tokens, delta=None):
    delta = delta or {}
    s = model_state
    table = np.asarray(s["embed"]["embedding"])
    w = np.asarray(s["proj"]["kernel"]) + delta.get("proj", 0.0)
    x = table[tokens]
    h = x @ w + np.asarray(s["proj"]["bias"])
    k = np.asarray(s["heads"]["kernel"])
    h = np.einsum("btd,dnh->btnh", h, k) + np.asarray(s["heads"]["bias"])
    return h.reshape(*h.shape[:-2], -1) @ table.T


@pytest.fixture
def setup():
    base = AttrModel(nnx.Rngs(0))
    state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    peft = jp.lora(rank=2, alpha=4, targets=r"^(proj|heads)$")
    model = jp.apply(peft, base, jax.random.key(1))
    tokens = jnp.array([[1, 3, 5, 7], [2, 4, 6, 10]])
    return state, model, tokens


def test_attribute_reads_forward_to_the_wrapped_layer(setup):
    _, model, _ = setup
    assert isinstance(model.proj, PeftLayer)
    assert model.proj.kernel is model.proj.base_layer.kernel
    assert (model.proj.in_features, model.proj.out_features) == (D, D)
    assert model.heads.einsum_str == "btd,dnh->btnh"
    assert model.heads.kernel.get_value().shape == (D, H, D // H)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        model.proj.no_such_attribute
    with pytest.raises(AttributeError):
        model.proj._private_of_base  # private names are not forwarded


def test_zero_b_forward_equals_numpy_base(setup):
    state, model, tokens = setup
    np.testing.assert_allclose(model(tokens), _numpy_forward(state, tokens), rtol=1e-5, atol=1e-5)


def test_calls_take_the_lora_path_reads_see_the_base(setup):
    state, model, tokens = setup
    a = np.asarray(model.proj.lora_a.get_value())
    b = np.asarray(jax.random.normal(jax.random.key(2), model.proj.lora_b.get_value().shape))
    model.proj.lora_b.set_value(jnp.asarray(b))
    want = _numpy_forward(state, tokens, {"proj": (4 / 2) * a @ b})
    np.testing.assert_allclose(model(tokens), want, rtol=1e-4, atol=1e-4)
    # a read of the kernel is the base kernel, unadapted (documented in docs/models.md)
    np.testing.assert_array_equal(model.proj.kernel.get_value(), state["proj"]["kernel"])
    # merging folds the update into the kernel the reads see
    merged = jp.merge(model)
    np.testing.assert_allclose(merged.proj.kernel.get_value(), state["proj"]["kernel"] + 2 * a @ b, rtol=1e-5, atol=1e-5)


def test_forwarding_survives_jit_and_split_merge(setup):
    state, model, tokens = setup
    out = nnx.jit(lambda m, t: m(t))(model, tokens)
    np.testing.assert_allclose(out, _numpy_forward(state, tokens), rtol=1e-5, atol=1e-5)
    again = nnx.merge(*nnx.split(model))
    assert again.proj.in_features == D and again.heads.kernel.get_value().shape == (D, H, D // H)
