"""4-bit base weights: storage, accuracy, and the cost of dequantize + matmul inside jit.

Run: ``python -m benchmarks.bench_quant`` (``--quick``: small shapes, prints only,
a check that the script runs).
Writes ``benchmarks/results/quant_<platform>.{json,md}``.

Three parts, one process:

1. Bytes and bits per parameter of the kernels of a Llama-7B-shaped decoder layer in fp32, bf16,
   int8, int4, NF4 and NF4 with double quantization, from the ``nbytes`` of the real arrays.
2. Mean squared error of NF4, FP4 and int4 (block 64) on N(0, 1) weights (the QLoRA claim).
3. Time of a jitted ``qmatmul`` (dequantize to bf16, then matmul with float32 accumulation)
   against plain bf16 and fp32 matmuls, for 4096x4096 and 4096x11008 kernels and 256 / 512
   tokens; medians of interleaved runs after warmup. Plus the dequantization layouts we tried.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxpeft.quant as jq
from benchmarks.common import block, machine, write
from jaxpeft.quant import _packing

F32, BF16 = jnp.float32, jnp.bfloat16

# One Llama-7B decoder layer (Flax [d_in, d_out] kernels), plus a DenseGeneral attention kernel.
LAYER = {
    "attn/query (DenseGeneral)": (4096, 32, 128),
    "attn/key": (4096, 4096),
    "attn/value": (4096, 4096),
    "attn/out": (4096, 4096),
    "mlp/gate": (4096, 11008),
    "mlp/up": (4096, 11008),
    "mlp/down": (11008, 4096),
}
FORMATS = {
    "fp32": None,
    "bf16": None,
    "int8 (per column)": dict(scheme="int8", block_size=None),
    "int8 (block 64)": dict(scheme="int8", block_size=64),
    "int4 (block 64)": dict(scheme="int4", block_size=64),
    "nf4 (block 64)": dict(scheme="nf4", block_size=64),
    "nf4 + double quant": dict(scheme="nf4", block_size=64, double_quant=True),
}


def timed(fns: dict, repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median and min milliseconds per call, run round-robin so machine noise hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            block(f())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            block(f())
            times[k].append(time.perf_counter() - t)
    return {k: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v)} for k, v in times.items()}


def storage(layer: dict) -> list[dict]:
    rows = []
    key = jax.random.key(0)
    weights = {}
    for i, (name, shape) in enumerate(layer.items()):
        weights[name] = jax.random.normal(jax.random.fold_in(key, i), shape) * 0.02
    n = sum(int(np.prod(s)) for s in layer.values())
    for fmt, kwargs in FORMATS.items():
        if kwargs is None:
            nbytes = sum(int(w.astype(F32 if fmt == "fp32" else BF16).nbytes) for w in weights.values())
        else:
            nbytes = 0
            for w in weights.values():
                q = jq.quantize_array(w, **kwargs)
                nbytes += sum(int(x.nbytes) for x in jax.tree.leaves(q))  # the real children
        rows.append({"format": fmt, "bytes": nbytes, "bits_per_param": nbytes * 8 / n, "params": n})
    return rows


def mse_on_normal(shape: tuple[int, int]) -> dict[str, float]:
    w = jax.random.normal(jax.random.key(1), shape)
    out = {}
    for scheme in ("nf4", "fp4", "int4"):
        for dq in (False, True):
            q = jq.quantize_array(w, scheme=scheme, block_size=64, double_quant=dq)
            out[scheme + (" + dq" if dq else "")] = float(jnp.mean((jq.dequantize_array(q) - w) ** 2))
    return out


# ----------------------------------------------------------------------------- layouts we tried
# Alternatives to the library's shift/mask + 16-entry lookup, kept here so the figures that
# justify the choice come from code. Each returns the bf16 kernel of a QuantizedArray (NF4).


def _scaled(values, q):
    s = jq._array._dequantize_scales(q)
    rest = q.packed.shape[1:]
    return (values.reshape(s.shape[0], -1, *rest) * s[:, None]).reshape(q.shape).astype(BF16)


def _two_byte_luts(q):  # hi[b] = table[b >> 4], lo[b] = table[b & 15]: two 256-entry gathers
    t = jq.NF4_VALUES
    p = q.packed
    v = jnp.stack([jnp.asarray(np.repeat(t, 16))[p], jnp.asarray(np.tile(t, 16))[p]], axis=1)
    return _scaled(v.reshape(2 * p.shape[0], *p.shape[1:]), q)


def _byte_pair_lut(q):  # one [256, 2] gather per byte, pair axis moved next to the input axis
    t = jq.NF4_VALUES
    lut = jnp.asarray(np.stack([np.repeat(t, 16), np.tile(t, 16)], -1))
    p = q.packed
    return _scaled(jnp.moveaxis(lut[p], -1, 1).reshape(2 * p.shape[0], *p.shape[1:]), q)


def _select_tree(q):  # no gather: 15 selects on the 4 code bits
    codes = _packing.unpack_nibbles(q.packed.astype(jnp.int32), 2 * q.packed.shape[0])
    level = [jnp.float32(v) for v in jq.NF4_VALUES]
    for bit in range(4):
        on = ((codes >> bit) & 1) == 1
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return _scaled(level[0], q)


def _bf16_arithmetic(q):  # table and scales in bf16, multiply in bf16
    codes = _packing.unpack_nibbles(q.packed, 2 * q.packed.shape[0])
    values = jnp.asarray(jq.NF4_VALUES, BF16)[codes]
    s = jq._array._dequantize_scales(q).astype(BF16)
    return (values.reshape(s.shape[0], -1, *q.packed.shape[1:]) * s[:, None]).reshape(q.shape)


VARIANTS = {
    "shift/mask + 16-entry lookup (library)": lambda q: jq.dequantize_array(q, BF16),
    "two 256-entry byte lookups": _two_byte_luts,
    "256x2 byte->pair lookup": _byte_pair_lut,
    "select tree (no gather)": _select_tree,
    "bf16 arithmetic": _bf16_arithmetic,
}


def _mm_f32acc(x, w):
    return jnp.matmul(x, w, preferred_element_type=F32).astype(BF16)


def matmul_timings(shapes, token_counts, repeats) -> list[dict]:
    rows = []
    for d_in, d_out in shapes:
        w = jax.random.normal(jax.random.key(2), (d_in, d_out)) * 0.02
        w_bf16 = w.astype(BF16)
        q_dq = jq.quantize_array(w, scheme="nf4", double_quant=True)
        q_nf4 = jq.quantize_array(w, scheme="nf4")
        q_int8 = jq.quantize_array(w, scheme="int8", block_size=None)
        for tokens in token_counts:
            x = jax.random.normal(jax.random.key(3), (tokens, d_in)).astype(BF16)
            x32 = x.astype(F32)
            fns = {
                "fp32 matmul": (jax.jit(lambda x, w: x @ w), (x32, w)),
                "bf16 matmul (x @ w)": (jax.jit(lambda x, w: x @ w), (x, w_bf16)),
                "bf16 matmul, f32 accumulation": (jax.jit(_mm_f32acc), (x, w_bf16)),
                "nf4+dq dequantize only": (jax.jit(lambda q: jq.dequantize_array(q, BF16)), (q_dq,)),
                "nf4+dq qmatmul": (jax.jit(lambda x, q: jq.qmatmul(x, q, BF16)), (x, q_dq)),
                "nf4 qmatmul": (jax.jit(lambda x, q: jq.qmatmul(x, q, BF16)), (x, q_nf4)),
                "int8 qmatmul": (jax.jit(lambda x, q: jq.qmatmul(x, q, BF16)), (x, q_int8)),
            }
            res = timed({k: (lambda f=f, a=a: f(*a)) for k, (f, a) in fns.items()}, repeats)
            base = res["bf16 matmul, f32 accumulation"]["median_ms"]
            base_min = res["bf16 matmul, f32 accumulation"]["min_ms"]
            default = res["bf16 matmul (x @ w)"]["median_ms"]
            for k, v in res.items():
                rows.append(
                    {
                        "kernel": f"{d_in}x{d_out}",
                        "tokens": tokens,
                        "op": k,
                        **v,
                        "vs_bf16_f32acc": v["median_ms"] / base,
                        "min_vs_bf16_f32acc": v["min_ms"] / base_min,
                        "vs_bf16_default": v["median_ms"] / default,
                    }
                )
            summary = ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in res.items())
            print(f"{d_in}x{d_out} tokens={tokens}: {summary}", flush=True)
    return rows


def variant_timings(shape, tokens, repeats) -> list[dict]:
    w = jax.random.normal(jax.random.key(2), shape) * 0.02
    q = jq.quantize_array(w, scheme="nf4", double_quant=True)
    x = jax.random.normal(jax.random.key(3), (tokens, shape[0])).astype(BF16)
    reference = jq.dequantize_array(q, BF16).astype(F32)
    fns, errors = {}, {}
    for name, f in VARIANTS.items():
        deq = jax.jit(f)
        errors[name] = float(jnp.max(jnp.abs(deq(q).astype(F32) - reference)))
        fns[name + " | dequantize"] = lambda deq=deq: deq(q)
        fns[name + " | +matmul"] = lambda f=f, mm=jax.jit(lambda x, q, f=f: _mm_f32acc(x, f(q))): mm(x, q)
    fns["bf16 matmul, f32 accumulation"] = lambda mm=jax.jit(_mm_f32acc), wb=w.astype(BF16): mm(x, wb)
    res = timed(fns, repeats)
    base = res.pop("bf16 matmul, f32 accumulation")["median_ms"]
    rows = []
    for name in VARIANTS:
        d, m = res[name + " | dequantize"], res[name + " | +matmul"]
        rows.append(
            {
                "variant": name,
                "dequantize_median_ms": d["median_ms"],
                "with_matmul_median_ms": m["median_ms"],
                "vs_bf16_f32acc": m["median_ms"] / base,
                "max_abs_diff_vs_library": errors[name],
            }
        )
    rows.append({"variant": "bf16 matmul, f32 accumulation (baseline)", "with_matmul_median_ms": base})
    return rows


def quantize_time(shape, repeats) -> dict:
    w = jax.random.normal(jax.random.key(4), shape).astype(BF16)
    f = lambda: jq.quantize_array(w, scheme="nf4", double_quant=True)  # noqa: E731
    return {"kernel": "x".join(map(str, shape)), **timed({"q": f}, repeats, warmup=1)["q"]}


def table(payload: dict) -> str:
    out = []
    n = payload["storage"][0]["params"]
    out.append(f"## Storage of one Llama-7B-shaped decoder layer ({n:,} kernel parameters)\n")
    out.append("| format | MiB | bits / param | vs bf16 |")
    out.append("|---|---:|---:|---:|")
    bf16 = next(r for r in payload["storage"] if r["format"] == "bf16")["bytes"]
    for r in payload["storage"]:
        mib, bits, ratio = r["bytes"] / 2**20, r["bits_per_param"], r["bytes"] / bf16
        out.append(f"| {r['format']} | {mib:.2f} | {bits:.4f} | {ratio:.3f} |")
    out.append("\nBits per parameter are the summed `nbytes` of every child array (codes, scales, "
               "second-level scales, offset) times 8 over the number of original elements.\n")
    mse = payload["mse_normal"]
    out.append(f"## Mean squared error on N(0, 1) weights, {payload['mse_shape']}, block 64\n")
    out.append("| scheme | MSE | vs NF4 |")
    out.append("|---|---:|---:|")
    for k, v in mse.items():
        out.append(f"| {k} | {v:.6f} | {v / mse['nf4']:.3f} |")
    out.append(f"\n## Jitted dequantize + matmul, median of {payload['repeats']} interleaved runs\n")
    out.append("Ratios are against the bf16 matmul with float32 accumulation (XLA:CPU's fast bf16 path, "
               "the one `qmatmul` uses) and against plain `x @ w` in bf16 (which XLA:CPU upcasts to f32).\n")
    out.append("The min-over-min ratio is the least disturbed by other processes on a shared machine.\n")
    out.append(
        "| kernel | tokens | op | median ms | min ms | / bf16 f32-acc (medians) | / bf16 f32-acc (mins) "
        "| / bf16 `x @ w` |"
    )
    out.append("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in payload["matmul"]:
        out.append(
            f"| {r['kernel']} | {r['tokens']} | {r['op']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
            f"{r['vs_bf16_f32acc']:.2f} | {r['min_vs_bf16_f32acc']:.2f} | {r['vs_bf16_default']:.2f} |"
        )
    v = payload["variants"]
    out.append(
        f"\n## Dequantization layouts tried ({v['kernel']}, {v['tokens']} tokens, NF4 + double quant, bf16 out)\n"
    )
    out.append("| variant | dequantize ms | + matmul ms | / bf16 f32-acc | max diff vs library |")
    out.append("|---|---:|---:|---:|---:|")
    for r in v["rows"]:
        if "dequantize_median_ms" in r:
            out.append(
                f"| {r['variant']} | {r['dequantize_median_ms']:.1f} | {r['with_matmul_median_ms']:.1f} | "
                f"{r['vs_bf16_f32acc']:.2f} | {r['max_abs_diff_vs_library']:.1e} |"
            )
        else:
            out.append(f"| {r['variant']} | | {r['with_matmul_median_ms']:.1f} | 1.00 | |")
    qt = payload["quantize_time"]
    out.append(
        f"\nQuantizing a {qt['kernel']} bf16 kernel to NF4 + double quant takes {qt['median_ms']:.0f} ms (median)."
    )
    la, m = payload["load_average"], payload["machine"]
    out.append(f"\nCPU: {m['cpu']}, nproc {m['nproc']}. Load average (1 min) at start / end: "
               f"{la['start']:.2f} / {la['end']:.2f} (shared machine: other processes may have run).")
    return "\n".join(out)


def cpu_model() -> str:
    """CPU model name and the vector extensions that matter here (Linux only)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    lines = info.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(wanted)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_quant")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: checks the script runs")
    args = p.parse_args(argv)
    load_start = os.getloadavg()[0]
    if args.quick:
        layer = {"a": (256, 256), "b": (256, 8, 16)}
        shapes, token_counts, repeats, mse_shape, var_shape = [(256, 512)], [64], 2, (256, 256), (256, 256)
    else:
        layer = LAYER
        shapes, token_counts, repeats = [(4096, 4096), (4096, 11008)], [256, 512], args.repeats
        mse_shape, var_shape = (4096, 4096), (4096, 4096)
    payload = {
        "machine": {**machine(), "nproc": len(os.sched_getaffinity(0)), "cpu": cpu_model()},
        "repeats": repeats,
    }
    payload["storage"] = storage(layer)
    payload["mse_shape"] = "x".join(map(str, mse_shape))
    payload["mse_normal"] = mse_on_normal(mse_shape)
    payload["matmul"] = matmul_timings(shapes, token_counts, repeats)
    payload["variants"] = {
        "kernel": "x".join(map(str, var_shape)),
        "tokens": token_counts[-1],
        "rows": variant_timings(var_shape, token_counts[-1], repeats),
    }
    payload["quantize_time"] = quantize_time(var_shape, max(2, repeats // 5))
    payload["load_average"] = {"start": load_start, "end": os.getloadavg()[0]}
    if args.quick:  # a check that the script runs: print, keep the committed results
        print(table(payload))
    else:
        write(f"quant_{jax.devices()[0].platform}", payload, table(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
