"""Task vectors, TIES, DARE, magnitude pruning and LoRA adapter arithmetic.

The TIES / pruning / DARE expectations are worked out by hand from the papers' definitions in
the comments (not computed by the code under test). Dense references are float64 NumPy;
float32 results are compared at rtol 1e-5 / atol 1e-6 (sums of a few products of O(1) numbers),
SVD re-factorisations at atol 1e-4 (float32 SVD of a 16 x 8 matrix).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxpeft as jp
from jaxpeft.ensembling import TreeMismatchError
from jaxpeft.task_arithmetic import (
    add_weighted_adapters,
    apply_task_vectors,
    dare,
    magnitude_prune,
    merge_task_vectors,
    task_vector,
    ties_merge,
)

JIT = pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"])  # eager twins: slow (CI budget)


def _tree(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(4, 3)), dtype),
        "b": jnp.asarray(rng.normal(size=(3,)), dtype),
        "count": jnp.asarray(3, jnp.int32),
    }


def _np(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


# --------------------------------------------------------------------------------------------
# Task vectors
# --------------------------------------------------------------------------------------------


@JIT
def test_task_vector_and_weighted_application_against_numpy(jit):
    base, ft1, ft2 = _tree(0), _tree(1), _tree(2)
    tv = jax.jit(task_vector) if jit else task_vector
    ap = jax.jit(apply_task_vectors) if jit else apply_task_vectors
    tau1, tau2 = tv(base, ft1), tv(base, ft2)
    assert tau1["count"] is None and tau1["w"].dtype == jnp.float32
    np.testing.assert_allclose(tau1["w"], np.asarray(ft1["w"]) - np.asarray(base["w"]), rtol=1e-6, atol=1e-7)
    out = ap(base, [tau1, tau2], jnp.asarray([0.5, -1.0]) if jit else [0.5, -1.0])  # addition and negation
    b, f1, f2 = _np(base), _np(ft1), _np(ft2)
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k], b[k] + 0.5 * (f1[k] - b[k]) - (f2[k] - b[k]), rtol=1e-5, atol=1e-6)
    assert int(out["count"]) == 3 and out["w"].dtype == jnp.float32


def test_bf16_round_trip_is_exact_and_keeps_dtype():
    base, ft = _tree(0, ml_dtypes.bfloat16), _tree(1, ml_dtypes.bfloat16)
    tau = task_vector(base, ft)
    assert tau["w"].dtype == jnp.float32  # the difference of two bf16 numbers is exact in float32
    back = apply_task_vectors(base, [tau])
    assert back["w"].dtype == jnp.bfloat16
    assert np.asarray(back["w"]).tobytes() == np.asarray(ft["w"]).tobytes()
    half = apply_task_vectors(base, [tau], 0.5)
    expected = (np.asarray(base["w"], np.float32) + np.float32(0.5) * np.asarray(tau["w"])).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(half["w"], np.float32), expected.astype(np.float32))


def test_task_vector_errors_name_paths():
    base = _tree(0)
    with pytest.raises(TreeMismatchError, match=r"only in base: b"):
        task_vector(base, {"w": base["w"], "count": base["count"]})
    with pytest.raises(TreeMismatchError, match=r"integer/bool .* count"):
        task_vector(base, {**base, "count": jnp.asarray(4, jnp.int32)})
    tau = task_vector(base, _tree(1))
    with pytest.raises(TreeMismatchError, match=r"w: base \(4, 3\) vs \(3, 4\)"):
        apply_task_vectors(base, [{**tau, "w": jnp.zeros((3, 4))}])
    with pytest.raises(TypeError, match="list of task vectors"):
        apply_task_vectors(base, tau)
    with pytest.raises(ValueError, match="finite"):
        apply_task_vectors(base, [tau], [math.nan])
    with pytest.raises(ValueError, match="2 weights for 1"):
        apply_task_vectors(base, [tau], [1.0, 2.0])


# --------------------------------------------------------------------------------------------
# Magnitude pruning
# --------------------------------------------------------------------------------------------


@JIT
def test_magnitude_prune_hand_example_global_and_per_leaf(jit):
    v = {"a": jnp.asarray([3.0, -2.5]), "b": jnp.asarray([0.5, -4.0, 2.0])}
    prune = jax.jit(magnitude_prune, static_argnames=("density", "scope")) if jit else magnitude_prune
    # global: n = 5, density 0.6 -> k = 3; magnitudes 3, 2.5, 0.5, 4, 2 -> keep 4, 3, 2.5
    out = prune(v, density=0.6)
    np.testing.assert_array_equal(out["a"], [3.0, -2.5])
    np.testing.assert_array_equal(out["b"], [0.0, -4.0, 0.0])
    # per leaf: a keeps round(1.2) = 1 (the 3), b keeps round(1.8) = 2 (the -4 and the 2)
    out = prune(v, density=0.6, scope="leaf")
    np.testing.assert_array_equal(out["a"], [3.0, 0.0])
    np.testing.assert_array_equal(out["b"], [0.0, -4.0, 2.0])
    # density 1 keeps everything; tiny density keeps at least one entry
    np.testing.assert_array_equal(prune(v, density=1.0)["b"], v["b"])
    np.testing.assert_array_equal(prune(v, density=0.01)["b"], [0.0, -4.0, 0.0])


def test_magnitude_prune_refuses_bad_density_and_scope():
    v = {"a": jnp.ones(3)}
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"density .* \(0, 1\]"):
            magnitude_prune(v, density)
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(v, 0.5, scope="layer")
    with pytest.raises(TypeError, match="non-float"):
        magnitude_prune({"a": jnp.ones(3, jnp.int32)}, 0.5)


# --------------------------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------------------------

# Three task vectors of five entries (one leaf, so "global" = per task vector).
TAU_1 = [0.5, -0.1, 0.3, 0.0, -0.8]
TAU_2 = [-0.4, 0.2, 0.7, 0.1, -0.6]
TAU_3 = [0.1, -0.3, -0.9, 0.05, 0.4]
# density 0.4 -> k = 2 per vector.
# Trim:  tau1 -> [0.5, 0, 0, 0, -0.8]    (|.8|, |.5|)
#        tau2 -> [0, 0, 0.7, 0, -0.6]    (|.7|, |.6|)
#        tau3 -> [0, 0, -0.9, 0, 0.4]    (|.9|, |.4|)
# Elect: sums [0.5, 0, -0.2, 0, -1.0] -> signs [+, 0, -, 0, -]
# Disjoint mean over agreeing nonzeros:
#        e0: {0.5} -> 0.5;  e2: {-0.9} -> -0.9;  e4: {-0.8, -0.6} -> -0.7;  e1, e3: 0
TIES_EXPECTED = [0.5, 0.0, -0.9, 0.0, -0.7]


@JIT
def test_ties_hand_example(jit):
    vectors = [{"x": jnp.asarray(t)} for t in (TAU_1, TAU_2, TAU_3)]
    ties = jax.jit(ties_merge, static_argnames=("density", "scope")) if jit else ties_merge
    out = ties(vectors, density=0.4)
    np.testing.assert_allclose(out["x"], TIES_EXPECTED, rtol=1e-6, atol=1e-7)
    # lambda scales the merged vector
    np.testing.assert_allclose(ties(vectors, density=0.4, scaling=0.5)["x"], 0.5 * np.array(TIES_EXPECTED), rtol=1e-6)
    # no trimming (density 1): sums [-0.2+0.5.., ...]; check e4: values -0.8, -0.6, 0.4, sum -1.0 -> mean(-0.8, -0.6)
    full = ties(vectors, density=1.0)["x"]
    assert float(full[4]) == pytest.approx(-0.7)
    # e3: 0.0, 0.1, 0.05 -> sign +, mean(0.1, 0.05) = 0.075 (the zero is not counted)
    assert float(full[3]) == pytest.approx(0.075)


def test_ties_global_versus_per_leaf_hand_example():
    v1 = {"a": jnp.asarray([4.0, -1.0]), "b": jnp.asarray([0.5, 2.0, -3.0])}
    v2 = {"a": jnp.asarray([-2.0, 1.5]), "b": jnp.asarray([1.0, -0.25, 1.0])}
    # global, density 0.4 -> k = 2 of 5 per vector:
    #   v1 keeps a0 = 4, b2 = -3; v2 keeps a0 = -2, a1 = 1.5
    #   elect: a0: 4 - 2 > 0 -> +, a1: + , b2: -   -> a = [4, 1.5], b = [0, 0, -3]
    out = ties_merge([v1, v2], density=0.4)
    np.testing.assert_allclose(out["a"], [4.0, 1.5])
    np.testing.assert_allclose(out["b"], [0.0, 0.0, -3.0])
    # per leaf: a keeps round(0.8) = 1, b keeps round(1.2) = 1 (ties at the threshold kept)
    #   v1: a -> [4, 0], b -> [0, 0, -3];  v2: a -> [-2, 0], b -> [1, 0, 1] (|1| twice)
    #   elect: a0 +, b0 +, b2: -3 + 1 < 0 -> -   -> a = [4, 0], b = [1, 0, -3]
    out = ties_merge([v1, v2], density=0.4, scope="leaf")
    np.testing.assert_allclose(out["a"], [4.0, 0.0])
    np.testing.assert_allclose(out["b"], [1.0, 0.0, -3.0])


def test_ties_weights_and_errors():
    v1, v2 = {"x": jnp.asarray([1.0, -1.0])}, {"x": jnp.asarray([-3.0, 2.0])}
    # weights first: [2, -2] and [-3, 2] -> signs of sums [-, 0]: e0 = -3, e1: sum 0 -> 0
    out = ties_merge([v1, v2], density=1.0, weights=[2.0, 1.0])
    np.testing.assert_allclose(out["x"], [-3.0, 0.0])
    with pytest.raises(ValueError, match="density"):
        ties_merge([v1, v2], density=0.0)
    with pytest.raises(TreeMismatchError, match="only in task vector 0: x"):
        ties_merge([v1, {"y": jnp.ones(2)}], density=0.5)
    with pytest.raises(ValueError, match="finite"):
        ties_merge([v1, v2], density=0.5, scaling=math.inf)


# --------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------


@JIT
def test_dare_hand_example_every_entry_dropped_or_rescaled(jit):
    fn = jax.jit(dare, static_argnames=("drop_rate",)) if jit else dare
    x = {"x": jnp.asarray([2.0, -4.0, 6.0, 8.0])}
    # p = 0.5: each entry is 0 or x / (1 - 0.5) = 2x  ->  {0, 4}, {0, -8}, {0, 12}, {0, 16}
    for seed in range(8):
        out = np.asarray(fn(x, jax.random.key(seed), drop_rate=0.5)["x"])
        for got, allowed in zip(out, ([0, 4], [0, -8], [0, 12], [0, 16])):
            assert got in allowed
    # p = 0 is the identity; the same key gives the same mask
    np.testing.assert_array_equal(fn(x, jax.random.key(0), drop_rate=0.0)["x"], x["x"])
    a = fn(x, jax.random.key(3), drop_rate=0.5)["x"]
    np.testing.assert_array_equal(a, fn(x, jax.random.key(3), drop_rate=0.5)["x"])


def test_dare_drops_a_fraction_p_and_keeps_the_expectation():
    n, p = 20_000, 0.3
    x = {"x": jnp.full((n,), 3.0), "y": jnp.full((n,), -1.0, jnp.bfloat16)}
    out = dare(x, jax.random.key(0), p)
    assert out["y"].dtype == jnp.bfloat16
    dropped = float(np.mean(np.asarray(out["x"]) == 0))
    # binomial: std sqrt(p (1 - p) / n) = 0.0032; 5 sigma
    assert abs(dropped - p) < 0.017
    # E[out] = x: sample std of one entry 3 sqrt(p / (1 - p)) = 1.96, of the mean 0.014; 5 sigma
    assert abs(float(np.mean(np.asarray(out["x"]))) - 3.0) < 0.07
    # leaves draw from different keys: the masks of x and y differ
    assert not np.array_equal(np.asarray(out["x"]) == 0, np.asarray(out["y"], np.float32) == 0)


def test_dare_refuses_bad_rate_and_key():
    x = {"x": jnp.ones(3)}
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"drop_rate p must be in \[0, 1\)"):
            dare(x, jax.random.key(0), p)
    with pytest.raises(TypeError, match="PRNG key"):
        dare(x, 0, 0.5)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        merge_task_vectors([x], drop_rate=0.5)


@JIT
def test_merge_task_vectors_composes_dare_ties_and_sum(jit):
    vectors = [{"x": jnp.asarray(t)} for t in (TAU_1, TAU_2, TAU_3)]
    static = ("method", "density", "drop_rate", "scope")
    merge = jax.jit(merge_task_vectors, static_argnames=static) if jit else merge_task_vectors
    key = jax.random.key(7)
    keys = jax.random.split(key, 3)  # documented: vector i gets split(key, n)[i]
    dropped = [dare(v, k, 0.4) for v, k in zip(vectors, keys)]
    got = merge(vectors, method="ties", density=0.4, drop_rate=0.4, key=key)
    np.testing.assert_allclose(got["x"], ties_merge(dropped, 0.4)["x"], rtol=1e-6)
    got = merge(vectors, method="sum", weights=[1.0, 0.5, -1.0], drop_rate=0.4, key=key, scaling=0.3)
    expected = 0.3 * (np.asarray(dropped[0]["x"]) + 0.5 * np.asarray(dropped[1]["x"]) - np.asarray(dropped[2]["x"]))
    np.testing.assert_allclose(got["x"], expected, rtol=1e-6, atol=1e-7)
    # no DARE, no pruning: plain task arithmetic; ties without DARE is ties_merge
    np.testing.assert_allclose(merge(vectors)["x"], np.sum([TAU_1, TAU_2, TAU_3], axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(merge(vectors, method="ties", density=0.4)["x"], TIES_EXPECTED, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="method"):
        merge_task_vectors(vectors, method="mean")


# --------------------------------------------------------------------------------------------
# LoRA adapter arithmetic
# --------------------------------------------------------------------------------------------

IN, OUT = 16, (2, 4)  # a DenseGeneral-like site: lora_b [r, 2, 4]


def _adapter(seed, rank, sites=("enc/query", "enc/value")):
    rng = np.random.default_rng(seed)
    out = {}
    for site in sites:
        node = out
        for part in site.split("/"):
            node = node.setdefault(part, {})
        node["lora_a"] = jnp.asarray(rng.normal(size=(IN, rank)), jnp.float32)
        node["lora_b"] = jnp.asarray(rng.normal(size=(rank, *OUT)), jnp.float32)
    return out


def _site(tree, site):
    for part in site.split("/"):
        tree = tree[part]
    return tree


def _delta(adapter, site, scale=1.0):
    """scale * A B as a dense [16, 8] float64 matrix."""
    node = _site(adapter, site)
    a = np.asarray(node["lora_a"], np.float64)
    b = np.asarray(node["lora_b"], np.float64).reshape(a.shape[-1], -1)
    return scale * a @ b


ADAPTERS = [_adapter(0, 2), _adapter(1, 3)]
CONFIGS = [jp.lora(2, 6.0), jp.lora(3, 2.0, rslora=True)]  # scales 3 and 2 / sqrt(3)
WEIGHTS = [0.7, -1.3]


def _weighted_sum(site, adapters=ADAPTERS, configs=CONFIGS, weights=WEIGHTS):
    return sum(w * _delta(a, site, c.scale) for a, c, w in zip(adapters, configs, weights))


def _combine(jit, **kwargs):
    def fn(adapters):
        return add_weighted_adapters(adapters, kwargs.get("weights", WEIGHTS), kwargs.get("configs", CONFIGS),
                                     combination=kwargs["combination"], rank=kwargs.get("rank"))

    adapter = (jax.jit(lambda ads: fn(ads)[0]) if jit else lambda ads: fn(ads)[0])(kwargs.get("adapters", ADAPTERS))
    return adapter, fn(kwargs.get("adapters", ADAPTERS))[1]


@JIT
def test_cat_is_the_exact_weighted_sum_of_dense_deltas(jit):
    adapter, config = _combine(jit, combination="cat")
    assert config.rank == 5 and config.scale == 1.0
    for site in ("enc/query", "enc/value"):
        assert _site(adapter, site)["lora_a"].shape == (IN, 5) and _site(adapter, site)["lora_b"].shape == (5, *OUT)
        np.testing.assert_allclose(_delta(adapter, site, config.scale), _weighted_sum(site), rtol=1e-5, atol=1e-5)


@JIT
def test_svd_full_rank_is_exact_and_low_rank_is_the_best_approximation(jit):
    adapter, config = _combine(jit, combination="svd", rank=5)  # rank 5 = 2 + 3: exact
    for site in ("enc/query", "enc/value"):
        np.testing.assert_allclose(_delta(adapter, site, config.scale), _weighted_sum(site), atol=1e-4)
    adapter, config = _combine(jit, combination="svd", rank=2)
    for site in ("enc/query", "enc/value"):
        dense = _weighted_sum(site)
        u, s, vt = np.linalg.svd(dense, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vt[:2]  # Eckart-Young: the best rank-2 approximation
        got = _delta(adapter, site, config.scale)
        np.testing.assert_allclose(got, best, atol=1e-4)
        assert np.linalg.norm(got - dense) == pytest.approx(np.sqrt(np.sum(s[2:] ** 2)), rel=1e-4)
    # default rank: the largest input rank (as HF PEFT)
    assert _combine(False, combination="svd")[1].rank == 3


@JIT
def test_linear_follows_hf_peft_and_is_not_the_weighted_sum(jit):
    adapters = [_adapter(0, 2), _adapter(2, 2)]
    configs = [jp.lora(2, 4.0), jp.lora(2, 1.0)]  # scales 2 and 0.5
    weights = [0.5, 2.0]  # w * s = 1 and 1: A = A1 + A2, B = B1 + B2
    adapter, config = _combine(jit, combination="linear", adapters=adapters, configs=configs, weights=weights)
    assert config.rank == 2 and config.scale == 1.0
    for site in ("enc/query", "enc/value"):
        a1, a2 = (np.asarray(_site(x, site)["lora_a"], np.float64) for x in adapters)
        b1, b2 = (np.asarray(_site(x, site)["lora_b"], np.float64).reshape(2, -1) for x in adapters)
        hf = (a1 + a2) @ (b1 + b2)  # sqrt(1) * A's summed, sqrt(1) * B's summed
        got = _delta(adapter, site, config.scale)
        np.testing.assert_allclose(got, hf, rtol=1e-5, atol=1e-5)
        weighted = a1 @ b1 + a2 @ b2
        assert np.abs(got - weighted).max() > 0.1  # the cross terms A1 B2 + A2 B1


def test_adapter_missing_a_site_contributes_nothing_there():
    adapters = [_adapter(0, 2), _adapter(1, 3, sites=("enc/query",))]
    adapter, config = add_weighted_adapters(adapters, WEIGHTS, CONFIGS, combination="cat")
    # rank 2 + 3 at query, 2 alone at value: a rank_pattern where LoRA has one, else zero padding
    value_rank = config.rank_at("enc/value") if hasattr(config, "rank_at") else config.rank
    assert value_rank in (2, 5) and _site(adapter, "enc/value")["lora_a"].shape == (IN, value_rank)
    assert _site(adapter, "enc/query")["lora_a"].shape == (IN, 5) and config.rank == 5
    np.testing.assert_allclose(
        _delta(adapter, "enc/value"),
        WEIGHTS[0] * _delta(adapters[0], "enc/value", CONFIGS[0].scale),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        _delta(adapter, "enc/query"), _weighted_sum("enc/query", adapters), rtol=1e-5, atol=1e-5
    )
    assert config.targets == ("^enc/query$", "^enc/value$")


def test_adapter_arithmetic_refuses_bad_input():
    with pytest.raises(ValueError, match="'linear' needs adapters of one rank"):
        add_weighted_adapters(ADAPTERS, WEIGHTS, CONFIGS, combination="linear")
    same = [_adapter(0, 2), _adapter(1, 2)]
    with pytest.raises(ValueError, match=r"sqrt\(weight \* scale\).*adapters \[1\]"):
        add_weighted_adapters(same, [1.0, -1.0], jp.lora(2), combination="linear")
    with pytest.raises(ValueError, match="rank= is for 'svd'"):
        add_weighted_adapters(ADAPTERS, WEIGHTS, CONFIGS, combination="cat", rank=4)
    with pytest.raises(ValueError, match=r"rank 9 exceeds min\(d_in, d_out\) = 8"):
        add_weighted_adapters(ADAPTERS, WEIGHTS, CONFIGS, combination="svd", rank=9)
    with pytest.raises(ValueError, match="combination"):
        add_weighted_adapters(ADAPTERS, WEIGHTS, CONFIGS, combination="ties")
    with pytest.raises(TypeError, match="not LoRA configs"):
        add_weighted_adapters(ADAPTERS, WEIGHTS, [CONFIGS[0], 1.0])
    with pytest.raises(ValueError, match="holds no lora_a"):
        add_weighted_adapters([ADAPTERS[0], {"w": jnp.ones(2)}], WEIGHTS, CONFIGS)
    with pytest.raises(ValueError, match="rank 2 at 'enc/query' but its config says 3"):
        add_weighted_adapters(ADAPTERS, WEIGHTS, [CONFIGS[0], CONFIGS[0].__class__(rank=3)][::-1])
    small = {"enc": {"query": {"lora_a": jnp.ones((4, 3)), "lora_b": jnp.ones((3, 4))}}}
    big = {"enc": {"query": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}}}
    with pytest.raises(ValueError, match=r"'cat' gives rank 5 .* min\(d_in, d_out\) = 4 at 'enc/query'.*rank=4"):
        add_weighted_adapters([big, small], WEIGHTS, CONFIGS, combination="cat")
    other = {"enc": {"query": {"lora_a": jnp.ones((IN, 3)), "lora_b": jnp.ones((3, 5))}}}
    with pytest.raises(ValueError, match="'enc/query' adapter 1 has in/out shapes"):
        add_weighted_adapters([ADAPTERS[0], other], WEIGHTS, CONFIGS)


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="out")(jnp.tanh(nn.Dense(8, name="query")(x)))


def test_combined_adapter_in_a_real_model_equals_dense_weighted_sum():
    model = TwoDense()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)), jnp.float32)
    base = model.init(jax.random.key(0), x)["params"]
    configs = [jp.lora(2, 4.0, targets="query|out"), jp.lora(3, 3.0, targets="query|out")]
    rng = np.random.default_rng(1)
    adapters = []
    for i, config in enumerate(configs):
        peft_model, params = jp.apply(config, model, jax.random.key(i + 1), x, params=base)
        trainable, _ = jp.partition(params, peft_model.trainable)
        adapters.append(jax.tree.map(lambda t: None if t is None else jnp.asarray(rng.normal(size=t.shape), t.dtype),
                                     trainable, is_leaf=lambda t: t is None))
    weights = [0.5, -0.25]
    adapter, config = add_weighted_adapters(adapters, weights, configs, combination="cat")
    new_model, new_params = jp.apply(config, model, jax.random.key(9), x, params=base)
    got = new_model.apply(jp.insert(new_params, adapter), x)
    dense = jax.tree.map(lambda t: np.asarray(t, np.float64), base)
    for site in ("query", "out"):
        dense[site]["kernel"] = dense[site]["kernel"] + sum(
            w * _delta(a, site, c.scale) for a, c, w in zip(adapters, configs, weights)
        )
    expected = model.apply({"params": jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), dense)}, x)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_nnx_adapter_states_combine_and_load_back():
    from flax import nnx

    from jaxpeft.ensembling import wise_ft_adapter
    from jaxpeft.models import NnxLM

    model = NnxLM(jp.models.LMConfig.tiny(), rngs=nnx.Rngs(0))
    configs = [jp.lora(2, 4, targets="attn/query$"), jp.lora(4, 4, targets="attn/query$")]
    states = []
    for i, config in enumerate(configs):
        _, state, _ = nnx.split(jp.apply(config, model, jax.random.key(i)), jp.PeftParam, ...)
        states.append(jax.tree.map(lambda x: x + 0.1, state))  # B != 0
    combined, config = add_weighted_adapters(states, [0.7, -0.3], configs, combination="cat")
    site = "layers_1/attn/query"
    expected = sum(w * _delta(nnx.to_pure_dict(s), site, c.scale) for s, c, w in zip(states, configs, [0.7, -0.3]))
    np.testing.assert_allclose(_delta(combined, site), expected, rtol=1e-5, atol=1e-6)
    new = jp.apply(config, model, jax.random.key(5))
    _, state, _ = nnx.split(new, jp.PeftParam, ...)
    nnx.replace_by_pure_dict(state, combined)
    nnx.update(new, state)
    np.testing.assert_array_equal(new.layers_1.attn.query.lora_b.get_value(), _site(combined, site)["lora_b"])
    # WiSE-FT of the update works on the State as well
    half = wise_ft_adapter(states[0], 0.5)
    np.testing.assert_allclose(nnx.to_pure_dict(half)["layers_0"]["attn"]["query"]["lora_b"],
                               0.5 * np.asarray(nnx.to_pure_dict(states[0])["layers_0"]["attn"]["query"]["lora_b"]))


@pytest.mark.skipif(not hasattr(jp.LoRA, "rank_at"), reason="this LoRA has no named adapters / rank_pattern")
def test_named_adapters_and_per_site_ranks_in_a_real_model():
    from jaxpeft.ensembling import wise_ft_adapter

    model = TwoDense()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6)), jnp.float32)
    base = model.init(jax.random.key(0), x)["params"]
    configs = [
        jp.lora(2, 4.0, targets="query|out", adapter="task_a", rank_pattern={"out": 3}, alpha_pattern={"out": 1.5}),
        jp.lora(4, 2.0, targets="query|out", adapter="task_b"),
    ]
    rng = np.random.default_rng(3)
    adapters = []
    for i, config in enumerate(configs):
        peft_model, params = jp.apply(config, model, jax.random.key(i + 1), x, params=base)
        trainable, _ = jp.partition(params, peft_model.trainable)
        adapters.append(jax.tree.map(lambda t: None if t is None else jnp.asarray(rng.normal(size=t.shape), t.dtype),
                                     trainable, is_leaf=lambda t: t is None))
    assert adapters[0]["out"]["lora_a@task_a"].shape == (8, 3)
    # the scales come from the configs, per site: query 4/2 and 2/4, out 1.5/3 and 2/4
    scales = [{"query": 2.0, "out": 0.5}, {"query": 0.5, "out": 0.5}]
    weights = [1.0, -0.5]
    adapter, config = add_weighted_adapters(adapters, weights, configs, combination="cat", adapter="both")
    assert config.adapter == "both" and config.rank_at("query") == 6 and config.rank_at("out") == 7
    assert config.scale_at("query") == 1.0 and config.scale_at("out") == 1.0
    new_model, new_params = jp.apply(config, model, jax.random.key(9), x, params=base)
    got = new_model.apply(jp.insert(new_params, adapter), x)
    dense = jax.tree.map(lambda t: np.asarray(t, np.float64), base)
    for site in ("query", "out"):
        for a, c, w, s in zip(adapters, configs, weights, scales):
            node = a[site]
            names = c.param_names
            dense[site]["kernel"] = dense[site]["kernel"] + w * s[site] * (
                np.asarray(node[names[0]], np.float64) @ np.asarray(node[names[1]], np.float64))
    expected = model.apply({"params": jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), dense)}, x)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # WiSE-FT of a named adapter scales its lora_b@name
    half = wise_ft_adapter(adapters[0], 0.5)
    np.testing.assert_allclose(half["out"]["lora_b@task_a"], 0.5 * np.asarray(adapters[0]["out"]["lora_b@task_a"]))
    np.testing.assert_array_equal(half["out"]["lora_a@task_a"], adapters[0]["out"]["lora_a@task_a"])
    with pytest.raises(ValueError, match="PiSSA"):
        add_weighted_adapters(adapters, weights, [configs[0], jp.lora(4, 2.0, adapter="task_b", init="pissa")])
