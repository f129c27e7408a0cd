"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices: a scanned LM (Linen and NNX,
``scan_layers=True``, kernels ``[L, in, out]`` with specs ``(None, 'data', 'model')``) gets its PEFT specs from
``jp.peft_specs`` and runs jitted with them. Writes facts as JSON (specs as lists, output/gradient differences
against the unsharded run on one device); the test asserts.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_stacked_sharding_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

import jaxpeft as jp
from jaxpeft.models.config import LMConfig
from jaxpeft.models.linen_lm import LinenLM
from jaxpeft.models.nnx_lm import NnxLM
from jaxpeft.sharding import peft_specs, shardings
from jaxpeft.tree import path_to_str

L, R = 2, 4
TARGETS = r"(query|value|out|up|down)$"
TOKENS = jnp.array([[1, 5, 7, 2, 9, 3], [4, 4, 8, 1, 0, 6]])


class HeadsFirst(nn.Module):
    """flax's Gemma attention projections: q ``BTD,NDH->BTNH`` and o ``BTNH,NHD->BTD``."""

    @nn.compact
    def __call__(self, x):
        h = nn.Einsum((4, 32, 8), "BTD,NDH->BTNH", use_bias=False, name="q")(x)
        return nn.Einsum((4, 8, 32), "BTNH,NHD->BTD", use_bias=False, name="o")(h)


# Heads on 'model'; q's d_model (its blocked input axis) on 'data', o's output d_model on 'data'.
HEADS_SPECS = {"q": {"kernel": P("model", "data", None)}, "o": {"kernel": P("model", None, "data")}}


def base_spec(path: str, shape: tuple[int, ...]) -> P:
    """The user's layout: every stacked kernel [L, in, out] is (None, 'data', 'model'); the rest replicated."""
    path = path.removesuffix("/value")  # an nnx.State path ends at the Variable's value
    return P(None, "data", "model") if path.startswith("layers") and path.endswith("kernel") and len(shape) == 3 else P()


def spec_table(tree) -> dict[str, list]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))
    return {path_to_str(k): [list(e) if isinstance(e, tuple) else e for e in s] for k, s in flat}


def diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def randomized(params, selector, key):
    trainable, frozen = jp.partition(params, selector)
    keys = iter(jax.random.split(key, len(jax.tree.leaves(trainable))))
    trainable = jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), trainable)
    return jp.combine(trainable, frozen)


