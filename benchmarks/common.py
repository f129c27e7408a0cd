"""Shared pieces of the benchmarks: machine description, timing, result files."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """Where and with what a figure was measured."""
    import flax
    import optax

    device = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": f"{device.platform}: {device.device_kind}",
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }


def block(tree):
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
    return tree


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, run round-robin so that machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def compiled_memory(fn, *args) -> dict[str, int]:
    """XLA's memory analysis of ``jax.jit(fn)`` on ``args``: bytes of arguments, outputs and temporaries."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return {}
    out = {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "alias_bytes": int(analysis.alias_size_in_bytes),
    }
    # Peak live bytes of one step: inputs + outputs (minus those that alias inputs) + scratch.
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def write(name: str, payload: dict, table: str, save: bool = True) -> None:
    """Print ``table``; with ``save``, also write ``results/<name>.json`` and ``results/<name>.md``."""
    print(table)
    if not save:
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    head = f"# {name}\n\nMeasured {m['date']} on {m['device']} ({m['cpu_count']} cores, {m['platform']}), jax {m['jax']}, flax {m['flax']}.\n\n"
    (RESULTS / f"{name}.md").write_text(head + table + "\n")
