"""Run by tests/test_explicit_mesh.py in a subprocess with 8 fake CPU devices; writes facts as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_explicit_mesh_worker.py OUT.json

The same LoRA model (nonzero B) runs once without a mesh (the reference) and once on a 2x4 mesh
with explicit axes (``AxisType.Explicit``, set with ``jax.set_mesh`` as flax's NNX Gemma example
does), where the model calls its layers with ``out_sharding=``. Then the other site methods (IA3,
DoRA, LoKr, a Pfeiffer adapter, Compacter) do the same, every PEFT leaf moved off its init, plus one SGD train
step (``jp.make_train_step``). The worker measures; the test asserts.
"""

from __future__ import annotations

import json
import sys

import jax
import optax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

import jaxpeft as jp


class Model(nnx.Module):
    def __init__(self, rngs, sharded):
        meta = lambda *names: {"out_sharding": names} if sharded else {}  # noqa: E731
        self.up = nnx.Linear(8, 16, kernel_metadata=meta(None, "model"), rngs=rngs)
        self.heads = nnx.Einsum("btd,dnh->btnh", (16, 4, 2), (4, 2), kernel_metadata=meta(None, "model", None), rngs=rngs)
        self.down = nnx.Linear(8, 8, kernel_metadata=meta("model", None), rngs=rngs)
        self.sharded = sharded

    def __call__(self, x):
        spec = (lambda *names: P(*names)) if self.sharded else (lambda *names: None)
        h = self.up(x, out_sharding=spec("data", None, "model"))
        h = self.heads(h, out_sharding=spec("data", None, "model", None))
        h = h.reshape(*h.shape[:-2], -1)
        return self.down(h, out_sharding=spec("data", None, None))


def build(sharded):
    model = jp.apply(jp.lora(rank=2, targets=r"(up|heads|down)$"), Model(nnx.Rngs(0), sharded), jax.random.key(1))
    for i, layer in enumerate((model.up, model.heads, model.down)):
        b = layer.lora_b.get_value()
        layer.lora_b.set_value(jax.random.normal(jax.random.key(10 + i), b.shape, b.dtype))
    return model


# The other site methods: name -> transform (LoKr takes 2-D kernels only, so not the Einsum).
METHODS = {
    "ia3": lambda: jp.ia3(targets=r"(up|heads|down)$", feedforward="down$"),
    "dora": lambda: jp.dora(rank=2, targets=r"(up|heads|down)$"),
    "lokr": lambda: jp.lokr(rank=2, targets=r"(up|down)$"),
    "pfeiffer": lambda: jp.pfeiffer(4, targets=r"(up|down)$"),
    "compacter": lambda: jp.compacter(2, bottleneck=4, targets=r"(up|down)$"),  # leaves shared by both sites
}


def build_method(peft, sharded):
    """``peft`` on the model, every PEFT leaf moved off its init (so no update is zero)."""
    graphdef, trainable, rest = nnx.split(jp.apply(peft, Model(nnx.Rngs(0), sharded), jax.random.key(1)), jp.PeftParam, ...)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    moved = [a + 0.1 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, moved), rest)


def pure(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(g).tolist() for p, g in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))[0]}


def run_method(model, x):
    """Forward, adapter gradients and the adapter leaves after one SGD step (jp.make_train_step)."""
    out, grads = run(model, x)
    graphdef, trainable, frozen = nnx.split(model, jp.PeftParam, ...)

    def loss_fn(t, f, batch, rng):
        return jnp.mean(nnx.merge(graphdef, t, f)(batch) ** 2)

    opt = optax.sgd(0.5)
    stepped = jp.make_train_step(loss_fn, opt)(trainable, frozen, opt.init(trainable), x, None)[0]
    return {"out": np.asarray(out).tolist(), "out_spec": list(getattr(out.sharding, "spec", ())), "grads": grads,
            "before": pure(trainable), "stepped": pure(stepped)}


def loss(model, x):
    return jnp.mean(model(x) ** 2)


def run(model, x):
    out = nnx.jit(lambda m, x: m(x))(model, x)
    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, jp.PeftParam)))(model, x)
    return out, pure(grads)


def main(path):
    x = jax.random.normal(jax.random.key(5), (4, 3, 8))
    ref_out, ref_grads = run(build(False), x)
    ref_methods = {name: run_method(build_method(make(), False), x) for name, make in METHODS.items()}
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, P("data", None, None))
        methods = {name: run_method(build_method(make(), True), xs) for name, make in METHODS.items()}
        model = build(True)
        out, grads = run(model, xs)
        facts = {
            "devices": jax.device_count(),
            "out_spec": list(out.sharding.spec),
            "mesh_axis_types": [str(t) for t in out.sharding.mesh.axis_types],
        }
    facts.update(methods=methods, ref_methods=ref_methods)
    facts.update(
        ref_out=np.asarray(ref_out).tolist(), out=np.asarray(out).tolist(), ref_grads=ref_grads, grads=grads
    )
    with open(path, "w") as f:
        json.dump(facts, f)


if __name__ == "__main__":
    main(sys.argv[1])
