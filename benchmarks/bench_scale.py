"""QLoRA at scale: one train step of a Llama-shaped decoder (1B, 3B, 7B) on a small CPU machine.

Run: ``jaxpeft bench scale`` (or ``python -m benchmarks.bench_scale --sizes 1b,3b,7b``). Each size
runs in its own process (so its peak RSS is its own) under a watchdog that kills it past
``--rss-limit`` GiB. Before any array is built, a memory model (bytes per component) is checked
against the memory available; a config that cannot fit stops there with the table.

The model: a pre-norm decoder with RoPE attention and a gated (SwiGLU) MLP, layers scanned with
``lax.scan`` and rematerialised per layer. Every linear kernel of every layer is NF4 with double
quantization, stored stacked (``QuantizedArray`` children with a leading layer axis), and carries
LoRA (r=16). Kernels are created and quantized one (layer, kernel) at a time from a counter-based
hash (an Irwin-Hall approximation of N(0, 0.02^2)): no float model ever exists in memory. Each
quantized matmul is ``jaxpeft.quant.qmatmul_blockwise``: forward and backward dequantize one row
block at a time. Embedding, LM head and norms stay float32 (QLoRA keeps them in high precision).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft import quant
from jaxpeft.quant._array import SCALE_BLOCK_SIZE, _quantize

GiB = 2**30
MiB = 2**20
KERNELS = ("query", "key", "value", "out", "gate", "up", "down")
# Measured: RSS of this process after importing jax/optax and compiling the tiny shape's step
# (python, jaxlib's code, XLA:CPU's thread pools and compile-time memory).
RUNTIME_BYTES = int(0.8 * GiB)


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """A Llama-shaped decoder and its QLoRA step.

    Attributes:
      name: label. hidden, layers, heads, mlp, vocab: model shape (MLP is gated: gate, up, down).
      rank, alpha: LoRA on every linear kernel of every layer.
      batch, seq: tokens per step. block_size: NF4 block (double quantization on).
      remat: rematerialise each layer in the backward pass (only layer inputs are kept).
    """

    name: str
    hidden: int
    layers: int
    heads: int
    mlp: int
    vocab: int = 32000
    rank: int = 16
    alpha: float = 32.0
    batch: int = 1
    seq: int = 256
    block_size: int = 64
    remat: bool = True

    def kernel_shapes(self) -> dict[str, tuple[int, int]]:
        h, f = self.hidden, self.mlp
        return {"query": (h, h), "key": (h, h), "value": (h, h), "out": (h, h), "gate": (h, f), "up": (h, f),
                "down": (f, h)}

    @property
    def kernel_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.kernel_shapes().values())

    @property
    def num_params(self) -> int:
        """Parameters of the base model (kernels, embedding, LM head, norms)."""
        return self.kernel_params + 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    @property
    def trainable(self) -> int:
        return self.layers * sum(self.rank * (a + b) for a, b in self.kernel_shapes().values())


SHAPES = {
    # CI: the same code path at a size that runs in seconds
    "tiny": ScaleConfig("tiny", hidden=128, layers=2, heads=4, mlp=256, vocab=512, rank=4, seq=32),
    # TinyLlama-1.1B's shape (full multi-head attention instead of its 4 KV heads)
    "1b": ScaleConfig("1b", hidden=2048, layers=22, heads=32, mlp=5632),
    # OpenLLaMA-3B's shape
    "3b": ScaleConfig("3b", hidden=3200, layers=26, heads=32, mlp=8640),
    # Llama-2-7B's shape
    "7b": ScaleConfig("7b", hidden=4096, layers=32, heads=32, mlp=11008),
}


# ----------------------------------------------------------------------------- memory model


def _quantized_bytes(d_in: int, d_out: int, block_size: int) -> int:
    """Bytes of one NF4 + double-quantized kernel: codes, 8-bit scales, scale absmax, offset."""
    nb = -(-d_in // block_size)
    return -(-d_in // 2) * d_out + nb * d_out + nb * -(-d_out // SCALE_BLOCK_SIZE) * 4 + 4


def memory_model(c: ScaleConfig) -> dict[str, int]:
    """Bytes per component of one QLoRA train step (the estimate checked before anything is built)."""
    f32 = 4
    tokens = c.batch * c.seq
    base = c.layers * sum(_quantized_bytes(a, b, c.block_size) for a, b in c.kernel_shapes().values())
    layer_acts = tokens * (10 * c.hidden + 3 * c.mlp) * f32 + 2 * c.batch * c.heads * c.seq * c.seq * f32
    return {
        "4-bit base (NF4 + double quant)": base,
        "embedding + LM head (fp32)": 2 * c.vocab * c.hidden * f32,
        "norms (fp32)": (2 * c.layers + 1) * c.hidden * f32,
        # params, grads, AdamW m and v, and the updated params before the donated buffers are freed
        "LoRA params, grads, AdamW state": 5 * c.trainable * f32,
        # remat: each layer's input is the only residual the scan keeps
        "layer inputs kept for backward": (c.layers + 1) * tokens * c.hidden * f32,
        "one layer's activations (recomputed)": layer_acts if c.remat else c.layers * layer_acts,
        "logits, softmax, their gradient": 3 * tokens * c.vocab * f32,
        "dequantized row blocks (forward/backward)": 2 * quant.DEFAULT_BLOCK_BYTES,
        "runtime (python, jaxlib, XLA, compile)": RUNTIME_BYTES,
    }


def dequantized_fp32_bytes(c: ScaleConfig) -> int:
    """What the kernels would take dequantized to fp32 all at once (the plain path's peak)."""
    return c.kernel_params * 4


class DoesNotFitError(ValueError):
    """The memory model says a scale config needs more memory than is available."""


def check_fits(c: ScaleConfig, available: int) -> dict[str, int]:
    """The memory model of ``c``, or :class:`DoesNotFitError` naming each component."""
    model = memory_model(c)
    total = sum(model.values())
    if total > available:
        rows = "\n".join(f"  {k:<45} {v / GiB:8.2f} GiB" for k, v in model.items())
        raise DoesNotFitError(
            f"bench scale: the {c.name!r} shape (hidden {c.hidden}, {c.layers} layers, MLP {c.mlp}, vocab "
            f"{c.vocab}, {c.num_params / 1e9:.2f}B params, batch {c.batch}x{c.seq}) needs an estimated "
            f"{total / GiB:.2f} GiB but {available / GiB:.2f} GiB is available:\n{rows}\n"
            f"Nothing was built. Use a smaller shape, batch or sequence, or raise --memory-limit."
        )
    return model


# ----------------------------------------------------------------------------- weights


def _hashed_normal(seed: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
    """Pseudo-random ~N(0, std^2) from a counter hash: Irwin-Hall of the 4 bytes of murmur3's fmix32.

    ~5x cheaper than ``jax.random.normal`` on XLA:CPU, which matters for 6.5B values.
    """
    h = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    h = h * jnp.uint32(0x9E3779B1) + seed.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    s = ((h & 0xFF) + ((h >> 8) & 0xFF) + ((h >> 16) & 0xFF) + (h >> 24)).astype(jnp.float32)
    return (s - 510.0) * jnp.float32(std / math.sqrt(4 * (256**2 - 1) / 12))


@functools.partial(jax.jit, static_argnames=("shape", "std", "block_size"))
def _random_quantized(seed, *, shape, std, block_size):
    w = _hashed_normal(seed, shape, std)
    return _quantize(w, scheme="nf4", block_size=block_size, double_quant=True)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, index):
    return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, index, 0), stacked, layer)


