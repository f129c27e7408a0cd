"""Mixed-adapter batches: one forward where each example runs its own adapter, against looping over the
adapters (one forward per adapter on its share of the batch), for every site method.

Run: ``python -m benchmarks.bench_adapters`` (or ``jaxpeft bench adapters``): the issue's shape, 8 adapters
with one example each, at 1, 16 and 128 tokens per example (1: one decode step of 8 requests, each with its
own adapter). Both are jitted and timed round-robin in one process; throughput is examples per second.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxpeft as jp
from benchmarks.common import interleaved_medians, machine, write
from jaxpeft.models import LinenLM, LMConfig

METHODS = {  # name: (what the row is, one adapter of it)
    "lora": ("LoRA r=8 (query, value)", lambda n: jp.lora(8, 16, targets=r"attn/(query|value)$", adapter=n)),
    "dora": ("DoRA r=8 (query, value)", lambda n: jp.dora(8, 16, targets=r"attn/(query|value)$", adapter=n)),
    "ia3": ("IA3 (keys, values, feed-forward input)", lambda n: jp.ia3(adapter=n)),
    "lokr": ("LoKr (query, value)", lambda n: jp.lokr(8, targets=r"attn/(query|value)$", adapter=n)),
    "houlsby": ("Houlsby adapters (m = d/16)", lambda n: jp.houlsby(reduction_factor=16, adapter=n)),
    "compacter": ("Compacter (n=4, m = d/16)", lambda n: jp.compacter(4, reduction_factor=16, adapter=n)),
}


def _bound(model, make, names, x, params):
    peft_model = None
    for i, name in enumerate(names):
        peft = make(name)
        if peft_model is None:
            peft_model, params = jp.apply(peft, model, jax.random.key(i + 1), x, params=params)
        else:
            peft_model, params = jp.add_adapter(peft_model, peft, jax.random.key(i + 1), params=params)
    # Non-zero, distinct leaves so every adapter does real, different work.
    trainable, frozen = jp.partition(params, peft_model.trainable)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(99), len(leaves))
    noisy = [v + 0.01 * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)]
    return peft_model, jp.combine(jax.tree.unflatten(treedef, noisy), frozen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_adapters")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", default="1,16,128", help="comma-separated tokens per example")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    p.add_argument("--quick", action="store_true", help="tiny model, 2 repeats, LoRA and IA3: checks the script runs")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.batch < args.adapters:
        p.error(f"--batch {args.batch} must be >= --adapters {args.adapters}: every adapter gets an example")
    config = LMConfig.tiny() if args.quick else LMConfig.bench()
    repeats = 2 if args.quick else args.repeats
    if args.quick:
        methods = [m for m in methods if m.startswith(("lora", "ia3"))] or methods[:1]
    try:
        seqs = sorted({min(int(v), config.max_seq_len) for v in args.seq.split(",") if v.strip()})
    except ValueError:
        p.error(f"--seq: expected comma-separated integers, got {args.seq!r}")
    if not seqs or min(seqs) < 1:
        p.error(f"--seq: lengths must be >= 1, got {args.seq!r}")

    model = LinenLM(config)
    key = jax.random.key(0)
    base = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    names = tuple(f"task{i}" for i in range(args.adapters))
    ids = jnp.asarray(np.arange(args.batch) % args.adapters)
    groups = [np.flatnonzero(np.asarray(ids) == i) for i in range(args.adapters)]
    rows = []
    for method, seq in [(m, n) for m in methods for n in seqs]:
        label, make = METHODS[method]
        x = jax.random.randint(jax.random.key(seq), (args.batch, seq), 0, config.vocab_size)
        peft_model, params = _bound(model, make, names, x, base)
        mixed = jax.jit(lambda p, x, ids, m=peft_model: m.apply(p, x, adapters=names, adapter_ids=ids))
        per_adapter = {n: jax.jit(lambda p, x, n=n, m=peft_model: m.apply(p, x, adapters=n)) for n in names}
        groups_x = [x[g] for g in groups]

        def loop(per_adapter=per_adapter, params=params, groups_x=groups_x):
            return [per_adapter[n](params, gx) for n, gx in zip(names, groups_x)]

        # Same answer first: the benchmark compares equal work.
        out, looped = mixed(params, x, ids), loop()
        for g, y in zip(groups, looped):
            np.testing.assert_allclose(out[g], y, rtol=2e-4, atol=2e-4, err_msg=method)
        seconds = interleaved_medians({"mixed": lambda: mixed(params, x, ids), "loop": loop}, repeats)
        rows.append({"method": label, "seq": seq, "mixed_seconds": seconds["mixed"], "loop_seconds": seconds["loop"],
                     "mixed_examples_per_second": args.batch / seconds["mixed"],
                     "speedup_vs_loop": seconds["loop"] / seconds["mixed"]})
        print(f"{label}, {seq} tokens: mixed {1e3 * seconds['mixed']:.1f} ms, loop {1e3 * seconds['loop']:.1f} ms", flush=True)
    table = ("| method | tokens per example | mixed batch (one forward) | loop over adapters | mixed examples/s "
             "| mixed vs loop |\n|---|---:|---:|---:|---:|---:|\n" + "\n".join(
                 f"| {r['method']} | {r['seq']} | {1e3 * r['mixed_seconds']:.1f} ms | {1e3 * r['loop_seconds']:.1f} ms | "
                 f"{r['mixed_examples_per_second']:.1f} | **{r['speedup_vs_loop']:.2f}x** |" for r in rows))
    payload = {"machine": machine(), "config": {k: str(v) for k, v in vars(config).items()}, "batch": args.batch,
               "seqs": seqs, "adapters": args.adapters, "repeats": repeats, "rows": rows}
    write("mixed_adapters", payload,
          f"Reference LM ({config.num_layers} layers, d_model {config.d_model}), {args.adapters} adapters of each "
          f"method, batch {args.batch} x (1 example per adapter; {', '.join(map(str, seqs))} tokens each; example i runs "
          f"adapter i mod {args.adapters}); the loop runs one "
          f"jitted forward per adapter on its own examples. Jitted, median of {repeats} interleaved calls; "
          f"outputs checked equal first.\n\nCommand: `python -m benchmarks.bench_adapters "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`.\n\n" + table, save=not args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
