"""Whole-model operations on STACKED kernels: Linen ``nn.scan`` (``variable_axes={"params": 0}``) and NNX
stacks built with ``nnx.vmap`` and run with ``nnx.scan`` (the models of ``tests/test_scan.py``).

* adapter save / restore: the restored model's outputs are bit-identical to the saved one's, in
  both bindings, and a stack's adapter loads into its twin in the other binding (fp32 tolerance:
  two programs);
* WiSE-FT on merged stacked weights: alpha 0 is the zero-shot base and alpha 1 the fine-tuned
  merge, bit for bit; alpha 0.5 equals a float64 NumPy ``W + alpha s A_l B_l`` per layer slice;
* ``jp.quantize`` of a stacked base (``stack_axes=1`` in Linen, found by itself in NNX: each layer's
  kernel its own 4-bit array): the forward equals a float64 NumPy unrolled forward with each layer
  quantized on its own; a stack quantized as one array is refused naming the layer;
* mixed-adapter batches (LoRA, and DoRA + IA3, which read the base layer): each example's output
  equals that example run alone with its adapter (batch == L included: the ids must not be sliced
  by the stack).
* every site kind on a stack (Conv, a heads-first Einsum, Embed): scanned == unrolled, merge ==
  unmerged, Linen == NNX;
* ``jp.fold`` of a reparameterised prefix (per-site and shared MLP) on a stack: each layer's folded
  prefix equals a float64 NumPy ``tanh(E W1 + b1) W2_l + b2_l``, outputs unchanged.

Tolerances: fp32 forwards of a 3-layer, 8-wide stack: 1e-5 (summing a handful of O(1) products).
"""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
import jaxpeft.quant as jq
from jaxpeft.models import LinenLM, LMConfig, nnx_from_linen_params
from tests._toy import randomize
from tests.test_scan import TARGETS, D, L, NnxStacked, R, Stacked, X

TOL = dict(rtol=1e-5, atol=1e-5)
X3 = jax.random.normal(jax.random.key(12), (L, 5, D))  # batch == L: sliced ids would still "fit"


def _linen(peft, seed=1):
    model = Stacked("scan")
    peft_model, params = jp.apply(peft, model, jax.random.key(0), X)
    return model, peft_model, randomize(params, peft.trainable, jax.random.key(seed))


