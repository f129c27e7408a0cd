"""Prefix tuning against float64 NumPy attention with the learned keys and values concatenated.

Through Flax's own attention (``nn.MultiHeadDotProductAttention``, ``nnx.MultiHeadAttention``, whose
``mask`` the bindings grow) and through the reference LMs (which build their mask from the number
of keys); the reparameterisation MLP and its folding; composition with LoRA, IA3 and prompt tuning.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _soft_reference as ref
import jaxpeft as jp
from jaxpeft.bind.fold import fold
from jaxpeft.demo import data
from jaxpeft.methods.ia3 import ia3
from jaxpeft.methods.prefix import PrefixTuning, prefix_tuning
from jaxpeft.methods.prompt import prompt_tuning
from jaxpeft.models import LinenLM, LMConfig, nnx_from_linen_params

P, D, HEADS = 3, 8, 2
SEQ = 6
XS = jax.random.normal(jax.random.key(0), (2, SEQ, D))
VALID = jnp.array([[1] * SEQ, [1] * 4 + [0] * 2], bool)  # row 1: 2 padding tokens at the end
CAUSAL_AND_PADDING = jnp.tril(jnp.ones((SEQ, SEQ), bool))[None, None] & VALID[:, None, None, :]  # [b, 1, q, k]
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 against float64, O(1) outputs


def numpy_mha(p, x, prefix_k, prefix_v, mask=None, causal=False):
    """Flax's multi-head attention in NumPy, ``P`` learned keys / values in front; mask [b, 1, q, k] or None."""
    p, x = ref.f64(p), np.asarray(x, np.float64)
    proj = lambda n, x: np.einsum("bsd,dhk->bshk", x, p[n]["kernel"]) + p[n]["bias"]  # noqa: E731
    q, k, v = proj("query", x), proj("key", x), proj("value", x)
    k = np.concatenate([np.broadcast_to(prefix_k, (x.shape[0], *prefix_k.shape)), k], 1)
    v = np.concatenate([np.broadcast_to(prefix_v, (x.shape[0], *prefix_v.shape)), v], 1)
    full = np.ones((x.shape[0], 1, x.shape[1], k.shape[1]), bool)
    if mask is not None:  # the prefix columns visible to every query
        full[..., P:] = np.asarray(mask)
    if causal:
        full &= ref.decoder_mask(x.shape[1], k.shape[1])
    out = ref.attention(q, k, v, full)
    return np.einsum("bshk,hkd->bsd", out, p["out"]["kernel"]) + p["out"]["bias"]


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None):
        return nn.MultiHeadDotProductAttention(HEADS, qkv_features=D, name="attn")(x, mask=mask)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(HEADS, D, qkv_features=D, decode=False, rngs=rngs)

    def __call__(self, x, mask=None, is_causal=False):
        return self.attn(x, mask=mask, is_causal=is_causal)


def _randomized(params, selector, key, scale=0.5):
    trainable, frozen = jp.partition(params, selector)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jp.combine(jax.tree.unflatten(treedef, new), frozen)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_linen_multi_head_attention_equals_numpy(use_jit, masked):
    mask = CAUSAL_AND_PADDING if masked else None
    model = LinenBlock()
    base = model.init(jax.random.key(1), XS)["params"]
    peft_model, params = jp.apply(prefix_tuning(P), model, jax.random.key(2), XS, mask=mask, params=base)
    attn = params["attn"]
    assert attn["key"]["prefix"].shape == attn["value"]["prefix"].shape == (P, HEADS, D // HEADS)
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    expected = numpy_mha(base["attn"], XS, attn["key"]["prefix"], attn["value"]["prefix"], mask)
    np.testing.assert_allclose(run(params, XS, mask=mask), expected, **TOL)
    plain = model.apply({"params": base}, XS, mask=mask)
    np.testing.assert_array_equal(peft_model.apply(params, XS, mask=mask, adapters=False), plain)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "causal_padding", "is_causal"])
