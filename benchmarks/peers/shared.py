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
}
DORA_ROWS = ("dora_qv",)  # DoRA (weight-decomposed LoRA, detached column norm) instead of LoRA
# QLoRA: every block's linear kernel (QUANTIZED) stored NF4, LoRA on the row's targets; embeddings, norms
# and the head stay fp32. Blocks of ``quant_block`` input rows per absmax scale, no double quantization:
# bitsandbytes' NF4 dequantizes bit for bit to jaxpeft's there (its double-quantized absmax does not match
# jaxpeft's), so every peer trains on the same base weights.
QLORA_ROWS = ("qlora_qv",)
QUANTIZED = ("query", "key", "value", "out", "up", "down")


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
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


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