def _nnx(peft, seed=1, cls=NnxStacked):
    model = jp.apply(peft, cls(nnx.Rngs(0)), jax.random.key(0))
    state = nnx.state(model, jp.PeftParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return model


class NnxStackedHead(NnxStacked):
    """The NNX twin of the Linen ``Stacked``: the ``nnx.vmap`` stack, then a ``head``."""

    def __init__(self, rngs):
        super().__init__(rngs)
        self.head = nnx.Linear(D, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(super().__call__(x))


def _nnx_twin(base):
    """An NnxStackedHead holding the Linen stack's base weights (same paths, same [L, ...] layout)."""
    model = NnxStackedHead(nnx.Rngs(5))
    nnx.update(model, jax.tree.map(jnp.asarray, base))
    return model


# -- (a) save / restore ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", pytest.param("dora", marks=pytest.mark.slow)])
def test_linen_stacked_adapter_save_restore_bit_identical(method, tmp_path):
    peft = (jp.lora if method == "lora" else jp.dora)(rank=R, targets=TARGETS)
    model, peft_model, params = _linen(peft)
    trainable, frozen = jp.partition(params, peft.trainable)
    jp.save_adapter(tmp_path / "a", trainable, config=peft, base=params)
    y = peft_model.apply(params, X)

    adapter, meta = jp.restore_adapter(tmp_path / "a", base=frozen, config=peft)
    assert adapter["layers"]["query"]["lora_a"].shape == (L, D, R)
    # Into a freshly bound model (other seed, so every restored leaf must come from the file).
    fresh_model, fresh = jp.apply(peft, model, jax.random.key(7), X, params=jp.prune(frozen))
    assert not np.array_equal(fresh["layers"]["query"]["lora_a"], params["layers"]["query"]["lora_a"])
    np.testing.assert_array_equal(fresh_model.apply(jp.insert(fresh, adapter), X), y)
    loaded_model, loaded = jp.load_adapter(tmp_path / "a", model, jax.random.key(8), X, params=jp.prune(frozen))
    np.testing.assert_array_equal(loaded_model.apply(loaded, X), y)

    # The same checkpoint into the NNX twin of the stack, through the documented base check.
    twin = jp.load_adapter(tmp_path / "a", _nnx_twin(jp.prune(frozen)))
    np.testing.assert_allclose(twin(X), y, **TOL)


def test_nnx_stacked_adapter_save_restore_bit_identical(tmp_path):
    peft = jp.lora(rank=R, targets=TARGETS)
    model = _nnx(peft, cls=NnxStackedHead)
    y = model(X)
    jp.save_adapter(tmp_path / "n", nnx.state(model, jp.PeftParam), config=peft, base=model)
    adapter, _ = jp.restore_adapter(tmp_path / "n", base=model, config=peft)
    assert adapter["layers"]["out"]["lora_b"].shape == (L, R, D)
    fresh = jp.apply(peft, NnxStackedHead(nnx.Rngs(0)), jax.random.key(9))
    assert not np.array_equal(fresh(X), y)
    nnx.update(fresh, adapter)
    np.testing.assert_array_equal(fresh(X), y)
    loaded = jp.load_adapter(tmp_path / "n", NnxStackedHead(nnx.Rngs(0)))
    np.testing.assert_array_equal(loaded(X), y)

    # The same checkpoint into the Linen nn.scan twin, through the documented base check.
    base = nnx.to_pure_dict(nnx.state(NnxStackedHead(nnx.Rngs(0)), nnx.Param))
    linen_model, linen_params = jp.load_adapter(tmp_path / "n", Stacked("scan"), jax.random.key(3), X, params=base)
    np.testing.assert_allclose(linen_model.apply(linen_params, X), y, **TOL)


# -- (b) WiSE-FT -----------------------------------------------------------------------------------


def _numpy_wise_kernels(params, peft, alpha):
    """float64 ``W_l + alpha * s * A_l B_l`` for every stacked LoRA kernel (the merged WiSE-FT mix)."""
    out = {}
    for name in ("query", "out"):
        node = jax.tree.map(lambda a: np.asarray(a, np.float64), params["layers"][name])
        s = peft.scale_at(f"layers/{name}")
        out[name] = np.stack([node["kernel"][i] + alpha * s * node["lora_a"][i] @ node["lora_b"][i] for i in range(L)])
    return out


def test_linen_stacked_wise_ft_endpoints_and_midpoint():
    peft = jp.lora(rank=R, targets=TARGETS)
    model, peft_model, params = _linen(peft)
    zero_shot = jp.prune(jp.partition(params, peft.trainable)[1])
    fine_tuned = jp.merge(peft_model, params)
    assert fine_tuned["layers"]["query"]["kernel"].shape == (L, D, 2 * D)
    jax.tree.map(np.testing.assert_array_equal, jp.wise_ft(zero_shot, fine_tuned, 0.0), zero_shot)
    jax.tree.map(np.testing.assert_array_equal, jp.wise_ft(zero_shot, fine_tuned, 1.0), fine_tuned)
    half = jp.wise_ft(zero_shot, fine_tuned, 0.5)
    for name, want in _numpy_wise_kernels(params, peft, 0.5).items():
        np.testing.assert_allclose(half["layers"][name]["kernel"], want, **TOL)
    # The merged mix is the factored one with B scaled (wise_ft_adapter), through the scanned forward.
    np.testing.assert_allclose(model.apply({"params": half}, X),
                               peft_model.apply(jp.wise_ft_adapter(params, 0.5), X), **TOL)


def test_nnx_stacked_wise_ft_endpoints_and_midpoint():
    peft = jp.lora(rank=R, targets=TARGETS)
    model = _nnx(peft)
    merged = jp.merge(model)
    zero_shot = nnx.state(NnxStacked(nnx.Rngs(0)), nnx.Param)  # the base the adapter was bound to
    fine_tuned = nnx.state(merged, nnx.Param)
    assert fine_tuned["layers"]["query"]["kernel"].get_value().shape == (L, D, 2 * D)
    for alpha, want in ((0.0, zero_shot), (1.0, fine_tuned)):
        jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(jp.wise_ft(zero_shot, fine_tuned, alpha)),
                     nnx.to_pure_dict(want))
    half = jp.wise_ft(zero_shot, fine_tuned, 0.5)
    pure = nnx.to_pure_dict(nnx.state(model))
    params = {"layers": {n: {"kernel": pure["layers"][n]["base_layer"]["kernel"], **{
        k: pure["layers"][n][k] for k in ("lora_a", "lora_b")}} for n in ("query", "out")}}
    for name, want in _numpy_wise_kernels(params, peft, 0.5).items():
        np.testing.assert_allclose(half["layers"][name]["kernel"].get_value(), want, **TOL)
    nnx.update(merged, half)
    np.testing.assert_allclose(merged(X), jp.merge(_scaled_b(model, 0.5))(X), **TOL)


def _scaled_b(model, alpha):
    """``model`` with every LoRA B multiplied by ``alpha`` (``wise_ft_adapter`` on its PEFT state)."""
    nnx.update(model, jp.wise_ft_adapter(nnx.state(model, jp.PeftParam), alpha))
    return model


# -- (c) quantize ----------------------------------------------------------------------------------


def _reference_quantized_forward(base, params, peft, x):
    """float64 NumPy unrolled forward with each layer's kernel quantized ON ITS OWN (slice by slice).

    ``jq.quantize_array`` / ``dequantize_array`` are the per-kernel NF4 round trip (checked bit for
    bit against the published codebook in tests/test_quant.py); the stack is quantized layer by
    layer, as an unrolled model would be.
    """
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    def layer(name, i, v):
        w = f64(jq.dequantize_array(jq.quantize_array(base["layers"][name]["kernel"][i], block_size=4)))
        node = params["layers"][name]
        s = peft.scale_at(f"layers/{name}")
        return v @ w + f64(node["bias"][i]) + s * (v @ f64(node["lora_a"][i])) @ f64(node["lora_b"][i])

    v = f64(x)
    for i in range(L):
        v = v + layer("out", i, gelu(layer("query", i, v)))
    if "head" not in base:  # NnxStacked ends at the stack
        return v
    head = base["head"]
    return v @ f64(head["kernel"]) + f64(head["bias"])


def test_linen_quantized_stacked_base_matches_per_layer_numpy_reference():
    peft = jp.lora(rank=R, targets=TARGETS)
    model = Stacked("scan")
    base = model.init(jax.random.key(0), X)["params"]
    qbase = jp.quantize(base, scheme="nf4", block_size=4, targets=r"layers/.*kernel$", stack_axes=1)
    assert qbase["layers"]["query"]["kernel"].stack_shape == (L,)
    peft_model, params = jp.apply(peft, model, jax.random.key(1), X, params=qbase)
    params = randomize(params, peft.trainable, jax.random.key(2))
    np.testing.assert_allclose(peft_model.apply(params, X), _reference_quantized_forward(base, params, peft, X), **TOL)
    # Merging dequantizes every layer of the stack: the plain model on the merged tree gives the same output.
    merged = jp.merge(peft_model, params)
    assert merged["layers"]["query"]["kernel"].shape == base["layers"]["query"]["kernel"].shape
    np.testing.assert_allclose(model.apply({"params": merged}, X), peft_model.apply(params, X), **TOL)


def test_nnx_quantize_finds_the_stack_and_matches_the_per_layer_reference():
    peft = jp.lora(rank=R, targets=TARGETS)
    model = NnxStacked(nnx.Rngs(0))
    base = {"layers": {name: {"kernel": getattr(model.layers, name).kernel.get_value(),
                              "bias": getattr(model.layers, name).bias.get_value()} for name in ("query", "out")}}
    qmodel = jp.quantize(model, scheme="nf4", block_size=4, targets=r"layers/.*kernel$")  # stack axes found
    assert qmodel.layers.query.kernel.get_value().stack_shape == (L,)
    peft_model = jp.apply(peft, qmodel, jax.random.key(1))
    state = nnx.state(peft_model, jp.PeftParam)
    nnx.update(peft_model, jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(5), v.shape), state))
    params = {"layers": {name: {**base["layers"][name],
                                "lora_a": getattr(peft_model.layers, name).lora_a.get_value(),
                                "lora_b": getattr(peft_model.layers, name).lora_b.get_value()}
                         for name in ("query", "out")}}
    np.testing.assert_allclose(peft_model(X), _reference_quantized_forward(base, params, peft, X), **TOL)


