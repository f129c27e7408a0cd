"""Train LoRA on the reference LM on a device mesh given on the command line.

On a CPU, fake devices stand in for accelerators. The flag must be in the environment before
jax is imported, so it goes on the command line::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_lora_mesh.py --mesh data=4,model=2
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_lora_mesh.py --mesh fsdp=8 --rank-axis fsdp

On a TPU pod slice, run the same command on every host with ``--distributed``
(``jax.distributed.initialize()`` finds the other hosts itself); each host then generates its
own part of every batch and ``jax.make_array_from_process_local_data`` assembles the global one.

Mesh axes this script understands (any subset, in any order, sizes multiplying to at most the
number of devices):

* ``data``: the batch is split over it; parameters are replicated along it.
* ``fsdp``: the batch is split over it, and every kernel's first axis too (ZeRO-3 / FSDP).
* ``model``: tensor parallelism (Megatron): ``query`` / ``key`` / ``value`` / ``mlp/up`` split
  their output axis, ``attn/out`` / ``mlp/down`` their input axis, the head its vocabulary.

The base specs are written here, for this model (``lm_base_specs``); ``jp.peft_specs`` derives
every LoRA leaf's spec from them, and ``jax.jit`` with ``in_shardings`` / ``out_shardings`` runs
the step. The base model is randomly initialised: the point is the mechanics, not the loss.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxpeft as jp
from jaxpeft.demo import data
from jaxpeft.models import LinenLM, LMConfig
from jaxpeft.sharding import optimizer_specs, peft_specs, shardings
from jaxpeft.tree import path_to_str

AXES = ("data", "fsdp", "model")
COLUMN_PARALLEL = ("query", "key", "value", "up")  # split the output axis over "model"
ROW_PARALLEL = ("out", "down")  # split the input axis over "model"


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=4,model=2"`` -> ``{"data": 4, "model": 2}``."""
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        name = name.strip()
        if name not in AXES or not size.strip().isdigit() or int(size) < 1 or name in sizes:
            raise ValueError(f"--mesh: expected NAME=SIZE[,NAME=SIZE...] with names from {AXES}, got {text!r}")
        sizes[name] = int(size)
    return sizes


def make_mesh(sizes: dict[str, int]) -> jax.sharding.Mesh:
    """A mesh with Auto axes (XLA's sharding propagation decides the layout of intermediates)."""
    n = math.prod(sizes.values())
    if n > jax.device_count():
        raise ValueError(
            f"--mesh needs {n} devices, there are {jax.device_count()} (on CPU: "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax is imported)"
        )
    return jax.make_mesh(
        tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes), devices=jax.devices()[:n]
    )


def lm_base_specs(base: dict, axes: tuple[str, ...]) -> dict:
    """A PartitionSpec for every base parameter of the reference LM on a mesh with ``axes``."""
    fsdp = "fsdp" if "fsdp" in axes else None
    model = "model" if "model" in axes else None

    def spec(keypath, leaf):
        parts = path_to_str(keypath).split("/")
        layer, name = (parts[-2] if len(parts) > 1 else ""), parts[-1]
        if parts[0] in ("embed", "pos_embed"):  # [rows, d_model]
            return P(fsdp, model)
        if name == "kernel" and (layer in COLUMN_PARALLEL or parts[0] == "head"):  # [d_in, d_out]
            return P(fsdp, model)
        if name == "kernel" and layer in ROW_PARALLEL:
            return P(model, fsdp)
        if name == "bias" and (layer in COLUMN_PARALLEL or parts[0] == "head"):
            return P(model)
        return P()  # norm scales, the biases of row-parallel layers

    return jax.tree_util.tree_map_with_path(spec, base)


