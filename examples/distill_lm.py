"""Distil a larger reference LM into a smaller one, or into a LoRA student of itself.

``--student small`` (default): pretrain a teacher (LMConfig.small: 4 layers, d_model 128) on the
demo's "animals" text, then train a student about 8x smaller (2 layers, d_model 64) from the same
initialization, on the same batches, for the same steps, twice: with plain cross-entropy and with
``alpha * distillation + (1 - alpha) * cross-entropy`` against the teacher. Prints held-out loss,
accuracy and KL to the teacher before and after.

``--student lora``: LoRA-adapt the pretrained teacher to "recipes", once with cross-entropy and
once with distillation toward its own base (the same parameters with the adapters off: a free
teacher), and print what each keeps of "animals".

Everything is generated on the spot; about a minute or two on 2 CPU cores with the defaults.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import optax

import jaxpeft as jp
from jaxpeft import train
from jaxpeft.demo import data
from jaxpeft.distill import distillation_loss, make_distillation_loss
from jaxpeft.models import LinenLM, LMConfig
from jaxpeft.optim import warmup_cosine


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", choices=["small", "lora"], default="small")
    p.add_argument("--teacher-steps", type=int, default=250, help="teacher pretraining steps (default 250)")
    p.add_argument("--steps", type=int, default=None, help="student training steps (default 300 small, 200 lora)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the distillation term (default 0.9 for small, 0.5 for lora)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank for --student lora")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--results", action="store_true",
                   help="also write benchmarks/results/distill_lm_<student>.{json,md} (date, machine, versions)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 300 if args.student == "small" else 200
    if min(args.teacher_steps, args.steps, args.batch, args.seq, args.rank) <= 0:
        p.error("steps, batch, seq and rank must be positive")
    if args.alpha is None:
        args.alpha = 0.9 if args.student == "small" else 0.5
    return args


def cross_entropy_loss(apply_fn):
    def loss_fn(trainable, frozen, batch, rng):
        loss, metrics = jp.cross_entropy(apply_fn(trainable, frozen, batch["inputs"]), batch["targets"])
        return loss, {"accuracy": metrics["accuracy"]}

    return loss_fn


def run(loss_fn, trainable, frozen, batches, args, lr, say, what):
    """``args.steps`` (or ``steps``) of AdamW with a warmup-cosine schedule; the trained tree."""
    steps = args.steps if what != "teacher" else args.teacher_steps
    schedule = warmup_cosine(lr, steps, warmup_steps=0.05)
    opt = optax.adamw(schedule, weight_decay=0.01, mask=jp.decay_mask)
    step = train.make_train_step(loss_fn, opt, has_aux=True, learning_rate=schedule)
    t = time.perf_counter()
    result = train.fit(step, trainable, frozen, opt.init(trainable), batches, num_steps=steps, rng=None,
                       progress=not args.no_progress, log_every=50)
    say(f"  {what}: {steps} steps in {time.perf_counter() - t:.1f} s")
    return result.trainable


def eval_metrics(student_fn, teacher_fn, temperature):
    """``metric_fn(params, teacher_params, batch)``: held-out cross-entropy, accuracy and the
    distillation loss (at ``temperature``) to the teacher."""

    def metric_fn(params, teacher_params, batch):
        logits = student_fn(params, batch["inputs"])
        _, metrics = jp.cross_entropy(logits, batch["targets"])
        kd = distillation_loss(logits, teacher_fn(teacher_params, batch["inputs"]), temperature=temperature)
        return {"loss": metrics["loss"], "accuracy": metrics["accuracy"], "distillation": kd}

    return metric_fn


def row(name, m):
    return (f"  {name:<56} loss {m['loss']:.3f}   accuracy {100 * m['accuracy']:5.1f}%   "
            f"distillation loss to teacher {m['distillation']:.4f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    vocab = data.CharTokenizer().vocab_size
    teacher_config = LMConfig.small(vocab_size=vocab, max_seq_len=args.seq)
    teacher = LinenLM(teacher_config)
    example = jnp.zeros((1, args.seq), jnp.int32)
    init = teacher.init(jax.random.key(args.seed), example)["params"]
    say(f"teacher: {teacher_config.num_layers} layers, d_model {teacher_config.d_model}, "
        f"{sum(x.size for x in jax.tree.leaves(init)):,} parameters; pretraining on 'animals'")
    everything, nothing = jp.partition(init, True)
    teacher_params = run(
        cross_entropy_loss(lambda t, f, x: teacher.apply({"params": t}, x)), everything, nothing,
        data.batches("animals", args.batch, args.seq, args.seed), args, 3e-3, say, "teacher",
    )
    teacher_fn = lambda p, x: teacher.apply({"params": p}, x)  # noqa: E731
    evals = {d: data.eval_set(d, 4, 32, args.seq) for d in data.DOMAINS}

    def score(student_fn, params, domain):
        # The teacher's parameters go in as an argument, not as constants closed over by the jit.
        step = train.make_eval_step(eval_metrics(student_fn, teacher_fn, args.temperature))
        return train.evaluate(step, params, teacher_params, evals[domain])

    distil = distil_small if args.student == "small" else distil_lora
    header, rows = distil(args, teacher_params, teacher, score, say)
    lines = []
    for domain in dict.fromkeys(d for d, _, _ in rows):
        lines.append(f"\nheld-out '{domain}' text (loss in nats per character)")
        lines += [row(name, m) for d, name, m in rows if d == domain]
    say("\n".join(lines))
    seconds = time.perf_counter() - t0
    say(f"\ndone in {seconds:.1f} s")
    if args.results:
        write_results(args, header, rows, seconds)
    return 0


def write_results(args, header, rows, seconds):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root
    from benchmarks.common import machine, write

    table = [
        f"`python examples/distill_lm.py --student {args.student} --results`: {header}; teacher "
        f"pretrained {args.teacher_steps} steps, students {args.steps} steps, batch {args.batch} x {args.seq}, "
        f"T={args.temperature}, alpha={args.alpha}, seed {args.seed}; one run, {seconds:.0f} s in all.\n",
        "| held-out text | model | loss | accuracy | distillation loss to the teacher |",
        "|---|---|---:|---:|---:|",
        *[f"| {d} | {name} | {m['loss']:.3f} | {100 * m['accuracy']:.1f}% | {m['distillation']:.4f} |"
          for d, name, m in rows],
    ]
    payload = {"machine": machine(), "args": vars(args), "seconds": seconds,
               "rows": [{"domain": d, "model": name, **m} for d, name, m in rows]}
    write(f"distill_lm_{args.student}", payload, "\n".join(table))


def distil_small(args, teacher_params, teacher, score, say):
    config = teacher.config.replace(d_model=64, num_layers=2, d_ff=256)
    student = LinenLM(config)
    init = student.init(jax.random.key(args.seed + 1), jnp.zeros((1, args.seq), jnp.int32))["params"]
    n_teacher = sum(x.size for x in jax.tree.leaves(teacher_params))
    n_student = sum(x.size for x in jax.tree.leaves(init))
    say(f"\nstudent: {config.num_layers} layers, d_model {config.d_model}, {n_student:,} parameters "
        f"({n_teacher / n_student:.1f}x fewer); {args.steps} steps each, same init and batches")
    student_apply = lambda p, x: student.apply({"params": p}, x)  # noqa: E731

    def batches():
        return data.batches("animals", args.batch, args.seq, args.seed + 7)

    plain = run(cross_entropy_loss(lambda t, f, x: student_apply(t, x)), jax.tree.map(jnp.array, init), None,
                batches(), args, 3e-3, say, "student, cross-entropy only")
    loss_fn = make_distillation_loss(
        lambda t, f, batch, rng: student_apply(t, batch["inputs"]),
        lambda f, batch: teacher.apply({"params": f["teacher"]}, batch["inputs"]),
        temperature=args.temperature,
        alpha=args.alpha,
    )
    distilled = run(loss_fn, jax.tree.map(jnp.array, init), {"teacher": teacher_params}, batches(), args, 3e-3,
                    say, f"student, distilled (T={args.temperature}, alpha={args.alpha})")

    rows = [("animals", "teacher", score(lambda p, x: teacher.apply({"params": p}, x), teacher_params, "animals"))]
    for name, params in (("student at init", init), ("student, cross-entropy only", plain),
                         (f"student, distilled (T={args.temperature}, alpha={args.alpha})", distilled)):
        rows.append(("animals", name, score(student_apply, params, "animals")))
    header = (f"teacher {teacher.config.num_layers} layers d_model {teacher.config.d_model} "
              f"({n_teacher:,} parameters), student {config.num_layers} layers d_model {config.d_model} "
              f"({n_student:,})")
    return header, rows


def distil_lora(args, teacher_params, teacher, score, say):
    example = jnp.zeros((1, args.seq), jnp.int32)
    peft = jp.lora(args.rank, 2.0 * args.rank, targets=r"(query|key|value|out|up|down)$")
    peft_model, params = jp.apply(peft, teacher, jax.random.key(args.seed + 1), example, params=teacher_params)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    say(f"\nLoRA r={args.rank} student of the teacher itself, trained on 'recipes' for {args.steps} steps: "
        f"{jp.summary(params, peft_model.trainable).trainable_params:,} trainable parameters")
    student_fn = lambda t, f, batch, rng: peft_model.apply(jp.combine(t, f), batch["inputs"])  # noqa: E731

    def batches():
        return data.batches("recipes", args.batch, args.seq, args.seed + 7)

    plain = run(cross_entropy_loss(lambda t, f, x: peft_model.apply(jp.combine(t, f), x)),
                jax.tree.map(jnp.array, trainable), frozen, batches(), args, 3e-3, say, "LoRA, cross-entropy only")
    loss_fn = make_distillation_loss(
        student_fn,
        lambda f, batch: peft_model.apply(f, batch["inputs"], adapters=False),  # the base: a free teacher
        temperature=args.temperature,
        alpha=args.alpha,
    )
    distilled = run(loss_fn, jax.tree.map(jnp.array, trainable), frozen, batches(), args, 3e-3, say,
                    f"LoRA + distillation toward its base (T={args.temperature}, alpha={args.alpha})")
    apply = lambda p, x: peft_model.apply(p, x)  # noqa: E731
    rows = []
    for domain in data.DOMAINS:
        rows.append((domain, "base model (the teacher)", score(apply, params, domain)))
        rows.append((domain, "LoRA, cross-entropy only", score(apply, jp.combine(plain, frozen), domain)))
        rows.append((domain, f"LoRA + distillation toward its base (T={args.temperature}, alpha={args.alpha})",
                     score(apply, jp.combine(distilled, frozen), domain)))
    header = (f"LoRA r={args.rank} on every linear layer of a {teacher.config.num_layers}-layer d_model "
              f"{teacher.config.d_model} LM pretrained on 'animals', adapted to 'recipes'")
    return header, rows


if __name__ == "__main__":
    sys.exit(main())
