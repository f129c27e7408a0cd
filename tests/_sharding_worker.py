"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices; writes facts as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/_sharding_worker.py OUT_DIR

Every scenario trains the same LoRA model twice: once on one device (the reference: plain
``jax.jit``, no shardings, everything on device 0) and once on a mesh. The worker only measures
(losses, parameter differences, the layouts JAX actually used); the test asserts.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxpeft as jp
from jaxpeft.models import LinenLM, LMConfig, nnx_from_linen_params
from jaxpeft.sharding import optimizer_specs, peft_specs, shardings
from jaxpeft.tree import leaves_with_paths

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 2
TARGETS = r"(query|value|out|up|down)$"


def load_example():
    spec = importlib.util.spec_from_file_location("train_lora_mesh", ROOT / "examples" / "train_lora_mesh.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = load_example()


def mesh_of(sizes: dict[str, int]) -> jax.sharding.Mesh:
    n = int(np.prod(list(sizes.values())))
    return jax.make_mesh(
        tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes), devices=jax.devices()[:n]
    )


def host(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def max_diff(a, b) -> dict:
    """Largest absolute and relative difference over all leaves of two trees of the same structure."""
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert pairs and len(pairs) == len(jax.tree.leaves(b))
    absolute = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)
    scale = max(float(np.max(np.abs(np.asarray(y)))) for _, y in pairs)
    return {"abs": absolute, "max_abs_value": scale}


def spec_json(spec) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


def layouts(tree, specs) -> list[str]:
    """Leaves whose actual sharding is not the spec asked for."""
    wrong = []
    for (path, x), spec in zip(leaves_with_paths(tree), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
        x = x.get_value() if isinstance(x, nnx.Variable) else x
        if x.sharding.spec != spec and not x.sharding.is_equivalent_to(NamedSharding(x.sharding.mesh, spec), x.ndim):
            wrong.append(f"{path}: {x.sharding.spec} != {spec}")
    return wrong


def setup_linen():
    config = LMConfig.tiny(num_layers=1)
    model = LinenLM(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (8, 17), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    base = jax.jit(model.init)(jax.random.key(0), batch["inputs"])["params"]
    peft = jp.lora(rank=8, alpha=16, targets=TARGETS)
    peft_model, params = jp.apply(peft, model, jax.random.key(1), batch["inputs"], params=base)
    # B = 0 at init would make A's gradient exactly zero: start from a non-zero B. Host arrays
    # (numpy) from here on: device_put from the host to a mesh needs no compiled resharding.
    rng = np.random.default_rng(2)
    params = jax.tree_util.tree_map_with_path(
        lambda k, v: np.asarray(v) + (0.02 * rng.standard_normal(v.shape, np.float32) if k[-1].key == "lora_b" else 0),
        params,
    )

    def loss_fn(t, f, b, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(t, f), b["inputs"]), b["targets"])[0]

    return config, base, batch, peft, peft_model, params, loss_fn


def run(step, trainable, frozen, opt_state, batch):
    losses = []
    for _ in range(STEPS):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, None)
        losses.append(float(metrics["loss"]))
    return trainable, opt_state, losses


