"""Recipe: a domain tokenizer for MiniLM: new WordPiece tokens, mean-of-sub-token init, train only the new rows.

1. Train a WordPiece tokenizer with ``tokenizers`` on the domain text (the demo's training docstrings).
2. New tokens: whole words of that vocabulary that MiniLM's tokenizer splits into two or more pieces,
   most frequent in the domain text first (``--new-tokens`` of them); added to MiniLM's tokenizer.
3. Each new embedding row starts as the mean of the old embeddings of the pieces MiniLM used for it.
4. Train only the new rows (a separate leaf ``new_rows`` of ``classify.TextClassifier``: a partition over rows, the old
   table stays frozen and bit-identical) plus LoRA and the head; compare with LoRA + head on the old
   vocabulary at the same steps.

Reports tokens per word before and after, and validation / test / shifted accuracy of both runs.

    python examples/domain_tokenizer.py
    python examples/domain_tokenizer.py --tiny --steps 4      # smoke test: random tiny BERT
"""

from __future__ import annotations

import argparse
import collections
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft as jp
from jaxpeft import train
from jaxpeft.demo import classify, run
from jaxpeft.demo.run import Task

TARGETS = r"attention/(query|key|value|output)$"


def train_wordpiece(texts: list[str], vocab_size: int):
    """A lowercasing BERT-style WordPiece ``tokenizers.Tokenizer`` trained on ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"]))
    return tokenizer


def choose_new_tokens(domain_tokenizer, base_tokenizer, texts: list[str], count: int) -> list[str]:
    """Whole words of the domain vocabulary that the base splits into >= 2 pieces, most frequent first."""
    from tokenizers import normalizers, pre_tokenizers

    norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    freq = collections.Counter(w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    base_vocab = base_tokenizer.get_vocab()
    words = [w for w in domain_tokenizer.get_vocab() if not w.startswith("##") and w.isalpha() and len(w) > 3
             and w not in base_vocab]
    split = [w for w in words if len(base_tokenizer.encode(w, add_special_tokens=False).ids) >= 2]
    return sorted(split, key=lambda w: (-freq[w], w))[:count]


def extend_tokenizer(base_tokenizer, new_tokens: list[str]):
    """A copy of ``base_tokenizer`` with ``new_tokens`` added as whole, normalised words (ids after the old vocab)."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_str(base_tokenizer.to_str())
    tokenizer.add_tokens([AddedToken(t, single_word=True, normalized=True) for t in new_tokens])
    return tokenizer


