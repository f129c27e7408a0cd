"""LoRA dropout in the NNX binding, on a plain layer and inside an ``nnx.vmap`` stack run by ``nnx.scan``.

With ``lora_a`` = I and ``lora_b`` = I (rank = d_in = d_out), the adapter's output is ``scale * dropout(x)``, so
every element of ``(y - base(x)) / scale`` must be either 0 (dropped) or ``x / (1 - p)`` (kept, inverted
dropout); in eval mode it is ``x`` exactly. That is checked element by element, independently of the code's
own mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp

D, P, LAYERS = 16, 0.5, 4
SCALE = 2.0  # alpha / rank


class Block(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.up(x)


class Stack(nnx.Module):
    """Layers made by nnx.vmap; ``__call__`` runs each on the same input (carry unchanged) and stacks the outputs."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run(x, layer):
            return x, layer(x)

        return run(x, self.layers)[1]


def _identity_adapter(layer, stacked):
    eye = jnp.eye(D)
    if stacked:
        eye = jnp.broadcast_to(eye, (LAYERS, D, D))
    layer.lora_a.set_value(eye)
    layer.lora_b.set_value(eye)


def _check_inverted_dropout(delta, x):
    """Every element of ``delta`` is 0 or ``x / (1 - P)``; returns the kept fraction."""
    delta, x = np.asarray(delta), np.broadcast_to(np.asarray(x), np.shape(delta))
    kept = np.isclose(delta, x / (1 - P), rtol=1e-5, atol=1e-6)
    dropped = delta == 0.0
    assert np.all(kept | dropped), "an element is neither dropped nor scaled by 1/(1-p)"
    return kept.mean()


@pytest.mark.parametrize("stacked", [False, True], ids=["plain", "nnx.scan stack"])
def test_lora_dropout_masks_the_adapter_input_in_train_mode_only(stacked):
    model = Stack(nnx.Rngs(0)) if stacked else Block(nnx.Rngs(0))
    peft_model = jp.apply(jp.lora(rank=D, alpha=SCALE * D, targets=r"up$", dropout=P), model, jax.random.key(1))
    layer = peft_model.layers.up if stacked else peft_model.up
    _identity_adapter(layer, stacked)
    x = jax.random.normal(jax.random.key(2), (64, D)) + 3.0  # no element is 0
    base = model(x)  # the input model is untouched: its output is the base output

    peft_model.train()
    first, second = peft_model(x), peft_model(x)
    kept = _check_inverted_dropout((first - base) / SCALE, x)
    _check_inverted_dropout((second - base) / SCALE, x)
    assert 0.4 < kept < 0.6  # 1 - P, over 1024 (plain) or 4096 (stack) elements
    assert not np.allclose(first, second)  # the stream advances between calls
    if stacked:  # each layer of the stack draws its own mask
        masks = np.asarray(first - base) != 0.0
        assert all(not np.array_equal(masks[0], masks[i]) for i in range(1, LAYERS))

    peft_model.eval()  # deterministic: no dropout, the adapter's full output
    np.testing.assert_allclose((peft_model(x) - base) / SCALE, np.broadcast_to(x, np.shape(base)), rtol=1e-5, atol=1e-5)
