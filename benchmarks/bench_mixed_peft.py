"""Mixed-adapter inference on the real MiniLM: jaxpeft's mixed batch against HF PEFT's ``adapter_names=``.

8 LoRA adapters (r=8 on query/value, random non-zero A and B) are made in jaxpeft, exported in the HF PEFT
format and loaded into one ``PeftModel`` on transformers' ``BertModel`` built from the same weights, so both
sides hold the same adapters. A batch of 8 sentences, sentence i for adapter i, runs four ways:

- jaxpeft mixed batch (one jitted forward, ``adapter_ids``);
- jaxpeft loop (one jitted forward per adapter on its sentence);
- HF PEFT mixed batch (``model(..., adapter_names=[...])``, torch eager, no grad);
- HF PEFT loop (``set_adapter`` per adapter, its sentence).

The four outputs are checked equal (max abs diff) before timing; then all four are timed round-robin.

    python -m benchmarks.bench_mixed_peft [--adapters 8] [--repeats 9] [--quick] [--no-save]
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import interleaved_medians, machine, write


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_mixed_peft")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="2 adapters, 2 repeats: checks the script runs")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    import peft as hf_peft
    import torch
    import transformers

    import jaxpeft as jp
    from jaxpeft.interop import export_peft
    from jaxpeft.models import BertLinen, encode, load_pretrained, load_tokenizer, minilm_path

    sys.path.insert(0, "tests")
    from _sentences import SENTENCES

    n = 2 if args.quick else args.adapters
    repeats = 2 if args.quick else args.repeats
    if not 1 <= n <= len(SENTENCES):
        p.error(f"--adapters must be in [1, {len(SENTENCES)}], got {n}")
    path = minilm_path()
    config, base = load_pretrained(path)
    tokenizer = load_tokenizer(path)
    sentences = SENTENCES[:n]
    batch = {k: jnp.asarray(v) for k, v in encode(tokenizer, sentences).items()}
    kwargs = dict(attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    names = tuple(f"task{i}" for i in range(n))

    model = BertLinen(config)
    peft_model, params, loras = None, base, []
    for i, name in enumerate(names):
        lora = jp.lora(8, 16, targets=r"attention/(query|value)$", adapter=name)
        loras.append(lora)
        if peft_model is None:
            peft_model, params = jp.apply(lora, model, jax.random.key(i), batch["input_ids"], params=params, **kwargs)
        else:
            peft_model, params = jp.add_adapter(peft_model, lora, jax.random.key(i), params=params)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(42), len(leaves))
    params = jp.combine(jax.tree.unflatten(treedef, [v + 0.05 * jax.random.normal(k, v.shape) for k, v in
                                                     zip(keys, leaves)]), frozen)

    ids = jnp.arange(n)
    mixed = jax.jit(lambda p, x, ids, am, tt: peft_model.apply(p, x, adapters=names, adapter_ids=ids,
                                                               attention_mask=am, token_type_ids=tt))
    one = {nm: jax.jit(lambda p, x, am, tt, nm=nm: peft_model.apply(p, x, adapters=nm, attention_mask=am,
                                                                    token_type_ids=tt)) for nm in names}
    rows = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(n)]

    def jax_mixed():
        return mixed(params, batch["input_ids"], ids, batch["attention_mask"], batch["token_type_ids"])

    def jax_loop():
        return [one[nm](params, r["input_ids"], r["attention_mask"], r["token_type_ids"]) for nm, r in zip(names, rows)]

    # The same adapters in HF PEFT: export each, load them all into one PeftModel.
    torch_base = transformers.BertModel.from_pretrained(str(path), attn_implementation="eager").eval()
    with tempfile.TemporaryDirectory() as tmp:
        for name, lora in zip(names, loras):
            export_peft(f"{tmp}/{name}", lora, jp.partition(params, lora.trainable)[0])
        hf = hf_peft.PeftModel.from_pretrained(torch_base, f"{tmp}/{names[0]}", adapter_name=names[0])
        for name in names[1:]:
            hf.load_adapter(f"{tmp}/{name}", adapter_name=name)
    hf.eval()
    enc = {k: torch.tensor(np.asarray(v)) for k, v in batch.items()}
    enc_rows = [{k: v[i:i + 1] for k, v in enc.items()} for i in range(n)]

    def hf_mixed():
        with torch.no_grad():
            return hf(**enc, adapter_names=list(names)).last_hidden_state

    def hf_loop():
        out = []
        with torch.no_grad():
            for name, r in zip(names, enc_rows):
                hf.set_adapter(name)
                out.append(hf(**r).last_hidden_state)
        return out

    ours, theirs = np.asarray(jax_mixed()), hf_mixed().numpy()
    diffs = {
        "jaxpeft mixed vs HF PEFT mixed": float(np.abs(ours - theirs).max()),
        "jaxpeft mixed vs jaxpeft loop": float(max(np.abs(ours[i:i + 1] - np.asarray(y)).max()
                                                   for i, y in enumerate(jax_loop()))),
        "HF PEFT mixed vs HF PEFT loop": float(max(np.abs(theirs[i:i + 1] - y.numpy()).max()
                                                   for i, y in enumerate(hf_loop()))),
    }
    spread = float(np.abs(ours[0] - np.asarray(one[names[1]](params, rows[0]["input_ids"], rows[0]["attention_mask"],
                                                              rows[0]["token_type_ids"]))[0]).max())
    for what, d in diffs.items():
        if not d <= 1e-4:
            raise RuntimeError(f"{what}: max abs diff {d:.2e} > 1e-4; the runs do not do the same work")
    seconds = interleaved_medians({"jaxpeft mixed": jax_mixed, "jaxpeft loop": jax_loop, "HF PEFT mixed": hf_mixed,
                                   "HF PEFT loop": hf_loop}, repeats)
    base_s = seconds["jaxpeft mixed"]
    table = "\n".join([
        "| run | time | vs jaxpeft mixed |", "|---|---:|---:|",
        *[f"| {k} | {1e3 * v:.1f} ms | {v / base_s:.2f}x |" for k, v in seconds.items()],
        "",
        f"Loop / mixed: jaxpeft **{seconds['jaxpeft loop'] / base_s:.2f}x**, HF PEFT "
        f"**{seconds['HF PEFT loop'] / seconds['HF PEFT mixed']:.2f}x**. Outputs equal before timing (max abs "
        f"diff): " + "; ".join(f"{k} {v:.1e}" for k, v in diffs.items()) + f" (another adapter's output differs "
        f"by {spread:.1e}).",
    ])
    command = "python -m benchmarks.bench_mixed_peft " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"machine": {**machine(), "torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": hf_peft.__version__, "torch_threads": torch.get_num_threads()},
               "command": command, "adapters": n, "tokens_per_sentence": int(batch["input_ids"].shape[1]),
               "repeats": repeats, "seconds": seconds, "max_abs_diffs": diffs, "other_adapter_diff": spread}
    write("mixed_peft", payload,
          f"MiniLM (real weights), {n} LoRA adapters (r=8, query/value, random non-zero A and B; the same files "
          f"in both libraries), a batch of {n} sentences padded to {batch['input_ids'].shape[1]} tokens, sentence "
          f"i for adapter i; jaxpeft jitted, torch eager under no_grad with {torch.get_num_threads()} threads; "
          f"median of {repeats} interleaved calls.\n\nCommand: `{command}`.\n\n" + table,
          save=not (args.quick or args.no_save))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