def build_base(c: ScaleConfig, seed: int = 0) -> dict:
    """The frozen model: stacked NF4 kernels made one (kernel, layer) at a time, fp32 embed/head/norms."""
    layers = {}
    for k, (name, shape) in enumerate(c.kernel_shapes().items()):
        stacked = None
        for i in range(c.layers):
            s = jnp.uint32((seed * 1000 + k) * 10007 + i)
            children = _random_quantized(s, shape=shape, std=0.02, block_size=c.block_size)
            if stacked is None:  # preallocate [layers, ...] once; each layer is written in place (donated)
                stacked = jax.tree.map(lambda x: jnp.zeros((c.layers, *x.shape), x.dtype), children)
            stacked = _set_layer(stacked, children, i)
            del children
        packed, scales, scale_scales, scale_offset = stacked
        layers[name] = quant.QuantizedArray(
            packed=packed, scales=scales, scale_scales=scale_scales, scale_offset=scale_offset,
            shape=shape, dtype=np.dtype(np.float32), scheme="nf4", block_size=c.block_size,
        )
    h = c.hidden
    return {
        "embed": jax.jit(_hashed_normal, static_argnums=(1, 2))(jnp.uint32(seed * 7 + 1), (c.vocab, h), 0.02),
        "head": jax.jit(_hashed_normal, static_argnums=(1, 2))(jnp.uint32(seed * 7 + 2), (h, c.vocab), 0.02),
        "norms": jnp.ones((c.layers, 2, h), jnp.float32),
        "final_norm": jnp.ones((h,), jnp.float32),
        "layers": layers,
    }


