"""HF PEFT LoRA adapters on the real Gemma 3 270M, both directions, against real ``peft``.

    flock /tmp/heavy.lock python -m benchmarks.bench_gemma_interop [--no-save]

jaxpeft loads ``gemma-3-270m-q4_k_m.gguf`` with ``load_gguf``; transformers loads the same file with
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)`` (both dequantize
the same Q4_K / Q6_K tensors to float32). Then

* **export**: a jaxpeft LoRA adapter (random non-zero A and B on ``attn/query``, ``attn/value``,
  ``mlp/down`` of every layer) is written with ``export_peft(..., mapping="gemma3")`` and loaded with
  ``PeftModel.from_pretrained``;
* **import**: a ``peft``-made adapter (``init_lora_weights=False``: A and B both random; rsLoRA on
  ``k_proj``, ``o_proj``, ``gate_proj``, ``up_proj``) is saved with ``save_pretrained`` and read with
  ``import_peft``;

and the logits of one short prompt are compared. ``tests/test_interop_gemma_real.py`` runs the same cases
(these functions) and asserts the bounds; this script records the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

PROMPT = "The capital of France is"  # 6 ids with <bos>
EXPORT_TARGETS = r"layers_\d+/(attn/(query|value)|mlp/down)$"
IMPORT_TARGETS = ["k_proj", "o_proj", "gate_proj", "up_proj"]
NOISE = 0.02  # std of the jaxpeft adapter's A and B: the adapter moves the logits by O(1), not O(100)


@dataclasses.dataclass
class Models:
    """The two loaded models and the prompt's token ids (int64 [1, seq])."""

    config: Any
    params: dict
    hf: Any
    tokens: np.ndarray
    load_seconds: dict


def load_models() -> Models:
    """jaxpeft's ``load_gguf`` and transformers' ``gguf_file=`` on the same file; the prompt's ids."""
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    from jaxpeft.models.gguf import gemma3_270m_path, load_gguf
    from jaxpeft.models.tokenizer import load_gguf_tokenizer

    path = gemma3_270m_path()
    start = time.perf_counter()
    config, params = load_gguf(path)
    params = jax.tree.map(jnp.asarray, params)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    theirs = time.perf_counter() - start
    tokens = np.asarray([load_gguf_tokenizer(path).encode(PROMPT).ids], np.int64)
    return Models(config, params, hf, tokens, {"jaxpeft": ours, "transformers": theirs})


def compare(got: np.ndarray, want: np.ndarray, base: np.ndarray) -> dict:
    """Differences of two logit arrays ``[1, seq, vocab]``; ``base``: the logits without the adapter."""
    diff = np.abs(got - want)
    scale = float(np.abs(want).max())
    return {"max_abs_diff": float(diff.max()), "max_abs_logit": scale, "relative": float(diff.max()) / scale,
            "adapter_effect_max_abs": float(np.abs(want - base).max()),
            "same_greedy_tokens": bool(np.array_equal(got.argmax(-1), want.argmax(-1)))}


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.numpy()


def _jax_logits(models: Models, peft, adapter=None, noise_key=None):
    """jaxpeft's logits with ``peft`` bound: ``adapter`` inserted, or (``noise_key``) random A and B."""
    import jax
    import jax.numpy as jnp

    import jaxpeft as jp
    from jaxpeft.models.gemma import GemmaLinen

    tokens = jnp.asarray(models.tokens, jnp.int32)
    peft_model, params = jp.apply(peft, GemmaLinen(models.config), jax.random.key(0), tokens, params=models.params)
    if adapter is not None:
        params = jp.insert(params, adapter)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    if noise_key is not None:  # replace lora_a and lora_b (B starts at zero) by N(0, NOISE^2) draws
        leaves, treedef = jax.tree.flatten(trainable)
        keys = jax.random.split(noise_key, len(leaves))
        trainable = jax.tree.unflatten(treedef, [NOISE * jax.random.normal(k, x.shape, x.dtype)
                                                 for k, x in zip(keys, leaves)])
    logits = jax.jit(peft_model.apply)(jp.combine(trainable, frozen), tokens)
    return np.asarray(logits), trainable


def base_logits(models: Models) -> dict:
    """Both sides without an adapter (the base parity this comparison starts from)."""
    import jax.numpy as jnp

    from jaxpeft.models.gemma import GemmaLinen

    ours = np.asarray(GemmaLinen(models.config).apply({"params": models.params},
                                                      jnp.asarray(models.tokens, jnp.int32)))
    return {"jaxpeft": ours, "transformers": _torch_logits(models.hf, models.tokens)}


