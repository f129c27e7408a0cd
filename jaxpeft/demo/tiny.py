"""``jaxpeft demo --model tiny``: pretrain a small LM on one text domain, LoRA-adapt it to another.

Everything is generated here (no download). The base model is pretrained once on the
"animals" domain and cached; LoRA then adapts it to the "recipes" domain. The demo prints
the trainable fraction, the optimizer-state memory against full fine-tuning, loss /
perplexity / accuracy on both domains before and after, saves the adapter, restores it into
a freshly built base and shows the same numbers again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft as jp
from jaxpeft import checkpoint, ensembling, optim, train
from jaxpeft.demo import data
from jaxpeft.losses import cross_entropy
from jaxpeft.models import LinenLM, LMConfig

BATCH, SEQ = 32, 64
DEFAULT_TARGETS = r"(query|key|value|out|up|down)$"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jaxpeft demo --model tiny", description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--steps", type=int, default=200, help="LoRA fine-tuning steps (default 200)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak LoRA learning rate (default 3e-3)")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help=f"regex over layer paths (default {DEFAULT_TARGETS!r})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=300, help="base pretraining steps (default 300)")
    p.add_argument("--cache-dir", default=os.environ.get("JAXPEFT_CACHE", str(pathlib.Path.home() / ".cache" / "jaxpeft")))
    p.add_argument("--no-cache", action="store_true", help="pretrain the base again even when cached")
    p.add_argument("--out", default=None, help="where to save the adapter (default: a new temporary directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already saved at --out")
    p.add_argument("--quant", choices=("none", "nf4", "fp4", "int4", "int8"), default="none",
                   help="QLoRA: store the base kernels in this format (nf4: 4-bit NormalFloat with double quantization)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.rank <= 0 or args.steps <= 0 or args.pretrain_steps <= 0:
        p.error("--rank, --steps and --pretrain-steps must be positive")
    return args


def model_config() -> LMConfig:
    return dataclasses.replace(LMConfig.small(), vocab_size=data.CharTokenizer().vocab_size, max_seq_len=SEQ)


def lm_loss(apply_fn):
    """``loss_fn(trainable, frozen, batch, rng)`` for next-character prediction."""

    def loss_fn(trainable, frozen, batch, rng):
        logits = apply_fn(jp.combine(trainable, frozen), batch["inputs"], rng)
        loss, metrics = cross_entropy(logits, batch["targets"])
        return loss, {"accuracy": metrics["accuracy"]}

    return loss_fn


def evaluate(apply_fn, params, eval_batches) -> dict[str, float]:
    """Mean loss and accuracy over ``eval_batches``, and the perplexity ``exp(loss)``."""
    step = train.make_eval_step(lambda p, _, b: cross_entropy(apply_fn(p, b["inputs"], None), b["targets"])[1])
    metrics = train.evaluate(step, params, None, eval_batches)
    return {"loss": metrics["loss"], "ppl": math.exp(metrics["loss"]), "accuracy": metrics["accuracy"]}


def pretrain_base(config: LMConfig, args, say) -> dict:
    """Full training of the base on "animals", cached by config, steps and seed."""
    key = json.dumps([dataclasses.asdict(config), args.pretrain_steps, args.seed, BATCH, SEQ], default=str)
    cache = pathlib.Path(args.cache_dir) / f"demo_base_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    model = LinenLM(config)
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, SEQ), jnp.int32))["params"]
    treedef = jax.tree.structure(params)
    if cache.exists() and not args.no_cache:
        with np.load(cache) as f:
            leaves = [jnp.asarray(f[f"leaf_{i}"]) for i in range(treedef.num_leaves)]
        say(f"base model: loaded from cache {cache}")
        return jax.tree.unflatten(treedef, leaves)

    say(f"base model: pretraining on 'animals' for {args.pretrain_steps} steps (cached afterwards)")
    schedule = optim.warmup_cosine(3e-3, args.pretrain_steps)
    opt = optax.adamw(schedule, weight_decay=0.01)
    apply_fn = lambda p, x, rng: model.apply({"params": p}, x)  # noqa: E731
    step = train.make_train_step(lm_loss(apply_fn), opt, has_aux=True, learning_rate=schedule)
    everything, nothing = jp.partition(params, True)  # full training: the frozen part is empty
    result = train.fit(
        step, everything, nothing, opt.init(everything), data.batches("animals", BATCH, SEQ, args.seed),
        num_steps=args.pretrain_steps, rng=None, progress=not args.no_progress, tokens_per_batch=BATCH * SEQ,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **{f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(result.trainable))})
    os.replace(tmp, cache)  # atomic: a half-written cache is never read
    return result.trainable


def quantize_base(base: dict, args, say) -> dict:
    """The base as LoRA will see it: float, or 4/8-bit kernels for QLoRA (``--quant``)."""
    if args.quant == "none":
        return base
    quantized = jp.quantize(base, scheme=args.quant, block_size=64, double_quant=args.quant != "int8")
    say(f"\nQLoRA base: every kernel stored as {args.quant}" + (" with double quantization" if args.quant != "int8" else ""))
    say("  " + "\n  ".join(str(jp.quant_summary(quantized)).splitlines()[-3:]))
    return quantized


WISE_FT_ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def wise_ft_step(apply_fn, tuned: dict, evals: dict, out_dir: pathlib.Path, say) -> pathlib.Path | None:
    """WiSE-FT of the LoRA update: sweep alpha (0 = base, 1 = fine-tuned), print the table, plot it."""
    table = ensembling.alpha_sweep(
        lambda params, batches: evaluate(apply_fn, params, batches), None, tuned, WISE_FT_ALPHAS, evals
    )
    say("\nWiSE-FT: W + alpha * s A B (alpha 0 = base model, 1 = LoRA model); held-out text")
    say("  alpha   " + "   ".join(f"{d + ' ppl':>12} {d + ' acc':>12}" for d in evals))
    for alpha in WISE_FT_ALPHAS:
        rows = {r["set"]: r for r in table if r["alpha"] == alpha}
        say(f"  {alpha:5.2f}   " + "   ".join(f"{rows[d]['ppl']:12.3f} {100 * rows[d]['accuracy']:11.1f}%" for d in evals))
    try:
        path = ensembling.plot_alpha_sweep(table, out_dir / "wise_ft_alpha_sweep.png", metrics=["loss", "accuracy"],
                                           title="WiSE-FT of the LoRA update (demo)")
    except ImportError:
        say("  (matplotlib is not installed: no plot; pip install 'jaxpeft[examples]')")
        return None
    say(f"  curve written to {path}")
    return path


def _row(name: str, m: dict[str, float]) -> str:
    return f"  {name:<34} loss {m['loss']:.3f}   ppl {m['ppl']:7.3f}   accuracy {100 * m['accuracy']:5.1f}%"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    config = model_config()
    model = LinenLM(config)
    evals = {d: data.eval_set(d, 8, BATCH, SEQ) for d in data.DOMAINS}
    say(f"jaxpeft demo: reference LM {config.num_layers} layers, d_model {config.d_model}, "
        f"char vocab {config.vocab_size}, on {jax.devices()[0].platform}")

    base = pretrain_base(config, args, say)
    base_apply = lambda p, x, rng: model.apply({"params": p}, x)  # noqa: E731

    peft = jp.lora(args.rank, args.alpha if args.alpha is not None else 2.0 * args.rank, targets=args.targets)
    frozen_base = quantize_base(base, args, say)
    peft_model, params = jp.apply(peft, model, jax.random.key(args.seed + 1), evals["recipes"][0]["inputs"],
                                  params=frozen_base)
    base_only = lambda p, x, rng: peft_model.apply(p, x, adapters=False)  # noqa: E731
    before = {d: evaluate(base_only, params, evals[d]) for d in data.DOMAINS}  # the (quantized) base
    trainable, frozen = jp.partition(params, peft_model.trainable)
    summary = jp.summary(params, peft_model.trainable)
    schedule = optim.warmup_cosine(args.lr, args.steps)
    opt = optax.adamw(schedule, weight_decay=0.0)
    lora_state = opt.init(trainable)
    full_state = jax.eval_shape(opt.init, base)  # shapes only: what full fine-tuning of the float base holds
    say(f"\nLoRA r={args.rank} on {len(peft_model.placements)} layers matching {args.targets!r}")
    say(f"  trainable parameters: {summary.trainable_params:,} of {summary.total_params:,} "
        f"({100 * summary.trainable_fraction:.2f}%)")
    say(f"  optimizer state: {optim.state_bytes(lora_state) / 2**10:,.1f} KiB "
        f"(full fine-tuning: {optim.state_bytes(full_state) / 2**10:,.1f} KiB, "
        f"{100 * optim.state_bytes(lora_state) / optim.state_bytes(full_state):.2f}%)")

    peft_apply = lambda p, x, rng: peft_model.apply(p, x)  # noqa: E731
    step = train.make_train_step(lm_loss(peft_apply), opt, has_aux=True, learning_rate=schedule)
    say(f"\nfine-tuning on 'recipes' for {args.steps} steps")
    result = train.fit(
        step, trainable, frozen, lora_state, data.batches("recipes", BATCH, SEQ, args.seed + 2),
        num_steps=args.steps, rng=None, progress=not args.no_progress, tokens_per_batch=BATCH * SEQ,
    )
    tuned = jp.combine(result.trainable, frozen)
    after = {d: evaluate(peft_apply, tuned, evals[d]) for d in data.DOMAINS}

    out = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp(prefix="jaxpeft-demo-")) / "adapter"
    checkpoint.save_adapter(out, result.trainable, config=peft.config(), base=base, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())

    # A fresh process would rebuild the base from scratch: do the same here.
    fresh_base = pretrain_base(config, argparse.Namespace(**{**vars(args), "no_cache": False}), lambda *_: None)
    fresh_model, fresh_params = jp.apply(peft, LinenLM(config), jax.random.key(123), evals["recipes"][0]["inputs"],
                                         params=quantize_base(fresh_base, args, lambda *_: None))
    adapter, _ = checkpoint.restore_adapter(out, base=fresh_base, config=peft.config())
    restored = checkpoint.insert(fresh_params, adapter)
    restored_apply = lambda p, x, rng: fresh_model.apply(p, x)  # noqa: E731
    again = {d: evaluate(restored_apply, restored, evals[d]) for d in data.DOMAINS}
    probe = evals["recipes"][0]["inputs"]
    identical = bool(np.array_equal(fresh_model.apply(restored, probe), peft_model.apply(tuned, probe)))
    merged = jp.merge(fresh_model, restored)
    merged_metrics = {d: evaluate(base_apply, merged, evals[d]) for d in data.DOMAINS}

    wise_ft_step(peft_apply, tuned, evals, out.parent, say)

    say("\nresults (held-out text; perplexity per character)")
    for d in data.DOMAINS:
        say(_row(f"base model on '{d}'", before[d]))
        say(_row(f"LoRA model on '{d}'", after[d]))
        say(_row(f"restored adapter on '{d}'", again[d]))
        say(_row(f"merged for serving on '{d}'", merged_metrics[d]))
    say(f"\nadapter saved to {out} ({size / 2**10:,.1f} KiB on disk); restored into a fresh base: "
        f"outputs bit-identical = {identical}")
    say(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