def linen_scenarios(out: pathlib.Path, setup) -> dict:
    config, base, batch, peft, peft_model, params, loss_fn = setup
    optimizer = optax.sgd(0.1, momentum=0.9)  # linear in the gradient: roundoff is not amplified (Adam divides by |g|)
    trainable, frozen = jp.partition(params, peft_model.trainable)

    # The reference: one device, no shardings anywhere.
    reference = jp.make_train_step(loss_fn, optimizer, donate=False)
    on_device = jax.tree.map(jnp.asarray, (trainable, frozen))
    ref_trainable, _, ref_losses = run(reference, *on_device, optimizer.init(on_device[0]), batch)
    ref_one_step, _, _ = reference(*on_device, optimizer.init(on_device[0]), batch, None)
    facts: dict = {"reference_losses": ref_losses}

    for name, sizes, rank_axis in (
        ("data_model", {"data": 4, "model": 2}, None),
        ("fsdp", {"fsdp": 8}, "fsdp"),
    ):
        mesh = mesh_of(sizes)
        axes = tuple(sizes)
        specs = peft_specs(peft_model, params, EXAMPLE.lm_base_specs(base, axes), rank_axis=rank_axis)
        t_specs, f_specs = jp.partition(specs, peft_model.trainable)
        t_sh, f_sh = shardings(t_specs, mesh, trainable), shardings(f_specs, mesh, frozen)
        o_sh = shardings(optimizer_specs(optimizer, trainable, t_specs), mesh)
        b_sh = NamedSharding(mesh, EXAMPLE.batch_spec(axes))
        step = jax.jit(
            jp.make_train_step(loss_fn, optimizer, jit=False),
            in_shardings=(t_sh, f_sh, o_sh, b_sh, None),
            out_shardings=(t_sh, o_sh, None),
            donate_argnums=(0, 2),
        )
        t = jax.device_put(trainable, t_sh)  # from host memory: fresh buffers, safe to donate
        f = jax.device_put(frozen, f_sh)
        o = jax.jit(optimizer.init, out_shardings=o_sh)(t)
        b = jax.device_put(batch, b_sh)
        t, o, losses = run(step, t, f, o, b)
        layer = t["layers_0"]
        facts[name] = {
            "losses": losses,
            "diff": max_diff(host(t), host(ref_trainable)),
            "wrong_layouts": layouts(t, t_specs) + layouts(f, f_specs),
            "specs": {
                p: spec_json(s)
                for p, s in leaves_with_paths(specs, is_leaf=lambda s: isinstance(s, P))
                if p.startswith("layers_0/")
            },
            "shard_shapes": {
                "attn/query/lora_a": list(layer["attn"]["query"]["lora_a"].addressable_shards[0].data.shape),
                "attn/query/lora_b": list(layer["attn"]["query"]["lora_b"].addressable_shards[0].data.shape),
                "attn/out/lora_a": list(layer["attn"]["out"]["lora_a"].addressable_shards[0].data.shape),
                "mlp/down/lora_b": list(layer["mlp"]["down"]["lora_b"].addressable_shards[0].data.shape),
            },
        }
        if name == "data_model":
            sharded_trainable, data_model_specs, data_model_mesh = t, t_specs, mesh
            # jp.make_train_step as it is, on committed sharded inputs (XLA propagates the rest;
            # one step: its outputs come back in layouts XLA chose, and a second step recompiles).
            plain = jp.make_train_step(loss_fn, optimizer)
            t2 = jax.device_put(trainable, t_sh)
            t2, _, metrics = plain(t2, f, jax.jit(optimizer.init, out_shardings=o_sh)(t2), b, None)
            facts["make_train_step"] = {
                "loss": float(metrics["loss"]),
                "diff": max_diff(host(t2), host(ref_one_step)),
            }

    facts["checkpoint"] = checkpoint_scenario(out, sharded_trainable, data_model_specs, data_model_mesh, base)
    return facts


def checkpoint_scenario(out: pathlib.Path, trainable, specs, mesh, base) -> dict:
    """Save from 8 devices (shard by shard), restore onto 2 devices and onto 1."""
    adapter = jp.prune(trainable)
    saved = host(adapter)
    sharded = [p for p, x in leaves_with_paths(adapter) if not x.sharding.is_fully_replicated]
    directory = jp.save_adapter(out / "adapter8", trainable, config={"rank": 8}, base=base)
    np.savez(out / "adapter8_expected.npz", **{p.replace("/", "."): x for p, x in leaves_with_paths(saved)})

    # Onto a (data=1, model=2) mesh of 2 devices, with the same specs.
    two = mesh_of({"data": 1, "model": 2})
    restored, meta = jp.restore_adapter(directory, shardings=shardings(specs, two))
    on_two = all(len(x.sharding.device_set) == 2 for _, x in leaves_with_paths(restored))
    identical = all(
        np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
        for (_, x), (_, y) in zip(leaves_with_paths(restored), leaves_with_paths(saved))
    )
    query_b = restored["layers_0"]["attn"]["query"]["lora_b"]
    # Onto one device, with no shardings at all.
    plain, _ = jp.restore_adapter(directory)
    identical_plain = all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for (_, x), (_, y) in zip(leaves_with_paths(plain), leaves_with_paths(saved))
    )
    return {
        "directory": str(directory),
        "sharded_leaves": sharded,
        "num_leaves": len(meta["leaves"]),
        "every_leaf_has_sha256_and_checksum": all(
            leaf["sha256"] is not None and leaf["checksum"] is not None for leaf in meta["leaves"]
        ),
        "restored_on_two_devices": on_two,
        "restored_identical": identical,
        "restored_query_b_spec": spec_json(query_b.sharding.spec),
        "restored_query_b_shard": list(query_b.addressable_shards[0].data.shape),
        "restored_plain_identical": identical_plain,
    }