def init_lora(c: ScaleConfig, key: jax.Array, b_std: float = 0.0) -> dict:
    """LoRA A ~ N(0, 1/d_in) and B = 0 (or N(0, b_std^2)) for every kernel, stacked ``[layers, ...]``."""
    out = {}
    for name, (d_in, d_out) in c.kernel_shapes().items():
        key, ka, kb = jax.random.split(key, 3)
        a = jax.random.normal(ka, (c.layers, d_in, c.rank), jnp.float32) / math.sqrt(d_in)
        b = b_std * jax.random.normal(kb, (c.layers, c.rank, d_out), jnp.float32)
        out[name] = {"lora_a": a, "lora_b": b}
    return out


# ----------------------------------------------------------------------------- the model


def _rms_norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def _rope(x):
    """Rotary position embedding on ``x: [batch, seq, heads, head_dim]``."""
    seq, dim = x.shape[1], x.shape[-1]
    freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angle = jnp.arange(seq, dtype=jnp.float32)[:, None] * freq[None]  # [seq, dim/2]
    cos, sin = jnp.cos(angle)[None, :, None], jnp.sin(angle)[None, :, None]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)


def _matmul(kind: str):
    if kind == "blockwise":
        return lambda x, q: quant.qmatmul_blockwise(x, q)
    if kind == "plain":  # the reference: dequantize the whole kernel, then multiply
        return lambda x, q: x @ quant.dequantize_array(q)
    raise ValueError(f"matmul must be 'blockwise' or 'plain'; got {kind!r}")


def loss_fn(lora: dict, frozen: dict, tokens: jax.Array, targets: jax.Array, c: ScaleConfig,
            matmul: str = "blockwise") -> jax.Array:
    """Mean next-token cross-entropy. tokens, targets: ``[batch, seq]`` int32."""
    mm = _matmul(matmul)
    scale = c.alpha / c.rank
    heads, head_dim = c.heads, c.hidden // c.heads

    def layer(x, p):
        q, ad, norms = p

        def linear(h, name):  # y = h W + s (h A) B, LoRA in factored form
            return mm(h, q[name]) + scale * ((h @ ad[name]["lora_a"]) @ ad[name]["lora_b"])

        b, t, _ = x.shape
        h = _rms_norm(x, norms[0])
        qh = _rope(linear(h, "query").reshape(b, t, heads, head_dim))
        kh = _rope(linear(h, "key").reshape(b, t, heads, head_dim))
        vh = linear(h, "value").reshape(b, t, heads, head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
        x = x + linear(jnp.einsum("bhqk,bkhd->bqhd", probs, vh).reshape(b, t, c.hidden), "out")
        h = _rms_norm(x, norms[1])
        x = x + linear(jax.nn.silu(linear(h, "gate")) * linear(h, "up"), "down")
        return x, None

    body = jax.checkpoint(layer) if c.remat else layer
    x = frozen["embed"][tokens]
    x, _ = jax.lax.scan(body, x, (frozen["layers"], lora, frozen["norms"]))
    logits = _rms_norm(x, frozen["final_norm"]) @ frozen["head"]
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def make_step(c: ScaleConfig, optimizer: optax.GradientTransformation, matmul: str = "blockwise"):
    """A jitted AdamW step on the LoRA leaves only; ``lora`` and ``opt_state`` are donated."""

    @functools.partial(jax.jit, donate_argnums=(0, 2))
    def step(lora, frozen, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, tokens, targets, c, matmul)
        updates, opt_state = optimizer.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return step


# ----------------------------------------------------------------------------- one size


class _RssWatch:
    """Samples this process's RSS every 50 ms; past ``limit`` bytes it kills the process."""

    def __init__(self, limit: int):
        import psutil

        self.process, self.limit, self.peak = psutil.Process(), limit, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.05):
            rss = self.process.memory_info().rss
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                print(f"bench scale: RSS {rss / GiB:.1f} GiB > limit {self.limit / GiB:.1f} GiB; killed",
                      file=sys.stderr, flush=True)
                os._exit(3)

    def reset(self) -> None:
        self.peak = self.process.memory_info().rss

    def stop(self) -> None:
        self._stop.set()


