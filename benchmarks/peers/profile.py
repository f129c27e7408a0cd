"""Where jaxpeft's train step spends its time on XLA:CPU, against HF PEFT on torch.

``python -m benchmarks.peers.profile`` writes ``benchmarks/results/peers_profile.{json,md}``:

1. **the program**: jaxpeft-linen's compiled step on the ``--row`` (FLOPs from XLA's cost analysis, the
   temp buffer from its memory analysis, how many dots went to YNNPACK);
2. **the matmuls alone**: each dense shape of the bench LM's step, ``[tokens, in] x [in, out]``, under
   ``jax.jit`` and in torch, each library in its own process, interleaved over ``--rounds``;
3. **the step under allocator settings**: every (peer, setting) in its own process, interleaved over
   ``--rounds``: median step, CPU and system seconds per step, minor page faults per step, peak RSS and
   the loss after one step (a setting that changed the math would show there);
4. with ``--perf`` (needs ``perf``): where each peer's CPU time goes in its steady steps, from ``perf
   record`` samples (the compiling first step and the second are left out), in buckets of symbols.

``--quick``: the tiny LM, one round, no perf (a smoke test of the harness).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchmarks.peers import shared as S

# Allocator settings a user can set for any process, none of which changes a result. XLA:CPU allocates
# the step's whole temp buffer with one aligned malloc per execution; above glibc's mmap threshold (at
# most 32 MiB) that is a fresh mmap, unmapped when freed, so every step faults it in again, 4 KiB at a time.
VARIANTS = {
    "default": {},
    # glibc >= 2.35: malloc's mmapped chunks get transparent huge pages (madvise), 2 MiB per fault
    "thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    # one arena, no mmap, no trimming: freed memory stays in the heap and is reused by the next step
    "no-mmap": {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)},
    # XLA:CPU's dots through Eigen instead of YNNPACK (the default in jax 0.10); JAX peers only. It sums in
    # another order, so the loss moves in the last digits: a setting to measure, not to hide in a figure.
    "eigen-dots": {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="},
}
JAX_ONLY = ("eigen-dots",)
# The bench LM's dense shapes at batch 8 x 128 (1024 tokens): (tokens, in, out) of query/key/value/out, up, down
DOT_SHAPES = ((1024, 512, 512), (1024, 512, 2048), (1024, 2048, 512))
QUICK_DOT_SHAPES = ((32, 32, 32), (32, 32, 64), (32, 64, 32))
# perf symbol buckets, first match wins; matched against "dso symbol"
BUCKETS = (
    ("matmul kernels", r"ynn::dot|mkl_blas|sgemm|gemm|gebp|TensorContraction|dnnl|brgemm"),
    ("thread pool: spinning and waiting", r"libgomp|SlinkyThreadPool|ThreadPoolTempl|futex|sched_yield|WorkerLoop"),
    ("kernel (page faults, zeroing, scheduling)", r"\[kernel"),
    ("XLA-generated fusions", r"\[JIT\]|^\s*\[unknown\]|perf-\d+\.map"),
    ("other YNNPACK ops (transposes, elementwise)", r"ynn::"),
    ("torch elementwise and attention (ATen)", r"libtorch|libc10|Sleef"),
    ("Python", r"libpython"),
    ("other", r""),
)


def dots_worker(which: str, shapes) -> dict:
    """Median seconds of each ``[m, k] x [k, n]`` fp32 matmul, in this process, under ``which`` library."""
    import time

    import numpy as np

    def median_time(f, n: int = 20) -> float:
        f(), f()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    rng = np.random.default_rng(0)
    out = {}
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        if which == "jax":
            import jax

            x, y = jax.device_put(a), jax.device_put(b)
            f = jax.jit(lambda p, q: p @ q)
            out[f"{m}x{k}x{n}"] = median_time(lambda: f(x, y).block_until_ready())
        else:
            import torch

            x, y = torch.from_numpy(a), torch.from_numpy(b)
            out[f"{m}x{k}x{n}"] = median_time(lambda: x @ y)
    return out


def faults_worker(size: int, repeats: int = 10) -> dict:
    """What XLA:CPU does with its temp buffer each step, alone: ``posix_memalign`` of ``size`` bytes, every
    byte written once (``memset``), ``free``. Medians per round trip: wall, system seconds, minor faults."""
    import ctypes
    import resource
    import time

    libc = ctypes.CDLL(None)
    walls, systems, faults = [], [], []
    for _ in range(repeats):
        before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        ptr = ctypes.c_void_p()
        if libc.posix_memalign(ctypes.byref(ptr), 64, ctypes.c_size_t(size)) != 0:
            raise MemoryError(f"posix_memalign({size}) failed")
        ctypes.memset(ptr, 1, size)
        libc.free(ptr)
        after = resource.getrusage(resource.RUSAGE_SELF)
        walls.append(time.perf_counter() - t)
        systems.append(after.ru_stime - before.ru_stime)
        faults.append(after.ru_minflt - before.ru_minflt)
    return {"seconds": statistics.median(walls), "sys_seconds": statistics.median(systems),
            "minor_faults": statistics.median(faults)}


def program(row: str, arrays: dict) -> dict:
    """jaxpeft-linen's compiled step on ``row``: FLOPs, temp bytes and the ops XLA:CPU emitted."""
    from benchmarks.peers.jax_peers import linen_train_step

    train_step, args = linen_train_step(row, arrays)
    compiled = train_step.lower(*args).compile()
    text = compiled.as_text()
    entry = text[text.index("\nENTRY"):]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        "flops": float(cost["flops"]), "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "ynn_fusions": entry.count('"kind":"__ynn_fusion"'),
        "plain_dots": len(re.findall(r"= \S+ dot\(", entry)),
        "loop_fusions": len(re.findall(r"kind=kLoop", entry)),
    }


