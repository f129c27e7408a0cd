"""Per-device memory of a LoRA train step on 8 devices against one device.

Run: ``python -m benchmarks.bench_sharding`` (or ``jaxpeft bench sharding``). It needs 8 devices;
on a CPU it re-runs itself with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` when
fewer are visible.

Every figure is XLA's own memory analysis of the compiled step (``compiled.memory_analysis()``),
which for an SPMD program describes the program *one* device runs: its arguments (its shards of
the frozen base, the LoRA leaves, the optimizer state and the batch), outputs, temporaries. It
is what XLA plans to allocate, not a measurement of an allocator: JAX on CPU exposes no
allocator statistics, and 8 fake CPU devices share one host's memory anyway. Nothing is
allocated to get it: the step is lowered on ``jax.ShapeDtypeStruct`` inputs carrying their
shardings. No step time is reported: 8 fake devices share 2 CPU cores, so it would mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

DEVICES = 8


def _reexec_with_devices(argv: list[str]) -> int:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu")
    return subprocess.call([sys.executable, "-m", "benchmarks.bench_sharding", *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import jax

    if jax.device_count() < DEVICES:
        if jax.default_backend() != "cpu":
            raise SystemExit(f"bench_sharding needs {DEVICES} devices, this machine has {jax.device_count()}")
        return _reexec_with_devices(argv)
    return _run(argv)


def _run(argv: list[str]) -> int:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, NamedSharding

    import jaxpeft as jp
    from benchmarks.common import machine, write
    from jaxpeft.models import LinenLM, LMConfig
    from jaxpeft.sharding import optimizer_specs, peft_specs, shardings

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from train_lora_mesh import batch_spec, lm_base_specs  # the example's specs for the reference LM

    p = argparse.ArgumentParser(prog="benchmarks.bench_sharding")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--targets", default=r"(query|key|value|out|up|down)$")
    p.add_argument("--quick", action="store_true", help="tiny model: checks the script runs, writes nothing")
    args = p.parse_args(argv)

    config = LMConfig.tiny() if args.quick else LMConfig.bench()
    seq = min(args.seq, config.max_seq_len)
    model = LinenLM(config)
    tokens = jax.ShapeDtypeStruct((args.batch, seq), jnp.int32)
    base = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]  # shapes only
    peft = jp.lora(rank=8, alpha=16, targets=args.targets)
    peft_model, params = jp.apply(peft, model, jax.random.key(1), tokens, params=base)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    optimizer = optax.adamw(1e-4)

    def loss_fn(t, f, b, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(t, f), b["inputs"]), b["targets"])[0]

    step = jp.make_train_step(loss_fn, optimizer, jit=False)
    abstract_opt = jax.eval_shape(optimizer.init, trainable)

    def abstract(tree, sharding_tree=None):
        if sharding_tree is None:
            return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding_tree)

    batch = {"inputs": tokens, "targets": tokens}

    def memory(compiled) -> dict:
        m = compiled.memory_analysis()
        out = {
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "alias_bytes": int(m.alias_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes),
        }
        out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
        return out

    rows = []
    # One device: plain jax.jit, nothing sharded (donating, as jp.make_train_step does).
    single = jax.jit(step, donate_argnums=(0, 2)).lower(
        abstract(trainable), abstract(frozen), abstract(abstract_opt), abstract(batch), None
    ).compile()
    rows.append({"mesh": "1 device", "devices": 1, **memory(single)})

    for text in ("data=8", "data=4,model=2", "fsdp=8", "data=2,fsdp=2,model=2"):
        sizes = {k: int(v) for k, v in (part.split("=") for part in text.split(","))}
        mesh = jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes))
        axes = tuple(sizes)
        specs = peft_specs(peft_model, params, lm_base_specs(base, axes))
        t_specs, f_specs = jp.partition(specs, peft_model.trainable)
        t_sh, f_sh = shardings(t_specs, mesh, trainable), shardings(f_specs, mesh, frozen)
        o_sh = shardings(optimizer_specs(optimizer, trainable, t_specs), mesh)
        b_sh = NamedSharding(mesh, batch_spec(axes))
        compiled = (
            jax.jit(
                step,
                in_shardings=(t_sh, f_sh, o_sh, b_sh, None),
                out_shardings=(t_sh, o_sh, None),
                donate_argnums=(0, 2),
            )
            .lower(abstract(trainable, t_sh), abstract(frozen, f_sh), abstract(abstract_opt, o_sh),
                   abstract(batch, {"inputs": b_sh, "targets": b_sh}), None)
            .compile()
        )
        rows.append({"mesh": text, "devices": math.prod(sizes.values()), **memory(compiled)})

    one = rows[0]
    for r in rows:
        r["peak_ratio_vs_1_device"] = r["peak_bytes"] / one["peak_bytes"]
        r["argument_ratio_vs_1_device"] = r["argument_bytes"] / one["argument_bytes"]
    counts = jp.summary(params, peft_model.trainable)
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    table = (
        f"LoRA r=8 on `{args.targets}` of the reference LM ({config.num_layers} layers, d_model {config.d_model}, "
        f"d_ff {config.d_ff}, vocab {config.vocab_size}; {counts.total_params:,} parameters, "
        f"{counts.trainable_params:,} trainable), AdamW, batch {args.batch} x {seq} tokens, fp32. Base specs from "
        "`examples/train_lora_mesh.py` (`data`: batch only; `fsdp`: batch and every kernel's first axis; `model`: "
        "Megatron column / row parallel); LoRA specs from `jp.peft_specs`.\n\n"
        "Per device, from XLA's `compiled.memory_analysis()` of the compiled train step (what XLA plans to "
        "allocate on one device: arguments + outputs - donated aliases + temporaries). On 8 fake CPU devices; "
        "no timing (they share 2 cores).\n\n"
        "| mesh | devices | arguments | temporaries | peak | peak vs 1 device | arguments vs 1 device |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {r['mesh']} | {r['devices']} | {mib(r['argument_bytes'])} | {mib(r['temp_bytes'])} | "
            f"{mib(r['peak_bytes'])} | {r['peak_ratio_vs_1_device']:.3f}x | {r['argument_ratio_vs_1_device']:.3f}x |"
            for r in rows
        )
    )
    payload = {
        "machine": machine(),
        "device_count": jax.device_count(),
        "config": {k: str(v) for k, v in vars(config).items()},
        "batch": args.batch,
        "seq": seq,
        "targets": args.targets,
        "total_params": counts.total_params,
        "trainable_params": counts.trainable_params,
        "rows": rows,
        "what": "XLA compiled.memory_analysis() per device of the train step; not an allocator measurement",
    }
    write("sharding_memory", payload, table, save=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