def test_quantize_stacked_as_one_array_is_refused_naming_the_layer():
    model = Stacked("scan")
    base = model.init(jax.random.key(0), X)["params"]
    qbase = jp.quantize(base, scheme="nf4", block_size=4, targets=r"layers/.*kernel$")  # no stack_axes
    with pytest.raises(ValueError, match=r"'layers/(query|out)' \(Dense\) is a stacked layer.*stack_axes=1"):
        jp.apply(jp.lora(rank=R, targets=TARGETS), model, jax.random.key(1), X, params=qbase)
    with pytest.raises(ValueError, match=r"too few axes for stack_axes=2"):
        jp.quantize(base, targets=r"layers/.*kernel$", stack_axes=2)
    # The unstacked head alone quantizes and runs.
    qhead = jp.quantize(base, scheme="nf4", block_size=4, targets=r"head/kernel$")
    peft_model, params = jp.apply(jp.lora(rank=R, targets=TARGETS), model, jax.random.key(1), X, params=qhead)
    np.testing.assert_allclose(peft_model.apply(params, X), model.apply({"params": jp.dequantize(qhead)}, X), **TOL)


# -- (d) mixed-adapter batches ---------------------------------------------------------------------

ADAPTERS = ("fr", "de")


PAIRS = {
    "lora": lambda: (jp.lora(R, targets=TARGETS, adapter="fr"), jp.lora(3, targets=r"query$", adapter="de")),
    # Methods that read the base layer's kernel / bias (DoRA's norm, IA3's scaled output) in a mixed batch.
    "dora+ia3": lambda: (jp.dora(R, targets=TARGETS, adapter="fr"),
                         jp.ia3(targets=r"query$", feedforward=None, adapter="de")),
}
MIXED_CASES = [
    pytest.param("lora", X, [1, 0], id="lora-batch2"),  # batch != L: NNX refused it with a scan error
    pytest.param("lora", X3, [0, 1, 1], id="lora-batch_eq_L"),
    pytest.param("dora+ia3", X3, [0, 1, 1], id="dora+ia3-batch_eq_L"),
]


