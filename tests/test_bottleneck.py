"""Bottleneck adapters (Houlsby, Pfeiffer): math against float64 NumPy, bindings, placement, training."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.demo import data
from jaxpeft.methods.bottleneck import HOULSBY_TARGETS, PFEIFFER_TARGETS, BottleneckAdapter, houlsby, pfeiffer
from jaxpeft.models import LinenLM, LMConfig, NnxLM, nnx_from_linen_params

CONFIG = LMConfig.tiny()
TOKENS = jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]], jnp.int32)
D, V = 8, 12

# ----------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf)
NP_ACTIVATIONS = {
    "relu": lambda h: np.maximum(h, 0.0),
    "gelu": lambda h: 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0))),  # exact GELU
    "swish": lambda h: h / (1.0 + np.exp(-h)),
}


def np_adapter(y, down, up, down_bias, up_bias, activation="relu", scale=1.0):
    """float64 ``y + s * act(y down + b_d) up + b_u`` on ``y: [N, d]``."""
    h = y @ down + (0.0 if down_bias is None else down_bias)
    return y + scale * (NP_ACTIVATIONS[activation](h) @ up + (0.0 if up_bias is None else up_bias))


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def randomize(tree, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def drop_none(tree):
    if isinstance(tree, dict):
        out = {k: drop_none(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
    return tree


def random_adapter(params, peft, key):
    """``params`` with every leaf of ``peft`` random (so ``up`` is not zero)."""
    trainable, frozen = jp.partition(params, peft.trainable)
    return jp.combine(randomize(trainable, key), frozen)


# ----------------------------------------------------------------------------------------------
# Toy models: a multi-dimensional output site (DenseGeneral), an MLP, and Flax's own attention
# ----------------------------------------------------------------------------------------------


class LinenToy(nn.Module):
    """embed -> proj (DenseGeneral, out (2, 4)) -> mlp/up, mlp/down -> head."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="embed")(tokens)
        h = nn.DenseGeneral((2, 4), name="proj")(x).reshape(x.shape)
        h = nn.relu(nn.Dense(16, name="up")(h))
        return nn.Dense(V, name="head")(x + nn.Dense(D, name="down")(h))


def np_toy(params, tokens, proj=None, down=None):
    """The toy in float64; ``proj`` / ``down`` are adapters ``y -> y'`` on ``[N, d]`` outputs."""
    p = f64(params)
    x = p["embed"]["embedding"][np.asarray(tokens)]
    y = np.tensordot(x, p["proj"]["kernel"], axes=1) + p["proj"]["bias"]  # [b, s, 2, 4]
    if proj is not None:
        y = proj(y.reshape(-1, 8)).reshape(y.shape)
    h = np.maximum(y.reshape(x.shape) @ p["up"]["kernel"] + p["up"]["bias"], 0.0)
    z = h @ p["down"]["kernel"] + p["down"]["bias"]
    if down is not None:
        z = down(z.reshape(-1, D)).reshape(z.shape)
    return (x + z) @ p["head"]["kernel"] + p["head"]["bias"]