def perf_buckets(data: pathlib.Path, start: float, stop: float) -> dict[str, float]:
    """Share of ``perf record`` samples between ``start`` and ``stop`` (CLOCK_MONOTONIC seconds) per bucket."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "-g", "none",
                             "-q", "--stdio", "--percent-limit", "0", f"--time={start:.6f},{stop:.6f}"],
                            capture_output=True, text=True, check=True).stdout
    shares = dict.fromkeys(name for name, _ in BUCKETS)
    shares = {k: 0.0 for k in shares}
    for line in report.splitlines():
        hit = re.match(r"\s*([\d.]+)%\s+(.*)$", line)
        if not hit:
            continue
        share, what = float(hit.group(1)), hit.group(2)
        name = next(n for n, pattern in BUCKETS if re.search(pattern, what))
        shares[name] += share / 100
    return shares


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench_peers import run_peer, _versions
    from benchmarks.common import machine, write

    p = argparse.ArgumentParser(prog="benchmarks.peers.profile")
    p.add_argument("--quick", action="store_true", help="tiny LM, one round, no perf")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="steps per run; the first one compiles")
    p.add_argument("--row", default="lora_qv", choices=sorted(S.ROWS))
    p.add_argument("--peers", default="jaxpeft-linen,peft-eager,peft-compile")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {', '.join(VARIANTS)}")
    p.add_argument("--perf", action="store_true", help="perf-record each peer once (default allocator)")
    p.add_argument("--dots-worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--faults-worker", type=int, metavar="BYTES", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = QUICK_DOT_SHAPES if args.quick else DOT_SHAPES
    if args.dots_worker:
        print("DOTS " + json.dumps(dots_worker(args.dots_worker, shapes)))
        return 0
    if args.faults_worker:
        print("FAULTS " + json.dumps(faults_worker(args.faults_worker)))
        return 0
    peers = args.peers.split(",")
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"--variants: unknown {v!r}; known: {', '.join(VARIANTS)}")
    rounds, steps = (1, 3) if args.quick else (args.rounds, args.steps)
    if args.perf and (shutil.which("perf") is None or args.quick):
        raise SystemExit("--perf needs the perf tool on PATH, and a full run (not --quick)")
    root = pathlib.Path(__file__).resolve().parent.parent.parent
    env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "shared.npz"
        S.make(path, args.quick)
        prog = program(args.row, S.load(str(path)))
        dots: dict[str, list[dict]] = {"jax": [], "torch": []}
        allocs: dict[str, list[dict]] = {v: [] for v in variants if v not in JAX_ONLY}
        runs: dict[tuple[str, str], list[dict]] = {}
        for _ in range(rounds):  # interleaved: a change of load hits every library and setting alike
            for v in allocs:
                out = subprocess.run([sys.executable, "-m", "benchmarks.peers.profile", "--faults-worker",
                                      str(prog["temp_bytes"])], capture_output=True, text=True,
                                     env={**env, **VARIANTS[v]}, cwd=root, check=True).stdout
                allocs[v].append(json.loads(out.split("FAULTS ", 1)[1]))
            for which in dots:
                out = subprocess.run([sys.executable, "-m", "benchmarks.peers.profile", "--dots-worker", which,
                                      *(["--quick"] if args.quick else [])], capture_output=True, text=True,
                                     env=env, cwd=root, check=True).stdout
                dots[which].append(json.loads(out.split("DOTS ", 1)[1]))
            for peer in peers:
                for v in variants:
                    if v in JAX_ONLY and peer.startswith("peft"):
                        continue
                    r = run_peer(peer, args.row, path, steps, extra_env=VARIANTS[v])
                    runs.setdefault((peer, v), []).append(r)
                    print(f"{peer} [{v}]: median step {statistics.median(r['step_seconds'][1:]):.3f} s, "
                          f"faults/step {statistics.median(r['minor_faults'][1:]):.0f}", file=sys.stderr, flush=True)
        profiles = {}
        if args.perf:
            for peer in peers:
                data = pathlib.Path(tmp) / f"{peer}.perf"
                r = run_peer(peer, args.row, path, steps, prefix=("perf", "record", "-q", "-k", "CLOCK_MONOTONIC",
                                                                  "-F", "499", "-e", "cpu-clock", "-o", str(data), "--"))
                start = r["started_monotonic"][2]  # steps 0 (compile) and 1 left out
                stop = r["started_monotonic"][-1] + r["step_seconds"][-1]
                profiles[peer] = {"buckets": perf_buckets(data, start, stop),
                                  "step_seconds": statistics.median(r["step_seconds"][2:]),
                                  "cpu_seconds": statistics.median(r["cpu_seconds"][2:])}

    dot_rows = []
    for shape in dots["jax"][0]:
        j = statistics.median(d[shape] for d in dots["jax"])
        t = statistics.median(d[shape] for d in dots["torch"])
        m, k, n = map(int, shape.split("x"))
        dot_rows.append({"shape": shape, "jax_seconds": j, "torch_seconds": t, "jax_over_torch": j / t,
                         "jax_gflops": 2 * m * k * n / j / 1e9, "torch_gflops": 2 * m * k * n / t / 1e9})
    step_rows = []
    for (peer, v), results in runs.items():
        med = {k: statistics.median(x for r in results for x in r[k][1:])
               for k in ("step_seconds", "cpu_seconds", "sys_seconds", "minor_faults")}
        step_rows.append({"peer": peer, "variant": v, "env": VARIANTS[v], **med,
                          "loss_after_one_step": results[0]["losses"][1],
                          "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results), "runs": len(results)})
    for r in step_rows:
        base = next(b for b in step_rows if b["peer"] == r["peer"] and b["variant"] == variants[0])
        r["step_ratio_vs_first_variant"] = r["step_seconds"] / base["step_seconds"]
    alloc_rows = [{"variant": v, **{k: statistics.median(x[k] for x in xs) for k in xs[0]}} for v, xs in allocs.items()]
    payload = {"machine": {**machine(), **_versions(), "load_average": os.getloadavg()},
               "command": "python -m benchmarks.peers.profile " + " ".join(argv if argv is not None else sys.argv[1:]),
               "row": args.row, "rounds": rounds, "steps": steps, "program": prog, "temp_buffer_alone": alloc_rows,
               "dots": dot_rows,
               "steps_by_variant": step_rows, "perf": profiles}
    write("peers_profile", payload, _markdown(payload, variants), save=not args.quick)
    return 0


def _markdown(payload: dict, variants: list[str]) -> str:
    prog = payload["program"]
    lines = [
        f"Row `{payload['row']}`, {payload['rounds']} interleaved rounds of {payload['steps']} steps, load average "
        f"{tuple(round(x, 2) for x in payload['machine']['load_average'])}.",
        "",
        f"**The program** (jaxpeft-linen, XLA:CPU): {prog['flops'] / 1e9:.1f} GFLOP per step, a "
        f"{prog['temp_bytes'] / 2**20:.1f} MiB temp buffer (arguments {prog['argument_bytes'] / 2**20:.1f} MiB), "
        f"{prog['ynn_fusions']} YNNPACK fusions (dots, reductions), {prog['plain_dots']} dots left to XLA, {prog['loop_fusions']} loop fusions.",
        "",
        f"**The temp buffer alone** (`posix_memalign` of {prog['temp_bytes'] / 2**20:.1f} MiB, every byte written "
        "once, `free`: what XLA:CPU does with it each step; median of 10 per process):",
        "",
        "| setting | round trip | system | page faults |",
        "|---|---:|---:|---:|",
        *(f"| {a['variant']} | {1e3 * a['seconds']:.0f} ms | {1e3 * a['sys_seconds']:.0f} ms | {a['minor_faults']:,.0f} |"
          for a in payload["temp_buffer_alone"]),
        "",
        "**The matmuls alone** (fp32, median of 20 calls per process):",
        "",
        "| [m, k] x [k, n] | jax.jit | torch | jax / torch | jax GFLOP/s | torch GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {d['shape']} | {1e3 * d['jax_seconds']:.2f} ms | {1e3 * d['torch_seconds']:.2f} ms | "
          f"{d['jax_over_torch']:.2f}x | {d['jax_gflops']:.0f} | {d['torch_gflops']:.0f} |" for d in payload["dots"]),
        "",
        "**The step under allocator settings** (every figure a median over the steps after the first):",
        "",
        f"| peer | setting | step | vs {variants[0]} | CPU / step | system / step | page faults / step | peak RSS | loss after 1 step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['peer']} | {r['variant']} | {1e3 * r['step_seconds']:.0f} ms | {r['step_ratio_vs_first_variant']:.2f}x | "
          f"{1e3 * r['cpu_seconds']:.0f} ms | {1e3 * r['sys_seconds']:.0f} ms | {r['minor_faults']:,.0f} | "
          f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['loss_after_one_step']:.8f} |" for r in payload["steps_by_variant"]),
        "",
        "Settings: " + "; ".join(f"`{v}`: " + (" ".join(f"`{k}={x}`" for k, x in VARIANTS[v].items()) or "none")
                                 for v in variants) + f" ({', '.join(JAX_ONLY)}: the JAX peers only).",
    ]
    if payload["perf"]:
        names = [n for n, _ in BUCKETS]
        peers = list(payload["perf"])
        lines += ["", "**Where the CPU time goes** (perf samples of the steady steps, default allocator):", "",
                  "| bucket | " + " | ".join(peers) + " |", "|---|" + "---:|" * len(peers),
                  *(f"| {n} | " + " | ".join(f"{100 * payload['perf'][p]['buckets'][n]:.1f}%" for p in peers) + " |"
                    for n in names),
                  "| step (CPU) | " + " | ".join(f"{1e3 * payload['perf'][p]['step_seconds']:.0f} ms "
                                                 f"({1e3 * payload['perf'][p]['cpu_seconds']:.0f} ms)" for p in peers) + " |"]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
