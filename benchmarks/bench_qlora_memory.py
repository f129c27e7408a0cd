"""What a QLoRA train step holds, from XLA's own buffer assignment: ``jaxpeft bench qlora_memory``.

Two measurements, each from ``compiled.memory_analysis()`` (no step is run):

* the peers' step (``benchmarks/peers``: the reference LM, batch 8 x 128, fp32, AdamW, LoRA r=8 on
  query/value) on the fp32 base and on the NF4 base (every block linear in 4 bits): arguments,
  outputs and XLA temporaries;
* a chain of ``tanh(x W + x A B)`` layers whose activations are 4x its kernels (1024 x 512 inputs,
  512 x 512 NF4 kernels) at 4 and 8 layers: the temporaries each added layer costs, for
  ``qmatmul_blockwise`` and for the plain ``x @ dequantize(q)``. A layer must cost the activation it
  saves for the backward pass (2 MiB) and nothing more; the plain path also keeps its float kernel.

``--quick``: the tiny LM and 2 / 3 layers, no result files.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine, write

MIB = 2**20


def _analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "temp_bytes": m.temp_size_in_bytes}


def peers_steps(quick: bool) -> dict:
    from benchmarks.peers import shared
    from benchmarks.peers.jax_peers import linen_train_step

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "shared.npz"
        shared.make(path, quick)
        arrays = shared.load(str(path))
    out = {}
    for row in ("lora_qv", "qlora_qv"):
        step, (trainable, frozen, opt_state, batch, rng) = linen_train_step(row, arrays)
        fn = jax.jit(lambda t, f, s, b, step=step: step(t, f, s, b, None))
        out[row] = _analysis(fn.lower(trainable, frozen, opt_state, batch).compile())
    return out


def chain_temp(layers: int, plain: bool, width: int, tokens: int) -> int:
    from jaxpeft import quant

    rng = np.random.default_rng(0)
    qs = [quant.quantize_array(jnp.asarray(rng.normal(0, 0.03, (width, width)), jnp.float32), scheme="nf4",
                               block_size=64) for _ in range(layers)]
    lora = [(jnp.asarray(rng.normal(0, 0.03, (width, 8)), jnp.float32), jnp.full((8, width), 0.01)) for _ in qs]
    x = jnp.asarray(rng.normal(size=(tokens, width)), jnp.float32)
    matmul = (lambda h, q: h @ quant.dequantize_array(q)) if plain else quant.qmatmul_blockwise

    def loss(lora, qs, x):
        h = x
        for (a, b), q in zip(lora, qs):
            h = jnp.tanh(matmul(h, q) + (h @ a) @ b)
        return jnp.mean(h**2)

    return jax.jit(jax.grad(loss)).lower(lora, qs, x).compile().memory_analysis().temp_size_in_bytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_qlora_memory")
    p.add_argument("--quick", action="store_true", help="tiny LM, 2 / 3 layers: checks the script runs")
    args = p.parse_args(argv)
    steps = peers_steps(args.quick)
    width, tokens, (few, many) = (64, 128, (2, 3)) if args.quick else (512, 1024, (4, 8))
    per_layer = {}
    for name, plain in (("qmatmul_blockwise", False), ("plain dequantize", True)):
        a, b = chain_temp(few, plain, width, tokens), chain_temp(many, plain, width, tokens)
        per_layer[name] = (b - a) / (many - few)
    activation = tokens * width * 4
    kernel = width * width * 4
    rows = [f"| {row} | {s['argument_bytes'] / MIB:.1f} MiB | {s['output_bytes'] / MIB:.1f} MiB | "
            f"{s['temp_bytes'] / MIB:.1f} MiB |" for row, s in steps.items()]
    chain = [f"| {name} | {v / MIB:.2f} MiB | {v / activation:.2f} |" for name, v in per_layer.items()]
    text = ("The peers' train step (`benchmarks/peers`, jaxpeft-linen; `lora_qv` on the fp32 base, `qlora_qv` on "
            "the NF4 base), XLA's buffer assignment:\n\n| row | arguments | outputs | XLA temporaries |\n"
            "|---|---:|---:|---:|\n" + "\n".join(rows)
            + f"\n\nA chain of `tanh(x W + x A B)` layers, x {tokens} x {width} fp32 (one activation "
            f"{activation / MIB:.1f} MiB), NF4 kernels {width} x {width} ({kernel / MIB:.1f} MiB in fp32): XLA "
            f"temporaries added per layer, from {few} to {many} layers.\n\n| matmul | per layer | in activations |\n"
            "|---|---:|---:|\n" + "\n".join(chain)
            + f"\n\nCommand: `python -m benchmarks.bench_qlora_memory {' '.join(argv if argv is not None else sys.argv[1:])}`.")
    payload = {"machine": machine(), "peers_steps": steps, "chain": {"width": width, "tokens": tokens,
               "layers": [few, many], "temp_bytes_per_layer": per_layer, "activation_bytes": activation,
               "kernel_bytes": kernel}}
    write("qlora_memory", payload, text, save=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
