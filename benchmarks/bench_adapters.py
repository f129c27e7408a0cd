"""Mixed-adapter batches: one forward where each example runs its own LoRA adapter, against
looping over the adapters (one forward per adapter on its share of the batch).

Run: ``python -m benchmarks.bench_adapters`` (or ``jaxpeft bench adapters``). Both are jitted
and timed round-robin in one process; throughput is examples per second.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxpeft as jp
from benchmarks.common import interleaved_medians, machine, write
from jaxpeft.models import LinenLM, LMConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_adapters")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 repeats: checks the script runs")
    args = p.parse_args(argv)
    config = LMConfig.tiny() if args.quick else LMConfig.bench()
    repeats = 2 if args.quick else args.repeats
    seq = min(args.seq, config.max_seq_len)

    model = LinenLM(config)
    key = jax.random.key(0)
    x = jax.random.randint(key, (args.batch, seq), 0, config.vocab_size)
    params = model.init(key, x)["params"]
    names = tuple(f"task{i}" for i in range(args.adapters))
    peft_model = None
    for i, name in enumerate(names):
        lora = jp.lora(8, 16, targets=r"attn/(query|value)$", adapter=name)
        if peft_model is None:
            peft_model, params = jp.apply(lora, model, jax.random.key(i + 1), x, params=params)
        else:
            peft_model, params = jp.add_adapter(peft_model, lora, jax.random.key(i + 1), params=params)
    # Non-zero B so every adapter does real work.
    trainable, frozen = jp.partition(params, r"lora_b")
    params = jp.combine(jax.tree.map(lambda b: 0.01 * jnp.ones_like(b), trainable), frozen)
    ids = jnp.asarray(np.arange(args.batch) % args.adapters)

    mixed = jax.jit(lambda p, x, ids: peft_model.apply(p, x, adapters=names, adapter_ids=ids))
    per_adapter = {n: jax.jit(lambda p, x, n=n: peft_model.apply(p, x, adapters=n)) for n in names}
    groups = [np.flatnonzero(np.asarray(ids) == i) for i in range(args.adapters)]
    groups_x = [x[g] for g in groups]

    def loop():
        return [per_adapter[n](params, gx) for n, gx in zip(names, groups_x)]

    # Same answer first: the benchmark compares equal work.
    out, looped = mixed(params, x, ids), loop()
    for g, y in zip(groups, looped):
        np.testing.assert_allclose(out[g], y, rtol=2e-4, atol=2e-4)
    seconds = interleaved_medians({"mixed batch (one forward)": lambda: mixed(params, x, ids),
                                   "loop over adapters": loop}, repeats)
    rows = [{"method": k, "seconds": v, "examples_per_second": args.batch / v,
             "speedup_vs_loop": seconds["loop over adapters"] / v} for k, v in seconds.items()]
    table = "| method | forward time | examples/s | vs loop |\n|---|---:|---:|---:|\n" + "\n".join(
        f"| {r['method']} | {1e3 * r['seconds']:.1f} ms | {r['examples_per_second']:.1f} | {r['speedup_vs_loop']:.2f}x |"
        for r in rows
    )
    payload = {"machine": machine(), "config": {k: str(v) for k, v in vars(config).items()}, "batch": args.batch,
               "seq": seq, "adapters": args.adapters, "repeats": repeats, "rows": rows}
    write("mixed_adapters", payload,
          f"Reference LM ({config.num_layers} layers, d_model {config.d_model}), {args.adapters} LoRA adapters "
          f"(r=8, query/value), batch {args.batch} x {seq}, each example with its own adapter; jitted forward, "
          f"median of {repeats}.\n\n" + table, save=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
