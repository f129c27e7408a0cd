"""Recipe: layer-wise learning-rate decay and early stopping on validation accuracy, on MiniLM.

Fine-tuning practice (ULMFiT's discriminative rates, Howard & Ruder 2018, https://arxiv.org/abs/1801.06146;
layer-wise LR decay as in ELECTRA / BEiT): lower layers hold more general features, so they get smaller
learning rates, ``lr_i = lr * decay ** (num_layers - 1 - i)``; the head gets ``lr``. Training stops
when validation accuracy has not improved for ``--patience`` evaluations, and the best checkpoint is
kept. The task is the demo's (Python docstrings by topic, docs/data.md).

Runs, at the same step budget: (a) one learning rate, all steps; (b) layer-wise decay, all steps;
(c) layer-wise decay with early stopping. Prints validation / test / shifted accuracy and steps used.

    python examples/layerwise_lr.py                 # MiniLM, a few minutes on 2 CPU cores
    python examples/layerwise_lr.py --tiny --steps 6  # a random tiny BERT: smoke test of the mechanics
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax

import jaxpeft as jp
from jaxpeft import train
from jaxpeft.demo import classify, run
from jaxpeft.demo.run import Task

TARGETS = r"attention/(query|key|value|output)$"


def layer_groups(num_layers: int, lr: float, decay: float) -> list[tuple[str, float]]:
    """``[(selector of layer i's leaves, lr * decay ** (num_layers - 1 - i)), ...]``, top layer first."""
    if not 0 < decay <= 1:
        raise ValueError(f"layer_groups: decay must be in (0, 1], got {decay}")
    return [(rf"(^|/)layer_{i}/", lr * decay ** (num_layers - 1 - i)) for i in reversed(range(num_layers))]


def run_one(task: Task, args, decay: float, early_stop: bool, say) -> dict:
    probe = task.splits["train"].take(2)
    peft_model, params = jp.apply(jp.lora(args.rank, 2.0 * args.rank, targets=TARGETS), task.model,
                                  jax.random.key(args.seed + 1), probe.tokens, probe.mask, params=task.base)
    trainable, frozen = jp.partition(params, [peft_model.trainable, r"^head/kernel$"])
    schedule = lambda peak: optim_schedule(peak, args.steps)  # noqa: E731
    groups = [(sel, schedule(lr)) for sel, lr in layer_groups(task.config.num_hidden_layers, args.lr, decay)]
    opt = jp.multi_lr(groups, lambda lr: optax.adamw(lr, weight_decay=0.0), default=schedule(args.lr))

    def loss_fn(trainable, frozen, batch, rng):
        logits = peft_model.apply(jp.combine(trainable, frozen), batch["tokens"], batch["mask"])
        return classify.cross_entropy_loss(logits, batch["labels"])

    def metric_fn(trainable, frozen, batch):
        logits = peft_model.apply(jp.combine(trainable, frozen), batch["tokens"], batch["mask"])
        loss, aux = classify.cross_entropy_loss(logits, batch["labels"])
        return {"loss": loss, "accuracy": aux["accuracy"]}, batch["labels"].shape[0]

    val = task.splits["validation"]
    eval_batches = [{"tokens": val.tokens[i:i + 64], "mask": val.mask[i:i + 64], "labels": val.labels[i:i + 64]}
                    for i in range(0, len(val), 64)]
    stopper = jp.EarlyStopping(metric="accuracy", mode="max", patience=args.patience) if early_stop else \
        jp.EarlyStopping(metric="accuracy", mode="max", patience=None)  # track the best, never stop
    step = train.make_train_step(loss_fn, opt, has_aux=True)
    start = jax.tree.map(jnp.copy, trainable)
    t = time.perf_counter()
    result = train.fit(step, start, frozen, opt.init(start),
                       classify.batches(task.splits["train"], args.batch_size, args.seed + 2),
                       num_steps=args.steps, rng=None, eval_step=train.make_eval_step(metric_fn),
                       eval_batches=eval_batches, eval_every=args.eval_every, early_stopping=stopper,
                       progress=not args.no_progress, tokens_per_batch=args.batch_size * args.seq_len)
    seconds = time.perf_counter() - t
    # Early stopping reports the best checkpoint; the no-stop runs report their last one.
    final = result.best_trainable if early_stop and result.best_trainable is not None else result.trainable
    params = jp.combine(final, frozen)
    fn = jax.jit(lambda p, tk, m: peft_model.apply(p, tk, m))
    acc = {s: classify.accuracy(classify.predict(fn, params, task.splits[s]), task.splits[s].labels)
           for s in ("validation", "test", "shifted")}
    layers = task.config.num_hidden_layers
    lrs = {f"layer_{i}": lr for i, (_, lr) in zip(reversed(range(layers)), layer_groups(layers, args.lr, decay))}
    return {"decay": decay, "early_stopping": early_stop, "steps_run": result.steps_run,
            "best_step": result.best_step, "stopped_early": result.stopped_early, "seconds": seconds,
            "accuracy": acc, "peak_lrs": lrs}


def optim_schedule(peak: float, steps: int):
    return jp.warmup_cosine(peak, steps)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--decay", type=float, default=0.7, help="layer-wise LR decay per layer (default 0.7)")
    p.add_argument("--lr", type=float, default=2e-3)
    args = run.add_recipe_arguments(p).parse_args(argv)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    task = Task(args.cache_dir, args.seq_len, args.tiny, say, random_tiny=args.tiny)
    runs = []
    for decay, early in ((1.0, False), (args.decay, False), (args.decay, True)):
        name = f"decay {decay:.2f}" + (", early stopping" if early else "")
        say(f"\n{name}")
        runs.append(run_one(task, args, decay, early, say))
    say(f"\nlayer-wise LR decay and early stopping, LoRA r={args.rank} + head, at most {args.steps} steps "
        f"(eval every {args.eval_every} on validation)")
    say("  run                              steps   validation     test   shifted")
    for r in runs:
        name = f"decay {r['decay']:.2f}" + (f", early stop (best @ {r['best_step']})" if r["early_stopping"] else "")
        a = r["accuracy"]
        say(f"  {name:<32} {r['steps_run']:5d}   {100 * a['validation']:8.1f}% {100 * a['test']:8.1f}% "
            f"{100 * a['shifted']:8.1f}%")
    out = {"command": "python examples/layerwise_lr.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "args": vars(args), "runs": runs}
    if args.results:
        run.save_results(args.results, out)
    return out


if __name__ == "__main__":
    main()
