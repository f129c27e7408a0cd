"""LoRA r=8 against full fine-tuning on the reference LM: train-step time, memory, optimizer state.

Run: ``python -m benchmarks.bench_lora`` (or ``jaxpeft bench lora``). Both steps are timed
round-robin in one process and reported as ratios. Peak memory is XLA's analysis of the
compiled step (arguments + outputs + scratch; JAX on CPU exposes no allocator statistics).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jaxpeft as jp
from benchmarks.common import compiled_memory, interleaved_medians, machine, write
from jaxpeft.models import LinenLM, LMConfig

TARGETS = {
    "lora r=8 (query, value)": r"attn/(query|value)$",
    "lora r=8 (all linear)": r"(query|key|value|out|up|down)$",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_lora")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 repeats: checks the script runs")
    args = p.parse_args(argv)
    config = LMConfig.tiny() if args.quick else LMConfig.bench()
    repeats = 2 if args.quick else args.repeats
    seq = min(args.seq, config.max_seq_len)

    model = LinenLM(config)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (args.batch, seq + 1), 0, config.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    base = model.init(key, batch["inputs"])["params"]
    opt = optax.adamw(1e-4)

    def make(apply_fn, params, selector):
        trainable, frozen = jp.partition(params, selector)

        def loss_fn(t, f, b, rng):
            return jp.cross_entropy(apply_fn(jp.combine(t, f), b["inputs"]), b["targets"])[0]

        state = opt.init(trainable)
        step = jp.make_train_step(loss_fn, opt, donate=False)
        raw = jp.make_train_step(loss_fn, opt, jit=False)
        memory = compiled_memory(lambda t, s: raw(t, frozen, s, batch, None), trainable, state)
        counts = jp.summary(params, selector)
        return {
            "run": lambda: step(trainable, frozen, state, batch, None),
            "trainable_params": counts.trainable_params,
            "total_params": counts.total_params,
            "optimizer_state_bytes": jp.state_bytes(state),
            **memory,
        }

    runs = {"full fine-tuning": make(lambda p, x: model.apply({"params": p}, x), base, True)}
    for name, targets in TARGETS.items():
        peft_model, params = jp.apply(jp.lora(8, 16, targets=targets), model, key, batch["inputs"], params=base)
        runs[name] = make(peft_model.apply, params, peft_model.trainable)

    seconds = interleaved_medians({n: r["run"] for n, r in runs.items()}, repeats)
    full = runs["full fine-tuning"]
    rows = []
    for name, r in runs.items():
        rows.append(
            {
                "method": name,
                "trainable_params": r["trainable_params"],
                "trainable_percent": 100 * r["trainable_params"] / r["total_params"],
                "step_seconds": seconds[name],
                "step_time_ratio_vs_full": seconds[name] / seconds["full fine-tuning"],
                "optimizer_state_bytes": r["optimizer_state_bytes"],
                "optimizer_state_ratio_vs_full": r["optimizer_state_bytes"] / full["optimizer_state_bytes"],
                "peak_bytes": r.get("peak_bytes"),
                "peak_ratio_vs_full": r["peak_bytes"] / full["peak_bytes"] if r.get("peak_bytes") else None,
            }
        )
    table = (
        "| method | trainable | step time | vs full | optimizer state | vs full | step peak memory | vs full |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {r['method']} | {r['trainable_params']:,} ({r['trainable_percent']:.2f}%) | "
            f"{1e3 * r['step_seconds']:.1f} ms | {r['step_time_ratio_vs_full']:.2f}x | "
            f"{r['optimizer_state_bytes'] / 2**20:.2f} MiB | {100 * r['optimizer_state_ratio_vs_full']:.2f}% | "
            f"{(r['peak_bytes'] or 0) / 2**20:.1f} MiB | {r['peak_ratio_vs_full'] or 0:.2f}x |"
            for r in rows
        )
    )
    config_desc = {k: str(v) for k, v in vars(config).items()}
    payload = {"machine": machine(), "config": config_desc, "batch": args.batch, "seq": seq, "repeats": repeats,
               "rows": rows}
    write("lora_vs_full", payload,
          f"Reference LM ({config.num_layers} layers, d_model {config.d_model}, d_ff {config.d_ff}, vocab "
          f"{config.vocab_size}), batch {args.batch} x {seq} tokens, AdamW, median of {repeats} steps.\n\n" + table, save=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