def _say(c: ScaleConfig, what: str, verbose: bool) -> None:
    if verbose:
        print(f"bench scale [{c.name}]: {what}", file=sys.stderr, flush=True)


def run_one(c: ScaleConfig, *, steps: int = 2, rss_limit: int = 20 * GiB, available: int | None = None,
            verbose: bool = False) -> dict:
    """Build, compile and time the QLoRA step of one shape; returns the measured figures."""
    import psutil

    available = psutil.virtual_memory().available if available is None else available
    model = check_fits(c, min(available, rss_limit))
    watch = _RssWatch(rss_limit)
    rss0 = watch.process.memory_info().rss
    t0 = time.perf_counter()
    frozen = build_base(c)
    jax.block_until_ready(frozen)
    build_s = time.perf_counter() - t0
    _say(c, f"built the 4-bit base in {build_s:.1f} s", verbose)
    rss_built = watch.process.memory_info().rss
    lora = init_lora(c, jax.random.key(1))
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(lora)
    tokens = jax.random.randint(jax.random.key(2), (c.batch, c.seq + 1), 0, c.vocab)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    step = make_step(c, optimizer)
    t0 = time.perf_counter()
    compiled = step.lower(lora, frozen, opt_state, inputs, targets).compile()
    compile_s = time.perf_counter() - t0
    _say(c, f"compiled the step in {compile_s:.1f} s", verbose)
    analysis = compiled.memory_analysis()
    watch.reset()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        lora, opt_state, loss = compiled(lora, frozen, opt_state, inputs, targets)
        losses.append(float(jax.block_until_ready(loss)))
        times.append(time.perf_counter() - t0)
        _say(c, f"step {len(times)}: {times[-1]:.1f} s, loss {losses[-1]:.4f}, "
                f"peak RSS {watch.peak / GiB:.2f} GiB", verbose)
    step_peak = watch.peak
    watch.stop()
    return {
        "name": c.name,
        "config": dataclasses.asdict(c),
        "num_params": c.num_params,
        "trainable": c.trainable,
        "quantized_base_bytes": sum(q.nbytes for q in frozen["layers"].values()),
        "dequantized_fp32_bytes": dequantized_fp32_bytes(c),
        "memory_model": model,
        "memory_model_total": sum(model.values()),
        "rss_start": rss0,
        "rss_after_build": rss_built,
        "rss_peak_step": step_peak,
        "rss_peak_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "xla": {
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes),
            "alias_bytes": int(analysis.alias_size_in_bytes),
            "temp_bytes": int(analysis.temp_size_in_bytes),
        },
        "build_s": build_s,
        "compile_s": compile_s,
        "step_s": times,
        "losses": losses,
    }


# ----------------------------------------------------------------------------- report


