"""Train-step time and compile time of the same PEFT rows on two versions of jaxpeft, interleaved.

Issue 9 asks that the binding redesign cost no step time beyond noise, quoted as before/after ratios from one
interleaved run. This script checks out ``--before`` (a git ref; default: the last commit before the redesign
began) into a temporary git worktree and times each row's jitted AdamW train step on the reference LM
(``LMConfig.bench()``, 8 x 128 tokens) with that tree's ``jaxpeft`` and with this checkout's, alternating the
two versions round by round, each round a fresh process (so compile time is measured too).

    python -m benchmarks.bench_before_after [--before REF] [--rounds 3] [--steps 6] [--quick] [--no-save]

The worker uses only API that both versions share (``jp.apply``, ``jp.lora`` / ``dora`` / ``ia3``,
``jp.partition`` / ``combine``, ``jp.make_train_step``, ``jp.cross_entropy``, ``jaxpeft.models.LinenLM``); it
checks that both versions start from the same loss, so a figure is never a comparison of different work.
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
import time

BEFORE = "1967038"  # 2026-11-25: the parent of 07b9f14, where the typed protocol and one Site for any layout began
ROOT = pathlib.Path(__file__).resolve().parent.parent
ROWS = ("full fine-tuning", "lora q/v", "lora all linear", "dora q/v", "ia3")


def _worker(rows: list[str], steps: int, quick: bool) -> None:
    """Runs in a child whose ``jaxpeft`` is the version under test; prints one JSON line."""
    import jax
    import optax

    import jaxpeft as jp
    from jaxpeft.models import LinenLM, LMConfig

    config = LMConfig.tiny() if quick else LMConfig.bench()
    model = LinenLM(config)
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (8, min(128, config.max_seq_len) + 1), 0, config.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    base = model.init(key, batch["inputs"])["params"]
    opt = optax.adamw(1e-4)
    methods = {
        "lora q/v": lambda: jp.lora(8, 16, targets=r"attn/(query|value)$"),
        "lora all linear": lambda: jp.lora(8, 16, targets=r"(query|key|value|out|up|down)$"),
        "dora q/v": lambda: jp.dora(8, 16, targets=r"attn/(query|value)$"),
        "ia3": lambda: jp.ia3(),
    }
    out = {"jaxpeft": str(pathlib.Path(jp.__file__).resolve().parent.parent), "rows": {}}
    for row in rows:
        if row == "full fine-tuning":
            apply_fn, params, selector = (lambda p, x: model.apply({"params": p}, x)), base, True
        else:
            peft_model, params = jp.apply(methods[row](), model, key, batch["inputs"], params=base)
            apply_fn, selector = peft_model.apply, peft_model.trainable
        trainable, frozen = jp.partition(params, selector)

        def loss_fn(t, f, b, rng, apply_fn=apply_fn):
            return jp.cross_entropy(apply_fn(jp.combine(t, f), b["inputs"]), b["targets"])[0]

        state = opt.init(trainable)
        step = jp.make_train_step(loss_fn, opt, donate=False)
        start = time.perf_counter()
        _, _, metrics = jax.block_until_ready(step(trainable, frozen, state, batch, None))
        compile_s = time.perf_counter() - start
        times, cpu = [], []
        for _ in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(step(trainable, frozen, state, batch, None))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        out["rows"][row] = {"compile_and_first_step_s": compile_s, "step_s": statistics.median(times),
                            "step_cpu_s": statistics.median(cpu), "first_loss": float(metrics["loss"])}
    print(json.dumps(out))


def _checkout(ref: str, into: pathlib.Path) -> pathlib.Path:
    """A detached git worktree of ``ref`` (its own files; this checkout is untouched)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(into), ref], check=True,
                   capture_output=True, text=True)
    return into


