"""jaxpeft against other PEFT libraries on the same work: ``jaxpeft bench peers``.

Every peer trains jaxpeft's reference LM (``LMConfig.bench()``, batch 8 x 128, fp32, AdamW) from the
same weights, batch and LoRA ``A`` init (``benchmarks/peers/shared.py`` writes them once to an .npz
that every peer loads), each run in its own process, the peers interleaved over rounds. Figures per
(row, peer): compile time (first step minus the median step), median step time, tokens/s, peak RSS,
trainable count, step-time ratio to jaxpeft, and the loss after one step (every peer must agree).

``--quick``: the tiny LM, batch 2 x 16, one round of 3 steps; ``tests/test_peers.py`` runs it.

The row ``mixed`` is mixed-adapter inference, 8 adapters with one example each: ``bench_mixed_peft`` (the
real MiniLM, jaxpeft's mixed batch against HF PEFT's ``adapter_names=`` and each library's loop, the same
exported adapters) and ``bench_adapters`` (every site method against a loop, 1 / 16 / 128 tokens per
example), each in its own process; their tables go to ``benchmarks/results/peers_mixed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from benchmarks.common import machine, write
from benchmarks.peers import shared as S
from benchmarks.peers.worker import JAX_PEERS, TORCH_PEERS

BASELINE = "jaxpeft-linen"
# The rows a peer cannot do: flax's nnx.LoRA and qwix have no DoRA; nnx.LoRA has no quantized base; qwix is
# (Q)LoRA only (its full fine-tuning would be plain NNX, which nnx-lora's full row already is). On the QLoRA
# rows qwix-lora is qwix's QLoRA (its NF4 weights) and peft-* is HF PEFT on bitsandbytes' Linear4bit.
NOT_DONE = {"nnx-lora": (*S.DORA_ROWS, *S.QLORA_ROWS), "qwix-lora": (*S.DORA_ROWS, "full")}
ROW_PEERS = {row: tuple(p for p in JAX_PEERS + TORCH_PEERS if row not in NOT_DONE.get(p, ())) for row in S.ROWS}
# The loss after one step must agree to this relative tolerance (fp32; XLA and torch sum in different orders).
LOSS_RTOL = 1e-4


def run_peer(peer: str, row: str, path: pathlib.Path, steps: int, cache_dir: str | None = None,
             extra_env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> dict:
    """One fresh process; its ``PEER_RESULT`` line parsed. ``cache_dir``: JAX's persistent compilation cache.

    ``extra_env``: variables set for this process (an allocator or XLA setting under test); ``prefix``: a
    command the worker runs under (``perf record ... --``)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)  # set by the test suite; figures time optimized programs
    if cache_dir is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(extra_env or {})
    proc = subprocess.run([*prefix, sys.executable, "-m", "benchmarks.peers.worker", peer, row, str(path), str(steps)],
                          capture_output=True, text=True, env=env, cwd=pathlib.Path(__file__).resolve().parent.parent)
    for line in proc.stdout.splitlines():
        if line.startswith("PEER_RESULT "):
            return json.loads(line[len("PEER_RESULT "):])
    raise RuntimeError(f"peer {peer} on row {row} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def measure(rows, peers_of, quick: bool, rounds: int, steps: int, cache_dir: str | None = None,
            extra_env: dict[str, str] | None = None) -> list[dict]:
    batch, seq = S.batch_shape(quick)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "shared.npz"
        S.make(path, quick)
        runs: dict[tuple[str, str], list[dict]] = {}
        for _ in range(rounds):  # interleaved: every peer once per round, so load changes hit all alike
            for row in rows:
                for peer in peers_of[row]:
                    r = run_peer(peer, row, path, steps, cache_dir, extra_env)
                    runs.setdefault((row, peer), []).append(r)
                    print(f"{row} {peer}: first step {r['step_seconds'][0]:.2f} s, median of the rest "
                          f"{statistics.median(r['step_seconds'][1:]):.4f} s, loss after one step {r['losses'][1]:.6f}",
                          file=sys.stderr, flush=True)  # progress, and the raw figures if the run is cut short
    out = []
    for (row, peer), results in runs.items():
        step = statistics.median(t for r in results for t in r["step_seconds"][1:])
        first = statistics.median(r["step_seconds"][0] for r in results)
        out.append({
            "row": row, "peer": peer, "trainable_params": results[0]["trainable_params"],
            "loss_initial": results[0]["losses"][0], "loss_after_one_step": results[0]["losses"][1],
            "step_seconds": step, "compile_seconds": max(first - step, 0.0), "tokens_per_second": batch * seq / step,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results), "runs": len(results),
            # per step, the first (compiling) one left out: CPU seconds (user + system), system seconds, minor faults
            **{k: statistics.median(x for r in results for x in r[k][1:])
               for k in ("cpu_seconds", "sys_seconds", "minor_faults")},
        })
    for r in out:
        base = next(b for b in out if b["row"] == r["row"] and b["peer"] == BASELINE)
        r["step_ratio_vs_jaxpeft"] = r["step_seconds"] / base["step_seconds"]
        r["same_work"] = (r["trainable_params"] == base["trainable_params"]
                          and abs(r["loss_after_one_step"] - base["loss_after_one_step"])
                          <= LOSS_RTOL * abs(base["loss_after_one_step"]))
    return out