def batch_spec(axes: tuple[str, ...]) -> P:
    """The batch axis is split over every data-parallel mesh axis."""
    batch_axes = tuple(a for a in ("data", "fsdp") if a in axes)
    return P(batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train_lora_mesh", description=__doc__.split("\n\n")[0])
    p.add_argument("--mesh", default="data=4,model=2", help="mesh axes and sizes, e.g. data=4,model=2 or fsdp=8")
    p.add_argument("--preset", choices=("tiny", "small"), default="tiny", help="reference LM size")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rank-axis", default=None, help="mesh axis to shard the LoRA rank over (default: replicated)")
    p.add_argument("--targets", default=r"(query|value|out|up|down)$")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save", default=None, help="save the adapter here (default: a temporary directory)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (TPU pods)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0, where nothing finds it (CPU)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    return p.parse_args(argv)


def initialize(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize``: on TPU pods (and SLURM, ...) it finds everything itself."""
    if args.coordinator is None:
        jax.distributed.initialize()
        return
    # CPU devices of several processes talk through gloo (the setting only concerns the CPU backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.distributed or args.coordinator:
        initialize(args)
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    sizes = parse_mesh(args.mesh)
    mesh = make_mesh(sizes)
    axes = tuple(sizes)
    say(f"mesh {dict(mesh.shape)} on {mesh.devices.size} of {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es)")

    tokenizer = data.CharTokenizer()
    preset = LMConfig.small if args.preset == "small" else LMConfig.tiny
    config = preset(vocab_size=tokenizer.vocab_size, max_seq_len=args.seq)
    model = LinenLM(config)
    example = jnp.zeros((1, args.seq), jnp.int32)
    base = jax.jit(model.init)(jax.random.key(0), example)["params"]  # one compile, not one per op
    peft = jp.lora(rank=args.rank, alpha=2 * args.rank, targets=args.targets)
    peft_model, params = jp.apply(peft, model, jax.random.key(1), example, params=base)

    # Specs: the base's written here, every LoRA leaf's derived from its kernel's.
    specs = peft_specs(peft_model, params, lm_base_specs(base, axes), rank_axis=args.rank_axis)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    trainable_specs, frozen_specs = jp.partition(specs, peft_model.trainable)
    optimizer = optax.adamw(args.lr)
    trainable_sh = shardings(trainable_specs, mesh, trainable)  # checked before any transfer
    frozen_sh = shardings(frozen_specs, mesh, frozen)
    opt_sh = shardings(optimizer_specs(optimizer, trainable, trainable_specs), mesh)
    batch_sh = NamedSharding(mesh, batch_spec(axes))

    trainable = jax.device_put(trainable, trainable_sh)
    frozen = jax.device_put(frozen, frozen_sh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(trainable)

    def loss_fn(t, f, batch, rng):
        logits = peft_model.apply(jp.combine(t, f), batch["inputs"])
        return jp.cross_entropy(logits, batch["targets"])[0]

    step = jax.jit(
        jp.make_train_step(loss_fn, optimizer, jit=False),
        in_shardings=(trainable_sh, frozen_sh, opt_sh, batch_sh, None),
        out_shardings=(trainable_sh, opt_sh, None),
        donate_argnums=(0, 2),
    )

    # Each process makes its own rows of the global batch; JAX assembles the global array.
    if args.batch % jax.process_count():
        raise ValueError(f"--batch {args.batch} is not divisible by {jax.process_count()} processes")
    local_rows = args.batch // jax.process_count()
    stream = data.batches("recipes", local_rows, args.seq, seed=1 + jax.process_index())

    def global_batch() -> dict:
        local = next(stream)
        return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local.items()}

    batch = global_batch()
    compiled = step.lower(trainable, frozen, opt_state, batch, None).compile()
    memory = compiled.memory_analysis()
    losses = []
    start = time.perf_counter()
    for i in range(args.steps):
        trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, batch, None)
        losses.append(float(metrics["loss"]))
        if i == 0 or (i + 1) % max(1, args.steps // 5) == 0:
            say(f"step {i + 1:4d}  loss {losses[-1]:.4f}")
        batch = global_batch()
    seconds = time.perf_counter() - start

    leaf_path, leaf = next((p, x) for p, x in jp.leaves_with_paths(trainable) if x is not None)
    say(f"{leaf_path}: {leaf.shape} laid out as {leaf.sharding.spec}, {len(leaf.addressable_shards)} local shards "
        f"of {leaf.addressable_shards[0].data.shape}")
    if memory is not None:
        peak = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        peak += memory.temp_size_in_bytes
        say(f"XLA memory analysis of the step, per device: {peak / 2**20:.2f} MiB "
            f"(arguments {memory.argument_size_in_bytes / 2**20:.2f} MiB, temporaries {memory.temp_size_in_bytes / 2**20:.2f} MiB)")
    say(f"{args.steps} steps in {seconds:.2f} s")

    directory = args.save or os.path.join(tempfile.mkdtemp(), "adapter")
    jp.save_adapter(directory, trainable, config=peft.config(), base=frozen, overwrite=True)  # shard by shard
    say(f"adapter saved to {directory}")
    return {"losses": losses, "directory": directory, "specs": specs, "trainable": trainable, "mesh": mesh}


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
