"""Methods whose leaves are shared across sites (Compacter's slow weights) on stacked layers.

Linen: an ``nn.scan`` stack keeps the shared leaves outside the stack (``peft_shared/...``) and every layer
uses them; the scanned model equals the same weights run unrolled, outputs and gradients (the reference is
the unrolled model, whose per-layer leaves are slices of the stacked ones). NNX: ``nnx.scan`` slices
everything reachable from the stack, so a stacked site with shared leaves is refused at ``jp.apply`` by name.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp

D, LAYERS = 16, 3


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + jnp.tanh(nn.Dense(D, name="up")(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        return stack(name="layers")(x, None)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = Block(name=f"layers_{i}")(x)[0]
        return x


def _peft():
    return jp.compacter(4, reduction_factor=2, targets=r"up$")


@pytest.mark.slow  # ~20 s compiling two gradients on 2 cores (CI budget); the NNX refusal below stays in CI
def test_linen_scanned_compacter_equals_unrolled_outputs_and_gradients():
    x = jax.random.normal(jax.random.key(0), (5, D))
    peft_model, params = jp.apply(_peft(), Scanned(), jax.random.key(1), x)
    # Every leaf non-zero and distinct per layer, so a layer reading another's slice would show.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])
    assert params["peft_shared"]["compacter@default"]["phm_rule"].shape == (4, 4, 4)  # not stacked

    unrolled_model, unrolled_params = jp.apply(_peft(), Unrolled(), jax.random.key(1), x)
    sliced = {f"layers_{i}": jax.tree.map(lambda v, i=i: v[i], params["layers"]) for i in range(LAYERS)}
    sliced["peft_shared"] = params["peft_shared"]
    assert jax.tree.structure(sliced) == jax.tree.structure(unrolled_params)

    np.testing.assert_allclose(peft_model.apply(params, x), unrolled_model.apply(sliced, x), rtol=1e-5, atol=1e-5)

    def loss(model, p):
        return jnp.sum(model.apply(p, x) ** 2)

    g_scan = jax.grad(lambda p: loss(peft_model, p))(params)
    g_unrolled = jax.grad(lambda p: loss(unrolled_model, p))(sliced)
    # The shared rule's gradient is the sum over every layer's use of it, in both.
    np.testing.assert_allclose(g_scan["peft_shared"]["compacter@default"]["phm_rule"],
                               g_unrolled["peft_shared"]["compacter@default"]["phm_rule"], rtol=1e-4, atol=1e-5)
    for i in range(LAYERS):
        for name, g in g_unrolled[f"layers_{i}"]["up"].items():
            np.testing.assert_allclose(g_scan["layers"]["up"][name][i], g, rtol=1e-4, atol=1e-5, err_msg=name)


def test_nnx_stack_refuses_shared_leaves_by_name_before_any_work():
    from tests.test_scan import NnxStacked  # 3 layers of query [8 -> 16] and out [16 -> 8]

    model = NnxStacked(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(ValueError, match=r"Compacter shares leaves.*'layers/query'.*kernel \(3, 8, 16\)"):
        jp.apply(jp.compacter(4, reduction_factor=2, targets=r"query$"), model, jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)  # the caller's model is untouched