def test_nnx_multi_head_attention_equals_numpy(use_jit, mask_kind):
    base_model = NnxBlock(nnx.Rngs(1))
    base = nnx.to_pure_dict(nnx.state(base_model, nnx.Param))["attn"]
    model = jp.apply(prefix_tuning(P), base_model, jax.random.key(2))
    assert type(model.attn).__name__ == "MultiHeadAttention[PrefixMask]"
    assert isinstance(model.attn, nnx.MultiHeadAttention)
    assert type(base_model.attn) is nnx.MultiHeadAttention  # the input graph is untouched
    pk, pv = model.attn.key.prefix[...], model.attn.value.prefix[...]
    mask = CAUSAL_AND_PADDING if mask_kind == "causal_padding" else None
    run = nnx.jit(lambda m, x: m(x, mask=mask, is_causal=mask_kind == "is_causal")) if use_jit else (
        lambda m, x: m(x, mask=mask, is_causal=mask_kind == "is_causal"))
    expected = numpy_mha(base, XS, pk, pv, mask, causal=mask_kind == "is_causal")
    np.testing.assert_allclose(run(model, XS), expected, **TOL)
    with jp.adapters_disabled(model):
        np.testing.assert_allclose(model(XS, mask=mask), base_model(XS, mask=mask), rtol=1e-6, atol=1e-6)


CONFIG = LMConfig.tiny()
X = jax.random.randint(jax.random.key(0), (2, 10), 0, CONFIG.vocab_size)
MASK = jnp.ones((2, 10), jnp.int32).at[1, 7:].set(0)


@pytest.fixture(scope="module")
def lm():
    model = LinenLM(CONFIG)
    return model, model.init(jax.random.key(1), X)["params"]


def _layer_prefixes(params, leaf="prefix"):
    attn = [params[f"layers_{i}"]["attn"] for i in range(CONFIG.num_layers)]
    return {i: (a["key"][leaf], a["value"][leaf]) for i, a in enumerate(attn)}


@pytest.mark.parametrize("use_jit", [False, True])
def test_reference_lm_equals_numpy_and_nnx_agrees(lm, use_jit):
    model, base = lm
    peft = prefix_tuning(P, targets=r"attn/(key|value)$")
    peft_model, params = jp.apply(peft, model, jax.random.key(2), X, params=base)
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    out = run(params, X, attention_mask=MASK)
    expected = ref.lm(base, CONFIG, X, attention_mask=MASK, prefixes=_layer_prefixes(params))
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)

    nnx_model = jp.apply(peft, nnx_from_linen_params(CONFIG, base), jax.random.key(7))
    nnx.update(nnx_model, jp.prune(jp.partition(params, peft.trainable)[0]))
    np.testing.assert_allclose(nnx_model(X, attention_mask=MASK), out, **TOL)


def test_masks_padding_invisible_prefix_visible_to_all(lm):
    model, base = lm
    peft_model, params = jp.apply(prefix_tuning(P), model, jax.random.key(2), X, params=base)
    y = peft_model.apply(params, X, attention_mask=MASK)
    changed = X.at[1, 8].set((X[1, 8] + 1) % CONFIG.vocab_size)  # a padded-out token
    out = peft_model.apply(params, changed, attention_mask=MASK)
    np.testing.assert_allclose(out[1, :7], y[1, :7], rtol=1e-6, atol=1e-6)
    moved = _randomized(params, r"layers_0/attn/value/prefix$", jax.random.key(3))
    diff = np.abs(peft_model.apply(moved, X, attention_mask=MASK) - y).max(-1)
    assert (diff[0] > 1e-4).all() and (diff[1, :7] > 1e-4).all()  # every query, the first one included