def _is_peft_leaf(path, leaf):
    return any(name in path for name in ("lora_", "magnitude", "ia3"))


LINEN_MIXED_CASES = [pytest.param(*c.values, marks=pytest.mark.slow, id=c.id) if c.id == "lora-batch2" else c
                     for c in MIXED_CASES]  # Linen never held the ids in the stack: batch == L is the case


@pytest.mark.parametrize("pair, x, ids", LINEN_MIXED_CASES)
def test_linen_stacked_mixed_batch_equals_each_example_alone(pair, x, ids):
    fr, de = PAIRS[pair]()
    peft_model, params = jp.apply(fr, Stacked("scan"), jax.random.key(0), X)
    peft_model, params = jp.add_adapter(peft_model, de, jax.random.key(2), params=params)
    assert len(jp.paths(jp.prune(jp.partition(params, _is_peft_leaf)[0]))) == {"lora": 6, "dora+ia3": 7}[pair]
    params = randomize(params, _is_peft_leaf, jax.random.key(4), scale=0.1)
    ids = jnp.array(ids)
    y = jax.jit(lambda p, x, i: peft_model.apply(p, x, adapters=ADAPTERS, adapter_ids=i))(params, x, ids)
    for i, k in enumerate(np.asarray(ids)):
        alone = peft_model.apply(params, x[i : i + 1], adapters=ADAPTERS[k])
        np.testing.assert_allclose(y[i : i + 1], alone, **TOL)
    assert not np.allclose(peft_model.apply(params, x, adapters="fr"), peft_model.apply(params, x, adapters="de"))