def main(out_path: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    config = LMConfig.tiny(num_layers=L).replace(scan_layers=True)
    facts: dict = {"config": {"d_model": config.d_model}}
    peft = jp.lora(rank=R, targets=TARGETS)

    # -- Linen --------------------------------------------------------------------------------
    model = LinenLM(config)
    peft_model, params = jp.apply(peft, model, jax.random.key(0), TOKENS)
    params = randomized(params, peft.trainable, jax.random.key(1))
    base = jax.tree_util.tree_map_with_path(lambda k, x: base_spec(path_to_str(k), x.shape), params)
    for rank_axis in (None, "model"):
        specs = peft_specs(peft_model, params, base, rank_axis=rank_axis)
        facts[f"linen_specs_{rank_axis}"] = spec_table(specs)
    specs = peft_specs(peft_model, params, base)
    sh = shardings(specs, mesh, params)
    placed = jax.device_put(params, sh)
    facts["linen_placed"] = {path_to_str(k): list(x.sharding.spec) for k, x in
                             jax.tree_util.tree_flatten_with_path(placed)[0] if "lora" in path_to_str(k)}

    def loss(p):
        return jnp.mean(peft_model.apply(p, TOKENS) ** 2)

    ref_out = jax.jit(peft_model.apply)(params, TOKENS)
    ref_grad = jax.jit(jax.grad(loss))(params)
    out = jax.jit(peft_model.apply, in_shardings=(sh, None))(placed, TOKENS)
    grad = jax.jit(jax.grad(loss), in_shardings=(sh,), out_shardings=sh)(placed)
    facts["linen_out_diff"] = diff(out, ref_out)
    facts["linen_grad_diff"] = diff(grad, ref_grad)
    facts["linen_grad_lora_a_spec"] = list(grad["layers"]["attn"]["query"]["lora_a"].sharding.spec)

    # -- QLoRA: the same stack with 4-bit kernels, each layer quantized on its own ---------------
    qparams = jp.quantize(params, model=peft_model, block_size=8, double_quant=True)
    qspecs = peft_specs(peft_model, qparams, base)  # the float kernels' specs: packed / scales follow them
    qsh = shardings(qspecs, mesh, qparams)
    qplaced = jax.device_put(qparams, qsh)
    q_ref = jax.jit(peft_model.apply)(qparams, TOKENS)  # one device
    q_out = jax.jit(peft_model.apply, in_shardings=(qsh, None))(qplaced, TOKENS)
    kernel = qplaced["layers"]["attn"]["query"]["kernel"]
    facts["qlora_out_diff"] = diff(q_out, q_ref)
    facts["qlora_vs_float_diff"] = diff(q_ref, ref_out)  # quantization changed the model
    facts["qlora_placed"] = {name: list(getattr(kernel, name).sharding.spec) for name in ("packed", "scales")}
    facts["qlora_shards"] = sorted({tuple(s.data.shape) for s in kernel.packed.addressable_shards})

    # -- QLoRA on heads-first Einsum kernels, blocked along their input axes --------------------
    x = jax.random.normal(jax.random.key(3), (2, 3, 32))
    heads = HeadsFirst()
    heads_model, hparams = jp.apply(jp.lora(rank=R, targets="q|o"), heads, jax.random.key(0), x)
    hparams = randomized(hparams, heads_model.trainable, jax.random.key(4))
    hq = jp.quantize(hparams, model=heads_model, block_size=8, double_quant=True)
    hspecs = peft_specs(heads_model, hq, HEADS_SPECS)
    hsh = shardings(hspecs, mesh, hq)
    hplaced = jax.device_put(hq, hsh)
    h_ref = jax.jit(heads_model.apply)(hq, x)
    h_out = jax.jit(heads_model.apply, in_shardings=(hsh, None))(hplaced, x)
    facts["heads_out_diff"] = diff(h_out, h_ref)
    facts["heads_out_scale"] = float(np.max(np.abs(np.asarray(h_ref))))
    facts["heads_axes"] = {name: hq[name]["kernel"].axis for name in ("q", "o")}
    facts["heads_placed"] = {f"{name}/{child}": list(getattr(hplaced[name]["kernel"], child).sharding.spec)
                             for name in ("q", "o") for child in ("packed", "scales", "scale_scales")}

    # -- NNX: the same stacked weights ---------------------------------------------------------
    nnx_base = NnxLM(config, rngs=nnx.Rngs(0))
    base_params = {k: v for k, v in jp.partition(params, peft.trainable)[1].items()}
    nnx.update(nnx_base, jp.prune(base_params))
    nnx_base_specs = jax.tree_util.tree_map_with_path(lambda k, x: base_spec(path_to_str(k), x.shape),
                                                      nnx.state(nnx_base, nnx.Param))
    nnx_model = jp.apply(peft, nnx_base, jax.random.key(0))
    nnx.update(nnx_model, jp.prune(jp.partition(params, peft.trainable)[0]))
    nnx_specs = peft_specs(nnx_model, base_specs=nnx_base_specs)
    table = spec_table(jax.tree.map(lambda v: v, nnx_specs))
    facts["nnx_specs"] = {k.removesuffix("/value"): v for k, v in table.items() if "lora" in k}
    graphdef, state = nnx.split(nnx_model)
    nnx_sh = shardings(nnx_specs, mesh, state)
    placed_state = jax.device_put(state, nnx_sh)

    def nnx_forward(s):
        return nnx.merge(graphdef, s)(TOKENS)

    facts["nnx_out_diff_vs_linen"] = diff(jax.jit(nnx_forward, in_shardings=(nnx_sh,))(placed_state), ref_out)
    with open(out_path, "w") as f:
        json.dump(facts, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1])
