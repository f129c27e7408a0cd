"""Stacked layers: Linen ``nn.scan`` (with and without ``nn.remat``) and ``nn.vmap`` stacks, NNX stacks built
with ``nnx.vmap`` and run with ``nnx.scan``. Reference: the same weights run unrolled, one layer at a time
(outputs AND gradients), and the invariants A: [L, *in, r], B: [L, r, *out], one init per slice."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from tests._toy import randomize

L, D, R = 3, 8, 2
X = jax.random.normal(jax.random.key(11), (2, 5, D))
TARGETS = r"(query|out)$"


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(2 * D, name="query")(x)
        return x + nn.Dense(D, name="out")(jax.nn.gelu(h)), None


class Stacked(nn.Module):
    kind: str = "scan"  # "scan", "remat_scan", "unrolled"

    @nn.compact
    def __call__(self, x):
        if self.kind == "unrolled":
            for i in range(L):
                x, _ = Block(name=f"layers_{i}")(x)
        else:
            block = nn.remat(Block) if self.kind == "remat_scan" else Block
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
            x, _ = stack(name="layers")(x, None)
        return nn.Dense(4, name="head")(x)


def _slice(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _unrolled_params(stacked):
    """The scanned params laid out for the unrolled twin: layers_i = slice i of every stacked leaf."""
    return {"head": stacked["head"], **{f"layers_{i}": _slice(stacked["layers"], i) for i in range(L)}}


@pytest.mark.parametrize("kind", ["scan", "remat_scan"])
@pytest.mark.parametrize("peft_fn", [lambda: jp.lora(rank=R, targets=TARGETS), lambda: jp.ia3(targets=r"query$")],
                         ids=["lora", "ia3"])
def test_linen_scan_equals_unrolled_outputs_and_gradients(kind, peft_fn):
    peft = peft_fn()
    model = Stacked(kind)
    peft_model, params = jp.apply(peft, model, jax.random.key(0), X)
    leaves = jp.prune(jp.partition(params, peft.trainable)[0])["layers"]
    if "lora_a" in leaves["query"]:
        assert leaves["query"]["lora_a"].shape == (L, D, R) and leaves["query"]["lora_b"].shape == (L, R, 2 * D)
        a = np.asarray(leaves["query"]["lora_a"])
        assert not np.allclose(a[0], a[1])  # one independent init per slice
    params = randomize(params, peft.trainable, jax.random.key(1))

    twin, twin_params = jp.apply(peft, Stacked("unrolled"), jax.random.key(0), X)
    twin_params = _unrolled_params(params)
    y = peft_model.apply(params, X)
    np.testing.assert_allclose(y, twin.apply(twin_params, X), rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, model.apply({"params": jp.partition(params, peft.trainable)[1]}, X), atol=1e-4)

    def loss(trainable, frozen, m):
        return jnp.sum(m.apply(jp.combine(trainable, frozen), X) ** 2)

    t, f = jp.partition(params, peft.trainable)
    g = jax.jit(lambda t, f: jax.grad(loss)(t, f, peft_model))(t, f)
    tt, tf = jp.partition(twin_params, peft.trainable)
    g_twin = jax.grad(loss)(tt, tf, twin)
    g, g_twin = jp.prune(g), jp.prune(g_twin)
    for i in range(L):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                     _slice(g["layers"], i), g_twin[f"layers_{i}"])


def test_linen_scan_merge_unmerge_and_disable():
    peft = jp.lora(rank=R, targets=TARGETS)
    model = Stacked("scan")
    peft_model, params = jp.apply(peft, model, jax.random.key(0), X)
    params = randomize(params, peft.trainable, jax.random.key(1))
    merged = jp.merge(peft_model, params)
    assert merged["layers"]["query"]["kernel"].shape == (L, D, 2 * D)
    # Reference: W_l + s A_l B_l per slice, in float64 NumPy.
    node = params["layers"]["query"]
    scale = peft.scale_at("layers/query")
    for i in range(L):
        want = np.asarray(node["kernel"][i], np.float64) + scale * np.asarray(node["lora_a"][i], np.float64) @ \
            np.asarray(node["lora_b"][i], np.float64)
        np.testing.assert_allclose(merged["layers"]["query"]["kernel"][i], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.apply({"params": merged}, X), peft_model.apply(params, X), rtol=1e-5, atol=1e-5)
    back = jp.unmerge(peft_model, merged, params)
    np.testing.assert_allclose(back["layers"]["query"]["kernel"], node["kernel"], atol=1e-5)
    with jp.adapters_disabled(peft_model) as plain:
        base = jp.partition(params, peft.trainable)[1]
        np.testing.assert_allclose(plain.apply(params, X), model.apply({"params": base}, X), rtol=1e-6, atol=1e-6)


class Ensemble(nn.Module):
    """An ``nn.vmap`` stack: L independent blocks, each on its own slice of the input."""

    @nn.compact
    def __call__(self, x):
        stack = nn.vmap(Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(0, None))
        y, _ = stack(name="members")(x, None)
        return y


def test_linen_vmap_stack_equals_each_member():
    peft = jp.lora(rank=R, targets=TARGETS)
    xs = jnp.stack([X * (i + 1) for i in range(L)])
    peft_model, params = jp.apply(peft, Ensemble(), jax.random.key(0), xs)
    params = randomize(params, peft.trainable, jax.random.key(1))
    assert params["members"]["out"]["lora_b"].shape == (L, R, D)
    one, one_params = jp.apply(peft, Block(), jax.random.key(0), X)
    ys = peft_model.apply(params, xs)
    for i in range(L):
        np.testing.assert_allclose(ys[i], one.apply(_slice(params["members"], i), xs[i])[0], rtol=1e-5, atol=1e-5)


# -- NNX: nnx.vmap builds the stack, nnx.scan runs it ------------------------------------------------


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(D, 2 * D, rngs=rngs)
        self.out = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        return x + self.out(jax.nn.gelu(self.query(x)))


class NnxStacked(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NnxBlock(rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def run(x, layer):
            return layer(x)

        return run(x, self.layers)


def test_nnx_vmap_stack_run_with_scan_equals_unrolled_and_linen_layout():
    peft = jp.lora(rank=R, targets=TARGETS)
    model = jp.apply(peft, NnxStacked(nnx.Rngs(0)), jax.random.key(0))
    assert model.layers.query.lora_a.get_value().shape == (L, D, R)
    assert model.layers.query.lora_b.get_value().shape == (L, R, 2 * D)
    # Move B off zero so the adapter matters.
    b = model.layers.query.lora_b
    b.set_value(jax.random.normal(jax.random.key(3), b.get_value().shape) * 0.3)
    y = model(X)
    # Unrolled reference: each slice of every Variable put into a plain NnxBlock, with LoRA applied by hand.
    state = nnx.state(model)
    x = X
    for i in range(L):
        sl = jax.tree.map(lambda a: a[i], state["layers"])
        q = sl["query"]["base_layer"]
        h = x @ q["kernel"] + q["bias"] + peft.scale_at("layers/query") * (x @ sl["query"]["lora_a"]) @ sl["query"]["lora_b"]
        o = sl["out"]["base_layer"]
        x = x + jax.nn.gelu(h) @ o["kernel"] + o["bias"] + peft.scale_at("layers/out") * \
            (jax.nn.gelu(h) @ sl["out"]["lora_a"]) @ sl["out"]["lora_b"]
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    merged = jp.merge(model)
    np.testing.assert_allclose(merged(X), y, rtol=1e-5, atol=1e-5)
    assert isinstance(merged.layers.query, nnx.Linear)

    # Gradients through nnx.scan equal the unrolled ones (w.r.t. the LoRA leaves).
    def loss(m):
        return jnp.sum(m(X) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, jp.PeftParam))(model)
    assert grads["layers"]["query"]["lora_b"].shape == (L, R, 2 * D)


# -- the reference LMs' scan_layers option ------------------------------------------------------------


def test_reference_lms_scan_layers_equal_unrolled_and_each_other():
    from jaxpeft.models.config import LMConfig
    from jaxpeft.models.linen_lm import LinenLM
    from jaxpeft.models.nnx_lm import NnxLM

    config = LMConfig.tiny(num_layers=L)
    tokens = jnp.array([[1, 5, 7, 2, 9, 3], [4, 4, 8, 1, 0, 6]])
    unrolled = LinenLM(config)
    params = unrolled.init(jax.random.key(0), tokens)["params"]
    stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
    stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(L)])
    scanned = LinenLM(config.replace(scan_layers=True))
    np.testing.assert_allclose(scanned.apply({"params": stacked}, tokens), unrolled.apply({"params": params}, tokens),
                               rtol=1e-5, atol=1e-5)
    peft = jp.lora(rank=R, targets=r"attn/(query|value)$")
    peft_model, peft_params = jp.apply(peft, scanned, jax.random.key(1), tokens, params=stacked)
    assert peft_params["layers"]["attn"]["query"]["lora_a"].shape == (L, config.d_model, R)
    nnx_model = NnxLM(config.replace(scan_layers=True), rngs=nnx.Rngs(0))
    nnx.update(nnx_model, stacked)
    nnx_peft = jp.apply(peft, nnx_model, jax.random.key(1))
    # Same seed, same adapters; same outputs once B moves off zero.
    np.testing.assert_array_equal(nnx_peft.layers.attn.query.lora_a.get_value(),
                                  peft_params["layers"]["attn"]["query"]["lora_a"])
    peft_params = randomize(peft_params, peft.trainable, jax.random.key(2))
    nnx.update(nnx_peft, jp.prune(jp.partition(peft_params, peft.trainable)[0]))
    np.testing.assert_allclose(nnx_peft(tokens), peft_model.apply(peft_params, tokens), rtol=1e-5, atol=1e-5)
