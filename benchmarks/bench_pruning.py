"""Pruning on the reference LMs: mask cost, masked-training overhead, and loss after pruning.

Run: ``python -m benchmarks.bench_pruning`` (``--quick``: a tiny model, checks the script runs).

1. Mask computation, jitted, on the benchmark LM's kernels (LMConfig.bench, ~19M weights):
   ``magnitude_mask`` global / per layer and ``nm_mask`` 2:4, median of a few calls.
2. A full fine-tuning step of the benchmark LM with AdamW against ``masked_updates(AdamW)``,
   timed round-robin, and the optimizer state each holds.
3. LMConfig.small pretrained briefly on the demo's "animals" text, pruned at several sparsities
   (global, per layer, 2:4), held-out loss right after pruning and after a short masked
   fine-tuning with AdamW (weight decay on), with the pruned weights checked to be exactly zero.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft as jp
from benchmarks.common import interleaved_medians, machine, write
from jaxpeft import train
from jaxpeft.demo import data
from jaxpeft.models import LinenLM, LMConfig
from jaxpeft.optim import warmup_cosine
from jaxpeft.pruning import apply_mask, magnitude_mask, mask_sparsity, masked_updates, nm_mask


def lm_loss(model):
    def loss_fn(trainable, frozen, batch, rng):
        return jp.cross_entropy(model.apply({"params": jp.combine(trainable, frozen)}, batch["inputs"]),
                                batch["targets"])[0]

    return loss_fn


def _argsort_mask(params):
    leaves = [w for p, w in jp.leaves_with_paths(params) if p.endswith("kernel")]
    scores = jnp.concatenate([jnp.abs(w).ravel() for w in leaves])
    keep = scores.size - round(0.5 * scores.size)
    return jnp.zeros(scores.shape, bool).at[jnp.argsort(-scores, stable=True)[:keep]].set(True)


def _argsort_nm(params):
    out = []
    for p, w in jp.leaves_with_paths(params):
        if p.endswith("kernel"):
            groups = jnp.abs(jnp.moveaxis(w, 0, -1)).reshape(w.shape[1], -1, 4)
            out.append(jnp.argsort(jnp.argsort(-groups, axis=-1, stable=True), axis=-1, stable=True) < 2)
    return out


def mask_costs(config, repeats):
    params = LinenLM(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    fns = {
        "magnitude_mask 50% global": jax.jit(lambda p: magnitude_mask(p, 0.5)),
        "magnitude_mask 50% per_layer": jax.jit(lambda p: magnitude_mask(p, 0.5, scope="per_layer")),
        "nm_mask 2:4": jax.jit(lambda p: nm_mask(p, 2, 4)),
        "apply_mask": jax.jit(apply_mask),
        # What magnitude_mask replaced: a stable argsort of every |w| (same mask, kept for the figure).
        "reference: argsort of all |w| (not used)": jax.jit(_argsort_mask),
        "reference: two in-group argsorts for 2:4 (not used)": jax.jit(_argsort_nm),
    }
    mask = fns["magnitude_mask 50% global"](params)
    calls = {name: (lambda f=f: f(params)) for name, f in fns.items() if name != "apply_mask"}
    calls["apply_mask"] = lambda: fns["apply_mask"](params, mask)
    seconds = interleaved_medians(calls, repeats, warmup=1)
    targeted = sum(np.size(m) for m in jax.tree.leaves(mask) if np.ndim(m) > 0)
    reference = fns["reference: argsort of all |w| (not used)"](params)
    ours = jnp.concatenate([m.ravel() for m in jax.tree.leaves(mask) if np.ndim(m) > 0])
    assert bool(jnp.array_equal(reference, ours)), "magnitude_mask disagrees with the argsort reference"
    return targeted, seconds


def step_overhead(config, batch_size, seq, repeats):
    model = LinenLM(config)
    tokens = jax.random.randint(jax.random.key(0), (batch_size, seq + 1), 0, config.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    params = model.init(jax.random.key(1), batch["inputs"])["params"]
    mask = magnitude_mask(params, 0.5)
    trainable, frozen = jp.partition(apply_mask(params, mask), True)
    out = {}
    runs = {}
    for name, opt in (("AdamW", optax.adamw(1e-4, weight_decay=0.01)),
                      ("masked_updates(AdamW), 50% of kernels pruned",
                       masked_updates(optax.adamw(1e-4, weight_decay=0.01), mask))):
        state = opt.init(trainable)
        step = jp.make_train_step(lm_loss(model), opt, donate=False)
        runs[name] = lambda step=step, state=state: step(trainable, frozen, state, batch, None)
        out[name] = {"optimizer_state_bytes": jp.state_bytes(state)}
    for name, s in interleaved_medians(runs, repeats).items():
        out[name]["step_seconds"] = s
    return out


def quality(args, say):
    vocab = data.CharTokenizer().vocab_size
    config = LMConfig.tiny(vocab_size=vocab, max_seq_len=args.seq) if args.quick else \
        LMConfig.small(vocab_size=vocab, max_seq_len=args.seq)
    model = LinenLM(config)
    loss_fn = lm_loss(model)
    init = model.init(jax.random.key(0), jnp.zeros((1, args.seq), jnp.int32))["params"]
    evals = data.eval_set("animals", 4, 32, args.seq)
    eval_step = train.make_eval_step(
        lambda p, _, b: {"loss": jp.cross_entropy(model.apply({"params": p}, b["inputs"]), b["targets"])[0]}
    )

    def held_out(params):
        return train.evaluate(eval_step, params, None, evals)["loss"]

    def fit(params, opt, steps, seed):
        trainable, frozen = jp.partition(jax.tree.map(jnp.array, params), True)
        step = train.make_train_step(loss_fn, opt)
        result = train.fit(step, trainable, frozen, opt.init(trainable),
                           data.batches("animals", args.batch, args.seq, seed), num_steps=steps, rng=None,
                           progress=False)
        return result.trainable

    schedule = warmup_cosine(3e-3, args.pretrain_steps, warmup_steps=0.05)
    dense = fit(init, optax.adamw(schedule, weight_decay=0.01, mask=jp.decay_mask), args.pretrain_steps, 0)
    dense_loss = held_out(dense)
    say(f"dense {config.num_layers}x{config.d_model} LM after {args.pretrain_steps} steps: "
        f"held-out loss {dense_loss:.3f}")
    rows = []
    recipes = [(f"{int(100 * s)}% {scope}", lambda p, s=s, scope=scope: magnitude_mask(p, s, scope=scope))
               for s in args.sparsities for scope in ("global", "per_layer")]
    recipes.append(("2:4 (50%)", lambda p: nm_mask(p, 2, 4)))
    for name, make_mask in recipes:
        mask = make_mask(dense)
        pruned = apply_mask(dense, mask)
        schedule = warmup_cosine(1e-3, args.finetune_steps, warmup_steps=0.05)
        opt = masked_updates(optax.adamw(schedule, weight_decay=0.01, mask=jp.decay_mask), mask)
        tuned = fit(pruned, opt, args.finetune_steps, 1)
        zeros_kept = all(
            bool(np.all(np.asarray(w)[~np.asarray(m)] == 0.0))
            for m, w in zip(jax.tree.leaves(mask), jax.tree.leaves(tuned)) if np.ndim(m) > 0
        )
        row = {"recipe": name, "sparsity": mask_sparsity(mask), "loss_pruned": held_out(pruned),
               "loss_finetuned": held_out(tuned), "pruned_weights_exactly_zero": zeros_kept}
        say(f"  {name:<16} sparsity {row['sparsity']:.4f}  loss pruned {row['loss_pruned']:.3f}  "
            f"after {args.finetune_steps} masked steps {row['loss_finetuned']:.3f}  zeros kept: {zeros_kept}")
        rows.append(row)
    return {"config": f"{config.num_layers} layers, d_model {config.d_model}, d_ff {config.d_ff}",
            "dense_loss": dense_loss, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_pruning")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: checks the script runs")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.repeats, args.sparsities = 5, 3, 2, [0.5]
    say = lambda *a: print(*a, flush=True)  # noqa: E731

    load_before = os.getloadavg()[0]
    big = LMConfig.tiny() if args.quick else LMConfig.bench()
    targeted, seconds = mask_costs(big, args.repeats)
    say(f"mask costs on {targeted:,} kernel weights: " + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in seconds.items()))
    steps = step_overhead(big, 8, min(128, big.max_seq_len), args.repeats)
    say(f"train steps: {steps}")
    q = quality(args, say)

    full = steps["AdamW"]["step_seconds"]
    load = (load_before, os.getloadavg()[0])
    table = [
        f"1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (a shared machine: "
        "read times as ratios within one table, measured round-robin).\n",
        f"## Mask computation (jitted, median of {args.repeats}), {targeted:,} kernel weights of the benchmark LM "
        f"({big.num_layers} layers, d_model {big.d_model})\n",
        "| call | time |", "|---|---:|",
        *[f"| {k} | {1e3 * v:.0f} ms |" for k, v in seconds.items()],
        f"\n## Full fine-tuning step, benchmark LM, batch 8 x {min(128, big.max_seq_len)} (median of {args.repeats}, "
        "round-robin)\n",
        "| optimizer | step time | vs AdamW | optimizer state |", "|---|---:|---:|---:|",
        *[f"| {k} | {1e3 * v['step_seconds']:.0f} ms | {v['step_seconds'] / full:.2f}x | "
          f"{v['optimizer_state_bytes'] / 2**20:.2f} MiB |" for k, v in steps.items()],
        f"\n## Held-out loss after pruning ({q['config']}, {args.pretrain_steps} steps on 'animals', batch "
        f"{args.batch} x {args.seq}; dense loss {q['dense_loss']:.3f})\n",
        f"Masked fine-tuning: {args.finetune_steps} steps of masked_updates(AdamW, weight decay 0.01). "
        "Targets: every kernel (attention, MLP, head).\n",
        "| recipe | sparsity of kernels | loss after pruning | after masked fine-tuning | pruned weights exactly 0 |",
        "|---|---:|---:|---:|---|",
        *[f"| {r['recipe']} | {r['sparsity']:.4f} | {r['loss_pruned']:.3f} | {r['loss_finetuned']:.3f} | "
          f"{r['pruned_weights_exactly_zero']} |" for r in q["rows"]],
    ]
    payload = {"machine": machine(), "load_average": load, "args": vars(args), "mask_seconds": seconds, "targeted_weights": targeted,
               "steps": steps, "quality": q}
    if args.quick:
        print("\n".join(table))  # a smoke run: nothing written to results/
    else:
        write("pruning", payload, "\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
