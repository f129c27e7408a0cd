"""Mixed-adapter batches for every site method, in Linen and NNX.

The reference for each example is the same model run on that example alone with only its adapter active
(``adapters=name``), so the check is independent of the mixed path's gather / vmap / select code. Every
adapter's leaves are random and non-zero, so an example that picked up another adapter's leaves would show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.models import LinenLM, LMConfig, NnxLM

CONFIG = LMConfig.tiny()
NAMES = ("a", "b", "c")
IDS = np.array([0, 2, 1, 1, 0])
TOKENS = jax.random.randint(jax.random.key(0), (len(IDS), 8), 0, CONFIG.vocab_size)

# One adapter per name, all of one method and shape (the gathered path), or mixed kinds (the select path).
METHODS = {
    "dora": lambda n: jp.dora(4, 8, targets=r"attn/(query|value)$", adapter=n),
    "ia3": lambda n: jp.ia3(adapter=n),  # keys, values and the feed-forward input (base on a scaled input)
    "lokr": lambda n: jp.lokr(4, targets=r"attn/(query|value)$", adapter=n),
    "houlsby": lambda n: jp.houlsby(reduction_factor=4, adapter=n),
    "compacter": lambda n: jp.compacter(4, reduction_factor=4, adapter=n),
    "lora+ia3 on one adapter": lambda n: jp.chain(jp.lora(2, 4, targets=r"attn/value$", adapter=n),
                                                 jp.ia3(adapter=n)),
    "mixed kinds": lambda n: {"a": jp.lora(2, 4, targets=r"attn/value$|mlp/down$", adapter=n),
                              "b": jp.ia3(adapter=n),
                              "c": jp.dora(2, 4, targets=r"attn/(query|value)$", adapter=n)}[n],
    "lora, ranks differ": lambda n: jp.lora({"a": 2, "b": 4, "c": 3}[n], 4, targets=r"attn/(query|value)$",
                                            adapter=n),
}


def _noisy(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [v + 0.2 * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)])


def _linen(method):
    model = LinenLM(CONFIG)
    peft_model = None
    for i, n in enumerate(NAMES):
        peft = METHODS[method](n)
        if peft_model is None:
            peft_model, params = jp.apply(peft, model, jax.random.key(i + 1), TOKENS)
        else:
            peft_model, params = jp.add_adapter(peft_model, peft, jax.random.key(i + 1), params=params)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    return peft_model, jp.combine(_noisy(trainable, jax.random.key(9)), frozen)


SLOW = {"compacter", "houlsby", "lora, ranks differ"}  # ~40 / 15 / 5 s of compiling on 2 cores (CI budget)


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in METHODS])
def test_linen_mixed_batch_equals_each_example_alone(method):
    peft_model, params = _linen(method)
    mixed = jax.jit(lambda p, x, ids: peft_model.apply(p, x, adapters=NAMES, adapter_ids=ids))(
        params, TOKENS, jnp.asarray(IDS))
    for i, k in enumerate(IDS):
        alone = peft_model.apply(params, TOKENS[i:i + 1], adapters=NAMES[k])
        np.testing.assert_allclose(mixed[i:i + 1], alone, rtol=2e-4, atol=2e-4, err_msg=f"example {i}")
    others = peft_model.apply(params, TOKENS[:1], adapters=NAMES[1])  # and the adapters really differ
    assert not np.allclose(mixed[:1], others, atol=1e-3)


@pytest.mark.parametrize("method", ["dora", "ia3", "mixed kinds"])
def test_nnx_mixed_batch_equals_each_example_alone(method):
    model = NnxLM(CONFIG, rngs=nnx.Rngs(0))
    for i, n in enumerate(NAMES):
        peft = METHODS[method](n)
        model = jp.apply(peft, model, jax.random.key(i + 1)) if i == 0 else jp.add_adapter(model, peft,
                                                                                          jax.random.key(i + 1))
    graphdef, trainable, rest = nnx.split(model, jp.PeftParam, ...)
    model = nnx.merge(graphdef, _noisy(trainable, jax.random.key(9)), rest)

    @nnx.jit
    def mixed(model, x, ids):
        with jp.mixed_adapters(model, NAMES, ids):
            return model(x)

    out = mixed(model, TOKENS, jnp.asarray(IDS))
    for i, k in enumerate(IDS):
        with jp.use_adapters(model, NAMES[k]):
            alone = model(TOKENS[i:i + 1])
        np.testing.assert_allclose(out[i:i + 1], alone, rtol=2e-4, atol=2e-4, err_msg=f"example {i}")
