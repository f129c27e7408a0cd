"""WiSE-FT, alpha sweeps, soups and output ensembles, against NumPy references and invariants.

Tolerances: float32 results that NumPy computes with the same float32 operations are compared
at rtol 1e-6 (XLA may fuse or reorder one rounding); model outputs built from a float64 NumPy
kernel are compared at atol 1e-5 (float32 matmuls over d <= 16 inputs of size ~1).
"""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxpeft as jp
from jaxpeft.ensembling import (
    SoupResult,
    TreeMismatchError,
    adapter_ensemble,
    alpha_sweep,
    greedy_soup,
    output_ensemble,
    pick_alpha,
    plot_alpha_sweep,
    uniform_soup,
    wise_ft,
    wise_ft_adapter,
)

JIT = pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"])  # eager twins: slow (CI budget)


def _random_tree(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), dtype),
            "bias": jnp.asarray(rng.normal(size=3), dtype),
        },
        "norm": {"scale": jnp.asarray(rng.normal(size=(5,)), dtype)},
        "step": jnp.asarray(7, jnp.int32),
        "flag": jnp.asarray([True, False]),
    }


def _wise(jit):
    return jax.jit(wise_ft) if jit else wise_ft


# --------------------------------------------------------------------------------------------
# WiSE-FT on full trees
# --------------------------------------------------------------------------------------------


@JIT
def test_wise_ft_endpoints_are_bitwise(jit):
    zs, ft = _random_tree(0), _random_tree(1)
    # Entries where the naive formula would not give the endpoint bit for bit:
    # 0*inf = nan, and -0.0 + 0.0 = +0.0.
    zs["norm"]["scale"] = zs["norm"]["scale"].at[0].set(-0.0).at[1].set(jnp.inf)
    ft["norm"]["scale"] = ft["norm"]["scale"].at[2].set(-0.0).at[3].set(-jnp.inf)
    for alpha, expected in ((0.0, zs), (1.0, ft)):
        out = _wise(jit)(zs, ft, alpha)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
            assert a.dtype == b.dtype
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@JIT
def test_wise_ft_is_linear_in_alpha_against_numpy(jit):
    zs, ft = _random_tree(2), _random_tree(3)
    for alpha in (0.25, 0.5, 0.8, 1.5, -0.5):  # outside [0, 1]: extrapolation is allowed
        out = _wise(jit)(zs, ft, alpha)
        for path in (("dense", "kernel"), ("dense", "bias"), ("norm", "scale")):
            z, f = np.asarray(zs[path[0]][path[1]]), np.asarray(ft[path[0]][path[1]])
            expected = np.float32(1 - alpha) * z + np.float32(alpha) * f
            np.testing.assert_allclose(out[path[0]][path[1]], expected, rtol=1e-6, atol=1e-7)
        # integer / bool leaves are equal in both trees and pass through
        assert int(out["step"]) == 7 and out["flag"].tolist() == [True, False]


def test_wise_ft_bf16_keeps_dtype_and_mixes_in_float32():
    zs, ft = _random_tree(4, ml_dtypes.bfloat16), _random_tree(5, ml_dtypes.bfloat16)
    out = wise_ft(zs, ft, 0.3)
    z = np.asarray(zs["dense"]["kernel"]).astype(np.float32)
    f = np.asarray(ft["dense"]["kernel"]).astype(np.float32)
    expected = (np.float32(0.7) * z + np.float32(0.3) * f).astype(ml_dtypes.bfloat16)
    assert out["dense"]["kernel"].dtype == jnp.bfloat16
    # one bf16 rounding of the float32 mix: equal up to one ulp of bf16 (2**-8 relative)
    np.testing.assert_allclose(
        np.asarray(out["dense"]["kernel"]).astype(np.float32), expected.astype(np.float32), rtol=2**-8
    )


def test_wise_ft_mismatches_name_the_paths():
    zs = _random_tree(0)
    missing = {**zs, "norm": {}}
    with pytest.raises(TreeMismatchError, match=r"only in zero_shot: norm/scale"):
        wise_ft(zs, missing, 0.5)
    reshaped = {**zs, "dense": {**zs["dense"], "kernel": jnp.zeros((3, 4))}}
    with pytest.raises(TreeMismatchError, match=r"dense/kernel: \(4, 3\) vs \(3, 4\)"):
        wise_ft(zs, reshaped, 0.5)
    recast = {**zs, "dense": {**zs["dense"], "bias": zs["dense"]["bias"].astype(jnp.bfloat16)}}
    with pytest.raises(TreeMismatchError, match=r"dense/bias: float32 vs bfloat16"):
        wise_ft(zs, recast, 0.5)
    other_step = {**zs, "step": jnp.asarray(8, jnp.int32)}
    with pytest.raises(TreeMismatchError, match=r"integer/bool leaves .* step"):
        wise_ft(zs, other_step, 0.5)
    for alpha in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            wise_ft(zs, zs, alpha)


