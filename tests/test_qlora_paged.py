"""Paged optimizer state: optimizer state (and master weights) in pinned host memory.

On CPU every memory kind is host RAM, so what is tested is the API: placement, that the step
streams the state in and writes it back to the host, and that the math equals a plain optax step.
No GPU was available where this was written; the same code is the GPU/TPU path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft as jp
from jaxpeft import paged


def _problem():
    k = jax.random.split(jax.random.key(0), 4)
    trainable = {"lora_a": jax.random.normal(k[0], (32, 4)) * 0.1, "lora_b": jax.random.normal(k[1], (4, 16)) * 0.1}
    frozen = {"kernel": jax.random.normal(k[2], (32, 16))}
    batch = {"x": jax.random.normal(k[3], (8, 32)), "y": jnp.ones((8, 16))}

    def loss_fn(t, f, b):
        pred = b["x"] @ f["kernel"] + (b["x"] @ t["lora_a"]) @ t["lora_b"]
        return jnp.mean((pred - b["y"]) ** 2)

    return loss_fn, trainable, frozen, batch


@pytest.mark.parametrize("offload_trainable", [False, True], ids=["state", "state+master-weights"])
def test_paged_step_equals_a_plain_optax_step_and_keeps_state_on_the_host(offload_trainable):
    loss_fn, trainable, frozen, batch = _problem()
    opt = optax.adamw(1e-2)
    step = paged.paged_train_step(loss_fn, opt, offload_trainable=offload_trainable)
    t = paged.offload(trainable) if offload_trainable else jax.tree.map(jnp.copy, trainable)
    s = paged.offload(opt.init(trainable))
    ref_t, ref_s = trainable, opt.init(trainable)
    for _ in range(3):
        t, s, loss = step(t, frozen, s, batch)
        ref_loss, g = jax.value_and_grad(loss_fn)(ref_t, frozen, batch)
        u, ref_s = opt.update(g, ref_s, ref_t)
        ref_t = optax.apply_updates(ref_t, u)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(ref_t)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert {x.sharding.memory_kind for x in jax.tree.leaves(s)} == {"pinned_host"}
    expected = "pinned_host" if offload_trainable else "device"
    assert {x.sharding.memory_kind for x in jax.tree.leaves(t)} == {expected}


def test_offload_leaves_the_input_where_it_was():
    tree = {"m": jnp.arange(4.0)}
    moved = paged.offload(tree)
    assert tree["m"].sharding.memory_kind == "device" and moved["m"].sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(moved["m"], tree["m"])
    back = paged.offload(moved, "device")
    assert back["m"].sharding.memory_kind == "device"


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\['m'\] is on .* whose memories are .*got memory_kind 'hbm'"):
        paged.offload({"m": jnp.ones(2)}, "hbm")
    with pytest.raises(TypeError, match=r"\['m'\]\[0\] is a float, expected a jax.Array"):
        paged.offload({"m": [1.0]})
    loss_fn, trainable, frozen, batch = _problem()
    opt = optax.adam(1e-3)
    step = paged.paged_train_step(loss_fn, opt)
    with pytest.raises(ValueError, match=r"opt_state.* is in memory 'device', expected 'pinned_host'; place it with"):
        step(trainable, frozen, opt.init(trainable), batch)
    assert "pinned_host" in paged.memory_kinds()


def test_paged_step_leaves_the_callers_arrays_readable():
    """Like make_train_step, the paged step donates nothing: the trainable tree the caller passed stays alive."""
    trainable = {"w": jnp.ones((4, 4))}
    opt = optax.adam(1e-2)
    step = jp.paged_train_step(lambda t, f, b: jnp.sum((t["w"] * b) ** 2), opt)
    opt_state = jp.offload(opt.init(trainable))
    new_trainable, new_state, _ = step(trainable, None, opt_state, jnp.ones((4,)))
    np.testing.assert_array_equal(np.asarray(trainable["w"]), np.ones((4, 4)))
    assert not trainable["w"].is_deleted()
    assert not any(x.is_deleted() for x in jax.tree.leaves(opt_state))
    assert not np.array_equal(np.asarray(new_trainable["w"]), np.ones((4, 4)))
