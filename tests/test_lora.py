"""LoRA math and bindings, checked against dense NumPy references and invariants."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp

D, R = 8, 2
TARGETS = r"attn/(query|value|key)$"


class LinenAttn(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Dense(D, name="query")(x)  # [b, s, d]
        v = nn.DenseGeneral((2, 4), name="value")(x)  # [b, s, 2, 4]
        k = nn.Einsum((D, 2, 4), "btd,dnh->btnh", name="key")(x)  # [b, s, 2, 4]
        return q + v.reshape(q.shape) + k.reshape(q.shape)


class LinenModel(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(10, D, name="embed", param_dtype=self.dtype)(tokens)
        return nn.Dense(10, name="head")(LinenAttn(name="attn")(x))


class NnxAttn(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(D, D, rngs=rngs)
        self.value = nnx.LinearGeneral(D, (2, 4), rngs=rngs)
        self.key = nnx.Einsum("btd,dnh->btnh", (D, 2, 4), (2, 4), rngs=rngs)

    def __call__(self, x):
        q = self.query(x)
        return q + self.value(x).reshape(q.shape) + self.key(x).reshape(q.shape)


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, D, rngs=rngs)
        self.attn = NnxAttn(rngs)
        self.head = nnx.Linear(D, 10, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.attn(self.embed(tokens)))


TOKENS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 0]])


def linen_setup(peft, dtype=jnp.float32):
    model = LinenModel(dtype)
    base = model.init(jax.random.key(0), TOKENS)["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=base)
    return model, base, peft_model, params


def nnx_from(params):
    """An NNX model holding exactly the Linen weights (the same dict structure)."""
    model = NnxModel(nnx.Rngs(0))
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    return model


def randomize(tree, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def numpy_forward(params, tokens, scale=None):
    """The toy model in NumPy, LoRA included when ``scale`` is given (independent reference)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["embedding"][np.asarray(tokens)]
    a = p["attn"]

    def lin(node, x, in_axes):
        w = node["kernel"]
        if scale is not None and "lora_a" in node:
            w = w + scale * np.tensordot(node["lora_a"], node["lora_b"], axes=1)
        y = np.tensordot(x, w, axes=in_axes)
        return y + node["bias"]

    q = lin(a["query"], x, 1)
    v = lin(a["value"], x, 1).reshape(q.shape)
    k = lin(a["key"], x, 1).reshape(q.shape)
    return lin(p["head"], q + v + k, 1)


@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_b_zero_equals_base(use_jit):
    model, base, peft_model, params = linen_setup(jp.lora(R, 4, targets=TARGETS))
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    np.testing.assert_array_equal(run(params, TOKENS), model.apply({"params": base}, TOKENS))


@pytest.mark.parametrize("use_jit", [False, True])
def test_nnx_b_zero_equals_base(use_jit):
    base_model = NnxModel(nnx.Rngs(0))
    peft_model = jp.apply(jp.lora(R, 4, targets=TARGETS), base_model, jax.random.key(1))
    run = nnx.jit(lambda m, t: m(t)) if use_jit else (lambda m, t: m(t))
    np.testing.assert_array_equal(run(peft_model, TOKENS), base_model(TOKENS))


def test_bf16_base_b_zero_equals_base():
    model, base, peft_model, params = linen_setup(jp.lora(R, targets=TARGETS), dtype=jnp.bfloat16)
    assert params["attn"]["query"]["lora_a"].dtype == jnp.float32
    np.testing.assert_array_equal(peft_model.apply(params, TOKENS), model.apply({"params": base}, TOKENS))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_matches_dense_numpy_reference(rslora, use_jit):
    peft = jp.lora(R, alpha=6, targets=TARGETS, rslora=rslora)
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, jax.random.key(2))
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    scale = 6 / (np.sqrt(R) if rslora else R)
    # fp32 against float64: a few ulps of accumulated rounding on O(1) outputs.
    np.testing.assert_allclose(run(params, TOKENS), numpy_forward(params, TOKENS, scale), rtol=1e-5, atol=1e-5)


