"""QLoRA (NF4 + double quantization base) against LoRA on a bf16 base: step time and memory.

Run: ``python -m benchmarks.bench_qlora`` (or ``jaxpeft bench qlora``). Same model, same LoRA
(r=8 on every linear layer), same batch; the steps are timed round-robin in one process. The
compute dtype is bf16 in both; QLoRA dequantizes its kernels inside the jitted step.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jaxpeft as jp
from benchmarks.common import compiled_memory, interleaved_medians, machine, write
from jaxpeft.models import LinenLM, LMConfig

TARGETS = r"(query|key|value|out|up|down)$"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_qlora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 repeats: checks the script runs")
    args = p.parse_args(argv)
    preset = LMConfig.tiny if args.quick else LMConfig.bench
    config = preset(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    repeats = 2 if args.quick else args.repeats
    seq = min(args.seq, config.max_seq_len)

    model = LinenLM(config)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (args.batch, seq + 1), 0, config.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    bf16_base = model.init(key, batch["inputs"])["params"]
    bases = {
        "LoRA r=8, bf16 base": bf16_base,
        "QLoRA r=8, NF4+DQ base": jp.quantize(bf16_base, scheme="nf4", block_size=64, double_quant=True),
        "QLoRA r=8, int8 base": jp.quantize(bf16_base, scheme="int8", block_size=64),
    }
    opt = optax.adamw(1e-4)
    runs, rows = {}, []
    for name, base in bases.items():
        peft_model, params = jp.apply(jp.lora(8, 16, targets=TARGETS), model, key, batch["inputs"], params=base)
        trainable, frozen = jp.partition(params, peft_model.trainable)

        def loss_fn(t, f, b, rng, peft_model=peft_model):
            return jp.cross_entropy(peft_model.apply(jp.combine(t, f), b["inputs"]), b["targets"])[0]

        state = opt.init(trainable)
        step = jp.make_train_step(loss_fn, opt, donate=False)
        raw = jp.make_train_step(loss_fn, opt, jit=False)
        memory = compiled_memory(lambda t, s, f: raw(t, f, s, batch, None), trainable, state, frozen)
        runs[name] = lambda step=step, t=trainable, f=frozen, s=state: step(t, f, s, batch, None)
        kernels = {p: x for p, x in jp.leaves_with_paths(base) if p.endswith("kernel")}
        rows.append({
            "method": name,
            "kernel_bytes": sum(x.nbytes for x in kernels.values()),
            "kernel_bits_per_param": 8 * sum(x.nbytes for x in kernels.values())
            / sum(getattr(x, "num_params", None) or x.size for x in kernels.values()),
            "base_bytes": jp.tree_bytes(jax.tree.map(lambda x: x, frozen)),
            **memory,
        })
    seconds = interleaved_medians(runs, repeats)
    ref = rows[0]
    for r in rows:
        r["step_seconds"] = seconds[r["method"]]
        r["step_time_ratio_vs_bf16_lora"] = r["step_seconds"] / seconds[ref["method"]]
        r["peak_ratio_vs_bf16_lora"] = r["peak_bytes"] / ref["peak_bytes"]
    table = (
        "| method | kernel bits/param | frozen base | step time | vs bf16 LoRA | step peak memory | vs bf16 LoRA |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {r['method']} | {r['kernel_bits_per_param']:.3f} | {r['base_bytes'] / 2**20:.1f} MiB | "
            f"{1e3 * r['step_seconds']:.1f} ms | {r['step_time_ratio_vs_bf16_lora']:.2f}x | "
            f"{r['peak_bytes'] / 2**20:.1f} MiB | {r['peak_ratio_vs_bf16_lora']:.2f}x |"
            for r in rows
        )
    )
    payload = {"machine": machine(), "config": {k: str(v) for k, v in vars(config).items()}, "batch": args.batch,
               "seq": seq, "repeats": repeats, "rows": rows}
    write("qlora_vs_lora", payload,
          f"Reference LM ({config.num_layers} layers, d_model {config.d_model}, d_ff {config.d_ff}), bf16 compute, "
          f"LoRA r=8 on every linear layer, batch {args.batch} x {seq}, AdamW, median of {repeats} steps. "
          "Peak memory is XLA's analysis of the compiled step (arguments + outputs + scratch).\n\n" + table, save=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