def _table(results: list[dict]) -> str:
    lines = [
        "| shape | params | 4-bit base | fp32 kernels (plain path) | XLA step temp | model estimate | "
        "peak RSS (step) | step time | tokens/s | loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c = r["config"]
        step = float(np.median(r["step_s"]))
        lines.append(
            f"| {r['name']} (h{c['hidden']}, L{c['layers']}, mlp {c['mlp']}) | {r['num_params'] / 1e9:.2f}B | "
            f"{r['quantized_base_bytes'] / GiB:.2f} GiB | {r['dequantized_fp32_bytes'] / GiB:.1f} GiB | "
            f"{r['xla']['temp_bytes'] / MiB:.0f} MiB | {r['memory_model_total'] / GiB:.2f} GiB | "
            f"{r['rss_peak_step'] / GiB:.2f} GiB | {step:.1f} s | {c['batch'] * c['seq'] / step:.1f} | "
            f"{r['losses'][0]:.3f} |"
        )
    return "\n".join(lines)


def _model_table(r: dict) -> str:
    lines = [f"Memory model of `{r['name']}` against the measurement:", "",
             "| component | bytes |", "|---|---:|"]
    lines += [f"| {k} | {v / MiB:,.0f} MiB |" for k, v in r["memory_model"].items()]
    lines.append(f"| **estimate** | **{r['memory_model_total'] / MiB:,.0f} MiB** |")
    lines.append(f"| measured peak RSS during the step | {r['rss_peak_step'] / MiB:,.0f} MiB |")
    lines.append(f"| measured peak RSS of the process (incl. building) | {r['rss_peak_process'] / MiB:,.0f} MiB |")
    x = r["xla"]
    lines.append(f"| XLA: step arguments / temporaries | {x['argument_bytes'] / MiB:,.0f} / "
                 f"{x['temp_bytes'] / MiB:,.0f} MiB |")
    return "\n".join(lines)


def _plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    big = [r for r in results if r["name"] != "tiny"] or results
    n = [r["num_params"] / 1e9 for r in big]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(n, [r["rss_peak_step"] / GiB for r in big], "o-", label="measured peak RSS (step)")
    left.plot(n, [r["memory_model_total"] / GiB for r in big], "s--", label="memory model")
    left.plot(n, [r["quantized_base_bytes"] / GiB for r in big], "^:", label="4-bit base")
    left.plot(n, [r["dequantized_fp32_bytes"] / GiB for r in big], "x:", label="kernels in fp32 (not held)")
    left.axhline(24, color="grey", lw=0.8)
    left.text(n[0], 24.3, "machine: 24 GiB", fontsize=8)
    left.set_xlabel("parameters (billions)")
    left.set_ylabel("GiB")
    left.legend(fontsize=8)
    left.set_title("QLoRA step memory")
    right.plot(n, [float(np.median(r["step_s"])) for r in big], "o-")
    right.set_xlabel("parameters (billions)")
    right.set_ylabel("seconds per step (batch 1 x 256)")
    right.set_title("QLoRA step time, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jaxpeft bench scale", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1b,3b,7b", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rss-limit", type=float, default=20.0, help="GiB; the process is killed past it")
    p.add_argument("--memory-limit", type=float, default=None, help="GiB to plan for (default: available)")
    p.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one size, JSON to --out
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    available = None if args.memory_limit is None else int(args.memory_limit * GiB)
    rss_limit = int(args.rss_limit * GiB)
    if args.one is not None:
        result = run_one(SHAPES[args.one], steps=args.steps, rss_limit=rss_limit, available=available, verbose=True)
        pathlib.Path(args.out).write_text(json.dumps(result))
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        p.error(f"unknown size(s) {unknown}; known: {', '.join(SHAPES)}")
    import psutil

    for s in sizes:  # every estimate before any process builds anything
        check_fits(SHAPES[s], min(rss_limit, available or psutil.virtual_memory().available))
    results = []
    root = pathlib.Path(__file__).resolve().parent.parent
    for s in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--one", s, "--out", str(out),
                   "--steps", str(args.steps), "--rss-limit", str(args.rss_limit)]
            if args.memory_limit is not None:
                cmd += ["--memory-limit", str(args.memory_limit)]
            print(f"bench scale: {s} ...", flush=True)
            done = subprocess.run(cmd, cwd=root)
            if done.returncode:
                print(f"bench scale: {s} failed (exit {done.returncode})", file=sys.stderr)
                return done.returncode
            results.append(json.loads(out.read_text()))
    from benchmarks.common import machine, write

    table = _table(results)
    notes = "\n\n".join(_model_table(r) for r in results)
    text = (
        "One QLoRA train step (AdamW on LoRA r=16 on all 7 linear kernels of every layer; NF4 + double "
        "quantization base, block 64; fp32 compute; batch 1 x 256; layers scanned and rematerialised), "
        "each shape in its own process. Peak RSS is sampled every 50 ms during the timed steps; "
        "XLA step temp is `compiled.memory_analysis().temp_size_in_bytes`.\n\n"
        f"{table}\n\n{notes}\n\nCommand: `jaxpeft bench scale --sizes {','.join(sizes)} --steps {args.steps}`\n"
    )
    command = f"jaxpeft bench scale --sizes {','.join(sizes)} --steps {args.steps}"
    payload = {"machine": machine(), "command": command, "results": results}
    write("scale", payload, text, save=not args.no_save)
    if not args.no_save:
        from benchmarks.common import RESULTS

        _plot(results, RESULTS / "scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
