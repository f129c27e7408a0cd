"""Run by tests/test_sharding.py as two processes of 4 fake CPU devices each (jax.distributed over
localhost, gloo collectives): one 8-device mesh spanning both, as on a 2-host TPU slice.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/_sharding_multihost.py PORT PROCESS_ID OUT_DIR

Each process writes ``facts_<id>.json``; the test asserts.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax

port, process_id, out_dir = int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxpeft as jp  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def mesh_of(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def global_array(full: np.ndarray, sharding) -> jax.Array:
    """Each process fills only its own devices' shards (no process holds another's data)."""
    return jax.make_array_from_callback(full.shape, sharding, lambda index: full[index])


def main() -> None:
    facts: dict = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    mesh = mesh_of((2, 4), ("data", "model"))
    rng = np.random.default_rng(0)  # the same values on both processes
    full = {
        "layer": {
            "lora_a": rng.standard_normal((16, 8)).astype(np.float32),
            "lora_b": rng.standard_normal((8, 32)).astype(np.float32),
        },
        "codes": rng.integers(-100, 100, (8, 4)).astype(np.int8),
        "scale": np.float32(0.5) * np.ones((), np.float32),
    }
    specs = {"layer": {"lora_a": P("model", None), "lora_b": P(None, ("data", "model"))}, "codes": P("data"), "scale": P()}
    adapter = jax.tree.map(lambda x, s: global_array(x, NamedSharding(mesh, s)), full, specs,
                           is_leaf=lambda x: isinstance(x, P))
    facts["fully_addressable"] = {p: x.is_fully_addressable for p, x in jp.leaves_with_paths(adapter)}

    directory = jp.save_adapter(out_dir / "adapter", adapter, config={"rank": 8})   # every process calls it
    meta = jp.load_metadata(directory)
    facts["sha256"] = {leaf["path"]: leaf["sha256"] for leaf in meta["leaves"]}
    facts["checksum"] = {leaf["path"]: leaf["checksum"] for leaf in meta["leaves"]}

    # Onto another mesh shape over the same 8 devices: each process reads only its own shards.
    other = mesh_of((8,), ("model",))
    other_specs = {"layer": {"lora_a": P(None, None), "lora_b": P(None, "model")}, "codes": P("model"), "scale": P()}
    restored, _ = jp.restore_adapter(
        directory,
        shardings=jax.tree.map(lambda s: NamedSharding(other, s), other_specs, is_leaf=lambda x: isinstance(x, P)),
    )
    ok = []
    for (path, x), (_, expected) in zip(jp.leaves_with_paths(restored), jp.leaves_with_paths(full)):
        for shard in x.addressable_shards:
            ok.append(bool(np.array_equal(np.asarray(shard.data), np.asarray(expected)[shard.index])))
    facts["restored_shards_identical"] = all(ok) and len(ok) > 0
    facts["restored_specs"] = {p: str(x.sharding.spec) for p, x in jp.leaves_with_paths(restored)}

    # Without shardings: every process gets whole host-local copies.
    local, _ = jp.restore_adapter(directory)
    facts["local_identical"] = all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for (_, x), (_, y) in zip(jp.leaves_with_paths(local), jp.leaves_with_paths(full))
    )

    # The example, as on a 2-host pod slice: process-local batches, one global mesh.
    spec = importlib.util.spec_from_file_location("train_lora_mesh", ROOT / "examples" / "train_lora_mesh.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--mesh", "data=2,model=4", "--steps", "2", "--save", str(out_dir / "example_adapter")])
    facts["example_losses"] = result["losses"]
    (out_dir / f"facts_{process_id}.json").write_text(json.dumps(facts, indent=1))
    jax.distributed.shutdown()


main()
