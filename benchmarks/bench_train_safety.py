"""The safe train step against the old donating one, on the reference LM: step time, interleaved.

Run: ``python -m benchmarks.bench_train_safety`` (``--quick``: tiny model, checks the script runs).

Three ways to run the same ``jp.make_train_step`` step function, each threading its own state,
timed round-robin in one process so machine noise hits all alike:

* ``donating (old default)``: ``jax.jit(step, donate_argnums=(0, 2))`` called directly, what
  ``make_train_step`` returned before issue 11 (it deleted the caller's base after one step);
* ``direct call (new default)``: ``step(...)``, donating nothing;
* ``fit's steady state``: ``step.donating`` on buffers ``fit`` owns (after its one copy).

Two regimes: full fine-tuning (every base leaf trainable) and LoRA r=8 on query/value with a
trainable head. Also reported: the one-off copy ``fit`` makes before its first step, in steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import optax

import jaxpeft as jp
from benchmarks.common import block, machine, write
from jaxpeft.models import LinenLM, LMConfig
from jaxpeft.train import _copy_tree

REGIMES = {
    "full fine-tuning": None,
    "lora r=8 (query, value) + head": (r"^head/", r"lora_(a|b)$"),
}


def _runner(fn, trainable, frozen, opt_state, batch):
    state = {"t": trainable, "o": opt_state}

    def run():
        state["t"], state["o"], metrics = fn(state["t"], frozen, state["o"], batch, None)
        return metrics["loss"], state["t"]

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_train_safety")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 repeats: checks the script runs")
    p.add_argument("--no-save", action="store_true")
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

    rows = []
    for regime, selector in REGIMES.items():
        if selector is None:
            apply_fn, params = (lambda p, x: model.apply({"params": p}, x)), base
            trainable, frozen = jp.partition(params, True)
        else:
            peft = jp.lora(rank=8, alpha=16, targets=r"attn/(query|value)$")
            peft_model, params = jp.apply(peft, model, key, batch["inputs"], params=base)
            apply_fn = peft_model.apply
            trainable, frozen = jp.partition(params, selector)

        def loss_fn(t, f, b, rng, apply_fn=apply_fn):
            return jp.cross_entropy(apply_fn(jp.combine(t, f), b["inputs"]), b["targets"])[0]

        step = jp.make_train_step(loss_fn, opt)
        old = jax.jit(step.fn, donate_argnums=(0, 2))
        state = opt.init(trainable)
        own_old, own_fit = _copy_tree((trainable, state)), _copy_tree((trainable, state))  # theirs to donate
        variants = {
            "donating (old default)": _runner(old, own_old[0], frozen, own_old[1], batch),
            "direct call (new default)": _runner(step, trainable, frozen, state, batch),
            "fit's steady state": _runner(step.donating, own_fit[0], frozen, own_fit[1], batch),
        }
        for fn in variants.values():  # compile and warm up
            for _ in range(2):
                block(fn())
        times = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                block(fn())
                times[name].append(time.perf_counter() - t0)
        copies = []
        for _ in range(max(3, repeats // 2)):
            t0 = time.perf_counter()
            block(_copy_tree((trainable, state)))
            copies.append(time.perf_counter() - t0)
        ref = statistics.median(times["donating (old default)"])
        for name, ts in times.items():
            q1, _, q3 = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 2 else (ts[0], ts[0], ts[0])
            rows.append({
                "regime": regime,
                "variant": name,
                "median_s": statistics.median(ts),
                "q1_s": q1,
                "q3_s": q3,
                "vs_donating": statistics.median(ts) / ref,
                "times_s": ts,
            })
        rows[-1]["fit_copy_once_s"] = statistics.median(copies)
        rows[-1]["fit_copy_once_in_steps"] = statistics.median(copies) / ref

    lines = [
        f"Reference LM ({config.num_layers} layers, d_model {config.d_model}, d_ff {config.d_ff}, vocab "
        f"{config.vocab_size}), batch {args.batch} x {seq} tokens, AdamW, {repeats} interleaved rounds "
        "after 2 warm-up steps each.",
        "",
        "| regime | variant | median step | interquartile range | vs donating |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['regime']} | {r['variant']} | {1e3 * r['median_s']:.1f} ms | "
            f"{1e3 * r['q1_s']:.1f} - {1e3 * r['q3_s']:.1f} ms | {r['vs_donating']:.3f}x |"
        )
    lines.append("")
    for r in rows:
        if "fit_copy_once_s" in r:
            lines.append(
                f"* {r['regime']}: `fit`'s one copy of the starting trainable + optimizer state takes "
                f"{1e3 * r['fit_copy_once_s']:.1f} ms ({r['fit_copy_once_in_steps']:.3f} steps), once per run."
            )
    lines.append("")
    lines.append(f"Command: `python -m benchmarks.bench_train_safety{' --quick' if args.quick else ''}`")
    payload = {"machine": machine(), "config": vars(args), "rows": rows}
    write("train_safety", payload, "\n".join(lines), save=not (args.quick or args.no_save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
