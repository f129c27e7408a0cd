"""(IA)^3 against dense float64 NumPy references: output vs input scaling, merge / unmerge, both bindings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from _toy import R, TOKENS, NnxModel, numpy_forward, linen_setup, randomize, nnx_twin
from jaxpeft.demo import data
from jaxpeft.methods import ia3
from jaxpeft.models import LinenLM, LMConfig

TARGETS = r"block/(key|value|down)$"
FEEDFORWARD = r"down$"




def ia3_effective(path, node):
    """(IA)^3 densely: output sites W * l, b * l; feedforward (input) sites rows of W times l, b as is."""
    w, b = node["kernel"], node["bias"]
    for name in ("ia3_scale", "ia3_scale@fr"):
        if name not in node:
            continue
        l = node[name]
        if l.ndim == w.ndim:  # [*in_shape, 1]: the input side
            w = w * l
        else:
            w, b = w * l, b * l
    return w, b


@pytest.mark.parametrize("use_jit", [False, True])
def test_ones_are_the_identity(use_jit):
    model, base, peft_model, params = linen_setup(ia3(TARGETS, FEEDFORWARD))
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    run_base = jax.jit(lambda p, t: model.apply({"params": p}, t)) if use_jit else (
        lambda p, t: model.apply({"params": p}, t))
    # x * 1 and y * 1 are exact in float32: the base's output bit for bit
    np.testing.assert_array_equal(run(params, TOKENS), run_base(base, TOKENS))

    base_model = NnxModel(nnx.Rngs(0))
    model = jp.apply(ia3(TARGETS, FEEDFORWARD), base_model, jax.random.key(1))
    np.testing.assert_array_equal(model(TOKENS), base_model(TOKENS))


def test_vector_shapes():
    _, _, _, params = linen_setup(ia3(TARGETS, FEEDFORWARD))
    blk = params["block"]
    assert blk["key"]["ia3_scale"].shape == (2, 4)  # the Einsum's output axes
    assert blk["value"]["ia3_scale"].shape == (2, 4)  # the DenseGeneral's output axes
    assert blk["down"]["ia3_scale"].shape == (16, 1)  # the down projection's input (kernel-broadcastable)
    assert all(np.all(blk[n]["ia3_scale"] == 1) for n in ("key", "value", "down"))


@pytest.mark.parametrize("use_jit", [False, True])
def test_forward_matches_dense_numpy(use_jit):
    peft = ia3(TARGETS, FEEDFORWARD)
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(2))
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    # float32 vs float64 through five layers and a gelu: a few ulps on O(1) outputs
    np.testing.assert_allclose(run(params, TOKENS), numpy_forward(params, TOKENS, ia3_effective), rtol=1e-5, atol=1e-5)


def test_feedforward_scales_the_input_and_others_the_output_bias_included():
    site = jp.Site("mlp/down", "Dense", "...i,io->...o", (4, 3))
    w = jnp.arange(12.0).reshape(4, 3) / 10
    b = jnp.array([1.0, 2.0, 3.0])
    x = jnp.ones((2, 4))
    base_fn = lambda x: x @ w + b  # noqa: E731

    as_input = ia3("down$", feedforward="down$")
    l_in = jnp.array([[2.0], [1.0], [1.0], [1.0]])  # input feature 0 doubled
    y = as_input.apply_site({"ia3_scale": l_in}, site, x, base_fn)
    np.testing.assert_allclose(y, x @ w + b + x[:, :1] * w[0], rtol=1e-6)  # every output moves, bias untouched

    as_output = ia3("down$", feedforward=None)
    l_out = jnp.array([2.0, 1.0, 1.0])  # output feature 0 doubled
    y = as_output.apply_site({"ia3_scale": l_out}, site, x, base_fn)
    expected = np.array(x @ w + b)
    expected[:, 0] *= 2  # the whole output, its bias included (as HF PEFT)
    np.testing.assert_allclose(y, expected, rtol=1e-6)


def test_output_scaling_follows_a_permuted_einsum_output():
    """An Einsum whose output axes come in another order than the kernel's (and its bias, Flax's layout)."""
    site = jp.Site("attn/key", "Einsum", "btd,dnh->bthn", (5, 2, 3))
    k = jax.random.split(jax.random.key(0), 4)
    w, b = jax.random.normal(k[0], (5, 2, 3)), jax.random.normal(k[1], (3, 2))  # bias: [h, n]
    l = jax.random.normal(k[2], (2, 3))  # [n, h]: the kernel's output axes
    x = jax.random.normal(k[3], (2, 4, 5))
    peft = ia3("key", feedforward=None)
    base_fn = lambda x: jnp.einsum("btd,dnh->bthn", x, w) + b  # noqa: E731
    y = peft.apply_site({"ia3_scale": l}, site, x, base_fn)
    merged = peft.merge_site({"ia3_scale": l}, {"kernel": w, "bias": b}, site=site)
    y_merged = jnp.einsum("btd,dnh->bthn", x, merged["kernel"]) + merged["bias"]
    x64, w64 = np.asarray(x, np.float64), np.asarray(w * l, np.float64)
    expected = np.einsum("btd,dnh->bthn", x64, w64) + np.asarray(b * l.T)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_merged, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_merge_and_unmerge(use_jit):
    peft = ia3(TARGETS, FEEDFORWARD)
    model, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(3))
    merge = jax.jit(lambda p: jp.merge(peft_model, p)) if use_jit else (lambda p: jp.merge(peft_model, p))
    merged = merge(params)
    assert not any("ia3" in p for p in jp.paths(merged))
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), peft_model.apply(params, TOKENS),
                               rtol=1e-5, atol=1e-5)
    trainable, _ = jp.partition(params, peft.trainable)
    back = jp.unmerge(peft_model, merged, trainable)
    assert jp.paths(back) == jp.paths(params)
    # a product then a quotient in float32: within an ulp or two
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), back, params)


def test_nnx_merge_and_unmerge():
    peft = ia3(TARGETS, FEEDFORWARD)
    _, _, _, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(4))
    base_model, model = nnx_twin(peft, params)
    kernel = np.asarray(base_model.block.down.kernel[...])
    merged = jp.merge(model)
    assert isinstance(merged.block.down, nnx.Linear)
    np.testing.assert_allclose(merged(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)
    back = jp.unmerge(model, merged)
    np.testing.assert_allclose(back.block.down.base_layer.kernel[...], kernel, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(back(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)


def test_unmerge_of_a_zero_scale_refuses():
    peft = ia3("query", feedforward=None)
    base = {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    merged = peft.merge_site({"ia3_scale": jnp.array([0.0, 2.0])}, base)
    with pytest.raises(ValueError, match="1 entries of the scale are 0"):
        peft.unmerge_site({"ia3_scale": jnp.array([0.0, 2.0])}, merged)


def test_linen_and_nnx_agree():
    peft = ia3(TARGETS, FEEDFORWARD)
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(5))
    _, model = nnx_twin(peft, params)
    np.testing.assert_allclose(model(TOKENS), peft_model.apply(params, TOKENS), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", ["lora_first", "ia3_first"])
def test_chain_with_lora(order):
    """LoRA on query / value / down and IA3 on key / value / down: one site holds both, in either order."""
    lora = jp.lora(R, 4, targets=r"block/(query|value|down)$")
    scaling = ia3(TARGETS, FEEDFORWARD, adapter="fr")
    peft = jp.chain(lora, scaling) if order == "lora_first" else jp.chain(scaling, lora)
    model, _, peft_model, params = linen_setup(peft)
    assert sorted(params["block"]["value"]) == ["bias", "ia3_scale@fr", "kernel", "lora_a", "lora_b"]
    params = randomize(params, peft.trainable, jax.random.key(6))

    def effective(path, node):
        w, b = node["kernel"], node["bias"]
        lora_w = 4 / R * np.tensordot(node["lora_a"], node["lora_b"], axes=1) if "lora_a" in node else 0.0
        l = node.get("ia3_scale@fr")
        if l is None:
            return w + lora_w, b
        if l.ndim == w.ndim:  # input scaling commutes with the additive update: (x*l)(W + sAB) vs (x*l)W + x sAB
            return (w + lora_w) * l if order == "lora_first" else w * l + lora_w, b
        return ((w + lora_w) * l, b * l) if order == "lora_first" else (w * l + lora_w, b * l)

    np.testing.assert_allclose(peft_model.apply(params, TOKENS), numpy_forward(params, TOKENS, effective),
                               rtol=1e-5, atol=1e-5)
    merged = jp.merge(peft_model, params)
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), peft_model.apply(params, TOKENS),
                               rtol=1e-5, atol=1e-5)
    trainable, _ = jp.partition(params, peft.trainable)
    back = jp.unmerge(peft_model, merged, trainable)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), back, params)


def test_config_and_selectors():
    peft = ia3(["key$", "value$", "down$"], feedforward=["down$"], adapter="x")
    assert peft.config() == {"method": "ia3", "targets": ["key$", "value$", "down$"], "feedforward": ["down$"],
                             "param_dtype": "float32", "adapter": "x"}
    assert peft.param_names == ("ia3_scale@x",)
    assert ia3(feedforward=None).param_axes == {"ia3_scale": ("out",)}
    with pytest.raises(TypeError, match="feedforward is a regex"):
        ia3(feedforward=nn.Dense)
    with pytest.raises(ValueError, match="adapter name"):
        ia3(adapter="")


def train_losses(peft, learning_rate=1e-2, num_steps=35):
    """Mean train loss over steps 1-5 and 31-35 of the demo task (each step a fresh batch)."""
    model = LinenLM(LMConfig.tiny(vocab_size=data.CharTokenizer().vocab_size))
    batches = data.batches("recipes", 8, 32, seed=0)
    example = next(batches)
    base = model.init(jax.random.key(0), example["inputs"])["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), example["inputs"], params=base)
    trainable, frozen = jp.partition(params, peft_model.trainable)

    def loss_fn(trainable, frozen, batch, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(trainable, frozen), batch["inputs"]), batch["targets"])[0]

    opt = optax.adam(learning_rate)
    step = jp.make_train_step(loss_fn, opt)
    result = jp.fit(step, trainable, frozen, opt.init(trainable), batches, num_steps=num_steps, rng=None,
                    progress=False, log_every=5)
    return result.history[0]["loss"], result.history[-1]["loss"]


@pytest.mark.slow  # CI budget: the contract table's rows check that a few steps lower the loss for every method
def test_trains_the_demo_task():
    first, last = train_losses(ia3(r"attn/(key|value)$|mlp/down$", feedforward=r"mlp/down$"), learning_rate=3e-2)
    assert last < first - 0.3, (first, last)