@pytest.mark.parametrize("reparam", ["shared", "per_site"])
def test_reparameterisation_equals_numpy_mlp_and_folds_away(lm, reparam):
    model, base = lm
    peft = prefix_tuning(P, reparam=reparam, reparam_dim=6, reparam_hidden=16)
    peft_model, params = jp.apply(peft, model, jax.random.key(2), X, params=base)
    trainable = [p for p, x in jp.leaves_with_paths(jp.partition(params, peft_model.trainable)[0]) if x is not None]
    shared = jp.paths(params.get("peft_shared", {}))
    if reparam == "shared":  # one embedding and first layer, each site its slice of the last layer
        assert shared == ["prefix_tuning@default/prefix_embedding", "prefix_tuning@default/prefix_hidden_bias",
                          "prefix_tuning@default/prefix_hidden_kernel"]
        first = params["peft_shared"]["prefix_tuning@default"]
    else:
        assert shared == []
    assert len(trainable) == (3 + 2 * 2 * CONFIG.num_layers if reparam == "shared" else 5 * 2 * CONFIG.num_layers)

    prefixes = {}
    for i in range(CONFIG.num_layers):
        pair = []
        for n in ("key", "value"):
            site = ref.f64(params[f"layers_{i}"]["attn"][n])
            mlp_in = ref.f64(first) if reparam == "shared" else site
            hidden = np.tanh(mlp_in["prefix_embedding"] @ mlp_in["prefix_hidden_kernel"] + mlp_in["prefix_hidden_bias"])
            pair.append(hidden @ site["prefix_out_kernel"] + site["prefix_out_bias"])
        prefixes[i] = tuple(pair)
    out = peft_model.apply(params, X, attention_mask=MASK)
    expected = ref.lm(base, CONFIG, X, attention_mask=MASK, prefixes=prefixes)
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-5)

    folded_model, folded = fold(peft_model, params)
    assert folded_model.peft == PrefixTuning(P) and "peft_shared" not in folded
    assert sorted(jp.paths(jp.prune(jp.partition(folded, folded_model.trainable)[0]))) == sorted(
        f"layers_{i}/attn/{n}/prefix" for i in range(CONFIG.num_layers) for n in ("key", "value"))
    np.testing.assert_allclose(folded_model.apply(folded, X, attention_mask=MASK), out, rtol=1e-6, atol=1e-6)

    nnx_model = jp.apply(peft, nnx_from_linen_params(CONFIG, base), jax.random.key(2))
    nnx.update(nnx_model, jp.prune(jp.partition(params, peft.trainable)[0]))
    y = nnx_model(X, attention_mask=MASK)
    np.testing.assert_allclose(y, out, **TOL)
    folded_nnx = fold(nnx_model)
    assert not hasattr(folded_nnx, "peft_shared")
    assert all(n.endswith("/prefix") for n in jp.paths(nnx.state(folded_nnx, jp.PeftParam)))
    np.testing.assert_allclose(folded_nnx(X, attention_mask=MASK), y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(nnx_model(X, attention_mask=MASK), y)  # the input model is untouched


def test_chain_with_lora_ia3_and_prompt_in_one_jitted_step(lm):
    model, base = lm
    lora, prefix = jp.lora(2, 4, targets=r"attn/(query|value)$"), prefix_tuning(P)
    scaling, prompt = ia3(targets=r"attn/(key|value)$", feedforward=None), prompt_tuning(2)
    # IA3 after the prefix in the chain: the binding still puts the prefix outermost (IA3 scales real rows).
    peft = jp.chain(lora, prefix, scaling, prompt)
    peft_model, params = jp.apply(peft, model, jax.random.key(2), X, params=base)
    params = _randomized(params, (lora.trainable, scaling.trainable), jax.random.key(4), scale=0.3)

    def count(t):
        return sum(x.size for _, x in jp.leaves_with_paths(jp.partition(params, t.trainable)[0]) if x is not None)

    assert count(peft) == count(lora) + count(prefix) + count(scaling) + count(prompt) > 0

    # NumPy: LoRA and IA3 folded into the kernels (both exact), prefixes and prompt concatenated.
    dense = jax.tree.map(lambda x: np.asarray(x, np.float64), base)
    for i in range(CONFIG.num_layers):
        a, node = dense[f"layers_{i}"]["attn"], params[f"layers_{i}"]["attn"]
        for n in ("query", "value"):
            delta = np.asarray(node[n]["lora_a"], np.float64) @ np.asarray(node[n]["lora_b"], np.float64)
            a[n]["kernel"] = a[n]["kernel"] + lora.scale * delta
        for n in ("key", "value"):
            scale = np.asarray(node[n]["ia3_scale"], np.float64)
            a[n]["kernel"], a[n]["bias"] = a[n]["kernel"] * scale, a[n]["bias"] * scale
    embeds = np.asarray(base["embed"]["embedding"])[np.asarray(X)]
    virtual = np.broadcast_to(np.asarray(params["prompt"]["embeddings"]), (2, 2, CONFIG.d_model))
    mask = np.concatenate([np.ones((2, 2)), MASK], 1)
    embeds = np.concatenate([virtual, embeds], 1)
    expected = ref.lm(dense, CONFIG, embeds=embeds, attention_mask=mask, prefixes=_layer_prefixes(params))[:, 2:]
    np.testing.assert_allclose(peft_model.apply(params, X, attention_mask=MASK), expected, rtol=5e-5, atol=5e-5)

    trainable, frozen = jp.partition(params, peft_model.trainable)

    def loss_fn(t, f, batch, rng):
        logits = peft_model.apply(jp.combine(t, f), batch["inputs"], attention_mask=batch["mask"])
        return jp.cross_entropy(logits, batch["targets"])[0]

    before = jax.tree.map(np.array, trainable)
    opt = optax.sgd(1e-2)
    step = jp.make_train_step(loss_fn, opt)
    batch = {"inputs": X, "targets": X, "mask": MASK}
    after, _, metrics = step(trainable, frozen, opt.init(trainable), batch, None)
    assert np.isfinite(metrics["loss"])
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), after, before)
    assert all(jax.tree.leaves(moved)), [p for p, m in jp.leaves_with_paths(moved) if not m]


