"""One binding layer: Linen and NNX share one bound-model representation and one implementation of
every whole-model operation, so they must agree exactly (same seed, same adapters; same options)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.bind import nnx as nnx_binding
from tests._toy import TOKENS, LinenModel, NnxModel, nnx_twin, randomize

TRANSFORMS = {
    "lora": lambda: jp.lora(rank=2, targets=r"block/(query|value|key)$"),
    "lora+ia3": lambda: jp.chain(jp.lora(rank=2, targets=r"block/query$"), jp.ia3(targets=r"block/(value|down)$")),
    "two adapters": lambda: jp.chain(
        jp.lora(rank=2, alpha=6, targets=r"block/query$", adapter="a"), jp.lora(rank=3, targets=r"block/(query|up)$", adapter="b")
    ),
    "dora": lambda: jp.dora(rank=2, targets=r"block/(query|up)$"),
    "lokr": lambda: jp.lokr(rank=2, targets=r"block/(query|down)$"),
    "compacter (shared leaves)": lambda: jp.compacter(targets=r"block/(query|down)$", bottleneck=4, phm_dim=2),
}


def _flat(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _linen_and_nnx(peft, key):
    model = LinenModel()
    base = model.init(jax.random.key(0), TOKENS)["params"]
    peft_model, params = jp.apply(peft, model, key, TOKENS, params=base)
    nnx_base = NnxModel(nnx.Rngs(0))
    nnx.update(nnx_base, jax.tree.map(jnp.asarray, base))
    return model, base, peft_model, params, jp.apply(peft, nnx_base, key)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_same_transform_and_seed_give_bit_identical_adapters(name):
    peft = TRANSFORMS[name]()
    _, _, _, params, nnx_model = _linen_and_nnx(peft, jax.random.key(3))
    linen_leaves = _flat(jp.prune(jp.partition(params, peft.trainable)[0]))
    nnx_leaves = _flat(jp.prune(jp.partition(nnx_binding.read(nnx_model).params, peft.trainable)[0]))
    assert linen_leaves and set(linen_leaves) == set(nnx_leaves)
    for path, leaf in linen_leaves.items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(nnx_leaves[path]), err_msg=path)
    # And another seed gives other adapters (the test can fail).
    _, _, _, other, _ = _linen_and_nnx(peft, jax.random.key(4))
    other_leaves = _flat(jp.prune(jp.partition(other, peft.trainable)[0]))
    assert any(not np.array_equal(other_leaves[p], linen_leaves[p]) for p in linen_leaves)


def _two_adapters():
    peft = TRANSFORMS["two adapters"]()
    model, base, peft_model, params, _ = _linen_and_nnx(peft, jax.random.key(1))
    params = randomize(params, peft.trainable, jax.random.key(2))
    _, nnx_model = nnx_twin(peft, params)
    return peft, model, base, peft_model, params, nnx_model


def test_merge_and_unmerge_with_adapters_agree_and_invert_in_both_bindings():
    peft, _, base, peft_model, params, nnx_model = _two_adapters()
    # Reference: W + s_a A_a B_a at query, in float64 NumPy from the leaves.
    node = params["block"]["query"]
    lora_a, lora_b = np.asarray(node["lora_a@a"], np.float64), np.asarray(node["lora_b@a"], np.float64)
    scale = 6 / 2  # alpha / rank
    expected = np.asarray(base["block"]["query"]["kernel"], np.float64) + scale * lora_a @ lora_b

    merged_linen = jp.merge(peft_model, params, adapters="a")
    merged_nnx = jp.merge(nnx_model, adapters="a")
    np.testing.assert_allclose(merged_linen["block"]["query"]["kernel"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged_nnx.block.query.kernel.get_value(), expected, rtol=1e-5, atol=1e-6)
    # "b" was not merged: "up" keeps its base kernel in both.
    np.testing.assert_array_equal(merged_linen["block"]["up"]["kernel"], base["block"]["up"]["kernel"])
    np.testing.assert_array_equal(merged_nnx.block.up.kernel.get_value(), base["block"]["up"]["kernel"])

    # unmerge with the same adapters= takes out only "a": the base comes back in both bindings.
    back_linen = jp.unmerge(peft_model, merged_linen, params, adapters="a")
    back_nnx = jp.unmerge(nnx_model, merged_nnx, adapters="a")
    for layer in ("query", "up"):
        want = np.asarray(base["block"][layer]["kernel"])
        np.testing.assert_allclose(back_linen["block"][layer]["kernel"], want, atol=1e-6)
        np.testing.assert_allclose(getattr(back_nnx.block, layer).base_layer.kernel.get_value(), want, atol=1e-6)
    # Without adapters=, both subtract every adapter: "up" (never merged) moves away from its base.
    wrong = jp.unmerge(nnx_model, merged_nnx)
    assert not np.allclose(wrong.block.up.base_layer.kernel.get_value(), base["block"]["up"]["kernel"], atol=1e-4)


def test_nnx_unmerge_takes_the_given_adapter_leaves():
    peft, _, base, _, params, nnx_model = _two_adapters()
    moved = randomize(params, peft.trainable, jax.random.key(7))
    _, other = nnx_twin(peft, moved)
    merged = jp.merge(other)  # holds `other`'s update, not nnx_model's
    for adapter in (other, nnx.state(other, jp.PeftParam)):
        back = jp.unmerge(nnx_model, merged, adapter)
        np.testing.assert_allclose(back.block.query.base_layer.kernel.get_value(), base["block"]["query"]["kernel"],
                                   atol=1e-5)
        leaf = lambda m: getattr(m.block.query, "lora_a@a").get_value()  # noqa: E731
        np.testing.assert_array_equal(leaf(back), leaf(other))
    with pytest.raises(TypeError, match="adapter must be"):
        jp.unmerge(nnx_model, merged, {"block": {}})


@pytest.mark.parametrize("binding", ["linen", "nnx"])
def test_adapters_disabled_and_use_adapters_behave_the_same(binding):
    peft, model, base, peft_model, params, nnx_model = _two_adapters()
    want_base = model.apply({"params": base}, TOKENS)
    if binding == "linen":
        run = lambda m: m.apply(params, TOKENS)  # noqa: E731
        subject, only_a = peft_model, peft_model.apply(params, TOKENS, adapters="a")
    else:
        run = lambda m: m(TOKENS)  # noqa: E731
        subject = nnx_model
        with jp.use_adapters(nnx_model, "a"):
            only_a = nnx_model(TOKENS)
    full = run(subject)
    assert not np.allclose(full, want_base, atol=1e-4)
    with jp.adapters_disabled(subject) as plain:
        np.testing.assert_allclose(run(plain), want_base, rtol=1e-5, atol=1e-6)
    with jp.use_adapters(subject, "a") as chosen:
        np.testing.assert_allclose(run(chosen), only_a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run(subject), full, rtol=1e-6, atol=1e-6)  # restored after the block
    with pytest.raises(KeyError, match="no adapter named"):
        jp.use_adapters(subject, "zz").__enter__()


def test_delete_and_add_adapter_agree_across_bindings():
    peft, _, _, peft_model, params, nnx_model = _two_adapters()
    linen_model, linen_params = jp.delete_adapter(peft_model, "a", params)
    nnx_left = jp.delete_adapter(nnx_model, "a")
    assert jp.adapter_names(linen_model) == jp.adapter_names(nnx_left) == ("b",)
    np.testing.assert_allclose(linen_model.apply(linen_params, TOKENS), nnx_left(TOKENS), rtol=1e-5, atol=1e-5)
    extra = jp.lora(rank=2, targets=r"block/down$", adapter="c")
    linen_model, linen_params = jp.add_adapter(linen_model, extra, jax.random.key(5), linen_params)
    nnx_more = jp.add_adapter(nnx_left, extra, jax.random.key(5))
    np.testing.assert_array_equal(linen_params["block"]["down"]["lora_a@c"],
                                  getattr(nnx_more.block.down, "lora_a@c").get_value())


def test_nnx_quantize_refuses_what_no_forward_can_dequantize_naming_the_layer():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(4, 8, (3,), rngs=rngs)
            self.lin = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x):
            return self.lin(self.conv(x))

    model = Model(nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"'conv/kernel' \(Conv.kernel\)"):
        jp.quantize(model)
    quantized = jp.quantize(model, targets=r"lin/kernel$")
    assert type(quantized.lin.kernel.get_value()).__name__ == "QuantizedArray"
    assert type(model.lin.kernel.get_value()).__name__ != "QuantizedArray"  # the input is untouched
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    peft_model = jp.apply(jp.lora(rank=2, targets=r"lin$"), quantized, jax.random.key(1))
    want = jp.dequantize(quantized)(x)
    np.testing.assert_allclose(peft_model(x), want, rtol=1e-5, atol=1e-5)  # B = 0: the dequantized base