def check_vocab(tokenizer, config, new_rows: int) -> None:
    """Refuse a tokenizer whose vocabulary does not match the model's embedding rows (``config.vocab_size`` + new)."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    rows = config.vocab_size + new_rows
    if size != rows:
        raise ValueError(f"tokenizer vocabulary has {size} ids but the model has {rows} embedding rows "
                         f"({config.vocab_size} pretrained + {new_rows} new); ids >= {rows} would "
                         f"index past the table")


def mean_init(embedding: np.ndarray, base_tokenizer, new_tokens: list[str]) -> np.ndarray:
    """Row ``i``: the mean of ``embedding``'s rows for the base tokenizer's pieces of ``new_tokens[i]``."""
    rows = []
    for t in new_tokens:
        ids = base_tokenizer.encode(t, add_special_tokens=False).ids
        if not ids:
            raise ValueError(f"new token {t!r}: the base tokenizer gives no pieces to average")
        rows.append(np.asarray(embedding)[ids].mean(0))
    return np.stack(rows).astype(np.asarray(embedding).dtype)


def tokens_per_word(tokenizer, texts: list[str]) -> float:
    """Tokens (without [CLS] / [SEP]) per whitespace-separated word."""
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    return tokens / max(sum(len(t.split()) for t in texts), 1)


def finetune(model, base, splits, args, extra_trainable, say):
    probe = splits["train"].take(2)
    peft_model, params = jp.apply(jp.lora(args.rank, 2.0 * args.rank, targets=TARGETS), model,
                                  jax.random.key(args.seed + 1), probe.tokens, probe.mask, params=base)
    trainable, frozen = jp.partition(params, [peft_model.trainable, r"^head/kernel$", *extra_trainable])
    schedule = jp.warmup_cosine(args.lr, args.steps)
    opt = optax.adamw(schedule, weight_decay=0.0)

    def loss_fn(trainable, frozen, batch, rng):
        logits = peft_model.apply(jp.combine(trainable, frozen), batch["tokens"], batch["mask"])
        return classify.cross_entropy_loss(logits, batch["labels"])

    start = jax.tree.map(jnp.copy, trainable)
    result = train.fit(train.make_train_step(loss_fn, opt, has_aux=True), start, frozen, opt.init(start),
                       classify.batches(splits["train"], args.batch_size, args.seed + 2), num_steps=args.steps,
                       rng=None, progress=not args.no_progress, tokens_per_batch=args.batch_size * args.seq_len)
    tuned = jp.combine(result.trainable, frozen)
    fn = jax.jit(lambda p, t, m: peft_model.apply(p, t, m))
    acc = {s: classify.accuracy(classify.predict(fn, tuned, splits[s]), splits[s].labels)
           for s in ("validation", "test", "shifted")}
    return acc, tuned, jp.summary(params, [peft_model.trainable, r"^head/kernel$", *extra_trainable])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=300)
    p.add_argument("--wordpiece-vocab", type=int, default=4000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    args = run.add_recipe_arguments(p).parse_args(argv)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    task = Task(args.cache_dir, args.seq_len, args.tiny, say, random_tiny=args.tiny)
    domain = task.dataset.texts("train")
    wordpiece = train_wordpiece(domain, args.wordpiece_vocab)
    new = choose_new_tokens(wordpiece, task.tokenizer, domain, args.new_tokens)
    tokenizer = extend_tokenizer(task.tokenizer, new)
    check_vocab(tokenizer, task.config, len(new))
    say(f"\nWordPiece ({args.wordpiece_vocab} ids) trained on {len(domain)} training docstrings; "
        f"{len(new)} new tokens, e.g. {new[:8]}")
    before = {s: tokens_per_word(task.tokenizer, task.dataset.texts(s)) for s in ("train", "shifted")}
    after = {s: tokens_per_word(tokenizer, task.dataset.texts(s)) for s in ("train", "shifted")}
    splits = {s: classify.tokenize_split(tokenizer, task.dataset, s, args.seq_len)
              for s in ("train", "validation", "test", "shifted")}
    old_table = task.encoder["embeddings"]["word_embeddings"]["embedding"]
    new_rows = mean_init(old_table, task.tokenizer, new)
    base_new = {"bert": task.encoder, "new_rows": jnp.asarray(new_rows),
                "head": task.base["head"]}
    model_new = classify.TextClassifier(task.config, len(task.dataset.labels), new_rows=len(new))
    say("\nLoRA + head, old vocabulary")
    acc_old, _, _ = finetune(task.model, task.base, task.splits, args, [], say)
    say("\nLoRA + head + the new embedding rows, domain vocabulary")
    acc_new, tuned, summary = finetune(model_new, base_new, splits, args, [r"^new_rows$"], say)
    old_identical = bool(np.array_equal(np.asarray(tuned["bert"]["embeddings"]["word_embeddings"]["embedding"]),
                                        np.asarray(old_table)))
    say(f"\ntokens per word: train {before['train']:.3f} -> {after['train']:.3f}, "
        f"shifted {before['shifted']:.3f} -> {after['shifted']:.3f}")
    say(f"old embedding rows bit-identical after training: {old_identical}; trainable "
        f"{summary.trainable_params:,} parameters ({len(new)} new rows)")
    say("  run                          validation     test   shifted")
    for name, a in (("old vocabulary", acc_old), ("domain vocabulary", acc_new)):
        say(f"  {name:<28} {100 * a['validation']:8.1f}% {100 * a['test']:8.1f}% {100 * a['shifted']:8.1f}%")
    out = {"command": "python examples/domain_tokenizer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "new_tokens": new, "tokens_per_word_before": before, "tokens_per_word_after": after,
           "accuracy_old_vocab": acc_old, "accuracy_domain_vocab": acc_new, "old_rows_identical": old_identical}
    if args.results:
        run.save_results(args.results, out)
    return out


if __name__ == "__main__":
    main()
