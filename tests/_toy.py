"""A toy model with every layer type the bindings wrap, and its float64 NumPy twin.

Shared by the tests of the linear-site methods (DoRA, IA3, LoKr, LoRA variants).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxpeft as jp

D, R = 8, 2
TOKENS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 0]])


# A toy model with every wrapped layer type: Dense, DenseGeneral, Einsum (Linen) and their NNX twins.
class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Dense(D, name="query")(x)
        v = nn.DenseGeneral((2, 4), name="value")(x).reshape(q.shape)
        k = nn.Einsum((D, 2, 4), "btd,dnh->btnh", name="key")(x).reshape(q.shape)
        h = q + v + k
        return h + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(16, name="up")(h)))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(10, name="head")(LinenBlock(name="block")(nn.Embed(10, D, name="embed")(tokens)))


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(D, D, rngs=rngs)
        self.value = nnx.LinearGeneral(D, (2, 4), rngs=rngs)
        self.key = nnx.Einsum("btd,dnh->btnh", (D, 2, 4), (2, 4), rngs=rngs)
        self.up = nnx.Linear(D, 16, rngs=rngs)
        self.down = nnx.Linear(16, D, rngs=rngs)

    def __call__(self, x):
        q = self.query(x)
        h = q + self.value(x).reshape(q.shape) + self.key(x).reshape(q.shape)
        return h + self.down(jax.nn.gelu(self.up(h)))


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, D, rngs=rngs)
        self.block = NnxBlock(rngs)
        self.head = nnx.Linear(D, 10, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.block(self.embed(tokens)))


def numpy_forward(params, tokens, effective=lambda path, node: (node["kernel"], node["bias"])):
    """The toy model in float64 NumPy; ``effective(path, node) -> (kernel, bias)`` per linear layer."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def lin(path, node, x):
        w, b = effective(path, node)
        return np.tensordot(x, w, axes=1) + b

    def gelu(x):  # jax.nn.gelu's default tanh form
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = p["embed"]["embedding"][np.asarray(tokens)]
    blk = p["block"]
    q = lin("block/query", blk["query"], x)
    h = q + lin("block/value", blk["value"], x).reshape(q.shape) + lin("block/key", blk["key"], x).reshape(q.shape)
    h = h + lin("block/down", blk["down"], gelu(lin("block/up", blk["up"], h)))
    return lin("head", p["head"], h)


def linen_setup(peft):
    model = LinenModel()
    base = model.init(jax.random.key(0), TOKENS)["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=base)
    return model, base, peft_model, params


def randomize(params, selector, key, scale=0.3):
    """The leaves ``selector`` picks moved randomly around their init (``scale`` standard deviations)."""
    trainable, frozen = jp.partition(params, selector)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    new = [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jp.combine(jax.tree.unflatten(treedef, new), frozen)


def nnx_twin(peft, params):
    """An NNX model holding the Linen model's base and PEFT leaves (same paths in both bindings)."""
    trainable, frozen = jp.partition(params, peft.trainable)
    base_model = NnxModel(nnx.Rngs(0))
    nnx.update(base_model, jax.tree.map(jnp.asarray, jp.prune(frozen)))
    model = jp.apply(peft, base_model, jax.random.key(9))
    nnx.update(model, jp.prune(trainable))
    return base_model, model