def nnx_scenario(config, base, batch) -> dict:
    """The NNX model from jp.apply, on (data=4, model=2), against NNX on one device."""
    mesh = mesh_of({"data": 4, "model": 2})
    model = jp.apply(jp.lora(rank=8, alpha=16, targets=TARGETS), nnx_from_linen_params(config, base), jax.random.key(1))
    for _, layer in jp.peft_layers(model):  # a non-zero B, as in the Linen scenarios
        layer.lora_b.set_value(np.asarray(layer.lora_b.get_value()) + np.float32(0.02))
    # Explicit base specs for the *original* model's paths: ".../base_layer/..." is found anyway.
    specs = peft_specs(model, base_specs=EXAMPLE.lm_base_specs(base, ("data", "model")))
    graphdef, trainable, frozen = nnx.split(model, jp.PeftParam, ...)
    t_specs, f_specs = nnx.split_state(specs, jp.PeftParam, ...) if hasattr(nnx, "split_state") else specs.split(
        jp.PeftParam, ...
    )
    optimizer = optax.sgd(0.1, momentum=0.9)  # linear in the gradient: roundoff is not amplified (Adam divides by |g|)

    def loss_fn(t, f, b, rng):
        return jp.cross_entropy(nnx.merge(graphdef, t, f)(b["inputs"]), b["targets"])[0]

    reference = jp.make_train_step(loss_fn, optimizer, donate=False)
    on_device = jax.tree.map(jnp.asarray, (trainable, frozen))
    ref_t, _, ref_losses = run(reference, *on_device, optimizer.init(on_device[0]), batch)

    t_sh, f_sh = shardings(t_specs, mesh, trainable), shardings(f_specs, mesh, frozen)
    o_sh = shardings(optimizer_specs(optimizer, trainable, t_specs), mesh)
    b_sh = NamedSharding(mesh, P("data"))
    step = jax.jit(
        jp.make_train_step(loss_fn, optimizer, jit=False),
        in_shardings=(t_sh, f_sh, o_sh, b_sh, None),
        out_shardings=(t_sh, o_sh, None),
    )
    t = jax.device_put(trainable, t_sh)
    f = jax.device_put(frozen, f_sh)
    t, _, losses = run(step, t, f, jax.jit(optimizer.init, out_shardings=o_sh)(t), jax.device_put(batch, b_sh))
    query = specs["layers_0"]["attn"]["query"]
    return {
        "reference_losses": ref_losses,
        "losses": losses,
        "diff": max_diff(host(nnx.to_pure_dict(t)), host(nnx.to_pure_dict(ref_t))),
        "wrong_layouts": layouts(t, t_specs),
        "query_specs": {
            "lora_a": spec_json(query["lora_a"].get_value()),
            "lora_b": spec_json(query["lora_b"].get_value()),
            "base_layer/kernel": spec_json(query["base_layer"]["kernel"].get_value()),
        },
    }


def main(out: str) -> None:
    assert jax.device_count() == 8, f"expected 8 fake CPU devices, got {jax.device_count()}"
    out_dir = pathlib.Path(out)
    setup = setup_linen()
    config, base, batch = setup[:3]
    facts = {
        "linen": linen_scenarios(out_dir, setup),
        "nnx": nnx_scenario(config, jax.tree.map(np.asarray, base), batch),
    }
    (out_dir / "facts.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
