"""Reference models: Linen == NNX, attention == NumPy, causality, padding, names, config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jaxpeft.models import (
    LinenLM,
    LMConfig,
    NnxLM,
    causal_mask,
    dot_product_attention,
    linen_params_from_nnx,
    load_linen_params,
    nnx_from_linen_params,
    padding_mask,
)

BATCH, SEQ = 2, 12
# fp32 tolerance: both models run the same ops in the same order, so they agree
# bit for bit today; 1e-5 leaves room for XLA fusing the two graphs differently
# (logits are O(1), fp32 epsilon ~1e-7, a few dozen reassociated adds).
ATOL = 1e-5


def tokens_for(config, seed=1, batch=BATCH, seq=SEQ):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, config.vocab_size, dtype=jnp.int32)


def padded_mask():
    """Row 0 full, row 1 with its last 4 positions padded."""
    return jnp.array([[1] * SEQ, [1] * (SEQ - 4) + [0] * 4], jnp.int32)


def random_params(config):
    """Params of the right paths and shapes, drawn with NumPy: every leaf random (norm scales and
    biases too, so a mix-up between two of them shows), and no init compile (~1 s each on CPU)."""
    rng = np.random.default_rng(0)

    def draw(leaf):
        return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), leaf.dtype)

    return jax.tree.map(draw, param_shapes(config))


@functools.lru_cache
def build(config):
    """Linen model, its params, and an NNX model holding the same weights (cached: tests only read)."""
    params = random_params(config)
    return LinenLM(config), params, nnx_from_linen_params(config, params)


def param_shapes(config, **inputs):
    """Linen params as ShapeDtypeStructs, without running the init."""
    inputs = inputs or {"tokens": tokens_for(config)}
    return jax.eval_shape(lambda: LinenLM(config).init(jax.random.key(0), **inputs))["params"]


@functools.lru_cache
def forward_fn(kind, config, jit):
    """``f(tokens, **kwargs) -> logits`` of ``build(config)``'s Linen or NNX model, optionally jitted.

    Cached, so tests that share a config share compilations.
    """
    linen, params, nnx_model = build(config)
    if kind == "linen":
        def f(tokens, **kwargs):
            return linen.apply({"params": params}, tokens, **kwargs)

        return jax.jit(f) if jit else f
    graphdef, state = nnx.split(nnx_model)  # the pure form jax.jit takes

    def g(state, tokens, **kwargs):
        return nnx.merge(graphdef, state)(tokens, **kwargs)

    g = jax.jit(g) if jit else g
    return functools.partial(g, state)


# ---------------------------------------------------------------------------- attention


def numpy_attention(q, k, v, mask):
    """Dense reference: per batch and head, softmax(q k^T / sqrt(d)) v with masked keys dropped."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, heads, dim = q.shape
    mask = np.broadcast_to(np.asarray(mask), (batch, heads, q_len, k.shape[1]))
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            scores = q[b, :, h] @ k[b, :, h].T / np.sqrt(dim)
            scores = np.where(mask[b, h], scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out[b, :, h] = weights @ v[b, :, h]
    return out


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("k_len", [7, 10])
def test_attention_matches_numpy(jit, k_len):
    q_len = 7
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, q_len, 3, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, k_len, 3, 8)), jnp.float32) for _ in range(2))
    keys_real = np.ones((2, k_len), np.int32)
    keys_real[1, 1] = 0  # hide one key that every query sees
    mask = causal_mask(q_len, k_len) & padding_mask(jnp.asarray(keys_real))
    attend = jax.jit(dot_product_attention) if jit else dot_product_attention
    got = attend(q, k, v, mask)
    assert got.shape == q.shape
    # fp32 vs float64 reference; sums of <= 10 terms of size O(1): 1e-5 is ~100 ulp.
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_causal_mask_prefix_keys():
    mask = np.asarray(causal_mask(2, 4))[0, 0]
    # Two prepended keys are seen by every query; then ordinary causality.
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_attention_softmax_in_float32():
    # Scores this large overflow bf16 arithmetic; the float32 softmax keeps them exact.
    q = jnp.full((1, 2, 1, 4), 200.0, jnp.bfloat16)
    v = jnp.arange(8, dtype=jnp.bfloat16).reshape(1, 2, 1, 4)
    out = dot_product_attention(q, q, v, causal_mask(2))
    assert out.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    np.testing.assert_allclose(np.asarray(out[0, 1, 0], np.float32), [2.0, 3.0, 4.0, 5.0], atol=0.05)


def test_attention_rejects_bad_shapes():
    x = jnp.zeros((2, 5, 3, 8))
    with pytest.raises(ValueError, match="heads"):
        dot_product_attention(x, jnp.zeros((2, 5, 4, 8)), jnp.zeros((2, 5, 4, 8)))