class LinenMha(nn.Module):
    """A block built from ``nn.MultiHeadDotProductAttention``: its output projection is ``attn/out``."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="embed")(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D, name="attn")(x)
        x = x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(16, name="up")(x)))
        return nn.Dense(V, name="head")(x)


class NnxMha(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, qkv_features=D, decode=False, rngs=rngs)
        self.up = nnx.Linear(D, 16, rngs=rngs)
        self.down = nnx.Linear(16, D, rngs=rngs)
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = x + self.attn(x)
        x = x + self.down(nnx.gelu(self.up(x)))
        return self.head(x)


def lm_setup(peft, config=CONFIG, tokens=TOKENS):
    model = LinenLM(config)
    base = model.init(jax.random.key(0), tokens)["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), tokens, params=base)
    return model, base, peft_model, params


def run_fn(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


# ----------------------------------------------------------------------------------------------
# Identity at init, every placement, Linen and NNX
# ----------------------------------------------------------------------------------------------

PLACEMENTS = {"houlsby": houlsby, "pfeiffer": pfeiffer}


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_linen_lm_identity_at_init(placement, use_jit):
    model, base, peft_model, params = lm_setup(PLACEMENTS[placement](bottleneck=4))
    # Both jitted or both not: XLA's fusions round differently from op-by-op execution.
    expected = run_fn(lambda p, t: model.apply({"params": p}, t), use_jit)(base, TOKENS)
    np.testing.assert_array_equal(run_fn(peft_model.apply, use_jit)(params, TOKENS), expected)
    sites = [p.site.path for p in peft_model.placements]
    wanted = {"houlsby": ("attn/out", "mlp/down"), "pfeiffer": ("mlp/down",)}[placement]
    assert sites == [f"layers_{i}/{s}" for i in range(CONFIG.num_layers) for s in wanted]


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_nnx_lm_identity_at_init(placement, use_jit):
    base_model = NnxLM(CONFIG, rngs=nnx.Rngs(0))
    peft_model = jp.apply(PLACEMENTS[placement](bottleneck=4), base_model, jax.random.key(1))
    run = nnx.jit(lambda m, t: m(t)) if use_jit else (lambda m, t: m(t))
    np.testing.assert_array_equal(run(peft_model, TOKENS), run(base_model, TOKENS))
    wrapped = sorted("/".join(map(str, path)) for path, _ in jp.peft_layers(peft_model))
    assert len(wrapped) == {"houlsby": 4, "pfeiffer": 2}[placement]
    assert all(p.endswith(("attn/out", "mlp/down")) for p in wrapped)


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_flax_multi_head_attention_identity_at_init(placement):
    # Flax's attention modules have their output projection at `out` (a DenseGeneral / LinearGeneral
    # over (heads, head_dim)): the presets reach it with `targets` naming it.
    targets = {"houlsby": r"(attn/out|down)$", "pfeiffer": r"(^|/)down$"}[placement]
    peft = PLACEMENTS[placement](bottleneck=4, targets=targets)
    model = LinenMha()
    base = model.init(jax.random.key(0), TOKENS)["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=base)
    wanted = ["attn/out", "down"] if placement == "houlsby" else ["down"]
    assert [p.site.path for p in peft_model.placements] == wanted
    np.testing.assert_array_equal(peft_model.apply(params, TOKENS), model.apply({"params": base}, TOKENS))
    params = random_adapter(params, peft, jax.random.key(2))
    assert not np.allclose(peft_model.apply(params, TOKENS), model.apply({"params": base}, TOKENS))

    base_nnx = NnxMha(nnx.Rngs(0))
    peft_nnx = jp.apply(peft, base_nnx, jax.random.key(1))
    assert placement == "pfeiffer" or type(peft_nnx.attn.out.base_layer).__name__ == "LinearGeneral"
    np.testing.assert_array_equal(peft_nnx(TOKENS), base_nnx(TOKENS))


def test_default_placements():
    assert houlsby().targets == HOULSBY_TARGETS == r"(attn/out|mlp/down)$"
    assert pfeiffer().targets == PFEIFFER_TARGETS == r"mlp/down$"
    assert houlsby().reduction_factor == 16 and houlsby().bottleneck is None
    _, _, peft_model, params = lm_setup(houlsby())  # d = 32: m = 2
    assert params["layers_0"]["mlp"]["down"]["bottleneck_down"].shape == (32, 2)


# ----------------------------------------------------------------------------------------------
# Math: the adapter against float64 NumPy, random params
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "equation, x_shape, kernel_shape",
    [
        ("...i,io->...o", (2, 3, 8), (8, 6)),  # Dense
        ("...a,abc->...bc", (2, 3, 8), (8, 2, 4)),  # DenseGeneral with out_shape (2, 4): d = 8
        ("...ab,abc->...c", (2, 3, 2, 4), (2, 4, 6)),  # an attention output projection
        ("btd,dnh->bnth", (2, 3, 8), (8, 2, 4)),  # Einsum whose output axes are not trailing
    ],
)
def test_apply_site_matches_numpy(equation, x_shape, kernel_shape):
    site = jp.Site("layer", "Test", equation, kernel_shape)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, x_shape)
    kernel = jax.random.normal(k2, kernel_shape) / 3
    base = np.einsum(equation, *f64((x, kernel)))
    labels = equation.split("->")[1].replace("...", "")
    out_axes = [labels.index(c) + base.ndim - len(labels) for c in site.out_labels]
    other = [i for i in range(base.ndim) if i not in out_axes]
    moved = np.transpose(base, other + out_axes)  # output axes last, in kernel order: [..., d]
    for activation, use_bias in [("relu", True), ("gelu", False), ("swish", True)]:
        peft = BottleneckAdapter(bottleneck=3, activation=activation, use_bias=use_bias, scale=0.7)
        params = randomize(peft.init_site(k3, site), jax.random.key(4), scale=0.5)
        y = jax.jit(lambda p, x: peft.apply_site(p, site, x, lambda x: jnp.einsum(equation, x, kernel)))(params, x)
        p = [f64(params[n]) for n in peft.param_names]
        down, up = p[0].reshape(site.out_features, 3), p[1].reshape(3, site.out_features)
        biases = (p[2], p[3].reshape(-1)) if use_bias else (None, None)
        expected = np_adapter(moved.reshape(-1, site.out_features), down, up, *biases, activation, 0.7)
        expected = np.transpose(expected.reshape(moved.shape), np.argsort(other + out_axes))
        assert y.shape == base.shape and y.dtype == jnp.float32
        # fp32 against float64 on O(1) values: a few ulps of accumulated rounding.
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5, err_msg=activation)


@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_toy_matches_numpy(use_jit):
    peft = BottleneckAdapter(bottleneck=3, activation="gelu", targets=r"^(proj|down)$", scale=2.0)
    model = LinenToy()
    base = model.init(jax.random.key(0), TOKENS)["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=base)
    assert params["proj"]["bottleneck_down"].shape == (2, 4, 3)  # the kernel's output axes, then m
    assert params["proj"]["bottleneck_up"].shape == (3, 2, 4)
    params = random_adapter(params, peft, jax.random.key(2))
    p = f64(params)

    def adapter(node):
        d = node["bottleneck_down"].reshape(-1, 3)
        return lambda y: np_adapter(y, d, node["bottleneck_up"].reshape(3, -1), node["bottleneck_down_bias"],
                                    node["bottleneck_up_bias"].reshape(-1), "gelu", 2.0)

    expected = np_toy(params, TOKENS, proj=adapter(p["proj"]), down=adapter(p["down"]))
    np.testing.assert_allclose(run_fn(peft_model.apply, use_jit)(params, TOKENS), expected, rtol=1e-5, atol=1e-5)


def test_bf16_output_keeps_its_dtype():
    site = jp.Site("layers_0/mlp/down", "Dense", "...i,io->...o", (64, 32), "bfloat16")
    peft = houlsby(bottleneck=4)
    params = peft.init_site(jax.random.key(0), site)
    assert all(v.dtype == jnp.float32 for v in params.values())
    y = jax.random.normal(jax.random.key(1), (2, 3, 32), jnp.bfloat16)
    out = peft.apply_site(params, site, None, lambda x: y)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, y)  # up = 0: exactly the base output
    out = peft.apply_site(randomize(params, jax.random.key(2)), site, None, lambda x: y)
    assert out.dtype == jnp.bfloat16 and not np.array_equal(out, y)


# ----------------------------------------------------------------------------------------------
# Bindings agree, merge refuses, composition, counts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_and_nnx_agree_on_the_reference_lm(use_jit):
    peft = houlsby(bottleneck=4, activation="swish")
    _, base, linen_model, params = lm_setup(peft)
    params = random_adapter(params, peft, jax.random.key(3))
    trainable, _ = jp.partition(params, peft.trainable)
    nnx_model = jp.apply(peft, nnx_from_linen_params(CONFIG, base), jax.random.key(9))
    nnx.update(nnx_model, drop_none(trainable))  # the adapter leaves have the same paths in NNX
    run = nnx.jit(lambda m, t: m(t)) if use_jit else (lambda m, t: m(t))
    np.testing.assert_allclose(run(nnx_model, TOKENS), linen_model.apply(params, TOKENS), rtol=1e-5, atol=1e-5)
    _, nnx_leaves, _ = nnx.split(nnx_model, jp.PeftParam, ...)
    assert sorted(jp.paths(nnx.to_pure_dict(nnx_leaves))) == sorted(jp.paths(drop_none(trainable)))


def test_merge_raises_and_says_why():
    peft = houlsby(bottleneck=4)
    _, _, peft_model, params = lm_setup(peft)
    with pytest.raises(ValueError, match="cannot be merged into a kernel.*nonlinear"):
        jp.merge(peft_model, params)
    nnx_model = jp.apply(peft, NnxLM(CONFIG, rngs=nnx.Rngs(0)), jax.random.key(1))
    with pytest.raises(ValueError, match="cannot be merged into a kernel"):
        jp.merge(nnx_model)


def test_named_adapters_merge_the_lora_and_drop_the_adapter():
    lora = jp.lora(2, targets=r"attn/(query|value)$", adapter="l")
    adapter = houlsby(bottleneck=4, adapter="h")
    peft = jp.chain(lora, adapter)
    model, base, peft_model, params = lm_setup(peft)
    assert "bottleneck_down@h" in params["layers_0"]["attn"]["out"]
    params = random_adapter(params, peft, jax.random.key(5))
    merged = jp.merge(peft_model, params, adapters=["l"])
    assert not any("@" in p for p in jp.paths(merged)) and jp.paths(merged) == jp.paths(base)
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), peft_model.apply(params, TOKENS, adapters="l"),
                               rtol=1e-5, atol=1e-5)


def test_chain_with_lora_on_the_same_site_matches_numpy():
    # LoRA wraps the base layer, the adapter wraps LoRA: adapter(x (W + s A B) + b).
    peft = jp.chain(jp.lora(2, alpha=4, targets=r"^down$"), BottleneckAdapter(bottleneck=3, targets=r"^down$"))
    model = LinenToy()
    base = model.init(jax.random.key(0), TOKENS)["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=base)
    np.testing.assert_array_equal(peft_model.apply(params, TOKENS), model.apply({"params": base}, TOKENS))
    params = random_adapter(params, peft, jax.random.key(2))
    p = f64(params)
    node = p["down"]
    kernel = node["kernel"] + 2.0 * node["lora_a"] @ node["lora_b"]
    lora_params = {**p, "down": {**node, "kernel": kernel}}
    adapter = lambda y: np_adapter(y, node["bottleneck_down"], node["bottleneck_up"],  # noqa: E731
                                   node["bottleneck_down_bias"], node["bottleneck_up_bias"])
    np.testing.assert_allclose(peft_model.apply(params, TOKENS), np_toy(lora_params, TOKENS, down=adapter),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_bias", [True, False])
def test_trainable_count_is_the_formula(use_bias):
    m, d = 4, CONFIG.d_model
    peft = houlsby(bottleneck=m, use_bias=use_bias)
    _, _, peft_model, params = lm_setup(peft)
    per_site = 2 * d * m + (d + m if use_bias else 0)  # Houlsby sec. 2.1: 2md + d + m
    sites = 2 * CONFIG.num_layers
    assert jp.summary(params, peft.trainable).trainable_params == sites * per_site
    _, _, _, params = lm_setup(pfeiffer(reduction_factor=8, use_bias=use_bias))  # m = 32 // 8 = 4
    assert jp.summary(params, peft.trainable).trainable_params == CONFIG.num_layers * per_site


def test_chain_with_lora_trains_and_partitions():
    peft = jp.chain(jp.lora(4, targets=r"attn/(query|value)$"), houlsby(bottleneck=4))
    model, base, peft_model, params = lm_setup(peft)
    np.testing.assert_array_equal(peft_model.apply(params, TOKENS), model.apply({"params": base}, TOKENS))
    trainable, frozen = jp.partition(params, peft_model.trainable)
    names = {p.rsplit("/", 1)[1] for p, x in jp.leaves_with_paths(trainable) if x is not None}
    assert names == {"lora_a", "lora_b", *(f"bottleneck_{n}" for n in ("down", "up", "down_bias", "up_bias"))}

    def loss(t):
        logits = peft_model.apply(jp.combine(t, frozen), TOKENS)
        return jp.cross_entropy(logits, TOKENS)[0]

    grads = jax.jit(jax.grad(loss))(trainable)
    # up = 0 at init: only up (and its bias) get a gradient in the first step, as for LoRA's B.
    g = grads["layers_0"]["attn"]["out"]
    assert np.any(g["bottleneck_up"]) and np.any(g["bottleneck_up_bias"]) and not np.any(g["bottleneck_down"])
    assert np.any(grads["layers_0"]["attn"]["query"]["lora_b"])


def test_config_and_named_leaves():
    peft = pfeiffer(bottleneck=8, activation="gelu", adapter="fr", use_bias=False)
    assert peft.param_names == ("bottleneck_down@fr", "bottleneck_up@fr")
    config = json.loads(json.dumps(peft.config()))
    assert config["method"] == "bottleneck" and config["targets"] == PFEIFFER_TARGETS and config["adapter"] == "fr"
    assert BottleneckAdapter(bottleneck=2, targets=["a", "b"]).config()["targets"] == ["a", "b"]
    _, _, _, params = lm_setup(peft)
    assert set(params["layers_1"]["mlp"]["down"]) == {"kernel", "bias", "bottleneck_down@fr", "bottleneck_up@fr"}


# ----------------------------------------------------------------------------------------------
# Bad input fails early, naming what is wrong
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bottleneck=0), "bottleneck must be a positive int, got 0"),
        (dict(bottleneck=-3), "bottleneck must be a positive int"),
        (dict(bottleneck=2.5), "bottleneck must be a positive int"),
        (dict(bottleneck=4, reduction_factor=2), "exactly one of bottleneck"),
        (dict(reduction_factor=0), "reduction_factor must be a positive number"),
        (dict(bottleneck=4, activation="tanh"), "activation must be one of"),
        (dict(bottleneck=4, init="zeros"), "init must be one of"),
        (dict(bottleneck=4, adapter="a/b"), "adapter name"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BottleneckAdapter(**kwargs)
    with pytest.raises(ValueError, match=message):
        houlsby(**kwargs)


def test_reduction_factor_too_large_raises_before_any_work():
    calls = []

    class Probe(BottleneckAdapter):
        def init_site(self, key, site, base=None):
            calls.append(site.path)
            return super().init_site(key, site, base)

    peft = jp.chain(Probe(bottleneck=2, targets=r"attn/out$"), houlsby(reduction_factor=64, targets=r"mlp/down$"))
    with pytest.raises(ValueError, match=r"reduction_factor 64 at 'layers_0/mlp/down'.*d = 32.*\(64, 32\)"):
        lm_setup(peft)
    assert calls == []


def test_unsupported_target_is_named():
    with pytest.raises(TypeError, match="embed"):
        lm_setup(houlsby(bottleneck=2, targets=r"^embed$"))


# ----------------------------------------------------------------------------------------------
# Training: the demo task
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # CI budget: the contract table's rows check that a few steps lower the loss for every method
def test_houlsby_trains_the_demo_task():
    config = LMConfig.tiny(vocab_size=data.CharTokenizer().vocab_size)
    batches = data.batches("recipes", 8, 32, seed=0)
    example = next(batches)
    peft = houlsby(bottleneck=8, activation="gelu")
    model = LinenLM(config)
    peft_model, params = jp.apply(peft, model, jax.random.key(1), example["inputs"])
    trainable, frozen = jp.partition(params, peft_model.trainable)

    def loss_fn(trainable, frozen, batch, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(trainable, frozen), batch["inputs"]), batch["targets"])[0]

    evals = data.eval_set("recipes", 2, 8, 32)
    eval_loss = jax.jit(loss_fn)
    before = np.mean([eval_loss(trainable, frozen, b, None) for b in evals])
    opt = optax.adam(1e-2)
    step = jp.make_train_step(loss_fn, opt)
    result = jp.fit(step, jax.tree.map(jnp.copy, trainable), frozen, opt.init(trainable), batches, num_steps=30,
                    rng=None, progress=False)
    after = np.mean([eval_loss(result.trainable, frozen, b, None) for b in evals])
    assert after < before - 0.3, (before, after)