@pytest.mark.parametrize("pair, x, ids", MIXED_CASES)
def test_nnx_stacked_mixed_batch_equals_each_example_alone(pair, x, ids):
    fr, de = PAIRS[pair]()
    model = jp.apply(fr, NnxStacked(nnx.Rngs(0)), jax.random.key(1))
    model = jp.add_adapter(model, de, jax.random.key(2))
    state = nnx.state(model, jp.PeftParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [a + 0.1 * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)]))
    ids = jnp.array(ids)

    @nnx.jit
    def mixed(model, x, ids):
        with jp.mixed_adapters(model, ADAPTERS, ids):
            return model(x)

    y = mixed(model, x, ids)
    with jp.mixed_adapters(model, ADAPTERS, ids):
        np.testing.assert_allclose(model(x), y, **TOL)  # eager too
    for i, k in enumerate(np.asarray(ids)):
        with jp.use_adapters(model, ADAPTERS[k]):
            np.testing.assert_allclose(y[i : i + 1], model(x[i : i + 1]), **TOL)
    assert model.layers.query.adapter_ids is None  # the context put everything back


def test_peft_specs_of_a_quantized_stack_follow_the_kernels_axes():
    """A stacked 4-bit kernel's children carry the stack axis in front, so its spec entries (stack, in, out)
    apply to packed / scales as they are; the LoRA leaves take the layer axis and the kernel's out entry."""
    from jax.sharding import PartitionSpec as P

    model = Stacked("scan")
    base = model.init(jax.random.key(0), X)["params"]
    qbase = jp.quantize(base, block_size=4, targets=r"layers/.*kernel$", stack_axes=1)
    peft_model, params = jp.apply(jp.lora(rank=R, targets=TARGETS), model, jax.random.key(1), X, params=qbase)
    base_specs = jax.tree.map(lambda x: P(), base)
    base_specs["layers"]["query"]["kernel"] = P("layers", None, "model")
    specs = jp.peft_specs(peft_model, params, base_specs)["layers"]["query"]
    assert specs["kernel"].packed == P("layers", None, "model") and specs["kernel"].scales == P("layers", None, "model")
    assert qbase["layers"]["query"]["kernel"].packed.shape[0] == L  # the entry "layers" lands on the stack axis
    assert specs["lora_a"] == P("layers", None, None) and specs["lora_b"] == P("layers", None, "model")


# -- every site kind on a stack: Conv, a Gemma-style Einsum, Embed -------------------------------


class SiteKindsBlock(nn.Module):
    """A Conv, a heads-first Einsum (``BTD,NDH->BTNH``) and an Embed lookup, in one scanned block."""

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Conv(4, (3,), padding="SAME", name="conv")(x)
        heads = nn.Einsum((2, 4, 2), "BTD,NDH->BTNH", use_bias=False, name="heads")(h).reshape(h.shape)
        return x + heads + nn.Embed(5, 4, name="embed")(jnp.array([1, 3, 0, 2, 4, 1])), None