def test_wise_ft_does_not_modify_inputs_and_returns_new_buffers():
    zs, ft = _random_tree(0), _random_tree(1)
    before = jax.tree.map(np.array, (zs, ft))
    out = wise_ft(zs, ft, 0.0)
    for a, b in zip(jax.tree.leaves((zs, ft)), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert out["dense"]["kernel"] is not zs["dense"]["kernel"]


def test_wise_ft_works_on_nnx_state():
    zs = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))[1]
    ft = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(1)))[1]
    out = wise_ft(zs, ft, 0.5)
    assert isinstance(out, nnx.State)
    expected = 0.5 * np.asarray(zs["kernel"].get_value()) + 0.5 * np.asarray(ft["kernel"].get_value())
    np.testing.assert_allclose(out["kernel"].get_value(), expected, rtol=1e-6)


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxpeft.ensembling import wise_ft
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
spec = {"w": P("data", "model"), "b": P("model")}
def put(tree):
    return {k: jax.device_put(v, NamedSharding(mesh, spec[k])) for k, v in tree.items()}
zs = put({"w": jnp.arange(32.0).reshape(4, 8), "b": jnp.ones(8)})
ft = put({"w": -jnp.arange(32.0).reshape(4, 8), "b": jnp.zeros(8)})
out = wise_ft(zs, ft, 0.25)
for k in out:
    assert out[k].sharding.is_equivalent_to(zs[k].sharding, out[k].ndim), (k, out[k].sharding)
    assert len(out[k].addressable_shards) == 4
