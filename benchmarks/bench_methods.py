"""Every PEFT method on the demo task: trainable parameters, step time, step memory, loss.

Run: ``python -m benchmarks.bench_methods`` (or ``jaxpeft bench methods``). A small reference LM
is pretrained on the "animals" text, then each method adapts it to "recipes" for the same
number of steps (AdamW, warmup + cosine, the same batches). Step times are the median of
timed steps after compilation, measured method after method in one process (ratios to full
fine-tuning are the figures to read); memory is XLA's analysis of the compiled step. The
table is written to ``benchmarks/results/methods.md`` and into ``docs/methods.md``.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft as jp
from benchmarks.common import block, compiled_memory, machine, write
from jaxpeft.demo import data
from jaxpeft.models import LinenLM, LMConfig

BATCH, SEQ = 16, 64
DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "methods.md"
START, END = "<!-- methods-table:start -->", "<!-- methods-table:end -->"


def methods(config: LMConfig) -> dict[str, object]:
    """Name -> a transform, or a selector for the partition-only methods."""
    return {
        "full fine-tuning": True,
        "LoRA r=8 (all linear)": jp.lora(8, 16, targets=r"(query|key|value|out|up|down)$"),
        "LoRA r=8 (query, value)": jp.lora(8, 16, targets=r"attn/(query|value)$"),
        "DoRA r=8 (all linear)": jp.dora(8, 16, targets=r"(query|key|value|out|up|down)$"),
        "LoKr (all linear)": jp.lokr(factor=-1, rank=8, targets=r"(query|key|value|out|up|down)$"),
        "IA3 (key, value, ff)": jp.ia3(),
        "Houlsby adapters (m=32)": jp.houlsby(32),
        "Pfeiffer adapter (m=32)": jp.pfeiffer(32),
        "Compacter (n=4, m=32)": jp.compacter(4, bottleneck=32),
        "prompt tuning (20 tokens)": jp.prompt_tuning(20, init="vocab", vocab_size=config.vocab_size),
        "P-tuning (20 tokens, MLP)": jp.p_tuning(20),
        "prefix tuning (16)": jp.prefix_tuning(16),
        "BitFit (biases)": r"bias$",
        "LayerNorm tuning": r"norm_\w+/scale$",
        "linear probe (head)": r"^head/",
    }


def pretrain(model, config, steps: int, say) -> dict:
    params = model.init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"]
    opt = optax.adamw(jp.warmup_cosine(3e-3, steps), weight_decay=0.01)
    everything, nothing = jp.partition(params, True)

    def loss_fn(t, f, b, rng):
        return jp.cross_entropy(model.apply({"params": jp.combine(t, f)}, b["inputs"]), b["targets"])[0]

    step = jp.make_train_step(loss_fn, opt)
    result = jp.fit(step, everything, nothing, opt.init(everything), data.batches("animals", BATCH, SEQ, 0),
                    num_steps=steps, rng=None, progress=False)
    say(f"pretrained {steps} steps on 'animals' in {result.seconds:.0f} s")
    return result.trainable


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_methods")
    p.add_argument("--steps", type=int, default=80, help="adaptation steps per method")
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: checks the script runs")
    args = p.parse_args(argv)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    vocab = data.CharTokenizer().vocab_size
    if args.quick:
        config, steps, pre = LMConfig.tiny(vocab_size=vocab, max_seq_len=96), 3, 3
    else:
        config, steps, pre = LMConfig.small(vocab_size=vocab, max_seq_len=96), args.steps, args.pretrain_steps
    model = LinenLM(config)
    base = pretrain(model, config, pre, say)
    train_batches = [next(it) for it in [data.batches("recipes", BATCH, SEQ, 1)] for _ in range(steps)]
    evals = data.eval_set("recipes", 4, BATCH, SEQ)
    rows = []
    for name, method in methods(config).items():
        if isinstance(method, (str, bool)):
            apply_fn, params, selector = (lambda p, x: model.apply({"params": p}, x)), base, method
        else:
            peft_model, params = jp.apply(method, model, jax.random.key(1), train_batches[0]["inputs"], params=base)
            apply_fn, selector = peft_model.apply, peft_model.trainable
        trainable, frozen = jp.partition(params, selector)
        counts = jp.summary(params, selector)

        def loss_fn(t, f, b, rng, apply_fn=apply_fn):
            return jp.cross_entropy(apply_fn(jp.combine(t, f), b["inputs"]), b["targets"])[0]

        opt = optax.adamw(jp.warmup_cosine(3e-3 if selector is True else 1e-2, steps), weight_decay=0.0)
        state = opt.init(trainable)
        raw = jp.make_train_step(loss_fn, opt, jit=False)
        memory = compiled_memory(lambda t, s, f: raw(t, f, s, train_batches[0], None), trainable, state, frozen)
        step = jp.make_train_step(loss_fn, opt, donate=False)
        evaluate = jax.jit(loss_fn)
        times = []
        for i, batch in enumerate(train_batches):
            t0 = time.perf_counter()
            trainable, state, _ = block(step(trainable, frozen, state, batch, None))
            if i >= 2:  # after compilation
                times.append(time.perf_counter() - t0)
        loss = float(np.mean([evaluate(trainable, frozen, b, None) for b in evals]))
        rows.append({"method": name, "trainable_params": counts.trainable_params,
                     "trainable_percent": 100 * counts.trainable_fraction,
                     "step_seconds": statistics.median(times) if times else float("nan"),
                     "peak_bytes": memory.get("peak_bytes"), "loss": loss})
        say(f"{name:<28} trainable {counts.trainable_params:>9,}  loss {loss:.3f}")
    full = rows[0]
    base_loss = float(np.mean([jax.jit(lambda b: jp.cross_entropy(model.apply({"params": base}, b["inputs"]),
                                                                   b["targets"])[0])(b) for b in evals]))
    table = (
        f"Reference LM ({config.num_layers} layers, d_model {config.d_model}, {full['trainable_params']:,} parameters) "
        f"pretrained {pre} steps on 'animals', then adapted to 'recipes' for {steps} steps per method (batch {BATCH} x "
        f"{SEQ}, AdamW, warmup + cosine, lr 1e-2 for PEFT / 3e-3 full). Held-out 'recipes' loss of the base before "
        f"adaptation: {base_loss:.3f}. Step time: median of the timed steps after compilation; memory: XLA's analysis "
        "of the compiled step.\n\n"
        "| method | trainable params | % | step time | vs full | step memory | loss after |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.3f}% | "
            f"{1e3 * r['step_seconds']:.1f} ms | {r['step_seconds'] / full['step_seconds']:.2f}x | "
            f"{(r['peak_bytes'] or 0) / 2**20:.1f} MiB | {r['loss']:.3f} |"
            for r in rows
        )
    )
    payload = {"machine": machine(), "config": {k: str(v) for k, v in vars(config).items()}, "steps": steps,
               "pretrain_steps": pre, "base_loss": base_loss, "rows": rows}
    write("methods", payload, table, save=not args.quick)
    if not args.quick and DOCS.exists():
        text = DOCS.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        m = payload["machine"]
        stamp = f"Measured {m['date']} on {m['device']} ({m['cpu_count']} cores), jax {m['jax']}.\n\n"
        DOCS.write_text(f"{head}{START}\n{stamp}{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