class SiteKinds(nn.Module):
    unrolled: bool = False

    @nn.compact
    def __call__(self, x):
        if self.unrolled:
            for i in range(L):
                x, _ = SiteKindsBlock(name=f"layers_{i}")(x)
            return x
        stack = nn.scan(SiteKindsBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        return stack(name="layers")(x, None)[0]


class NnxSiteKindsBlock(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 4, (3,), rngs=rngs)
        self.heads = nnx.Einsum("BTD,NDH->BTNH", (2, 4, 2), rngs=rngs)  # no bias_shape: no bias
        self.embed = nnx.Embed(5, 4, rngs=rngs)

    def __call__(self, x):
        h = self.conv(x)
        return x + self.heads(h).reshape(h.shape) + self.embed(jnp.array([1, 3, 0, 2, 4, 1]))


class NnxSiteKinds(NnxStacked):
    """``NnxStacked``'s nnx.vmap stack and nnx.scan run, over ``NnxSiteKindsBlock`` layers."""

    def __init__(self, rngs):
        self.layers = nnx.split_rngs(splits=L)(nnx.vmap(NnxSiteKindsBlock, in_axes=(0,), out_axes=0))(rngs)


XC = jax.random.normal(jax.random.key(13), (2, 6, 4))
SITE_KIND_METHODS = {
    "lora": lambda: jp.lora(R, targets=r"conv|heads|embed"),
    "ia3": lambda: jp.ia3(targets=r"conv|heads", feedforward=None),
    "dora": lambda: jp.dora(R, targets=r"conv|heads"),
    "lokr": lambda: jp.lokr(rank=R, targets=r"conv$"),
}


@pytest.mark.parametrize("name", [n if n in ("lora", "ia3") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in SITE_KIND_METHODS])
def test_conv_einsum_embed_stacks_equal_unrolled_and_nnx(name):
    """Scanned == unrolled (each layer its slice), merge == unmerged, Linen == NNX, on every site kind."""
    peft = SITE_KIND_METHODS[name]()
    peft_model, params = jp.apply(peft, SiteKinds(), jax.random.key(1), XC)
    params = randomize(params, peft.trainable, jax.random.key(2), scale=0.2)
    y = peft_model.apply(params, XC)
    twin, _ = jp.apply(peft, SiteKinds(unrolled=True), jax.random.key(1), XC)
    np.testing.assert_allclose(twin.apply({f"layers_{i}": _slice_layer(params["layers"], i) for i in range(L)}, XC),
                               y, **TOL)
    assert not np.allclose(y, SiteKinds().apply({"params": jp.partition(params, peft.trainable)[1]}, XC), atol=1e-3)
    merged = jp.merge(peft_model, params)
    np.testing.assert_allclose(SiteKinds().apply({"params": merged}, XC), y, rtol=1e-4, atol=1e-4)

    trainable, frozen = jp.partition(params, peft.trainable)
    base = NnxSiteKinds(nnx.Rngs(0))
    nnx.update(base, jp.prune(frozen))
    nnx_model = jp.apply(peft, base, jax.random.key(1))
    nnx.update(nnx_model, jp.prune(trainable))
    np.testing.assert_allclose(nnx_model(XC), y, **TOL)
    np.testing.assert_allclose(jp.merge(nnx_model)(XC), y, rtol=1e-4, atol=1e-4)


def _slice_layer(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


# -- fold: a reparameterised prefix on a stack -----------------------------------------------------

LM_STACKED = LMConfig(vocab_size=16, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_seq_len=16, scan_layers=True)
LM_TOKENS = jnp.array([[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]])


def _numpy_prefix(first, node, layer):
    """float64 ``tanh(E W1 + b1) W2_l + b2_l`` for layer ``layer`` (prefix tuning's reparameterisation MLP)."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    hidden = np.tanh(f64(first["prefix_embedding"]) @ f64(first["prefix_hidden_kernel"]) + f64(first["prefix_hidden_bias"]))
    return hidden @ f64(node["prefix_out_kernel"][layer]) + f64(node["prefix_out_bias"][layer])


@pytest.mark.parametrize("binding, reparam", [pytest.param("linen", "per_site", marks=pytest.mark.slow),
                                              ("linen", "shared"), ("nnx", "per_site")])
def test_fold_reparameterised_prefix_on_a_stack(binding, reparam):
    """``jp.fold`` on an ``[L, ...]`` stack folds each layer's MLP on its own slice (NumPy per layer)."""
    peft = jp.prefix_tuning(2, targets=r"attn/(key|value)$", reparam=reparam, reparam_hidden=8)
    model = LinenLM(LM_STACKED)
    peft_model, params = jp.apply(peft, model, jax.random.key(1), LM_TOKENS)
    params = randomize(params, peft.trainable, jax.random.key(2), scale=0.2)
    y = peft_model.apply(params, LM_TOKENS)
    if binding == "linen":
        folded_model, folded = jp.fold(peft_model, params)
        out = folded_model.apply(folded, LM_TOKENS)
    else:
        trainable, frozen = jp.partition(params, peft.trainable)
        nnx_model = jp.apply(peft, nnx_from_linen_params(LM_STACKED, jp.prune(frozen)), jax.random.key(1))
        nnx.update(nnx_model, jp.prune(trainable))
        np.testing.assert_allclose(nnx_model(LM_TOKENS), y, **TOL)
        folded_nnx = jp.fold(nnx_model)
        out = folded_nnx(LM_TOKENS)
        folded = nnx.to_pure_dict(nnx.state(folded_nnx))
    np.testing.assert_allclose(out, y, **TOL)
    for name in ("key", "value"):
        node = params["layers"]["attn"][name]
        prefix = folded["layers"]["attn"][name]["prefix"]
        assert prefix.shape == (LM_STACKED.num_layers, 2, 16)
        for i in range(LM_STACKED.num_layers):
            first = params["peft_shared"]["prefix_tuning@default"] if reparam == "shared" else {
                k: node[k][i] for k in ("prefix_embedding", "prefix_hidden_kernel", "prefix_hidden_bias")}
            np.testing.assert_allclose(prefix[i], _numpy_prefix(first, node, i), **TOL)


# -- (e) weighted combinations of stacked adapters ---------------------------------------------------


@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_add_weighted_adapters_on_a_stack_combines_each_layer(combination):
    """Each layer's combined update A_l B_l equals sum_i w_i s_i A_i,l B_i,l in float64 NumPy (exact for 'cat';
    'svd' at rank sum r_i is exact too), and the combined adapter runs on the scanned model."""
    first, second = jp.lora(rank=R, targets=TARGETS), jp.lora(rank=3, alpha=6.0, targets=r"query$")
    model, peft_model, params = _linen(first, seed=1)
    _, _, params2 = _linen(second, seed=2)
    adapters = [jp.partition(params, first.trainable)[0], jp.partition(params2, second.trainable)[0]]
    weights = [0.7, -0.4]
    with pytest.raises(ValueError, match=r"stack of 3 layers: pass stack_axes=1"):
        jp.add_weighted_adapters(adapters, weights, [first, second], combination=combination)
    rank = R + 3 if combination == "svd" else None
    combined, config = jp.add_weighted_adapters(adapters, weights, [first, second], combination=combination,
                                                rank=rank, stack_axes=1)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    for site in ("query", "out"):
        node = combined["layers"][site]
        assert node["lora_a"].shape[0] == L and node["lora_b"].shape[0] == L
        for i in range(L):
            want = sum(w * cfg.scale_at(f"layers/{site}") * f64(tree["layers"][site]["lora_a"][i])
                       @ f64(tree["layers"][site]["lora_b"][i])
                       for w, cfg, tree in zip(weights, [first, second], adapters) if site in tree["layers"]
                       and tree["layers"][site].get("lora_a") is not None)
            got = config.scale_at(f"layers/{site}") * f64(node["lora_a"][i]) @ f64(node["lora_b"][i])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{site} layer {i}")
    # The combined adapter binds to the scanned model and equals the base plus the summed updates.
    new_model, new_params = jp.apply(config, model, jax.random.key(5), X,
                                    params=jp.prune(jp.partition(params, first.trainable)[1]))
    new_params = jp.insert(new_params, combined)
    np.testing.assert_allclose(new_model.apply(new_params, X), model.apply({"params": jp.merge(new_model, new_params)}, X),
                               **TOL)
