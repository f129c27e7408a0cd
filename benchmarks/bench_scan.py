"""LoRA on the reference LM, layers scanned (``scan_layers=True``) vs unrolled: compile time and step time.

Run: ``python -m benchmarks.bench_scan`` (``--quick`` checks the script runs). For each depth the
scanned and the unrolled train step (LoRA r=8 on query/value, AdamW) are lowered and compiled
``--compile-repeats`` times, alternating (compile time: the median wall clock and process CPU seconds of
``jax.jit(...).lower(...).compile()``), then timed round-robin in one process (median step time, quoted as
a ratio). The size of the optimized program (instructions in XLA's HLO text) does not depend on machine
load: it shows what grows with depth and what does not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import optax

import jaxpeft as jp
from benchmarks.common import interleaved_medians, machine, write
from jaxpeft.models import LinenLM, LMConfig


def _compiled_step(config: LMConfig, batch: dict, key: jax.Array) -> tuple[dict, object]:
    model = LinenLM(config)
    peft_model, params = jp.apply(jp.lora(8, 16, targets=r"attn/(query|value)$"), model, key, batch["inputs"])
    trainable, frozen = jp.partition(params, peft_model.trainable)
    opt = optax.adamw(1e-4)
    state = opt.init(trainable)

    def loss_fn(t, f, b, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(t, f), b["inputs"]), b["targets"])[0]

    raw = jp.make_train_step(loss_fn, opt, jit=False)
    start, start_cpu = time.perf_counter(), time.process_time()
    # A new function object each time: jax's in-memory cache does not hand back the last compile.
    compiled = jax.jit(lambda t, s: raw(t, frozen, s, batch, None)).lower(trainable, state).compile()
    figures = {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - start_cpu,
               "hlo_instructions": sum(1 for line in compiled.as_text().splitlines() if " = " in line)}
    return figures, lambda: compiled(trainable, state)


def _write(rows: list, sizes: dict, args: argparse.Namespace, repeats: int, argv: list[str] | None) -> None:
    table = (
        "| layers | HLO instructions unrolled | scanned | compile unrolled | compile scanned | scanned / unrolled "
        "| compile CPU unrolled | scanned | step unrolled | step scanned | scanned / unrolled |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {r['layers']} | {r['hlo_instructions_unrolled']:,} | {r['hlo_instructions_scanned']:,} | "
            f"{r['compile_seconds_unrolled']:.2f} s | {r['compile_seconds_scanned']:.2f} s | "
            f"{r['compile_ratio_scanned_vs_unrolled']:.2f}x | {r['compile_cpu_seconds_unrolled']:.2f} s | "
            f"{r['compile_cpu_seconds_scanned']:.2f} s | {1e3 * r['step_seconds_unrolled']:.1f} ms | "
            f"{1e3 * r['step_seconds_scanned']:.1f} ms | {r['step_ratio_scanned_vs_unrolled']:.2f}x |"
            for r in rows
        )
    )
    payload = {"machine": machine(), "sizes": sizes, "batch": args.batch, "seq": args.seq, "repeats": repeats,
               "command": " ".join(["python -m benchmarks.bench_scan", *(sys.argv[1:] if argv is None else argv)]),
               "rows": rows}
    write("scan_vs_unrolled", payload,
          f"LoRA r=8 (query, value) on the reference LM (d_model {sizes['d_model']}, d_ff {sizes['d_ff']}), "
          f"batch {args.batch} x {args.seq} tokens, AdamW; compile = median of {args.compile_repeats} lower+compile "
          f"(wall and process CPU seconds), HLO instructions = lines of the optimized program; step = median of "
          f"{repeats} interleaved steps.\n\n" + table, save=not args.quick)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_scan")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 12, 24])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile-repeats", type=int, default=3, help="compiles per variant and depth (median)")
    p.add_argument("--quick", action="store_true", help="tiny model, depths 2 and 4: checks the script runs")
    args = p.parse_args(argv)
    depths = [2, 4] if args.quick else args.depths
    repeats = 2 if args.quick else args.repeats
    sizes = dict(vocab_size=512, d_model=128, num_heads=4, d_ff=512, max_seq_len=128)
    key = jax.random.key(0)
    rows = []
    for depth in depths:
        base = LMConfig.tiny(num_layers=depth) if args.quick else LMConfig(num_layers=depth, **sizes)
        seq = min(args.seq, base.max_seq_len)
        tokens = jax.random.randint(key, (args.batch, seq + 1), 0, base.vocab_size)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        measured, runs = {"unrolled": [], "scanned": []}, {}
        for _ in range(1 if args.quick else args.compile_repeats):
            for name, scan in (("unrolled", False), ("scanned", True)):
                figures, runs[name] = _compiled_step(base.replace(scan_layers=scan), batch, key)
                measured[name].append(figures)
        compile_s = {n: statistics.median(f["seconds"] for f in m) for n, m in measured.items()}
        compile_cpu = {n: statistics.median(f["cpu_seconds"] for f in m) for n, m in measured.items()}
        hlo = {n: m[0]["hlo_instructions"] for n, m in measured.items()}
        step = interleaved_medians(runs, repeats)
        rows.append({
            "layers": depth,
            "compile_seconds_unrolled": compile_s["unrolled"],
            "compile_seconds_scanned": compile_s["scanned"],
            "compile_cpu_seconds_unrolled": compile_cpu["unrolled"],
            "compile_cpu_seconds_scanned": compile_cpu["scanned"],
            "hlo_instructions_unrolled": hlo["unrolled"],
            "hlo_instructions_scanned": hlo["scanned"],
            "compile_ratio_scanned_vs_unrolled": compile_s["scanned"] / compile_s["unrolled"],
            "step_seconds_unrolled": step["unrolled"],
            "step_seconds_scanned": step["scanned"],
            "step_ratio_scanned_vs_unrolled": step["scanned"] / step["unrolled"],
        })
        _write(rows, sizes, args, repeats, argv)  # after every depth: a partial run still leaves its rows
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
