"""Gemma 3 270M on CPU: load time and peak memory, generate tokens/s, a LoRA train step; jaxpeft vs
transformers / HF PEFT on the same GGUF, the same prompt and the same length, in one run.

    python -m benchmarks.bench_generate [--new-tokens 16] [--repeats 3] [--no-save]

Load time and peak RSS are measured each in a fresh subprocess (ru_maxrss). Throughput and train
steps run round-robin (``interleaved_medians``) after a warm-up (jaxpeft's first call compiles).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _load_ours():
    from jaxpeft.models.gguf import gemma3_270m_path, load_gguf

    path = gemma3_270m_path()
    start = time.perf_counter()
    load_gguf(path)
    return time.perf_counter() - start


def _load_hf():
    import torch
    from transformers import AutoModelForCausalLM

    from jaxpeft.models.gguf import gemma3_270m_path

    path = gemma3_270m_path()
    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return time.perf_counter() - start


def _child(which: str) -> None:
    seconds = {"ours": _load_ours, "hf": _load_hf}[which]()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_mib}))


def _measure_load(which: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_generate", "--child", which],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-seq", type=int, default=32)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--child", choices=["ours", "hf"])
    args = parser.parse_args()
    if args.child:
        return _child(args.child)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import peft as hf_peft
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import jaxpeft as jp
    from benchmarks.common import interleaved_medians, machine, write
    from jaxpeft.models.gemma import GemmaLinen
    from jaxpeft.models.gguf import gemma3_270m_path, load_gguf
    from jaxpeft.models.tokenizer import load_gguf_tokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    load = {"jaxpeft": _measure_load("ours"), "transformers": _measure_load("hf")}

    path = gemma3_270m_path()
    config, params = load_gguf(path)
    params = jax.tree.map(jnp.asarray, params)
    tokenizer = load_gguf_tokenizer(path)
    prompt_text = "The three most important ideas in parameter-efficient fine-tuning are"
    ids = tokenizer.encode(prompt_text).ids
    prompt = jnp.array([ids])
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    new = args.new_tokens
    model = GemmaLinen(config)

    def ours():
        return jp.generate(model, prompt, params=params, max_new_tokens=new).tokens

    def theirs():
        with torch.no_grad():
            return hf.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False)

    same = np.array_equal(np.asarray(ours())[0], theirs()[0, len(ids):].numpy())
    gen = interleaved_medians({"jaxpeft": ours, "transformers": theirs}, repeats=args.repeats, warmup=1)

    # LoRA r=8 on q/v projections, AdamW, one step on [1, train_seq] tokens, both sides.
    rng = np.random.default_rng(0)
    batch = rng.integers(3, config.vocab_size, size=(1, args.train_seq))
    peft = jp.lora(8, 16, targets=r"attn/(query|value)$")
    peft_model, peft_params = jp.apply(peft, model, jax.random.key(0), jnp.asarray(batch), params=params)
    trainable, frozen = jp.partition(peft_params, peft.trainable)
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(trainable)

    def loss_fn(trainable, frozen, batch, rng):
        logits = peft_model.apply(jp.combine(trainable, frozen), batch[:, :-1])
        return jp.cross_entropy(logits, batch[:, 1:])[0]

    step = jp.make_train_step(loss_fn, optimizer)
    jbatch = jnp.asarray(batch)
    state = {"t": trainable, "o": opt_state}

    def ours_step():
        state["t"], state["o"], metrics = step(state["t"], frozen, state["o"], jbatch, jax.random.key(1))
        return metrics["loss"]

    lora_config = hf_peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    hf_lora = hf_peft.get_peft_model(hf, lora_config)
    hf_lora.train()
    torch_opt = torch.optim.AdamW([p for p in hf_lora.parameters() if p.requires_grad], lr=1e-4)
    tbatch = torch.tensor(batch)

    def theirs_step():
        torch_opt.zero_grad()
        loss = hf_lora(tbatch, labels=tbatch).loss
        loss.backward()
        torch_opt.step()
        return loss.detach()

    train = interleaved_medians({"jaxpeft": ours_step, "transformers+peft": theirs_step}, repeats=args.repeats,
                                warmup=1)
    payload = {
        "machine": {**machine(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": hf_peft.__version__},
        "command": "python -m benchmarks.bench_generate " + " ".join(sys.argv[1:]),
        "model": "gemma-3-270m-q4_k_m.gguf dequantized to float32",
        "load": load,
        "generate": {"prompt_tokens": len(ids), "new_tokens": new, "greedy_tokens_equal": bool(same),
                     "seconds": gen, "tokens_per_second": {k: new / v for k, v in gen.items()}},
        "lora_train_step": {"rank": 8, "targets": "q/v", "tokens": args.train_seq, "seconds": train},
    }
    tps = payload["generate"]["tokens_per_second"]
    table = "\n".join([
        "| what | jaxpeft | transformers | ratio (jaxpeft / transformers) |",
        "|---|---|---|---|",
        f"| load GGUF -> float32 params (s) | {load['jaxpeft']['seconds']:.1f} | {load['transformers']['seconds']:.1f} "
        f"| {load['jaxpeft']['seconds'] / load['transformers']['seconds']:.2f}x |",
        f"| peak RSS of the load (MiB) | {load['jaxpeft']['peak_rss_mib']:.0f} | "
        f"{load['transformers']['peak_rss_mib']:.0f} | "
        f"{load['jaxpeft']['peak_rss_mib'] / load['transformers']['peak_rss_mib']:.2f}x |",
        f"| greedy generate, {len(ids)}-token prompt, {new} new tokens (tokens/s) | {tps['jaxpeft']:.1f} | "
        f"{tps['transformers']:.1f} | {tps['jaxpeft'] / tps['transformers']:.2f}x |",
        f"| LoRA r=8 q/v train step, {args.train_seq} tokens (s, HF side with peft) | {train['jaxpeft']:.2f} | "
        f"{train['transformers+peft']:.2f} | {train['jaxpeft'] / train['transformers+peft']:.2f}x |",
        "",
        f"Greedy tokens identical to transformers': {same}. Command: `{payload['command']}`.",
    ])
    write("generate", payload, table, save=not args.no_save)


if __name__ == "__main__":
    main()
