"""LoRA on the reference LM, layers scanned (``scan_layers=True``) vs unrolled: compile time and step time.

Run: ``python -m benchmarks.bench_scan`` (``--quick`` checks the script runs). For each depth the
scanned and the unrolled train step (LoRA r=8 on query/value, AdamW) are lowered and compiled once
(compile time: wall clock of ``jax.jit(...).lower(...).compile()``, one measurement), then timed
round-robin in one process (median step time, quoted as a ratio).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import optax

import jaxpeft as jp
from benchmarks.common import interleaved_medians, machine, write
from jaxpeft.models import LinenLM, LMConfig


def _compiled_step(config: LMConfig, batch: dict, key: jax.Array) -> tuple[float, object]:
    model = LinenLM(config)
    peft_model, params = jp.apply(jp.lora(8, 16, targets=r"attn/(query|value)$"), model, key, batch["inputs"])
    trainable, frozen = jp.partition(params, peft_model.trainable)
    opt = optax.adamw(1e-4)
    state = opt.init(trainable)

    def loss_fn(t, f, b, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(t, f), b["inputs"]), b["targets"])[0]

    raw = jp.make_train_step(loss_fn, opt, jit=False)
    start = time.perf_counter()
    compiled = jax.jit(lambda t, s: raw(t, frozen, s, batch, None)).lower(trainable, state).compile()
    seconds = time.perf_counter() - start
    return seconds, lambda: compiled(trainable, state)


def _write(rows: list, sizes: dict, args: argparse.Namespace, repeats: int, argv: list[str] | None) -> None:
    table = (
        "| layers | compile unrolled | compile scanned | scanned / unrolled | step unrolled | step scanned | "
        "scanned / unrolled |\n|---:|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {r['layers']} | {r['compile_seconds_unrolled']:.2f} s | {r['compile_seconds_scanned']:.2f} s | "
            f"{r['compile_ratio_scanned_vs_unrolled']:.2f}x | {1e3 * r['step_seconds_unrolled']:.1f} ms | "
            f"{1e3 * r['step_seconds_scanned']:.1f} ms | {r['step_ratio_scanned_vs_unrolled']:.2f}x |"
            for r in rows
        )
    )
    payload = {"machine": machine(), "sizes": sizes, "batch": args.batch, "seq": args.seq, "repeats": repeats,
               "command": " ".join(["python -m benchmarks.bench_scan", *(sys.argv[1:] if argv is None else argv)]),
               "rows": rows}
    write("scan_vs_unrolled", payload,
          f"LoRA r=8 (query, value) on the reference LM (d_model {sizes['d_model']}, d_ff {sizes['d_ff']}), "
          f"batch {args.batch} x {args.seq} tokens, AdamW; compile = one lower+compile, step = median of "
          f"{repeats} interleaved steps.\n\n" + table, save=not args.quick)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_scan")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 12, 24])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
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
        compile_s, runs = {}, {}
        for name, scan in (("unrolled", False), ("scanned", True)):
            compile_s[name], runs[name] = _compiled_step(base.replace(scan_layers=scan), batch, key)
        step = interleaved_medians(runs, repeats)
        rows.append({
            "layers": depth,
            "compile_seconds_unrolled": compile_s["unrolled"],
            "compile_seconds_scanned": compile_s["scanned"],
            "compile_ratio_scanned_vs_unrolled": compile_s["scanned"] / compile_s["unrolled"],
            "step_seconds_unrolled": step["unrolled"],
            "step_seconds_scanned": step["scanned"],
            "step_ratio_scanned_vs_unrolled": step["scanned"] / step["unrolled"],
        })
        _write(rows, sizes, args, repeats, argv)  # after every depth: a partial run still leaves its rows
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
