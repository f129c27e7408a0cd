"""Tests for jaxpeft.optim: decay masks, per-group learning rates, state sizes, warmup_cosine.

Each optimizer is checked against hand-written math (SGD/AdamW update formulas, the cosine formula),
and each update runs both eagerly and under ``jax.jit``.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.optim import (
    decay_mask,
    decay_selector,
    masked_weight_decay,
    multi_lr,
    state_bytes,
    tree_bytes,
    warmup_cosine,
)
from jaxpeft.tree import SelectorError


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, 8, name="embed")(tokens)
        x = nn.Dense(8, name="dense")(x)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(11, name="head")(x)


@pytest.fixture(scope="module")
def params():
    return TinyLM().init(jax.random.key(0), jnp.zeros((2, 3), jnp.int32))["params"]


def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def flat(tree):
    return dict(jp.leaves_with_paths(tree))


# ---------------------------------------------------------------- decay masks


def test_decay_mask_default_excludes_biases_norms_embeddings(params):
    m = flat(decay_mask(params))
    assert m == {
        "dense/bias": False,
        "dense/kernel": True,
        "embed/embedding": False,  # 2-D but an embedding table
        "head/bias": False,
        "head/kernel": True,
        "norm/bias": False,
        "norm/scale": False,
    }


def test_decay_mask_configurable(params):
    m = flat(decay_mask(params, exclude=False))
    assert m["embed/embedding"] and m["dense/kernel"] and not m["dense/bias"]
    m = flat(decay_mask(params, exclude=r"^head/"))
    assert m["embed/embedding"] and not m["head/kernel"]
    m = flat(decay_mask(params, exclude=False, min_ndim=1))
    assert m["dense/bias"] and m["norm/scale"]
    # the selector form works with the tree vocabulary
    assert jp.select(params, decay_selector()) == ["dense/kernel", "head/kernel"]


def test_decay_mask_keeps_none_holes(params):
    trainable, _ = jp.partition(params, r"^(head|norm)/")
    m = decay_mask(trainable)
    assert m["dense"]["kernel"] is None and m["embed"]["embedding"] is None
    assert m["head"]["kernel"] is True and m["norm"]["scale"] is False


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_adamw_with_decay_mask_decays_kernels_only(params, jit):
    # With zero gradients Adam's step is 0, so AdamW's update is exactly -lr * wd * p on decayed
    # leaves and 0 elsewhere (Loshchilov & Hutter, eq. in Alg. 2 line 12).
    lr, wd = 0.1, 0.5
    trainable, _ = jp.partition(params, r"^(head|norm|dense)/")
    opt = optax.adamw(lr, weight_decay=wd, mask=decay_mask)
    state = opt.init(trainable)
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = maybe_jit(opt.update, jit)(zeros, state, trainable)
    for path, u in flat(updates).items():
        p = np.asarray(flat(trainable)[path])
        expected = -lr * wd * p if path.endswith("kernel") else np.zeros_like(p)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, atol=0, err_msg=path)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_masked_weight_decay(params, jit):
    wd = 0.25
    tx = masked_weight_decay(wd)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = maybe_jit(tx.update, jit)(zeros, state, params)
    for path, u in flat(updates).items():
        p = np.asarray(flat(params)[path])
        expected = wd * p if path in ("dense/kernel", "head/kernel") else np.zeros_like(p)
        np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-6, err_msg=path)


def test_decay_mask_nnx_state():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    _, state = nnx.split(model, nnx.Param)
    assert flat(decay_mask(state)) == {
        "layers/0/bias": False,
        "layers/0/kernel": True,
        "layers/1/bias": False,
        "layers/1/scale": False,
    }


# ---------------------------------------------------------------- multi_lr


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
def test_multi_lr_sgd_updates_in_ratio_of_learning_rates(params, jit):
    lr_head, lr_rest = 0.3, 0.01
    trainable, _ = jp.partition(params, r"^(head|dense)/")  # embed / norm are None holes
    opt = multi_lr([(r"^head/", lr_head)], optax.sgd, default=lr_rest)
    state = opt.init(trainable)
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.5, trainable)
    updates, new_state = maybe_jit(opt.update, jit)(grads, state, trainable)
    u = flat(updates)
    assert set(u) == {"dense/bias", "dense/kernel", "head/bias", "head/kernel"}
    # SGD: update = -lr * g, exactly (one float32 multiply each way).
    for path, val in u.items():
        lr = lr_head if path.startswith("head/") else lr_rest
        np.testing.assert_array_equal(np.asarray(val), np.float32(-lr) * np.float32(0.5), err_msg=path)
    ratio = np.asarray(u["head/kernel"]).ravel()[0] / np.asarray(u["dense/kernel"]).ravel()[0]
    assert ratio == pytest.approx(lr_head / lr_rest, rel=1e-6)
    # the injected rates are in the state, per group
    lrs = {k: float(v.inner_state.hyperparams["learning_rate"]) for k, v in new_state.inner_states.items()}
    assert lrs == pytest.approx({"group_0": lr_head, "default": lr_rest})


def test_multi_lr_first_matching_group_wins_and_schedules(params):
    sched = optax.linear_schedule(1.0, 0.0, 10)
    opt = multi_lr([(r"kernel$", 0.5), (r"^head/", sched), (True, 0.1)], optax.sgd)
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, state, params)
    u = {p: float(np.asarray(v).ravel()[0]) for p, v in flat(updates).items()}
    assert u["head/kernel"] == pytest.approx(-0.5)  # group 0 before group 1
    assert u["head/bias"] == pytest.approx(-1.0)  # schedule at count 0
    assert u["dense/bias"] == pytest.approx(-0.1)


def test_multi_lr_unmatched_leaf_raises_with_path(params):
    opt = multi_lr([(r"kernel$", 0.1)], optax.sgd)
    with pytest.raises(SelectorError, match=r"'dense/bias'.*no default"):
        opt.init(params)


def test_multi_lr_group_matching_nothing_raises(params):
    opt = multi_lr([(r"lora_B", 0.1)], optax.sgd, default=0.01)
    with pytest.raises(SelectorError, match="matched no parameter"):
        opt.init(params)


def test_multi_lr_nnx_state():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    _, state = nnx.split(model, nnx.Param)
    opt = multi_lr([(r"kernel", 1.0)], optax.sgd, default=2.0)
    opt_state = opt.init(state)
    grads = jax.tree.map(jnp.ones_like, state)
    updates, _ = jax.jit(opt.update)(grads, opt_state, state)
    np.testing.assert_array_equal(np.asarray(updates["kernel"][...]), -np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(np.asarray(updates["bias"][...]), -2 * np.ones((2,), np.float32))


# ---------------------------------------------------------------- sizes


def test_state_bytes_adam_is_two_copies_of_trainable_plus_count(params):
    trainable, frozen = jp.partition(params, r"^head/")
    # independent count: head is Dense(8 -> 11): kernel 8*11 + bias 11 float32
    head_bytes = (8 * 11 + 11) * 4
    assert tree_bytes(trainable) == head_bytes
    state = optax.adam(1e-3).init(trainable)
    assert state_bytes(state) == 2 * head_bytes + 4  # mu, nu, int32 count
    assert len(jax.tree.leaves(state)) == 2 * 2 + 1
    # shape-only, nothing allocated
    assert state_bytes(jax.eval_shape(optax.adam(1e-3).init, trainable)) == 2 * head_bytes + 4
    full = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    assert tree_bytes(trainable) + tree_bytes(frozen) == tree_bytes(params) == full
    assert tree_bytes({"a": None, "b": 3.0}) == 0


# ---------------------------------------------------------------- warmup_cosine


def reference_warmup_cosine(t, peak, total, warmup, end_ratio):
    end = end_ratio * peak
    if t < warmup:
        return peak * t / warmup
    if t >= total:
        return end
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "nojit"])
@pytest.mark.parametrize(
    "warmup, resolved", [(None, 0), (0, 0), (10, 10), (0.25, 25)], ids=["none", "zero", "int", "fraction"]
)
@pytest.mark.parametrize("end_ratio", [0.0, 0.1])
def test_warmup_cosine_closed_form(jit, warmup, resolved, end_ratio):
    peak, total = 3e-4, 100
    sched = maybe_jit(warmup_cosine(peak, total, warmup, end_lr_ratio=end_ratio), jit)
    for t in [0, 1, 5, 9, 10, 11, 24, 25, 26, 50, 99, 100, 120]:
        expected = reference_warmup_cosine(t, peak, total, resolved, end_ratio)
        # float32 evaluation of cos: a few ulps of peak
        assert float(sched(t)) == pytest.approx(expected, rel=1e-5, abs=1e-6 * peak), t


def test_warmup_cosine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fraction"):
        warmup_cosine(1.0, 10, 1.5)
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        warmup_cosine(1.0, 10, 10)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(1.0, 0)


def test_decay_mask_partial_is_an_optax_mask(params):
    mask_fn = functools.partial(decay_mask, exclude=False)
    opt = optax.adamw(0.1, weight_decay=1.0, mask=mask_fn)
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, state, params)
    assert np.any(np.asarray(updates["embed"]["embedding"]) != 0)