# ---------------------------------------------------------------------------- Linen == NNX


@pytest.mark.parametrize(
    "norm, jit, masked",
    [("rms", False, False), ("rms", False, True), ("rms", True, False), ("rms", True, True), ("layer", True, True)],
)
def test_linen_and_nnx_agree(norm, jit, masked):
    config = LMConfig.tiny(norm=norm)
    tokens = tokens_for(config)
    kwargs = {"attention_mask": padded_mask()} if masked else {}
    want = forward_fn("linen", config, jit)(tokens, **kwargs)
    got = forward_fn("nnx", config, jit)(tokens, **kwargs)
    assert want.shape == got.shape == (BATCH, SEQ, config.vocab_size)
    assert want.dtype == got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=ATOL)


def test_converters_round_trip():
    config = LMConfig.tiny()
    _, params, nnx_model = build(config)
    back = linen_params_from_nnx(nnx_model)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert a is b  # shared, not copied

    fresh = NnxLM(config, rngs=nnx.Rngs(3))
    load_linen_params(fresh, {"params": params})  # the whole variables dict is accepted too
    np.testing.assert_array_equal(fresh.head.kernel[...], params["head"]["kernel"])

    bad = jax.tree.map(lambda x: x, params)
    bad["head"]["kernel"] = jnp.zeros((3, 3))
    with pytest.raises(ValueError, match="head/kernel"):
        load_linen_params(fresh, bad)
    del bad["head"]
    with pytest.raises(ValueError, match="head/kernel"):
        load_linen_params(fresh, bad)


# ---------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_causality(kind):
    config = LMConfig.tiny()
    f = forward_fn(kind, config, jit=True)
    tokens = tokens_for(config)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % config.vocab_size)
    before, after = f(tokens), f(changed)
    np.testing.assert_array_equal(np.asarray(before[:, :7]), np.asarray(after[:, :7]))
    assert not np.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_padding_hides_keys(kind):
    # Every call has the same signature (tokens, attention_mask, positions): one compilation.
    config = LMConfig.tiny()
    f = forward_fn(kind, config, jit=True)
    tokens, mask = tokens_for(config), padded_mask()
    real, pad = SEQ - 4, 4
    arange = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
    # Change the padded-out tokens of row 1: its real positions must not move.
    changed = tokens.at[1, real:].set((tokens[1, real:] + 5) % config.vocab_size)
    before = f(tokens, attention_mask=mask, positions=arange)
    after = f(changed, attention_mask=mask, positions=arange)
    np.testing.assert_allclose(np.asarray(before[1, :real]), np.asarray(after[1, :real]), atol=ATOL)
    # Left padding with positions counting real tokens equals right padding of the same tokens.
    right_mask = jnp.broadcast_to(jnp.arange(SEQ) < real, (BATCH, SEQ)).astype(jnp.int32)
    left_mask = right_mask[:, ::-1]
    left_positions = jnp.maximum(jnp.cumsum(left_mask, axis=1) - 1, 0)
    left = f(tokens, attention_mask=left_mask, positions=left_positions)
    right = f(jnp.roll(tokens, -pad, axis=1), attention_mask=right_mask, positions=arange)
    np.testing.assert_allclose(np.asarray(left[:, pad:]), np.asarray(right[:, :real]), atol=ATOL)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_inputs_embeds_equals_tokens(kind):
    config = LMConfig.tiny()
    linen, params, nnx_model = build(config)
    f = forward_fn(kind, config, jit=True)
    tokens, mask = tokens_for(config), padded_mask()
    if kind == "linen":
        embeds = linen.apply({"params": params}, tokens, method=LinenLM.embed_tokens)
    else:
        embeds = nnx_model.embed_tokens(tokens)
    assert embeds.shape == (BATCH, SEQ, config.d_model)
    np.testing.assert_array_equal(np.asarray(embeds), np.asarray(params["embed"]["embedding"][tokens]))
    want = f(tokens, attention_mask=mask)
    positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))  # the default, given: one compilation
    got = f(None, inputs_embeds=embeds, attention_mask=mask, positions=positions)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL)
    # Position embeddings are added on this path too: shifted positions change the logits.
    shifted = f(None, inputs_embeds=embeds, attention_mask=mask, positions=positions + 1)
    assert not np.allclose(shifted, want)


