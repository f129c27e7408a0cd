"""WiSE-FT on the demo task: the alpha curve on both domains, and what ensembling costs.

Run: ``python -m benchmarks.bench_ensembling`` (or ``jaxpeft bench ensembling``); about 2 to 3
minutes on 2 CPU cores. The reference LM (``LMConfig.small``, character level) is pretrained
on "animals", then fine-tuned on "recipes" twice: all weights (full fine-tuning) and LoRA r=8.
WiSE-FT mixes each with the pretrained model at 11 alphas (full: ``wise_ft`` on all weights;
LoRA: ``wise_ft_adapter``, which scales the update) and evaluates loss / perplexity / accuracy
on held-out text of both domains. Alpha is picked on separate validation text (maximum mean
accuracy of the two domains) and reported on the test text.

Timings (medians of interleaved repeats): ``wise_ft`` on a full parameter tree (the demo
model and the 19.5M-parameter ``LMConfig.bench``), against the bare jitted mix and an eager
``tree_map``; a 2-model output ensemble in one jitted call against the two models run one
after the other; a 2-adapter ensemble (vmap) against two calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft as jp
from benchmarks.common import RESULTS, interleaved_medians, machine, write
from jaxpeft import optim, train
from jaxpeft.demo import data
from jaxpeft.ensembling import (
    _interpolate,
    adapter_ensemble,
    alpha_sweep,
    output_ensemble,
    pick_alpha,
    plot_alpha_sweep,
    wise_ft,
    wise_ft_adapter,
)
from jaxpeft.losses import cross_entropy
from jaxpeft.models import LinenLM, LMConfig

TARGETS = r"(query|key|value|out|up|down)$"


def _fit(loss_apply, params, selector, lr, steps, domain, seed, batch, seq):
    """Train the ``selector`` part of ``params`` on ``domain`` text; return the full params."""
    trainable, frozen = jp.partition(params, selector)
    schedule = optim.warmup_cosine(lr, steps)
    opt = optax.adamw(schedule, weight_decay=0.0)

    def loss_fn(t, f, b, rng):
        loss, metrics = cross_entropy(loss_apply(jp.combine(t, f), b["inputs"]), b["targets"])
        return loss, {"accuracy": metrics["accuracy"]}

    step = train.make_train_step(loss_fn, opt, has_aux=True, learning_rate=schedule)
    copy = jax.tree.map(lambda x: None if x is None else jnp.array(x, copy=True), trainable,
                        is_leaf=lambda x: x is None)  # the step donates its input
    result = train.fit(step, copy, frozen, opt.init(copy), data.batches(domain, batch, seq, seed),
                       num_steps=steps, rng=None, progress=False)
    return jp.combine(result.trainable, frozen), result.seconds


def _evaluator(apply_fn):
    step = train.make_eval_step(lambda p, _, b: cross_entropy(apply_fn(p, b["inputs"]), b["targets"])[1])

    def evaluate(params, batches):
        m = train.evaluate(step, params, None, batches)
        return {"loss": m["loss"], "ppl": math.exp(m["loss"]), "accuracy": m["accuracy"]}

    return evaluate


def _pick(table, val_sets, test_sets):
    """Alpha with the best mean validation accuracy over the domains, and its test rows."""
    mean_rows = []
    for alpha in dict.fromkeys(r["alpha"] for r in table):
        accs = [r["accuracy"] for r in table if r["alpha"] == alpha and r["set"] in val_sets]
        mean_rows.append({"alpha": alpha, "set": "val_mean", "accuracy": float(np.mean(accs))})
    alpha = pick_alpha(mean_rows, "val_mean", "accuracy", "max")
    return alpha, {r["set"]: r for r in table if r["alpha"] == alpha and r["set"] in test_sets}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_ensembling")
    p.add_argument("--pretrain-steps", type=int, default=250)
    p.add_argument("--full-steps", type=int, default=100, help="full fine-tuning steps on 'recipes'")
    p.add_argument("--lora-steps", type=int, default=100, help="LoRA r=8 fine-tuning steps on 'recipes'")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, a few steps: checks the script runs (writes nothing)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    batch, seq = (8, 32) if args.quick else (32, 64)
    vocab = data.CharTokenizer().vocab_size
    config = (LMConfig.tiny if args.quick else LMConfig.small)(vocab_size=vocab, max_seq_len=seq)
    steps = (5, 5, 5) if args.quick else (args.pretrain_steps, args.full_steps, args.lora_steps)
    repeats = 2 if args.quick else args.repeats
    n_eval = 1 if args.quick else 8

    test_sets = {d: data.eval_set(d, n_eval, batch, seq, seed=10_000) for d in data.DOMAINS}
    val_sets = {f"{d}_val": data.eval_set(d, max(1, n_eval // 2), batch, seq, seed=20_000) for d in data.DOMAINS}
    model = LinenLM(config)
    apply_base = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    init = model.init(jax.random.key(args.seed), jnp.zeros((1, seq), jnp.int32))["params"]

    base, t_pre = _fit(apply_base, init, True, 3e-3, steps[0], "animals", args.seed, batch, seq)
    full, t_full = _fit(apply_base, base, True, 1e-3, steps[1], "recipes", args.seed + 2, batch, seq)
    peft = jp.lora(8, 16, targets=TARGETS)
    peft_model, lora_init = jp.apply(peft, model, jax.random.key(args.seed + 1), test_sets["recipes"][0]["inputs"],
                                     params=base)
    lora, t_lora = _fit(peft_model.apply, lora_init, peft_model.trainable, 3e-3, steps[2], "recipes",
                        args.seed + 2, batch, seq)
    print(f"trained: pretrain {t_pre:.1f} s, full fine-tune {t_full:.1f} s, LoRA {t_lora:.1f} s", flush=True)

    # ---- alpha sweeps ------------------------------------------------------------------
    alphas = np.round(np.linspace(0.0, 1.0, 11), 2)
    sets = {**test_sets, **val_sets}
    t0 = time.perf_counter()
    full_table = alpha_sweep(_evaluator(apply_base), base, full, alphas, sets)
    lora_table = alpha_sweep(_evaluator(peft_model.apply), None, lora, alphas, sets)
    t_sweep = time.perf_counter() - t0
    picks = {"full": _pick(full_table, val_sets, test_sets), "lora": _pick(lora_table, val_sets, test_sets)}
    plot_rows = [
        {**r, "set": f"{name}: {r['set']}"}
        for name, table in (("full FT", full_table), ("LoRA", lora_table))
        for r in table
        if r["set"] in test_sets
    ]

    # ---- timings -----------------------------------------------------------------------
    timing_rows = []
    trees = [("demo model", base, full)]
    if not args.quick:
        bench_model = LinenLM(LMConfig.bench())
        tokens = jnp.zeros((1, 16), jnp.int32)
        big_zs = bench_model.init(jax.random.key(1), tokens)["params"]
        big_ft = bench_model.init(jax.random.key(2), tokens)["params"]
        trees.append(("LMConfig.bench", big_zs, big_ft))
    for label, zs, ft in trees:
        n = sum(x.size for x in jax.tree.leaves(zs))
        half = jnp.float32(0.5)
        fns = {
            "wise_ft (checks + jitted mix)": lambda zs=zs, ft=ft: wise_ft(zs, ft, 0.5),
            "jitted mix alone": lambda zs=zs, ft=ft: _interpolate(zs, ft, half),
            "eager tree_map": lambda zs=zs, ft=ft: jax.tree.map(lambda a, b: (1 - half) * a + half * b, zs, ft),
        }
        seconds = interleaved_medians(fns, repeats)
        for name, s in seconds.items():
            timing_rows.append({"what": f"{name}, {label} ({n / 1e6:.2f}M params)", "seconds": s,
                                "GB_per_s": 3 * 4 * n / s / 1e9})

    x = test_sets["recipes"][0]["inputs"]
    single = jax.jit(apply_base)
    two_models = output_ensemble([apply_base, apply_base], mode="probs")
    avg = jax.jit(lambda a, b: 0.5 * (jax.nn.softmax(a) + jax.nn.softmax(b)))
    trainable, frozen = jp.partition(lora, peft_model.trainable)
    adapters = [wise_ft_adapter(trainable, 0.5), trainable]
    lora_apply = jax.jit(lambda a, f, x: peft_model.apply(jp.combine(a, f), x))
    two_adapters = adapter_ensemble(lambda a, f, x: peft_model.apply(jp.combine(a, f), x), mode="probs")
    two_adapters_loop = adapter_ensemble(lambda a, f, x: peft_model.apply(jp.combine(a, f), x), mode="probs",
                                         strategy="loop")
    np.testing.assert_allclose(two_models([base, full], x), avg(single(base, x), single(full, x)), atol=1e-5)
    np.testing.assert_allclose(two_adapters(adapters, frozen, x),
                               avg(lora_apply(adapters[0], frozen, x), lora_apply(adapters[1], frozen, x)), atol=1e-5)
    fns = {
        "one model, one call": lambda: single(base, x),
        "2-model ensemble, one jitted call": lambda: two_models([base, full], x),
        "2 models one after the other (+ average)": lambda: avg(single(base, x), single(full, x)),
        "one LoRA model, one call": lambda: lora_apply(trainable, frozen, x),
        "2-adapter ensemble, vmap, one jitted call": lambda: two_adapters(adapters, frozen, x),
        "2-adapter ensemble, loop, one jitted call": lambda: two_adapters_loop(adapters, frozen, x),
        "2 adapters one after the other (+ average)": lambda: avg(lora_apply(adapters[0], frozen, x),
                                                                  lora_apply(adapters[1], frozen, x)),
    }
    for name, s in interleaved_medians(fns, repeats * 2).items():
        timing_rows.append({"what": f"{name} (batch {batch} x {seq}, probs)", "seconds": s})

    # ---- report ------------------------------------------------------------------------
    def sweep_md(table):
        lines = ["| alpha | animals loss | animals ppl | animals acc | recipes loss | recipes ppl | recipes acc |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for alpha in alphas:
            row = {r["set"]: r for r in table if r["alpha"] == float(alpha)}
            a, r = row["animals"], row["recipes"]
            lines.append(f"| {alpha:.1f} | {a['loss']:.3f} | {a['ppl']:.2f} | {100 * a['accuracy']:.1f}% | "
                         f"{r['loss']:.3f} | {r['ppl']:.2f} | {100 * r['accuracy']:.1f}% |")
        return "\n".join(lines)

    def pick_md(name):
        alpha, rows = picks[name]
        return (f"alpha picked on validation text (max mean accuracy of both domains): **{alpha:.1f}** -> test "
                f"accuracy animals {100 * rows['animals']['accuracy']:.1f}%, recipes "
                f"{100 * rows['recipes']['accuracy']:.1f}%")

    total = time.perf_counter() - t_start
    md = (
        f"Reference LM `LMConfig.small` ({config.num_layers} layers, d_model {config.d_model}, char vocab "
        f"{config.vocab_size}), batch {batch} x {seq}. Pretrained {steps[0]} steps on 'animals' "
        f"({t_pre:.0f} s); fine-tuned on 'recipes' {steps[1]} steps with all weights ({t_full:.0f} s) and "
        f"{steps[2]} steps with LoRA r=8 on {TARGETS!r} ({t_lora:.0f} s). Test text: {n_eval} batches per "
        f"domain; validation text: {max(1, n_eval // 2)} batches per domain (another seed). "
        f"Both sweeps (11 alphas x 4 sets) took {t_sweep:.1f} s; the whole script {total:.0f} s.\n\n"
        f"## WiSE-FT of full fine-tuning: `wise_ft(base, fine_tuned, alpha)`\n\n{sweep_md(full_table)}\n\n"
        f"{pick_md('full')}\n\n"
        f"## WiSE-FT of the LoRA update: `wise_ft_adapter(lora_params, alpha)`\n\n{sweep_md(lora_table)}\n\n"
        f"{pick_md('lora')}\n\n"
        f"![alpha sweep](ensembling_alpha_sweep.png)\n\n"
        "## Timings (median of interleaved repeats)\n\n| what | time | effective bandwidth |\n|---|---:|---:|\n"
        + "\n".join(f"| {r['what']} | {1e3 * r['seconds']:.2f} ms | "
                    f"{'%.1f GB/s' % r['GB_per_s'] if 'GB_per_s' in r else ''} |" for r in timing_rows)
        + "\n\nBandwidth counts 2 float32 trees read and 1 written. The machine was shared with other jobs "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the end): absolute times are noisy, "
        "the interleaved comparisons less so."
    )
    payload = {
        "machine": machine(),
        "config": {k: str(v) for k, v in dataclasses.asdict(config).items()},
        "batch": batch, "seq": seq, "steps": {"pretrain": steps[0], "full": steps[1], "lora": steps[2]},
        "lora": peft.config(), "alphas": [float(a) for a in alphas],
        "full_sweep": full_table, "lora_sweep": lora_table,
        "picked": {k: {"alpha": v[0], "test": v[1]} for k, v in picks.items()},
        "timings": timing_rows, "seconds_total": total,
        "load_average_1_5_15min_at_end": list(os.getloadavg()),
    }
    write("ensembling", payload, md, save=not args.quick)
    if not args.quick:
        plot_alpha_sweep(plot_rows, RESULTS / "ensembling_alpha_sweep.png", metrics=["loss", "accuracy"],
                         title="WiSE-FT on the demo task: 0 = pretrained on animals, 1 = fine-tuned on recipes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