np.testing.assert_allclose(out["w"], 0.5 * np.arange(32.0).reshape(4, 8))
print("ok")
"""


def test_wise_ft_keeps_shardings_on_a_2x2_cpu_mesh():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------------------------
# WiSE-FT for LoRA: scale the update, not both factors
# --------------------------------------------------------------------------------------------

D = 8


class SmallNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(D, name="query")(x)
        v = nn.DenseGeneral((2, 4), name="value")(x).reshape(h.shape)  # lora_b: [r, 2, 4]
        return nn.Dense(5, name="head")(jnp.tanh(h + v))


X = jnp.asarray(np.random.default_rng(0).normal(size=(3, D)), jnp.float32)


@pytest.fixture(scope="module")
def lora_setup():
    model = SmallNet()
    base = model.init(jax.random.key(0), X)["params"]
    peft = jp.lora(rank=2, alpha=6, targets=r"(query|value)$")
    peft_model, params = jp.apply(peft, model, jax.random.key(1), X, params=base)
    rng = np.random.default_rng(1)
    for site in ("query", "value"):  # a trained adapter: B != 0
        b = params[site]["lora_b"]
        params[site]["lora_b"] = jnp.asarray(rng.normal(size=b.shape), jnp.float32)
    return model, base, peft, peft_model, params


def _dense_merge(base, params, scale, b_factor, a_factor=1.0):
    """kernel + scale * (a_factor A)(b_factor B), in float64 NumPy."""
    merged = jax.tree.map(np.asarray, base)
    for site in ("query", "value"):
        a = np.asarray(params[site]["lora_a"], np.float64) * a_factor
        b = np.asarray(params[site]["lora_b"], np.float64) * b_factor
        kernel = np.asarray(base[site]["kernel"], np.float64) + scale * np.tensordot(a, b, axes=1)
        merged[site] = {**merged[site], "kernel": kernel}
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), merged)


@JIT
def test_wise_ft_adapter_is_base_plus_alpha_delta_not_alpha_squared(lora_setup, jit):
    model, base, peft, peft_model, params = lora_setup
    alpha = 0.4
    fn = jax.jit(wise_ft_adapter) if jit else wise_ft_adapter
    mixed = fn(params, alpha)
    got = peft_model.apply(mixed, X)
    reference = model.apply({"params": _dense_merge(base, params, peft.scale, alpha)}, X)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    # Scaling both A and B gives base + alpha^2 * delta: measurably different.
    both = jax.tree_util.tree_map_with_path(
        lambda p, x: x * alpha if jp.tree.path_to_str(p).endswith(("lora_a", "lora_b")) else x, params
    )
    squared = model.apply({"params": _dense_merge(base, params, peft.scale, alpha, alpha)}, X)
    np.testing.assert_allclose(peft_model.apply(both, X), squared, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(squared)).max() > 1e-2
    # lora_a and the base are untouched; only lora_b is scaled
    np.testing.assert_array_equal(mixed["query"]["lora_a"], params["query"]["lora_a"])
    np.testing.assert_array_equal(mixed["value"]["kernel"], params["value"]["kernel"])


def test_wise_ft_adapter_endpoints_and_merged_equivalence(lora_setup):
    model, base, peft, peft_model, params = lora_setup
    np.testing.assert_array_equal(peft_model.apply(wise_ft_adapter(params, 0.0), X), model.apply({"params": base}, X))
    one = wise_ft_adapter(params, 1.0)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # WiSE-FT of the merged weights is the same model (it is linear in the update).
    merged_mix = wise_ft(base, jp.merge(peft_model, params), 0.3)
    adapter_mix = jp.merge(peft_model, wise_ft_adapter(params, 0.3))
    for a, b in zip(jax.tree.leaves(merged_mix), jax.tree.leaves(adapter_mix)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_wise_ft_adapter_on_a_partition_and_bf16(lora_setup):
    _, _, _, peft_model, params = lora_setup
    trainable, _ = jp.partition(params, peft_model.trainable)
    out = wise_ft_adapter(trainable, 0.5)
    assert out["query"]["kernel"] is None
    np.testing.assert_allclose(out["query"]["lora_b"], 0.5 * np.asarray(params["query"]["lora_b"]), rtol=1e-7)
    bf = jax.tree.map(lambda x: None if x is None else x.astype(jnp.bfloat16), trainable)
    out = wise_ft_adapter(bf, 0.5)
    assert out["value"]["lora_b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(  # halving is exact in bf16
        np.asarray(out["value"]["lora_b"], np.float32), 0.5 * np.asarray(bf["value"]["lora_b"], np.float32)
    )


def test_wise_ft_refuses_lora_factors_and_wise_ft_adapter_refuses_non_lora(lora_setup):
    _, base, _, _, params = lora_setup
    with pytest.raises(ValueError, match=r"low-rank factors \(query/lora_a.*wise_ft_adapter"):
        wise_ft(params, params, 0.5)
    wise_ft(params, params, 0.5, factor_leaves=None)  # explicitly elementwise
    with pytest.raises(jp.SelectorError, match="matched no leaf"):
        wise_ft_adapter(base, 0.5)
    with pytest.raises(ValueError, match="finite"):
        wise_ft_adapter(params, math.nan)


# --------------------------------------------------------------------------------------------
# Alpha sweep
# --------------------------------------------------------------------------------------------


def _toy_evaluate(params, target):
    w = np.asarray(params["w"], np.float64)
    return {"distance": float(np.abs(w - target).sum()), "closeness": float(-np.abs(w - target).sum())}


def test_alpha_sweep_table_pick_and_plot(tmp_path):
    zs, ft = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    sets = {"held_out": np.full(3, 0.3), "shifted": np.full(3, 0.9)}
    alphas = np.linspace(0, 1, 11)
    table = alpha_sweep(_toy_evaluate, zs, ft, alphas, sets)
    assert len(table) == 22 and [r["set"] for r in table[:2]] == ["held_out", "shifted"]
    for row in table:
        target = 0.3 if row["set"] == "held_out" else 0.9
        assert row["distance"] == pytest.approx(3 * abs(row["alpha"] - target), abs=1e-6)
    assert pick_alpha(table, "held_out", "distance", "min") == pytest.approx(0.3)
    assert pick_alpha(table, "shifted", "closeness", "max") == pytest.approx(0.9)
    path = plot_alpha_sweep(table, tmp_path / "plots" / "sweep.png", title="toy")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    plot_alpha_sweep(table, tmp_path / "one.png", metrics=["distance"])
    with pytest.raises(KeyError, match="accuracy"):
        plot_alpha_sweep(table, tmp_path / "x.png", metrics=["accuracy"])


def test_alpha_sweep_of_a_lora_adapter(lora_setup):
    model, base, peft, peft_model, params = lora_setup

    def evaluate(p, x):
        return {"mean": float(jnp.mean(peft_model.apply(p, x)))}

    table = alpha_sweep(evaluate, None, params, [0.0, 0.5, 1.0], {"x": X})
    expected = [
        float(jnp.mean(model.apply({"params": _dense_merge(base, params, peft.scale, a)}, X))) for a in (0, 0.5, 1)
    ]
    np.testing.assert_allclose([r["mean"] for r in table], expected, atol=1e-5)
    with pytest.raises(jp.SelectorError):
        alpha_sweep(evaluate, None, base, [0.5], {"x": X})


def test_alpha_sweep_and_pick_alpha_refuse_bad_input():
    zs, ft = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="finite"):
        alpha_sweep(_toy_evaluate, zs, ft, [0.0, math.nan], {"a": 0.0})
    with pytest.raises(ValueError, match="eval_sets"):
        alpha_sweep(_toy_evaluate, zs, ft, [0.0], {})
    with pytest.raises(TreeMismatchError):
        alpha_sweep(_toy_evaluate, zs, {"v": jnp.ones(3)}, [0.0], {"a": 0.0})
    table = [
        {"alpha": 0.0, "set": "a", "acc": math.nan},
        {"alpha": 0.5, "set": "a", "acc": 0.7},
        {"alpha": 1.0, "set": "a", "acc": 0.7},
    ]
    assert pick_alpha(table, "a", "acc", "max") == 0.5  # NaN skipped; ties go to the first
    with pytest.raises(KeyError, match="sets"):
        pick_alpha(table, "b", "acc", "max")
    with pytest.raises(KeyError, match="metrics"):
        pick_alpha(table, "a", "loss", "max")
    with pytest.raises(ValueError, match="mode"):
        pick_alpha(table, "a", "acc", "best")


# --------------------------------------------------------------------------------------------
# Soups
# --------------------------------------------------------------------------------------------


@JIT
def test_uniform_soup_is_the_numpy_mean(jit):
    trees = [_random_tree(i) for i in range(4)]
    trees[2]["dense"]["kernel"] = trees[2]["dense"]["kernel"] * 100.0
    soup = (jax.jit(uniform_soup) if jit else uniform_soup)(trees)
    expected = np.mean([np.asarray(t["dense"]["kernel"], np.float64) for t in trees], axis=0)
    np.testing.assert_allclose(soup["dense"]["kernel"], expected, rtol=1e-6, atol=1e-6)
    assert int(soup["step"]) == 7
    bf = [_random_tree(i, ml_dtypes.bfloat16) for i in range(3)]
    out = uniform_soup(bf)
    assert out["norm"]["scale"].dtype == jnp.bfloat16
    expected = np.mean([np.asarray(t["norm"]["scale"], np.float32) for t in bf], axis=0)
    np.testing.assert_allclose(np.asarray(out["norm"]["scale"], np.float32), expected, rtol=2**-8)
    with pytest.raises(ValueError, match="no ingredients"):
        uniform_soup([])


def _score(tree):
    # A bumpy, accuracy-like score (rounded to 2 decimals, so ties happen).
    w = np.asarray(tree["w"], np.float64)
    return round(float(np.mean(np.cos(3.0 * w) - 0.1 * w**2)), 2)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=3, max_size=3), min_size=1, max_size=6),
    st.booleans(),
)
def test_greedy_soup_never_lowers_held_out_score(candidates, higher_is_better):
    trees = [{"w": jnp.asarray(c, jnp.float32)} for c in candidates]
    evaluate = _score if higher_is_better else (lambda t: -_score(t))
    result = greedy_soup(trees, evaluate, higher_is_better=higher_is_better)
    assert isinstance(result, SoupResult)
    individual = [evaluate(t) for t in trees]
    best = max(individual) if higher_is_better else min(individual)
    if higher_is_better:
        assert result.score >= best
    else:
        assert result.score <= best
    assert result.score == evaluate(result.params)
    # the soup is the uniform average of the chosen ingredients
    expected = np.mean([np.asarray(trees[i]["w"], np.float64) for i in result.indices], axis=0)
    np.testing.assert_allclose(result.params["w"], expected, rtol=1e-6, atol=1e-6)
    # tried best-first, each tried once, the first always kept
    tried = [h["index"] for h in result.history]
    assert sorted(tried) == list(range(len(trees)))
    scores = [h["individual_score"] for h in result.history]
    assert scores == sorted(scores, reverse=higher_is_better)
    assert result.history[0]["accepted"] and result.indices == [h["index"] for h in result.history if h["accepted"]]


def test_greedy_soup_hand_example_rejects_the_harmful_ingredient():
    # score = -|w - 1|: ingredients 0.8 (score -0.2), 1.3 (-0.3), 5.0 (-4.0)
    trees = [{"w": jnp.asarray([5.0])}, {"w": jnp.asarray([0.8])}, {"w": jnp.asarray([1.3])}]
    evaluate = lambda t: -abs(float(t["w"][0]) - 1.0)  # noqa: E731
    result = greedy_soup(trees, evaluate)
    # start at 0.8; + 1.3 -> mean 1.05, score -0.05 >= -0.2: kept; + 5.0 -> mean 2.37: dropped
    assert result.indices == [1, 2]
    assert result.score == pytest.approx(-0.05, abs=1e-6)
    assert [h["accepted"] for h in result.history] == [True, True, False]
    with pytest.raises(ValueError, match="individual_scores"):
        greedy_soup(trees, evaluate, individual_scores=[1.0])


# --------------------------------------------------------------------------------------------
# Output ensembles
# --------------------------------------------------------------------------------------------


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@JIT
@pytest.mark.parametrize("mode", ["logits", "probs"])
def test_output_ensemble_equals_numpy_average(mode, jit):
    model_a, model_b = SmallNet(), nn.Dense(5)
    params_a = model_a.init(jax.random.key(0), X)
    params_b = model_b.init(jax.random.key(1), X)
    fns = [model_a.apply, model_b.apply]
    outs = [np.asarray(f(p, X), np.float64) for f, p in zip(fns, [params_a, params_b])]
    if mode == "probs":
        outs = [_softmax(o) for o in outs]
    predict = output_ensemble(fns, mode=mode, jit=jit)
    np.testing.assert_allclose(predict([params_a, params_b], X), np.mean(outs, axis=0), rtol=1e-5, atol=1e-6)
    weighted = output_ensemble(fns, mode=mode, weights=[3, 1], jit=jit)
    np.testing.assert_allclose(
        weighted([params_a, params_b], X), 0.75 * outs[0] + 0.25 * outs[1], rtol=1e-5, atol=1e-6
    )


@JIT
@pytest.mark.parametrize("mode,strategy", [("logits", "vmap"), ("probs", "vmap"), ("probs", "loop")])
def test_adapter_ensemble_equals_numpy_average(lora_setup, mode, strategy, jit):
    _, _, _, peft_model, params = lora_setup
    trainable, frozen = jp.partition(params, peft_model.trainable)
    adapters = [wise_ft_adapter(trainable, a) for a in (0.2, 1.0, -0.7)]
    outs = [np.asarray(peft_model.apply(jp.combine(a, frozen), X), np.float64) for a in adapters]
    if mode == "probs":
        outs = [_softmax(o) for o in outs]
    predict = adapter_ensemble(lambda a, f, x: peft_model.apply(jp.combine(a, f), x), mode=mode, strategy=strategy,
                               jit=jit)
    np.testing.assert_allclose(predict(adapters, frozen, X), np.mean(outs, axis=0), rtol=1e-5, atol=1e-6)


def test_ensembles_refuse_bad_input():
    with pytest.raises(ValueError, match="mode"):
        output_ensemble([lambda p, x: x], mode="votes")
    with pytest.raises(ValueError, match="weights"):
        output_ensemble([lambda p, x: x, lambda p, x: x], weights=[1, -1])
    with pytest.raises(ValueError, match="2 weights for 1 members"):
        output_ensemble([lambda p, x: x], weights=[1, 1])
    predict = output_ensemble([lambda p, x: x * p, lambda p, x: x[:, :2]])
    with pytest.raises(ValueError, match="differ in shape"):
        predict([1.0, 1.0], X)
    with pytest.raises(ValueError, match="1 params for 2 members"):
        predict([1.0], X)
    for strategy in ("vmap", "loop"):
        ens = adapter_ensemble(lambda a, f, x: x * a["s"], strategy=strategy)
        with pytest.raises(TreeMismatchError):
            ens([{"s": jnp.ones(())}, {"t": jnp.ones(())}], None, X)
    with pytest.raises(ValueError, match="strategy"):
        adapter_ensemble(lambda a, f, x: x, strategy="pmap")
