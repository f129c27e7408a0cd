"""Recipe: continued pretraining of MiniLM with LoRA (DAPT and TAPT), then the supervised LoRA fine-tune.

"Don't Stop Pretraining" (Gururangan et al. 2020, https://arxiv.org/abs/2004.10964): before the
supervised fine-tune, continue the masked-LM pretraining on unlabeled text of the target domain
(DAPT) and/or on the task's own unlabeled training text (TAPT). Here each masked-LM phase trains LoRA
on the attention projections plus the MLM head, with BERT's masking (15% of the tokens, 80% ``[MASK]``,
10% random, 10% kept: ``jaxpeft.data.mlm``), and is then merged into the encoder, which becomes the
base of the next phase.

- The MLM head. MiniLM's checkpoint (a sentence-transformers model) has no MLM head, so the head is
  fresh: ``transform`` and ``norm`` initialised, the decoder tied to the word embeddings (as BERT ties
  it) with a zero bias. It is trained with the LoRA and discarded after pretraining.
- DAPT text: docstrings of the third-party packages that the shifted test split comes from (the
  target domain), with every text of every task split removed (exact matches, case-insensitive);
  their labels are never read. TAPT text: the task's training docstrings, without their labels.
- Then the demo's supervised fine-tune (LoRA r=8 + the zero-shot head, built from the label
  descriptions' embeddings of that encoder) at the same steps and seed for every variant.

Reports validation / test / shifted accuracy (zero-shot and fine-tuned) for none / DAPT / TAPT /
DAPT+TAPT, and each phase's masked-LM loss on held-out text.

    python examples/continued_pretraining.py --results benchmarks/results/dapt_tapt.json
    python examples/continued_pretraining.py --tiny --steps 2 --mlm-steps 2   # smoke test: random tiny BERT
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft as jp
from jaxpeft import train
from jaxpeft.data.mlm import gather_positions, mask_tokens
from jaxpeft.demo import classify, run
from jaxpeft.models.bert import BertLinen

TARGETS = r"attention/(query|key|value|output)$"
SETS = ("validation", "test", "shifted")


def domain_corpus(task_dataset, cache_dir, per_label: int, max_texts: int | None = None) -> list[str]:
    """Unlabeled target-domain text for DAPT: the shifted split's source packages, minus every task text.

    The pool is the dataset built with no cap on the shifted side (the same sources, the same
    standard-library part, so the same de-duplication); any text of any split of ``task_dataset``
    is removed, so no evaluated docstring is pretrained on. Labels are dropped.
    """
    pool = classify.cached_dataset(cache_dir, max_per_label=per_label, max_shifted_per_label=None)
    used = {t.lower() for s in task_dataset.splits for t in task_dataset.texts(s)}
    texts = [t for t in pool.texts("shifted") if t.lower() not in used]
    if not texts:
        raise ValueError("domain_corpus: no shifted-source docstring is left once the task's texts are removed")
    return texts[:max_texts]


def masked_logits(module: BertLinen, tokens, positions, attention_mask):
    """MLM logits at the chosen positions only, float32 [batch, k, vocab] (``Module.apply`` method)."""
    hidden = module(tokens, attention_mask=attention_mask)
    return module.mlm(gather_positions(hidden, positions), module.embeddings.word_embeddings.embedding)


def mlm_loss(apply_fn, params, batch) -> tuple[jax.Array, dict]:
    """Cross-entropy of the original ids at the chosen positions; every other position is outside the loss."""
    logits = apply_fn(params, batch["tokens"], batch["positions"], batch["mask"], method=masked_logits)
    return jp.cross_entropy(logits, batch["targets"], batch["weights"])


def mask_options(tokenizer, config) -> dict:
    special = [tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]")]
    return {"mask_id": tokenizer.token_to_id("[MASK]"), "vocab_size": config.vocab_size, "special_ids": special}


def heldout_batches(tokenizer, config, texts, seq_len: int, seed: int, batch_size: int = 32) -> list[dict]:
    """A fixed masking of ``texts`` (the same for every model compared)."""
    tokens, mask = classify.encode_texts(tokenizer, texts, seq_len)
    rng = np.random.default_rng(seed)
    return [mask_tokens(tokens[i:i + batch_size], mask[i:i + batch_size], rng, **mask_options(tokenizer, config))
            for i in range(0, len(texts), batch_size)]


def heldout_loss(apply_fn, params, batches) -> float:
    """Masked-LM loss over ``batches``, weighted by predictions (nats per predicted token)."""
    fn = jax.jit(lambda p, b: mlm_loss(apply_fn, p, b)[0])
    losses = [(float(fn(params, b)), float(b["weights"].sum())) for b in batches]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def pretrain(config, encoder: dict, head: dict, texts: list[str], tokenizer, args, seed: int, say, label: str,
             heldout: dict[str, list[dict]]) -> tuple[dict, dict, dict]:
    """One masked-LM phase: LoRA + the MLM head on ``texts``; returns ``(merged encoder, head, report)``."""
    model = BertLinen(dataclasses.replace(config, mlm_head=True))
    tokens, mask = classify.encode_texts(tokenizer, texts, args.seq_len)
    peft_model, params = jp.apply(jp.lora(args.rank, 2.0 * args.rank, targets=TARGETS), model,
                                  jax.random.key(seed), tokens[:2], attention_mask=mask[:2],
                                  params={**encoder, "mlm": head})
    selector = [peft_model.trainable, r"^mlm/"]
    trainable, frozen = jp.partition(params, selector)
    schedule = jp.warmup_cosine(args.mlm_lr, args.mlm_steps)
    opt = optax.adamw(schedule, weight_decay=0.0)

    def loss_fn(trainable, frozen, batch, rng):
        loss, aux = mlm_loss(peft_model.apply, jp.combine(trainable, frozen), batch)
        return loss, {"accuracy": aux["accuracy"]}  # the step reports "loss" itself

    before = {s: heldout_loss(peft_model.apply, params, b) for s, b in heldout.items()}
    summary = jp.summary(params, selector)
    say(f"\n{label}: masked-LM LoRA r={args.rank} + the MLM head on {len(texts)} texts; trainable "
        f"{summary.trainable_params:,} of {summary.total_params:,}; {args.mlm_steps} steps of {args.batch_size}")
    t = time.perf_counter()
    rng, options = np.random.default_rng(seed), mask_options(tokenizer, config)
    unlabeled = classify.Split(tokens, mask, np.zeros(len(tokens), np.int32))
    # Shuffled batches, masked afresh each time (dynamic masking).
    stream = (mask_tokens(b["tokens"], b["mask"], rng, **options)
              for b in classify.batches(unlabeled, args.batch_size, seed))
    result = train.fit(train.make_train_step(loss_fn, opt, has_aux=True), trainable, frozen, opt.init(trainable),
                       stream, num_steps=args.mlm_steps, rng=None, progress=not args.no_progress,
                       tokens_per_batch=args.batch_size * args.seq_len)
    tuned = jp.combine(result.trainable, frozen)
    after = {s: heldout_loss(peft_model.apply, tuned, b) for s, b in heldout.items()}
    merged = jp.merge(peft_model, tuned)
    head = merged.pop("mlm")
    report = {"texts": len(texts), "steps": result.steps_run, "seconds": time.perf_counter() - t,
              "heldout_mlm_loss_before": before, "heldout_mlm_loss_after": after}
    say(f"  held-out masked-LM loss (nats/token) " + ", ".join(f"{s} {before[s]:.3f} -> {after[s]:.3f}" for s in before))
    return merged, head, report


def supervised(task, encoder: dict, args, say, label: str) -> dict:
    """The demo's fine-tune (LoRA + zero-shot head) from ``encoder``; zero-shot and fine-tuned accuracy."""
    head = classify.zero_shot_head(encoder, task.config, task.tokenizer, task.dataset.descriptions)
    base = {"bert": encoder, "head": {"kernel": jnp.asarray(head)}}
    options = argparse.Namespace(**{**vars(args), "method": "lora", "alpha": None, "targets": TARGETS})
    _, peft_model, zero_shot, tuned, _ = run.finetune(task, options, base, say, label)
    fn = jax.jit(lambda p, t, m: peft_model.apply(p, t, m))
    acc = {name: {s: classify.accuracy(classify.predict(fn, p, task.splits[s]), task.splits[s].labels) for s in SETS}
           for name, p in (("zero_shot", zero_shot), ("fine_tuned", tuned))}
    return acc


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlm-steps", type=int, default=100, help="steps of each masked-LM phase (default 100)")
    p.add_argument("--mlm-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=150, help="supervised steps, the same for every variant (default 150)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--heldout", type=int, default=128, help="texts per held-out masked-LM set (default 128)")
    args = run.add_recipe_arguments(p).parse_args(argv)
    if min(args.mlm_steps, args.steps, args.rank, args.batch_size, args.heldout) <= 0:
        p.error("--mlm-steps, --steps, --rank, --batch-size and --heldout must be positive")
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    task = run.Task(args.cache_dir, args.seq_len, args.tiny, say, random_tiny=args.tiny)
    per_label = 40 if args.tiny else 400  # as run.Task builds the task, so the pool de-duplicates the same way
    domain = domain_corpus(task.dataset, args.cache_dir, per_label)
    task_text = task.dataset.texts("train")
    say(f"\nDAPT text: {len(domain)} docstrings of the shifted split's packages, none of them in any task split; "
        f"TAPT text: the {len(task_text)} training docstrings, unlabeled")
    heldout = {s: heldout_batches(task.tokenizer, task.config, task.dataset.texts(s)[:args.heldout], args.seq_len,
                                  args.seed + 7) for s in ("validation", "shifted")}
    # A fresh MLM head (MiniLM has none): BERT's init for transform / norm, zero bias, decoder tied to the embeddings.
    probe = np.ones((1, 4), np.int32)
    fresh_head = BertLinen(dataclasses.replace(task.config, mlm_head=True)).init(
        jax.random.key(args.seed + 3), probe)["params"]["mlm"]
    dapt, dapt_head, dapt_report = pretrain(task.config, task.encoder, fresh_head, domain, task.tokenizer, args,
                                            args.seed + 10, say, "DAPT", heldout)
    tapt, _, tapt_report = pretrain(task.config, task.encoder, fresh_head, task_text, task.tokenizer, args,
                                    args.seed + 20, say, "TAPT", heldout)
    both, _, both_report = pretrain(task.config, dapt, dapt_head, task_text, task.tokenizer, args, args.seed + 20,
                                    say, "TAPT after DAPT", heldout)
    variants = {"none": (task.encoder, None), "DAPT": (dapt, dapt_report), "TAPT": (tapt, tapt_report),
                "DAPT+TAPT": (both, both_report)}
    results = {}
    for name, (encoder, report) in variants.items():
        acc = supervised(task, encoder, args, say, f"supervised fine-tune after {name}")
        results[name] = {"accuracy": acc, "pretraining": report}
    say(f"\ncontinued pretraining, then {args.steps} supervised steps of LoRA r={args.rank} + head (equal for all)")
    say("  before the fine-tune       zero-shot: val    test  shifted   fine-tuned: val    test  shifted")
    for name, r in results.items():
        z, f = r["accuracy"]["zero_shot"], r["accuracy"]["fine_tuned"]
        say(f"  {name:<26} {100 * z['validation']:13.1f}% {100 * z['test']:6.1f}% {100 * z['shifted']:7.1f}%"
            f" {100 * f['validation']:15.1f}% {100 * f['test']:6.1f}% {100 * f['shifted']:7.1f}%")
    say(f"done in {time.perf_counter() - t0:.1f} s")
    out = {"command": "python examples/continued_pretraining.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "args": vars(args), "dapt_texts": len(domain), "tapt_texts": len(task_text), "variants": results,
           "seconds": time.perf_counter() - t0}
    if args.results:
        run.save_results(args.results, out)
    return out


if __name__ == "__main__":
    main()