def _run(tree: pathlib.Path, rows: list[str], steps: int, quick: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)  # the test suite's setting; a benchmark runs as users do
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", json.dumps(rows), "--steps", str(steps)]
    cmd += ["--quick"] if quick else []
    done = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker on {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if pathlib.Path(result["jaxpeft"]) != tree.resolve():
        raise RuntimeError(f"worker imported jaxpeft from {result['jaxpeft']}, not {tree}")
    return result["rows"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.bench_before_after", description=__doc__.splitlines()[0])
    p.add_argument("--before", default=BEFORE, help=f"git ref of the version to compare with (default {BEFORE})")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="timed steps per row per round (median)")
    p.add_argument("--quick", action="store_true", help="tiny LM, 1 round, 2 steps: checks the script runs")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        _worker(json.loads(args.worker), args.steps, args.quick)
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    if rounds < 1 or steps < 1:
        p.error(f"--rounds and --steps must be >= 1, got {rounds} and {steps}")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], check=True,
                            capture_output=True, text=True).stdout.strip()
    after_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=True,
                                  capture_output=True, text=True).stdout.strip()
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="jaxpeft_before_"))
    trees = {"before": _checkout(args.before, scratch / "tree"), "after": ROOT}
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    try:
        for r in range(rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")  # neither always goes first
            for version in order:
                runs[version].append(_run(trees[version], rows, steps, args.quick))
                print(f"round {r + 1}/{rounds} {version}: " + ", ".join(
                    f"{row} {1e3 * v['step_s']:.0f} ms" for row, v in runs[version][-1].items()), flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["before"])],
                       capture_output=True)
    table_rows = []
    for row in rows:
        loss = {v: runs[v][0][row]["first_loss"] for v in runs}
        if abs(loss["before"] - loss["after"]) > 1e-4 * max(1.0, abs(loss["after"])):
            raise RuntimeError(f"{row}: the two versions do different work (first loss {loss})")
        med = {v: statistics.median(x[row]["step_s"] for x in runs[v]) for v in runs}
        comp = {v: statistics.median(x[row]["compile_and_first_step_s"] for x in runs[v]) for v in runs}
        cpu = {v: statistics.median(x[row]["step_cpu_s"] for x in runs[v]) for v in runs}
        table_rows.append({"row": row, "step_s": med, "compile_s": comp, "step_cpu_s": cpu, "first_loss": loss,
                           "step_ratio_after_vs_before": med["after"] / med["before"],
                           "step_cpu_ratio_after_vs_before": cpu["after"] / cpu["before"],
                           "compile_ratio_after_vs_before": comp["after"] / comp["before"],
                           "per_round_step_s": {v: [x[row]["step_s"] for x in runs[v]] for v in runs}})
    table = ("| row | step before | step after | after / before | step CPU before | step CPU after | after / before "
             "| compile before | compile after | after / before |\n"
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(
                 f"| {t['row']} | {1e3 * t['step_s']['before']:.1f} ms | {1e3 * t['step_s']['after']:.1f} ms | "
                 f"**{t['step_ratio_after_vs_before']:.2f}x** | {1e3 * t['step_cpu_s']['before']:.0f} ms | "
                 f"{1e3 * t['step_cpu_s']['after']:.0f} ms | **{t['step_cpu_ratio_after_vs_before']:.2f}x** | "
                 f"{t['compile_s']['before']:.2f} s | "
                 f"{t['compile_s']['after']:.2f} s | {t['compile_ratio_after_vs_before']:.2f}x |" for t in table_rows))
    if args.quick or args.no_save:
        print(table)
        return 0
    from benchmarks.common import machine, write

    command = "python -m benchmarks.bench_before_after " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"machine": machine(), "command": command, "before": commit, "after": after_commit,
               "rounds": rounds, "steps": steps, "load_average_end": os.getloadavg(), "rows": table_rows}
    write("before_after", payload,
          f"jaxpeft at `{commit}` (before the binding redesign) vs `{after_commit}`: the reference LM "
          f"(LMConfig.bench(), 8 x 128 tokens, AdamW), each version in a fresh process per round, {rounds} "
          f"interleaved rounds, median of {steps} steps per round, then the median over rounds. The first loss "
          f"of every row is the same in both versions (checked). Compile = the first call (trace + compile + "
          f"one step). Step CPU = the process's CPU seconds per step (all threads), steadier than wall time when the machine is shared.\n\nCommand: `{command}`.\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