def export_case(models: Models, directory, base: np.ndarray) -> dict:
    """jaxpeft LoRA -> ``export_peft`` -> ``PeftModel.from_pretrained``: peft's logits vs jaxpeft's."""
    import jax
    from peft import PeftModel

    import jaxpeft as jp
    from jaxpeft.interop import export_peft

    peft = jp.lora(4, 8, targets=EXPORT_TARGETS)
    want, trainable = _jax_logits(models, peft, noise_key=jax.random.key(7))
    export_peft(directory, peft, trainable, mapping="gemma3")
    model = PeftModel.from_pretrained(models.hf, str(directory)).eval()
    try:
        got = _torch_logits(model, models.tokens)
    finally:
        model.unload()  # the shared transformers model gets its plain Linear layers back
    return compare(got, want, base)


def import_case(models: Models, directory, base: np.ndarray) -> dict:
    """peft LoRA (``init_lora_weights=False``) -> ``save_pretrained`` -> ``import_peft``: jaxpeft vs peft."""
    import peft as hf_peft
    import torch

    from jaxpeft.interop import import_peft

    torch.manual_seed(0)
    config = hf_peft.LoraConfig(r=4, lora_alpha=8, target_modules=IMPORT_TARGETS, use_rslora=True,
                                init_lora_weights=False)
    model = hf_peft.get_peft_model(models.hf, config).eval()
    try:
        model.save_pretrained(str(directory))
        want = _torch_logits(model, models.tokens)
    finally:
        model.unload()
    imported, adapter = import_peft(directory, mapping="gemma3", params=models.params)
    got, _ = _jax_logits(models, imported, adapter)
    return compare(got, want, base)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    import peft as hf_peft
    import torch
    import transformers

    from benchmarks.common import machine, write

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    models = load_models()
    bases = base_logits(models)
    base = compare(bases["jaxpeft"], bases["transformers"], bases["transformers"])
    cases = {}
    for name, case in (("export", export_case), ("import", import_case)):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as directory:
            cases[name] = case(models, directory, bases["transformers"])
        cases[name]["seconds"] = time.perf_counter() - t
    total = time.perf_counter() - start
    load_average = {"start": load_before, "end": os.getloadavg()[0]}
    payload = {
        "machine": {**machine(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "peft": hf_peft.__version__},
        "command": " ".join(["flock /tmp/heavy.lock python -m benchmarks.bench_gemma_interop", *sys.argv[1:]]),
        "model": "gemma-3-270m-q4_k_m.gguf dequantized to float32, both sides",
        "prompt": PROMPT, "prompt_tokens": int(models.tokens.shape[1]),
        "load_seconds": models.load_seconds, "base": base, "cases": cases, "total_seconds": total,
        "load_average_1min": load_average,
    }
    versions = payload["machine"]

    def row(label, r):
        return (f"| {label} | {r['max_abs_diff']:.2e} | {r['max_abs_logit']:.1f} | {r['relative']:.2e} | "
                f"{r['adapter_effect_max_abs']:.2f} | {r['same_greedy_tokens']} | {r.get('seconds', 0):.1f} |")

    table = "\n".join([
        f"torch {versions['torch']}, transformers {versions['transformers']}, peft {versions['peft']}; "
        f"1-minute load average {load_average['start']:.1f} at the start, {load_average['end']:.1f} at the end "
        "(a shared box: times are inflated, the differences are not).",
        "",
        f"Prompt {PROMPT!r} ({models.tokens.shape[1]} ids), logits `[1, {models.tokens.shape[1]}, vocab]` compared "
        "at every position. Relative = max abs diff / max abs logit.",
        "",
        "| case | max abs diff | max abs logit | relative | adapter's effect (max abs vs base) | same argmax | s |",
        "|---|---|---|---|---|---|---|",
        row("base: jaxpeft `load_gguf` vs transformers `gguf_file=`", base),
        row("export: jaxpeft LoRA r=4 (q, v, mlp down; 18 layers) -> `PeftModel.from_pretrained`", cases["export"]),
        row("import: peft LoRA r=4 rsLoRA (k, o, gate, up), `init_lora_weights=False` -> `import_peft`",
            cases["import"]),
        "",
        "Bound (tests/test_interop_gemma_real.py): relative <= 1e-4; see docs/hf_peft.md for why relative.",
        "",
        f"Loads: jaxpeft `load_gguf` {models.load_seconds['jaxpeft']:.1f} s, transformers "
        f"{models.load_seconds['transformers']:.1f} s. Whole run: {total:.0f} s wall. Command: `{payload['command']}`.",
    ])
    write("gemma_interop", payload, table, save=not args.no_save)


if __name__ == "__main__":
    main()