def table(rows: list[dict]) -> str:
    head = ("| work | peer | trainable | loss after 1 step | compile | step | tokens/s | peak RSS | vs jaxpeft "
            "| CPU / step (system) | page faults / step |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(
        f"| {r['row']} | {r['peer']} | {r['trainable_params']:,} | {r['loss_after_one_step']:.6f} | "
        f"{r['compile_seconds']:.2f} s | {1e3 * r['step_seconds']:.1f} ms | {r['tokens_per_second']:,.0f} | "
        f"{r['peak_rss_bytes'] / 2**20:.0f} MiB | {r['step_ratio_vs_jaxpeft']:.2f}x | "
        f"{1e3 * r['cpu_seconds']:.0f} ms ({1e3 * r['sys_seconds']:.0f}) | {r['minor_faults']:,.0f} |" for r in rows)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Median step time of every peer, grouped by row (the figure the README shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = list(dict.fromkeys(r["row"] for r in rows))
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    width = 0.8 / len(peers)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, peer in enumerate(peers):
        xs, ys = [], []
        for j, work in enumerate(works):
            hit = [r for r in rows if r["row"] == work and r["peer"] == peer]
            if hit:
                xs.append(j + (i - (len(peers) - 1) / 2) * width)
                ys.append(1e3 * hit[0]["step_seconds"])
        ax.bar(xs, ys, width, label=peer)
    ax.set_xticks(range(len(works)), works)
    ax.set_ylabel("median train step (ms), lower is better")
    ax.set_title("Same work, each peer in its own process (2 CPU cores)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


MIXED = "mixed"


def mixed_rows(quick: bool) -> int:
    """The mixed-adapter inference rows: both scripts in fresh processes, their tables in peers_mixed.*."""
    root = pathlib.Path(__file__).resolve().parent.parent
    parts, payload = [], {"machine": machine(), "runs": {}}
    for name, results in (("mixed_peft", "mixed_peft"), ("adapters", "mixed_adapters")):  # script, its results file
        cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", *(["--quick"] if quick else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        if proc.returncode != 0:
            print(f"bench_{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        if not quick:
            result = root / "benchmarks" / "results" / results
            payload["runs"][name] = json.loads(result.with_suffix(".json").read_text())
            body = result.with_suffix(".md").read_text().split("\n", 3)[3]  # without its title and date line
            parts.append(f"## `python -m benchmarks.bench_{name}`\n\n{body.strip()}\n")
    if not quick:
        write("peers_mixed", payload, "Mixed-adapter inference, 8 adapters with one example each.\n\n" + "\n".join(parts))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_peers")
    p.add_argument("--quick", action="store_true", help="tiny LM, one round of 3 steps (checks same work)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="steps per run; the first one compiles")
    p.add_argument("--rows", default=",".join(S.ROWS), help=f"comma-separated, from {', '.join(S.ROWS)}, {MIXED}")
    p.add_argument("--peers", default=None, help="comma-separated peers (default: all of each row)")
    p.add_argument("--no-torch", action="store_true", help="only the JAX peers")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="JAX's persistent compilation cache for the JAX peers: repeated runs skip XLA compilation")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for every peer's process alike (e.g. an allocator setting)")
    args = p.parse_args(argv)
    extra_env = {}
    for item in args.env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise SystemExit(f"--env: expected NAME=VALUE, got {item!r}")
        extra_env[name] = value
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in S.ROWS and r != MIXED:
            raise SystemExit(f"--rows: unknown row {r!r}; known: {', '.join(S.ROWS)}, {MIXED}")
    mixed = MIXED in rows
    rows = [r for r in rows if r != MIXED]
    if not rows:
        return mixed_rows(args.quick)
    wanted = None if args.peers is None else {BASELINE, *args.peers.split(",")}
    peers_of = {r: tuple(p for p in ROW_PEERS[r] if (wanted is None or p in wanted)
                         and not (args.no_torch and p in TORCH_PEERS)) for r in rows}
    rounds, steps = (1, 3) if args.quick else (args.rounds, args.steps)
    results = measure(rows, peers_of, args.quick, rounds, steps, args.compilation_cache, extra_env)
    c = S.config(args.quick)
    batch, seq = S.batch_shape(args.quick)
    payload = {"machine": {**machine(), **_versions(), "load_average": os.getloadavg()},
               "command": "python -m benchmarks.bench_peers " + " ".join(argv if argv is not None else sys.argv[1:]),
               "config": {k: str(v) for k, v in vars(c).items()}, "batch": batch, "seq": seq,
               "rounds": rounds, "steps": steps, "compilation_cache": args.compilation_cache, "env": extra_env, "rank": S.RANK, "alpha": S.ALPHA, "rows": results}
    text = (f"Reference LM ({c.num_layers} layers, d_model {c.d_model}, d_ff {c.d_ff}, vocab {c.vocab_size}), "
            f"batch {batch} x {seq}, fp32, AdamW, LoRA r={S.RANK}; {rounds} interleaved rounds of {steps} steps, "
            f"each peer in its own process; load average {payload['machine']['load_average']}"
            + (f"; every peer's environment: {' '.join(f'`{k}={v}`' for k, v in extra_env.items())}" if extra_env else "")
            + ".\n\n" + table(results))
    write("peers", payload, text, save=not args.quick)
    if not args.quick:
        plot(results, pathlib.Path(__file__).resolve().parent / "results" / "peers.png")
    bad = [f"{r['row']}/{r['peer']}" for r in results if not r["same_work"]]
    if bad:
        print(f"NOT THE SAME WORK as {BASELINE}: {', '.join(bad)}", file=sys.stderr)
        return 1
    return mixed_rows(args.quick) if mixed else 0


def _versions() -> dict:
    out = {}
    for name in ("torch", "peft", "transformers", "qwix", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # absent or broken: the figure says so
            out[name] = None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