def test_bad_input_raises_before_work(lm):
    for bad in (lambda: prefix_tuning(0), lambda: prefix_tuning(-1), lambda: prefix_tuning(4, reparam="deep"),
                lambda: prefix_tuning(4, reparam="shared", reparam_hidden=0)):
        with pytest.raises(ValueError, match="must be"):
            bad()

    class Cached(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.MultiHeadDotProductAttention(HEADS, qkv_features=D, decode=True, name="attn")(x)

    base = LinenBlock().init(jax.random.key(1), XS)["params"]  # the same params: only decode differs
    with pytest.raises(ValueError, match=r"cannot run 'attn' \(MultiHeadDotProductAttention\) with decode=True"):
        jp.apply(prefix_tuning(P), Cached(), jax.random.key(0), XS, params=base)

    cached = NnxBlock(nnx.Rngs(0))
    cached.attn.decode = True
    with pytest.raises(ValueError, match=r"cannot run 'attn' \(MultiHeadAttention\) with decode=True"):
        jp.apply(prefix_tuning(P), cached, jax.random.key(0))
    model = jp.apply(prefix_tuning(P), NnxBlock(nnx.Rngs(0)), jax.random.key(0))
    with pytest.raises(ValueError, match="with decode=True"):
        model.attn(XS, decode=True)

    class Strided(nn.Module):  # a projection whose output has no [batch, seq] layout
        @nn.compact
        def __call__(self, x):
            return nn.Dense(D, name="key")(x[0])

    with pytest.raises(ValueError, match=r"PrefixTuning at 'key' \(Dense\): the projection output .* shape \(6, 8\)"):
        jp.apply(prefix_tuning(P, targets="key$"), Strided(), jax.random.key(0), XS)

    peft_model, params = jp.apply(prefix_tuning(P), lm[0], jax.random.key(2), X, params=lm[1])
    with pytest.raises(ValueError, match="prefix tuning cannot be merged into a kernel"):
        jp.merge(peft_model, params)


CHAR_CONFIG = LMConfig.tiny(vocab_size=data.CharTokenizer().vocab_size)


@pytest.mark.parametrize(
    "peft,lr", [(prefix_tuning(4), 3e-2), (prefix_tuning(4, reparam="shared", reparam_hidden=32), 1e-2)],
    ids=["plain", "reparam"],
)
@pytest.mark.slow  # CI budget: the contract table's rows check that a few steps lower the loss for every method
def test_prefix_tuning_trains_the_demo_task(peft, lr):
    model = LinenLM(CHAR_CONFIG)
    peft_model, params = jp.apply(peft, model, jax.random.key(1), np.zeros((1, 32), np.int32))
    trainable, frozen = jp.partition(params, peft_model.trainable)

    def loss_fn(t, f, batch, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(t, f), batch["inputs"]), batch["targets"])[0]

    evals = data.eval_set("recipes", 2, 8, 32)
    evaluate = jax.jit(loss_fn)
    before = np.mean([evaluate(trainable, frozen, b, None) for b in evals])
    opt = optax.adam(lr)
    result = jp.fit(jp.make_train_step(loss_fn, opt), trainable, frozen, opt.init(trainable),
                    data.batches("recipes", 8, 32, seed=0), num_steps=30, rng=None, progress=False)
    after = np.mean([evaluate(result.trainable, frozen, b, None) for b in evals])
    assert after < before - 0.2, (before, after)


def test_bfloat16_compute_keeps_float32_leaves(lm):
    _, base = lm
    peft = jp.chain(prefix_tuning(P), prompt_tuning(2))
    outputs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = LinenLM(CONFIG.replace(dtype=dtype))
        peft_model, params = jp.apply(peft, model, jax.random.key(2), X, params=base)
        assert params["layers_0"]["attn"]["key"]["prefix"].dtype == params["prompt"]["embeddings"].dtype == jnp.float32
        outputs[dtype] = peft_model.apply(params, X, attention_mask=MASK)
    assert outputs[jnp.bfloat16].dtype == jnp.float32  # the model's float32 logits
    # bf16 activations carry ~3 significant digits; logits are O(3) after two blocks.
    np.testing.assert_allclose(outputs[jnp.bfloat16], outputs[jnp.float32], atol=0.15)