def test_linen_and_nnx_bindings_agree():
    peft = jp.lora(R, alpha=4, targets=TARGETS)
    _, _, linen_model, params = linen_setup(peft)
    params = randomize(params, jax.random.key(3))
    nnx_peft = jp.apply(peft, nnx_from(_drop_none(jp.partition(params, peft.trainable)[1])), jax.random.key(9))
    nnx.update(nnx_peft, _drop_none(jp.partition(params, peft.trainable)[0]))
    np.testing.assert_allclose(nnx_peft(TOKENS), linen_model.apply(params, TOKENS), rtol=1e-6, atol=1e-6)


def _drop_none(tree):
    if isinstance(tree, dict):
        out = {k: _drop_none(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
    return tree


@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_merge_and_unmerge(use_jit):
    peft = jp.lora(R, alpha=4, targets=TARGETS)
    model, _, peft_model, params = linen_setup(peft)
    params = randomize(params, jax.random.key(4))
    trainable, frozen = jp.partition(params, peft_model.trainable)
    merge = jax.jit(lambda p: jp.merge(peft_model, p)) if use_jit else (lambda p: jp.merge(peft_model, p))
    merged = merge(params)
    assert not any("lora" in p for p in jp.paths(merged))
    assert jp.paths(merged) == jp.paths(frozen)
    # merged vs factored: different summation order, fp32 tolerance.
    np.testing.assert_allclose(
        model.apply({"params": merged}, TOKENS), peft_model.apply(params, TOKENS), rtol=1e-5, atol=1e-5
    )
    back = jp.unmerge(peft_model, merged, trainable)
    assert jp.paths(back) == jp.paths(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), back, params)
    # inputs are untouched
    assert "lora_a" in params["attn"]["query"]


def test_nnx_merge_and_unmerge():
    base_model = NnxModel(nnx.Rngs(0))
    base_kernel = np.asarray(base_model.attn.query.kernel[...])
    peft_model = jp.apply(jp.lora(R, alpha=4, targets=TARGETS), base_model, jax.random.key(1))
    graphdef, lora_state, rest = nnx.split(peft_model, jp.PeftParam, ...)
    peft_model = nnx.merge(graphdef, randomize(lora_state, jax.random.key(5)), rest)
    y = peft_model(TOKENS)
    merged = jp.merge(peft_model)
    assert isinstance(merged.attn.query, nnx.Linear)
    assert not list(jp.peft_layers(merged))
    np.testing.assert_allclose(merged(TOKENS), y, rtol=1e-5, atol=1e-5)
    back = jp.unmerge(peft_model, merged)
    np.testing.assert_allclose(back.attn.query.base_layer.kernel[...], base_kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(back(TOKENS), y, rtol=1e-5, atol=1e-5)
    # neither the base model nor the PEFT model changed
    np.testing.assert_array_equal(base_model.attn.query.kernel[...], base_kernel)
    np.testing.assert_array_equal(peft_model(TOKENS), y)


def test_disable_adapters_gives_base_back():
    model, base, peft_model, params = linen_setup(jp.lora(R, targets=TARGETS))
    params = jp.combine(*[randomize(t, jax.random.key(6)) if i == 0 else t for i, t in enumerate(
        jp.partition(params, r"lora_"))])
    expected = model.apply({"params": base}, TOKENS)
    assert not np.allclose(peft_model.apply(params, TOKENS), expected)
    np.testing.assert_array_equal(peft_model.apply(params, TOKENS, adapters=False), expected)

    base_model = NnxModel(nnx.Rngs(0))
    nnx_model = jp.apply(jp.lora(R, targets=TARGETS), base_model, jax.random.key(1))
    g, lora_state, rest = nnx.split(nnx_model, jp.PeftParam, ...)
    nnx_model = nnx.merge(g, randomize(lora_state, jax.random.key(7)), rest)
    with jp.adapters_disabled(nnx_model):
        np.testing.assert_array_equal(nnx_model(TOKENS), base_model(TOKENS))
    assert not np.allclose(nnx_model(TOKENS), base_model(TOKENS))


def test_trainable_partition_holds_only_lora_leaves():
    _, base, peft_model, params = linen_setup(jp.lora(R, targets=TARGETS))
    trainable, frozen = jp.partition(params, peft_model.trainable)
    train_paths = [p for p, x in jp.leaves_with_paths(trainable) if x is not None]
    assert sorted(train_paths) == sorted(f"attn/{n}/lora_{ab}" for n in ("query", "value", "key") for ab in "ab")
    assert [p for p, x in jp.leaves_with_paths(frozen) if x is not None] == jp.paths(base)
    # base arrays are shared, not copied
    assert params["attn"]["query"]["kernel"] is base["attn"]["query"]["kernel"]


def test_lora_shapes_and_init():
    _, _, _, params = linen_setup(jp.lora(R, targets=TARGETS))
    q, v = params["attn"]["query"], params["attn"]["value"]
    assert q["lora_a"].shape == (D, R) and q["lora_b"].shape == (R, D)
    assert v["lora_a"].shape == (D, R) and v["lora_b"].shape == (R, 2, 4)
    assert params["attn"]["key"]["lora_b"].shape == (R, 2, 4)
    bound = 1 / np.sqrt(D)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.all(np.abs(q["lora_a"]) <= bound) and np.abs(q["lora_a"]).max() > bound / 2
    assert not np.any(q["lora_b"])
    _, _, _, params = linen_setup(jp.lora(R, targets=TARGETS, init="gaussian"))
    assert not np.any(params["attn"]["query"]["lora_b"])


def test_dropout_only_with_rng_and_unbiased():
    peft = jp.lora(R, alpha=4, targets=r"attn/query$", dropout=0.5)
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, jax.random.key(8))
    clean = peft_model.apply(params, TOKENS)
    np.testing.assert_array_equal(peft_model.apply(params, TOKENS), clean)  # no rng: no dropout
    noisy = jax.vmap(lambda k: peft_model.apply(params, TOKENS, rngs={"dropout": k}))(
        jax.random.split(jax.random.key(0), 2000)
    )
    assert not np.allclose(noisy[0], clean)
    # inverted dropout is unbiased: the mean over 2000 masks is within ~4 standard errors.
    stderr = noisy.std(0) / np.sqrt(len(noisy))
    assert np.all(np.abs(noisy.mean(0) - clean) <= 4 * stderr + 1e-5)


def test_chain_of_two_loras_on_disjoint_targets():
    peft = jp.chain(jp.lora(2, alpha=2, targets=r"attn/query$"), jp.lora(1, alpha=3, targets=r"attn/value$"))
    _, _, peft_model, params = linen_setup(peft)
    assert params["attn"]["query"]["lora_a"].shape == (D, 2)
    assert params["attn"]["value"]["lora_a"].shape == (D, 1)
    trainable, _ = jp.partition(params, peft.trainable)
    assert len([x for x in jax.tree.leaves(trainable)]) == 4
    params = randomize(params, jax.random.key(10))
    # each site uses its own scale: query 2/2, value 3/1
    q, v = params["attn"]["query"], params["attn"]["value"]
    ref = dict(params)
    ref["attn"] = dict(params["attn"])
    ref["attn"]["query"] = {**q, "kernel": q["kernel"] + 1.0 * q["lora_a"] @ q["lora_b"]}
    ref["attn"]["value"] = {**v, "kernel": v["kernel"] + 3.0 * np.tensordot(v["lora_a"], v["lora_b"], 1)}
    ref = jax.tree.map(lambda x: x, _drop_none(jp.partition(ref, r"lora_")[1]))
    np.testing.assert_allclose(peft_model.apply(params, TOKENS), numpy_forward(ref, TOKENS), rtol=1e-5, atol=1e-5)


def test_chain_claiming_the_same_leaf_raises():
    peft = jp.chain(jp.lora(2, targets=r"attn/query$"), jp.lora(1, targets=r"query$"))
    with pytest.raises(ValueError, match="both claim the leaf 'lora_a' at 'attn/query'"):
        linen_setup(peft)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_bad_rank_rejected(rank):
    with pytest.raises(ValueError, match="rank must be a positive int"):
        jp.lora(rank)


def test_rank_above_min_dim_rejected_naming_path():
    with pytest.raises(ValueError, match=r"rank 9 at 'attn/query' exceeds min\(d_in, d_out\) = 8"):
        linen_setup(jp.lora(9, targets=r"attn/query$"))
    with pytest.raises(ValueError, match="rank 9 at 'attn/query'"):
        jp.apply(jp.lora(9, targets=r"attn/query$"), NnxModel(nnx.Rngs(0)), jax.random.key(0))


def test_selector_matching_nothing_lists_nearest_paths():
    with pytest.raises(jp.SelectorError, match=r"Closest layer paths: \['attn/query'"):
        linen_setup(jp.lora(2, targets=r"atn/qeury"))
    with pytest.raises(jp.SelectorError, match=r"Closest layer paths: \['attn/query'"):
        jp.apply(jp.lora(2, targets=r"atn/qeury"), NnxModel(nnx.Rngs(0)), jax.random.key(0))


def test_unsupported_layer_type_named():
    # LoRA wraps Embed (tests/test_embed.py); DoRA does not, and says so by name before any work
    with pytest.raises(TypeError, match=r"DoRA cannot attach to 'embed': it is a Embed \(embed site\)"):
        linen_setup(jp.dora(2, targets=r"^embed$"))
    with pytest.raises(TypeError, match=r"DoRA cannot attach to 'embed': it is a Embed \(embed site\)"):
        jp.apply(jp.dora(2, targets=r"^embed$"), NnxModel(nnx.Rngs(0)), jax.random.key(0))


def test_type_and_list_selectors():
    _, _, pm, params = linen_setup(jp.lora(2, targets=nn.Einsum))
    assert [p for p in jp.paths(params) if "lora_a" in p] == ["attn/key/lora_a"]
    _, _, pm, params = linen_setup(jp.lora(2, targets=["query$", "head$"]))
    assert sorted(p for p in jp.paths(params) if "lora_a" in p) == ["attn/query/lora_a", "head/lora_a"]
    nnx_model = jp.apply(jp.lora(2, targets=nnx.LinearGeneral), NnxModel(nnx.Rngs(0)), jax.random.key(0))
    assert [p for p, _ in jp.peft_layers(nnx_model)] == [("attn", "value")]


def test_error_raised_before_any_work():
    calls = []

    class Probe(jp.LoRA):
        def init_site(self, key, site, base=None):
            calls.append(site.path)
            return super().init_site(key, site, base)

    peft = jp.chain(Probe(rank=2, targets=r"attn/query$"), jp.lora(9, targets=r"attn/value$"))
    with pytest.raises(ValueError, match="rank 9"):
        linen_setup(peft)
    assert calls == []


@pytest.mark.parametrize(
    "equation, x_shape, kernel_shape",
    [
        ("...i,io->...o", (2, 3, 8), (8, 6)),  # Dense: the 2-D matmul path
        ("...ab,abcd->...cd", (2, 3, 4, 2), (4, 2, 3, 5)),  # DenseGeneral over two input axes
        ("btd,dnh->btnh", (2, 3, 8), (8, 2, 4)),  # Einsum with trailing axes
        ("bdt,dnh->bnth", (2, 8, 3), (8, 2, 4)),  # Einsum with interleaved axes: the einsum path
    ],
)
def test_lora_delta_matches_numpy_einsum(equation, x_shape, kernel_shape):
    from jaxpeft.methods.lora import lora_delta

    site = jp.Site("layer", "Test", equation, kernel_shape)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, x_shape)
    a = jax.random.normal(k2, (*site.in_shape, 3))
    b = jax.random.normal(k3, (3, *site.out_shape))
    delta_kernel = np.tensordot(np.asarray(a, np.float64), np.asarray(b, np.float64), axes=1)
    expected = 0.5 * np.einsum(equation, np.asarray(x, np.float64), delta_kernel)
    for fn in (lora_delta, jax.jit(lora_delta, static_argnums=(2,))):
        np.testing.assert_allclose(fn(a, b, site, x, 0.5), expected, rtol=1e-5, atol=1e-5)


def test_site_reads_shared_kernel_axes():
    # n is in the input, the kernel and the output: one adapter per head (tests/test_sites.py checks the math).
    site = jp.Site("attn/out", "Einsum", "bnth,nhd->bntd", (2, 4, 8))
    assert (site.shared_labels, site.in_labels, site.out_labels) == ("n", "h", "d")
    assert site.a_shape(3) == (2, 4, 3) and site.b_shape(3) == (2, 3, 8)


def test_site_rejects_kernel_axes_summed_away():
    with pytest.raises(ValueError, match="neither the input nor the output"):
        jp.Site("odd", "Einsum", "bti,ikz->btk", (4, 3, 2))