def test_linen_init_from_inputs_embeds_creates_every_param():
    config = LMConfig.tiny()
    from_tokens = param_shapes(config)
    from_embeds = param_shapes(config, inputs_embeds=jnp.zeros((1, 4, config.d_model)))
    assert jax.tree.structure(from_embeds) == jax.tree.structure(from_tokens)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_dropout(kind):
    config = LMConfig.tiny(dropout_rate=0.5)
    linen, params, nnx_model = build(config)
    tokens = tokens_for(config)
    if kind == "linen":
        @jax.jit
        def run(key):
            return linen.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": key})
    else:
        graphdef, state = nnx.split(nnx_model)

        @jax.jit
        def run(key):
            return nnx.merge(graphdef, state)(tokens, deterministic=False, rngs=key)
    first, again, other = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))  # the key decides the masks
    assert not np.allclose(first, other)


# ---------------------------------------------------------------------------- names, config


def flat_shapes(tree):
    return {"/".join(str(k.key) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_param_paths(norm):
    config = LMConfig.tiny(norm=norm)
    d, ff, vocab = config.d_model, config.d_ff, config.vocab_size
    linen_params = param_shapes(config)
    nnx_params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: NnxLM(config, rngs=nnx.Rngs(0))), nnx.Param))
    expected = {"embed/embedding": (vocab, d), "pos_embed/embedding": (config.max_seq_len, d),
                "norm_final/scale": (d,), "head/kernel": (d, vocab), "head/bias": (vocab,)}
    for i in range(config.num_layers):
        for name in ("query", "key", "value", "out"):
            expected[f"layers_{i}/attn/{name}/kernel"] = (d, d)
            expected[f"layers_{i}/attn/{name}/bias"] = (d,)
        expected[f"layers_{i}/mlp/up/kernel"] = (d, ff)
        expected[f"layers_{i}/mlp/up/bias"] = (ff,)
        expected[f"layers_{i}/mlp/down/kernel"] = (ff, d)
        expected[f"layers_{i}/mlp/down/bias"] = (d,)
        for name in ("norm_attn", "norm_mlp"):
            expected[f"layers_{i}/{name}/scale"] = (d,)
    if norm == "layer":
        expected.update({p.replace("/scale", "/bias"): s for p, s in expected.items() if p.endswith("/scale")})
    assert flat_shapes(linen_params) == expected
    assert flat_shapes(nnx_params) == expected


def test_projection_module_types():
    # LoRA bindings intercept plain Dense / Linear __call__: the projections must be exactly these.
    config = LMConfig.tiny()
    model = build(config)[2]
    for layer in (model.layers_0.attn.query, model.layers_1.mlp.down, model.head):
        assert type(layer) is nnx.Linear
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.append(context.module.path)
        return next_fun(*args, **kwargs)

    linen, params, _ = build(config)
    with nn.intercept_methods(record):
        linen.apply({"params": params}, tokens_for(config))
    assert ("layers_0", "attn", "query") in seen and ("head",) in seen
    assert len(seen) == config.num_layers * 6 + 1


def test_no_bias():
    params = param_shapes(LMConfig.tiny(use_bias=False))
    assert not any(p.endswith("/bias") for p in flat_shapes(params))


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"num_heads": 5}, "num_heads"),
        ({"norm": "batch"}, "norm"),
        ({"d_ff": 0}, "d_ff"),
        ({"vocab_size": 3.5}, "vocab_size"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"dtype": "not-a-dtype"}, "dtype"),
    ],
)
def test_bad_config_names_field(changes, field):
    with pytest.raises(ValueError, match=field):
        LMConfig.tiny(**changes)


def test_bad_inputs():
    config = LMConfig.tiny()
    model = build(config)[2]
    tokens = tokens_for(config)
    with pytest.raises(ValueError, match="exactly one"):
        model(tokens, inputs_embeds=jnp.zeros((BATCH, SEQ, config.d_model)))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, config.max_seq_len + 1), jnp.int32))
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens, attention_mask=jnp.ones((BATCH, SEQ + 1)))


def test_presets():
    for preset in (LMConfig.tiny, LMConfig.small, LMConfig.bench):
        config = preset()
        assert config.d_model % config.num_heads == 0
    assert LMConfig.tiny(norm="layer").norm == "layer"


def test_bfloat16_forward():
    config = LMConfig.tiny(dtype=jnp.bfloat16)
    tokens = tokens_for(config)
    fp32 = LMConfig.tiny()
    # Same weights (random_params is deterministic in the shapes), float32 compute.
    jax.tree.map(np.testing.assert_array_equal, build(config)[1], build(fp32)[1])
    want = forward_fn("linen", fp32, jit=True)(tokens)
    for kind in ("linen", "nnx"):
        got = forward_fn(kind, config, jit=True)(tokens)
        assert got.dtype == jnp.float32 and np.all(np.isfinite(got))
        # bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); through 2 blocks the logits
        # (|logit| < 2 here) move by ~0.015: 0.05 leaves a 3x margin.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=0.05)
